"""Instruction-based video editing, end to end (InsViE's inference, reference §4).

video file -> frames (4k+1, resized and centre-cropped to data.height × data.width, in [-1, 1]) -> VAE encode
(a posterior sample, as InsViE) × scaling factor -> T5 encoding of the instruction -> the jitted sampling loop
with 3-way guidance (the unconditional text is an all-zero embedding, the unconditional source zero latents)
-> ÷ scaling factor -> VAE decode -> uint8 -> edit.mp4, side_by_side.mp4, contact_sheet.png, meta.json.

The models come from `convert.models.load_models`: an empty VAE / T5 path, or no transformer checkpoint, builds
the config's model with random weights (seeded by data.seed, as encode builds them): that is how the tiny config
runs without any weights. A training run folder as the checkpoint edits with its latest (or EMA) weights; the CLI
then takes the run's own config. Every random
draw comes from the explicit `seed`, so an edit is reproducible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax.config import Config
from insvie_jax.convert.models import Models, load_models
from insvie_jax.data import video as videolib
from insvie_jax.models import family
from insvie_jax.models import latents as latents_lib
from insvie_jax.models import t5 as t5_model
from insvie_jax.sample import loop, wan_edit

log = logging.getLogger(__name__)

NAME_CHARS = 120  # InsViE's output folder keeps the first 120 characters of the instruction


@dataclasses.dataclass
class EditResult:
    out_dir: epath.Path  # a local folder or an object-storage URL (storage.path)
    frames: np.ndarray  # the edit, uint8 (F, H, W, 3)
    source: np.ndarray  # the source as the model saw it, uint8 (F, H, W, 3)
    meta: dict


@nnx.jit
def encode_video(vae, video, key):
    """(B, F, H, W, 3) in [-1, 1] -> a posterior sample of the unscaled latents (as InsViE: sampled, not the mean)."""
    return vae.encode(video).sample(key)


@nnx.jit
def decode_latents(vae, latents):
    """Unscaled latents -> (B, F, H, W, 3) float32, roughly in [-1, 1]."""
    return vae.decode(latents)


@nnx.jit(static_argnums=(0,))
def _encode_text(text_cfg, encoder, ids, mask):
    return family.text_states(text_cfg, encoder, ids, mask)


def encode_instruction(models: Models, instruction: str) -> tuple[jax.Array, bool]:
    """(1, max_length, d_model) float32 embedding, and whether the instruction was cut to fit max_length.

    As CogVideoX: truncated, EOS, zero-padded to max_length, and no attention mask (pads are attended to)."""
    max_length = models.text_cfg.max_length
    tokens = len(models.tokenizer.encode([instruction], out_type=int)[0]) + 1  # + EOS
    ids, mask = t5_model.tokenize(models.tokenizer, [instruction], max_length)
    # Rounded to bfloat16 as `encode` stores it: the model edits with exactly the conditioning it was trained on.
    text = _encode_text(models.text_cfg, models.text_encoder, ids, mask).astype(jnp.bfloat16).astype(jnp.float32)
    return text, tokens > max_length


def output_name(video: str | Path, instruction: str) -> str:
    """InsViE's folder name: `<video stem>-<instruction, spaces as '_', '/' removed, first 120 characters>`."""
    return f"{storage.path(video).stem}-{instruction.replace(' ', '_').replace('/', '')[:NAME_CHARS]}"


class Editor:
    """Edits one clip after another with the same models, loaded at the first edit (so a bad video fails fast)."""

    def __init__(self, cfg: Config, checkpoint: str | None = None, vae: str | None = None, t5: str | None = None,
                 models: Models | None = None, ema: bool = False):
        self.cfg = cfg
        self._paths = (checkpoint, vae, t5)
        self._ema = ema
        self.models = models

    def edit(self, video: str | Path, instruction: str, out: str | Path, seed: int | None = None, *,
             progress: bool = True) -> EditResult:
        cfg = self.cfg
        seed = cfg.sample.seed if seed is None else seed
        if cfg.model.family == "wan":
            return self._edit_wan(video, instruction, out, seed)
        max_frames = (self.models.model_cfg if self.models else cfg.model).sample_frames
        clip = videolib.read_clip(video, cfg.data.height, cfg.data.width, max_frames, cfg.vae.temporal_compression)
        if self.models is None:
            checkpoint, vae, t5 = self._paths
            self.models = load_models(cfg, checkpoint=checkpoint, ema=self._ema, vae=vae, text_encoder=t5)
            if self.models.model_cfg.sample_frames != max_frames:  # the checkpoint's frame limit, not the config's
                clip = videolib.read_clip(video, cfg.data.height, cfg.data.width, self.models.model_cfg.sample_frames,
                                          cfg.vae.temporal_compression)
        models = self.models
        frames = videolib.usable_frames(len(clip.frames), models.model_cfg.sample_frames, cfg.vae.temporal_compression)
        source = clip.frames[:frames]
        latent_frames = (frames - 1) // cfg.vae.temporal_compression + 1
        if latent_frames % 2 == 0:
            log.warning("insvie-jax edit: %d frames give an even number of latent frames (%d), which CogVideoX's VAE "
                        "decodes to %d frames (kept: the first %d); InsViE expects 8k+1 frames", frames, latent_frames,
                        cfg.vae.temporal_compression * latent_frames, frames)

        text, truncated = encode_instruction(models, instruction)
        if truncated:
            log.warning("insvie-jax edit: the instruction is longer than text_encoder.max_length=%d tokens and was "
                        "truncated: %r", models.text_cfg.max_length, instruction)
        encode_key, sample_key = jax.random.split(jax.random.key(seed))
        latents = latents_lib.to_model(cfg.vae, encode_video(models.vae, source[None], encode_key), models.scaling_factor)
        edited = loop.sample(models.transformer, latents, text, sample_key, cfg.sample, cfg.diffusion,
                             progress=progress)
        decoded = np.asarray(decode_latents(models.vae, latents_lib.from_model(cfg.vae, edited, models.scaling_factor)))[
            0, :frames]

        meta = {
            "video": str(video), "instruction": instruction, "instruction_truncated": truncated,
            "seed": seed, "steps": cfg.sample.steps, "sampler": cfg.sample.sampler,
            "text_scale": cfg.sample.text_scale, "source_scale": cfg.sample.source_scale,
            "guidance_schedule": cfg.sample.guidance_schedule, "frames": frames,
            "size": [cfg.data.height, cfg.data.width], "fps": cfg.sample.fps,
            "source_fps": float(clip.fps) if clip.fps else None, "checkpoint": models.checkpoint,
        }
        result = EditResult(storage.path(out) / output_name(video, instruction), videolib.to_uint8(decoded),
                            videolib.to_uint8(source), meta)
        write(result, cfg.sample.fps)
        return result


    def _edit_wan(self, video, instruction: str, out, seed: int) -> EditResult:
        """The Wan edit (`sample/wan_edit.py`, as LucyEditPipeline runs it, sample.guidance lucy or insvie): up to
        data.num_frames frames; the unconditional text is sample.negative_prompt encoded, or the zero text
        (text dropout's) when it is empty."""
        cfg = self.cfg
        tc = cfg.vae.temporal_compression
        clip = videolib.read_clip(video, cfg.data.height, cfg.data.width, cfg.data.num_frames, tc)
        if self.models is None:
            checkpoint, vae, t5 = self._paths
            self.models = load_models(cfg, checkpoint=checkpoint, ema=self._ema, vae=vae, text_encoder=t5)
        models = self.models
        frames = videolib.usable_frames(len(clip.frames), cfg.data.num_frames, tc)
        source = clip.frames[:frames]
        text, truncated = encode_instruction(models, instruction)
        if truncated:
            log.warning("insvie-jax edit: the instruction is longer than text_encoder.max_length=%d tokens and was "
                        "truncated: %r", models.text_cfg.max_length, instruction)
        negative = encode_instruction(models, cfg.sample.negative_prompt)[0] if cfg.sample.negative_prompt else None
        settings = wan_edit.settings_from_config(cfg)
        run = wan_edit.jit_edit(models.vae_cfg, settings)
        decoded = np.asarray(run(models.transformer, models.vae, jnp.asarray(source[None]), text, negative,
                                 key=jax.random.key(seed)))[0, :frames]
        meta = {
            "video": str(video), "instruction": instruction, "instruction_truncated": truncated, "seed": seed,
            "family": "wan", "steps": settings.steps, "sampler": settings.sampler, "shift": settings.shift,
            "guidance": settings.guidance, "text_scale": settings.text_scale, "source_scale": settings.source_scale,
            "negative_prompt": cfg.sample.negative_prompt, "frames": frames, "size": [cfg.data.height, cfg.data.width],
            "fps": cfg.sample.fps, "source_fps": float(clip.fps) if clip.fps else None, "checkpoint": models.checkpoint,
        }
        result = EditResult(storage.path(out) / output_name(video, instruction), videolib.to_uint8(decoded),
                            videolib.to_uint8(source), meta)
        write(result, cfg.sample.fps)
        return result


def write(result: EditResult, fps: int) -> None:
    storage.makedirs(result.out_dir)
    videolib.write_video(result.out_dir / "edit.mp4", result.frames, fps)
    videolib.write_video(result.out_dir / "side_by_side.mp4", videolib.side_by_side(result.source, result.frames), fps)
    videolib.contact_sheet(result.out_dir / "contact_sheet.png", result.source, result.frames)
    (result.out_dir / "meta.json").write_text(json.dumps(result.meta, indent=2) + "\n")


def edit(video: str | Path, instruction: str, out: str | Path, cfg: Config | None = None, *,
         checkpoint: str | None = None, vae: str | None = None, t5: str | None = None, seed: int | None = None,
         progress: bool = True) -> EditResult:
    """Edits `video` as `instruction` says; writes `out/<name>/{edit.mp4, side_by_side.mp4, contact_sheet.png,
    meta.json}` and returns the frames. `cfg` defaults to the tiny preset; `seed` to sample.seed."""
    cfg = cfg or configlib.load("tiny")
    return Editor(cfg, checkpoint, vae, t5).edit(video, instruction, out, seed, progress=progress)
