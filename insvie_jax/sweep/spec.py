"""A sweep file read: its runs, their names and resolved configs (see the package doc)."""

from __future__ import annotations

import dataclasses

import collections
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml
from etils import epath

from insvie_jax import config as configlib
from insvie_jax import storage

SWEEP_KEYS = ("name", "base", "overrides", "grid", "runs")
MAX_NAME = 100  # characters of a run folder name; longer names are cut and end in a hash of the overrides


@dataclass
class Run:
    name: str
    index: int
    overrides: dict  # this run's own keys (grid point and/or `runs` entry), key -> value
    config: configlib.Config
    folder: epath.Path  # storage.path: local or an object-storage URL

    @property
    def config_path(self) -> epath.Path:
        return self.folder / "config.yaml"


@dataclass
class Sweep:
    name: str
    folder: epath.Path
    runs: list[Run]


def _override_text(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the value reads back as written


def _name_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "empty"


def run_names(points: list[dict]) -> list[str]:
    """Short, filesystem-safe names that depend on the overrides alone: `key-value,...` with the last part of
    each key (the full key where two keys share it); too long or clashing names end in a hash of the overrides.
    No '=': `insvie-jax train` reads an argument holding one as an override, not as a config path."""
    keys = list(dict.fromkeys(k for point in points for k in point))
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}
    names = []
    for point in points:
        name = ",".join(f"{short[k]}-{_name_value(v)}" for k, v in point.items()) or "baseline"
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 9]}-{digest}"
        names.append((name, digest))
    counts = collections.Counter(name for name, _ in names)
    return [name if counts[name] == 1 else f"{name}-{digest}" for name, digest in names]


def _overrides_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [_override_text(k, v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise configlib.ConfigError(f"{where}: 'overrides' must be a list of key=value strings or a mapping")


def _points(spec: dict, where: str) -> list[dict]:
    grid, runs = spec.get("grid") or {}, spec.get("runs")
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise configlib.ConfigError(f"{where}: 'grid' must map keys to non-empty lists of values")
    if runs is not None and (not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs) or not runs):
        raise configlib.ConfigError(f"{where}: 'runs' must be a non-empty list of mappings (key: value)")
    grid_points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points = []
    for entry in runs or [{}]:
        clash = set(entry) & set(grid)
        if clash:
            raise configlib.ConfigError(f"{where}: {sorted(clash)} appear in both 'runs' and 'grid'")
        points += [{**entry, **point} for point in grid_points]
    seen = {}
    for number, point in enumerate(points, 1):
        key = json.dumps(point, sort_keys=True)
        if key in seen:
            raise configlib.ConfigError(f"{where}: runs {seen[key]} and {number} have the same overrides {point}")
        seen[key] = number
    return points


def load(path: str | Path, root: str | Path = "sweeps", extra_overrides: list[str] | tuple = ()) -> Sweep:
    """Reads a sweep file and resolves every run's config (all validated before anything runs); `extra_overrides`
    apply to every run after the file's own. Run folders are ROOT/<name>/<run>."""
    path = Path(path)
    if not path.is_file():
        raise configlib.ConfigError(f"sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise configlib.ConfigError(f"sweep file {path} is not valid YAML: {err}") from err
    where = f"sweep file {path}"
    if not isinstance(spec, dict):
        raise configlib.ConfigError(f"{where} must hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise configlib.ConfigError(f"{where}: unknown keys {unknown}; a sweep file has {', '.join(SWEEP_KEYS)}")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise configlib.ConfigError(f"{where}: name {name!r} may hold only letters, digits, '.', '_' and '-'")
    base = spec.get("base")
    if not base:
        raise configlib.ConfigError(f"{where}: 'base' (a preset name or a YAML config) is missing")
    base_path = path.parent / str(base)
    base = base_path if base_path.is_file() else str(base)
    shared = _overrides_list(spec.get("overrides"), where) + list(extra_overrides)
    points = _points(spec, where)
    folder = storage.absolute(root) / name
    runs = []
    for index, (point, run_name) in enumerate(zip(points, run_names(points))):
        try:
            cfg = configlib.load(base, shared + [_override_text(k, v) for k, v in point.items()])
        except configlib.ConfigError as err:
            raise configlib.ConfigError(f"{where}, run '{run_name}': {err}") from None
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, run_dir=str(folder / run_name)))
        runs.append(Run(run_name, index, point, cfg, folder / run_name))
    return Sweep(name, folder, runs)
