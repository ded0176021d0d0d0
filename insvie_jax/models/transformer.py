"""The CogVideoX diffusion transformer as an instruction-based video editing model (InsViE).

Channels-last throughout: latents (B, F, H, W, C). The noisy target latents and the source-video latents
are concatenated on channels (noisy first) and enter through a 32-channel patch embedding (`proj_edit`,
InsViE's `double_ch`); the projected text is prepended to the video tokens and the joint sequence runs
through full-attention blocks with separate text/video adaLN modulation (reference/insvie.md §1-2, §8).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax.config import ModelConfig
from insvie_jax.models import embeddings
from insvie_jax.models.attention import SplashBlocks, attention
from insvie_jax.models.layers import Dense, LayerNorm
from insvie_jax.models.params import count_params  # noqa: F401 - part of this module's API
from insvie_jax.models.remat import run_layers, stack_layers
from insvie_jax.parallel.sharding import constrain


def _dtypes(cfg: ModelConfig):
    return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)


class AdaNormZero(nnx.Module):
    """Shared LayerNorm, separate (shift, scale, gate) for video and text from the time embedding."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        d = cfg.hidden_size
        self.linear = Dense((cfg.time_embed_dim,), (6 * d,), (None, "embed"), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.norm = LayerNorm(d, cfg.norm_eps, rngs=rngs, param_dtype=pdt, dtype=dt)

    def __call__(self, video, text, temb):
        mod = self.linear(jax.nn.silu(temb))[:, None, :]
        shift, scale, gate, t_shift, t_scale, t_gate = jnp.split(mod, 6, axis=-1)
        video = self.norm(video) * (1 + scale) + shift
        text = self.norm(text) * (1 + t_scale) + t_shift
        return video, text, gate, t_gate


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.attention_head_dim
        self.qkv = Dense((d,), (3, h, hd), ("embed", None, "heads", "head_dim"), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.norm_q = LayerNorm(hd, cfg.qk_norm_eps, ("head_dim",), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.norm_k = LayerNorm(hd, cfg.qk_norm_eps, ("head_dim",), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.out = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.implementation = cfg.attention
        self.splash_blocks = SplashBlocks.from_config(cfg)
        self.qkv_lora = self.out_lora = None  # LoRA adapters, attached by models/lora.add_lora

    def __call__(self, x, text_length: int, rope):
        qkv = self.qkv(x)  # (B, L, 3, H, Dh)
        if self.qkv_lora is not None:
            qkv = qkv + self.qkv_lora(x)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q, k = self.norm_q(q), self.norm_k(k)
        if rope is not None:  # rotary positions on the video tokens only
            cos, sin = rope
            q = jnp.concatenate([q[:, :text_length], embeddings.apply_rope(q[:, text_length:], cos, sin)], axis=1)
            k = jnp.concatenate([k[:, :text_length], embeddings.apply_rope(k[:, text_length:], cos, sin)], axis=1)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        out = attention(q, k, v, self.implementation, self.splash_blocks)
        if self.out_lora is not None:
            return self.out(out) + self.out_lora(out)
        return self.out(out)


class FeedForward(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        self.w1 = Dense((cfg.hidden_size,), (cfg.mlp_dim,), ("embed", "mlp"), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.w2 = Dense((cfg.mlp_dim,), (cfg.hidden_size,), ("mlp", "embed"), rngs=rngs, param_dtype=pdt, dtype=dt)

    def __call__(self, x):
        return self.w2(_gelu(self.w1(x)))


@jax.checkpoint
def _gelu(x):
    # Rematerialised: keeps only the input of the tanh-approximate GELU for the backward pass.
    return jax.nn.gelu(x, approximate=True)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.norm1 = AdaNormZero(cfg, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = AdaNormZero(cfg, rngs=rngs)
        self.ff = FeedForward(cfg, rngs=rngs)

    def __call__(self, x, temb, text_length: int, rope):
        """x: the joint [text | video] sequence (B, L, D)."""
        text, video = x[:, :text_length], x[:, text_length:]
        n_video, n_text, gate, t_gate = self.norm1(video, text, temb)
        attn = self.attn(jnp.concatenate([n_text, n_video], axis=1), text_length, rope)
        video = video + gate * attn[:, text_length:]
        text = text + t_gate * attn[:, :text_length]
        n_video, n_text, gate, t_gate = self.norm2(video, text, temb)
        ff = self.ff(jnp.concatenate([n_text, n_video], axis=1))
        video = video + gate * ff[:, text_length:]
        text = text + t_gate * ff[:, :text_length]
        return constrain(jnp.concatenate([text, video], axis=1), ("batch", "length", "embed"))


class PatchEmbed(nnx.Module):
    """Noisy + source latents -> video tokens; text embeddings -> text tokens.

    `double_ch`: one 2x2 patch projection of all 2C channels (InsViE's `proj_edit`).
    `fix_proj`: the pretrained C-channel `proj` on the noisy stream, a zero-initialised `proj_edit` on the
    source stream, their features concatenated and merged by `proj_edit_merge` (reference §1, unreleased).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
        conv_axes = (None, None, "conv_in", "embed")
        self.mode = cfg.patch_embed
        self.patch_size = p
        if self.mode == "double_ch":
            self.proj_edit = Dense((p, p, 2 * c), (d,), conv_axes, rngs=rngs, param_dtype=pdt, dtype=dt)
        else:
            self.proj = Dense((p, p, c), (d,), conv_axes, rngs=rngs, param_dtype=pdt, dtype=dt)
            self.proj_edit = Dense((p, p, c), (d,), conv_axes, rngs=rngs, param_dtype=pdt, dtype=dt,
                                   kernel_init=nnx.initializers.zeros)
            self.proj_edit_merge = Dense((2 * d,), (d,), ("mlp", "embed"), rngs=rngs, param_dtype=pdt, dtype=dt,
                                         kernel_init=nnx.initializers.xavier_uniform())
        self.text_proj = Dense((cfg.text_embed_dim,), (d,), (None, "embed"), rngs=rngs, param_dtype=pdt, dtype=dt)

    def _patches(self, x):
        b, f, h, w, c = x.shape
        p = self.patch_size
        x = x.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, f * (h // p) * (w // p), p, p, c)  # tokens ordered (t, h', w')

    def __call__(self, noisy, source, text):
        if self.mode == "double_ch":
            video = self.proj_edit(self._patches(jnp.concatenate([noisy, source], axis=-1)))
        else:
            feats = jnp.concatenate([self.proj(self._patches(noisy)), self.proj_edit(self._patches(source))], -1)
            video = self.proj_edit_merge(feats)
        return self.text_proj(text), video


class TimeEmbedding(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        t = cfg.time_embed_dim
        self.hidden = cfg.hidden_size
        self.linear_1 = Dense((cfg.hidden_size,), (t,), (None, None), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.linear_2 = Dense((t,), (t,), (None, None), rngs=rngs, param_dtype=pdt, dtype=dt)

    def __call__(self, timestep):
        emb = embeddings.timestep_embedding(timestep, self.hidden)
        return self.linear_2(jax.nn.silu(self.linear_1(emb)))


class AdaNormOut(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        d = cfg.hidden_size
        self.linear = Dense((cfg.time_embed_dim,), (2 * d,), (None, "embed"), rngs=rngs, param_dtype=pdt, dtype=dt)
        self.norm = LayerNorm(d, cfg.norm_out_eps, rngs=rngs, param_dtype=pdt, dtype=dt)

    def __call__(self, x, temb):
        shift, scale = jnp.split(self.linear(jax.nn.silu(temb))[:, None, :], 2, axis=-1)  # shift first
        return self.norm(x) * (1 + scale) + shift


class EditTransformer(nnx.Module):
    """`model(noisy, source, text, timestep) -> v-prediction`, all latents (B, F, H, W, C)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = _dtypes(cfg)
        self.patch_embed = PatchEmbed(cfg, rngs=rngs)
        self.time_embedding = TimeEmbedding(cfg, rngs=rngs)

        self.blocks = stack_layers(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm_final = LayerNorm(cfg.hidden_size, cfg.norm_eps, rngs=rngs, param_dtype=pdt, dtype=dt)
        self.norm_out = AdaNormOut(cfg, rngs=rngs)
        p = cfg.patch_size
        self.proj_out = Dense((cfg.hidden_size,), (p * p * cfg.out_channels,), ("embed", None), rngs=rngs,
                              param_dtype=pdt, dtype=dt)

    def positions(self, frames: int, height: int, width: int):
        """Host-side position tables for a latent clip of (frames, height, width): sin-cos or RoPE."""
        cfg = self.cfg
        gh, gw = height // cfg.patch_size, width // cfg.patch_size
        if cfg.positions == "sincos":
            return embeddings.sincos_3d(cfg.hidden_size, frames, gh, gw, cfg.spatial_interpolation_scale,
                                        cfg.temporal_interpolation_scale)
        base_h, base_w = cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
        return embeddings.rope_3d(cfg.attention_head_dim, frames, gh, gw, base_h, base_w, cfg.rope_theta)

    def __call__(self, noisy, source, text, timestep):
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        b, f, h, w, _ = noisy.shape
        text_length = text.shape[1]
        temb = self.time_embedding(timestep)
        text_tokens, video_tokens = self.patch_embed(noisy.astype(dt), source.astype(dt), text.astype(dt))
        positions = self.positions(f, h, w)
        rope = None
        if cfg.positions == "sincos":
            video_tokens = (video_tokens + positions[None]).astype(dt)
        else:
            rope = positions
        x = constrain(jnp.concatenate([text_tokens, video_tokens], axis=1), ("batch", "length", "embed"))

        x = run_layers(self.blocks, x, lambda block, x: block(x, temb, text_length, rope), cfg.num_layers,
                       cfg.scan_layers, cfg.remat_policy)

        video = self.norm_final(x[:, text_length:])
        video = self.proj_out(self.norm_out(video, temb))
        p, c = cfg.patch_size, cfg.out_channels
        # Unpatchify with feature order (c, p, q), as the reference's proj_out lays features out.
        video = video.reshape(b, f, h // p, w // p, c, p, p).transpose(0, 1, 2, 5, 3, 6, 4)
        return video.reshape(b, f, h, w, c).astype(jnp.float32)


def init_edit_from_t2v(model: EditTransformer, proj_kernel: np.ndarray, proj_bias: np.ndarray) -> None:
    """Builds the edit patch embedding from a text-to-video model's 16-channel patch projection.

    As InsViE does: copy the noisy-stream channels, zero the source channels, copy the bias, so that the
    fresh edit model equals the text-to-video model and ignores the source until it is trained.
    `proj_kernel` is (p, p, C, D) (ours; a PyTorch OIHW weight transposed by (2, 3, 1, 0)).
    """
    pe = model.patch_embed
    dtype = pe.proj_edit.kernel[...].dtype
    if pe.mode == "double_ch":
        kernel = np.zeros(pe.proj_edit.kernel.shape, np.float32)
        c = proj_kernel.shape[2]
        kernel[:, :, :c] = proj_kernel
        pe.proj_edit.kernel[...] = jnp.asarray(kernel, dtype)
        pe.proj_edit.bias[...] = jnp.asarray(proj_bias, dtype)
    else:
        pe.proj.kernel[...] = jnp.asarray(proj_kernel, dtype)
        pe.proj.bias[...] = jnp.asarray(proj_bias, dtype)
        pe.proj_edit.kernel[...] = jnp.zeros_like(pe.proj_edit.kernel[...])


def build(cfg: ModelConfig, seed: int = 0) -> EditTransformer:
    return EditTransformer(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: ModelConfig) -> EditTransformer:
    """The model with shapes only (no memory): for parameter counts and sharding plans."""
    return nnx.eval_shape(lambda: EditTransformer(cfg, rngs=nnx.Rngs(0)))


def forward_flops(cfg: ModelConfig, frames: int, height: int, width: int) -> float:
    """Model FLOPs of one forward pass of one sample on a latent clip (frames, height, width): the matmuls and
    the attention products (2 per multiply-add); a training step is 3x. XLA's cost analysis cannot count these:
    it sees neither the scanned layers' trip count nor the cuDNN attention custom call."""
    p = cfg.patch_size
    video = frames * (height // p) * (width // p)
    n = video + cfg.text_length
    d, m = cfg.hidden_size, cfg.mlp_dim
    per_layer = 2 * n * d * 3 * d + 2 * n * d * d + 2 * 2 * n * d * m + 2 * 2 * n * n * d
    embed = 2 * video * (p * p * 2 * cfg.in_channels) * d + 2 * cfg.text_length * cfg.text_embed_dim * d
    return float(cfg.num_layers * per_layer + embed + 2 * video * d * p * p * cfg.out_channels)

