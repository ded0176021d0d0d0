"""Samplers against diffusers' CogVideoX schedulers, step by step over whole 50-step trajectories, and the
jitted sampling loop against a Python loop of the same step functions.

Tolerance: every state and x0 prediction within STEP_TOL relative error ‖a−b‖/‖b‖ of diffusers' (float32).
The fake model output at each step is a seeded random array; the SDE noise is drawn in the test from a torch
generator twin of the one handed to diffusers' `step`, so both sides add the same noise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax import config as config_lib  # noqa: E402
from insvie_jax.config import DiffusionConfig, SampleConfig  # noqa: E402
from insvie_jax.diffusion import guidance, samplers, schedule  # noqa: E402
from insvie_jax.models import transformer as tr  # noqa: E402
from insvie_jax.sample import loop  # noqa: E402
from _compare import rel  # noqa: E402

STEP_TOL = 1e-6
LOOP_TOL = 1e-5  # jitted scan vs eager Python loop: XLA fuses differently
SHAPE = (2, 3, 4, 6, 16)
STEPS = 50

# CogVideoX-2b's scheduler_config.json (both schedulers).
COGVIDEOX_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=True, steps_offset=0, prediction_type="v_prediction",
    rescale_betas_zero_snr=True, timestep_spacing="trailing", snr_shift_scale=3.0,
)


def fake_model_outputs(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((STEPS, *SHAPE)).astype(np.float32)


def run_ours(plan: samplers.SamplerPlan, x: np.ndarray, outputs: np.ndarray, noises: list):
    rows = plan.arrays()
    x, prev_x0 = jnp.asarray(x), jnp.zeros(SHAPE, jnp.float32)
    states, x0s = [], []
    for i in range(plan.num_steps):
        row = {k: v[i] for k, v in rows.items()}
        x0 = samplers.to_x0(x, jnp.asarray(outputs[i]), row["c_skip"], row["c_out"])
        noise = None if noises[i] is None else jnp.asarray(noises[i])
        x, prev_x0 = samplers.step(row, x, x0, prev_x0, noise), x0
        states.append(np.asarray(x))
        x0s.append(np.asarray(x0))
    return states, x0s


def run_diffusers_dpm(scheduler, x: np.ndarray, outputs: np.ndarray, seed: int):
    """As diffusers' CogVideoX pipeline calls the DPM scheduler; returns states, x0s and the noise each step
    actually added (the scheduler draws once on first-order steps, twice on second-order ones, keeping the last)."""
    generator, twin = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    timesteps = scheduler.timesteps
    latents, old_x0 = torch.from_numpy(x), None
    states, x0s, noises = [], [], []
    for i, t in enumerate(timesteps):
        first_order = old_x0 is None or int(t) - 1000 // STEPS < 0
        noise = [torch.randn(SHAPE, generator=twin) for _ in range(1 if first_order else 2)][-1]
        noises.append(noise.numpy())
        latents, old_x0 = scheduler.step(torch.from_numpy(outputs[i]), old_x0, t,
                                         timesteps[i - 1] if i > 0 else None, latents, generator=generator,
                                         return_dict=False)
        states.append(latents.numpy())
        x0s.append(old_x0.numpy())
    return states, x0s, noises


def start_latents(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)


def assert_trajectories_match(ours, ref, tol=STEP_TOL):
    errors = [rel(a, b) for a, b in zip(ours, ref)]
    assert len(errors) == STEPS and max(errors) <= tol, (max(errors), int(np.argmax(errors)))


def test_cogvideox_dpm_matches_diffusers_every_step():
    scheduler = diffusers.CogVideoXDPMScheduler(**COGVIDEOX_SCHEDULER)
    scheduler.set_timesteps(STEPS)
    x, outputs = start_latents(), fake_model_outputs()
    ref_states, ref_x0s, noises = run_diffusers_dpm(scheduler, x, outputs, seed=5)
    plan = samplers.make_plan("cogvideox_dpm", STEPS, DiffusionConfig())
    np.testing.assert_array_equal(plan.timestep, scheduler.timesteps.numpy())
    states, x0s = run_ours(plan, x, outputs, noises)
    assert_trajectories_match(states, ref_states)
    assert_trajectories_match(x0s, ref_x0s)


def test_ddim_matches_diffusers_every_step():
    scheduler = diffusers.CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER)
    scheduler.set_timesteps(STEPS)
    x, outputs = start_latents(), fake_model_outputs(2)
    latents, ref_states, ref_x0s = torch.from_numpy(x), [], []
    for i, t in enumerate(scheduler.timesteps):
        latents, x0 = scheduler.step(torch.from_numpy(outputs[i]), t, latents, return_dict=False)
        ref_states.append(latents.numpy())
        ref_x0s.append(x0.numpy())
    plan = samplers.make_plan("ddim", STEPS, DiffusionConfig())
    assert not plan.stochastic
    states, x0s = run_ours(plan, x, outputs, [None] * STEPS)
    assert_trajectories_match(states, ref_states)
    assert_trajectories_match(x0s, ref_x0s)


def test_insvie_sampler_update_matches_diffusers_dpm_on_the_same_a_values():
    """SAT's VPSDEDPMPP2MSampler and diffusers' CogVideoXDPMScheduler share the update (λ, h, r, the noise
    term, first-order first step with a = 0, second step first order because a_prev = 0, x0̂ at the last step).
    They differ in the a-values only: SAT rescales a over its 50-step subset (diffusers over the 1000-table)
    and snaps the denoiser's a to the 1000-table. So: give diffusers SAT's subset a-values, give our plan the
    unsnapped c_skip/c_out, and the whole trajectory must agree; the next test checks the a-values themselves."""
    cfg = DiffusionConfig()
    plan = samplers.make_plan("dpmpp_2m_sde", STEPS, cfg)
    subset_a = schedule.sqrt_alphas(cfg, plan.timestep[::-1].astype(int))[::-1]
    scheduler = diffusers.CogVideoXDPMScheduler(**COGVIDEOX_SCHEDULER)
    scheduler.set_timesteps(STEPS)
    np.testing.assert_array_equal(plan.timestep, scheduler.timesteps.numpy())
    table = scheduler.alphas_cumprod.clone()
    table[plan.timestep.astype(int)] = torch.from_numpy(subset_a**2)
    scheduler.alphas_cumprod = table
    c_skip, c_out = schedule.v_scalings(subset_a)
    unsnapped = dataclasses.replace(plan, c_skip=c_skip, c_out=c_out)

    x, outputs = start_latents(3), fake_model_outputs(4)
    ref_states, ref_x0s, noises = run_diffusers_dpm(scheduler, x, outputs, seed=6)
    states, x0s = run_ours(unsnapped, x, outputs, noises)
    assert_trajectories_match(states, ref_states)
    assert_trajectories_match(x0s, ref_x0s)
    np.testing.assert_array_equal(states[-1], x0s[-1])  # the last step returns x0̂ itself


def test_insvie_schedule_pieces():
    cfg = DiffusionConfig()
    plan = samplers.make_plan("dpmpp_2m_sde", STEPS, cfg)
    timesteps = plan.timestep.astype(int)
    np.testing.assert_array_equal(timesteps, np.arange(999, 0, -20))
    subset_a = schedule.sqrt_alphas(cfg, timesteps[::-1])[::-1]
    table = schedule.sqrt_alphas(cfg)
    # Reference §4: a(999) = 0, a(19) = 0.97394, within 1.0e-3 of the 1000-table.
    assert subset_a[0] == 0.0 and round(subset_a[-1], 5) == 0.97394
    assert np.abs(subset_a - table[timesteps]).max() < 1.05e-3
    # The denoiser snaps a(t) to table index t − 1 for t = 19 … 159 and to t elsewhere; the model still gets t.
    snapped = schedule.snap_to_table(subset_a, table)
    np.testing.assert_array_equal(snapped, np.where(timesteps <= 159, timesteps - 1, timesteps))
    np.testing.assert_array_equal(plan.c_skip, table[snapped])
    np.testing.assert_allclose(plan.c_out, -np.sqrt(1 - table[snapped] ** 2), rtol=0, atol=1e-15)
    assert plan.stochastic and np.all(np.isfinite(plan.arrays()["x_coef"]))


def test_timestep_spacings():
    np.testing.assert_array_equal(schedule.sat_timesteps(50), schedule.trailing_timesteps(50))
    for n in (1, 7, 30, 50, 1000):
        scheduler = diffusers.CogVideoXDPMScheduler(**COGVIDEOX_SCHEDULER)
        scheduler.set_timesteps(n)
        np.testing.assert_array_equal(schedule.trailing_timesteps(n), scheduler.timesteps.numpy())
    with pytest.raises(ValueError, match="sample.steps"):
        schedule.sat_timesteps(0)


# ---------------------------------------------------------------------------------------------------
# The jitted loop


@pytest.fixture(scope="module")
def tiny():
    cfg = config_lib.load("tiny")
    model = tr.build(dataclasses.replace(cfg.model, dtype="float32"), seed=0)
    rng = np.random.default_rng(0)
    m = cfg.model
    frames = (m.sample_frames - 1) // m.temporal_compression + 1
    source = jnp.asarray(rng.standard_normal((1, frames, m.sample_height, m.sample_width, m.in_channels)),
                         jnp.float32)
    text = jnp.asarray(rng.standard_normal((1, m.text_length, m.text_embed_dim)), jnp.float32)
    return model, source, text, cfg.diffusion


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_loop_equals_python_loop_of_the_steps(tiny, sampler):
    model, source, text, dcfg = tiny
    scfg = SampleConfig(steps=6, sampler=sampler)
    key = jax.random.key(7)
    final, trajectory = loop.sample(model, source, text, key, scfg, dcfg, progress=False, return_trajectory=True)
    assert trajectory.shape == (6, *source.shape)

    plan, rows = loop.plan_rows(scfg, dcfg)
    source3, text3 = guidance.branch_inputs(source, text)

    @jax.jit  # one step, compiled once, called from a Python loop
    def one_step(x, prev_x0, row):
        x0 = guidance.guided_x0(model, x, source3, text3, row["timestep"], row["c_skip"], row["c_out"],
                                row["text_scale"], row["source_scale"])
        noise = loop.step_noise(key, row["index"], x.shape) if plan.stochastic else None
        return samplers.step(row, x, x0, prev_x0, noise), x0

    x, prev_x0 = loop.initial_noise(key, source.shape), jnp.zeros(source.shape)
    for i in range(plan.num_steps):
        x, prev_x0 = one_step(x, prev_x0, {k: v[i] for k, v in rows.items()})
        assert rel(trajectory[i], x) <= LOOP_TOL, (i, rel(trajectory[i], x))
    np.testing.assert_array_equal(final, trajectory[-1])


def test_loop_is_one_scan_deterministic_per_seed(tiny, capsys):
    model, source, text, dcfg = tiny
    traced = []

    def denoise(noisy, src, txt, t):  # counts traces: one for the whole loop, not one per step
        traced.append(noisy.shape)
        return model(noisy, src, txt, t)

    scfg = SampleConfig()  # 50 steps, InsViE's sampler and guidance
    a = loop.sample(denoise, source, text, jax.random.key(1), scfg, dcfg)
    jax.effects_barrier()
    b = loop.sample(denoise, source, text, jax.random.key(1), scfg, dcfg, progress=False)
    c = loop.sample(denoise, source, text, jax.random.key(2), scfg, dcfg, progress=False)
    assert traced == [(3 * source.shape[0], *source.shape[1:])] * 2  # two compiles (progress on, off)
    np.testing.assert_array_equal(a, b)
    assert rel(a, c) > 0.1 and np.all(np.isfinite(a))
    assert "50/50" in capsys.readouterr().err
