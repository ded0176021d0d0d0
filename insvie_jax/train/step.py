"""One sharded training step of the edit model on latents: the InsViE objective and the optax update in one jit.

The step takes `TrainState.variables` (train/state.py: params, opt_state, ema, skip counters; donated) and the
frozen parameters beside them, read-only (no gradient is taken for them), and returns the new variables. It
reads no files: the state is built and restored elsewhere.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from insvie_jax.config import Config
from insvie_jax.diffusion import loss as losslib
from insvie_jax.diffusion import objective
from insvie_jax.parallel import sharding as shardlib
from insvie_jax.train.state import TrainState

# ---------------------------------------------------------------------------------------------------
# Optimizer


def lr_schedule(cfg: Config) -> optax.Schedule:
    """Linear warmup from 0 over train.warmup_steps updates (none if 0), then cosine decay to 0 at the last
    update, or constant. Counted in optimizer updates (steps / grad_accum)."""
    t = cfg.train
    updates = max(t.steps // t.grad_accum, 1)
    if t.schedule == "constant":
        after = optax.constant_schedule(t.lr)
    else:
        after = optax.cosine_decay_schedule(t.lr, max(updates - t.warmup_steps, 1))
    if t.warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps), after], [t.warmup_steps])


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    """AdamW after global-norm clipping; with train.grad_accum > 1 the update comes every grad_accum steps."""
    t = cfg.train
    opt = optax.chain(
        optax.clip_by_global_norm(t.grad_clip),
        optax.adamw(lr_schedule(cfg), b1=t.adam_b1, b2=t.adam_b2, eps=t.adam_eps, weight_decay=t.weight_decay),
    )
    if t.grad_accum > 1:
        return optax.MultiSteps(opt, every_k_schedule=t.grad_accum).gradient_transformation()
    return opt


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ---------------------------------------------------------------------------------------------------
# The step


def stratified_timesteps(key, batch: int, groups: int, num_t: int) -> jax.Array:
    """DDPM indices, uniform within each data-parallel group's share of [0, num_t) (SAT `DiscreteSampling`
    with uniform_sampling): with W groups, the rows of group r draw t in [r·num_t/W, (r+1)·num_t/W)."""
    group = jnp.arange(batch) * groups // batch  # rows are split over the groups in contiguous chunks
    lo, hi = group * num_t // groups, (group + 1) * num_t // groups
    u = jax.random.uniform(key, (batch,))
    return jnp.minimum(lo + jnp.floor(u * (hi - lo)).astype(jnp.int32), hi - 1)


def step_key(seed: int, step) -> jax.Array:
    """The step's random key derives from (seed, step) only, so a resumed run draws the same numbers."""
    return jax.random.fold_in(jax.random.key(seed), jnp.asarray(step, jnp.uint32))


def make_loss_fn(cfg: Config, graphdef, timestep_groups: int = 1):
    """loss(params, frozen, batch, key) -> mean InsViE loss, with conditioning dropout."""
    t = cfg.train
    num_t = cfg.diffusion.num_train_timesteps

    def loss_fn(params, frozen, batch, key):
        k_t, k_noise, k_text, k_src = jax.random.split(key, 4)
        target = batch["target"]
        b = target.shape[0]
        index = stratified_timesteps(k_t, b, timestep_groups, num_t)
        noise = jax.random.normal(k_noise, target.shape, jnp.float32)
        noisy, timestep, goal = objective.noised(cfg.diffusion, target, noise, index)  # v or flow
        keep_text = jax.random.bernoulli(k_text, 1 - t.text_dropout, (b, 1, 1))
        text = batch["text"] * keep_text  # dropped text is an all-zero embedding, as InsViE trains it
        src_shape = () if t.source_dropout_per == "batch" else (b, 1, 1, 1, 1)  # InsViE: one draw per batch
        source = batch["source"] * jax.random.bernoulli(k_src, 1 - t.source_dropout, src_shape)
        model = nnx.merge(graphdef, params, frozen)
        prediction = model(noisy, source, text, timestep)
        weights = (losslib.edit_region_weights(batch["source"], target, t.edit_region_weight)
                   if t.edit_region_weight else None)
        per_sample = losslib.edit_loss(prediction, goal, t.frame_loss_weight, weights)
        return per_sample.mean()

    return loss_fn


def make_train_step(cfg: Config, state: TrainState, optimizer, mesh: Mesh, timestep_groups: int = 1,
                    first_step: int = 0):
    """`step(variables, frozen, batch, step) -> (variables, metrics)`: one jit over `state`'s arrays (its graphdef
    and shardings), variables donated.

    Inputs and outputs carry explicit shardings (batch split over the `batch` rule's axes), activations are
    constrained by the logical rules. `timestep_groups`: see `stratified_timesteps` (the data-parallel size).
    `first_step`: the global step the stage starts at (its learning-rate schedule counts from there).
    A non-finite loss or gradient leaves params, optimizer state and EMA unchanged and counts the step.
    """
    loss_fn = make_loss_fn(cfg, state.graphdef, timestep_groups)
    lr = lr_schedule(cfg)
    t = cfg.train
    accumulating = t.grad_accum > 1

    def step(state, frozen, batch, step_index):
        key = step_key(t.seed, step_index)
        with shardlib.logical_rules(mesh, cfg.mesh.logical_axis_rules):
            loss, grads = jax.value_and_grad(loss_fn)(state["params"], frozen, batch, key)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new = dict(state)
        new["params"] = keep_if_finite(params, state["params"])
        new["opt_state"] = keep_if_finite(opt_state, state["opt_state"])
        if "ema" in state:
            # The EMA follows optimizer updates: with accumulation, only the steps that applied one.
            updated = finite & (opt_state.mini_step == 0 if accumulating else True)  # MultiStepsState
            decay = jnp.where(updated, t.ema_decay, 1.0)
            new["ema"] = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, state["ema"], new["params"])
        new["skipped"] = state["skipped"] + (~finite).astype(jnp.int32)
        new["nonfinite_in_a_row"] = jnp.where(finite, 0, state["nonfinite_in_a_row"] + 1)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr((step_index - first_step) // t.grad_accum),
                   "skipped_steps": new["skipped"], "nonfinite_in_a_row": new["nonfinite_in_a_row"]}
        return new, metrics

    return jax.jit(step, in_shardings=(state.shardings, state.frozen_shardings, batch_shardings(cfg, mesh),
                                       _replicated(mesh)),
                   out_shardings=(state.shardings, _replicated(mesh)), donate_argnums=(0,))


def batch_shardings(cfg: Config, mesh: Mesh) -> dict[str, NamedSharding]:
    rules = cfg.mesh.logical_axis_rules
    return {"source": shardlib.batch_sharding(mesh, rules, 5), "target": shardlib.batch_sharding(mesh, rules, 5),
            "text": shardlib.batch_sharding(mesh, rules, 3)}


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, Any]:
    """The global host batch as sharded arrays; each process fills only its addressable shards."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in batch.items()}
