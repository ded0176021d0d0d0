"""Timestep and position embeddings of CogVideoX, computed as the reference computes them.

Position tables are built on the host in numpy (they depend on shapes only), with the reference's
precision choices: grid positions in float32, frequencies in float64 for sin-cos, float32 for RoPE.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def timestep_embedding(timesteps: jnp.ndarray, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0):
    """Sinusoid of the (float) DDPM index, built in float32 as the reference does: (B,) -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    return emb


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(positions.astype(np.float64).reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_3d(
    hidden: int, frames: int, grid_h: int, grid_w: int, spatial_scale: float, temporal_scale: float
) -> jnp.ndarray:
    """3D sin-cos table (frames*grid_h*grid_w, hidden) in float32: [temporal D/4 | spatial-w 3D/8 | spatial-h 3D/8]."""
    spatial_dim, temporal_dim = 3 * hidden // 4, hidden // 4
    pos_h = np.arange(grid_h, dtype=np.float32) / np.float32(spatial_scale)
    pos_w = np.arange(grid_w, dtype=np.float32) / np.float32(spatial_scale)
    ww, hh = np.meshgrid(pos_w, pos_h, indexing="xy")  # (grid_h, grid_w) each
    spatial = np.concatenate([_sincos_1d(spatial_dim // 2, ww), _sincos_1d(spatial_dim // 2, hh)], axis=1)
    pos_t = np.arange(frames, dtype=np.float32) / np.float32(temporal_scale)
    temporal = _sincos_1d(temporal_dim, pos_t)
    # Assembled by broadcasting two small host tables in the graph: a full-size (17 550 x 1920) constant
    # would bloat the compiled program.
    n = grid_h * grid_w
    temporal = jnp.broadcast_to(jnp.asarray(temporal, jnp.float32)[:, None, :], (frames, n, temporal_dim))
    spatial = jnp.broadcast_to(jnp.asarray(spatial, jnp.float32)[None, :, :], (frames, n, spatial_dim))
    return jnp.concatenate([temporal, spatial], axis=-1).reshape(frames * n, hidden)


def _crop_region(grid_h: int, grid_w: int, base_h: int, base_w: int):
    """The pipeline's resize-crop region of the (grid_h, grid_w) grid inside the base grid."""
    if grid_h / grid_w > base_h / base_w:
        resize_h, resize_w = base_h, int(round(base_h / grid_h * grid_w))
    else:
        resize_w, resize_h = base_w, int(round(base_w / grid_w * grid_h))
    top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def _rope_1d(dim: int, positions: np.ndarray, theta: float):
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    angles = np.outer(positions.astype(np.float32), freqs.astype(np.float32)).astype(np.float32)
    return np.repeat(np.cos(angles), 2, axis=1), np.repeat(np.sin(angles), 2, axis=1)


def rope_3d(head_dim: int, frames: int, grid_h: int, grid_w: int, base_h: int, base_w: int, theta: float):
    """3D RoPE (cos, sin), each (frames*grid_h*grid_w, head_dim), as CogVideoX-5B's pipeline builds it."""
    (top, left), (bottom, right) = _crop_region(grid_h, grid_w, base_h, base_w)
    pos_h = np.linspace(top, bottom * (grid_h - 1) / grid_h, grid_h, dtype=np.float32)
    pos_w = np.linspace(left, right * (grid_w - 1) / grid_w, grid_w, dtype=np.float32)
    pos_t = np.linspace(0, frames * (frames - 1) / frames, frames, dtype=np.float32)
    dim_t, dim_hw = head_dim // 4, head_dim // 8 * 3
    parts = [_rope_1d(dim_t, pos_t, theta), _rope_1d(dim_hw, pos_h, theta), _rope_1d(dim_hw, pos_w, theta)]
    shape = (frames, grid_h, grid_w)
    out = []
    for k in range(2):  # cos, then sin
        t, h, w = (jnp.asarray(p[k]) for p in parts)
        grid = jnp.concatenate(
            [
                jnp.broadcast_to(t[:, None, None, :], (*shape, dim_t)),
                jnp.broadcast_to(h[None, :, None, :], (*shape, dim_hw)),
                jnp.broadcast_to(w[None, None, :, :], (*shape, dim_hw)),
            ],
            axis=-1,
        )
        out.append(grid.reshape(frames * grid_h * grid_w, -1))
    return out[0], out[1]


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates adjacent (real, imag) pairs of x (B, L, H, D) by the per-token angles (L, D), in float32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = x.astype(jnp.float32) * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
