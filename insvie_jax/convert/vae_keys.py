"""VAE parameters: diffusers `AutoencoderKLCogVideoX` and SAT `3d-vae.pt` state dicts <-> our flat params, and
the VAE's checkpoints read and written in three formats:

- `diffusers`: a `vae/` folder, `config.json` + `diffusion_pytorch_model.safetensors` (sharded with an index when
  large); `AutoencoderKLCogVideoX.from_pretrained` loads what we write.
- `sat`: a `3d-vae.pt` torch file holding {"state_dict": SAT-named tensors} (given as the file or its folder).
- `native`: `config.json` (our VAEConfig) + `params/` (orbax), as the transformer's native format.

Our names are diffusers' with the convolution wrapper dropped (`conv1.conv.weight` -> `conv1.kernel`), norm
weights called `scale`, and the resamplers called `downsample` / `upsample` (diffusers `downsamplers.0.conv`).
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
from insvie_jax.convert import files, sat
from insvie_jax.convert.files import Progress, quiet
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.models import vae as vae_model
from insvie_jax.models.params import check_params, flat_params, module_from_flat, param_shapes

FORMATS = ("native", "sat", "diffusers")
NATIVE_FORMAT = "insvie-jax-vae"
WEIGHTS = "diffusion_pytorch_model.safetensors"
SAT_FILE = "3d-vae.pt"
SAT_SUFFIXES = (".pt", ".pth", ".ckpt")
MAX_SHARD_BYTES = 10 * 2**30  # diffusers' default shard size

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
_RESAMPLER = re.compile(r"\.(down|up)samplers\.0\.conv\.")
_OUR_RESAMPLER = re.compile(r"\.(down|up)sample$")
# config.json values every CogVideoX VAE has and the model assumes
_FIXED_CONFIG = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "use_quant_conv": False,
                 "use_post_quant_conv": False}


# ---------------------------------------------------------------------------------------------------
# diffusers <-> ours


def _our_key(key: str, ndim: int) -> str:
    key = _RESAMPLER.sub(r".\1sample.", key)
    key = key.replace(".conv.weight", ".weight").replace(".conv.bias", ".bias")
    if key.endswith(".weight"):
        key = key[: -len("weight")] + ("scale" if ndim == 1 else "kernel")
    return key


def vae_from_diffusers(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """diffusers `AutoencoderKLCogVideoX` state dict -> our flat params."""
    out = {}
    for key, w in sd.items():
        w = np.asarray(w)
        if w.ndim == 5 and w.shape[2:] == (1, 1, 1):
            w = w[:, :, 0, 0, 0].T
        elif w.ndim == 5:
            w = w.transpose(2, 3, 4, 1, 0)
        elif w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
        out[_our_key(key, np.ndim(sd[key]))] = np.ascontiguousarray(w)
    return out


def vae_to_diffusers(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Our flat params -> a state dict that diffusers' `AutoencoderKLCogVideoX` loads."""
    sd = {}
    for key, w in flat.items():
        base, leaf = key.rsplit(".", 1)
        w = np.asarray(w)
        if leaf == "scale":
            sd[base + ".weight"] = w
            continue
        if leaf == "bias" and base + ".scale" in flat:
            sd[key] = w
            continue
        name = "weight" if leaf == "kernel" else leaf
        if _OUR_RESAMPLER.search(base):
            new = _OUR_RESAMPLER.sub(r".\1samplers.0.conv", base) + "." + name
        elif base.endswith("conv_shortcut"):
            new = f"{base}.{name}"
        else:
            new = f"{base}.conv.{name}"
        if leaf == "kernel":
            w = {2: lambda a: a.T[:, :, None, None, None], 4: lambda a: a.transpose(3, 2, 0, 1),
                 5: lambda a: a.transpose(4, 3, 0, 1, 2)}[w.ndim](w)
        sd[new] = np.ascontiguousarray(w)
    return sd


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


# ---------------------------------------------------------------------------------------------------
# Readers


def read_diffusers_folder(path: str | Path, progress: Progress = quiet) -> tuple[dict[str, np.ndarray], dict]:
    """A diffusers `vae/` folder -> (state dict as numpy, config.json). Needs no torch."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path} is not a diffusers VAE folder: no config.json")
    config = json.loads(config_file.read_text())
    if config.get("_class_name", "AutoencoderKLCogVideoX") != "AutoencoderKLCogVideoX":
        raise NotACheckpoint(f"{config_file} describes a {config['_class_name']}, not AutoencoderKLCogVideoX")
    names = files.safetensors_files(path, WEIGHTS)
    missing = [f for f in names if not (path / f).exists()]
    if missing:
        raise FileNotFoundError(f"{path}: missing {missing} (only safetensors weights are read)")
    sd = {}
    for name in names:
        sd.update(files.read_safetensors(path / name, progress))
    return sd, config


def _sat_file(path: Path) -> Path | None:
    """The SAT `.pt` that `path` names: the file itself, or the `3d-vae.pt` in a folder."""
    if path.is_dir():
        path = path / SAT_FILE
    return path if path.is_file() and path.suffix in SAT_SUFFIXES else None


def is_sat_vae(path: str | Path) -> bool:
    """Whether `path` is (or is a folder holding) a torch file whose `state_dict` has `encoder.`/`decoder.` keys."""
    file = _sat_file(Path(path))
    if file is None:
        return False
    try:
        saved = sat.torch_load(file)
    except (NotACheckpoint, OSError):  # not readable as weights: not a SAT VAE
        # (the transformer reader, which gets everything else, names the problem)
        return False
    sd = saved.get("state_dict") if isinstance(saved, dict) else None
    return isinstance(sd, dict) and any(str(k).startswith(("encoder.", "decoder.")) for k in sd)


def read_sat_pt(path: str | Path, progress: Progress = quiet) -> dict[str, np.ndarray]:
    """A SAT `3d-vae.pt` (torch pickle, dict with `state_dict`) -> diffusers-named numpy state dict."""
    saved = sat.torch_load(path)
    sd = saved.get("state_dict", saved) if isinstance(saved, dict) else None
    if not isinstance(sd, dict):
        raise NotACheckpoint(f"{path}: expected a dict with a 'state_dict' entry (SAT 3d-vae.pt)")
    return sat_to_diffusers({str(k): v.float().numpy() if v.is_floating_point() else v.numpy()
                             for k, v in progress(sd.items(), "read SAT VAE") if hasattr(v, "is_floating_point")})


def _read(path: Path, base: VAEConfig, progress: Progress) -> tuple[dict[str, np.ndarray], VAEConfig, dict]:
    """(our flat params, our config, diffusers-style config dict) of a checkpoint in any of the formats."""
    if files.native_format(path) == NATIVE_FORMAT:
        flat, meta = files.read_native(path, NATIVE_FORMAT, progress)
        # the stored architecture, through the same rule as a diffusers config.json
        config = diffusers_vae_config(config_lib.from_dict({"vae": meta["vae"]}).vae)
        return flat, vae_config_from_diffusers(config, base), config
    sat_file = _sat_file(path)
    if sat_file is not None and not (path / "config.json").exists():
        sd = read_sat_pt(sat_file, progress)
        vae_cfg = _config_from_shapes(sd, base)
        return vae_from_diffusers(sd), vae_cfg, diffusers_vae_config(vae_cfg)
    if path.is_dir():
        sd, config = read_diffusers_folder(path, progress)
        return vae_from_diffusers(sd), vae_config_from_diffusers(config, base), config
    raise NotACheckpoint(f"VAE path {path}: expected a diffusers vae/ folder, a SAT {SAT_FILE} file (or a folder "
                         "holding one) or a native folder (config.json + params/)")


def vae_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter shapes for `cfg` (tracing the model's construction takes a second or two: cached)."""
    return dict(_vae_shapes(json.dumps(dataclasses.asdict(cfg), sort_keys=True)))


@functools.lru_cache(maxsize=8)
def _vae_shapes(cfg_json: str) -> dict[str, tuple[int, ...]]:
    cfg = VAEConfig(**json.loads(cfg_json))
    return param_shapes(vae_model.abstract(cfg))


def read_vae(path: str | Path, cfg: VAEConfig | None = None,
             progress: Progress = quiet) -> tuple[dict[str, np.ndarray], VAEConfig]:
    """(flat params, VAEConfig) of a diffusers, SAT or native VAE checkpoint, without building the model."""
    flat, vae_cfg, _ = _read(Path(path), cfg or VAEConfig(), progress)
    check_params(vae_shapes(vae_cfg), {k: np.shape(v) for k, v in flat.items()}, f"VAE checkpoint {path}")
    return flat, vae_cfg


def load_vae(path: str | Path, cfg: VAEConfig | None = None) -> tuple[vae_model.CogVideoXVAE, dict]:
    """A diffusers `vae/` folder, a SAT `3d-vae.pt` or a native folder -> (our VAE with its weights,
    diffusers-style config dict).

    The architecture comes from the checkpoint (config.json, or the SAT tensors' shapes); memory modes, dtypes
    and, for SAT files, the norm groups, temporal compression and scaling factor come from `cfg`.
    """
    flat, vae_cfg, config = _read(Path(path), cfg or VAEConfig(), quiet)
    return vae_with_params(vae_cfg, flat, what=f"VAE checkpoint {path}"), config


# ---------------------------------------------------------------------------------------------------
# Writers


def write_vae(flat: dict[str, np.ndarray], cfg: VAEConfig, path: str | Path, format: str = "native",
              dtype: str = "fp32", progress: Progress = quiet, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes `flat` as `format` to `path` via a temporary sibling renamed at the end; returns the path.
    For `sat`, a `.pt` path gets the file alone, any other path a folder holding `3d-vae.pt`."""
    if format not in FORMATS:
        raise ValueError(f"VAE format {format!r}: expected one of {', '.join(FORMATS)}")
    check_params(vae_shapes(cfg), {k: np.shape(v) for k, v in flat.items()}, "VAE parameters to save")
    with files.staged(path, files.output_bytes(flat, dtype)) as tmp:
        if format == "native":
            files.write_native(files.cast(flat, dtype, progress), NATIVE_FORMAT, "vae", cfg, tmp, progress)
        elif format == "diffusers":
            tmp.mkdir(parents=True)
            config = {**diffusers_vae_config(cfg), "_diffusers_version": files.package_version("diffusers", "0.30.0")}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            files.write_safetensors(files.cast(vae_to_diffusers(flat), dtype, progress), tmp, WEIGHTS,
                                    max_shard_bytes, progress)
        else:
            torch = sat.require_torch()
            sd = files.cast(diffusers_to_sat(vae_to_diffusers(flat)), dtype, progress)
            state = {k: sat.to_torch(v, dtype) for k, v in progress(sd.items(), "write SAT VAE")}
            file = tmp if tmp.suffix in SAT_SUFFIXES else tmp / SAT_FILE
            file.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": state}, file)
    return Path(path).absolute()


def save_vae(model: vae_model.CogVideoXVAE, vae_cfg: VAEConfig, path: str | Path, format: str = "native",
             dtype: str = "fp32") -> Path:
    """Writes the VAE's parameters as `format` ("native" | "sat" | "diffusers") in `dtype` ("fp32" | "bf16")."""
    return write_vae(flat_params(model), vae_cfg, path, format, dtype)
