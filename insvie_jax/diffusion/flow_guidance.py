"""Classifier-free guidance on flow (velocity) predictions, each one batched model call per step.

- 2-way (Lucy-Edit, diffusers' `LucyEditPipeline`): branches [negative text | text], the source latents in
  both; v = v_u + s·(v_c − v_u).
- 3-way (InsViE): branches uu = (negative text, zero source), cu = (negative text, source), cc = (text, source);
  v = v_uu + s_src·(v_cu − v_uu) + s_txt·(v_cc − v_cu). The weights sum to one, so combining velocities equals
  combining the x0 predictions x − σ·v (InsViE combines x0) at the same x.
The negative text is Wan's encoded empty (or negative) prompt; InsViE's zero text embedding is the default.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

from insvie_jax.diffusion import guidance


def two_way_inputs(source: jnp.ndarray, text: jnp.ndarray, negative_text: jnp.ndarray | None = None):
    """(source2, text2) stacked [uncond | cond] on the batch axis; built once per sampling run."""
    negative = jnp.zeros_like(text) if negative_text is None else jnp.broadcast_to(negative_text, text.shape)
    return jnp.concatenate([source, source], axis=0), jnp.concatenate([negative, text], axis=0)


def three_way_inputs(source: jnp.ndarray, text: jnp.ndarray, negative_text: jnp.ndarray | None = None):
    """(source3, text3) stacked [uu | cu | cc] on the batch axis; built once per sampling run."""
    source3, text3 = guidance.branch_inputs(source, text)
    if negative_text is not None:
        negative = jnp.broadcast_to(negative_text, text.shape)
        text3 = jnp.concatenate([negative, negative, text], axis=0)
    return source3, text3


def _timesteps(timestep, n: int) -> jnp.ndarray:
    return jnp.full((n,), timestep, jnp.float32)


def two_way_velocity(model_fn: Callable, x: jnp.ndarray, source2: jnp.ndarray, text2: jnp.ndarray, timestep,
                     text_scale) -> jnp.ndarray:
    """Guided velocity from ONE call of `model_fn(noisy, source, text, t) -> v` on 2·B samples."""
    b = x.shape[0]
    v = model_fn(jnp.concatenate([x, x], axis=0), source2, text2, _timesteps(timestep, 2 * b)).astype(x.dtype)
    return v[:b] + text_scale * (v[b:] - v[:b])


def three_way_velocity(model_fn: Callable, x: jnp.ndarray, source3: jnp.ndarray, text3: jnp.ndarray, timestep,
                       text_scale, source_scale) -> jnp.ndarray:
    """Guided velocity from ONE call of `model_fn(noisy, source, text, t) -> v` on 3·B samples."""
    b = x.shape[0]
    v = model_fn(jnp.concatenate([x, x, x], axis=0), source3, text3, _timesteps(timestep, 3 * b)).astype(x.dtype)
    return guidance.combine(v[:b], v[b:2 * b], v[2 * b:], text_scale, source_scale)
