"""Parameters as flat `{"a.b.kernel": array}` dicts: the common currency of loaders and converters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    state = nnx.state(model, nnx.Param)
    return {".".join(str(k) for k in path): np.asarray(v[...]) for path, v in nnx.to_flat_state(state)}


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a model, abstract (`nnx.eval_shape`) or not."""
    state = nnx.state(model, nnx.Param)
    return {".".join(str(k) for k in path): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


class ParamMismatch(ValueError):
    """Names every missing, unexpected and wrongly shaped parameter."""


def check_params(expected: dict[str, tuple], found: dict[str, tuple], what: str = "checkpoint") -> None:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"  {k}: expected {tuple(expected[k])}, found {tuple(found[k])}"
        for k in sorted(set(expected) & set(found))
        if tuple(expected[k]) != tuple(found[k])
    ]
    if missing or unexpected or wrong:
        lines = [f"{what} does not fit the model config:"]
        if missing:
            lines.append(f"missing ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            lines.append(
                f"unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else "")
            )
        if wrong:
            lines.append(f"wrong shape ({len(wrong)}):")
            lines.extend(wrong[:20])
        raise ParamMismatch("\n".join(lines))


def set_flat_params(model: nnx.Module, flat: dict[str, np.ndarray], what: str = "checkpoint") -> None:
    """Writes every parameter of `model` from `flat`, after checking names and shapes all match."""
    state = nnx.state(model, nnx.Param)
    check_params(param_shapes(model), {k: np.shape(v) for k, v in flat.items()}, what)
    for path, var in nnx.to_flat_state(state):
        key = ".".join(str(k) for k in path)
        var[...] = jnp.asarray(flat[key], var[...].dtype)
    nnx.update(model, state)


def module_from_flat(abstract: nnx.Module, flat: dict[str, np.ndarray], what: str = "checkpoint") -> nnx.Module:
    """A module built from shapes only (`nnx.eval_shape`) filled with `flat`: no random weights drawn first.

    Every parameter must be in `flat` with its shape (else `ParamMismatch`); values take the parameter dtype.
    """
    check_params(param_shapes(abstract), {k: np.shape(v) for k, v in flat.items()}, what)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    for path, var in nnx.to_flat_state(params):
        var.set_value(jnp.asarray(np.asarray(flat[".".join(str(k) for k in path)]), var.get_value().dtype))
    return nnx.merge(graphdef, params, rest)



def count_params(model: nnx.Module) -> int:
    """Parameters of a model (abstract ones too: shapes only)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def host_random_weights(model: nnx.Module, seed: int) -> dict[str, np.ndarray]:
    """PyTorch-style random weights drawn in numpy for (abstract) `model`: kernels (..., in, out) uniform in
    ±1/sqrt(fan_in), norm scales 1, the rest 0. Drawn on the host because initialising many differently shaped
    convolutions op by op in JAX compiles each one (~15 s on CPU even for the tiny VAE)."""
    rng = np.random.default_rng(seed)

    def draw(name: str, shape: tuple) -> np.ndarray:
        kind = name.rsplit(".", 1)[1]
        if kind == "kernel":
            bound = 1 / np.sqrt(np.prod(shape[:-1]))
            return rng.uniform(-bound, bound, shape).astype(np.float32)
        return (np.ones if kind == "scale" else np.zeros)(shape, np.float32)

    return {name: draw(name, shape) for name, shape in param_shapes(model).items()}
