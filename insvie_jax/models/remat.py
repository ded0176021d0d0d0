"""A stack of layers: built as one module with a leading `layers` axis, run as one `lax.scan` over those stacked
parameters (or a Python loop), each layer under a remat policy. Shared by the transformers, text encoders and LoRA
adapters of every family."""

from __future__ import annotations

from typing import Callable

import jax
import jax.ad_checkpoint  # not loaded by `import jax` alone
from flax import nnx

# The layer scan saves each layer's bf16 input (its only large residual under these policies). The `*_offload`
# policies keep those inputs in pinned host memory instead, copied out during the forward and back during the
# backward (tools/PERFORMANCE.md "Memory": 2B at 49x480x720 saves 1.9 GiB of HBM for ~4% more time).
_LAYER_INPUT = "layer_input"
_TO_HOST = jax.ad_checkpoint.Offloadable(src="device", dst="pinned_host")


def stack_layers(make: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` modules from `make(rngs)`, stacked on a leading `layers` axis (each with its own random draws)."""

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
        return make(rngs)

    return build(rngs)


def _is_attention_kernel(prim) -> bool:
    # cuDNN's flash forward returns the output and the softmax statistics that its backward needs; keeping
    # both (~70 MB a layer for 2B at 49x480x720) spares recomputing the step's most expensive forward kernel.
    return prim.name.startswith("dot_product_attention_fwd")


def _is_layer_input(prim, params) -> bool:
    return prim.name == "name" and params.get("name") == _LAYER_INPUT


def _policy(attention, layer_input):
    """A remat policy: what happens to the flash forward's outputs and to the named layer input; the rest is
    recomputed."""

    def policy(prim, *_, **params):
        if _is_attention_kernel(prim):
            return attention
        if _is_layer_input(prim, params):
            return layer_input
        return jax.ad_checkpoint.Recompute

    return policy


_RECOMPUTE, _SAVE = jax.ad_checkpoint.Recompute, jax.ad_checkpoint.Saveable
POLICIES = {
    "full": None,
    "attention": _policy(attention=_SAVE, layer_input=_RECOMPUTE),
    "full_offload": _policy(attention=_RECOMPUTE, layer_input=_TO_HOST),
    "attention_offload": _policy(attention=_SAVE, layer_input=_TO_HOST),
    "attention_offload_all": _policy(attention=_TO_HOST, layer_input=_TO_HOST),
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def run_layers(blocks: nnx.Module, x: jax.Array, apply: Callable, num_layers: int, scan: bool,
               remat_policy: str = "none") -> jax.Array:
    """`x` through the `num_layers` layers of `blocks` (an NNX module whose parameters carry a leading layer
    axis), each as `apply(block, x) -> x`, under one `lax.scan` (or a Python loop) and `remat_policy`.

    The block is rebuilt from its parameter slice inside the loop body, which keeps this a plain JAX function
    that any outer transform (grad, jit, shard_map) can trace; scanned, 30-42 layers compile as one."""
    graphdef, state = nnx.split(blocks)

    def block_fn(x, layer_state):
        # Named so that an offloading remat policy can move the saved layer inputs to host memory.
        x = jax.ad_checkpoint.checkpoint_name(x, _LAYER_INPUT)
        return apply(nnx.merge(graphdef, layer_state), x), None

    if remat_policy != "none":
        block_fn = jax.checkpoint(block_fn, policy=POLICIES[remat_policy], prevent_cse=not scan)
    if scan:
        x, _ = jax.lax.scan(block_fn, x, state)
    else:
        for i in range(num_layers):
            x, _ = block_fn(x, jax.tree.map(lambda a, i=i: a[i], state))
    return x
