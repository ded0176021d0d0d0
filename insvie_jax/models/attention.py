"""The one attention entry point: every model calls `attention(q, k, v, implementation)`.

Layout is (batch, length, heads, head_dim) throughout, which is what cuDNN's fused kernel takes, so no
transposes surround it. XLA's own attention materialises the (L, L) scores (106 GiB at 17 776 tokens),
so on GPU the cuDNN kernel is the only usable path at full size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def resolve_implementation(requested: str, dtype) -> str:
    """'auto' picks cuDNN on GPU for 16-bit inputs (what the kernel supports), XLA elsewhere."""
    if requested != "auto":
        return requested
    on_gpu = jax.default_backend() == "gpu"
    return "cudnn" if on_gpu and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, implementation: str = "auto") -> jnp.ndarray:
    """Full (unmasked) scaled dot-product attention, scale 1/sqrt(head_dim)."""
    impl = resolve_implementation(implementation, q.dtype)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)
