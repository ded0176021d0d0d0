"""One training step of the edit model on latents: the InsViE objective, optax update, all in one jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from insvie_jax.config import Config
from insvie_jax.diffusion import loss as losslib
from insvie_jax.diffusion import schedule


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    t = cfg.train
    lr = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.warmup_steps, 1), max(t.steps, t.warmup_steps + 1))
    return optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(lr, b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay),
    )


def make_train_step(cfg: Config, graphdef, optimizer: optax.GradientTransformation):
    """Returns a jitted `step(params, opt_state, batch, key) -> (params, opt_state, metrics)`."""
    a_table = jnp.asarray(schedule.sqrt_alphas(cfg.diffusion), jnp.float32)
    t = cfg.train
    num_t = cfg.diffusion.num_train_timesteps

    def loss_fn(params, batch, key):
        k_t, k_noise, k_text, k_src = jax.random.split(key, 4)
        b = batch["target"].shape[0]
        timesteps = jax.random.randint(k_t, (b,), 0, num_t)
        a = a_table[timesteps]
        noise = jax.random.normal(k_noise, batch["target"].shape, jnp.float32)
        noisy = losslib.add_noise(batch["target"], noise, a)
        keep_text = jax.random.bernoulli(k_text, 1 - t.text_dropout, (b, 1, 1))
        text = batch["text"] * keep_text  # dropped text is an all-zero embedding, as InsViE trains it
        keep_source = jax.random.bernoulli(k_src, 1 - t.source_dropout)  # one draw per batch (InsViE)
        source = batch["source"] * keep_source
        model = nnx.merge(graphdef, params)
        v_pred = model(noisy, source, text, timesteps.astype(jnp.float32))
        per_sample = losslib.edit_loss(v_pred, losslib.v_target(batch["target"], noise, a), t.frame_loss_weight)
        return per_sample.mean()

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return step


def step_key(seed: int, step: int) -> jax.Array:
    """The step's random key derives from (seed, step) only, so a resumed run draws the same numbers."""
    return jax.random.fold_in(jax.random.key(seed), np.uint32(step))
