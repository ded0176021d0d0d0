"""Transformer parameters: diffusers `CogVideoXTransformer3DModel` state dict <-> our flat params.

Pure numpy on both sides (no torch), so reading a diffusers safetensors folder needs no PyTorch.
PyTorch layouts: Linear weight (out, in), Conv2d weight (out, in, kh, kw). Ours: kernels (in..., out...),
patch kernel (kh, kw, in, out), per-layer parameters stacked on a leading `layers` axis.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from insvie_jax.config import ModelConfig
from insvie_jax.convert.sat import NotACheckpoint

_BLOCK_NORMS = ("norm1", "norm2")


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def transformer_from_diffusers(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """diffusers state dict (edit model: `patch_embed.proj` with 2C input channels) -> our flat params."""
    if cfg.patch_embed != "double_ch":
        raise ValueError("diffusers has no fix_proj patch embedding; only model.patch_embed=double_ch converts")
    h, hd, d = cfg.num_attention_heads, cfg.attention_head_dim, cfg.hidden_size
    out: dict[str, np.ndarray] = {
        "patch_embed.proj_edit.kernel": np.ascontiguousarray(sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0)),
        "patch_embed.proj_edit.bias": sd["patch_embed.proj.bias"],
        "patch_embed.text_proj.kernel": _linear(sd["patch_embed.text_proj.weight"]),
        "patch_embed.text_proj.bias": sd["patch_embed.text_proj.bias"],
        "time_embedding.linear_1.kernel": _linear(sd["time_embedding.linear_1.weight"]),
        "time_embedding.linear_1.bias": sd["time_embedding.linear_1.bias"],
        "time_embedding.linear_2.kernel": _linear(sd["time_embedding.linear_2.weight"]),
        "time_embedding.linear_2.bias": sd["time_embedding.linear_2.bias"],
        "norm_final.scale": sd["norm_final.weight"],
        "norm_final.bias": sd["norm_final.bias"],
        "norm_out.linear.kernel": _linear(sd["norm_out.linear.weight"]),
        "norm_out.linear.bias": sd["norm_out.linear.bias"],
        "norm_out.norm.scale": sd["norm_out.norm.weight"],
        "norm_out.norm.bias": sd["norm_out.norm.bias"],
        "proj_out.kernel": _linear(sd["proj_out.weight"]),
        "proj_out.bias": sd["proj_out.bias"],
    }
    layers: dict[str, list] = {}

    def add(key, value):
        layers.setdefault(key, []).append(value)

    for i in range(cfg.num_layers):
        pre = f"transformer_blocks.{i}."
        for norm in _BLOCK_NORMS:
            add(f"blocks.{norm}.linear.kernel", _linear(sd[pre + f"{norm}.linear.weight"]))
            add(f"blocks.{norm}.linear.bias", sd[pre + f"{norm}.linear.bias"])
            add(f"blocks.{norm}.norm.scale", sd[pre + f"{norm}.norm.weight"])
            add(f"blocks.{norm}.norm.bias", sd[pre + f"{norm}.norm.bias"])
        a = pre + "attn1."
        qkv_w = np.stack([sd[a + f"to_{n}.weight"].T.reshape(d, h, hd) for n in "qkv"], axis=1)
        qkv_b = np.stack([sd[a + f"to_{n}.bias"].reshape(h, hd) for n in "qkv"], axis=0)
        add("blocks.attn.qkv.kernel", qkv_w)
        add("blocks.attn.qkv.bias", qkv_b)
        for n in "qk":
            add(f"blocks.attn.norm_{n}.scale", sd[a + f"norm_{n}.weight"])
            add(f"blocks.attn.norm_{n}.bias", sd[a + f"norm_{n}.bias"])
        add("blocks.attn.out.kernel", sd[a + "to_out.0.weight"].T.reshape(h, hd, d))
        add("blocks.attn.out.bias", sd[a + "to_out.0.bias"])
        add("blocks.ff.w1.kernel", _linear(sd[pre + "ff.net.0.proj.weight"]))
        add("blocks.ff.w1.bias", sd[pre + "ff.net.0.proj.bias"])
        add("blocks.ff.w2.kernel", _linear(sd[pre + "ff.net.2.weight"]))
        add("blocks.ff.w2.bias", sd[pre + "ff.net.2.bias"])
    out.update({k: np.stack(v) for k, v in layers.items()})
    return out


def transformer_to_diffusers(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our flat params -> a diffusers state dict that `CogVideoXTransformer3DModel(in_channels=2C)` loads."""
    return {k: np.ascontiguousarray(v) for k, v in _diffusers_views(flat, cfg).items()}


def diffusers_shapes(our_shapes: dict[str, tuple], cfg: ModelConfig) -> dict[str, tuple]:
    """The diffusers state-dict shapes of our parameters of these shapes (no memory: zero-stride views)."""
    zeros = {k: np.broadcast_to(np.float32(0), s) for k, s in our_shapes.items()}
    return {k: v.shape for k, v in _diffusers_views(zeros, cfg).items()}


def _diffusers_views(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    if cfg.patch_embed != "double_ch":
        raise ValueError("diffusers has no fix_proj patch embedding; only model.patch_embed=double_ch converts")
    d = cfg.hidden_size
    sd: dict[str, np.ndarray] = {
        "patch_embed.proj.weight": flat["patch_embed.proj_edit.kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": flat["patch_embed.proj_edit.bias"],
        "patch_embed.text_proj.weight": flat["patch_embed.text_proj.kernel"].T,
        "patch_embed.text_proj.bias": flat["patch_embed.text_proj.bias"],
        "time_embedding.linear_1.weight": flat["time_embedding.linear_1.kernel"].T,
        "time_embedding.linear_1.bias": flat["time_embedding.linear_1.bias"],
        "time_embedding.linear_2.weight": flat["time_embedding.linear_2.kernel"].T,
        "time_embedding.linear_2.bias": flat["time_embedding.linear_2.bias"],
        "norm_final.weight": flat["norm_final.scale"],
        "norm_final.bias": flat["norm_final.bias"],
        "norm_out.linear.weight": flat["norm_out.linear.kernel"].T,
        "norm_out.linear.bias": flat["norm_out.linear.bias"],
        "norm_out.norm.weight": flat["norm_out.norm.scale"],
        "norm_out.norm.bias": flat["norm_out.norm.bias"],
        "proj_out.weight": flat["proj_out.kernel"].T,
        "proj_out.bias": flat["proj_out.bias"],
    }
    for i in range(cfg.num_layers):
        pre = f"transformer_blocks.{i}."

        def layer(key):
            return flat[key][i]

        for norm in _BLOCK_NORMS:
            sd[pre + f"{norm}.linear.weight"] = layer(f"blocks.{norm}.linear.kernel").T
            sd[pre + f"{norm}.linear.bias"] = layer(f"blocks.{norm}.linear.bias")
            sd[pre + f"{norm}.norm.weight"] = layer(f"blocks.{norm}.norm.scale")
            sd[pre + f"{norm}.norm.bias"] = layer(f"blocks.{norm}.norm.bias")
        a = pre + "attn1."
        qkv_w, qkv_b = layer("blocks.attn.qkv.kernel"), layer("blocks.attn.qkv.bias")
        for j, n in enumerate("qkv"):
            sd[a + f"to_{n}.weight"] = qkv_w[:, j].reshape(d, d).T
            sd[a + f"to_{n}.bias"] = qkv_b[j].reshape(d)
        for n in "qk":
            sd[a + f"norm_{n}.weight"] = layer(f"blocks.attn.norm_{n}.scale")
            sd[a + f"norm_{n}.bias"] = layer(f"blocks.attn.norm_{n}.bias")
        sd[a + "to_out.0.weight"] = layer("blocks.attn.out.kernel").reshape(d, d).T
        sd[a + "to_out.0.bias"] = layer("blocks.attn.out.bias")
        sd[pre + "ff.net.0.proj.weight"] = layer("blocks.ff.w1.kernel").T
        sd[pre + "ff.net.0.proj.bias"] = layer("blocks.ff.w1.bias")
        sd[pre + "ff.net.2.weight"] = layer("blocks.ff.w2.kernel").T
        sd[pre + "ff.net.2.bias"] = layer("blocks.ff.w2.bias")
    return sd


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
