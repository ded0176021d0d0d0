"""One sharded training step of the edit model on latents: the InsViE objective and the optax update in one jit.

The train state is a dict of pure pytrees (nested dicts of arrays), which optax, orbax and jit all take
as they are:
  params            the trainable parameters (all of them, or the LoRA adapters + `lora.also_train`)
  opt_state         optax state of the trainable parameters only (frozen ones take no optimizer memory)
  ema               EMA of the trainable parameters (only when train.ema_decay > 0)
  skipped           steps skipped for a non-finite loss or gradient, in total
  nonfinite_in_a_row  ... and in a row up to now
Frozen parameters travel beside the state, read-only (no gradient is taken for them).
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
from insvie_jax.diffusion import schedule
from insvie_jax.models import lora as loralib
from insvie_jax.models import transformer
from insvie_jax.parallel import sharding as shardlib

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


# ---------------------------------------------------------------------------------------------------
# What trains


def trainable_filter(cfg: Config):
    """nnx filter of the trained parameters: all, or (LoRA) the adapters plus `lora.also_train` modules."""
    if not cfg.lora.enabled:
        return nnx.Param
    names = set(cfg.lora.also_train)

    def is_trainable(path, value):
        return loralib.is_lora_param(path, value) or (
            isinstance(value, nnx.Param) and any(str(p) in names for p in path))

    return is_trainable


def build_model(cfg: Config, load: bool = True) -> transformer.EditTransformer:
    """The model as trained: random init (seed) or `train.init_from` (unless not `load`: shapes only matter),
    plus LoRA adapters when enabled."""
    model = transformer.build(cfg.model, seed=cfg.train.seed)
    if cfg.train.init_from and load:
        from insvie_jax.convert.api import load_transformer
        from insvie_jax.models.params import flat_params, set_flat_params

        loaded, _ = load_transformer(cfg.train.init_from)
        set_flat_params(model, flat_params(loaded))
    if cfg.lora.enabled:
        loralib.add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.train.seed + 1)
    return model


def split_model(model, cfg: Config):
    """(graphdef, trainable, frozen): the parameters as pure dicts."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), nnx.Param)
    return graphdef, trainable.to_pure_dict(), frozen.to_pure_dict()


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def state_shardings(cfg: Config, mesh: Mesh, optimizer, abstract_model=None):
    """(graphdef, shardings of the train state, shardings of the frozen params) from the logical names."""
    abstract_model = abstract_model or nnx.eval_shape(lambda: build_model(cfg, load=False))
    rules = cfg.mesh.logical_axis_rules
    graphdef, trainable_abs, frozen_abs = nnx.split(abstract_model, trainable_filter(cfg), nnx.Param)
    params_sh = shardlib.state_shardings(trainable_abs, mesh, rules)
    frozen_sh = shardlib.state_shardings(frozen_abs, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, trainable_abs.to_pure_dict())
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, params_sh,
                                   transform_non_params=lambda _: _replicated(mesh))
    state_sh = {"params": params_sh, "opt_state": opt_sh, "skipped": _replicated(mesh),
                "nonfinite_in_a_row": _replicated(mesh)}
    if cfg.train.ema_decay > 0:
        state_sh["ema"] = params_sh
    return graphdef, state_sh, frozen_sh


def _initial_state(cfg: Config, optimizer, params, frozen):
    state = {"params": params, "opt_state": optimizer.init(params), "skipped": jnp.zeros((), jnp.int32),
             "nonfinite_in_a_row": jnp.zeros((), jnp.int32)}
    if cfg.train.ema_decay > 0:
        state["ema"] = jax.tree.map(jnp.copy, params)
    return state, frozen


def init_state(cfg: Config, mesh: Mesh, optimizer):
    """(graphdef, state, frozen, state shardings, frozen shardings), each array placed by its shardings.

    Random init is one jit with output shardings (no full copy on one device); `init_from` loads on the
    host and places the arrays."""
    graphdef, state_sh, frozen_sh = state_shardings(cfg, mesh, optimizer)
    init = jax.jit(lambda params, frozen: _initial_state(cfg, optimizer, params, frozen),
                   out_shardings=(state_sh, frozen_sh))
    if cfg.train.init_from:
        state, frozen = init(*split_model(build_model(cfg), cfg)[1:])
    else:
        state, frozen = jax.jit(lambda: _initial_state(cfg, optimizer, *split_model(build_model(cfg), cfg)[1:]),
                                out_shardings=(state_sh, frozen_sh))()
    return graphdef, state, frozen, state_sh, frozen_sh


def abstract_state(cfg: Config, optimizer):
    """(state, frozen) as ShapeDtypeStructs: the structure a checkpoint restores into."""
    return jax.eval_shape(
        lambda: _initial_state(cfg, optimizer, *split_model(build_model(cfg, load=False), cfg)[1:]))


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
    a_table = jnp.asarray(schedule.sqrt_alphas(cfg.diffusion), jnp.float32)
    t = cfg.train
    num_t = cfg.diffusion.num_train_timesteps

    def loss_fn(params, frozen, batch, key):
        k_t, k_noise, k_text, k_src = jax.random.split(key, 4)
        target = batch["target"]
        b = target.shape[0]
        timesteps = stratified_timesteps(k_t, b, timestep_groups, num_t)
        a = a_table[timesteps]
        noise = jax.random.normal(k_noise, target.shape, jnp.float32)
        noisy = losslib.add_noise(target, noise, a)
        keep_text = jax.random.bernoulli(k_text, 1 - t.text_dropout, (b, 1, 1))
        text = batch["text"] * keep_text  # dropped text is an all-zero embedding, as InsViE trains it
        src_shape = () if t.source_dropout_per == "batch" else (b, 1, 1, 1, 1)  # InsViE: one draw per batch
        source = batch["source"] * jax.random.bernoulli(k_src, 1 - t.source_dropout, src_shape)
        model = nnx.merge(graphdef, params, frozen)
        v_pred = model(noisy, source, text, timesteps.astype(jnp.float32))
        weights = (losslib.edit_region_weights(batch["source"], target, t.edit_region_weight)
                   if t.edit_region_weight else None)
        per_sample = losslib.edit_loss(v_pred, losslib.v_target(target, noise, a), t.frame_loss_weight, weights)
        return per_sample.mean()

    return loss_fn


def make_train_step(cfg: Config, graphdef, optimizer, mesh: Mesh, state_sh, frozen_sh, timestep_groups: int = 1,
                    first_step: int = 0):
    """`step(state, frozen, batch, step) -> (state, metrics)`: one jit, state donated.

    Inputs and outputs carry explicit shardings (batch split over the `batch` rule's axes), activations are
    constrained by the logical rules. `timestep_groups`: see `stratified_timesteps` (the data-parallel size).
    `first_step`: the global step the stage starts at (its learning-rate schedule counts from there).
    A non-finite loss or gradient leaves params, optimizer state and EMA unchanged and counts the step.
    """
    loss_fn = make_loss_fn(cfg, graphdef, timestep_groups)
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

    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_shardings(cfg, mesh), _replicated(mesh)),
                   out_shardings=(state_sh, _replicated(mesh)), donate_argnums=(0,))


def batch_shardings(cfg: Config, mesh: Mesh) -> dict[str, NamedSharding]:
    rules = cfg.mesh.logical_axis_rules
    return {"source": shardlib.batch_sharding(mesh, rules, 5), "target": shardlib.batch_sharding(mesh, rules, 5),
            "text": shardlib.batch_sharding(mesh, rules, 3)}


def put_batch(batch: dict[str, np.ndarray], shardings: dict[str, NamedSharding]) -> dict[str, Any]:
    """The global host batch as sharded arrays; each process fills only its addressable shards."""
    return {k: jax.make_array_from_callback(v.shape, shardings[k], lambda idx, v=v: v[idx]) for k, v in batch.items()}
