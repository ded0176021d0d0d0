"""Checkpoints of a run: RUN/checkpoints/<step>/ through an orbax CheckpointManager (async, multi-host).

Each checkpoint holds the train state (trainable params, optimizer state, EMA, skip counters), the frozen
params unless they come from `train.init_from` (then they are re-read from there), a JSON `meta`: the
step (= steps done), seed, data iterator position, stage name and the resolved config, and for grain data
pipelines a `data` folder with each process's iterator state (grain's orbax handler, one file per process).

A save that fails (disk full, unwritable folder) does not stop the run: orbax writes into a temporary
folder and renames it only when complete, so earlier checkpoints stay readable; the failure is reported
on stderr and in metrics.jsonl by the loop, and the next save is tried as scheduled.

RUN may be a gs:// URL: orbax writes there collectively from every process (tensorstore's GCS driver) and
marks a complete checkpoint with commit_success.txt instead of a rename; the checkpoint folder is an
epath.Path either way (storage.absolute).
"""

from __future__ import annotations

import json
from pathlib import Path

import grain.checkpoint
import jax
import orbax.checkpoint as ocp
import yaml

from insvie_jax import storage
from insvie_jax.config import Config


class _FrozenState:
    """The iterator state at save time, for grain's handler: an async save may run after the loop moved on."""

    def __init__(self, iterator):
        self.state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self.state


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, run_dir, cfg: Config):
        c = cfg.checkpoint
        self.save_frozen = not cfg.train.init_from
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep,
            keep_period=c.keep_every or None,
            enable_async_checkpointing=c.async_save,
            create=True,
        )
        if storage.is_url(run_dir) and not str(run_dir).startswith("gs://"):
            raise storage.StorageError(f"train.run_dir={run_dir}: orbax writes checkpoints to gs:// or local "
                                       "folders only; use a gs:// bucket or a shared filesystem")
        self.directory = storage.absolute(run_dir) / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, frozen, meta: dict, data_iterator=None) -> None:
        """Starts writing checkpoint `step` (returns before the write ends when async); raises on failure,
        including the failure of an earlier async write. `data_iterator`: a grain iterator whose state is saved."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_FrozenState(data_iterator))
        if self.save_frozen and jax.tree.leaves(frozen):
            items["frozen"] = ocp.args.StandardSave(frozen)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, state, state_sh, frozen, frozen_sh, data_iterator=None):
        """(state, frozen, meta) of checkpoint `step`, placed with the given shardings; `state`/`frozen`
        give the structure (arrays or ShapeDtypeStructs). A given grain `data_iterator` is set to its saved state."""
        items = {"state": ocp.args.StandardRestore(_abstract(state, state_sh)), "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not (self.directory / str(step) / "data").is_dir():
                raise ValueError(f"checkpoint {step} in {self.directory} holds no data iterator state (it was written "
                                 "with data.source=synthetic?): resume with the data source it was trained on")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        # A curriculum saves the frozen weights from the stage on where they stop being train.init_from's.
        restore_frozen = (self.directory / str(step) / "frozen").is_dir() and jax.tree.leaves(frozen)
        if restore_frozen:
            items["frozen"] = ocp.args.StandardRestore(_abstract(frozen, frozen_sh))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["frozen"] if restore_frozen else frozen, out["meta"]

    def meta(self, step: int) -> dict:
        """Checkpoint `step`'s meta alone: step, seed, data position, stage, config."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until pending writes end; raises if one failed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


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


def load_run_model(run_dir: str | Path, step: int | None = None, use_ema: bool = False):
    """(model, config) of a run's checkpoint (latest, or `step`): the trained (or EMA) weights, LoRA adapters merged
    in, on one device; the config is the checkpoint's own (in a curriculum, the stage's)."""
    import dataclasses

    from flax import nnx

    from insvie_jax import config as configlib
    from insvie_jax.models.lora import merge_lora
    from insvie_jax.parallel.mesh import create_mesh
    from insvie_jax.train import step as steplib

    saved = yaml.safe_load((storage.path(run_dir) / "config.yaml").read_text())
    checkpoints = Checkpointer(run_dir, configlib.from_dict(saved))
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints.directory}")
    if not (checkpoints.directory / str(step)).is_dir():
        raise FileNotFoundError(f"no checkpoint {step} in {checkpoints.directory} (there: "
                                f"{', '.join(map(str, checkpoints.manager.all_steps())) or 'none'})")
    cfg = configlib.from_dict(checkpoints.meta(step)["config"])
    cfg.mesh = dataclasses.replace(cfg.mesh, ici_data=1, ici_fsdp=1, ici_tensor=1, ici_context=1,  # one device,
                                   dcn_data=1, dcn_fsdp=1, dcn_tensor=1, dcn_context=1)  # also for a multi-host run
    if use_ema and cfg.train.ema_decay <= 0:
        raise configlib.ConfigError(f"{run_dir} was trained without EMA (train.ema_decay=0): use its weights "
                                    "without EMA (no --ema)")
    optimizer = steplib.make_optimizer(cfg)
    mesh = create_mesh(cfg.mesh)
    graphdef, state_sh, frozen_sh = steplib.state_shardings(cfg, mesh, optimizer)
    state, frozen = steplib.abstract_state(cfg, optimizer)
    if cfg.train.init_from and not (checkpoints.directory / str(step) / "frozen").is_dir():  # they live there
        frozen = steplib.split_model(steplib.build_model(cfg), cfg)[2]
    state, frozen, _ = checkpoints.restore(step, state, state_sh, frozen, frozen_sh)
    checkpoints.close()
    model = nnx.merge(graphdef, state["ema"] if use_ema else state["params"], frozen)
    if cfg.lora.enabled:
        model = merge_lora(model)
    return model, cfg


def export_model(run_dir: str | Path, dst: str | Path, use_ema: bool = False, step: int | None = None,
                 format: str = "native", dtype: str = "fp32") -> Path:
    """Writes a run's checkpoint (latest, or `step`) as a plain transformer checkpoint that
    `load_transformer` reads: the trained (or EMA) weights, LoRA adapters merged in. Runs on one device."""
    from insvie_jax.convert.api import save_transformer

    model, cfg = load_run_model(run_dir, step, use_ema)
    return save_transformer(model, cfg.model, dst, format, dtype)
