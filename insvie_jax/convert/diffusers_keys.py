"""Transformer parameters: diffusers `CogVideoXTransformer3DModel` state dict <-> our flat params.

Pure numpy on both sides (no torch), so reading a diffusers safetensors folder needs no PyTorch.
PyTorch layouts: Linear weight (out, in), Conv2d weight (out, in, kh, kw). Ours: kernels (in..., out...),
patch kernel (kh, kw, in, out), per-layer parameters stacked on a leading `layers` axis. `RULES` is the one
table (convert/mapping.py) both directions read.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from insvie_jax.config import ModelConfig
from insvie_jax.convert import mapping
from insvie_jax.convert.mapping import LINEAR, VECTOR, Rule, fused, linear, rule, transpose
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.models import transformer as tr
from insvie_jax.models.params import param_shapes


def _linear_pair(ours: str, theirs: str) -> list[Rule]:
    return [rule(f"{ours}.kernel", f"{theirs}.weight", LINEAR), rule(f"{ours}.bias", f"{theirs}.bias", VECTOR)]


def _norm_pair(ours: str, theirs: str) -> list[Rule]:
    return [rule(f"{ours}.scale", f"{theirs}.weight", VECTOR), rule(f"{ours}.bias", f"{theirs}.bias", VECTOR)]


_B = "transformer_blocks.{i}."
RULES = [
    rule("patch_embed.proj_edit.kernel", "patch_embed.proj.weight", transpose((2, 3, 1, 0))),
    rule("patch_embed.proj_edit.bias", "patch_embed.proj.bias", VECTOR),
    *_linear_pair("patch_embed.text_proj", "patch_embed.text_proj"),
    *_linear_pair("time_embedding.linear_1", "time_embedding.linear_1"),
    *_linear_pair("time_embedding.linear_2", "time_embedding.linear_2"),
    *_norm_pair("norm_final", "norm_final"),
    *_linear_pair("norm_out.linear", "norm_out.linear"),
    *_norm_pair("norm_out.norm", "norm_out.norm"),
    *_linear_pair("proj_out", "proj_out"),
    *[r for norm in ("norm1", "norm2") for r in _linear_pair(f"blocks.{norm}.linear", f"{_B}{norm}.linear")
      + _norm_pair(f"blocks.{norm}.norm", f"{_B}{norm}.norm")],
    rule("blocks.attn.qkv.kernel", [f"{_B}attn1.to_{n}.weight" for n in "qkv"], fused(LINEAR, axis=1)),
    rule("blocks.attn.qkv.bias", [f"{_B}attn1.to_{n}.bias" for n in "qkv"], fused(VECTOR, axis=0)),
    *_norm_pair("blocks.attn.norm_q", f"{_B}attn1.norm_q"),
    *_norm_pair("blocks.attn.norm_k", f"{_B}attn1.norm_k"),
    rule("blocks.attn.out.kernel", f"{_B}attn1.to_out.0.weight", linear(2)),
    rule("blocks.attn.out.bias", f"{_B}attn1.to_out.0.bias", VECTOR),
    *_linear_pair("blocks.ff.w1", f"{_B}ff.net.0.proj"),
    *_linear_pair("blocks.ff.w2", f"{_B}ff.net.2"),
]


def _check_double_ch(cfg: ModelConfig) -> None:
    if cfg.patch_embed != "double_ch":
        raise ValueError("diffusers has no fix_proj patch embedding; only model.patch_embed=double_ch converts")


def transformer_from_diffusers(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """diffusers state dict (edit model: `patch_embed.proj` with 2C input channels) -> our flat params."""
    _check_double_ch(cfg)
    return mapping.to_ours(RULES, sd, param_shapes(tr.abstract(cfg)))


def transformer_to_diffusers(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our flat params -> a diffusers state dict that `CogVideoXTransformer3DModel(in_channels=2C)` loads."""
    _check_double_ch(cfg)
    return mapping.to_theirs(RULES, flat)


def diffusers_shapes(our_shapes: dict[str, tuple], cfg: ModelConfig) -> dict[str, tuple]:
    """The diffusers state-dict shapes of our parameters of these shapes."""
    _check_double_ch(cfg)
    return mapping.their_shapes(RULES, our_shapes)


def diffusers_config(cfg: ModelConfig) -> dict:
    """The `CogVideoXTransformer3DModel` config.json of our edit model (in_channels = 2C)."""
    return {
        "_class_name": "CogVideoXTransformer3DModel",
        "num_attention_heads": cfg.num_attention_heads,
        "attention_head_dim": cfg.attention_head_dim,
        "in_channels": 2 * cfg.in_channels,
        "out_channels": cfg.out_channels,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "time_embed_dim": cfg.time_embed_dim,
        "text_embed_dim": cfg.text_embed_dim,
        "num_layers": cfg.num_layers,
        "dropout": 0.0,
        "attention_bias": True,
        "sample_width": cfg.sample_width,
        "sample_height": cfg.sample_height,
        "sample_frames": cfg.sample_frames,
        "patch_size": cfg.patch_size,
        "temporal_compression_ratio": cfg.temporal_compression,
        "max_text_seq_length": cfg.text_length,
        "activation_fn": "gelu-approximate",
        "timestep_activation_fn": "silu",
        "norm_elementwise_affine": True,
        "norm_eps": cfg.norm_eps,
        "spatial_interpolation_scale": cfg.spatial_interpolation_scale,
        "temporal_interpolation_scale": cfg.temporal_interpolation_scale,
        "use_rotary_positional_embeddings": cfg.positions == "rope",
        "use_learned_positional_embeddings": False,
    }


# diffusers config values our model does not implement -> the value it must have.
_FIXED = {
    "flip_sin_to_cos": True, "freq_shift": 0, "attention_bias": True, "activation_fn": "gelu-approximate",
    "timestep_activation_fn": "silu", "norm_elementwise_affine": True, "use_learned_positional_embeddings": False,
    "patch_size_t": None,
}


def config_from_diffusers(config: dict, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig of a `CogVideoXTransformer3DModel` config.json (the inverse of `diffusers_config`).

    A 16-channel (text-to-video) config gives in_channels 16 with `in_channels` read as the per-stream count.
    """
    for key, want in _FIXED.items():
        if config.get(key, want) != want:
            raise NotACheckpoint(f"diffusers config {key}={config[key]!r} is not supported (only {want!r})")
    base = base or ModelConfig()
    defaults = diffusers_config(base)
    get = lambda key: config.get(key, defaults[key])  # noqa: E731
    in_channels = get("in_channels")
    return dataclasses.replace(
        base,
        num_attention_heads=get("num_attention_heads"), attention_head_dim=get("attention_head_dim"),
        in_channels=in_channels // 2 if in_channels != get("out_channels") else in_channels,
        out_channels=get("out_channels"), time_embed_dim=get("time_embed_dim"), text_embed_dim=get("text_embed_dim"),
        num_layers=get("num_layers"), sample_width=get("sample_width"), sample_height=get("sample_height"),
        sample_frames=get("sample_frames"), patch_size=get("patch_size"),
        temporal_compression=get("temporal_compression_ratio"), text_length=get("max_text_seq_length"),
        norm_eps=get("norm_eps"), spatial_interpolation_scale=float(get("spatial_interpolation_scale")),
        temporal_interpolation_scale=float(get("temporal_interpolation_scale")),
        positions="rope" if get("use_rotary_positional_embeddings") else "sincos",
    )
