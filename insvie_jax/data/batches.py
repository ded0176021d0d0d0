"""What the training loop takes from data/: `train_batches(cfg, shardings)`, the global batch of every step as
sharded arrays, and `validation_clips(cfg)`, the clips validation edits.

Two sources behind one interface (`batch(step)`, and `iterator`, the grain iterator a checkpoint saves or None):
- `data.source: synthetic`: latent triplets drawn in memory, a pure function of (train.seed, step); nothing to save.
- any other source: the grain pipeline of data/pipeline.py (arrayrecord shards, videos encoded on the fly), this
  process's share of each global batch in order; its iterator state goes into every checkpoint.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from insvie_jax import config as configlib
from insvie_jax.data import synthetic_videos
from insvie_jax.data.pipeline import make_pipeline
from insvie_jax.data.synthetic import SyntheticTriplets


class DataEnded(RuntimeError):
    """The data pipeline has no batch left for a step the run still has to train."""


def _synthetic_triplets(cfg: configlib.Config) -> SyntheticTriplets:
    return SyntheticTriplets(cfg.data.batch_size, configlib.latent_shape(cfg), cfg.model.text_length,
                             cfg.model.text_embed_dim, seed=cfg.train.seed)


class SyntheticBatches:
    """Synthetic data: the global batch of each step, a pure function of (train.seed, step); nothing to save.
    Each process draws only the rows its devices hold (rows are drawn independently, so the global batch is the
    same for any process count)."""

    iterator = None

    def __init__(self, cfg: configlib.Config, shardings):
        self.data = _synthetic_triplets(cfg)
        self.shardings = shardings
        b = cfg.data.batch_size
        self.shapes = {"source": (b, *configlib.latent_shape(cfg)), "target": (b, *configlib.latent_shape(cfg)),
                       "text": (b, cfg.model.text_length, cfg.model.text_embed_dim)}

    def batch(self, step: int) -> dict:
        drawn = {}  # rows -> arrays, shared by the devices (and keys) that hold the same rows

        def shard(key: str, index: tuple) -> np.ndarray:
            rows = range(*index[0].indices(self.data.batch_size))
            if rows not in drawn:
                drawn[rows] = self.data.rows(step, rows)
            return drawn[rows][key][(slice(None), *index[1:])]

        return {k: jax.make_array_from_callback(self.shapes[k], self.shardings[k], lambda i, k=k: shard(k, i))
                for k in self.shardings}


class PipelineBatches:
    """data.pipeline batches: this process's share of each global batch, in order; the grain iterator's state
    goes into every checkpoint (one file per process), so `step` only names the batch for error messages."""

    def __init__(self, cfg: configlib.Config, shardings):
        self.iterator = make_pipeline(cfg, "train", jax.process_index(), jax.process_count())
        self.shardings = shardings

    def batch(self, step: int) -> dict:
        try:
            local = next(self.iterator)
        except StopIteration:
            raise DataEnded(f"the data pipeline ended before step {step}") from None
        return {k: jax.make_array_from_process_local_data(self.shardings[k], np.asarray(local[k]))
                for k in self.shardings}


def train_batches(cfg: configlib.Config, shardings) -> SyntheticBatches | PipelineBatches:
    """The training batches of `cfg.data`, placed by `shardings` ({source, target, text} -> sharding)."""
    if cfg.data.source == "synthetic":
        return SyntheticBatches(cfg, shardings)
    return PipelineBatches(cfg, shardings)


def validation_clips(cfg: configlib.Config) -> dict:
    """{source, target, text} of the first `train.num_val_clips` clips (scaled latents, float32), and their
    "instruction"s where known: the first synthetic batch; for pixel-derived data the first batches of the "eval"
    split of data.paths (generated data with data.generate_val: of its held-out scenes instead)."""
    count = cfg.train.num_val_clips
    if cfg.data.source == "synthetic":
        return {k: v[:count] for k, v in _synthetic_triplets(cfg).batch(0).items()}
    held_out = synthetic_videos.validation_folders(cfg)
    if held_out:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=[str(p) for p in held_out],
                                                                weights=[]))
    # Every process reads the same clips: the eval split, unsharded.
    batches, total = [], 0
    for batch in make_pipeline(cfg, "eval", 0, 1, with_names=True):
        batches.append(batch)
        total += len(batch["source"])
        if total >= count:
            break
    shapes = {b["source"].shape[1:] for b in batches}
    if len(shapes) > 1:  # buckets: keep the clips of the first bucket's shape, so they batch together
        batches = [b for b in batches if b["source"].shape[1:] == batches[0]["source"].shape[1:]]
    clips = {k: np.concatenate([b[k] for b in batches])[:count] for k in ("source", "target", "text")}
    known = {}
    for folder in cfg.data.paths:
        known.update(synthetic_videos.instructions_of(folder))
    names = [name for b in batches for name in b["name"]][:count]
    clips["instruction"] = [known.get(name.rsplit(":", 1)[-1], "") for name in names]
    return clips
