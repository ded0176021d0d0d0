"""From one stage of a curriculum to the next (config `stages`, resolved by `config.resolve_stages`).

A stage starts from the weights the stage before ended with. How depends on whether what trains changes
(`config.what_trains`: full fine-tune, or LoRA with its rank, alpha, targets and `lora.also_train`):

- Unchanged: trainable and frozen parameters carry over as they are, the EMA too (when both stages keep one).
  The optimizer state starts fresh, or with `keep_optimizer: true` carries over (Adam moments and their bias
  correction count) with only the learning-rate schedule restarted, so that the stage's own warmup and
  cosine count from its first update.
- Changed: the stage before's LoRA adapters are merged into the base weights (W + A·B·alpha/rank); then the new
  stage's split applies: a full fine-tune trains every merged weight, a LoRA stage attaches fresh adapters
  (B = 0, so the model is the merged one at its first step). The optimizer state starts fresh (its shapes no
  longer fit: `resolve_stages` refuses keep_optimizer here) and an EMA restarts at the weights.

The skip counters (steps skipped for non-finite values) carry over in both cases.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from insvie_jax.config import Stage, what_trains
from insvie_jax.models import lora as loralib
from insvie_jax.train import step as steplib


def _restart_schedule(opt_state):
    """The optimizer state with its learning-rate schedule counters at 0 (Adam's own count is left alone)."""
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)  # noqa: E731
    return jax.tree.map(lambda node: node._replace(count=jnp.zeros_like(node.count)) if is_schedule(node) else node,
                        opt_state, is_leaf=is_schedule)


def saves_frozen(stages: list[Stage], index: int) -> bool:
    """Whether stage `index`'s checkpoints must hold the frozen weights: unless they are still train.init_from's
    (no change of what trains up to this stage, which would merge or promote weights into them)."""
    if not stages[0].config.train.init_from:
        return True
    return any(what_trains(stages[i - 1].config) != what_trains(stages[i].config) for i in range(1, index + 1))


def carry_over(before: Stage, graphdef, state, frozen, stage: Stage, mesh, optimizer):
    """Stage `stage`'s (graphdef, state, frozen, state shardings, frozen shardings), from where `before` ended
    (its graphdef, state and frozen params, which are donated). One jit, placed by the new stage's shardings."""
    cfg, same = stage.config, what_trains(before.config) == what_trains(stage.config)
    new_graphdef, state_sh, frozen_sh = steplib.state_shardings(cfg, mesh, optimizer)

    def start(state, frozen):
        if same:
            params = state["params"]
        else:
            model = nnx.merge(graphdef, state["params"], frozen)
            if before.config.lora.enabled:
                model = loralib.merge_lora(model)
            if cfg.lora.enabled:
                loralib.add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.train.seed + 1)
            _, params, frozen = steplib.split_model(model, cfg)
        opt_state = _restart_schedule(state["opt_state"]) if stage.keep_optimizer else optimizer.init(params)
        new = {"params": params, "opt_state": opt_state, "skipped": state["skipped"],
               "nonfinite_in_a_row": state["nonfinite_in_a_row"]}
        if cfg.train.ema_decay > 0:
            new["ema"] = state["ema"] if same and "ema" in state else jax.tree.map(jnp.copy, params)
        return new, frozen

    with warnings.catch_warnings():  # what the new stage no longer holds (merged adapters) cannot be reused
        warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        new_state, new_frozen = jax.jit(start, out_shardings=(state_sh, frozen_sh), donate_argnums=(0, 1))(state,
                                                                                                          frozen)
    return new_graphdef, new_state, new_frozen, state_sh, frozen_sh
