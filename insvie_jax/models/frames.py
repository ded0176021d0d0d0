"""Causal passes over a clip in frame batches, shared by both VAEs (CogVideoX's and Wan's): each family decides
only how many frames its first pass takes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def scan_frame_batches(module: nnx.Module, x, first: int, batch: int):
    """`module(x, cache) -> (y, cache)` over x (B, F, ...): one pass over the first `first` frames, then `batch`
    frames at a time, each pass continuing from the previous one's convolution caches; (F - first) must be a
    multiple of `batch`. The equal-sized later passes run as one `lax.scan` (one compiled pass whatever the clip
    length)."""
    out, cache = module(x[:, :first])
    rest = x[:, first:]
    if rest.shape[1] == 0:
        return out
    chunks = jnp.swapaxes(rest.reshape(rest.shape[0], rest.shape[1] // batch, batch, *rest.shape[2:]), 0, 1)
    graphdef, state = nnx.split(module)

    def step(cache, chunk):
        y, cache = nnx.merge(graphdef, state)(chunk, cache)
        return cache, y

    _, ys = jax.lax.scan(step, cache, chunks)
    ys = jnp.swapaxes(ys, 0, 1)
    return jnp.concatenate([out, ys.reshape(ys.shape[0], -1, *ys.shape[3:]).astype(out.dtype)], axis=1)
