"""Load and save the editing transformer in three formats, detected from the path.

- `sat`: InsViE's release (SwissArmyTransformer): `<dir>/latest` + `<dir>/<iter>/mp_rank_00_model_states.pt`,
  or the `.pt` itself. No sizes are stored: they are read from the tensors, or from `--sat-config` (the yaml).
- `diffusers`: `config.json` + `diffusion_pytorch_model.safetensors` (sharded with an index when large), or a
  pipeline folder with `transformer/`; `CogVideoXTransformer3DModel.from_pretrained` loads what we write.
- `native`: `config.json` (our ModelConfig) + `params/`, an orbax checkpoint of the flat parameters.

Everything passes through flat `{"a.b.kernel": np.ndarray}` params and the codec registry (registry.py), which
detects, stages and writes; this module holds the transformer's codec functions (their key mappings are
diffusers_keys.RULES and sat_keys.RULES), its parameter check and its public load / save.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from insvie_jax import config as config_lib
from insvie_jax.config import ModelConfig
from insvie_jax.convert import diffusers_keys, files, mapping, registry, sat, sat_keys
from insvie_jax.convert import sat_config as sat_configs
from insvie_jax.convert.files import Progress
from insvie_jax.convert.files import quiet as _quiet
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.convert.sat_config import SatFormatError
from insvie_jax.models import lora as lora_lib
from insvie_jax.models import transformer as tr
from insvie_jax.models.params import ParamMismatch, check_params, flat_params, module_from_flat, param_shapes

def detect_format(path: str | Path) -> str:
    return registry.detect(path, "transformer").format


def _preset_hint(found: dict[str, tuple]) -> str:
    """Names the shipped presets (configs/*.yaml) whose parameter shapes the checkpoint has, if any."""
    models = ((name, config_lib.load(name).model) for name in config_lib.presets())
    fitting = [name for name, m in models if m.family == "cogvideox" and param_shapes(tr.abstract(m)) == found]
    if not fitting:
        return ""
    return f"\nthe tensors fit preset {', '.join(repr(n) for n in fitting)} (configs/): use that config"


def native_config(section: dict, options, path) -> ModelConfig:
    return config_lib.from_dict({"model": section}).model


def check_flat(flat: dict[str, np.ndarray], cfg: ModelConfig, what: str) -> None:
    """Names missing, unexpected and wrongly shaped parameters, and the preset the tensors do fit."""
    found = {k: tuple(np.shape(v)) for k, v in flat.items()}
    try:
        check_params(param_shapes(tr.abstract(cfg)), found, what)
    except ParamMismatch as err:
        raise ParamMismatch(str(err) + _preset_hint(found)) from None


check = check_flat  # the registry's name for a model's parameter check


def _edit_from_t2v(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """A text-to-video patch kernel (C input channels) becomes the edit kernel as InsViE initialises it:
    the noisy-stream channels copied, the source channels zero (the model ignores the source at first)."""
    kernel = flat["patch_embed.proj_edit.kernel"]
    if kernel.shape[2] == cfg.in_channels:
        edit = np.zeros((*kernel.shape[:2], 2 * cfg.in_channels, kernel.shape[3]), kernel.dtype)
        edit[:, :, :cfg.in_channels] = kernel
        flat = {**flat, "patch_embed.proj_edit.kernel": edit}
    return flat


# ---------------------------------------------------------------------------------------------------
# Readers: path -> (flat params, config)


@dataclasses.dataclass
class SatLora:
    """A SAT file's adapters in our layout: `lora_a` / `lora_b` flat params for `models.lora.add_lora`."""

    flat: dict[str, np.ndarray]
    rank: int
    alpha: float
    targets: tuple[str, ...]


def _read_sat(path: Path, sat_config, merge_lora: bool, progress: Progress):
    """(flat params, config, SatLora or None): adapters are merged, or with merge_lora=False returned apart."""
    sd = sat_keys.strip_prefix(sat.read_module(path, progress))
    if sat_config is not None and not isinstance(sat_config, dict):
        sat_config = yaml.safe_load(Path(sat_config).read_text())
    yaml_rank, alpha = sat_keys.yaml_lora(sat_config)
    adapters = None
    if sat_keys.has_lora(sd):
        if merge_lora:
            sd = sat_keys.merge_lora(sd, alpha)
        else:
            sd, adapters = sat_keys.split_lora(sd)
    if "mixins.patch_embed.proj_edit.weight" not in sd and f"{sat_keys.T2V_PROJ}.weight" in sd:
        sd = {**sd, **{f"mixins.patch_embed.proj_edit.{k}": sd[f"{sat_keys.T2V_PROJ}.{k}"] for k in ("weight", "bias")}}
    try:
        cfg = sat_configs.infer_config(sd, sat_config)
    except SatFormatError as err:
        raise SatFormatError(f"{path}: {err}") from None
    sd = sat_keys.loadable_keys(sd)
    # The 16-channel `proj` is dead weight in the edit model (and absent from a 5B-style file): not checked.
    expected = sat_keys.sat_shapes(cfg)
    sd = {k: v for k, v in sd.items() if not k.startswith(sat_keys.T2V_PROJ + ".")}
    expected = {k: v for k, v in expected.items() if not k.startswith(sat_keys.T2V_PROJ + ".")}
    found = {k: tuple(v.shape) for k, v in sd.items()}
    if found.get("mixins.patch_embed.proj_edit.weight", (0, 0))[1:2] == (cfg.in_channels,):
        expected["mixins.patch_embed.proj_edit.weight"] = found["mixins.patch_embed.proj_edit.weight"]
    try:
        check_params(expected, found, f"SAT checkpoint {path}")
    except ParamMismatch as err:
        flat_shapes = _sat_as_flat_shapes(found)
        raise ParamMismatch(str(err) + (_preset_hint(flat_shapes) if flat_shapes else "")) from None
    flat = sat_keys.transformer_from_sat(sd, cfg)
    lora = None
    if adapters:
        lora_flat, rank, targets = sat_keys.lora_to_flat(adapters, cfg)
        if yaml_rank is not None and yaml_rank != rank:
            raise SatFormatError(f"{path}: the adapters have rank {rank} but the SAT yaml's "
                                          f"lora_config says r={yaml_rank}")
        lora = SatLora(lora_flat, rank, alpha, targets)
    return _edit_from_t2v(flat, cfg), cfg, lora


def _sat_as_flat_shapes(found: dict[str, tuple]) -> dict[str, tuple] | None:
    """Our parameter shapes for a SAT file's tensors (for the preset hint), when its own sizes are consistent."""
    try:
        return param_shapes(tr.abstract(sat_configs.shape_config(found)))
    except (SatFormatError, ValueError, ZeroDivisionError):
        return None


def _diffusers_dir(path: Path) -> Path:
    return path / "transformer" if not (path / "config.json").is_file() and (path / "transformer").is_dir() else path


def read_diffusers(path: Path, options):
    path = _diffusers_dir(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name", "CogVideoXTransformer3DModel") != "CogVideoXTransformer3DModel":
        raise NotACheckpoint(f"{path}/config.json describes a {config['_class_name']}, not the CogVideoX transformer")
    cfg = diffusers_keys.config_from_diffusers(config)
    sd = files.read_folder(path, files.DIFFUSERS_WEIGHTS, options.progress)
    sd.pop("patch_embed.pos_embedding", None)  # a recomputed buffer
    expected = diffusers_keys.diffusers_shapes(param_shapes(tr.abstract(cfg)), cfg)
    mapping.check_theirs(expected, sd, f"diffusers checkpoint {path}")
    flat = _edit_from_t2v(diffusers_keys.transformer_from_diffusers(sd, cfg), cfg)
    check_flat(flat, cfg, f"diffusers checkpoint {path}")
    return flat, cfg


def write_diffusers(flat, cfg: ModelConfig, folder: Path, options) -> None:
    version = files.package_version("diffusers", "0.30.0")
    config = {**diffusers_keys.diffusers_config(cfg), "_diffusers_version": version}
    files.write_folder(folder, config, diffusers_keys.transformer_to_diffusers(flat, cfg), files.DIFFUSERS_WEIGHTS,
                       options.dtype, options.max_shard_bytes or files.DIFFUSERS_SHARD_BYTES, options.progress)


def read_sat(path: Path, options):
    flat, cfg, lora = _read_sat(path, options.sat_config, options.merge_lora, options.progress)
    if lora is not None:
        raise sat.ConvertError(
            f"{path} holds LoRA adapters (matrix_A/matrix_B); flat params hold merged weights: pass "
            "merge_lora=True (CLI: --merge-lora), or load_transformer(merge_lora=False) to keep the adapters"
        )
    return flat, cfg


def write_sat(flat, cfg: ModelConfig, out: Path, options) -> None:
    """A `.pt` destination gets the file alone, a folder SAT's layout."""
    sd = sat_keys.transformer_to_sat(flat, cfg)
    sat.write_module({sat_configs.PREFIX + k: v for k, v in sd.items()}, out, options.dtype, options.progress)


def read_flat(path: str | Path, sat_config=None, merge_lora: bool = True,
              progress: Progress = _quiet) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Flat params and ModelConfig of a checkpoint in any format (detected). `sat_config`: SAT yaml path or dict."""
    flat, cfg, _ = registry.read(path, "transformer", sat_config=sat_config, merge_lora=merge_lora, progress=progress)
    return flat, cfg


def write_flat(flat: dict[str, np.ndarray], cfg: ModelConfig, path: str | Path, format: str = "native",
               dtype: str = "fp32", progress: Progress = _quiet, max_shard_bytes: int | None = None) -> Path:
    """Writes `flat` in `format` to `path` via a temporary sibling renamed at the end; returns the path."""
    return registry.write(flat, cfg, path, "transformer", format, dtype=dtype, progress=progress,
                          max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------------------
# Public API


def model_from_flat(flat: dict[str, np.ndarray], cfg: ModelConfig) -> tr.EditTransformer:
    """The model built straight from `flat` (no random initialisation of the full-size weights first)."""
    check_flat(flat, cfg, "parameters")
    return module_from_flat(tr.abstract(cfg), flat, "parameters")


def load_transformer(path: str | Path, sat_config=None, merge_lora: bool = True, dtype: str | None = None):
    """(EditTransformer, ModelConfig) from a SAT, diffusers or native checkpoint (format detected).

    A SAT file with LoRA adapters is merged, or with merge_lora=False loaded with them attached
    (`models.lora.add_lora` at the file's rank; alpha from the yaml's lora_config, else SAT's default 1).
    `dtype` overrides the compute dtype (e.g. "float32"; default the config's).
    """
    runtime = {} if dtype is None else {"dtype": dtype}
    if merge_lora or registry.detect(path, "transformer").format != "sat":
        flat, cfg = read_flat(path, sat_config, merge_lora)
        cfg = dataclasses.replace(cfg, **runtime)
        return model_from_flat(flat, cfg), cfg
    flat, cfg, lora = _read_sat(Path(path), sat_config, merge_lora, _quiet)
    cfg = dataclasses.replace(cfg, **runtime)
    model = model_from_flat(flat, cfg)
    if lora is not None:
        lora_lib.add_lora(model, lora.rank, lora.alpha, lora.targets)
        shapes = {k: v for k, v in param_shapes(model).items() if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
        check_params(shapes, {k: v.shape for k, v in lora.flat.items()}, f"LoRA adapters of {path}")
        attn = model.blocks.attn
        for key, value in lora.flat.items():
            _, _, module, name = key.split(".")
            var = getattr(getattr(attn, module), name)
            var[...] = jnp.asarray(value, var[...].dtype)
    return model, cfg


def save_transformer(model, config: ModelConfig, path: str | Path, format: str = "native",
                     dtype: str = "fp32") -> Path:
    """Writes the model's parameters as `format` ("native" | "sat" | "diffusers") in `dtype` ("fp32" | "bf16")."""
    return write_flat(flat_params(model), config, path, format, dtype)
