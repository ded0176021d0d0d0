"""A Wan2.2 edit, video to video, as diffusers' `LucyEditPipeline` runs it (and with InsViE's 3-way guidance).

source video (B, F, H, W, 3) in [-1, 1]
  -> Wan VAE encode, the posterior's mode (Lucy-Edit: `retrieve_latents(..., sample_mode="argmax")`)
  -> normalize_latents (the VAE module's per-channel statistics: the one place they are applied)
  -> noise N(0, I) of the latents' shape -> a flow sampler (UniPC or Euler) in one `lax.scan`, each step one
     batched model call guided 2-way (Lucy: [negative text | text], source in both) or 3-way (InsViE)
  -> denormalize_latents -> Wan VAE decode -> video (B, F, H, W, 3) in [-1, 1].

Text embeddings are given (UMT5 states as `models.umt5.prompt_states` makes them, zero past each prompt). The
timestep is one per sample: diffusers' TI2V `expand_timesteps` gives every token the same value during an edit,
which the transformer computes to the same numbers. Every function here is pure JAX: wrap the whole edit in
`nnx.jit` (see `jit_edit`) or its stages apart (encode / sample / decode) to bound peak memory.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from insvie_jax.config import WanVAEConfig
from insvie_jax.diffusion import flow, flow_guidance
from insvie_jax.models.wan import vae as wan_vae
from insvie_jax.models.wan.transformer import WanEditTransformer

GUIDANCE = ("lucy", "insvie")


@dataclasses.dataclass(frozen=True)
class WanEditSettings:
    """How to sample (hashable: a static argument of `jax.jit`). Defaults are Lucy-Edit's (UniPC, 50 steps,
    shift 5, CFG 5)."""

    sampler: str = "flow_unipc"  # flow.FLOW_SAMPLERS
    steps: int = 50
    shift: float = 5.0  # Wan2.2-TI2V-5B's flow_shift
    guidance: str = "lucy"  # "lucy": 2-way text CFG | "insvie": 3-way (text, source)
    text_scale: float = 5.0
    source_scale: float = 1.0  # insvie only; 1 leaves the source branch unguided

    def __post_init__(self):
        if self.guidance not in GUIDANCE:
            raise ValueError(f"unknown guidance '{self.guidance}': expected one of {', '.join(GUIDANCE)} "
                             "(sample.guidance)")
        flow.make_plan(self.sampler, self.steps, self.shift)  # one line naming the bad sampler or steps


def settings_from_config(cfg) -> WanEditSettings:
    """The edit settings of a config's `sample` and `diffusion` sections (model.family: wan)."""
    s = cfg.sample
    return WanEditSettings(sampler=s.sampler, steps=s.steps, shift=cfg.diffusion.flow_shift, guidance=s.guidance,
                           text_scale=s.text_scale, source_scale=s.source_scale)


def encode_source(vae: wan_vae.WanVAE, vae_cfg: WanVAEConfig, video: jax.Array) -> jax.Array:
    """Source video (B, F, H, W, 3) in [-1, 1] -> the diffusion model's (normalised) source latents."""
    return wan_vae.normalize_latents(vae.encode(video).mode(), vae_cfg)


def decode_latents(vae: wan_vae.WanVAE, vae_cfg: WanVAEConfig, latents: jax.Array) -> jax.Array:
    """The diffusion model's latents -> video (B, F, H, W, 3) in [-1, 1], float32."""
    return vae.decode(wan_vae.denormalize_latents(latents, vae_cfg))


def sample_latents(transformer: WanEditTransformer, source: jax.Array, text: jax.Array,
                   negative_text: jax.Array | None, noise: jax.Array, settings: WanEditSettings) -> jax.Array:
    """Denoises `noise` (B, f, h, w, C) into edited latents, guided by the source latents and the text
    (B, L, D); `negative_text` (1 or B, L, D) is Lucy's encoded negative prompt (None: InsViE's zero text)."""
    plan = flow.make_plan(settings.sampler, settings.steps, settings.shift)
    if settings.guidance == "lucy":
        source2, text2 = flow_guidance.two_way_inputs(source, text, negative_text)

        def velocity(x, t):
            return flow_guidance.two_way_velocity(transformer, x, source2, text2, t, settings.text_scale)
    else:
        source3, text3 = flow_guidance.three_way_inputs(source, text, negative_text)

        def velocity(x, t):
            return flow_guidance.three_way_velocity(transformer, x, source3, text3, t, settings.text_scale,
                                                    settings.source_scale)

    return flow.sample(velocity, noise.astype(jnp.float32), plan)


def noise_like(key: jax.Array, source: jax.Array, channels: int) -> jax.Array:
    """N(0, I) latents of the source latents' grid with the transformer's output channels."""
    return jax.random.normal(key, (*source.shape[:-1], channels), jnp.float32)


def edit(transformer: WanEditTransformer, vae: wan_vae.WanVAE, vae_cfg: WanVAEConfig, video: jax.Array,
         text: jax.Array, negative_text: jax.Array | None, settings: WanEditSettings, *, noise: jax.Array | None = None,
         key: jax.Array | None = None) -> jax.Array:
    """The whole edit (module docstring), starting from `noise` (B, f, h, w, C) or from noise drawn with `key`."""
    if (noise is None) == (key is None):
        raise ValueError("a Wan edit needs exactly one of `noise` (the starting latents) or `key` (to draw them)")
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"source video {tuple(video.shape)}: expected (batch, frames, height, width, 3) in [-1, 1]")
    if text.shape[-1] != transformer.cfg.text_embed_dim:
        raise ValueError(f"text embeddings {tuple(text.shape)} are {text.shape[-1]} wide but the Wan model takes "
                         f"{transformer.cfg.text_embed_dim} (model.text_embed_dim = text_encoder.d_model)")
    source = encode_source(vae, vae_cfg, video)
    if noise is None:
        noise = noise_like(key, source, transformer.cfg.out_channels)
    if noise.shape[:-1] != source.shape[:-1]:
        raise ValueError(f"noise {tuple(noise.shape)} does not fit the source latents {tuple(source.shape)}: "
                         "it needs the same (batch, frames, height, width)")
    latents = sample_latents(transformer, source, text, negative_text, noise, settings)
    return decode_latents(vae, vae_cfg, latents)


def jit_edit(vae_cfg: WanVAEConfig, settings: WanEditSettings):
    """`edit` compiled once for these settings: `fn(transformer, vae, video, text, negative_text, noise=, key=)`."""

    @nnx.jit
    def run(transformer, vae, video, text, negative_text, noise=None, key=None):
        return edit(transformer, vae, vae_cfg, video, text, negative_text, settings, noise=noise, key=key)

    return run
