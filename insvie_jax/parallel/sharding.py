"""Logical axis names -> mesh axes, from the config's rules (MaxText style).

Models name their parameters' and activations' axes (`embed`, `heads`, `batch`, `length`, ...). Which
mesh axis each name lands on is decided here, from `mesh.logical_axis_rules`, and nowhere else. Outside a
`logical_rules(...)` context `constrain` does nothing, so the same model code runs unsharded.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("insvie_logical_rules", default=None)


def logical_to_spec(names, rules) -> PartitionSpec:
    """('batch', 'length', 'embed') -> PartitionSpec(('data','fsdp'), 'context', 'fsdp') under `rules`.

    A mesh axis is used at most once per spec: a later name that maps to an axis already taken is replicated.
    """
    table = {name: axis for name, axis in rules}
    used: set[str] = set()
    spec = []
    for name in names:
        axis = table.get(name) if name is not None else None
        axes = [axis] if isinstance(axis, str) else list(axis or [])
        axes = [a for a in axes if a not in used]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


@contextlib.contextmanager
def logical_rules(mesh: Mesh, rules):
    """Within this context, `constrain` places activations on `mesh` according to `rules`."""
    token = _ACTIVE.set((mesh, [tuple(r) for r in rules]))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_rules():
    """(mesh, rules) of the innermost `logical_rules` context, or None outside one."""
    return _ACTIVE.get()


def constrain(x: jax.Array, names) -> jax.Array:
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules)))


def fit_spec(spec: PartitionSpec, shape, mesh: Mesh) -> PartitionSpec:
    """`spec` with the mesh axes that do not divide their dimension dropped (that dimension is replicated):
    small parameters (biases of a few heads, tiny test models) stay valid on any mesh."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = [entry] if isinstance(entry, str) else list(entry or [])
        kept, size = [], 1
        for axis in axes:
            if dim % (size * mesh.shape[axis]) == 0:
                kept.append(axis)
                size *= mesh.shape[axis]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def state_shardings(abstract_state, mesh: Mesh, rules):
    """NamedShardings for an nnx state of parameters carrying logical axis names, as a pure dict.

    `abstract_state` is `nnx.state(abstract_model, filter)`; names come from `nnx.get_partition_spec`.
    """
    from flax import nnx

    logical = nnx.get_partition_spec(abstract_state).to_pure_dict()
    shapes = abstract_state.to_pure_dict()
    rules = [tuple(r) for r in rules]
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, fit_spec(logical_to_spec(tuple(names), rules), x.shape, mesh)),
        logical, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def batch_sharding(mesh: Mesh, rules, ndim: int) -> NamedSharding:
    """Batch arrays: the leading (batch) dimension split by the `batch` rule, the rest replicated."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), [tuple(r) for r in rules]))
