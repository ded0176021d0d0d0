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
from insvie_jax.convert import files, t5_keys
from insvie_jax.convert.t5_keys import _ATTN, EMBED_KEY, SHARED_KEY, _Rule
from insvie_jax.models import umt5
from insvie_jax.models.params import check_params, module_from_flat, param_shapes

WEIGHTS = "model.safetensors"
LAYER_BIAS_KEY = _ATTN + "relative_attention_bias.weight"

RULES = {**{k: v for k, v in t5_keys.RULES.items() if k != "relative_attention_bias"},
         "blocks.relative_attention_bias": _Rule((LAYER_BIAS_KEY,))}


def _torch_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    shapes = {k: v for k, v in t5_keys._torch_shapes(cfg).items() if k != t5_keys.BIAS_KEY}
    shapes[LAYER_BIAS_KEY] = (cfg.relative_attention_num_buckets, cfg.num_heads)
    return shapes


def hf_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face encoder tensor our model needs, with its PyTorch shape."""
    return {name.format(i=i): shape for name, shape in _torch_shapes(cfg).items()
            for i in (range(cfg.num_layers) if "{i}" in name else (None,))}


def umt5_from_hf(read, cfg: TextEncoderConfig, dtype=np.float32) -> dict[str, np.ndarray]:
    """Our flat params from a Hugging Face tensor reader (`read(name) -> array`, or a state dict)."""
    read = read.__getitem__ if isinstance(read, dict) else read
    shapes = param_shapes(umt5.abstract(cfg))
    return {name: t5_keys._convert_slice(rule, read, shapes[name], dtype) for name, rule in RULES.items()}


def umt5_to_hf(flat: dict[str, np.ndarray], cfg: TextEncoderConfig) -> dict[str, np.ndarray]:
    """Our flat params -> the state dict `UMT5EncoderModel` holds (tokens table as `shared.weight` and the
    encoder's tied copy)."""
    check_params(param_shapes(umt5.abstract(cfg)), {k: np.shape(v) for k, v in flat.items()}, "UMT5 parameters")
    torch_shapes = _torch_shapes(cfg)
    sd = {}
    for name, rule in RULES.items():
        value = np.asarray(flat[name])
        for layer in range(cfg.num_layers) if rule.stacked else (None,):
            tensors = t5_keys._to_hf(rule, value if layer is None else value[layer], torch_shapes)
            sd.update({hf.format(i=layer): t for hf, t in zip(rule.hf, tensors)})
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
        raise ValueError(f"{folder}/config.json has model_type={hf.get('model_type')!r}, not 'umt5': "
                         "load T5 v1.1 checkpoints with t5_keys.load_t5")
    cfg = dataclasses.replace(t5_keys.config_from_hf(hf, config or umt5.umt5_xxl_config()), path=str(path))
    reader = t5_keys._SafetensorsFolder(folder)
    found = {k: v for k, v in reader.shapes().items() if k.startswith("encoder.")}
    check_params(hf_shapes(cfg), found, f"UMT5 checkpoint {folder}")
    return umt5_from_hf(reader, cfg, dtype), cfg


def load_umt5(path: str | Path, config: TextEncoderConfig | None = None):
    """(UMT5Encoder, TextEncoderConfig) from a Hugging Face UMT5 folder."""
    flat, cfg = read_umt5(path, config)
    return module_from_flat(umt5.abstract(cfg), flat, "UMT5 parameters"), cfg


def write_umt5(flat: dict[str, np.ndarray], cfg: TextEncoderConfig, path: str | Path, dtype: str = "fp32",
               max_shard_bytes: int = t5_keys.MAX_SHARD_BYTES) -> Path:
    """A Hugging Face folder `UMT5EncoderModel.from_pretrained` loads, via a staged rename."""
    with files.staged(path) as tmp:
        tmp.mkdir(parents=True)
        config = {**hf_config(cfg), "dtype": {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        files.write_safetensors(files.cast(umt5_to_hf(flat, cfg), dtype), tmp, WEIGHTS, max_shard_bytes)
    return Path(path).absolute()
