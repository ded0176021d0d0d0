"""Latents between the VAE and the diffusion model, for either family: the one place they are scaled.

- CogVideoX: the model's latents are the VAE's x `scaling_factor` (vae.scaling_factor, or a checkpoint's own).
- Wan2.2: (z - latents_mean) / latents_std per channel (diffusers' Wan pipelines), the stats of the WanVAEConfig.

Applied where latents enter the diffusion model (a posterior sample of training data, an edit's encoded source)
and, inverted, where they leave it (before decoding). numpy in, numpy out (the data pipeline's workers import no
JAX); JAX arrays work too.
"""

from __future__ import annotations

import numpy as np

from insvie_jax.config import VAEConfig, WanVAEConfig


def to_model(vae_cfg: VAEConfig | WanVAEConfig, latents, scaling_factor: float | None = None):
    """VAE latents (..., C) -> the diffusion model's, float32."""
    latents = latents.astype(np.float32)
    if isinstance(vae_cfg, WanVAEConfig):
        return (latents - np.asarray(vae_cfg.latents_mean, np.float32)) / np.asarray(vae_cfg.latents_std, np.float32)
    return latents * np.float32(vae_cfg.scaling_factor if scaling_factor is None else scaling_factor)


def from_model(vae_cfg: VAEConfig | WanVAEConfig, latents, scaling_factor: float | None = None):
    """The inverse of `to_model`: the diffusion model's latents -> the VAE's, float32."""
    latents = latents.astype(np.float32)
    if isinstance(vae_cfg, WanVAEConfig):
        return latents * np.asarray(vae_cfg.latents_std, np.float32) + np.asarray(vae_cfg.latents_mean, np.float32)
    return latents / np.float32(vae_cfg.scaling_factor if scaling_factor is None else scaling_factor)
