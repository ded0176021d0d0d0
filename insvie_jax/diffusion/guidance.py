"""InsViE's 3-way classifier-free guidance (reference §4, SAT `DynamicCFG_edit`).

One forward pass on a batch of three branches, each the whole input batch:
uu = (zero text, zero source), cu = (zero text, source), cc = (text, source); the noisy latents are the same
in all three. The guided x0 prediction is uu + s_src·(cu − uu) + s_txt·(cc − cu), combined on the x0
predictions (after c_skip/c_out), as the reference does.
"""

from __future__ import annotations

import math
from typing import Callable

import jax.numpy as jnp
import numpy as np

from insvie_jax import config as configlib
from insvie_jax.diffusion.samplers import to_x0

SCHEDULES = configlib.choices("sample.guidance_schedule")


def guidance_scales(schedule: str, timesteps: np.ndarray, text_scale: float, source_scale: float,
                    exponent: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (text, source) scales, float64 (num_steps,), for a sampler visiting `timesteps` (DDPM indices).

    `insvie`: s = 1 + S·(1 − cos(π·(k/n)^exponent))/2 with k = n − timestep, as SAT runs it: k is the DDPM index
      (999…19) subtracted from the step count, not the step index, so s jumps around in [1, 1 + S].
    `cosine`: the same formula on the step index k = 0…n−1 (rising from 1 towards 1 + S, as it was meant).
    `constant`: s = S.
    Computed with Python floats, as the reference does.
    """
    n = len(timesteps)
    if schedule == "constant":
        return np.full(n, float(text_scale)), np.full(n, float(source_scale))
    if schedule == "insvie":
        ks = [n - int(t) for t in timesteps]
    elif schedule == "cosine":
        ks = list(range(n))
    else:
        raise ValueError(f"unknown guidance schedule '{schedule}': expected one of {', '.join(SCHEDULES)} "
                         "(sample.guidance_schedule)")

    def scale(base: float, k: int) -> float:
        return 1 + base * (1 - math.cos(math.pi * (k / n) ** exponent)) / 2

    return (np.array([scale(text_scale, k) for k in ks], np.float64),
            np.array([scale(source_scale, k) for k in ks], np.float64))


def branch_inputs(source: jnp.ndarray, text: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Source latents and text embeddings of the three branches, stacked [uu | cu | cc] on the batch axis."""
    zero_source, zero_text = jnp.zeros_like(source), jnp.zeros_like(text)
    return (jnp.concatenate([zero_source, source, source], axis=0),
            jnp.concatenate([zero_text, zero_text, text], axis=0))


def combine(x0_uu: jnp.ndarray, x0_cu: jnp.ndarray, x0_cc: jnp.ndarray, text_scale, source_scale) -> jnp.ndarray:
    return x0_uu + source_scale * (x0_cu - x0_uu) + text_scale * (x0_cc - x0_cu)


def guided_x0(denoise_fn: Callable, x: jnp.ndarray, source3: jnp.ndarray, text3: jnp.ndarray, timestep,
              c_skip, c_out, text_scale, source_scale) -> jnp.ndarray:
    """The guided x0 prediction from ONE call of `denoise_fn(noisy, source, text, t) -> v` on 3·B samples.

    `source3`, `text3` come from `branch_inputs` (built once per sampling run, not per step).
    """
    b = x.shape[0]
    t = jnp.full((3 * b,), timestep, jnp.float32)
    v = denoise_fn(jnp.concatenate([x, x, x], axis=0), source3, text3, t)
    x0 = to_x0(jnp.concatenate([x, x, x], axis=0), v.astype(x.dtype), c_skip, c_out)
    return combine(x0[:b], x0[b:2 * b], x0[2 * b:], text_scale, source_scale)
