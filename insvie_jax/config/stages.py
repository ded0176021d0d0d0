"""Stages (a curriculum): each stage is the run's config plus its own dotted overrides."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any


from insvie_jax.config.load import _apply_override, _closest, from_dict
from insvie_jax.config.schema import Config, ConfigError, _field_types


STAGE_KEYS = ("name", "steps", "overrides", "keep_optimizer")
# What a stage may change: the data, the optimization, what trains and the validation sampling, plus model
# knobs that leave the weights as they are. The architecture, the mesh and the checkpoint series are the run's.
_STAGE_SECTIONS = ("data", "train", "lora", "sample")
_STAGE_MODEL_KEYS = ("model.remat_policy", "model.attention")
_STAGE_FIXED = {
    "train.steps": "a stage's length is its own `steps`",
    "train.run_dir": "all stages write one run folder",
    "train.init_from": "only the first stage starts from train.init_from (set it outside `stages`); later stages "
                       "start from the stage before",
}


@dataclasses.dataclass
class Stage:
    """One stage of a run, resolved: `config` is the base config plus the stage's overrides, with train.steps =
    `steps`; the stage covers the global steps [start, start + steps)."""

    name: str
    steps: int
    start: int
    keep_optimizer: bool
    config: Config

    @property
    def end(self) -> int:
        return self.start + self.steps


def what_trains(config: Config) -> tuple:
    """Equal for two configs exactly when their trainable parameter sets have the same structure."""
    lora = config.lora
    if lora.enabled:
        return ("lora", lora.rank, lora.alpha, tuple(lora.targets), tuple(lora.also_train))
    return ("full",)


def _stage_overrides(overrides: dict) -> dict[str, Any]:
    """{"section.key": value}; a section may also be given as a mapping (`data: {num_frames: 1}`)."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and "." not in str(key):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _check_stage_key(key: str, where: str) -> None:
    section = key.split(".")[0]
    if section not in _field_types(Config):
        return  # not a config key at all: _build names the closest one
    if key in _STAGE_FIXED:
        raise ConfigError(f"{where}: '{key}' cannot be set per stage: {_STAGE_FIXED[key]}")
    if section not in _STAGE_SECTIONS and key not in _STAGE_MODEL_KEYS:
        raise ConfigError(f"{where}: '{key}' cannot change between stages (stages share the model, mesh and "
                          f"checkpoint series); a stage may set {', '.join(s + '.*' for s in _STAGE_SECTIONS)}, "
                          f"{', '.join(_STAGE_MODEL_KEYS)}")


def _stage_entry(entry: Any, index: int) -> tuple[str, int, bool, dict]:
    where = f"stages[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping with {', '.join(STAGE_KEYS)}, got {entry!r}")
    for key in entry:
        if key not in STAGE_KEYS:
            raise ConfigError(f"{where}: unknown stage key '{key}'{_closest(str(key), list(STAGE_KEYS), '')}")
    name = entry.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"{where}: 'name' must be a non-empty string of letters, digits, '-' and '_', got {name!r}")
    where = f"stage '{name}' ({where})"
    steps = entry.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"{where}: 'steps' must be a positive integer, got {steps!r}")
    keep = entry.get("keep_optimizer", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"{where}: 'keep_optimizer' must be true or false, got {keep!r}")
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: 'overrides' must be a mapping of section.key: value, got {overrides!r}")
    return name, steps, keep, overrides


def resolve_stages(config: Config) -> list[Stage]:
    """The run's stages, each a validated Config (the base plus the stage's overrides, which are checked as
    command-line overrides are); a config without `stages` is one stage, "main", of train.steps steps.

    Stages run one after another on one global step count; each starts from the weights the stage before
    ended with (see `TrainState.carry_over` in train/state.py for what happens when what trains changes)."""
    if not config.stages:
        return [Stage("main", config.train.steps, 0, False, config)]
    base = config.to_dict()
    base["stages"] = []
    stages: list[Stage] = []
    for index, entry in enumerate(config.stages):
        name, steps, keep, overrides = _stage_entry(entry, index)
        where = f"stage '{name}' (stages[{index}])"
        if any(s.name == name for s in stages):
            raise ConfigError(f"{where}: another stage is already named '{name}'; stage names must be unique")
        data = copy.deepcopy(base)
        for key, value in _stage_overrides(overrides).items():
            _check_stage_key(key, where)
            _apply_override(data, key.split("."), value)
        data["train"]["steps"] = steps
        try:
            stage_config = from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if steps % stage_config.train.grad_accum:
            raise ConfigError(f"{where}: steps={steps} must be a multiple of train.grad_accum="
                              f"{stage_config.train.grad_accum} (an accumulation must not span two stages)")
        if keep:
            before = stages[-1].config if stages else None
            if before is None:
                raise ConfigError(f"{where}: keep_optimizer=true, but the first stage has no optimizer state to keep")
            if what_trains(before) != what_trains(stage_config):
                raise ConfigError(f"{where}: keep_optimizer=true, but what trains changes ({what_trains(before)} -> "
                                  f"{what_trains(stage_config)}), so the optimizer state does not fit: set "
                                  "keep_optimizer=false (a fresh optimizer state) or keep the lora.* keys")
            if (before.train.grad_accum > 1) != (stage_config.train.grad_accum > 1):
                raise ConfigError(f"{where}: keep_optimizer=true needs train.grad_accum > 1 in both this stage and "
                                  "the one before, or in neither (the optimizer state differs)")
        stages.append(Stage(name, steps, stages[-1].end if stages else 0, keep, stage_config))
    return stages


def _apply_stage_override(data: dict, keys: list[str], value: Any) -> None:
    """`stages.<name or index>.steps=N`, `stages.<name>.keep_optimizer=true`, `stages.<name>.data.num_frames=1`."""
    text = ".".join(keys)
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"override '{text}': the config has no stages")
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    wanted = keys[1]
    if wanted in names:
        entry = stages[names.index(wanted)]
    elif wanted.isdigit() and int(wanted) < len(stages):
        entry = stages[int(wanted)]
    else:
        known = [str(n) for n in names]
        raise ConfigError(f"override '{text}': no stage '{wanted}' (stages: {', '.join(known)})"
                          f"{_closest(wanted, known, 'stages.')}")
    if not isinstance(entry, dict) or len(keys) < 3:
        raise ConfigError(f"override '{text}' must look like stages.<name>.steps=N or stages.<name>.section.key=value")
    if len(keys) == 3 and keys[2] in STAGE_KEYS:
        entry[keys[2]] = value
    else:
        overrides = entry.setdefault("overrides", {}) or {}
        entry["overrides"] = {**overrides, ".".join(keys[2:]): value}
