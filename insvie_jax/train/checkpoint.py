"""Checkpoints of a run: RUN/checkpoints/<step>/ through an orbax CheckpointManager (async, multi-host); saving and
restoring only (a run's model is read back by train/export.py).

Each checkpoint holds the train state's variables (trainable params, optimizer state, EMA, skip counters), the frozen
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

import grain.checkpoint
import jax
import orbax.checkpoint as ocp

from insvie_jax import storage
from insvie_jax.config import Config, Stage, what_trains
from insvie_jax.train.state import TrainState


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

    def save(self, step: int, state: TrainState, meta: dict, data_iterator=None) -> None:
        """Starts writing checkpoint `step` (returns before the write ends when async); raises on failure,
        including the failure of an earlier async write. `data_iterator`: a grain iterator whose state is saved."""
        items = {"state": ocp.args.StandardSave(state.variables), "meta": ocp.args.JsonSave(meta)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(_FrozenState(data_iterator))
        if self.save_frozen and jax.tree.leaves(state.frozen):
            items["frozen"] = ocp.args.StandardSave(state.frozen)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def has_frozen(self, step: int) -> bool:
        """Whether checkpoint `step` holds the frozen weights (else they are train.init_from's)."""
        return (self.directory / str(step) / "frozen").is_dir()

    def restore(self, step: int, state: TrainState, data_iterator=None) -> tuple[TrainState, dict]:
        """(state, meta) of checkpoint `step`, placed with `state`'s shardings; `state` gives the structure (arrays
        or ShapeDtypeStructs), and the frozen weights where the checkpoint holds none. A given grain
        `data_iterator` is set to its saved state."""
        items = {"state": ocp.args.StandardRestore(_abstract(state.variables, state.shardings)),
                 "meta": ocp.args.JsonRestore()}
        if data_iterator is not None:
            if not (self.directory / str(step) / "data").is_dir():
                raise ValueError(f"checkpoint {step} in {self.directory} holds no data iterator state (it was written "
                                 "with data.source=synthetic?): resume with the data source it was trained on")
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        # A curriculum saves the frozen weights from the stage on where they stop being train.init_from's.
        restore_frozen = self.has_frozen(step) and jax.tree.leaves(state.frozen)
        if restore_frozen:
            items["frozen"] = ocp.args.StandardRestore(_abstract(state.frozen, state.frozen_shardings))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        restored = state.replace(variables=out["state"], frozen=out["frozen"] if restore_frozen else state.frozen)
        return restored, out["meta"]

    def meta(self, step: int) -> dict:
        """Checkpoint `step`'s meta alone: step, seed, data position, stage, config."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def wait(self) -> None:
        """Blocks until pending writes end; raises if one failed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def saves_frozen(stages: list[Stage], index: int) -> bool:
    """Whether stage `index`'s checkpoints must hold the frozen weights: unless they are still train.init_from's
    (no change of what trains up to this stage, which would merge or promote weights into them)."""
    if not stages[0].config.train.init_from:
        return True
    return any(what_trains(stages[i - 1].config) != what_trains(stages[i].config) for i in range(1, index + 1))
