"""VAE parameters: diffusers `AutoencoderKLCogVideoX` and SAT `3d-vae.pt` state dicts <-> our flat params, and
the VAE's checkpoints read and written in three formats:

- `diffusers`: a `vae/` folder, `config.json` + `diffusion_pytorch_model.safetensors` (sharded with an index when
  large); `AutoencoderKLCogVideoX.from_pretrained` loads what we write.
- `sat`: a `3d-vae.pt` torch file holding {"state_dict": SAT-named tensors} (given as the file or its folder).
- `native`: `config.json` (our VAEConfig) + `params/` (orbax), as the transformer's native format.

Our names are diffusers' with the convolution wrapper dropped (`conv1.conv.weight` -> `conv1.kernel`), norm
weights called `scale`, and the resamplers called `downsample` / `upsample` (diffusers `downsamplers.0.conv`):
the pattern table `ROWS`, read both ways (convert/mapping.py).
PyTorch layouts: Conv3d (out, in, t, h, w), Conv2d (out, in, h, w). Ours: (t, h, w, in, out), (h, w, in, out),
and 1x1x1 convolutions as (in, out) matrices. The key mapping is numpy only; only the SAT `.pt` reader
imports torch (lazily).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path

import numpy as np

from insvie_jax import config as config_lib
from insvie_jax.config import VAEConfig
from insvie_jax.convert import files, mapping, registry, sat
from insvie_jax.convert.files import Progress, quiet
from insvie_jax.convert.mapping import CONV2D, CONV3D, VECTOR, pointwise
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.models import vae as vae_model
from insvie_jax.models.params import check_params, flat_params, module_from_flat, param_shapes

WEIGHTS = files.DIFFUSERS_WEIGHTS
SAT_FILE = sat.VAE_FILE

# SAT -> diffusers renames, applied in this order to every key (CogVideo tools/convert_weight_sat2hf.py,
# VAE_KEYS_RENAME_DICT); afterwards SAT's decoder `up.{i}` becomes `up_blocks.{n - 1 - i}` and `loss.*` goes.
_SAT_RENAMES = (
    ("block.", "resnets."),
    ("down.", "down_blocks."),
    ("downsample", "downsamplers.0"),
    ("upsample", "upsamplers.0"),
    ("nin_shortcut", "conv_shortcut"),
    ("encoder.mid.block_1", "encoder.mid_block.resnets.0"),
    ("encoder.mid.block_2", "encoder.mid_block.resnets.1"),
    ("decoder.mid.block_1", "decoder.mid_block.resnets.0"),
    ("decoder.mid.block_2", "decoder.mid_block.resnets.1"),
)
_SAT_UP = re.compile(r"^decoder\.up\.(\d+)\.")
_DIFFUSERS_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.")
# config.json values every CogVideoX VAE has and the model assumes
_FIXED_CONFIG = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "use_quant_conv": False,
                 "use_post_quant_conv": False}


# ---------------------------------------------------------------------------------------------------
# diffusers <-> ours


# (module regex, diffusers suffix, our suffix, hook): the first row that fits a name applies, either way.
ROWS = (
    (r"\.(down|up)$", "samplers.0.conv.weight", "sample.kernel", CONV2D),  # the resamplers
    (r"\.(down|up)$", "samplers.0.conv.bias", "sample.bias", VECTOR),
    (r"conv_shortcut$", ".weight", ".kernel", pointwise(3)),  # a plain 1x1x1 Conv3d
    (r"conv_shortcut$", ".bias", ".bias", VECTOR),
    (r"\.conv_[yb]$", ".conv.weight", ".kernel", pointwise(3)),  # the spatial norm's 1x1x1 causal convs
    (r"\.conv\w*$", ".conv.weight", ".kernel", CONV3D),  # causal convs wrap their Conv3d as `.conv`
    (r"\.conv\w*$", ".conv.bias", ".bias", VECTOR),
    (r"", ".weight", ".scale", VECTOR),  # norms
    (r"", ".bias", ".bias", VECTOR),
)


def vae_from_diffusers(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers `AutoencoderKLCogVideoX` state dict -> our flat params."""
    return mapping.to_ours(mapping.by_pattern(sd, ROWS, ours=False), sd, None)


def vae_to_diffusers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params -> a state dict that diffusers' `AutoencoderKLCogVideoX` loads."""
    return mapping.to_theirs(mapping.by_pattern(flat, ROWS, ours=True), flat)


# ---------------------------------------------------------------------------------------------------
# SAT <-> diffusers


def sat_to_diffusers(sd: dict) -> dict:
    """SAT `3d-vae.pt` state dict -> diffusers names (values untouched); `loss.*` entries are dropped."""
    renamed = {}
    for key, value in sd.items():
        if key.startswith("loss."):
            continue
        for old, new in _SAT_RENAMES:
            key = key.replace(old, new)
        renamed[key] = value
    ups = {int(m.group(1)) for k in renamed if (m := _SAT_UP.match(k))}
    n = max(ups) + 1 if ups else 0
    return {_SAT_UP.sub(lambda m: f"decoder.up_blocks.{n - 1 - int(m.group(1))}.", k): v for k, v in renamed.items()}


def diffusers_to_sat(sd: dict) -> dict:
    """diffusers names -> SAT `3d-vae.pt` names (the inverse of `sat_to_diffusers`, without `loss.*`)."""
    ups = {int(m.group(1)) for k in sd if (m := _DIFFUSERS_UP.match(k))}
    n = max(ups) + 1 if ups else 0
    out = {}
    for key, value in sd.items():
        key = _DIFFUSERS_UP.sub(lambda m: f"decoder.up.{n - 1 - int(m.group(1))}.", key)
        for old, new in reversed(_SAT_RENAMES):
            key = key.replace(new, old)
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------------------
# Configs


def diffusers_vae_config(cfg: VAEConfig) -> dict:
    """The `AutoencoderKLCogVideoX` config (config.json keys) of a VAE config's architecture."""
    n = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKLCogVideoX",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["CogVideoXDownBlock3D"] * n,
        "up_block_types": ["CogVideoXUpBlock3D"] * n,
        "block_out_channels": list(cfg.block_out_channels),
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu",
        "norm_eps": cfg.norm_eps,
        "norm_num_groups": cfg.norm_num_groups,
        "temporal_compression_ratio": cfg.temporal_compression,
        "sample_height": 2 * cfg.tile_sample_height,
        "sample_width": 2 * cfg.tile_sample_width,
        "scaling_factor": cfg.scaling_factor,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
    }


def vae_config_from_diffusers(config: dict, base: VAEConfig | None = None) -> VAEConfig:
    """Our VAE config for a diffusers config.json: architecture and scaling from the file, the memory modes and
    dtypes from `base`."""
    base = base or VAEConfig()
    unsupported = {k: config[k] for k, v in _FIXED_CONFIG.items() if k in config and config[k] != v}
    if unsupported:
        raise NotACheckpoint(f"unsupported AutoencoderKLCogVideoX config {unsupported}: only {_FIXED_CONFIG} "
                         "is implemented")
    blocks = list(config.get("block_out_channels", base.block_out_channels))
    # diffusers derives the tile size from the config's sample size (half of it)
    tiles = {}
    if "sample_height" in config:
        tiles["tile_sample_height"] = config["sample_height"] // 2
    if "sample_width" in config:
        tiles["tile_sample_width"] = config["sample_width"] // 2
    return dataclasses.replace(
        base,
        block_out_channels=blocks,
        latent_channels=config.get("latent_channels", base.latent_channels),
        layers_per_block=config.get("layers_per_block", base.layers_per_block),
        norm_num_groups=config.get("norm_num_groups", base.norm_num_groups),
        norm_eps=float(config.get("norm_eps", base.norm_eps)),
        temporal_compression=int(config.get("temporal_compression_ratio", base.temporal_compression)),
        spatial_compression=2 ** (len(blocks) - 1),
        scaling_factor=float(config.get("scaling_factor", base.scaling_factor)),
        **tiles,
    )


def _config_from_shapes(sd: dict[str, np.ndarray], base: VAEConfig) -> VAEConfig:
    """Architecture read off a diffusers-named state dict's shapes (a SAT file carries no config)."""
    blocks, i = [], 0
    while f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight" in sd:
        blocks.append(int(sd[f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight"].shape[0]))
        i += 1
    if not blocks:
        raise NotACheckpoint("not a CogVideoX VAE state dict: no encoder.down.0.block.0.conv1 weights found")
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down_blocks.0.resnets.")})
    return vae_config_from_diffusers({
        "block_out_channels": blocks,
        "layers_per_block": layers,
        "latent_channels": int(sd["encoder.conv_out.conv.weight"].shape[0]) // 2,
    }, base)


def vae_with_params(cfg: VAEConfig, flat: dict[str, np.ndarray], what: str = "VAE checkpoint"):
    """Our VAE holding `flat` (our names), built without drawing random weights first."""
    return module_from_flat(vae_model.abstract(cfg), flat, what)


def vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes for `cfg` (tracing the model's construction takes a second or two: cached)."""
    return dict(_vae_shapes(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _vae_shapes(cfg_json: str) -> dict[str, tuple[int, ...]]:
    cfg = VAEConfig(**json.loads(cfg_json))
    return param_shapes(vae_model.abstract(cfg))


# ---------------------------------------------------------------------------------------------------
# Codecs (convert/registry.py)


def check(flat: dict[str, np.ndarray], cfg: VAEConfig, what: str) -> None:
    check_params(vae_shapes(cfg), {k: np.shape(v) for k, v in flat.items()}, what)


def native_config(section: dict, options, path) -> VAEConfig:
    # the stored architecture, through the same rule as a diffusers config.json
    stored = config_lib.from_dict({"vae": section}).vae
    return vae_config_from_diffusers(diffusers_vae_config(stored), options.base)


def read_diffusers(path: Path, options):
    """A diffusers `vae/` folder -> (flat params, config). Needs no torch."""
    config = json.loads((path / "config.json").read_text())
    cfg = vae_config_from_diffusers(config, options.base)
    flat = vae_from_diffusers(files.read_folder(path, WEIGHTS, options.progress))
    check(flat, cfg, f"VAE checkpoint {path}")
    return flat, cfg


def write_diffusers(flat, cfg: VAEConfig, folder: Path, options) -> None:
    config = {**diffusers_vae_config(cfg), "_diffusers_version": files.package_version("diffusers", "0.30.0")}
    files.write_folder(folder, config, vae_to_diffusers(flat), WEIGHTS, options.dtype,
                       options.max_shard_bytes or files.DIFFUSERS_SHARD_BYTES, options.progress)


def read_sat(path: Path, options):
    """A SAT `3d-vae.pt` (torch pickle, dict with `state_dict`), or a folder holding one -> (flat params, config);
    the architecture from the tensors' shapes, the rest from `options.base`."""
    file = sat.vae_file(path)
    saved = sat.torch_load(file)
    sd = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(sd, dict):
        raise NotACheckpoint(f"{file}: expected a dict with a 'state_dict' entry (SAT 3d-vae.pt)")
    sd = sat_to_diffusers({str(k): v.float().numpy() if v.is_floating_point() else v.numpy()
                           for k, v in options.progress(sd.items(), "read SAT VAE") if hasattr(v, "is_floating_point")})
    cfg = _config_from_shapes(sd, options.base or VAEConfig())
    flat = vae_from_diffusers(sd)
    check(flat, cfg, f"VAE checkpoint {path}")
    return flat, cfg


def write_sat(flat, cfg: VAEConfig, out: Path, options) -> None:
    """A `.pt` path gets the file alone, any other path a folder holding `3d-vae.pt`."""
    torch = sat.require_torch()
    sd = diffusers_to_sat(vae_to_diffusers(flat))
    state = {k: sat.to_torch(v, options.dtype) for k, v in options.progress(sd.items(), "write SAT VAE")}
    file = out if out.suffix in sat.SUFFIXES else out / sat.VAE_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, file)


# ---------------------------------------------------------------------------------------------------
# Public API


def read_vae(path: str | Path, cfg: VAEConfig | None = None,
             progress: Progress = quiet) -> tuple[dict[str, np.ndarray], VAEConfig]:
    """(flat params, VAEConfig) of a diffusers, SAT or native VAE checkpoint, without building the model."""
    flat, vae_cfg, _ = registry.read(path, "vae", base=cfg or VAEConfig(), progress=progress)
    return flat, vae_cfg


def load_vae(path: str | Path, cfg: VAEConfig | None = None) -> tuple[vae_model.CogVideoXVAE, dict]:
    """A diffusers `vae/` folder, a SAT `3d-vae.pt` or a native folder -> (our VAE with its weights,
    diffusers-style config dict).

    The architecture comes from the checkpoint (config.json, or the SAT tensors' shapes); memory modes, dtypes
    and, for SAT files, the norm groups, temporal compression and scaling factor come from `cfg`.
    """
    flat, vae_cfg = read_vae(path, cfg)
    return vae_with_params(vae_cfg, flat, what=f"VAE checkpoint {path}"), diffusers_vae_config(vae_cfg)


def write_vae(flat: dict[str, np.ndarray], cfg: VAEConfig, path: str | Path, format: str = "native",
              dtype: str = "fp32", progress: Progress = quiet, max_shard_bytes: int | None = None) -> Path:
    """Writes `flat` as `format` ("native" | "sat" | "diffusers") to `path`, staged; returns the path. For `sat`,
    a `.pt` path gets the file alone, any other path a folder holding `3d-vae.pt`."""
    return registry.write(flat, cfg, path, "vae", format, dtype=dtype, progress=progress,
                          max_shard_bytes=max_shard_bytes)


def save_vae(model: vae_model.CogVideoXVAE, vae_cfg: VAEConfig, path: str | Path, format: str = "native",
             dtype: str = "fp32") -> Path:
    """Writes the VAE's parameters as `format` ("native" | "sat" | "diffusers") in `dtype` ("fp32" | "bf16")."""
    return write_vae(flat_params(model), vae_cfg, path, format, dtype)
