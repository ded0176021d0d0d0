"""Validation edits during training: every `train.sample_every` steps, the model being trained edits a fixed
set of up to `train.num_val_clips` clips with 3-way guidance (`sample/loop.py`, `train.val_sample_steps`
steps of `sample.sampler`).

Reported: "edit_mse", the mean squared error between the sampled edit latents and the target latents, beside
"source_mse", the same between the unedited source and the target; an edit model that learned anything has
edit_mse < source_mse. For pixel-derived data (arrayrecord, video) the latents are decoded with the VAE and
written to RUN/samples/<steps done>/<clip>.mp4 as source | edit | target, and a frame strip of each goes to
TensorBoard. The clips: the first batches of the "eval" split of data.paths, or the first synthetic batch.
Every process samples (the model may be sharded across them); only the main process decodes and writes.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax.sample import loop as sampling
from insvie_jax.sample import video as videolib

STRIP_FRAMES = 4  # frames per clip in the TensorBoard strip


def validation_clips(cfg: configlib.Config, synthetic_batch) -> dict[str, np.ndarray]:
    """{source, target, text} of the first `train.num_val_clips` clips (scaled latents, float32)."""
    count = cfg.train.num_val_clips
    if cfg.data.source == "synthetic":
        return {k: v[:count] for k, v in synthetic_batch.items()}
    from insvie_jax.data.pipeline import make_pipeline

    # Every process reads the same clips: the eval split, unsharded.
    batches, total = [], 0
    for batch in make_pipeline(cfg, "eval", 0, 1):
        batches.append(batch)
        total += len(batch["source"])
        if total >= count:
            break
    shapes = {b["source"].shape[1:] for b in batches}
    if len(shapes) > 1:  # buckets: keep the clips of the first bucket's shape, so they batch together
        batches = [b for b in batches if b["source"].shape[1:] == batches[0]["source"].shape[1:]]
    return {k: np.concatenate([b[k] for b in batches])[:count] for k in ("source", "target", "text")}


@nnx.jit
def _decode(vae, latents):
    return vae.decode(latents)


class Validator:
    def __init__(self, cfg: configlib.Config, mesh, graphdef, clips: dict[str, np.ndarray], run_dir,
                 writer, main: bool):
        self.cfg, self.graphdef, self.run_dir, self.writer, self.main = cfg, graphdef, run_dir, writer, main
        replicated = NamedSharding(mesh, PartitionSpec())
        self.clips = {k: jax.make_array_from_callback(v.shape, replicated, lambda idx, v=v: v[idx])
                      for k, v in clips.items()}
        self.host_clips = clips
        self.sample_cfg = dataclasses.replace(cfg.sample, steps=cfg.train.val_sample_steps)
        self.pixels = cfg.data.source != "synthetic"
        self.vae = None

    def due(self, done: int) -> bool:
        every = self.cfg.train.sample_every
        return every > 0 and done % every == 0

    def __call__(self, done: int, params, frozen) -> dict:
        """Samples the validation edits with `params`; writes the metrics (and videos); returns the record."""
        model = nnx.merge(self.graphdef, params, frozen)
        key = jax.random.key(self.cfg.sample.seed)
        edited = sampling.sample(model, self.clips["source"], self.clips["text"], key, self.sample_cfg,
                                 self.cfg.diffusion, progress=False)
        edited = np.asarray(jax.device_get(edited), np.float32)
        source, target = self.host_clips["source"], self.host_clips["target"]
        record = {"step": done, "val_clips": len(edited), "edit_mse": float(np.mean((edited - target) ** 2)),
                  "source_mse": float(np.mean((source - target) ** 2))}
        if self.main:
            self.writer.write(record, prefix="val")
            if self.pixels:
                self._write_videos(done, source, edited, target)
        return record

    def _write_videos(self, done: int, source, edited, target) -> None:
        if self.vae is None:
            from insvie_jax.data.encode import load_vae_of

            self.vae = load_vae_of(self.cfg)
        latents = np.concatenate([source, edited, target]) / np.float32(self.cfg.vae.scaling_factor)
        videos = videolib.to_uint8(np.asarray(_decode(self.vae, latents)))
        folder = self.run_dir / "samples" / str(done)
        storage.makedirs(folder)
        count = len(edited)
        for index in range(count):
            panel = np.concatenate(videos[index::count], axis=2)  # source | edit | target
            videolib.write_mp4(folder / f"{index:02d}.mp4", panel, self.cfg.sample.fps)
            picks = np.unique(np.linspace(0, len(panel) - 1, min(STRIP_FRAMES, len(panel))).round().astype(int))
            self.writer.image(f"val/clip_{index:02d}", np.concatenate(list(panel[picks]), axis=0), done)
