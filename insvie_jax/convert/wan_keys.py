"""Wan transformer parameters: diffusers `WanTransformer3DModel` state dict <-> our flat params, and folders.

One table (`_TOP`, `_LAYER`) names every parameter on both sides with the layout rule between them; both
directions read it (convert/mapping.py).
Pure numpy (no torch): a diffusers folder (config.json + safetensors, sharded with an
index when large, or a pipeline folder with `transformer/`) loads without PyTorch, and what `save_wan` writes
`WanTransformer3DModel.from_pretrained` loads. PyTorch layouts: Linear weight (out, in), Conv3d weight
(out, in, kt, kh, kw). Ours: kernels (in..., out...), patch kernel (kt, kh, kw, in, out), heads split out
(H, Dh), per-layer parameters stacked on a leading `layers` axis.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from insvie_jax.convert import files, mapping, registry
from insvie_jax.convert.mapping import CONV3D, LINEAR, TABLE, VECTOR, linear, rule
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.models.params import check_params, flat_params, module_from_flat, param_shapes
from insvie_jax.models.wan import transformer as wan
from insvie_jax.models.wan.config import WanModelConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "WanTransformer3DModel"

# Layout rules: "linear" / "linear2": a Linear weight whose input spans our first 1 / 2 kernel axes;
# "conv3d": the patch embedding; "table": a (1, k, D) modulation table, ours (k, D); "vector": same values,
# reshaped (biases and norm weights whose heads we split out).
_TOP = [
    ("patch_embedding.kernel", "patch_embedding.weight", "conv3d"),
    ("patch_embedding.bias", "patch_embedding.bias", "vector"),
    ("time_embedding.linear_1.kernel", "condition_embedder.time_embedder.linear_1.weight", "linear"),
    ("time_embedding.linear_1.bias", "condition_embedder.time_embedder.linear_1.bias", "vector"),
    ("time_embedding.linear_2.kernel", "condition_embedder.time_embedder.linear_2.weight", "linear"),
    ("time_embedding.linear_2.bias", "condition_embedder.time_embedder.linear_2.bias", "vector"),
    ("time_embedding.time_proj.kernel", "condition_embedder.time_proj.weight", "linear"),
    ("time_embedding.time_proj.bias", "condition_embedder.time_proj.bias", "vector"),
    ("text_embedding.linear_1.kernel", "condition_embedder.text_embedder.linear_1.weight", "linear"),
    ("text_embedding.linear_1.bias", "condition_embedder.text_embedder.linear_1.bias", "vector"),
    ("text_embedding.linear_2.kernel", "condition_embedder.text_embedder.linear_2.weight", "linear"),
    ("text_embedding.linear_2.bias", "condition_embedder.text_embedder.linear_2.bias", "vector"),
    ("proj_out.kernel", "proj_out.weight", "linear"),
    ("proj_out.bias", "proj_out.bias", "vector"),
    ("scale_shift_table", "scale_shift_table", "table"),
]
_LAYER = [
    *[(f"blocks.{a}.to_{n}.kernel", f"blocks.{{i}}.{a}.to_{n}.weight", "linear") for a in ("attn1", "attn2")
      for n in "qkv"],
    *[(f"blocks.{a}.to_{n}.bias", f"blocks.{{i}}.{a}.to_{n}.bias", "vector") for a in ("attn1", "attn2")
      for n in "qkv"],
    *[(f"blocks.{a}.to_out.kernel", f"blocks.{{i}}.{a}.to_out.0.weight", "linear2") for a in ("attn1", "attn2")],
    *[(f"blocks.{a}.to_out.bias", f"blocks.{{i}}.{a}.to_out.0.bias", "vector") for a in ("attn1", "attn2")],
    *[(f"blocks.{a}.norm_{n}.scale", f"blocks.{{i}}.{a}.norm_{n}.weight", "vector") for a in ("attn1", "attn2")
      for n in "qk"],
    ("blocks.ffn.w1.kernel", "blocks.{i}.ffn.net.0.proj.weight", "linear"),
    ("blocks.ffn.w1.bias", "blocks.{i}.ffn.net.0.proj.bias", "vector"),
    ("blocks.ffn.w2.kernel", "blocks.{i}.ffn.net.2.weight", "linear"),
    ("blocks.ffn.w2.bias", "blocks.{i}.ffn.net.2.bias", "vector"),
    ("blocks.scale_shift_table", "blocks.{i}.scale_shift_table", "table"),
]
_CROSS_NORM = [("blocks.norm2.scale", "blocks.{i}.norm2.weight", "vector"),
               ("blocks.norm2.bias", "blocks.{i}.norm2.bias", "vector")]


_HOOKS = {"linear": LINEAR, "linear2": linear(2), "conv3d": CONV3D, "table": TABLE, "vector": VECTOR}


def rules(cfg: WanModelConfig) -> list[mapping.Rule]:
    layers = _LAYER + (_CROSS_NORM if cfg.cross_attn_norm else [])
    return [rule(ours, theirs, _HOOKS[kind]) for ours, theirs, kind in _TOP + layers]


def transformer_from_diffusers(sd: dict[str, np.ndarray], cfg: WanModelConfig) -> dict[str, np.ndarray]:
    """diffusers state dict of the edit model (patch embedding with 2C input channels) -> our flat params."""
    return mapping.to_ours(rules(cfg), sd, param_shapes(wan.abstract(cfg)))


def transformer_to_diffusers(flat: dict[str, np.ndarray], cfg: WanModelConfig) -> dict[str, np.ndarray]:
    """Our flat params -> a state dict that `WanTransformer3DModel(**diffusers_config(cfg))` loads."""
    return mapping.to_theirs(rules(cfg), flat)


def diffusers_config(cfg: WanModelConfig) -> dict:
    """The `WanTransformer3DModel` config.json of our edit model (in_channels = 2C, Lucy-Edit's layout)."""
    return {
        "_class_name": CLASS_NAME,
        "patch_size": list(cfg.patch_size),
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": 2 * cfg.in_channels,
        "out_channels": cfg.out_channels,
        "text_dim": cfg.text_embed_dim,
        "freq_dim": cfg.freq_dim,
        "ffn_dim": cfg.ffn_dim,
        "num_layers": cfg.num_layers,
        "cross_attn_norm": cfg.cross_attn_norm,
        "qk_norm": "rms_norm_across_heads",
        "eps": cfg.eps,
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": cfg.rope_max_seq_len,
        "pos_embed_seq_len": None,
    }


# diffusers config values our model does not implement (Wan 2.1 image-to-video parts) -> the value it must have.
_FIXED = {"qk_norm": "rms_norm_across_heads", "image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}


def config_from_diffusers(config: dict, base: WanModelConfig | None = None) -> tuple[WanModelConfig, bool]:
    """(WanModelConfig, is_edit) of a `WanTransformer3DModel` config.json. An edit model has in_channels =
    2 * out_channels; a text-to-video one (in = out) gives the same WanModelConfig with is_edit False."""
    for key, want in _FIXED.items():
        if config.get(key, want) != want:
            raise NotACheckpoint(f"diffusers Wan config {key}={config[key]!r} is not supported (only {want!r})")
    base = base or WanModelConfig()
    defaults = diffusers_config(base)
    get = lambda key: config.get(key, defaults[key])  # noqa: E731
    in_channels, out_channels = get("in_channels"), get("out_channels") or get("in_channels")
    if in_channels not in (out_channels, 2 * out_channels):
        raise NotACheckpoint(f"diffusers Wan config in_channels={in_channels}: expected out_channels ({out_channels}, "
                         f"text-to-video) or twice it (editing)")
    cfg = dataclasses.replace(
        base, patch_size=list(get("patch_size")), num_attention_heads=get("num_attention_heads"),
        attention_head_dim=get("attention_head_dim"), in_channels=out_channels, out_channels=out_channels,
        text_embed_dim=get("text_dim"), freq_dim=get("freq_dim"), ffn_dim=get("ffn_dim"),
        num_layers=get("num_layers"), cross_attn_norm=bool(get("cross_attn_norm")), eps=float(get("eps")),
        rope_max_seq_len=get("rope_max_seq_len"),
    )
    return cfg, in_channels == 2 * out_channels


def edit_from_t2v(sd: dict[str, np.ndarray], cfg: WanModelConfig) -> dict[str, np.ndarray]:
    """A text-to-video state dict (C input channels) with its patch embedding widened to the edit model's 2C as
    InsViE does: the noisy channels copied, the source channels zero, so the edit model starts as the T2V one."""
    w = sd["patch_embedding.weight"]
    edit = np.zeros((w.shape[0], 2 * cfg.in_channels, *w.shape[2:]), w.dtype)
    edit[:, : w.shape[1]] = w
    return {**sd, "patch_embedding.weight": edit}


def _folder(path: Path) -> Path:
    return path / "transformer" if not (path / "config.json").is_file() and (path / "transformer").is_dir() else path


def read_diffusers(path: str | Path, options=None) -> tuple[dict[str, np.ndarray], WanModelConfig]:
    """(flat params, config) of a diffusers Wan transformer folder (or a pipeline folder's `transformer/`); a
    text-to-video / TI2V checkpoint becomes the edit model by `edit_from_t2v`."""
    path = _folder(Path(path))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: expected a diffusers WanTransformer3DModel folder")
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise NotACheckpoint(f"{path}/config.json describes a {config['_class_name']}, not a {CLASS_NAME}")
    cfg, is_edit = config_from_diffusers(config)
    sd = files.read_folder(path, WEIGHTS, options.progress if options else files.quiet)
    if not is_edit:
        sd = edit_from_t2v(sd, cfg)
    mapping.check_theirs(mapping.their_shapes(rules(cfg), param_shapes(wan.abstract(cfg))), sd,
                         f"diffusers checkpoint {path}")
    flat = transformer_from_diffusers(sd, cfg)
    check(flat, cfg, f"diffusers checkpoint {path}")
    return flat, cfg


def write_diffusers(flat: dict[str, np.ndarray], cfg: WanModelConfig, folder: Path, options) -> None:
    """A diffusers `WanTransformer3DModel` folder (sharded above the options' shard size) at the staged `folder`."""
    config = {**diffusers_config(cfg), "_diffusers_version": files.package_version("diffusers", "0.35.0")}
    files.write_folder(folder, config, transformer_to_diffusers(flat, cfg), WEIGHTS, options.dtype,
                       options.max_shard_bytes or files.DIFFUSERS_SHARD_BYTES, options.progress)


def check(flat: dict[str, np.ndarray], cfg: WanModelConfig, what: str) -> None:
    check_params(param_shapes(wan.abstract(cfg)), {k: np.shape(v) for k, v in flat.items()}, what)


def native_config(section: dict, options, path) -> WanModelConfig:
    return WanModelConfig(**section)


def load_wan_transformer(path: str | Path, dtype: str | None = None):
    """(WanEditTransformer, WanModelConfig) from a diffusers or native folder; `dtype` overrides the compute
    dtype."""
    flat, cfg, _ = registry.read(path, "wan")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return module_from_flat(wan.abstract(cfg), flat, "parameters"), cfg


def save_wan_transformer(model, cfg: WanModelConfig, path: str | Path, dtype: str = "fp32",
                         format: str = "diffusers") -> Path:
    return registry.write(flat_params(model), cfg, path, "wan", format, dtype=dtype)
