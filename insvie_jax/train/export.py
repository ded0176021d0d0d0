"""A training run's model, read back from its checkpoints: `insvie-jax export` and `edit --checkpoint RUN`.

`read_run_model` restores a checkpoint (latest, or a given step) into the abstract train state of the config the
checkpoint recorded (in a curriculum, its stage's), on one device, and merges the trained (or EMA) weights, LoRA
adapters included, into a plain transformer; `export_model` writes that as a checkpoint `load_transformer` reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax.train.checkpoint import Checkpointer
from insvie_jax.train.state import TrainState, split_model, trained_model

ONE_DEVICE = {axis: 1 for axis in ("ici_data", "ici_fsdp", "ici_tensor", "ici_context", "dcn_data", "dcn_fsdp",
                                   "dcn_tensor", "dcn_context")}  # also for a run trained on many hosts


def find_run_checkpoint(path: str | Path) -> tuple[Path, int] | None:
    """(run folder, step) when `path` is a training run folder (its latest checkpoint) or one of its
    RUN/checkpoints/<step> folders; None for anything else."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
        if not steps:
            raise FileNotFoundError(f"{path} is a training run without a checkpoint yet: train it further "
                                    "(checkpoint.every) or pass another --checkpoint")
        return path, steps[-1]
    if path.name.isdigit() and path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return path.parent.parent, int(path.name)
    return None


def read_run_model(run_dir: str | Path, step: int | None = None, use_ema: bool = False):
    """(model, config) of a run's checkpoint (latest, or `step`): the trained (or EMA) weights, LoRA adapters merged
    in, on one device; the config is the checkpoint's own (in a curriculum, the stage's)."""
    from insvie_jax.convert.models import load_training_models
    from insvie_jax.models.lora import merge_lora
    from insvie_jax.parallel.mesh import create_mesh
    from insvie_jax.train.step import make_optimizer

    saved = yaml.safe_load((storage.path(run_dir) / "config.yaml").read_text())
    checkpoints = Checkpointer(run_dir, configlib.from_dict(saved))
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
    if not (checkpoints.directory / str(step)).is_dir():
        raise FileNotFoundError(f"no checkpoint {step} in {checkpoints.directory} (there: "
                                f"{', '.join(map(str, checkpoints.manager.all_steps())) or 'none'})")
    cfg = configlib.from_dict(checkpoints.meta(step)["config"])
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, **ONE_DEVICE))
    if use_ema and cfg.train.ema_decay <= 0:
        raise configlib.ConfigError(f"{run_dir} was trained without EMA (train.ema_decay=0): use its weights "
                                    "without EMA (no --ema)")
    state = TrainState.abstract(cfg, create_mesh(cfg.mesh), make_optimizer(cfg))
    if cfg.train.init_from and not checkpoints.has_frozen(step):  # the frozen weights live there
        initial = load_training_models(cfg).transformer
        state = state.replace(frozen=split_model(trained_model(cfg, initial), cfg)[2])
    state, _ = checkpoints.restore(step, state)
    checkpoints.close()
    model = state.model(ema=use_ema)
    if cfg.lora.enabled:
        model = merge_lora(model)
    return model, cfg


def export_model(run_dir: str | Path, dst: str | Path, use_ema: bool = False, step: int | None = None,
                 format: str = "native", dtype: str = "fp32") -> Path:
    """Writes a run's checkpoint (latest, or `step`) as a plain transformer checkpoint that
    `load_transformer` reads (model.family wan: a diffusers folder, whatever `format`): the trained (or EMA)
    weights, LoRA adapters merged in. Runs on one device."""
    from insvie_jax.convert.api import save_transformer

    model, cfg = read_run_model(run_dir, step, use_ema)
    if cfg.model.family == "wan":  # a diffusers WanTransformer3DModel folder: what diffusers and load_models read
        from insvie_jax.convert.wan_keys import save_wan_transformer

        return save_wan_transformer(model, cfg.model, dst, dtype)
    return save_transformer(model, cfg.model, dst, format, dtype)
