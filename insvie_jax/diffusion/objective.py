"""The training objective of `diffusion.objective`: from clean latents, noise and a drawn training-table index,
what the model sees (noisy latents, its timestep) and what it must predict.

- v (CogVideoX, InsViE): DDPM. a = sqrt(ᾱ_t) of index t, x_t = a·x0 + sqrt(1 − a²)·ε, target the velocity
  v = a·ε − sqrt(1 − a²)·x0; the model's timestep is t.
- flow (Wan): rectified flow. σ = the index's entry of the shifted training table (diffusers'
  FlowMatchEulerDiscreteScheduler with `flow_shift`, noisiest first), x_σ = (1 − σ)·x0 + σ·ε, target ε − x0; the
  model's timestep is 1000·σ, one per sample (Wan TI2V's per-token timesteps are all equal in an edit: no frame
  is a clean conditioning frame).

Either way the index is uniform over the table (train/step.py stratifies it over data-parallel groups), and the
loss is InsViE's frame-weighted MSE of prediction against target (diffusion/loss.py).
"""

from __future__ import annotations

import jax.numpy as jnp

from insvie_jax.config import DiffusionConfig
from insvie_jax.diffusion import flow, schedule
from insvie_jax.diffusion import loss as losslib


def noised(cfg: DiffusionConfig, x0: jnp.ndarray, noise: jnp.ndarray, index: jnp.ndarray):
    """(noisy latents, model timestep (B,) float32, target) for clean `x0`, `noise` of its shape and
    training-table indices `index` (B,) in [0, num_train_timesteps)."""
    if cfg.objective == "flow":
        sigma = jnp.asarray(flow.training_sigmas(cfg.flow_shift, cfg.num_train_timesteps))[index]
        return (flow.add_noise(x0, noise, sigma), sigma * cfg.num_train_timesteps,
                flow.velocity_target(x0, noise))
    a = jnp.asarray(schedule.sqrt_alphas(cfg), jnp.float32)[index]
    return losslib.add_noise(x0, noise, a), index.astype(jnp.float32), losslib.v_target(x0, noise, a)
