"""The codec registry: every (model, format) checkpoint layout this package reads and writes, and the one
driver through which all of them are detected, read and written (and the `convert` command's choices).

A codec is a row of `CODECS`: the model, the format and a cheap `detect(path)` (file names, config.json and
tensor names only); the model's module (`MODELS`) holds `read_<format>(path, options)` and
`write_<format>(flat, cfg, folder, options)`, which go through the format's key mapping table (convert/mapping.py).
Adding a format is that table, the function pair, and one row here. The `native` format (config.json + orbax
`params/`) is handled here for every model that has it.

This module stays light (no jax): the CLI reads its names to build the parser; a codec's module is imported
when the codec is used. Writes go to a temporary sibling renamed into place at the end (`files.staged`), so an
interrupted or failed write leaves nothing under the target name.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from insvie_jax.convert import files, sat
from insvie_jax.convert.files import Progress, quiet
from insvie_jax.convert.sat import ConvertError, NotACheckpoint

DTYPE_NAMES = tuple(files.DTYPES)


class UnsupportedConversion(ConvertError):
    """A conversion that cannot be made: a format the model has no codec for, or options for another model."""


@dataclasses.dataclass(frozen=True)
class Options:
    """What a read or write may use: dtype and shard size of the written tensors, progress bars, the runtime
    config section that a checkpoint does not store (`base`: VAE memory modes, T5 dtypes), the SAT yaml and LoRA
    merge of a SAT transformer, and the folder whose tokenizer files travel with a text encoder."""

    dtype: str = "fp32"
    progress: Progress = quiet
    max_shard_bytes: int | None = None
    base: Any = None
    sat_config: Any = None
    merge_lora: bool = True
    tokenizer_from: str | Path | None = None


@dataclasses.dataclass(frozen=True)
class Model:
    """A model whose checkpoints convert. `module` (under insvie_jax.convert) gives `check(flat, cfg, what)` and
    `native_config(stored section, options, path) -> cfg`; `section` names the config in a native config.json;
    `base` the section of a project config (`--config`) that supplies what its checkpoints do not store."""

    name: str
    module: str
    section: str
    base: str | None = None

    @property
    def native_tag(self) -> str:
        return f"insvie-jax-{self.name}"

    def load(self):
        return importlib.import_module(f"insvie_jax.convert.{self.module}")


@dataclasses.dataclass(frozen=True)
class Codec:
    """One (model, format): `detect(path)`, and `read_<format>` / `write_<format>` of the model's module."""

    model: str
    format: str
    detect: Callable[[Path], bool]
    needs_torch: bool = False

    def read(self, path: Path, options: Options):
        if self.format == "native":
            return _read_native(path, options, self.model)
        return getattr(MODELS[self.model].load(), f"read_{self.format}")(path, options)

    def write(self, flat, cfg, folder: Path, options: Options) -> None:
        if self.format == "native":
            return _write_native(flat, cfg, folder, options, self.model)
        return getattr(MODELS[self.model].load(), f"write_{self.format}")(flat, cfg, folder, options)


# ---------------------------------------------------------------------------------------------------
# Detection helpers: file names and config.json only


def _config(path: Path, *subfolders: str) -> dict:
    """The config.json of `path` or of the first of its `subfolders` that has one (a pipeline folder); {} if none."""
    for folder in (path, *(path / s for s in subfolders)):
        file = folder / "config.json"
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                raise NotACheckpoint(f"{file} is not valid JSON: {err}") from None
            return config if isinstance(config, dict) else {}
    return {}


def _class(name: str, *subfolders: str) -> Callable[[Path], bool]:
    return lambda path: _config(path, *subfolders).get("_class_name") == name


def _native(model: str) -> Callable[[Path], bool]:
    return lambda path: files.native_format(path) == f"insvie-jax-{model}"


def _t5(path: Path) -> bool:
    config = _config(path, "text_encoder")
    return "d_kv" in config and "feed_forward_proj" in config and config.get("model_type") != "umt5"


def _umt5(path: Path) -> bool:
    return _config(path, "text_encoder").get("model_type") == "umt5"


def _cogvideox_diffusers(path: Path) -> bool:
    """A CogVideoX transformer folder (or a pipeline's `transformer/`); weights without a class name count too."""
    for folder in (path, path / "transformer"):
        if _config(folder).get("_class_name") == "CogVideoXTransformer3DModel":
            return True
        weights = (files.DIFFUSERS_WEIGHTS, files.DIFFUSERS_WEIGHTS + ".index.json")
        if (folder / "config.json").is_file() and "_class_name" not in _config(folder) and any(
                (folder / name).is_file() for name in weights):
            return True
    return False


def _wan_lora(layout: str) -> Callable[[Path], bool]:
    def detect(path: Path) -> bool:
        from insvie_jax.convert.wan_lora_keys import layout_of

        return layout_of(path) == layout

    return detect


MODELS = {m.name: m for m in (
    Model("transformer", "api", "model"),
    Model("vae", "vae_keys", "vae", base="vae"),
    Model("t5", "t5_keys", "text_encoder", base="text_encoder"),
    Model("wan", "wan_keys", "model"),
    Model("wan-vae", "wan_vae_keys", "vae"),
    Model("umt5", "umt5_keys", "text_encoder", base="text_encoder"),
    Model("wan-lora", "wan_lora_keys", "lora"),
)}

# Detection tries the rows in this order: the SAT VAE (a .pt whose state_dict holds encoder./decoder. tensors)
# before the SAT transformer (any other .pt); the CogVideoX transformer, last, also takes what nothing else does,
# so that its reader names what is wrong with the path.
CODECS = [
    Codec("vae", "native", _native("vae")),
    Codec("vae", "sat", sat.is_sat_vae, needs_torch=True),
    Codec("vae", "diffusers", _class("AutoencoderKLCogVideoX")),
    Codec("t5", "native", _native("t5")),
    Codec("t5", "hf", _t5),
    Codec("umt5", "native", _native("umt5")),
    Codec("umt5", "hf", _umt5),
    Codec("wan", "native", _native("wan")),
    Codec("wan", "diffusers", _class("WanTransformer3DModel", "transformer")),
    Codec("wan-vae", "native", _native("wan-vae")),
    Codec("wan-vae", "diffusers", _class("AutoencoderKLWan", "vae")),
    Codec("wan-lora", "diffusers", _wan_lora("diffusers")),
    Codec("wan-lora", "comfyui", _wan_lora("comfyui")),
    Codec("transformer", "native", _native("transformer")),
    Codec("transformer", "sat", sat.is_sat, needs_torch=True),
    Codec("transformer", "diffusers", _cogvideox_diffusers),
]


def formats(model: str) -> list[str]:
    """The formats a model converts to and from, in the order the CLI lists them."""
    return [c.format for c in CODECS if c.model == model]


def all_formats() -> list[str]:
    return list(dict.fromkeys(c.format for c in CODECS))


def codec(model: str, format: str) -> Codec:
    if model not in MODELS:
        raise UnsupportedConversion(f"model {model!r}: expected one of {', '.join(MODELS)}")
    for c in CODECS:
        if c.model == model and c.format == format:
            return c
    raise UnsupportedConversion(f"a {model} converts to {' | '.join(formats(model))}, not {format!r}")


# ---------------------------------------------------------------------------------------------------
# The driver


def detect(path: str | Path, model: str | None = None) -> Codec:
    """The codec of the checkpoint at `path` (of `model` when given). With no model named, a path no codec
    recognises is taken for the CogVideoX transformer, whose reader says what is wrong with it."""
    path = Path(path)
    if not path.exists():
        raise NotACheckpoint(f"checkpoint path does not exist: {path}")
    if model is not None and model not in MODELS:
        raise UnsupportedConversion(f"model {model!r}: expected one of {', '.join(MODELS)}")
    for c in CODECS:
        if (model is None or c.model == model) and c.detect(path):
            return c
    if model in (None, "transformer"):
        raise NotACheckpoint(
            f"{path} is not a transformer checkpoint: expected a SAT folder ('latest' + <iter>/{sat.STATES_FILE}) or "
            f".pt file, a diffusers folder (config.json + {files.DIFFUSERS_WEIGHTS}[.index.json]) or a native folder "
            "(config.json + params/)")
    raise NotACheckpoint(f"{path} is not a {model} checkpoint in any of its formats ({', '.join(formats(model))})")


def detect_model(path: str | Path) -> str:
    return detect(path).model


def read(path: str | Path, model: str | None = None, **options) -> tuple[dict, Any, Codec]:
    """(flat params, config, codec) of the checkpoint at `path`, its format (and model, unless named) detected."""
    found = detect(path, model)
    if found.needs_torch:
        sat.require_torch()
    flat, cfg = found.read(Path(path), Options(**options))
    return flat, cfg, found


def write(flat: dict, cfg, path: str | Path, model: str, format: str = "native", **options) -> Path:
    """Writes `flat` (our parameters of `cfg`) as `model`'s `format` at `path`, staged; returns the path."""
    target = codec(model, format)
    opts = Options(**options)
    if opts.dtype not in files.DTYPES:
        raise ValueError(f"dtype {opts.dtype!r}: expected one of {', '.join(files.DTYPES)}")
    if target.needs_torch:
        sat.require_torch()  # before writing anything: the SAT writers are torch.save
    MODELS[model].load().check(flat, cfg, "parameters to save")
    with files.staged(path, files.output_bytes(flat, opts.dtype)) as tmp:
        target.write(flat, cfg, tmp, opts)
        if opts.tokenizer_from is not None:
            files.copy_tokenizer(opts.tokenizer_from, tmp)
    return Path(path).absolute()


def _read_native(path: Path, options: Options, model: str):
    """A native folder of `model`: flat params as numpy and the config its config.json stores."""
    spec = MODELS[model]
    flat, meta = files.read_native(path, spec.native_tag, options.progress)
    module = spec.load()
    cfg = module.native_config(meta[spec.section], options, path)
    module.check(flat, cfg, f"native checkpoint {path}")
    return flat, cfg


def _write_native(flat: dict, cfg, folder: Path, options: Options, model: str) -> None:
    spec = MODELS[model]
    files.write_native(files.cast(flat, options.dtype, options.progress), spec.native_tag, spec.section, cfg, folder,
                       options.progress)


def convert_main(src: str, dst: str, to: str = "native", dtype: str = "fp32", merge_lora: bool = False,
                 sat_config: str | None = None, model: str | None = None, config=None,
                 max_shard_bytes: int | None = None) -> Path:
    """`insvie-jax convert SRC DST --to FORMAT [--model M]`: converts without building the model, with progress
    bars over the tensors. The model is detected from SRC unless named; a text encoder's tokenizer files travel
    with it. `config`'s section of the model supplies what a checkpoint cannot tell (a SAT 3d-vae.pt's norm groups,
    temporal compression and scaling factor; default: CogVideoX's)."""
    from tqdm import tqdm

    found = detect(src, model)
    model = found.model
    if to not in formats(model):
        raise UnsupportedConversion(f"a {model} converts to {' | '.join(formats(model))}, not {to!r} "
                                    f"(source {src}): choose --to among those")
    if model != "transformer" and (merge_lora or sat_config):
        raise UnsupportedConversion(f"--merge-lora and --sat-config apply to transformer checkpoints; {src} is a "
                                    f"{model}")
    if config is not None and MODELS[model].base is None:
        raise UnsupportedConversion(f"{src} is a {model}: its sizes come from the checkpoint"
                                    f"{' or --sat-config' if model == 'transformer' else ''}, not --config")
    if found.needs_torch or codec(model, to).needs_torch:
        sat.require_torch()  # before reading anything

    def progress(iterable, desc):
        return tqdm(list(iterable), desc=desc, unit="tensor", leave=False)

    base = getattr(config, MODELS[model].base) if config is not None else None
    common = {"dtype": dtype, "progress": progress}
    flat, cfg = found.read(Path(src), Options(**common, base=base, sat_config=sat_config, merge_lora=merge_lora))
    tokenizer = files.tokenizer_folder(src) if model in ("t5", "umt5") else None
    out = write(flat, cfg, dst, model, to, **common, tokenizer_from=tokenizer, max_shard_bytes=max_shard_bytes)
    print(f"{src} -> {out} ({model}, {to}, {dtype}): {len(flat)} tensors, "
          f"{sum(v.size for v in flat.values()):,} parameters")
    return out
