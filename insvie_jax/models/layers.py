"""Small NNX building blocks with logical axis names and separate parameter / compute dtypes."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, init, shape, dtype, axes) -> nnx.Param:
    """A parameter carrying its logical axis names; `parallel/` maps them to mesh axes."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), eager_sharding=False, out_sharding=tuple(axes))


class Dense(nnx.Module):
    """y = x @ kernel + bias, with a kernel of any rank: `in_shape` dims contract with x's last dims."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        axes: tuple,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
        use_bias: bool = True,
        kernel_init=None,
    ):
        self.in_rank = len(in_shape)
        self.dtype = dtype
        fan_in = 1
        for n in in_shape:
            fan_in *= n
        init = kernel_init or nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=0)
        self.kernel = param(rngs, lambda k, s, d: init(k, (fan_in, *s[self.in_rank :]), d).reshape(s),
                            (*in_shape, *out_shape), param_dtype, axes)
        self.bias = (
            param(rngs, nnx.initializers.zeros, out_shape, param_dtype, axes[self.in_rank :]) if use_bias else None
        )

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        kernel = self.kernel[...].astype(self.dtype)
        n = self.in_rank
        y = jnp.tensordot(x.astype(self.dtype), kernel, axes=(tuple(range(x.ndim - n, x.ndim)), tuple(range(n))))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class LayerNorm(nnx.Module):
    """LayerNorm with statistics in float32; output in the compute dtype."""

    def __init__(self, dim: int, eps: float, axes=("embed",), *, rngs: nnx.Rngs, param_dtype=jnp.float32,
                 dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, axes)
        self.bias = param(rngs, nnx.initializers.zeros, (dim,), param_dtype, axes)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return _layer_norm(x, self.scale[...], self.bias[...], self.eps, self.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _layer_norm(x, scale, bias, eps: float, dtype):
    # Rematerialised: the backward pass recomputes the float32 statistics from the (16-bit) input instead of
    # keeping float32 copies of every normalised activation alive, which is most of a no-remat step's memory.
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(dtype)
