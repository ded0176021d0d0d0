"""The edit: one guided sampling run of sample.steps steps, latents in, latents out; the text encoder and the
VAE are separate workloads.
- cogvideox: 3-way guidance (`insvie_jax.sample.loop.sample`: one jitted lax.scan, the three branches batched
  in one model call per step); the sampler defaults to diffusers' CogVideoX DPM, so that the reference runs the
  same update.
- wan: `sample.wan_edit.sample_latents` (flow sampler, sample.guidance: lucy 2-way or insvie 3-way) in one
  jitted lax.scan; the reference is LucyEditPipeline's denoising loop (lucy only)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from insvie_jax.bench.timing import Prepared
from insvie_jax.bench.transformer import inference_config, transformer_inputs
from insvie_jax.config import latent_shape
from insvie_jax.convert.models import build_transformer
from insvie_jax.models import family
from insvie_jax.models.params import flat_params
from insvie_jax.sample import loop, wan_edit


def edit(cfg, options: dict) -> Prepared:
    cfg = inference_config(cfg)
    if cfg.model.family == "wan":
        return _wan_edit(cfg)
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
                    flops=3 * steps * family.forward_flops(cfg.model, f, h, w),
                    weights=lambda: flat_params(model), inputs=exchange, dtype=cfg.model.dtype,
                    info={"steps": steps, "sampler": cfg.sample.sampler, "param_dtype": cfg.model.param_dtype})


def _wan_edit(cfg) -> Prepared:
    from flax import nnx

    model = build_transformer(cfg.model, seed=0)
    graphdef, state = nnx.split(model)
    inputs = transformer_inputs(cfg, model)
    settings = wan_edit.settings_from_config(cfg)
    dtype = cfg.model.dtype
    negative = np.zeros_like(inputs["text"])  # the encoded negative prompt (here: zeros, as both sides get it)
    exchange = {"source": inputs["source"], "text": inputs["text"], "negative": negative, "noise": inputs["noisy"]}

    @jax.jit
    def run(state, source, text, negative, noise):
        return wan_edit.sample_latents(nnx.merge(graphdef, state), source, text, negative, noise, settings)

    args = (jnp.asarray(inputs["source"], dtype), jnp.asarray(inputs["text"], dtype), jnp.asarray(negative, dtype),
            jnp.asarray(inputs["noisy"]))
    f, h, w, _ = latent_shape(cfg)
    branches = 2 if settings.guidance == "lucy" else 3
    return Prepared(step=lambda: run(state, *args), flops=branches * settings.steps * family.forward_flops(
                        cfg.model, f, h, w), weights=lambda: flat_params(model), inputs=exchange,
                    compared=np.asarray, dtype=dtype,
                    info={"steps": settings.steps, "sampler": settings.sampler, "guidance": settings.guidance,
                          "param_dtype": cfg.model.param_dtype})
