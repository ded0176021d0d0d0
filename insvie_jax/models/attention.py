"""The one attention entry point: every model calls `attention(q, k, v, implementation, splash_blocks)`.

Layout is (batch, length, heads, head_dim) throughout, which is what cuDNN's fused kernel takes, so no
transposes surround it. XLA's own attention materialises the (L, L) scores (106 GiB at 17 776 tokens),
so on GPU the cuDNN kernel is the only usable path at full size; on TPU the Pallas splash kernel is.

Implementations (`model.attention`):
- "xla", "cudnn": `jax.nn.dot_product_attention` on the whole sequence (XLA's SPMD partitioner shards it).
- "splash": the TPU Pallas splash-attention kernel (runs in interpret mode on CPU, for tests). Inside a
  `parallel.sharding.logical_rules` context it runs per device under `shard_map`: batch and heads stay
  sharded, each device keeps its query chunk and gathers keys/values along the length axis.
- "ring": context parallelism. The length axis is sharded over the mesh axis that the logical name
  `length` maps to (`context`); each device keeps its query chunk while key/value chunks travel round the
  ring with `ppermute`, combined by online-softmax (log-sum-exp) rescaling in float32. The backward pass
  runs a second ring: nothing larger than one (chunk x chunk) score block is ever held.
- "context_gather": the same sharding, but keys/values are all-gathered along the length axis first
  (simpler; holds the whole K/V on every device).
- "auto": splash on TPU, cuDNN on GPU for 16-bit inputs (what that kernel supports), XLA elsewhere.
"ring" and "context_gather" without an active mesh, or with a context axis of size 1, are plain "auto".
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash_kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from insvie_jax.config import ConfigError
from insvie_jax.parallel.sharding import active_rules, logical_to_spec

QKV_AXES = ("batch", "length", "heads", "head_dim")
_SPLASH_LANES = 128  # splash block sizes are multiples of the TPU lane width


@dataclasses.dataclass(frozen=True)
class SplashBlocks:
    """Splash kernel tile sizes (multiples of 128; 0 = the chip generation's, `SPLASH_TILES`); the backward
    kernels use the same tiles."""

    block_q: int = 0
    block_kv: int = 0
    block_kv_compute: int = 0
    fused_bwd: bool = False

    @classmethod
    def from_config(cls, cfg) -> "SplashBlocks":
        return cls(cfg.splash_block_q, cfg.splash_block_kv, cfg.splash_block_kv_compute, cfg.splash_fused_bwd)

    def for_chip(self, device_kind: str) -> "SplashBlocks":
        q, kv, kv_compute = SPLASH_TILES.get(device_kind, SPLASH_TILES["default"])
        return dataclasses.replace(self, block_q=self.block_q or q, block_kv=self.block_kv or kv,
                                   block_kv_compute=self.block_kv_compute or kv_compute)


# (block_q, block_kv, block_kv_compute) per TPU generation (device_kind). Larger K/V tiles amortise each grid
# step's overhead where VMEM allows; v6e's 256-wide MXU takes wider query tiles. Starting points, not yet tuned
# on hardware (no TPU has run this code): set model.splash_block_* to override.
SPLASH_TILES = {
    "TPU v4": (512, 512, 512),
    "TPU v5 lite": (512, 1024, 512),
    "TPU v5": (512, 1024, 512),
    "TPU v6 lite": (1024, 1024, 512),
    "default": (512, 512, 512),
}


def target_device():
    """A device of the kind the code is compiled for: the active mesh's (abstract TPU chips when compiling ahead
    of time on a CPU machine), else JAX's default device."""
    active = active_rules()
    return active[0].devices.flat[0] if active is not None else jax.devices()[0]


def target_platform() -> str:
    return target_device().platform


def resolve_implementation(requested: str, dtype) -> str:
    if requested != "auto":
        return requested
    backend = target_platform()
    if backend == "tpu":
        return "splash"
    return "cudnn" if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) else "xla"


def attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, implementation: str = "auto",
              splash_blocks: SplashBlocks = SplashBlocks()) -> jnp.ndarray:
    """Full (unmasked) scaled dot-product attention, scale 1/sqrt(head_dim); q, k, v (B, L, H, Dh)."""
    if implementation in ("ring", "context_gather"):
        context = _context_sharding(q.shape[1])
        if context is None:
            return attention(q, k, v, "auto", splash_blocks)
        mesh, spec, axis, size = context
        if implementation == "ring":
            local = functools.partial(_ring_attention, axis=axis, size=size)
        else:
            local = functools.partial(_gathered_attention, axis=axis, splash_blocks=splash_blocks)
        # The gathered path may run the splash kernel (TPU), whose pallas_call does not declare vma types.
        return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                             check_vma=implementation == "ring")(q, k, v)
    impl = resolve_implementation(implementation, q.dtype)
    if impl == "splash":
        return _splash_sharded(q, k, v, splash_blocks)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


# ---------------------------------------------------------------------------------------------------
# Splash (TPU Pallas)


def _splash_sharded(q, k, v, blocks: SplashBlocks):
    """A Pallas call cannot be partitioned by XLA, so under a mesh it runs per device under shard_map."""
    active = active_rules()
    if active is None:
        return _splash_attention(q, k, v, blocks)
    mesh, rules = active
    q_spec = logical_to_spec(QKV_AXES, rules)
    kv_spec = PartitionSpec(q_spec[0], None, *q_spec[2:])  # every query chunk sees the whole K/V
    _check_divisible(q.shape[1], _axis_size(mesh, q_spec[1]))
    # The splash kernel's pallas_call declares no per-axis variance of its outputs: vma checks must be off.
    return jax.shard_map(functools.partial(_splash_attention, blocks=blocks), mesh=mesh, check_vma=False,
                         in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec)(q, k, v)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _splash_kernel(heads: int, q_len: int, kv_len: int, block_q: int, block_kv: int, block_kv_compute: int,
                   fused_bwd: bool, interpret: bool):
    sizes = splash_kernel.BlockSizes(
        block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv_compute,
        block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv_compute,
        block_q_dq=None if fused_bwd else block_q, block_kv_dq=None if fused_bwd else block_kv,
        use_fused_bwd_kernel=fused_bwd,
    )
    mask = splash_mask.MultiHeadMask([splash_mask.FullMask((q_len, kv_len)) for _ in range(heads)])
    return splash_kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(q, k, v, blocks: SplashBlocks):
    """Splash on (B, L, H, Dh). Lengths are padded to whole blocks; padded keys get their own segment id so
    no real query sees them, padded queries keep segment 0 (every row has keys to attend to) and are dropped."""
    backend = target_platform()
    if backend == "gpu":
        raise ConfigError("model.attention='splash' is the TPU Pallas kernel; on GPU use 'cudnn' or 'auto'")
    _, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    blocks = blocks.for_chip(getattr(target_device(), "device_kind", ""))
    # Short sequences need no full-size tiles: clamp each tile to the (lane-rounded) length.
    block_q = min(blocks.block_q, _round_up(q_len, _SPLASH_LANES))
    block_kv = min(blocks.block_kv, _round_up(kv_len, _SPLASH_LANES))
    block_kv_compute = math.gcd(block_kv, blocks.block_kv_compute)
    q_pad, kv_pad = _round_up(q_len, block_q), _round_up(kv_len, block_kv)
    kernel = _splash_kernel(heads, q_pad, kv_pad, block_q, block_kv, block_kv_compute, blocks.fused_bwd,
                            interpret=backend != "tpu")

    def to_kernel(x, padded):  # (B, L, H, Dh) -> (B, H, L_padded, Dh)
        return jnp.pad(x, ((0, 0), (0, padded - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    segments = splash_kernel.SegmentIds(q=jnp.zeros((q_pad,), jnp.int32),
                                        kv=(jnp.arange(kv_pad) >= kv_len).astype(jnp.int32))
    scaled_q = q * jnp.asarray(1 / math.sqrt(head_dim), q.dtype)  # the kernel does not scale
    out = jax.vmap(kernel, in_axes=(0, 0, 0, None))(
        to_kernel(scaled_q, q_pad), to_kernel(k, kv_pad), to_kernel(v, kv_pad), segments)
    return out.transpose(0, 2, 1, 3)[:, :q_len]


# ---------------------------------------------------------------------------------------------------
# Context parallelism


def _axis_size(mesh, axes) -> int:
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def _check_divisible(length: int, context_size: int) -> None:
    if length % context_size:
        raise ConfigError(
            f"attention sequence length {length} is not divisible by the context-parallel size {context_size} "
            "(mesh axes of logical axis 'length'): pick mesh.ici_context (or the clip size: text_length + video tokens) so that it divides the length"
        )


def _context_sharding(length: int):
    """(mesh, spec, context axis, context size) for the active mesh, or None when length is not sharded."""
    active = active_rules()
    if active is None:
        return None
    mesh, rules = active
    spec = logical_to_spec(QKV_AXES, rules)
    size = _axis_size(mesh, spec[1])
    if size == 1:
        return None
    _check_divisible(length, size)
    return mesh, spec, spec[1], size


def _gathered_attention(q, k, v, *, axis, splash_blocks):
    k = jax.lax.all_gather(k, axis, axis=1, tiled=True)
    v = jax.lax.all_gather(v, axis, axis=1, tiled=True)
    impl = resolve_implementation("auto", q.dtype)
    if impl == "splash":
        return _splash_attention(q, k, v, splash_blocks)
    return jax.nn.dot_product_attention(q, k, v, implementation=impl)


def _scores(q, k):
    """(B, Lq, H, Dh) x (B, Lk, H, Dh) -> scaled float32 scores (B, H, Lq, Lk)."""
    scale = 1 / math.sqrt(q.shape[-1])
    return jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale


def _ring_permute(x, axis, size):
    return jax.lax.ppermute(x, axis, [(i, (i + 1) % size) for i in range(size)])


def _ring_forward(q, k, v, axis, size):
    """Online softmax over the ring; returns the output and the per-row log-sum-exp (B, H, Lq)."""
    # *_like keeps q's device-varying type under shard_map, which the loop carry must match.
    row_stat = q[..., 0].transpose(0, 2, 1)  # (B, H, Lq)
    row_max = jnp.full_like(row_stat, -jnp.inf, jnp.float32)
    row_sum = jnp.zeros_like(row_stat, jnp.float32)
    acc = jnp.zeros_like(q, jnp.float32, shape=q.shape[:3] + v.shape[-1:])

    def accumulate(carry, k_chunk, v_chunk):
        row_max, row_sum, acc = carry
        s = _scores(q, k_chunk)
        new_max = jnp.maximum(row_max, s.max(-1))
        rescale = jnp.exp(row_max - new_max)  # exp(-inf) = 0 on the first chunk
        p = jnp.exp(s - new_max[..., None])
        row_sum = row_sum * rescale + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bqhd", p.astype(v_chunk.dtype), v_chunk, preferred_element_type=jnp.float32)
        acc = acc * rescale.transpose(0, 2, 1)[..., None] + pv
        return new_max, row_sum, acc

    def step(_, state):
        carry, k_chunk, v_chunk = state
        # The next chunk is sent while this one is used: communication overlaps the compute.
        next_k, next_v = _ring_permute(k_chunk, axis, size), _ring_permute(v_chunk, axis, size)
        return accumulate(carry, k_chunk, v_chunk), next_k, next_v

    carry, k_last, v_last = jax.lax.fori_loop(0, size - 1, step, ((row_max, row_sum, acc), k, v))
    row_max, row_sum, acc = accumulate(carry, k_last, v_last)
    out = acc / row_sum.transpose(0, 2, 1)[..., None]
    return out.astype(q.dtype), row_max + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring_attention_core(q, k, v, axis, size):
    return _ring_forward(q, k, v, axis, size)[0]


def _ring_fwd(q, k, v, axis, size):
    out, lse = _ring_forward(q, k, v, axis, size)
    return out, (q, k, v, out, lse)


def _ring_bwd(axis, size, residuals, d_out):
    """Second ring: K/V chunks travel again with their dK/dV accumulators, which end up back home."""
    q, k, v, out, lse = residuals
    scale = 1 / math.sqrt(q.shape[-1])
    # delta_i = sum_j P_ij dP_ij = <dO_i, O_i>
    delta = jnp.einsum("bqhd,bqhd->bhq", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def grads(k_chunk, v_chunk):
        p = jnp.exp(_scores(q, k_chunk) - lse[..., None])
        dv = jnp.einsum("bhqk,bqhd->bkhd", p.astype(d_out.dtype), d_out, preferred_element_type=jnp.float32)
        dp = jnp.einsum("bqhd,bkhd->bhqk", d_out, v_chunk, preferred_element_type=jnp.float32)
        ds = (p * (dp - delta[..., None])).astype(q.dtype)
        dq = jnp.einsum("bhqk,bkhd->bqhd", ds, k_chunk, preferred_element_type=jnp.float32) * scale
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q, preferred_element_type=jnp.float32) * scale
        return dq, dk, dv

    def step(_, state):
        dq, k_chunk, v_chunk, dk, dv = state
        next_k, next_v = _ring_permute(k_chunk, axis, size), _ring_permute(v_chunk, axis, size)
        dq_part, dk_part, dv_part = grads(k_chunk, v_chunk)
        dk, dv = _ring_permute(dk + dk_part, axis, size), _ring_permute(dv + dv_part, axis, size)
        return dq + dq_part, next_k, next_v, dk, dv

    zeros = [jnp.zeros_like(x, jnp.float32) for x in (q, k, v)]
    dq, k_last, v_last, dk, dv = jax.lax.fori_loop(0, size - 1, step, (zeros[0], k, v, *zeros[1:]))
    dq_part, dk_part, dv_part = grads(k_last, v_last)
    # After size-1 hops the accumulators sit one device behind their owner: one more hop brings them home.
    dk, dv = _ring_permute(dk + dk_part, axis, size), _ring_permute(dv + dv_part, axis, size)
    return (dq + dq_part).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_ring_attention_core.defvjp(_ring_fwd, _ring_bwd)


def _ring_attention(q, k, v, *, axis, size):
    return _ring_attention_core(q, k, v, axis, size)
