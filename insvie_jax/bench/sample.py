"""The edit: one 3-way-guided sampling run of sample.steps steps (`insvie_jax.sample.loop.sample`: one jitted
lax.scan, the three guidance branches batched in one model call per step), latents in, latents out; the T5
and the VAE are separate workloads. The sampler defaults to diffusers' CogVideoX DPM, so that the reference
runs the same update."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from insvie_jax.bench.timing import Prepared
from insvie_jax.bench.transformer import inference_config, transformer_inputs
from insvie_jax.config import latent_shape
from insvie_jax.convert.models import build_transformer
from insvie_jax.models import transformer
from insvie_jax.models.params import flat_params
from insvie_jax.sample import loop


def edit(cfg, options: dict) -> Prepared:
    cfg = inference_config(cfg)
    model = build_transformer(cfg.model, seed=0)
    inputs = transformer_inputs(cfg, model)
    source = jnp.asarray(inputs["source"])
    text = jnp.asarray(inputs["text"], cfg.model.dtype)
    key = jax.random.key(cfg.sample.seed)
    _, rows = loop.plan_rows(cfg.sample, cfg.diffusion)
    exchange = {"source": inputs["source"], "text": inputs["text"],
                "noise": np.asarray(loop.initial_noise(key, source.shape)),
                "text_scale": np.asarray(rows["text_scale"]), "source_scale": np.asarray(rows["source_scale"])}
    exchange.update({k: v for k, v in inputs.items() if k.startswith("rope")})
    f, h, w, _ = latent_shape(cfg)
    steps = int(rows["index"].shape[0])
    return Prepared(step=lambda: loop.sample(model, source, text, key, cfg.sample, cfg.diffusion, progress=False),
                    flops=3 * steps * transformer.forward_flops(cfg.model, f, h, w),
                    weights=lambda: flat_params(model), inputs=exchange, dtype=cfg.model.dtype,
                    info={"steps": steps, "sampler": cfg.sample.sampler, "param_dtype": cfg.model.param_dtype})
