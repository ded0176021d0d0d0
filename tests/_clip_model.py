"""A tiny random CLIP in a Hugging Face folder, made with transformers (tests/test_clip.py, test_eval_cli.py)."""

from __future__ import annotations

import json
from pathlib import Path


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style BPE vocabulary: every byte symbol alone and word-final, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = ["t h", "th e</w>", "c i", "ci r", "e d</w>", "r e", "m a", "s q", "o v", "a t</w>", "i t"]
    tokens += ["th", "the</w>", "ci", "cir", "ed</w>", "re", "ma", "sq", "ov", "at</w>", "it"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_clip(folder: Path):
    """Writes config.json, model.safetensors, vocab.json, merges.txt and preprocessor_config.json of a random
    CLIPModel (32-pixel images, 8-pixel patches, 24 text positions) into `folder`; returns the torch model."""
    import torch
    import transformers

    vocab, merges = _byte_vocab()
    text = dict(vocab_size=len(vocab), hidden_size=40, intermediate_size=72, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=24, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    vision = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8, hidden_act="quick_gelu")
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    with torch.no_grad():  # non-default norms and biases, so that every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}) \
        .save_pretrained(folder)
    return model
