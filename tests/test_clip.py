"""CLIP in Flax vs transformers' CLIPModel (random small weights saved with save_pretrained, read without torch),
its BPE tokenizer vs CLIPTokenizer, and its image preprocessing vs CLIPImageProcessor."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from insvie_jax.convert import clip_keys  # noqa: E402
from insvie_jax.models import clip  # noqa: E402

TEXTS = ["make the circle red", "A Photo of  two cats, sitting on a mat!", "remove the square",
         "don't stop -- it's 42 o'clock", "x" * 5 + " long " * 40]


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A small CLIP-style BPE vocabulary: every byte symbol alone and word-final, a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols]
    merges = ["t h", "th e</w>", "c i", "ci r", "e d</w>", "r e", "m a", "s q", "o v", "a t</w>", "i t"]
    tokens += ["th", "the</w>", "ci", "cir", "ed</w>", "re", "ma", "sq", "ov", "at</w>", "it"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
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
    return folder, model


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_clip_equals_transformers(clip_folder):
    folder, ref = clip_folder
    model, cfg = clip_keys.load_clip(folder)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_image = ref.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    ref_image = getattr(ref_image, "pooler_output", ref_image).numpy()
    assert _rel(np.asarray(model.image_features(pixels)), ref_image) <= 1e-5

    tokenizer = clip_keys.load_tokenizer(folder)
    ids, pooled_at = clip.tokenize(tokenizer, TEXTS, cfg)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(folder)
    hf = hf_tok(TEXTS, padding="max_length", max_length=cfg.max_positions, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref_text = ref.get_text_features(input_ids=hf["input_ids"], attention_mask=hf["attention_mask"])
    ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
    assert _rel(np.asarray(model.text_features(ids, pooled_at)), ref_text) <= 1e-5


def test_tokenizer_ids_equal_clip_tokenizer(clip_folder):
    folder, _ = clip_folder
    hf_tok = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = clip_keys.load_tokenizer(folder)  # built from vocab.json + merges.txt
    for text in TEXTS:
        assert ours.encode(text).ids == hf_tok(text)["input_ids"], text
    hf_tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    from_json = clip_keys.load_tokenizer(folder)  # and from tokenizer.json
    (folder / "tokenizer.json").unlink()
    assert [e.ids for e in from_json.encode_batch(TEXTS)] == [hf_tok(t)["input_ids"] for t in TEXTS]
    ids, pooled_at = clip.tokenize(ours, TEXTS, clip_keys.load_clip(folder)[1])
    long = hf_tok(TEXTS[-1], truncation=True, max_length=24)["input_ids"]
    assert ids[-1].tolist() == long and pooled_at[-1] == 23  # cut to keep the end token


def test_preprocessing_equals_clip_image_processor(clip_folder):
    folder, _ = clip_folder
    cfg = clip_keys.load_clip(folder)[1]
    prep = clip_keys.load_preprocessing(folder, cfg)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
    rng = np.random.default_rng(1)
    for h, w in ((40, 60), (75, 50), (32, 32)):
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        ref = processor(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = clip.preprocess(frames, prep)
        assert ours.shape == ref.shape == (2, 32, 32, 3)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_not_a_clip_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP config.json"):
        clip_keys.load_clip(tmp_path)
