"""Loading: YAML files with `base:` includes, presets (every YAML in configs/), `key=value` overrides; every
key checked against the schema (an unknown one names the closest valid key), then the derived checks."""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from insvie_jax.config.schema import FAMILY_SECTIONS, Config, ConfigError, ModelFamily, _field_types
from insvie_jax.config.validate import validate

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"



# Words people write for a key, by the key's own name: `train.learning_rate` -> `train.lr`.
_SYNONYMS = {"learning": "lr", "rate": "lr", "learningrate": "lr", "iterations": "steps", "iters": "steps",
             "epochs": "steps", "bs": "batch_size", "batch": "batch_size", "layers": "num_layers",
             "heads": "num_attention_heads", "frames": "num_frames", "warmup": "warmup_steps"}


def _closest(key: str, valid: list[str], prefix: str) -> str:
    """'; did you mean ...?' naming the valid key that shares the most word parts with `key` (synonyms and
    initials count: learning_rate -> lr), else the closest spelling."""
    words = [w for w in key.lower().replace("-", "_").split("_") if w]
    wanted = set(words) | {_SYNONYMS[w] for w in words if w in _SYNONYMS} | {"".join(w[0] for w in words)}
    wanted |= {_SYNONYMS["".join(words)]} if "".join(words) in _SYNONYMS else set()

    def overlap(name: str) -> int:
        return len(wanted & ({name} | set(name.split("_")))) + 2 * (name in wanted)

    best = max(valid, key=overlap, default=None)
    if best is not None and overlap(best) >= 2 and difflib.SequenceMatcher(None, key, best).ratio() < 0.8:
        match = [best]
    else:
        match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def section_classes(section: str) -> tuple:
    """The dataclasses a section can be: one, or one per model family (`model`, `vae`)."""
    want = _field_types(Config)[section]
    return typing.get_args(want) if typing.get_origin(want) in (typing.Union, types.UnionType) else (want,)


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a string key ("sample.sampler"), from its Literal type in the schema (for a
    family-dependent section, the first family's class that has the key)."""
    section, name = key.split(".")
    cls = next(c for c in section_classes(section) if name in _field_types(c))
    return typing.get_args(_field_types(cls)[name])


def _family(data: dict) -> str:
    """`model.family` of a config mapping (default cogvideox), checked: it picks the model and vae sections."""
    model = data.get("model") or {}
    family = model.get("family", "cogvideox") if isinstance(model, dict) else "cogvideox"
    return _coerce("model.family", family, ModelFamily)


def _coerce(path: str, value: Any, want: Any) -> Any:
    """Checks `value` against the annotated type; ints are accepted where floats are wanted."""
    origin = typing.get_origin(want)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(want):
            try:
                return _coerce(path, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{path}': expected {want}, got {value!r} ({type(value).__name__})")
    if want is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(want):
            return value
        raise ConfigError(f"config key '{path}' = {value!r}: expected one of {', '.join(typing.get_args(want))}")
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is str:
        if isinstance(value, str):
            return value
    elif want is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif want is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif want is type(None):
        if value is None:
            return None
    name = getattr(want, "__name__", str(want))
    raise ConfigError(f"config key '{path}': expected {name}, got {value!r} ({type(value).__name__})")


def _check_number(path: str, value: Any, field: dataclasses.Field) -> None:
    """Every number must be finite, and within the field's `Range` when the schema gives one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise ConfigError(f"config key '{path}' = {value}: must be a finite number")
    allowed = field.metadata.get("range")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"config key '{path}' = {value}: must {allowed}")


def _build(cls, data: dict, prefix: str = "", family: str | None = None):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if cls is Config:
        family = _family(data)
        types_ = {**types_, **FAMILY_SECTIONS[family]}
    kwargs = {}
    for key, value in data.items():
        path = prefix + key
        if key not in types_:
            where = (f" (model.family={family}: the {prefix.rstrip('.')} section is {cls.__name__})"
                     if family and prefix.rstrip(".") in FAMILY_SECTIONS[family] else "")
            raise ConfigError(f"unknown config key '{path}'{_closest(key, list(types_), prefix)}{where}")
        want = types_[key]
        if dataclasses.is_dataclass(want):
            kwargs[key] = _build(want, value or {}, path + ".", family)
        else:
            kwargs[key] = _coerce(path, value, want)
            _check_number(path, kwargs[key], fields[key])
    if cls is Config:  # a family section left out is the family's defaults, not CogVideoX's
        kwargs.update({k: section() for k, section in FAMILY_SECTIONS[family].items() if k not in kwargs})
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = data.pop("base", None)
    if base:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.exists():  # `base: tiny` in a user's file names the shipped preset
            base_path = resolve_path(base)
        data = _merge(_read_yaml(base_path, seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.num_layers=4` -> (['model', 'num_layers'], 4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    if keys[0] == "stages" and len(keys) > 1:
        from insvie_jax.config.stages import _apply_stage_override  # stages build on this module

        _apply_stage_override(data, keys, value)
        return
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{'.'.join(keys)}': '{k}' is not a section")
    node[keys[-1]] = value


def resolve_path(name: str | Path) -> Path:
    """A config path (or object-storage URL), or the name of a shipped preset (`tiny`, `cogvideox-2b-edit`)."""
    if "://" in str(name):  # e.g. a sweep's run folder on gs:// (insvie_jax/storage.py)
        from etils import epath

        return epath.Path(name)
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"config '{name}' is neither a file nor a preset; presets: {', '.join(presets())}")


def presets() -> list[str]:
    """The shipped presets: every YAML file in configs/ (sweep files live in configs/sweeps/)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def from_dict(data: dict) -> Config:
    config = _build(Config, data)
    validate(config)
    from insvie_jax.config.stages import resolve_stages

    resolve_stages(config)  # every stage's overrides are checked when the config loads, before any training
    return config


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config (or preset name), applies `key=value` overrides, validates."""
    data = _read_yaml(resolve_path(path)) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
    return from_dict(data)


def save(config: Config, path: str | Path) -> None:
    from etils import epath  # a run folder may be an object-storage URL (insvie_jax/storage.py)

    epath.Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
