"""InsViE's objective: v-prediction MSE, half uniform, half weighted towards early latent frames (reference §3)."""

from __future__ import annotations

import jax.numpy as jnp


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """x_t = a·x0 + sqrt(1 − a²)·ε, with a per sample (B,)."""
    a = a.reshape(-1, *([1] * (x0.ndim - 1)))
    return a * x0 + jnp.sqrt(1 - a * a) * noise


def v_target(x0: jnp.ndarray, noise: jnp.ndarray, a: jnp.ndarray) -> jnp.ndarray:
    """v = a·ε − sqrt(1 − a²)·x0, so that x0 = a·x_t − sqrt(1 − a²)·v."""
    a = a.reshape(-1, *([1] * (x0.ndim - 1)))
    return a * noise - jnp.sqrt(1 - a * a) * x0


def edit_loss(v_pred: jnp.ndarray, v: jnp.ndarray, frame_loss_weight: float = 0.5,
              weights: jnp.ndarray | None = None) -> jnp.ndarray:
    """Per-sample loss (B,): (1−f)·mean(err²) + f·(1/T)·Σ_i (1 − i/T)²·mean_frame_i(err²), in float32.

    err² here is |v̂ − v|², which equals the reference's w·|x̂0 − x0|² with w = 1/(1 − a²); `weights`
    (broadcast to it, e.g. `edit_region_weights`) scale it per element.
    """
    err = jnp.square(v_pred.astype(jnp.float32) - v.astype(jnp.float32))
    if weights is not None:
        err = err * weights
    per_frame = err.mean(axis=(2, 3, 4))  # (B, T)
    frames = per_frame.shape[1]
    weights = (1 - jnp.arange(frames, dtype=jnp.float32) / frames) ** 2
    framed = (per_frame * weights).sum(axis=1) / frames
    return (1 - frame_loss_weight) * per_frame.mean(axis=1) + frame_loss_weight * framed


def edit_region_weights(source: jnp.ndarray, target: jnp.ndarray, weight: float) -> jnp.ndarray:
    """(B, f, h, w, 1): 1 + `weight` on the latent cells the edit changes (squared source→target change above a
    quarter of the sample's largest), 1 elsewhere. A small shape's edit covers a few cells of the clip, so
    without it the loss is mostly the copying of what stays (not in InsViE; for small models and data)."""
    change = jnp.mean(jnp.square(target.astype(jnp.float32) - source.astype(jnp.float32)), axis=-1, keepdims=True)
    largest = jnp.max(change, axis=(1, 2, 3, 4), keepdims=True)
    return 1 + weight * (change > 0.25 * largest).astype(jnp.float32)
