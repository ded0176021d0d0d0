"""The sampling loop: one jitted `lax.scan` over a sampler plan, 3-way guidance batched in each model call.

`sample(model, source_latents, text_emb, key, sample_cfg, diffusion_cfg)` returns the edited latents
(B, f, h, w, C) in the model's latent space: source latents go in already multiplied by the VAE scaling
factor, and the result is divided by it before decoding (by the caller). `denoise_fn` is either an NNX module called as
`model(noisy, source, text, t) -> v` (its state is passed into the jitted function, not baked in as
constants, and one compiled loop is reused for every call with the same shapes) or any pure function with
that signature. Progress goes to a tqdm bar through host callbacks.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from tqdm.auto import tqdm

from insvie_jax.config import DiffusionConfig, SampleConfig
from insvie_jax.diffusion import guidance, samplers


def initial_noise(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """x at the first step: N(0, I), no extra scaling (both references)."""
    return jax.random.normal(jax.random.fold_in(key, 0), shape, dtype)


def step_noise(key: jax.Array, index, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """The fresh noise of step `index` (SDE samplers)."""
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), index), shape, dtype)


def plan_rows(sample_cfg: SampleConfig, diffusion_cfg: DiffusionConfig, sampler: str | None = None) -> tuple:
    """(plan, rows): the sampler plan and its rows with the guidance scales, as float32 device arrays."""
    plan = samplers.make_plan(sampler or sample_cfg.sampler, sample_cfg.steps, diffusion_cfg)
    text_scales, source_scales = guidance.guidance_scales(
        sample_cfg.guidance_schedule, plan.timestep, sample_cfg.text_scale, sample_cfg.source_scale,
        sample_cfg.guidance_exponent)
    rows = plan.arrays()
    rows["text_scale"] = jnp.asarray(text_scales, jnp.float32)
    rows["source_scale"] = jnp.asarray(source_scales, jnp.float32)
    rows["index"] = jnp.arange(plan.num_steps, dtype=jnp.int32)
    return plan, rows


def sample(denoise_fn: Callable, source_latents: jax.Array, text_emb: jax.Array, key: jax.Array,
           sample_cfg: SampleConfig, diffusion_cfg: DiffusionConfig, sampler: str | None = None, *,
           progress: bool = True, return_trajectory: bool = False):
    """Edited latents (B, f, h, w, C) float32; with `return_trajectory`, also every step's x (num_steps, B, ...)."""
    plan, rows = plan_rows(sample_cfg, diffusion_cfg, sampler)
    if isinstance(denoise_fn, nnx.Module):
        graphdef, state = nnx.split(denoise_fn)
        model = _ModuleCall(graphdef)
    else:
        model, state = _PureCall(denoise_fn), None
    x, trajectory = _run(model, state, source_latents.astype(jnp.float32), text_emb, key, rows,
                         stochastic=plan.stochastic, progress=progress, trajectory=return_trajectory)
    return (x, trajectory) if return_trajectory else x


class _ModuleCall:
    """Hashable static stand-in for an NNX module: equal graphdefs share one compiled loop.

    Hashed by the graphdef's text, since a graphdef holding a plain (unfrozen) config dataclass is unhashable.
    """

    def __init__(self, graphdef):
        self.graphdef = graphdef
        self._hash = hash(repr(graphdef))

    def __call__(self, state, *args):
        return nnx.merge(self.graphdef, state)(*args)

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _ModuleCall) and self.graphdef == other.graphdef


class _PureCall:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, state, *args):
        return self.fn(*args)

    def __hash__(self):
        return hash(self.fn)

    def __eq__(self, other):
        return isinstance(other, _PureCall) and self.fn == other.fn


@functools.partial(jax.jit, static_argnames=("model", "stochastic", "progress", "trajectory"))
def _run(model, state, source, text, key, rows, *, stochastic: bool, progress: bool, trajectory: bool):
    num_steps = rows["index"].shape[0]
    x = initial_noise(key, source.shape)
    source3, text3 = guidance.branch_inputs(source, text)
    denoise = functools.partial(model, state)

    def body(carry, row):
        x, prev_x0 = carry
        x0 = guidance.guided_x0(denoise, x, source3, text3, row["timestep"], row["c_skip"], row["c_out"],
                                row["text_scale"], row["source_scale"])
        noise = step_noise(key, row["index"], x.shape) if stochastic else None
        x_next = samplers.step(row, x, x0, prev_x0, noise)
        if progress:
            jax.debug.callback(_progress_tick, row["index"], num_steps, ordered=True)
        return (x_next, x0), (x_next if trajectory else None)

    (x, _), states = jax.lax.scan(body, (x, jnp.zeros_like(x)), rows)
    return x, states


_bar: list = []  # the open progress bar, if any (host side; callbacks arrive in step order)


def _progress_tick(index, total) -> None:
    index, total = int(index), int(total)
    if index == 0:
        while _bar:
            _bar.pop().close()
        _bar.append(tqdm(total=total, desc="sampling", unit="step"))
    if _bar:
        _bar[0].update(1)
        if index == total - 1:
            _bar.pop().close()
