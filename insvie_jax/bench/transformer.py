"""Transformer workloads: forward, forward + backward (remat policy and LoRA from the config), attention; the edit
transformer of `model.family` (CogVideoX or Wan)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax.bench.timing import Prepared
from insvie_jax.config import latent_shape
from insvie_jax.convert.models import build_transformer
from insvie_jax.models import family
from insvie_jax.models.attention import attention as attention_fn
from insvie_jax.models.params import flat_params


def transformer_inputs(cfg, model, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Random latents of the config's clip, text embeddings, timestep 500 and a regression target (numpy);
    the 3D RoPE tables too when the model uses them (the reference takes them as they are)."""
    rng = np.random.default_rng(seed)
    f, h, w, c = latent_shape(cfg)
    m = cfg.model
    inputs = {
        "noisy": rng.standard_normal((batch, f, h, w, c), np.float32),
        "source": rng.standard_normal((batch, f, h, w, c), np.float32),
        "text": rng.standard_normal((batch, m.text_length, m.text_embed_dim), np.float32),
        "target": rng.standard_normal((batch, f, h, w, m.out_channels), np.float32),
        "timestep": np.full((batch,), 500.0, np.float32),
    }
    if getattr(m, "positions", None) == "rope":  # CogVideoX-5B (Wan computes its RoPE tables inside)
        cos, sin = model.positions(f, h, w)
        inputs["rope_cos"], inputs["rope_sin"] = np.asarray(cos, np.float32), np.asarray(sin, np.float32)
    return inputs


def _device_inputs(inputs: dict, dtype) -> dict:
    """Model inputs in the compute dtype as ours and the reference take them (target, timestep in float32)."""
    keep = {"target", "timestep"}
    return {k: jnp.asarray(v, jnp.float32 if k in keep else dtype) for k, v in inputs.items()
            if not k.startswith("rope")}


def inference_config(cfg):
    """Inference keeps weights in the compute dtype (no fp32 master copy)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype=cfg.model.dtype))


def _flops(cfg, batch: int) -> float:
    f, h, w, _ = latent_shape(cfg)
    return family.forward_flops(cfg.model, f, h, w) * batch


def forward(cfg, options: dict) -> Prepared:
    """One forward pass, batch 1, weights in the compute dtype."""
    cfg = cfg if options.get("keep_param_dtype") else inference_config(cfg)
    model = build_transformer(cfg.model, seed=0)
    graphdef, params = nnx.split(model)
    inputs = transformer_inputs(cfg, model)
    batch = _device_inputs(inputs, cfg.model.dtype)

    @jax.jit
    def run(params, batch):
        return nnx.merge(graphdef, params)(batch["noisy"], batch["source"], batch["text"], batch["timestep"])

    return Prepared(step=lambda: run(params, batch), flops=_flops(cfg, 1), weights=lambda: flat_params(model),
                    inputs=inputs, compared=np.asarray, dtype=cfg.model.dtype,
                    info={"param_dtype": cfg.model.param_dtype})


def loss_and_grads(graphdef):
    """`(trainable, frozen, batch) -> (loss, grads of trainable, output)`: the fwd+bwd workload (not jitted;
    tools/memory_analysis.py compiles the same function for a TPU chip)."""

    def run(trainable, frozen, batch):
        def loss(trainable):
            out = nnx.merge(graphdef, trainable, frozen)(batch["noisy"], batch["source"], batch["text"],
                                                        batch["timestep"])
            return jnp.mean(jnp.square(out - batch["target"])), out

        (value, out), grads = jax.value_and_grad(loss, has_aux=True)(trainable)
        return value, grads, out

    return run


def forward_backward(cfg, options: dict) -> Prepared:
    """Loss and gradients of the trained parameters (all, or LoRA adapters + `lora.also_train`), the
    parameters in model.param_dtype (bf16 in this workload, as the reference), batch 1."""
    from insvie_jax.train import state as statelib

    model = statelib.trained_model(cfg)
    graphdef, trainable, frozen = statelib.split_model(model, cfg)
    inputs = transformer_inputs(cfg, model)
    batch = _device_inputs(inputs, cfg.model.dtype)
    run = jax.jit(loss_and_grads(graphdef))

    return Prepared(step=lambda: run(trainable, frozen, batch), flops=3 * _flops(cfg, 1),
                    weights=None if cfg.lora.enabled else (lambda: flat_params(model)), inputs=inputs,
                    compared=lambda out: np.asarray(out[2]), dtype=cfg.model.dtype,
                    info={"remat": cfg.model.remat_policy, "lora": cfg.lora.enabled,
                          "param_dtype": cfg.model.param_dtype})


def attention(cfg, options: dict) -> Prepared:
    """Attention forward + backward at the model's sequence (text + video tokens of the clip), its heads and
    head size, with model.attention's implementation ("auto": cuDNN on GPU, splash on TPU)."""
    m = cfg.model
    f, h, w, _ = latent_shape(cfg)
    if m.family == "wan":  # video tokens only: Wan attends to the text in a separate cross-attention
        pt, ph, pw = m.patch_size
        length = (f // pt) * (h // ph) * (w // pw)
    else:
        length = m.text_length + f * (h // m.patch_size) * (w // m.patch_size)
    rng = np.random.default_rng(0)
    shape = (1, length, m.num_attention_heads, m.attention_head_dim)
    inputs = {n: rng.standard_normal(shape, np.float32) for n in ("q", "k", "v")}
    q, k, v = (jnp.asarray(inputs[n], m.dtype) for n in ("q", "k", "v"))

    @jax.jit
    def run(q, k, v):
        def total(q, k, v):
            out = attention_fn(q, k, v, m.attention)
            return jnp.sum(out.astype(jnp.float32)), out

        (_, out), grads = jax.value_and_grad(total, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return out, grads

    # forward: QK^T and PV (2 flops per multiply-add each); backward: 2.5x that (dQ, dK, dV, dP, recomputed P)
    flops = 3.5 * 4 * length * length * m.num_attention_heads * m.attention_head_dim
    return Prepared(step=lambda: run(q, k, v), flops=flops, inputs=inputs, compared=lambda out: np.asarray(out[0]),
                    dtype=m.dtype, info={"length": length, "implementation": m.attention})
