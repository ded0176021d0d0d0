"""Instruction-based video editing, end to end (InsViE's inference, reference §4).

video file -> frames (4k+1, resized and centre-cropped to data.height × data.width, in [-1, 1]) -> VAE encode
(a posterior sample, as InsViE) × scaling factor -> T5 encoding of the instruction -> the jitted sampling loop
with 3-way guidance (the unconditional text is an all-zero embedding, the unconditional source zero latents)
-> ÷ scaling factor -> VAE decode -> uint8 -> edit.mp4, side_by_side.mp4, contact_sheet.png, meta.json.

An empty VAE / T5 path, or no transformer checkpoint, builds the config's model with random weights (seeded by
data.seed, as encode builds them): that is how the tiny config runs without any weights. A training run folder
as the checkpoint edits with its latest (or EMA) weights; the CLI then takes the run's own config. Every random
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
from insvie_jax.convert import encoders
from insvie_jax.data import video as videolib
from insvie_jax.models import t5 as t5_model
from insvie_jax.models import transformer as tr
from insvie_jax.models import vae as vae_model
from insvie_jax.models.params import flat_params
from insvie_jax.sample import loop

log = logging.getLogger(__name__)

# ModelConfig fields that say how to run the model, not what it is: taken from the config, not the checkpoint.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention", "scan_layers", "remat_policy")
NAME_CHARS = 120  # InsViE's output folder keeps the first 120 characters of the instruction


class EditError(configlib.ConfigError):
    """Models or inputs that do not fit together; the message says what to change."""


@dataclasses.dataclass
class Models:
    transformer: tr.EditTransformer
    model_cfg: configlib.ModelConfig
    vae: vae_model.CogVideoXVAE
    scaling_factor: float
    text_encoder: t5_model.T5Encoder
    text_cfg: configlib.TextEncoderConfig
    tokenizer: object
    checkpoint: str | None


@dataclasses.dataclass
class EditResult:
    out_dir: epath.Path  # a local folder or an object-storage URL (storage.path)
    frames: np.ndarray  # the edit, uint8 (F, H, W, 3)
    source: np.ndarray  # the source as the model saw it, uint8 (F, H, W, 3)
    meta: dict


def _transformer_weights(cfg: Config, checkpoint: str | None, ema: bool = False):
    """(flat params or None for random weights, ModelConfig): the checkpoint's architecture, the config's runtime.
    `checkpoint` may be a training run folder (its latest checkpoint) or RUN/checkpoints/<step>; `ema` takes the
    run's EMA weights."""
    if not checkpoint:
        log.warning("insvie-jax edit: no --checkpoint: using a RANDOM transformer of config model '%s' "
                    "(smoke test; the edit will be noise)", cfg.model.name)
        return None, cfg.model
    from insvie_jax.convert import api
    # A run's orbax checkpoint is read with the training code (a lazy import: sample/ sits below train/).
    from insvie_jax.train import checkpoint as checkpoints

    run = checkpoints.find_run_checkpoint(checkpoint)
    if run is not None:
        model, run_cfg = checkpoints.load_run_model(*run, use_ema=ema)
        flat, ckpt_cfg = flat_params(model), run_cfg.model
    elif ema:
        raise EditError(f"--ema takes a training run's EMA weights; {checkpoint} is not a run folder")
    else:
        flat, ckpt_cfg = api.read_flat(checkpoint)
    return flat, dataclasses.replace(ckpt_cfg, **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})


def load_models(cfg: Config, checkpoint: str | None = None, vae: str | None = None, t5: str | None = None,
                ema: bool = False) -> Models:
    """The transformer (checkpoint in any format, a training run, or random), VAE, T5 and tokenizer (paths default
    to the config's; convert/encoders.py decides the VAE, T5 and tokenizer, as for encode and training)."""
    encoder, text_cfg, tokenizer = encoders.load_text_encoder(cfg, t5)
    flat, model_cfg = _transformer_weights(cfg, checkpoint, ema)
    if text_cfg.d_model != model_cfg.text_embed_dim:
        raise EditError(f"the text encoder gives {text_cfg.d_model}-wide embeddings but the transformer takes "
                        f"model.text_embed_dim={model_cfg.text_embed_dim}: use the T5 the model was trained with "
                        "(--t5 / text_encoder.*)")
    vae_net, scaling_factor = encoders.load_vae(cfg, vae)
    latent_channels = vae_net.decoder.conv_in.kernel.shape[-2]
    if latent_channels != model_cfg.in_channels:
        raise EditError(f"the VAE has {latent_channels} latent channels but the transformer takes "
                        f"model.in_channels={model_cfg.in_channels}: use the VAE the model was trained with (--vae)")
    if flat is None:
        transformer = tr.build(model_cfg, seed=encoders.stand_in_seed(cfg))
    else:
        from insvie_jax.convert import api

        transformer = api.model_from_flat(flat, model_cfg)
    return Models(transformer, model_cfg, vae_net, scaling_factor, encoder, text_cfg, tokenizer, checkpoint or None)


@nnx.jit
def encode_video(vae, video, key):
    """(B, F, H, W, 3) in [-1, 1] -> a posterior sample of the unscaled latents (as InsViE: sampled, not the mean)."""
    return vae.encode(video).sample(key)


@nnx.jit
def decode_latents(vae, latents):
    """Unscaled latents -> (B, F, H, W, 3) float32, roughly in [-1, 1]."""
    return vae.decode(latents)


@nnx.jit
def _encode_text(encoder, ids):
    return encoder(ids)


def encode_instruction(models: Models, instruction: str) -> tuple[jax.Array, bool]:
    """(1, max_length, d_model) float32 embedding, and whether the instruction was cut to fit max_length.

    As CogVideoX: truncated, EOS, zero-padded to max_length, and no attention mask (pads are attended to)."""
    max_length = models.text_cfg.max_length
    tokens = len(models.tokenizer.encode([instruction], out_type=int)[0]) + 1  # + EOS
    ids, _ = t5_model.tokenize(models.tokenizer, [instruction], max_length)
    # Rounded to bfloat16 as `encode` stores it: the model edits with exactly the conditioning it was trained on.
    text = _encode_text(models.text_encoder, ids).astype(jnp.bfloat16).astype(jnp.float32)
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
        max_frames = (self.models.model_cfg if self.models else cfg.model).sample_frames
        clip = videolib.read_clip(video, cfg.data.height, cfg.data.width, max_frames, cfg.vae.temporal_compression)
        if self.models is None:
            self.models = load_models(cfg, *self._paths, ema=self._ema)
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
        latents = encode_video(models.vae, source[None], encode_key) * models.scaling_factor
        edited = loop.sample(models.transformer, latents, text, sample_key, cfg.sample, cfg.diffusion,
                             progress=progress)
        decoded = np.asarray(decode_latents(models.vae, edited / models.scaling_factor))[0, :frames]

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
