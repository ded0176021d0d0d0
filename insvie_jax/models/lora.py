"""Low-rank adapters on the attention projections, InsViE / SAT `lora2` layout, and their merge.

`add_lora(model, rank, alpha, targets)` attaches a `LoRA` module beside each targeted Dense of every
(stacked) attention block: `attn.qkv_lora` (one A/B pair per q|k|v partition, as SAT) and `attn.out_lora`.
The block adds (x·A·B)·alpha/rank to the Dense output; B starts at zero so a fresh adapter changes nothing.
`merge_lora(model)` folds the adapters into the kernels and returns a plain model.

The Wan transformer (models/wan) takes the same calls: one adapter per projection, `<proj>_lora` beside
`attn1` / `attn2`'s `to_q`, `to_k`, `to_v`, `to_out` and the feed-forward's `w1`, `w2` (`WAN_TARGETS`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from insvie_jax.models.layers import param
from insvie_jax.models.remat import stack_layers

TARGETS = ("qkv", "attn_out")
_IN, _OUT = "abcd", "wxyz"  # einsum letters for the contracted (input) and produced (output) dims


class LoRA(nnx.Module):
    """delta(x) = (x·A)·B·alpha/rank; with `parts`, one (A, B) per output partition (q, k, v)."""

    def __init__(self, in_shape, out_shape, in_axes, out_axes, rank: int, alpha: float, parts: int = 0, *,
                 rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        lead, lead_axes = ((parts,), (None,)) if parts else ((), ())
        self.parts = parts
        self.n_in, self.n_out = len(in_shape), len(out_shape)
        self.scale = alpha / rank
        self.dtype = dtype
        fan_in = 1
        for n in in_shape:
            fan_in *= n
        # A as torch's Linear default (kaiming-uniform, a=sqrt(5)), which SAT's LoRA keeps; B zero.
        init_a = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0)
        self.lora_a = param(
            rngs, lambda k, s, d: init_a(k, (fan_in, (parts or 1) * rank), d).reshape(s),
            (*lead, *in_shape, rank), param_dtype, (*lead_axes, *in_axes, None))
        self.lora_b = param(rngs, nnx.initializers.zeros, (*lead, rank, *out_shape), param_dtype,
                            (*lead_axes, None, *out_axes))

    def _letters(self):
        return _IN[: self.n_in], _OUT[: self.n_out], "p" if self.parts else ""

    def __call__(self, x):
        i, o, p = self._letters()
        a, b = self.lora_a[...].astype(self.dtype), self.lora_b[...].astype(self.dtype)
        xa = jnp.einsum(f"...{i},{p}{i}r->...{p}r", x.astype(self.dtype), a)
        return jnp.einsum(f"...{p}r,{p}r{o}->...{p}{o}", xa, b) * jnp.asarray(self.scale, self.dtype)

    def kernel_delta(self, a, b):
        """The change to the Dense kernel (layout in_shape + [parts] + out_shape) of one layer's A, B."""
        i, o, p = self._letters()
        return jnp.einsum(f"{p}{i}r,{p}r{o}->{i}{p}{o}", a.astype(jnp.float32), b.astype(jnp.float32)) * self.scale


def add_lora(model, rank: int, alpha: float, targets=TARGETS, seed: int = 0):
    """Attaches adapters to `model`'s attention blocks in place and returns it."""
    if _is_wan(model):
        return add_wan_lora(model, rank, alpha, targets, seed)
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise ValueError(f"lora.targets {sorted(unknown)} unknown; choose from {list(TARGETS)}")
    cfg = model.cfg
    d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim
    kw = {"param_dtype": jnp.dtype(cfg.param_dtype), "dtype": jnp.dtype(cfg.dtype)}
    rngs = nnx.Rngs(seed)
    attn = model.blocks.attn
    if "qkv" in targets:
        attn.qkv_lora = nnx.data(stack_layers(
            lambda r: LoRA((d,), (h, hd), ("embed",), ("heads", "head_dim"), rank, alpha, parts=3, rngs=r, **kw),
            cfg.num_layers, rngs))
    if "attn_out" in targets:
        attn.out_lora = nnx.data(stack_layers(
            lambda r: LoRA((h, hd), (d,), ("heads", "head_dim"), ("embed",), rank, alpha, rngs=r, **kw),
            cfg.num_layers, rngs))
    return model


def is_lora_param(path, value) -> bool:
    """nnx filter: the adapters' parameters."""
    return isinstance(value, nnx.Param) and any(str(p) in ("lora_a", "lora_b") for p in path)


def merge_lora(model):
    """A plain model (no adapters) whose kernels hold W + A·B·alpha/rank; `model` is left unchanged."""
    graphdef, state = nnx.split(model)
    merged = nnx.merge(graphdef, state)  # a copy to edit
    if _is_wan(merged):
        for owner, name in wan_adapters(merged):
            module = getattr(merged.blocks, owner)
            _fold(getattr(module, name), getattr(module, name + "_lora"))
            setattr(module, name + "_lora", None)
        return merged
    attn = merged.blocks.attn
    for dense, lora_name in ((attn.qkv, "qkv_lora"), (attn.out, "out_lora")):
        lora = getattr(attn, lora_name, None)
        if lora is None:
            continue
        delta = jax.vmap(lora.kernel_delta)(lora.lora_a[...], lora.lora_b[...])  # over the stacked layers
        dense.kernel[...] = (dense.kernel[...].astype(jnp.float32) + delta).astype(dense.kernel[...].dtype)
        setattr(attn, lora_name, None)
    return merged


# ---------------------------------------------------------------------------------------------------
# Wan: one adapter per projection, as diffusers / peft and ComfyUI name them

# Target names: a projection (`to_q`, `to_k`, `to_v`, `to_out`) in both attentions, or one attention's
# (`attn1.to_q`: self-attention, `attn2.to_q`: cross-attention); `qkv` and `attn_out` (the CogVideoX names)
# mean to_q + to_k + to_v and to_out; `ffn` both feed-forward layers (`ffn.w1`, `ffn.w2`: one of them).
WAN_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")
WAN_TARGETS = (*WAN_PROJECTIONS, "qkv", "attn_out", "ffn", "ffn.w1", "ffn.w2",
               *(f"{a}.{p}" for a in ("attn1", "attn2") for p in (*WAN_PROJECTIONS, "qkv", "attn_out")))
_ALIASES = {"qkv": ("to_q", "to_k", "to_v"), "attn_out": ("to_out",)}


def _is_wan(model) -> bool:
    return hasattr(model.blocks, "attn1")


def wan_target_modules(targets) -> list[tuple[str, str]]:
    """(owner, projection) pairs, e.g. ("attn1", "to_q"), ("ffn", "w1"), in a fixed order."""
    unknown = set(targets) - set(WAN_TARGETS)
    if unknown:
        raise ValueError(f"lora.targets {sorted(unknown)} unknown for the Wan model; choose from {list(WAN_TARGETS)}")
    chosen = set()
    for target in targets:
        if target == "ffn":
            chosen |= {("ffn", "w1"), ("ffn", "w2")}
            continue
        owners, name = (target.split(".") if "." in target else (None, target))
        for owner in ((owners,) if owners else ("attn1", "attn2")):
            chosen |= {(owner, p) for p in _ALIASES.get(name, (name,))}
    order = [(a, p) for a in ("attn1", "attn2") for p in WAN_PROJECTIONS] + [("ffn", "w1"), ("ffn", "w2")]
    return [pair for pair in order if pair in chosen]


def add_wan_lora(model, rank: int, alpha: float, targets=TARGETS, seed: int = 0):
    """Attaches one adapter beside each targeted projection of every (stacked) Wan block; returns `model`."""
    cfg = model.cfg
    d, h, hd, m = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_dim
    kw = {"param_dtype": jnp.dtype(cfg.param_dtype), "dtype": jnp.dtype(cfg.dtype)}
    shapes = {  # projection -> (in_shape, out_shape, in_axes, out_axes), the Dense kernel's layout
        "to_q": ((d,), (h, hd), ("embed",), ("heads", "head_dim")),
        "to_out": ((h, hd), (d,), ("heads", "head_dim"), ("embed",)),
        "w1": ((d,), (m,), ("embed",), ("mlp",)),
        "w2": ((m,), (d,), ("mlp",), ("embed",)),
    }
    shapes["to_k"] = shapes["to_v"] = shapes["to_q"]
    rngs = nnx.Rngs(seed)
    for owner, name in wan_target_modules(targets):
        in_shape, out_shape, in_axes, out_axes = shapes[name]
        adapter = stack_layers(lambda r: LoRA(in_shape, out_shape, in_axes, out_axes, rank, alpha, rngs=r, **kw),
                               cfg.num_layers, rngs)
        setattr(getattr(model.blocks, owner), name + "_lora", nnx.data(adapter))
    return model


def wan_adapters(model) -> list[tuple[str, str]]:
    """(owner, projection) of every adapter attached to a Wan model (its LoRA is `blocks.<owner>.<proj>_lora`)."""
    return [(owner, name) for owner in ("attn1", "attn2", "ffn") for name in (*WAN_PROJECTIONS, "w1", "w2")
            if getattr(getattr(model.blocks, owner), name + "_lora", None) is not None]


def _fold(dense, lora) -> None:
    """dense.kernel += A·B·alpha/rank for every stacked layer."""
    delta = jax.vmap(lora.kernel_delta)(lora.lora_a[...], lora.lora_b[...])
    dense.kernel[...] = (dense.kernel[...].astype(jnp.float32) + delta).astype(dense.kernel[...].dtype)
