"""Load and save the editing transformer in three formats, detected from the path.

- `sat`: InsViE's release (SwissArmyTransformer): `<dir>/latest` + `<dir>/<iter>/mp_rank_00_model_states.pt`,
  or the `.pt` itself. No sizes are stored: they are read from the tensors, or from `--sat-config` (the yaml).
- `diffusers`: `config.json` + `diffusion_pytorch_model.safetensors` (sharded with an index when large), or a
  pipeline folder with `transformer/`; `CogVideoXTransformer3DModel.from_pretrained` loads what we write.
- `native`: `config.json` (our ModelConfig) + `params/`, an orbax checkpoint of the flat parameters.

Everything passes through flat `{"a.b.kernel": np.ndarray}` params; writes go to a temporary sibling that
is renamed into place at the end, so an interrupted write leaves nothing half-written under the target name.
`convert_main` (the `convert` command) also converts the VAE (vae_keys: native | sat | diffusers) and the T5
encoder (t5_keys: native | hf), detecting which model a path holds.
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
from insvie_jax.convert import diffusers_keys, files, sat, sat_keys
from insvie_jax.convert import sat_config as sat_configs
from insvie_jax.convert.files import Progress
from insvie_jax.convert.files import quiet as _quiet
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.convert.sat_config import SatFormatError
from insvie_jax.models import lora as lora_lib
from insvie_jax.models import transformer as tr
from insvie_jax.models.params import ParamMismatch, check_params, flat_params, module_from_flat, param_shapes

FORMATS = ("native", "sat", "diffusers")
NATIVE_FORMAT = "insvie-jax-transformer"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"
MAX_SHARD_BYTES = 10 * 2**30  # diffusers' default shard size


# ---------------------------------------------------------------------------------------------------
# Format detection and checks


def detect_format(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise NotACheckpoint(f"checkpoint path does not exist: {path}")
    if sat.is_sat(path):
        return "sat"
    if (path / WEIGHTS).is_file() or (path / WEIGHTS_INDEX).is_file() or (path / "transformer" / WEIGHTS).is_file() \
            or (path / "transformer" / WEIGHTS_INDEX).is_file():
        return "diffusers"
    if files.native_format(path) == NATIVE_FORMAT:
        return "native"
    raise NotACheckpoint(
        f"{path} is not a transformer checkpoint: expected a SAT folder ('latest' + <iter>/{sat.STATES_FILE}) or "
        f".pt file, a diffusers folder (config.json + {WEIGHTS}[.index.json]) or a native folder "
        "(config.json + params/)"
    )


def _preset_hint(found: dict[str, tuple]) -> str:
    """Names the shipped presets (configs/*.yaml) whose parameter shapes the checkpoint has, if any."""
    fitting = [name for name in config_lib.presets() if param_shapes(tr.abstract(config_lib.load(name).model)) == found]
    if not fitting:
        return ""
    return f"\nthe tensors fit preset {', '.join(repr(n) for n in fitting)} (configs/): use that config"


def check_flat(flat: dict[str, np.ndarray], cfg: ModelConfig, what: str) -> None:
    """Names missing, unexpected and wrongly shaped parameters, and the preset the tensors do fit."""
    found = {k: tuple(np.shape(v)) for k, v in flat.items()}
    try:
        check_params(param_shapes(tr.abstract(cfg)), found, what)
    except ParamMismatch as err:
        raise ParamMismatch(str(err) + _preset_hint(found)) from None


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


def _read_diffusers(path: Path, progress: Progress):
    path = _diffusers_dir(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("_class_name", "CogVideoXTransformer3DModel") != "CogVideoXTransformer3DModel":
        raise NotACheckpoint(f"{path}/config.json describes a {config['_class_name']}, not the CogVideoX transformer")
    cfg = diffusers_keys.config_from_diffusers(config)
    sd = {}
    for name in files.safetensors_files(path, WEIGHTS):
        sd.update(files.read_safetensors(path / name, progress))
    sd.pop("patch_embed.pos_embedding", None)  # a recomputed buffer
    expected = _diffusers_names(cfg)
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ParamMismatch(f"diffusers checkpoint {path} does not fit its config.json:\nmissing ({len(missing)}): "
                            f"{', '.join(missing[:20])}\nunexpected ({len(unexpected)}): {', '.join(unexpected[:20])}")
    expected = diffusers_keys.diffusers_shapes(param_shapes(tr.abstract(cfg)), cfg)
    wrong = [f"{k}: expected {expected[k]}, found {tuple(sd[k].shape)}" for k in sorted(sd)
             if tuple(sd[k].shape) != tuple(expected[k])]
    if wrong:
        raise ParamMismatch(f"diffusers checkpoint {path}: {len(wrong)} tensor(s) do not have the shape its "
                            f"config.json gives: {'; '.join(wrong[:5])}")
    try:
        flat = diffusers_keys.transformer_from_diffusers(sd, cfg)
    except ValueError as err:  # a tensor that cannot take its layout in our model
        raise ParamMismatch(f"diffusers checkpoint {path}: tensor shapes do not fit its config.json ({err})") from None
    flat = _edit_from_t2v(flat, cfg)
    check_flat(flat, cfg, f"diffusers checkpoint {path}")
    return flat, cfg


def _diffusers_names(cfg: ModelConfig) -> set[str]:
    """The state-dict names of a diffusers transformer with cfg's layer count (names depend on nothing else)."""
    small = dataclasses.replace(cfg, num_attention_heads=1, attention_head_dim=16, text_embed_dim=1,
                                time_embed_dim=1, in_channels=1, out_channels=1, mlp_ratio=1.0)
    shapes = param_shapes(tr.abstract(small))
    return set(diffusers_keys.transformer_to_diffusers({k: np.zeros(s, np.float32) for k, s in shapes.items()}, small))


def _read_native(path: Path, progress: Progress):
    flat, meta = files.read_native(path, NATIVE_FORMAT, progress)
    cfg = config_lib.from_dict({"model": meta["model"]}).model
    check_flat(flat, cfg, f"native checkpoint {path}")
    return flat, cfg


def read_flat(path: str | Path, sat_config=None, merge_lora: bool = True,
              progress: Progress = _quiet) -> tuple[dict[str, np.ndarray], ModelConfig]:
    """Flat params and ModelConfig of a checkpoint in any format (detected). `sat_config`: SAT yaml path or dict."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "sat":
        flat, cfg, lora = _read_sat(path, sat_config, merge_lora, progress)
        if lora is not None:
            raise sat.ConvertError(
                f"{path} holds LoRA adapters (matrix_A/matrix_B); flat params hold merged weights: pass "
                "merge_lora=True (CLI: --merge-lora), or load_transformer(merge_lora=False) to keep the adapters"
            )
        return flat, cfg
    if fmt == "diffusers":
        return _read_diffusers(path, progress)
    return _read_native(path, progress)


# ---------------------------------------------------------------------------------------------------
# Writers: (flat params, config) -> path


def write_flat(flat: dict[str, np.ndarray], cfg: ModelConfig, path: str | Path, format: str = "native",
               dtype: str = "fp32", progress: Progress = _quiet, max_shard_bytes: int = MAX_SHARD_BYTES) -> Path:
    """Writes `flat` in `format` to `path` via a temporary sibling renamed at the end; returns the path."""
    if format not in FORMATS:
        raise ValueError(f"format {format!r}: expected one of {', '.join(FORMATS)}")
    check_flat(flat, cfg, "parameters to save")
    with files.staged(path, files.output_bytes(flat, dtype)) as tmp:
        if format == "native":
            files.write_native(files.cast(flat, dtype, progress), NATIVE_FORMAT, "model", cfg, tmp, progress)
        elif format == "diffusers":
            sd = files.cast(diffusers_keys.transformer_to_diffusers(flat, cfg), dtype, progress)
            tmp.mkdir(parents=True)
            config = {**diffusers_keys.diffusers_config(cfg),
                      "_diffusers_version": files.package_version("diffusers", "0.30.0")}
            (tmp / "config.json").write_text(json.dumps(config, indent=2))
            files.write_safetensors(sd, tmp, WEIGHTS, max_shard_bytes, progress)
        else:  # a `.pt` destination gets the file alone, a folder SAT's layout
            sd = sat_keys.transformer_to_sat(flat, cfg)
            sat.write_module({sat_keys.PREFIX + k: v for k, v in sd.items()}, tmp, dtype, progress)
    return Path(path).absolute()


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
    if merge_lora or detect_format(path) != "sat":
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


class UnsupportedConversion(ValueError):
    """A conversion that cannot be made: a format the model has no writer for, or options for another model."""


MODELS = ("transformer", "vae", "t5")
NATIVE_FORMATS = {NATIVE_FORMAT: "transformer", "insvie-jax-vae": "vae", "insvie-jax-t5": "t5"}


def detect_model(path: str | Path) -> str:
    """Which model a checkpoint holds: a config.json naming AutoencoderKLCogVideoX is a VAE, one with T5Config
    fields (`d_kv`, `feed_forward_proj`) a T5, a `.pt` whose `state_dict` holds `encoder.`/`decoder.` tensors a
    SAT VAE, a native folder says so; anything else is taken for the transformer (whose reader names problems)."""
    from insvie_jax.convert import vae_keys

    path = Path(path)
    if not path.exists():
        raise NotACheckpoint(f"checkpoint path does not exist: {path}")
    if files.native_format(path) in NATIVE_FORMATS:
        return NATIVE_FORMATS[files.native_format(path)]
    if (path / "config.json").is_file():
        try:
            config = json.loads((path / "config.json").read_text())
        except json.JSONDecodeError as err:
            raise NotACheckpoint(f"{path / 'config.json'} is not valid JSON: {err}") from None
        if config.get("_class_name") == "AutoencoderKLCogVideoX":
            return "vae"
        if "d_kv" in config and "feed_forward_proj" in config:
            return "t5"
    if vae_keys.is_sat_vae(path):
        return "vae"
    return "transformer"


def convert_main(src: str, dst: str, to: str = "native", dtype: str = "fp32", merge_lora: bool = False,
                 sat_config: str | None = None, model: str | None = None, config: config_lib.Config | None = None,
                 max_shard_bytes: int | None = None) -> Path:
    """`insvie-jax convert SRC DST --to FORMAT [--model transformer|vae|t5]`: converts without building the
    model, with progress bars over the tensors. The model is detected from SRC unless named; a T5's tokenizer
    files travel with it. `config`'s `vae` section supplies what a SAT 3d-vae.pt cannot tell (norm groups,
    temporal compression, scaling factor; default: CogVideoX's)."""
    from tqdm import tqdm

    from insvie_jax.convert import t5_keys, vae_keys

    model = model or detect_model(src)
    writable = {"transformer": FORMATS, "vae": vae_keys.FORMATS, "t5": t5_keys.FORMATS}
    if model not in writable:
        raise UnsupportedConversion(f"model {model!r}: expected one of {', '.join(MODELS)}")
    if to not in writable[model]:
        raise UnsupportedConversion(f"a {model} converts to {' | '.join(writable[model])}, not {to!r} "
                                    f"(source {src}): choose --to among those")
    if model != "transformer" and (merge_lora or sat_config):
        raise UnsupportedConversion(f"--merge-lora and --sat-config apply to transformer checkpoints; {src} is a "
                                    f"{model}")
    if model == "transformer" and config is not None:
        raise UnsupportedConversion(f"{src} is a transformer: its sizes come from the checkpoint or --sat-config, "
                                    "not --config")

    if to == "sat":
        sat.require_torch()  # before reading anything: the SAT writer is torch.save

    def progress(iterable, desc):
        items = list(iterable)
        return tqdm(items, desc=desc, unit="tensor", leave=False)

    shards = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    if model == "vae":
        flat, cfg = vae_keys.read_vae(src, config.vae if config else None, progress)
        out = vae_keys.write_vae(flat, cfg, dst, to, dtype, progress, **shards)
    elif model == "t5":
        flat, cfg = t5_keys.read_t5(src, config.text_encoder if config else None,
                                     files.DTYPES.get(dtype, np.float32), progress)
        out = t5_keys.write_t5(flat, cfg, dst, to, dtype, t5_keys.tokenizer_folder(src), progress, **shards)
    else:
        flat, cfg = read_flat(src, sat_config, merge_lora, progress)
        out = write_flat(flat, cfg, dst, to, dtype, progress, **shards)
    print(f"{src} -> {out} ({model}, {to}, {dtype}): {len(flat)} tensors, "
          f"{sum(v.size for v in flat.values()):,} parameters")
    return out
