"""Guided flow sampling with the Wan edit model: a whole Lucy-Edit denoising loop (diffusers' transformer, UniPC
with Wan's settings, TI2V per-token timesteps, 2-way CFG, exactly as `LucyEditPipeline.__call__` runs it) against
ours in one lax.scan; and the batched 3-way (InsViE) guidance against three separate calls.

Tolerances: LOOP_TOL relative error of the final latents (model ≤1e-5 per call, a few steps); batched vs
separate calls of the same fp32 model ≤ BATCH_TOL.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax.diffusion import flow, flow_guidance  # noqa: E402
from _compare import rel  # noqa: E402
from test_wan_flow import SHIFT, WAN_UNIPC  # noqa: E402
from test_wan_transformer import TINY, ours_from, reference  # noqa: E402

LOOP_TOL = 2e-5
BATCH_TOL = 1e-6
STEPS = 4
SIZE = (3, 6, 10)  # latent frames, height, width


def test_lucy_edit_loop_matches_diffusers():
    ref = reference(TINY, seed=21)
    model = ours_from(ref, TINY)
    rng = np.random.default_rng(22)
    shape = (1, *SIZE, TINY.in_channels)
    noise, source = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    text, negative = (rng.standard_normal((1, TINY.text_length, TINY.text_embed_dim)).astype(np.float32)
                      for _ in range(2))
    scale = 5.0

    # diffusers: LucyEditPipeline's denoising loop, channels-first, expand_timesteps on.
    scheduler = diffusers.UniPCMultistepScheduler(**WAN_UNIPC)
    scheduler.set_timesteps(STEPS)
    latents = torch.from_numpy(noise).permute(0, 4, 1, 2, 3)
    condition = torch.from_numpy(source).permute(0, 4, 1, 2, 3)
    mask = torch.ones(latents.shape, dtype=torch.float32)
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_input = torch.cat([latents, condition], dim=1)
            timestep = (mask[0][0][:, ::2, ::2] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)
            cond = ref(model_input, timestep, torch.from_numpy(text), return_dict=False)[0]
            uncond = ref(model_input, timestep, torch.from_numpy(negative), return_dict=False)[0]
            noise_pred = uncond + scale * (cond - uncond)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    want = latents.permute(0, 2, 3, 4, 1).numpy()

    plan = flow.make_plan("flow_unipc", STEPS, SHIFT)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, noise, source, text, negative):
        model_fn = nnx.merge(graphdef, state)
        source2, text2 = flow_guidance.two_way_inputs(source, text, negative)
        return flow.sample(lambda x, t: flow_guidance.two_way_velocity(model_fn, x, source2, text2, t, scale),
                           noise, plan)

    got = run(state, noise, source, text, negative)
    assert rel(got, want) <= LOOP_TOL, rel(got, want)


def test_three_way_batched_equals_separate_calls():
    ref = reference(TINY, seed=23)
    model = ours_from(ref, TINY)
    rng = np.random.default_rng(24)
    x, source = (rng.standard_normal((2, *SIZE, TINY.in_channels)).astype(np.float32) for _ in range(2))
    text = rng.standard_normal((2, TINY.text_length, TINY.text_embed_dim)).astype(np.float32)
    negative = rng.standard_normal((1, TINY.text_length, TINY.text_embed_dim)).astype(np.float32)
    t, s_txt, s_src = 731.0, 6.5, 1.7
    tt = np.full((2,), t, np.float32)
    negative2 = np.broadcast_to(negative, text.shape)

    source3, text3 = flow_guidance.three_way_inputs(source, text, negative)
    got = flow_guidance.three_way_velocity(model, x, source3, text3, t, s_txt, s_src)
    uu = np.asarray(model(x, np.zeros_like(source), negative2, tt))
    cu = np.asarray(model(x, source, negative2, tt))
    cc = np.asarray(model(x, source, text, tt))
    assert rel(got, uu + s_src * (cu - uu) + s_txt * (cc - cu)) <= BATCH_TOL

    # InsViE's default: zero text in the unconditional branches.
    source3, text3 = flow_guidance.three_way_inputs(source, text)
    got = flow_guidance.three_way_velocity(model, x, source3, text3, t, 1.0, 1.0)  # scales 1: the cc branch
    assert rel(got, cc) <= BATCH_TOL
