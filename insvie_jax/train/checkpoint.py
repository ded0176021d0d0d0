"""Checkpoints of a run: RUN/checkpoints/<step>/ through an orbax CheckpointManager (async, multi-host).

Each checkpoint holds the train state (trainable params, optimizer state, EMA, skip counters), the frozen
params unless they come from `train.init_from` (then they are re-read from there), and a JSON `meta`: the
step (= steps done), seed, data iterator position, stage name and the resolved config.

A save that fails (disk full, unwritable folder) does not stop the run: orbax writes into a temporary
folder and renames it only when complete, so earlier checkpoints stay readable; the failure is reported
on stderr and in metrics.jsonl by the loop, and the next save is tried as scheduled.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp

from insvie_jax.config import Config


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    def __init__(self, run_dir: Path, cfg: Config):
        c = cfg.checkpoint
        self.save_frozen = not cfg.train.init_from
        options = ocp.CheckpointManagerOptions(
            max_to_keep=c.keep,
            keep_period=c.keep_every or None,
            enable_async_checkpointing=c.async_save,
            create=True,
        )
        self.directory = Path(run_dir).absolute() / "checkpoints"
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, frozen, meta: dict) -> None:
        """Starts writing checkpoint `step` (returns before the write ends when async); raises on failure,
        including the failure of an earlier async write."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if self.save_frozen and jax.tree.leaves(frozen):
            items["frozen"] = ocp.args.StandardSave(frozen)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, state, state_sh, frozen, frozen_sh):
        """(state, frozen, meta) of checkpoint `step`, placed with the given shardings; `state`/`frozen`
        give the structure (arrays or ShapeDtypeStructs)."""
        items = {"state": ocp.args.StandardRestore(_abstract(state, state_sh)), "meta": ocp.args.JsonRestore()}
        restore_frozen = self.save_frozen and jax.tree.leaves(frozen)
        if restore_frozen:
            items["frozen"] = ocp.args.StandardRestore(_abstract(frozen, frozen_sh))
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return out["state"], out["frozen"] if restore_frozen else frozen, out["meta"]

    def wait(self) -> None:
        """Blocks until pending writes end; raises if one failed."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
