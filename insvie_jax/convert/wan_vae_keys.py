"""The Wan2.2 VAE's parameters: diffusers `AutoencoderKLWan` state dicts <-> our flat params, and its diffusers
`vae/` folders (config.json + `diffusion_pytorch_model.safetensors`) read without torch and written so that
`AutoencoderKLWan.from_pretrained` loads them.

Our names are diffusers' with the torch layouts made channels-last: `weight` -> `kernel`, `gamma` -> `scale`,
and the resamplers' `resample.1` (an nn.Sequential index) -> `resample`. One table, `_RULES`, says for every
kind of layer how its names and layouts correspond; both directions read it.
PyTorch: Conv3d (out, in, t, h, w), Conv2d (out, in, h, w), RMS norm gamma (C, 1, 1, 1) or, in the attention,
(C, 1, 1). Ours: (t, h, w, in, out), (h, w, in, out), 1x1 convolutions as (in, out) matrices, norms (C,).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from insvie_jax.config import WanVAEConfig
from insvie_jax.convert import files, mapping, registry
from insvie_jax.convert.files import Progress, quiet
from insvie_jax.convert.mapping import CONV2D, CONV3D, VECTOR, pointwise, squeeze
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.models.params import check_params, flat_params, module_from_flat, param_shapes
from insvie_jax.models.wan import vae as wan_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"
CLASS_NAME = "AutoencoderKLWan"

# (modules it covers: regex on the module path, diffusers suffix, our suffix, hook); the first row whose
# suffix and module pattern fit a name applies, in either direction (convert/mapping.py).
_RULES = (
    (r"\.attentions\.\d+\.norm$", ".gamma", ".scale", squeeze(2)),
    (r"\.attentions\.\d+\.(to_qkv|proj)$", ".weight", ".kernel", pointwise(2)),
    (r"(conv_shortcut|quant_conv)$", ".weight", ".kernel", pointwise(3)),  # also post_quant_conv
    (r"sampler\.resample$", ".1.weight", ".kernel", CONV2D),
    (r"sampler\.resample$", ".1.bias", ".bias", VECTOR),
    (r"", ".gamma", ".scale", squeeze(3)),
    (r"", ".weight", ".kernel", CONV3D),
    (r"", ".bias", ".bias", VECTOR),
)


def vae_from_diffusers(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers `AutoencoderKLWan` state dict -> our flat params."""
    return mapping.to_ours(mapping.by_pattern(sd, _RULES, ours=False), sd, None)


def vae_to_diffusers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params -> a state dict that diffusers' `AutoencoderKLWan` loads."""
    return mapping.to_theirs(mapping.by_pattern(flat, _RULES, ours=True), flat)


# ---------------------------------------------------------------------------------------------------
# Configs


def diffusers_vae_config(cfg: WanVAEConfig) -> dict:
    """The `AutoencoderKLWan` config (config.json keys) of a Wan VAE config's architecture."""
    io = wan_vae.RGB * cfg.patch_size**2
    return {
        "_class_name": CLASS_NAME,
        "base_dim": cfg.base_dim,
        "decoder_base_dim": cfg.decoder_base_dim,
        "z_dim": cfg.z_dim,
        "dim_mult": list(cfg.dim_mult),
        "num_res_blocks": cfg.num_res_blocks,
        "attn_scales": [],
        "temperal_downsample": [bool(t) for t in cfg.temperal_downsample],
        "dropout": 0.0,
        "latents_mean": [float(v) for v in cfg.latents_mean],
        "latents_std": [float(v) for v in cfg.latents_std],
        "is_residual": True,
        "in_channels": io,
        "out_channels": io,
        "patch_size": cfg.patch_size,
        "scale_factor_temporal": wan_vae.temporal_compression(cfg),
        "scale_factor_spatial": wan_vae.spatial_compression(cfg),
    }


def vae_config_from_diffusers(config: dict, base: WanVAEConfig | None = None) -> WanVAEConfig:
    """Our config for an `AutoencoderKLWan` config.json: architecture and latent statistics from the file, the
    memory modes and dtypes from `base`."""
    base = base or WanVAEConfig()
    get = lambda key: config.get(key, getattr(base, key))  # noqa: E731
    cfg = dataclasses.replace(
        base, base_dim=int(get("base_dim")), decoder_base_dim=int(config.get("decoder_base_dim") or get("base_dim")),
        z_dim=int(get("z_dim")), dim_mult=list(get("dim_mult")), num_res_blocks=int(get("num_res_blocks")),
        temperal_downsample=[bool(t) for t in get("temperal_downsample")],
        patch_size=int(config.get("patch_size") or 1),
        latents_mean=[float(v) for v in get("latents_mean")], latents_std=[float(v) for v in get("latents_std")])
    # what the implementation assumes (Wan2.2's residual VAE), checked against the file
    expected = diffusers_vae_config(cfg)
    fixed = ("is_residual", "attn_scales", "in_channels", "out_channels", "scale_factor_temporal",
             "scale_factor_spatial")
    wrong = {k: config[k] for k in fixed if k in config and config[k] != expected[k]}
    if config.get("is_residual") is not True:
        wrong["is_residual"] = config.get("is_residual", False)
    if wrong:
        raise NotACheckpoint(f"unsupported AutoencoderKLWan config {wrong}: only the Wan2.2 residual VAE is implemented "
                         f"(expected {({k: expected[k] for k in wrong})})")
    return cfg


# ---------------------------------------------------------------------------------------------------
# Folders


def vae_folder(path: str | Path) -> Path:
    """The `vae/` folder that `path` names: itself, or the `vae/` of a diffusers pipeline folder."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        return path / "vae"
    return path


def read_diffusers_folder(path: str | Path, progress: Progress = quiet) -> tuple[dict[str, np.ndarray], dict]:
    """A diffusers Wan `vae/` folder (or a pipeline folder holding one) -> (state dict as numpy, config.json).
    Needs no torch."""
    path = vae_folder(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is not a diffusers Wan VAE folder: no config.json (nor vae/config.json)")
    config = json.loads(config_file.read_text())
    if config.get("_class_name") != CLASS_NAME:
        raise NotACheckpoint(f"{config_file} describes a {config.get('_class_name')}, not {CLASS_NAME}")
    return files.read_folder(path, WEIGHTS, progress), config


def read_vae(path: str | Path, cfg: WanVAEConfig | None = None,
             progress: Progress = quiet) -> tuple[dict[str, np.ndarray], WanVAEConfig, dict]:
    """(our flat params, our config, config.json) of a diffusers Wan VAE folder, without building the model."""
    sd, config = read_diffusers_folder(path, progress)
    vae_cfg = vae_config_from_diffusers(config, cfg)
    flat = vae_from_diffusers(sd)
    check(flat, vae_cfg, f"Wan VAE checkpoint {path}")
    return flat, vae_cfg, config


def load_vae(path: str | Path, cfg: WanVAEConfig | None = None) -> tuple[wan_vae.WanVAE, WanVAEConfig]:
    """A diffusers Wan `vae/` folder (or pipeline folder) or a native folder -> (our VAE with its weights, its
    config). The architecture and latent statistics come from the checkpoint; memory modes and dtypes from `cfg`."""
    flat, vae_cfg, _ = registry.read(path, "wan-vae", base=cfg)
    return module_from_flat(wan_vae.abstract(vae_cfg), flat, f"Wan VAE checkpoint {path}"), vae_cfg


def save_vae(model: wan_vae.WanVAE, cfg: WanVAEConfig, path: str | Path, dtype: str = "fp32",
             format: str = "diffusers") -> Path:
    """Writes the VAE as a diffusers `vae/` folder (or `format`) in `dtype` ("fp32" | "bf16" | "fp16")."""
    return registry.write(flat_params(model), cfg, path, "wan-vae", format, dtype=dtype)


# ---------------------------------------------------------------------------------------------------
# Codecs (convert/registry.py)


def check(flat: dict[str, np.ndarray], cfg: WanVAEConfig, what: str) -> None:
    check_params(param_shapes(wan_vae.abstract(cfg)), {k: np.shape(v) for k, v in flat.items()}, what)


def native_config(section: dict, options, path) -> WanVAEConfig:
    # the stored architecture, through the same rule as a diffusers config.json; memory modes from the base
    return vae_config_from_diffusers(diffusers_vae_config(WanVAEConfig(**section)), options.base)


def read_diffusers(path: Path, options):
    flat, cfg, _ = read_vae(path, options.base, options.progress)
    return flat, cfg


def write_diffusers(flat, cfg: WanVAEConfig, folder: Path, options) -> None:
    config = {**diffusers_vae_config(cfg), "_diffusers_version": files.package_version("diffusers", "0.35.0")}
    files.write_folder(folder, config, vae_to_diffusers(flat), WEIGHTS, options.dtype,
                       options.max_shard_bytes or files.DIFFUSERS_SHARD_BYTES, options.progress)
