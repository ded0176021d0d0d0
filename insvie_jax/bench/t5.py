"""The T5 v1.1 text encoder (XXL in the presets) on one batch of text_encoder.max_length random token ids."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax.bench.timing import Prepared
from insvie_jax.models import t5 as t5_model
from insvie_jax.models.params import flat_params


def encoder_flops(cfg, length: int) -> float:
    """Matmul FLOPs of one sequence through the encoder (attention products included, 2 per multiply-add)."""
    inner = cfg.num_heads * cfg.d_kv
    per_layer = (2 * length * cfg.d_model * 3 * inner + 2 * length * inner * cfg.d_model
                 + 2 * 2 * length * length * inner + 2 * length * cfg.d_model * 2 * cfg.d_ff
                 + 2 * length * cfg.d_ff * cfg.d_model)
    return float(cfg.num_layers * per_layer)


def encode(cfg, options: dict) -> Prepared:
    t5_cfg = dataclasses.replace(cfg.text_encoder, param_dtype=cfg.text_encoder.dtype)
    model = t5_model.build(t5_cfg)
    graphdef, params = nnx.split(model)
    length = t5_cfg.max_length
    ids = np.random.default_rng(0).integers(2, t5_cfg.vocab_size, (1, length)).astype(np.int32)
    device_ids = jnp.asarray(ids)
    run = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids))
    return Prepared(step=lambda: run(params, device_ids), flops=encoder_flops(t5_cfg, length),
                    weights=lambda: flat_params(model), inputs={"ids": ids}, compared=np.asarray,
                    dtype=t5_cfg.dtype, info={"length": length})
