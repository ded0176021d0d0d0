"""The T5 v1.1 text encoder (CogVideoX's t5-v1_1-xxl) in Flax NNX, and T5-style tokenization.

T5 v1.1 differs from a textbook transformer encoder in ways that all matter for parity: RMS layer norms
(no mean, no bias), attention logits without 1/sqrt(d) scaling, a learned bucketed relative position bias
that is computed once and added in every layer, a gated-GELU (tanh) feed-forward, and no embedding scale.

Layers are stacked on a leading `layers` axis and run under `jax.lax.scan` (or a Python loop with
`scan_layers=False`), as the editing transformer does. The position bias table, which Hugging Face keeps in
block 0, lives on the encoder here so that every block has the same parameters.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax.config import TextEncoderConfig
from insvie_jax.models.layers import Dense, param
from insvie_jax.models.remat import run_layers, stack_layers
from insvie_jax.parallel.sharding import constrain

PAD_ID = 0
EOS_ID = 1


def _dtypes(cfg: TextEncoderConfig):
    return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 bucket of (key position - query position), bidirectional T5 bucketing.

    Half the buckets are for keys after the query. Within a half, distances below a quarter of the buckets
    get one bucket each, larger ones share log-spaced buckets up to `max_distance`, beyond it the last.
    Computed in float32 (as the reference does) so that bucket edges round the same way.
    """
    position = np.arange(length)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    scaled = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact)) / np.float32(
        np.log(max_distance / exact)
    )
    log_bucket = exact + (scaled * np.float32(half - exact)).astype(np.int64)
    bucket = np.where(distance < exact, distance, np.minimum(log_bucket, half - 1))
    return (bucket + (relative > 0) * half).astype(np.int32)


class RMSNorm(nnx.Module):
    """T5 layer norm: x / rms(x) * scale, statistics in float32, no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float, *, rngs: nnx.Rngs, param_dtype=jnp.float32, dtype=jnp.float32):
        self.eps = eps
        self.dtype = dtype
        self.scale = param(rngs, nnx.initializers.ones, (dim,), param_dtype, ("embed",))

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        d, h, dk = cfg.d_model, cfg.num_heads, cfg.d_kv
        self.qkv = Dense((d,), (3, h, dk), ("embed", None, "heads", "head_dim"), rngs=rngs, param_dtype=pdt,
                         dtype=dt, use_bias=False)
        self.out = Dense((h, dk), (d,), ("heads", "head_dim", "embed"), rngs=rngs, param_dtype=pdt, dtype=dt,
                         use_bias=False)

    def __call__(self, x, position_bias, mask):
        qkv = self.qkv(x)  # (B, L, 3, H, Dk)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        # XLA attention: 226 tokens make the (L, L) scores small, and it takes a per-head bias in float32.
        # T5 folds the 1/sqrt(d) scale into its initialisation, hence scale=1.
        out = jax.nn.dot_product_attention(q, k, v, bias=position_bias, mask=mask, scale=1.0, implementation="xla")
        return self.out(out)


class GatedFeedForward(nnx.Module):
    """wo(gelu_tanh(x wi_0) * (x wi_1)); wi_0 and wi_1 are one fused kernel (embed, 2, mlp)."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        self.wi = Dense((cfg.d_model,), (2, cfg.d_ff), ("embed", None, "mlp"), rngs=rngs, param_dtype=pdt, dtype=dt,
                        use_bias=False)
        self.wo = Dense((cfg.d_ff,), (cfg.d_model,), ("mlp", "embed"), rngs=rngs, param_dtype=pdt, dtype=dt,
                        use_bias=False)

    def __call__(self, x):
        hidden = self.wi(x)
        return self.wo(jax.nn.gelu(hidden[..., 0, :], approximate=True) * hidden[..., 1, :])


class Block(nnx.Module):
    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        pdt, dt = _dtypes(cfg)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs, param_dtype=pdt, dtype=dt)
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs, param_dtype=pdt, dtype=dt)
        self.ff = GatedFeedForward(cfg, rngs=rngs)

    def __call__(self, x, position_bias, mask):
        """x: the float32 residual stream (B, L, D); sublayers compute in the configured dtype."""
        x = x + self.attn(self.attn_norm(x), position_bias, mask).astype(jnp.float32)
        x = x + self.ff(self.ff_norm(x)).astype(jnp.float32)
        return constrain(x, ("batch", "length", "embed"))


class T5Encoder(nnx.Module):
    """`encoder(input_ids, attention_mask=None) -> (B, L, d_model)` hidden states in the compute dtype.

    `attention_mask` (B, L), 1 for tokens and 0 for padding, hides padded keys; InsViE passes none and lets
    every token (pads included) attend everywhere.
    """

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = _dtypes(cfg)
        self.embedding = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), pdt,
                               ("vocab", "embed"))
        self.relative_attention_bias = param(rngs, nnx.initializers.normal(1.0),
                                             (cfg.relative_attention_num_buckets, cfg.num_heads), pdt,
                                             (None, "heads"))

        self.blocks = stack_layers(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs, param_dtype=pdt, dtype=dt)

    def position_bias(self, length: int) -> jnp.ndarray:
        """(1, heads, length, length) float32 bias shared by every layer."""
        cfg = self.cfg
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        bias = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), jnp.asarray(buckets), axis=0)
        return bias.transpose(2, 0, 1)[None]

    def __call__(self, input_ids, attention_mask=None):
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        x = jnp.take(self.embedding[...], input_ids, axis=0).astype(jnp.float32)
        x = constrain(x, ("batch", "length", "embed"))
        position_bias = self.position_bias(input_ids.shape[1])
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)[:, None, None, :]

        x = run_layers(self.blocks, x, lambda block, x: block(x, position_bias, mask), cfg.num_layers,
                       cfg.scan_layers)
        return self.final_norm(x)


def build(cfg: TextEncoderConfig, seed: int = 0) -> T5Encoder:
    return T5Encoder(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: TextEncoderConfig) -> T5Encoder:
    """The encoder with shapes only (no memory): for loading onto shardings and for parameter counts."""
    return nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 226) -> tuple[np.ndarray, np.ndarray]:
    """T5 tokenization as CogVideoX does it: truncate, append EOS, pad with id 0 to `max_length`.

    `tokenizer` is a `sentencepiece.SentencePieceProcessor` of a T5 `spiece.model` (see
    `insvie_jax.convert.t5_keys.load_tokenizer`). Returns int32 `(ids, mask)`, each (len(texts), max_length),
    the mask 1 on tokens and EOS. Matches transformers' `T5Tokenizer(..., padding="max_length",
    truncation=True)` on plain text; `<extra_id_N>` and `</s>` written inside a text are not special here.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize() takes a list of texts; wrap a single text as [text]")
    ids = np.full((len(texts), max_length), PAD_ID, np.int32)
    mask = np.zeros((len(texts), max_length), np.int32)
    for row, pieces in enumerate(tokenizer.encode(list(texts), out_type=int)):
        tokens = pieces[: max_length - 1] + [EOS_ID]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask
