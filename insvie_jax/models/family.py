"""The models of `model.family`: one place that builds, sizes and counts either family's edit transformer, builds
its VAE and text encoder and runs the text encoder as the family does, so that train, compile, bench, metrics,
encode and edit take a config and need not know which backbone it names.

- cogvideox: models/transformer.py `EditTransformer` (source latents through `proj_edit`), the CogVideoX VAE,
  T5 v1.1 run without an attention mask (as CogVideoX).
- wan: models/wan/transformer.py `WanEditTransformer` (Wan2.2, Lucy-Edit layout: source concatenated on channels),
  the Wan2.2 VAE, UMT5 with the padding mask and zero states past each prompt (as Wan's pipelines).
How latents move between the VAE and the diffusion model (scaling factor / Wan's per-channel statistics):
models/latents.py.

Both are called `model(noisy, source, text, timestep) -> prediction` on channels-last latents (B, F, H, W, C);
their latents' shape for a config is `config.latent_shape` (CogVideoX's VAE 8x in space, Wan2.2's 16x; both 4x
in time).
"""

from __future__ import annotations

from types import ModuleType

import jax.numpy as jnp
from flax import nnx

from insvie_jax.config import ModelConfig, TextEncoderConfig, VAEConfig, WanModelConfig, WanVAEConfig
from insvie_jax.models import params as paramslib
from insvie_jax.models import t5, umt5
from insvie_jax.models import transformer as cogvideox
from insvie_jax.models import vae as cogvideox_vae
from insvie_jax.models.wan import transformer as wan
from insvie_jax.models.wan import vae as wan_vae

_MODULES = {"cogvideox": cogvideox, "wan": wan}


def module(model_cfg: ModelConfig | WanModelConfig) -> ModuleType:
    """The family's transformer module (`build`, `abstract`, `forward_flops`, `init_edit_from_t2v`)."""
    return _MODULES[model_cfg.family]


def build(model_cfg: ModelConfig | WanModelConfig, seed: int = 0) -> nnx.Module:
    """The edit transformer of the config's `model` section, randomly initialised from `seed`."""
    return module(model_cfg).build(model_cfg, seed=seed)


def abstract(model_cfg: ModelConfig | WanModelConfig) -> nnx.Module:
    """The model with shapes only (no memory): for parameter counts and sharding plans."""
    return module(model_cfg).abstract(model_cfg)


def count_params(model_cfg: ModelConfig | WanModelConfig) -> int:
    return paramslib.count_params(abstract(model_cfg))


def forward_flops(model_cfg: ModelConfig | WanModelConfig, frames: int, height: int, width: int) -> float:
    """Model FLOPs of one forward pass of one sample on latents (frames, height, width); a train step is 3x."""
    return module(model_cfg).forward_flops(model_cfg, frames, height, width)



# ---------------------------------------------------------------------------------------------------
# The frozen encoders


def build_vae(vae_cfg: VAEConfig | WanVAEConfig, seed: int = 0) -> nnx.Module:
    """The family's VAE (the vae section's class says which) with random weights: a stand-in without vae.path."""
    return (wan_vae if isinstance(vae_cfg, WanVAEConfig) else cogvideox_vae).build(vae_cfg, seed=seed)


def build_text_encoder(text_cfg: TextEncoderConfig, seed: int = 0) -> nnx.Module:
    """T5 v1.1 or UMT5 (text_encoder.family) with random weights: a stand-in without text_encoder.path."""
    return (umt5 if text_cfg.family == "umt5" else t5).build(text_cfg, seed=seed)


def text_states(text_cfg: TextEncoderConfig, encoder: nnx.Module, ids, mask) -> jnp.ndarray:
    """Token ids and padding mask (`t5.tokenize`) -> the prompt embeddings the family's transformer reads: T5
    without a mask (CogVideoX attends to the pads), UMT5 masked with zeros past each prompt (Wan)."""
    if text_cfg.family == "umt5":
        return umt5.prompt_states(encoder, ids, mask)
    return encoder(ids)
