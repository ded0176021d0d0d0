"""The pieces fit for training: the tiny Wan preset fits one fixed noisy edit triplet with the flow objective
(a shifted σ draw, velocity target, InsViE's frame-weighted loss) under remat, in a jitted AdamW step."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from insvie_jax.diffusion import flow
from insvie_jax.diffusion.loss import edit_loss
from insvie_jax.models.wan import transformer as wan
from insvie_jax.models.wan.config import PRESETS

STEPS = 30


def test_tiny_wan_fits_one_triplet():
    cfg = dataclasses.replace(PRESETS["tiny-wan"], remat_policy="full")
    model = wan.build(cfg, seed=0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    source = jnp.asarray(rng.standard_normal((2, 2, 4, 6, cfg.in_channels)), jnp.float32)
    target = jnp.roll(source, 1, axis=3) * 0.5  # the "edit": a shifted, dimmed source
    text = jnp.asarray(rng.standard_normal((2, cfg.text_length, cfg.text_embed_dim)), jnp.float32)
    optimizer = optax.adamw(3e-3)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, key):
        noise_key, sigma_key = jax.random.split(key)
        noise = jax.random.normal(noise_key, target.shape)
        sigma, timestep = flow.sample_sigmas(sigma_key, 2, shift=5.0)
        noisy = flow.add_noise(target, noise, sigma)

        def loss_fn(params):
            v = nnx.merge(graphdef, params, rest)(noisy, source, text, timestep)
            return edit_loss(v, flow.velocity_target(target, noise)).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for step in range(STEPS):
        # one fixed (noise, σ) draw: the step must drive the loss of that one point down
        params, opt_state, loss = train_step(params, opt_state, jax.random.key(7))
        losses.append(float(loss))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.3 * losses[0], losses
