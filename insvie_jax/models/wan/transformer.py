"""The Wan 2.x diffusion transformer (diffusers' `WanTransformer3DModel`) as an editing model (Lucy-Edit).

Channels-last throughout: latents (B, F, H, W, C). The noisy latents and the source-video latents are
concatenated on channels (noisy first: Lucy-Edit's 96 = 48 + 48 input) and enter through one 3D patch
embedding. Each block runs self-attention over the video tokens (3D RoPE, RMS norm of q and k across all
heads), cross-attention to the projected text and a GELU feed-forward, modulated by a per-layer table plus
the time embedding. Timesteps may be one per sample (B,) or one per token (B, N) (Wan2.2 TI2V's
`expand_timesteps`); a per-sample timestep gives the numbers of the per-token path with that value everywhere.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax.models import embeddings
from insvie_jax.models.attention import SplashBlocks, attention
from insvie_jax.models.layers import Dense, LayerNorm, param
from insvie_jax.models.params import count_params  # noqa: F401 - part of this module's API
from insvie_jax.models.remat import run_layers, stack_layers
from insvie_jax.models.wan.config import WanModelConfig
from insvie_jax.parallel.sharding import constrain


def _dtypes(cfg: WanModelConfig):
    return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _modulated_norm(x, shift, scale, eps: float, dtype):
    """Affine-free LayerNorm in float32, then `* (1 + scale) + shift` in float32 (diffusers' FP32LayerNorm and
    modulation). Rematerialised: the backward pass recomputes the statistics instead of keeping fp32 copies."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * (1 + scale) + shift).astype(dtype)


class RMSNormAcrossHeads(nnx.Module):
    """RMS norm over all heads at once (Wan's `rms_norm_across_heads`) on (B, L, H, Dh), statistics in fp32."""

    def __init__(self, heads: int, head_dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype, dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (heads, head_dim), param_dtype, ("heads", "head_dim"))

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean((-2, -1), keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Attention(nnx.Module):
    """Self-attention (video -> video, with RoPE) or cross-attention (video -> text) with q/k RMS norms."""

    def __init__(self, cfg: WanModelConfig, *, cross: bool, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim
        kw = dict(rngs=rngs, param_dtype=pdt, dtype=dt)
        qkv_axes = ("embed", "heads", "head_dim")
        self.to_q = Dense((d,), (h, hd), qkv_axes, **kw)
        self.to_k = Dense((d,), (h, hd), qkv_axes, **kw)
        self.to_v = Dense((d,), (h, hd), qkv_axes, **kw)
        self.to_out = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), **kw)
        self.norm_q = RMSNormAcrossHeads(h, hd, cfg.eps, **kw)
        self.norm_k = RMSNormAcrossHeads(h, hd, cfg.eps, **kw)
        # Cross-attention keys are the (short, unsharded) text: under context parallelism the queries stay
        # sharded on length and XLA/splash see whole K/V, so the ring is for self-attention only.
        implementation = cfg.attention
        if cross and implementation in ("ring", "context_gather"):
            implementation = "auto"
        self.implementation = implementation
        self.splash_blocks = SplashBlocks.from_config(cfg)
        # LoRA adapters beside the projections, attached by models/lora.add_lora
        self.to_q_lora = self.to_k_lora = self.to_v_lora = self.to_out_lora = None

    def __call__(self, x, context, rope):
        q = self.norm_q(_project(self.to_q, self.to_q_lora, x))
        k = self.norm_k(_project(self.to_k, self.to_k_lora, context))
        v = _project(self.to_v, self.to_v_lora, context)
        if rope is not None:
            cos, sin = rope
            q, k = embeddings.apply_rope(q, cos, sin), embeddings.apply_rope(k, cos, sin)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        return _project(self.to_out, self.to_out_lora, attention(q, k, v, self.implementation, self.splash_blocks))


def _project(dense, lora, x):
    """A Dense layer plus its LoRA adapter's delta, if one is attached."""
    y = dense(x)
    return y if lora is None else y + lora(x).astype(y.dtype)


class FeedForward(nnx.Module):
    def __init__(self, cfg: WanModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        kw = dict(rngs=rngs, param_dtype=pdt, dtype=dt)
        self.w1 = Dense((cfg.hidden_size,), (cfg.mlp_dim,), ("embed", "mlp"), **kw)
        self.w2 = Dense((cfg.mlp_dim,), (cfg.hidden_size,), ("mlp", "embed"), **kw)
        self.w1_lora = self.w2_lora = None  # LoRA adapters, attached by models/lora.add_lora

    def __call__(self, x):
        return _project(self.w2, self.w2_lora, _gelu(_project(self.w1, self.w1_lora, x)))


@jax.checkpoint
def _gelu(x):
    # Rematerialised: keeps only the input of the tanh-approximate GELU for the backward pass.
    return jax.nn.gelu(x, approximate=True)


class Block(nnx.Module):
    def __init__(self, cfg: WanModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        d = cfg.hidden_size
        self.eps = cfg.eps
        self.dtype = dt
        self.attn1 = Attention(cfg, cross=False, rngs=rngs)
        self.attn2 = Attention(cfg, cross=True, rngs=rngs)
        self.norm2 = (LayerNorm(d, cfg.eps, rngs=rngs, param_dtype=pdt, dtype=dt) if cfg.cross_attn_norm
                      else None)
        self.ffn = FeedForward(cfg, rngs=rngs)
        # (shift, scale, gate) of self-attention, then of the feed-forward, added to the time projection.
        self.scale_shift_table = param(rngs, lambda k, s, t: jax.random.normal(k, s, t) / math.sqrt(d), (6, d),
                                       pdt, (None, "embed"))

    def __call__(self, x, text, temb_proj, rope):
        """x (B, N, D) video tokens; text (B, L, D); temb_proj (B, 1 or N, 6, D) float32."""
        mod = self.scale_shift_table[...].astype(jnp.float32) + temb_proj
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))
        h = _modulated_norm(x, shift, scale, self.eps, self.dtype)
        attn = self.attn1(h, h, rope)
        x = (x.astype(jnp.float32) + attn * gate).astype(self.dtype)
        h = self.norm2(x) if self.norm2 is not None else x
        x = x + self.attn2(h, text, None)
        ff = self.ffn(_modulated_norm(x, c_shift, c_scale, self.eps, self.dtype))
        x = (x.astype(jnp.float32) + ff.astype(jnp.float32) * c_gate).astype(self.dtype)
        return constrain(x, ("batch", "length", "embed"))


class TimeEmbedding(nnx.Module):
    """Sinusoid (cos first) -> MLP -> `temb`; SiLU -> linear -> the blocks' 6 modulation vectors. In fp32."""

    def __init__(self, cfg: WanModelConfig, *, rngs: nnx.Rngs):
        pdt, _ = _dtypes(cfg)
        d = cfg.hidden_size
        kw = dict(rngs=rngs, param_dtype=pdt, dtype=jnp.float32)
        self.freq_dim = cfg.freq_dim
        self.linear_1 = Dense((cfg.freq_dim,), (d,), (None, "embed"), **kw)
        self.linear_2 = Dense((d,), (d,), (None, "embed"), **kw)
        self.time_proj = Dense((d,), (6, d), (None, None, "embed"), **kw)

    def __call__(self, timestep):
        """timestep (B, T) -> temb (B, T, D), temb_proj (B, T, 6, D)."""
        b, t = timestep.shape
        emb = embeddings.timestep_embedding(timestep.reshape(-1), self.freq_dim).reshape(b, t, -1)
        temb = self.linear_2(jax.nn.silu(self.linear_1(emb)))
        return temb, self.time_proj(jax.nn.silu(temb))


class TextEmbedding(nnx.Module):
    """Text encoder states -> model width: linear, tanh-GELU, linear (diffusers' PixArtAlphaTextProjection)."""

    def __init__(self, cfg: WanModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        kw = dict(rngs=rngs, param_dtype=pdt, dtype=dt)
        self.linear_1 = Dense((cfg.text_embed_dim,), (cfg.hidden_size,), (None, "embed"), **kw)
        self.linear_2 = Dense((cfg.hidden_size,), (cfg.hidden_size,), (None, "embed"), **kw)

    def __call__(self, text):
        return self.linear_2(jax.nn.gelu(self.linear_1(text), approximate=True))


def rope_tables(cfg: WanModelConfig, frames: int, height: int, width: int):
    """3D RoPE (cos, sin), each (frames*height*width, head_dim) for a grid of patches, as diffusers'
    `WanRotaryPosEmbed` builds it: head_dim split [t | h | w] = [D - 2*(2*(D//6)) | 2*(D//6) | 2*(D//6)],
    frequencies in float64, angles rounded to float32, each (cos, sin) repeated for the (real, imag) pair."""
    hd = cfg.attention_head_dim
    dim_hw = 2 * (hd // 6)
    dims = (hd - 2 * dim_hw, dim_hw, dim_hw)
    sizes = (frames, height, width)
    if max(sizes) > cfg.rope_max_seq_len:
        raise ValueError(f"a latent grid of {sizes} patches exceeds model.rope_max_seq_len={cfg.rope_max_seq_len}")
    tables = []
    for dim, n in zip(dims, sizes):
        freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
        angles = np.outer(np.arange(n, dtype=np.float64), freqs)
        tables.append((np.repeat(np.cos(angles), 2, 1).astype(np.float32),
                       np.repeat(np.sin(angles), 2, 1).astype(np.float32)))
    out = []
    for k in range(2):  # cos, then sin; broadcast in the graph (a full-size host table would be a huge constant)
        t, h, w = (jnp.asarray(p[k]) for p in tables)
        grid = jnp.concatenate([jnp.broadcast_to(t[:, None, None, :], (*sizes, dims[0])),
                                jnp.broadcast_to(h[None, :, None, :], (*sizes, dims[1])),
                                jnp.broadcast_to(w[None, None, :, :], (*sizes, dims[2]))], axis=-1)
        out.append(grid.reshape(frames * height * width, hd))
    return out[0], out[1]


class WanEditTransformer(nnx.Module):
    """`model(noisy, source, text, timestep) -> flow prediction`, latents (B, F, H, W, C).

    timestep: (B,) one per sample, or (B, N) one per patch token (N = F/pt * H/ph * W/pw, order (f, h, w)).
    """

    def __init__(self, cfg: WanModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = _dtypes(cfg)
        pt, ph, pw = cfg.patch_size
        d = cfg.hidden_size
        kw = dict(rngs=rngs, param_dtype=pdt, dtype=dt)
        self.patch_embedding = Dense((pt, ph, pw, 2 * cfg.in_channels), (d,),
                                     (None, None, None, "conv_in", "embed"), **kw)
        self.time_embedding = TimeEmbedding(cfg, rngs=rngs)
        self.text_embedding = TextEmbedding(cfg, rngs=rngs)

        self.blocks = stack_layers(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.proj_out = Dense((d,), (pt, ph, pw, cfg.out_channels), ("embed", None, None, None, None), **kw)
        self.scale_shift_table = param(rngs, lambda k, s, t: jax.random.normal(k, s, t) / math.sqrt(d), (2, d),
                                       pdt, (None, "embed"))

    def __call__(self, noisy, source, text, timestep):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        pt, ph, pw = cfg.patch_size
        b, f, h, w, _ = noisy.shape
        if f % pt or h % ph or w % pw:
            raise ValueError(f"latent (frames, height, width) {(f, h, w)} is not divisible by the patch {(pt, ph, pw)}")
        gf, gh, gw = f // pt, h // ph, w // pw
        x = jnp.concatenate([noisy.astype(dt), source.astype(dt)], axis=-1)
        x = x.reshape(b, gf, pt, gh, ph, gw, pw, -1).transpose(0, 1, 3, 5, 2, 4, 6, 7)
        x = self.patch_embedding(x.reshape(b, gf * gh * gw, pt, ph, pw, x.shape[-1]))
        x = constrain(x, ("batch", "length", "embed"))

        timestep = jnp.asarray(timestep)
        if timestep.ndim == 1:
            timestep = timestep[:, None]
        temb, temb_proj = self.time_embedding(timestep)  # (B, 1 or N, D), (B, 1 or N, 6, D)
        text = constrain(self.text_embedding(text.astype(dt)), ("batch", None, "embed"))
        rope = rope_tables(cfg, gf, gh, gw)

        x = run_layers(self.blocks, x, lambda block, x: block(x, text, temb_proj, rope), cfg.num_layers,
                       cfg.scan_layers, cfg.remat_policy)

        # The final modulation uses temb itself (not its projection), with its own (shift, scale) table.
        mod = self.scale_shift_table[...].astype(jnp.float32) + temb[:, :, None, :]
        x = _modulated_norm(x, mod[:, :, 0], mod[:, :, 1], cfg.eps, dt)
        x = self.proj_out(x)  # (B, N, pt, ph, pw, C)
        x = x.reshape(b, gf, gh, gw, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, f, h, w, -1).astype(jnp.float32)


def init_edit_from_t2v(model: WanEditTransformer, patch_kernel: np.ndarray, patch_bias: np.ndarray) -> None:
    """Builds the edit patch embedding from a text-to-video model's C-channel one, as InsViE does: copy the
    noisy-stream channels, zero the source channels, copy the bias, so that the fresh edit model equals the
    text-to-video model and ignores the source until it is trained. `patch_kernel` is (pt, ph, pw, C, D)."""
    pe = model.patch_embedding
    kernel = np.zeros(pe.kernel.shape, np.float32)
    kernel[..., : patch_kernel.shape[3], :] = patch_kernel
    pe.kernel[...] = jnp.asarray(kernel, pe.kernel[...].dtype)
    pe.bias[...] = jnp.asarray(patch_bias, pe.bias[...].dtype)


def build(cfg: WanModelConfig, seed: int = 0) -> WanEditTransformer:
    return WanEditTransformer(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: WanModelConfig) -> WanEditTransformer:
    """The model with shapes only (no memory): for parameter counts and sharding plans."""
    return nnx.eval_shape(lambda: WanEditTransformer(cfg, rngs=nnx.Rngs(0)))


def forward_flops(cfg: WanModelConfig, frames: int, height: int, width: int) -> float:
    """Model FLOPs of one forward pass of one sample on a latent clip (frames, height, width): the matmuls and
    the attention products (2 per multiply-add); a training step is 3x."""
    pt, ph, pw = cfg.patch_size
    n = (frames // pt) * (height // ph) * (width // pw)
    length, d, m = cfg.text_length, cfg.hidden_size, cfg.mlp_dim
    self_attn = 2 * n * d * 4 * d + 2 * 2 * n * n * d
    cross_attn = 2 * n * d * 2 * d + 2 * length * d * 2 * d + 2 * 2 * n * length * d
    per_layer = self_attn + cross_attn + 2 * 2 * n * d * m
    patch = pt * ph * pw
    embed = 2 * n * patch * 2 * cfg.in_channels * d + 2 * length * (cfg.text_embed_dim + d) * d
    return float(cfg.num_layers * per_layer + embed + 2 * n * d * patch * cfg.out_channels)
