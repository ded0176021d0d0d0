"""VAE workloads: encode a clip (posterior mean) and decode its latents, frame-batched or tiled (vae.tiling)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax.bench.timing import Prepared
from insvie_jax.config import latent_shape
from insvie_jax.models import vae as vae_model
from insvie_jax.models.params import flat_params


def _build(cfg):
    """Random weights of the config's architecture, stored in the compute dtype (inference)."""
    vae_cfg = dataclasses.replace(cfg.vae, param_dtype=cfg.vae.dtype)
    model = vae_model.build(vae_cfg)
    return model, vae_cfg


def _info(cfg) -> dict:
    v = cfg.vae
    return {"tiling": v.tiling, "encode_frame_batch": v.encode_frame_batch, "decode_frame_batch": v.decode_frame_batch}


def encode(cfg, options: dict) -> Prepared:
    model, vae_cfg = _build(cfg)
    graphdef, params = nnx.split(model)
    d = cfg.data
    video = np.random.default_rng(0).uniform(-1, 1, (1, d.num_frames, d.height, d.width, 3)).astype(np.float32)
    x = jnp.asarray(video, vae_cfg.dtype)
    run = jax.jit(lambda params, x: nnx.merge(graphdef, params).encode(x).mean)
    return Prepared(step=lambda: run(params, x), weights=lambda: flat_params(model), inputs={"video": video},
                    compared=np.asarray, dtype=vae_cfg.dtype, info=_info(cfg))


def decode(cfg, options: dict) -> Prepared:
    model, vae_cfg = _build(cfg)
    graphdef, params = nnx.split(model)
    f, h, w, _ = latent_shape(cfg)
    latents = np.random.default_rng(0).standard_normal((1, f, h, w, vae_cfg.latent_channels)).astype(np.float32)
    z = jnp.asarray(latents, vae_cfg.dtype)
    run = jax.jit(lambda params, z: nnx.merge(graphdef, params).decode(z))
    return Prepared(step=lambda: run(params, z), weights=lambda: flat_params(model), inputs={"latents": latents},
                    compared=np.asarray, dtype=vae_cfg.dtype, info=_info(cfg))
