"""UMT5 encoder: Hugging Face `UMT5EncoderModel` folders <-> our parameters, without torch.

The T5 rules of t5_keys with one change: the relative position bias is a per-layer tensor
(`encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight`), stacked on our `layers` axis.
Reads config.json + safetensors (single or sharded with an index; a diffusers pipeline's `text_encoder/`);
writes a folder `UMT5EncoderModel.from_pretrained` loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from insvie_jax.config import TextEncoderConfig
from insvie_jax.convert import files, mapping, registry, t5_keys
from insvie_jax.convert.mapping import rule
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.convert.t5_keys import _ATTN, EMBED_KEY, SHARED_KEY
from insvie_jax.models import umt5
from insvie_jax.models.params import check_params, module_from_flat, param_shapes

WEIGHTS = files.HF_WEIGHTS
LAYER_BIAS_KEY = _ATTN + "relative_attention_bias.weight"

RULES = [r for r in t5_keys.RULES if r.ours != ("relative_attention_bias",)] + [
    rule("blocks.relative_attention_bias", LAYER_BIAS_KEY)]


def _our_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    return param_shapes(umt5.abstract(cfg))


def hf_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face encoder tensor our model needs, with its PyTorch shape."""
    return mapping.their_shapes(RULES, _our_shapes(cfg))


def umt5_from_hf(read, cfg: TextEncoderConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our flat params from a Hugging Face tensor reader (`read(name) -> array`, or a state dict)."""
    return mapping.to_ours(RULES, read, _our_shapes(cfg), dtype)


def umt5_to_hf(flat: dict[str, np.ndarray], cfg: TextEncoderConfig) -> dict[str, np.ndarray]:
    """Our flat params -> the state dict `UMT5EncoderModel` holds (tokens table as `shared.weight` and the
    encoder's tied copy)."""
    check(flat, cfg, "UMT5 parameters")
    sd = mapping.to_theirs(RULES, flat)
    sd[SHARED_KEY] = sd[EMBED_KEY]
    return sd


def hf_config(cfg: TextEncoderConfig) -> dict:
    return {**t5_keys.hf_config(cfg), "architectures": ["UMT5EncoderModel"], "model_type": "umt5",
            "tie_word_embeddings": False}


def read_umt5(path: str | Path, config: TextEncoderConfig | None = None,
              dtype=np.float32) -> tuple[dict[str, np.ndarray], TextEncoderConfig]:
    """(flat params, config) of a Hugging Face UMT5 folder (or a pipeline's `text_encoder/`). Sizes come from
    its config.json, runtime choices (dtypes, scan_layers, max_length) from `config` (default: umt5-xxl's)."""
    folder = t5_keys._model_folder(path)
    hf = json.loads((folder / "config.json").read_text())
    if hf.get("model_type") != "umt5":
        raise NotACheckpoint(f"{folder}/config.json has model_type={hf.get('model_type')!r}, not 'umt5': "
                         "load T5 v1.1 checkpoints with t5_keys.load_t5")
    cfg = dataclasses.replace(t5_keys.config_from_hf(hf, config or umt5.umt5_xxl_config()), path=str(path))
    value = t5_keys._hf_values(folder, RULES, hf_shapes(cfg), f"UMT5 checkpoint {folder}", _our_shapes(cfg))
    return {name: value(name, shape, dtype) for name, shape in _our_shapes(cfg).items()}, cfg


def load_umt5(path: str | Path, config: TextEncoderConfig | None = None):
    """(UMT5Encoder, TextEncoderConfig) from a Hugging Face UMT5 folder."""
    flat, cfg = read_umt5(path, config)
    return module_from_flat(umt5.abstract(cfg), flat, "UMT5 parameters"), cfg


def write_umt5(flat: dict[str, np.ndarray], cfg: TextEncoderConfig, path: str | Path, dtype: str = "fp32",
               max_shard_bytes: int | None = None) -> Path:
    """A Hugging Face folder `UMT5EncoderModel.from_pretrained` loads, staged."""
    return registry.write(flat, cfg, path, "umt5", "hf", dtype=dtype, max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------------------
# Codecs (convert/registry.py)


def check(flat: dict[str, np.ndarray], cfg: TextEncoderConfig, what: str) -> None:
    check_params(_our_shapes(cfg), {k: np.shape(v) for k, v in flat.items()}, what)


def native_config(section: dict, options, path) -> TextEncoderConfig:
    return dataclasses.replace(TextEncoderConfig(**section), path=str(path))


def read_hf(path: Path, options):
    return read_umt5(path, options.base, files.DTYPES[options.dtype])


def write_hf(flat, cfg: TextEncoderConfig, folder: Path, options) -> None:
    config = {**hf_config(cfg), "dtype": files.TORCH_DTYPE_NAMES[options.dtype]}
    files.write_folder(folder, config, umt5_to_hf(flat, cfg), WEIGHTS, options.dtype,
                       options.max_shard_bytes or files.HF_SHARD_BYTES, options.progress)
