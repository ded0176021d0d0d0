"""The UMT5 text encoder (Wan's umt5-xxl, transformers' `UMT5EncoderModel`) in Flax NNX.

UMT5 is T5 v1.1 (models/t5.py: RMS norms, unscaled attention logits, gated tanh-GELU feed-forward) with one
difference: EVERY layer has its own learned relative position bias table, where T5 computes one in layer 0
and shares it. The bucket map is the same and is computed once; each layer looks up its own table in it.
Wan encodes 512 tokens with the padding mask and zeroes the states past each prompt's length (`prompt_states`).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from insvie_jax.config import TextEncoderConfig
from insvie_jax.models import t5
from insvie_jax.models.layers import param
from insvie_jax.models.params import count_params  # noqa: F401 - part of this module's API
from insvie_jax.models.remat import run_layers, stack_layers
from insvie_jax.parallel.sharding import constrain


def umt5_xxl_config(**overrides) -> TextEncoderConfig:
    """google/umt5-xxl's sizes (Wan 2.x's text encoder) with Wan's 512 tokens."""
    sizes = dict(max_length=512, vocab_size=256384, d_model=4096, d_kv=64, num_heads=64, num_layers=24, d_ff=10240,
                 relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6)
    return TextEncoderConfig(**{**sizes, **overrides})


class Block(t5.Block):
    """A T5 block that owns its relative position bias table (buckets, heads)."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.relative_attention_bias = param(rngs, nnx.initializers.normal(1.0),
                                             (cfg.relative_attention_num_buckets, cfg.num_heads),
                                             jnp.dtype(cfg.param_dtype), (None, "heads"))

    def __call__(self, x, buckets, mask):
        bias = jnp.take(self.relative_attention_bias[...].astype(jnp.float32), buckets, axis=0)  # (L, L, H)
        return super().__call__(x, bias.transpose(2, 0, 1)[None], mask)


class UMT5Encoder(nnx.Module):
    """`encoder(input_ids, attention_mask=None) -> (B, L, d_model)` hidden states in the compute dtype;
    `attention_mask` (B, L), 1 for tokens and 0 for padding, hides padded keys (Wan passes it)."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt, dt = jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)
        self.embedding = param(rngs, nnx.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), pdt,
                               ("vocab", "embed"))

        self.blocks = stack_layers(lambda r: Block(cfg, rngs=r), cfg.num_layers, rngs)
        self.final_norm = t5.RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, rngs=rngs, param_dtype=pdt, dtype=dt)

    def __call__(self, input_ids, attention_mask=None):
        cfg = self.cfg
        input_ids = jnp.asarray(input_ids)
        x = jnp.take(self.embedding[...], input_ids, axis=0).astype(jnp.float32)
        x = constrain(x, ("batch", "length", "embed"))
        buckets = jnp.asarray(t5.relative_position_buckets(input_ids.shape[1], cfg.relative_attention_num_buckets,
                                                           cfg.relative_attention_max_distance))
        mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)[:, None, None, :]

        x = run_layers(self.blocks, x, lambda block, x: block(x, buckets, mask), cfg.num_layers, cfg.scan_layers)
        return self.final_norm(x)


def prompt_states(encoder: UMT5Encoder, input_ids, attention_mask) -> jnp.ndarray:
    """Wan's prompt embeddings: the encoder states with the padding mask, zero past each prompt's tokens."""
    states = encoder(input_ids, attention_mask)
    return states * jnp.asarray(attention_mask, states.dtype)[..., None]


def build(cfg: TextEncoderConfig, seed: int = 0) -> UMT5Encoder:
    return UMT5Encoder(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: TextEncoderConfig) -> UMT5Encoder:
    """The encoder with shapes only (no memory): for loading and parameter counts."""
    return nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0)))

