"""Validation edits during training: every `train.sample_every` steps, the model being trained edits a fixed
set of up to `train.num_val_clips` clips with 3-way guidance (`sample/loop.py`, `train.val_sample_steps`
steps of `sample.sampler`; Wan: `sample/wan_edit.py` with sample.guidance, the zero text as unconditional).

Reported: "edit_mse", the mean squared error between the sampled edit latents and the target latents, beside
"source_mse", the same between the unedited source and the target; an edit model that learned anything has
edit_mse < source_mse. For pixel-derived data (arrayrecord, video) the latents of the first 8 clips are decoded with the
VAE and written to RUN/samples/<steps done>/<clip>.mp4 as source | edit | target, with one PNG contact sheet
(contact_sheet.png: per clip its instruction and a source, an edit and a target row), and a frame strip of each
goes to TensorBoard; their `insvie-jax eval` metrics (psnr/ssim of the edit vs source and target, warp error) join
the record and samples/<step>/eval.json. The clips and the VAE are handed in (`data.batches.validation_clips`:
the first batches of the "eval" split of data.paths, with data.generate_val of the held-out generated scenes
instead, or the first synthetic batch).
Every process samples (the model may be sharded across them); only the main process decodes and writes.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax.data import video as videolib
from insvie_jax.models import latents as latents_lib
from insvie_jax.sample import loop as sampling
from insvie_jax.sample import wan_edit

STRIP_FRAMES = 4  # frames per clip in the TensorBoard strip
VIDEO_CLIPS = 8  # clips decoded to mp4 and to the contact sheet (decoding costs more than sampling)
SHEET_FRAMES = 5  # frames per row of the contact sheet
CONTACT_SHEET = "contact_sheet.png"


@nnx.jit
def _decode(vae, latents):
    return vae.decode(latents)


@nnx.jit(static_argnums=(4,))
def _wan_sample(model, source, text, noise, settings):
    return wan_edit.sample_latents(model, source, text, None, noise, settings)


class Validator:
    """Handed in: the clips (`data.batches.validation_clips`) and, for pixel-derived data, the `vae` that decodes
    the edits (`convert.models.load_training_models`); it reads no files itself."""

    def __init__(self, cfg: configlib.Config, mesh, graphdef, clips: dict[str, np.ndarray], vae, run_dir,
                 writer, main: bool):
        self.cfg, self.graphdef, self.run_dir, self.writer, self.main = cfg, graphdef, run_dir, writer, main
        replicated = NamedSharding(mesh, PartitionSpec())
        self.instructions = clips.pop("instruction", None)
        self.clips = {k: jax.make_array_from_callback(v.shape, replicated, lambda idx, v=v: v[idx])
                      for k, v in clips.items()}
        self.host_clips = clips
        self.sample_cfg = dataclasses.replace(cfg.sample, steps=cfg.train.val_sample_steps)
        self.pixels = cfg.data.source != "synthetic"
        self.vae = vae

    def due(self, done: int) -> bool:
        every = self.cfg.train.sample_every
        return every > 0 and done % every == 0

    def __call__(self, done: int, params, frozen) -> dict:
        """Samples the validation edits with `params`; writes the metrics (and videos); returns the record."""
        model = nnx.merge(self.graphdef, params, frozen)
        key = jax.random.key(self.cfg.sample.seed)
        if self.cfg.model.family == "wan":  # flow sampler; the unconditional text is the dropped (zero) one
            settings = wan_edit.settings_from_config(dataclasses.replace(self.cfg, sample=self.sample_cfg))
            noise = wan_edit.noise_like(key, self.clips["source"], self.cfg.model.out_channels)
            edited = _wan_sample(model, self.clips["source"], self.clips["text"], noise, settings)
        else:
            edited = sampling.sample(model, self.clips["source"], self.clips["text"], key, self.sample_cfg,
                                     self.cfg.diffusion, progress=False)
        edited = np.asarray(jax.device_get(edited), np.float32)
        source, target = self.host_clips["source"], self.host_clips["target"]
        record = {"step": done, "val_clips": len(edited), "edit_mse": float(np.mean((edited - target) ** 2)),
                  "source_mse": float(np.mean((source - target) ** 2))}
        if self.pixels:
            record["samples"] = str(self.run_dir / "samples" / str(done))
        if self.main:
            if self.pixels:
                record.update(self._write_videos(done, source, edited, target))
            self.writer.write(record, prefix="val")
        return record

    def _write_videos(self, done: int, source, edited, target) -> dict:
        """The first VIDEO_CLIPS clips decoded: one mp4 each (source | edit | target side by side) and one PNG
        contact sheet of them all (per clip a source, an edit and a target row of frames); returns their
        `insvie-jax eval` metrics (also in the folder's eval.json)."""
        count = min(len(edited), VIDEO_CLIPS)
        latents = np.concatenate([source[:count], edited[:count], target[:count]])
        latents = latents_lib.from_model(self.cfg.vae, latents)
        videos = videolib.to_uint8(np.asarray(_decode(self.vae, latents)))
        folder = self.run_dir / "samples" / str(done)
        storage.makedirs(folder)
        for index in range(count):
            panel = np.concatenate(videos[index::count], axis=2)  # source | edit | target
            videolib.write_video(folder / f"{index:02d}.mp4", panel, self.cfg.sample.fps)
            picks = np.unique(np.linspace(0, len(panel) - 1, min(STRIP_FRAMES, len(panel))).round().astype(int))
            self.writer.image(f"val/clip_{index:02d}", np.concatenate(list(panel[picks]), axis=0), done)
        labels = (self.instructions or [""] * count)[:count]
        contact_sheet(folder / CONTACT_SHEET, [videos[i::count] for i in range(count)], labels)
        from insvie_jax.eval import SAMPLES_EVAL, eval_clips

        scores = eval_clips(videos[:count], videos[count:2 * count], videos[2 * count:])
        (folder / SAMPLES_EVAL).write_text(json.dumps({"step": done, **scores}, indent=2) + "\n")
        return scores


def contact_sheet(path, clips: list, labels: list[str], frames: int = SHEET_FRAMES):
    """A PNG: per clip, its instruction, then a source, an edit and a target row of `frames` evenly spaced
    frames (each clip a list of three uint8 (F, H, W, 3) videos), enlarged 2x so that small clips read."""
    from PIL import Image, ImageDraw

    bands = []
    for (source, edit, target), label in zip(clips, labels):
        picks = np.unique(np.linspace(0, len(source) - 1, min(frames, len(source))).round().astype(int))
        rows = [np.concatenate(list(video[picks]), axis=1) for video in (source, edit, target)]
        grid = np.repeat(np.repeat(np.concatenate(rows, axis=0), 2, axis=0), 2, axis=1)
        title = Image.new("RGB", (grid.shape[1], 14), (255, 255, 255))
        ImageDraw.Draw(title).text((2, 1), f"{label}   (rows: source / edit / target)", fill=(0, 0, 0))
        bands += [np.asarray(title), grid, np.full((6, grid.shape[1], 3), 255, np.uint8)]
    with storage.local_file(path) as local:
        Image.fromarray(np.concatenate(bands, axis=0)).save(local, format="PNG")
    return path
