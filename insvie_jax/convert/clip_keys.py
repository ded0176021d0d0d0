"""CLIP from a Hugging Face folder (what `CLIPModel.save_pretrained` and a CLIP hub snapshot hold: config.json,
model.safetensors, the tokenizer files and preprocessor_config.json), read without torch.

PyTorch Linear weights are (out, in); our kernels are (in, out). The patch convolution (D, C, p, p) becomes a
(p, p, C, D) kernel over channels-last patches. `logit_scale` and `position_ids` buffers are not needed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy API reads BF16 files)
import numpy as np

from insvie_jax.convert.files import read_safetensors
from insvie_jax.models import clip
from insvie_jax.models.params import module_from_flat

IGNORED = re.compile(r"(^logit_scale$|position_ids$)")
_RENAMES = [  # (Hugging Face name pattern, ours), applied in order to the whole name
    (r"^text_model\.embeddings\.(token|position)_embedding\.weight$", r"text.\1_embedding"),
    (r"^text_model\.final_layer_norm\.", "text.final_norm."),
    (r"^text_model\.encoder\.layers\.", "text.layers."),
    (r"^vision_model\.embeddings\.class_embedding$", "vision.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "vision.patch_embed.kernel"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "vision.position_embedding"),
    (r"^vision_model\.pre_layrnorm\.", "vision.pre_norm."),
    (r"^vision_model\.post_layernorm\.", "vision.post_norm."),
    (r"^vision_model\.encoder\.layers\.", "vision.layers."),
    (r"\.self_attn\.(q|k|v)_proj\.", r".attn.\1."),
    (r"\.self_attn\.out_proj\.", ".attn.out."),
    (r"\.layer_norm(1|2)\.", r".norm\1."),
    (r"\.mlp\.(fc1|fc2)\.", r".\1."),
    (r"(norm\d?)\.weight$", r"\1.scale"),
    (r"\.weight$", ".kernel"),
]


def our_name(hf_name: str) -> str:
    name = hf_name
    for pattern, replacement in _RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def clip_from_hf(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A `CLIPModel` state dict (numpy) -> our flat float32 params."""
    flat = {}
    for hf_name, value in state_dict.items():
        if IGNORED.search(hf_name):
            continue
        name, value = our_name(hf_name), np.asarray(value, np.float32)
        if name == "vision.patch_embed.kernel":
            value = value.transpose(2, 3, 1, 0)
        elif name.endswith(".kernel"):
            value = value.T
        flat[name] = np.ascontiguousarray(value)
    return flat


def _folder(path: str | Path) -> Path:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no CLIP config.json in {folder}: pass a Hugging Face CLIP folder (config.json, "
                                "model.safetensors, vocab.json, merges.txt) with --clip")
    return folder


def load_clip(path: str | Path) -> tuple[clip.ClipModel, clip.ClipConfig]:
    """Our `ClipModel` (float32) from a Hugging Face `CLIPModel` folder (single or sharded safetensors)."""
    folder = _folder(path)
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("model_type", "clip") != "clip":
        raise ValueError(f"{folder}/config.json has model_type {hf.get('model_type')!r}: a CLIPModel folder is needed")
    cfg = clip.ClipConfig.from_hf(hf)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}: save the CLIP model with safe_serialization=True")
    state = {}
    for file in files:
        state.update(read_safetensors(file))
    return module_from_flat(clip.abstract(cfg), clip_from_hf(state), f"CLIP checkpoint {folder}"), cfg


def load_preprocessing(path: str | Path, cfg: clip.ClipConfig) -> clip.Preprocessing:
    """The folder's preprocessor_config.json settings, or CLIPImageProcessor's defaults at the model's size."""
    file = Path(path) / "preprocessor_config.json"
    hf = json.loads(file.read_text()) if file.is_file() else {}
    return clip.Preprocessing.from_hf(hf, cfg.image_size)


def load_tokenizer(path: str | Path):
    """CLIP's byte-level BPE as a `tokenizers.Tokenizer`: the folder's tokenizer.json when it has one, else built
    from vocab.json + merges.txt exactly as transformers' `CLIPTokenizer` builds it."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    folder = Path(path)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    if not (vocab_file.is_file() and merges_file.is_file()):
        raise FileNotFoundError(f"no CLIP tokenizer in {folder}: it needs tokenizer.json, or vocab.json and merges.txt")
    vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
    merges = [tuple(line.split()) for line in merges_file.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#version")]
    bos, eos = "<|startoftext|>", "<|endoftext|>"
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="</w>", fuse_unk=False, unk_token=eos))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                                 normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
                                   r"""[^\s\p{L}\p{N}]+"""), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([bos, eos])
    tokenizer.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), trim_offsets=False,
                                                            add_prefix_space=False)
    return tokenizer


class ClipScorer:
    """The model, tokenizer and preprocessing of one CLIP folder, for `insvie_jax.eval`."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.model, self.cfg = load_clip(path)
        self.tokenizer = load_tokenizer(path)
        self.prep = load_preprocessing(path, self.cfg)

    def images(self, frames: np.ndarray) -> np.ndarray:
        return clip.embed_images(self.model, frames, self.prep)

    def texts(self, texts: list[str]) -> np.ndarray:
        return clip.embed_texts(self.model, self.tokenizer, texts)
