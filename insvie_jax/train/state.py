"""The train state: what one training run holds on its devices, in one object.

`TrainState.variables` is the pytree the step updates (donated) and a checkpoint saves, a dict of pure pytrees
(nested dicts of arrays) that optax, orbax and jit all take as they are:
  params              the trainable parameters (all of them, or the LoRA adapters + `lora.also_train`)
  opt_state           optax state of the trainable parameters only (frozen ones take no optimizer memory)
  ema                 EMA of the trainable parameters (only when train.ema_decay > 0)
  skipped             steps skipped for a non-finite loss or gradient, in total
  nonfinite_in_a_row  ... and in a row up to now
Beside it, read-only: `frozen` (the parameters no gradient is taken for), the `graphdef` that merges both back
into the model, and the shardings of both (from the config's logical axis rules).

`TrainState.init` places a fresh state (random weights from train.seed, or the initial transformer handed in,
e.g. train.init_from's); `TrainState.abstract` is the same as ShapeDtypeStructs (what a checkpoint restores
into and what `insvie-jax compile` lowers with); `carry_over` starts the next curriculum stage from where one
ended (see below).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from insvie_jax.config import Config, Stage, what_trains
from insvie_jax.convert.models import Models, build_transformer
from insvie_jax.models import lora as loralib
from insvie_jax.parallel import sharding as shardlib

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


def trained_model(cfg: Config, initial=None):
    """The model as trained: random weights from train.seed, or `initial`'s weights (a transformer of the same
    architecture, e.g. train.init_from's: `convert.models.load_training_models`), plus LoRA adapters when enabled."""
    model = build_transformer(cfg.model, seed=cfg.train.seed)
    if initial is not None:
        from insvie_jax.models.params import flat_params, set_flat_params

        set_flat_params(model, flat_params(initial))
    if cfg.lora.enabled:
        loralib.add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.train.seed + 1)
    return model


def split_model(model, cfg: Config):
    """(graphdef, trainable, frozen): the parameters as pure dicts."""
    graphdef, trainable, frozen = nnx.split(model, trainable_filter(cfg), nnx.Param)
    return graphdef, trainable.to_pure_dict(), frozen.to_pure_dict()


# ---------------------------------------------------------------------------------------------------
# The state


def _replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def _shardings(cfg: Config, mesh: Mesh, optimizer):
    """(graphdef, shardings of the variables, shardings of the frozen params) from the logical names."""
    abstract_model = nnx.eval_shape(lambda: trained_model(cfg))
    rules = cfg.mesh.logical_axis_rules
    graphdef, trainable_abs, frozen_abs = nnx.split(abstract_model, trainable_filter(cfg), nnx.Param)
    params_sh = shardlib.state_shardings(trainable_abs, mesh, rules)
    frozen_sh = shardlib.state_shardings(frozen_abs, mesh, rules)
    abstract_opt = jax.eval_shape(optimizer.init, trainable_abs.to_pure_dict())
    opt_sh = optax.tree_map_params(optimizer, lambda _, sh: sh, abstract_opt, params_sh,
                                   transform_non_params=lambda _: _replicated(mesh))
    variables_sh = {"params": params_sh, "opt_state": opt_sh, "skipped": _replicated(mesh),
                    "nonfinite_in_a_row": _replicated(mesh)}
    if cfg.train.ema_decay > 0:
        variables_sh["ema"] = params_sh
    return graphdef, variables_sh, frozen_sh


def _initial_variables(cfg: Config, optimizer, params, frozen):
    variables = {"params": params, "opt_state": optimizer.init(params), "skipped": jnp.zeros((), jnp.int32),
                 "nonfinite_in_a_row": jnp.zeros((), jnp.int32)}
    if cfg.train.ema_decay > 0:
        variables["ema"] = jax.tree.map(jnp.copy, params)
    return variables, frozen


def _restart_schedule(opt_state):
    """The optimizer state with its learning-rate schedule counters at 0 (Adam's own count is left alone)."""
    is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
    return jax.tree.map(lambda node: node._replace(count=jnp.zeros_like(node.count)) if is_schedule(node) else node,
                        opt_state, is_leaf=is_schedule)


@dataclasses.dataclass(frozen=True)
class TrainState:
    graphdef: Any  # nnx.GraphDef of the trained model: nnx.merge(graphdef, params, frozen)
    variables: dict  # params, opt_state, [ema], skipped, nonfinite_in_a_row (see the module docstring)
    frozen: dict  # the parameters that do not train
    shardings: dict  # of `variables`
    frozen_shardings: dict  # of `frozen`

    @property
    def params(self) -> dict:
        return self.variables["params"]

    def replace(self, **changes) -> TrainState:
        return dataclasses.replace(self, **changes)

    def model(self, ema: bool = False):
        """The trained (or EMA) model, merged from the state's arrays."""
        return nnx.merge(self.graphdef, self.variables["ema"] if ema else self.params, self.frozen)

    @classmethod
    def init(cls, cfg: Config, mesh: Mesh, optimizer, models: Models) -> TrainState:
        """A fresh state, each array placed by its sharding. `models` (`convert.models.load_training_models`) holds
        the initial transformer, train.init_from's, which is split on the host and its arrays placed; without
        one the random weights (train.seed) are drawn in one jit with output shardings (no full copy on one
        device)."""
        graphdef, variables_sh, frozen_sh = _shardings(cfg, mesh, optimizer)
        out = (variables_sh, frozen_sh)
        if models.transformer is not None:
            init = jax.jit(lambda params, frozen: _initial_variables(cfg, optimizer, params, frozen), out_shardings=out)
            variables, frozen = init(*split_model(trained_model(cfg, models.transformer), cfg)[1:])
        else:
            variables, frozen = jax.jit(
                lambda: _initial_variables(cfg, optimizer, *split_model(trained_model(cfg), cfg)[1:]),
                out_shardings=out)()
        return cls(graphdef, variables, frozen, variables_sh, frozen_sh)

    @classmethod
    def abstract(cls, cfg: Config, mesh: Mesh, optimizer) -> TrainState:
        """The state as ShapeDtypeStructs carrying their shardings: the structure a checkpoint restores into and
        what `insvie-jax compile` lowers the step with. Nothing is allocated or read."""
        graphdef, variables_sh, frozen_sh = _shardings(cfg, mesh, optimizer)
        variables, frozen = jax.eval_shape(
            lambda: _initial_variables(cfg, optimizer, *split_model(trained_model(cfg), cfg)[1:]))

        def place(tree, shardings):
            return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

        return cls(graphdef, place(variables, variables_sh), place(frozen, frozen_sh), variables_sh, frozen_sh)

    def carry_over(self, before: Stage, stage: Stage, mesh: Mesh, optimizer) -> TrainState:
        """Stage `stage`'s state, from this one, where stage `before` ended (its arrays are donated). One jit,
        placed by the new stage's shardings (config `stages`, resolved by `config.resolve_stages`).

        How depends on whether what trains changes (`config.what_trains`: full fine-tune, or LoRA with its rank,
        alpha, targets and `lora.also_train`):
        - Unchanged: trainable and frozen parameters carry over as they are, the EMA too (when both stages keep
          one). The optimizer state starts fresh, or with `keep_optimizer: true` carries over (Adam moments and
          their bias correction count) with only the learning-rate schedule restarted, so that the stage's own
          warmup and cosine count from its first update.
        - Changed: the stage before's LoRA adapters are merged into the base weights (W + A·B·alpha/rank); then
          the new stage's split applies: a full fine-tune trains every merged weight, a LoRA stage attaches fresh
          adapters (B = 0, so the model is the merged one at its first step). The optimizer state starts fresh
          (its shapes no longer fit: `resolve_stages` refuses keep_optimizer here) and an EMA restarts at the
          weights.
        The skip counters (steps skipped for non-finite values) carry over in both cases."""
        cfg, same = stage.config, what_trains(before.config) == what_trains(stage.config)
        graphdef = self.graphdef
        new_graphdef, variables_sh, frozen_sh = _shardings(cfg, mesh, optimizer)

        def start(variables, frozen):
            if same:
                params = variables["params"]
            else:
                model = nnx.merge(graphdef, variables["params"], frozen)
                if before.config.lora.enabled:
                    model = loralib.merge_lora(model)
                if cfg.lora.enabled:
                    loralib.add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, seed=cfg.train.seed + 1)
                _, params, frozen = split_model(model, cfg)
            opt_state = _restart_schedule(variables["opt_state"]) if stage.keep_optimizer else optimizer.init(params)
            new = {"params": params, "opt_state": opt_state, "skipped": variables["skipped"],
                   "nonfinite_in_a_row": variables["nonfinite_in_a_row"]}
            if cfg.train.ema_decay > 0:
                new["ema"] = variables["ema"] if same and "ema" in variables else jax.tree.map(jnp.copy, params)
            return new, frozen

        with warnings.catch_warnings():  # what the new stage no longer holds (merged adapters) cannot be reused
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            variables, frozen = jax.jit(start, out_shardings=(variables_sh, frozen_sh), donate_argnums=(0, 1))(
                self.variables, self.frozen)
        return TrainState(new_graphdef, variables, frozen, variables_sh, frozen_sh)
