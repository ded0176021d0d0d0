"""Flow matching against diffusers: Euler and UniPC (Wan's settings) step by step over whole trajectories, the
scanned sampling loop against the step function, the training table and noising against diffusers'.

Tolerance: every state within STEP_TOL relative error ‖a−b‖/‖b‖ of diffusers' (float32), with a fixed fake
model output per step (seeded random arrays).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax.diffusion import flow  # noqa: E402
from _compare import rel  # noqa: E402

STEP_TOL = 1e-6
SHAPE = (2, 3, 4, 6, 5)
SHIFT = 5.0  # Wan2.2-TI2V-5B

# Wan2.2-TI2V-5B-Diffusers' scheduler_config.json (UniPCMultistepScheduler).
WAN_UNIPC = dict(
    num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", solver_order=2,
    prediction_type="flow_prediction", thresholding=False, predict_x0=True, solver_type="bh2",
    lower_order_final=True, disable_corrector=[], use_flow_sigmas=True, flow_shift=SHIFT,
    timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero", use_karras_sigmas=False,
)


def outputs_and_start(steps: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((steps, *SHAPE)).astype(np.float32),
            rng.standard_normal(SHAPE).astype(np.float32))


def run_diffusers(scheduler, x: np.ndarray, outputs: np.ndarray):
    latents, states = torch.from_numpy(x), []
    for i, t in enumerate(scheduler.timesteps):
        latents = scheduler.step(torch.from_numpy(outputs[i]), t, latents, return_dict=False)[0]
        states.append(latents.numpy().copy())
    return states


def run_ours(plan: flow.FlowPlan, x: np.ndarray, outputs: np.ndarray):
    rows = plan.arrays()
    x = jnp.asarray(x)
    carry, states = flow.init_carry(x), []
    for i in range(plan.num_steps):
        x, carry = flow.step({k: v[i] for k, v in rows.items()}, x, jnp.asarray(outputs[i]), carry)
        states.append(np.asarray(x))
    return states


def assert_trajectories_match(ours, ref):
    errors = [rel(a, b) for a, b in zip(ours, ref)]
    assert len(errors) == len(ref) and max(errors) <= STEP_TOL, (max(errors), int(np.argmax(errors)))


@pytest.mark.parametrize("steps", [50, 7])
def test_unipc_matches_diffusers_every_step(steps):
    scheduler = diffusers.UniPCMultistepScheduler(**WAN_UNIPC)
    scheduler.set_timesteps(steps)
    plan = flow.make_plan("flow_unipc", steps, SHIFT)
    np.testing.assert_array_equal(plan.timestep, scheduler.timesteps.numpy())
    np.testing.assert_array_equal(plan.sigma.astype(np.float32), scheduler.sigmas.numpy()[:-1])
    outputs, x = outputs_and_start(steps, seed=steps)
    assert_trajectories_match(run_ours(plan, x, outputs), run_diffusers(scheduler, x, outputs))


@pytest.mark.parametrize("steps", [50, 7])
def test_euler_matches_diffusers_every_step(steps):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    scheduler.set_timesteps(steps)
    plan = flow.make_plan("flow_euler", steps, SHIFT)
    np.testing.assert_array_equal(plan.timestep.astype(np.float32), scheduler.timesteps.numpy())
    outputs, x = outputs_and_start(steps, seed=100 + steps)
    assert_trajectories_match(run_ours(plan, x, outputs), run_diffusers(scheduler, x, outputs))


def test_scanned_sample_equals_the_step_loop():
    """`flow.sample` (one lax.scan, velocity from a function of x and t) against the eager step loop."""
    steps = 9
    plan = flow.make_plan("flow_unipc", steps, SHIFT)
    _, x = outputs_and_start(1, seed=3)
    w = jnp.asarray(np.random.default_rng(4).standard_normal(SHAPE[-1]).astype(np.float32))

    def velocity(x, t):  # a fake model that depends on x and t
        return jnp.tanh(x * w) + t / 1000.0

    got = jax.jit(lambda x: flow.sample(velocity, x, plan))(jnp.asarray(x))
    rows, xs, carry = plan.arrays(), jnp.asarray(x), flow.init_carry(jnp.asarray(x))
    for i in range(steps):
        row = {k: v[i] for k, v in rows.items()}
        xs, carry = flow.step(row, xs, velocity(xs, row["timestep"]), carry)
    assert rel(got, xs) <= 1e-5


def test_training_table_and_noising_match_diffusers():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SHIFT)
    np.testing.assert_array_equal(flow.training_sigmas(SHIFT), scheduler.sigmas.numpy())
    sigma, timestep = flow.sample_sigmas(jax.random.key(0), 64, SHIFT)
    assert set(np.asarray(sigma).tolist()) <= set(scheduler.sigmas.numpy().tolist())
    np.testing.assert_allclose(np.asarray(timestep), np.asarray(sigma) * 1000, rtol=1e-7)
    assert float(jnp.mean(sigma)) > 0.6  # the shift puts most draws at the noisy end

    rng = np.random.default_rng(5)
    x0, noise = rng.standard_normal((2, *SHAPE)).astype(np.float32)
    t = scheduler.timesteps[[10, 900]]
    want = torch.cat([scheduler.scale_noise(torch.from_numpy(x0[i:i + 1]), t[i:i + 1], torch.from_numpy(noise[i:i + 1]))
                      for i in range(2)]).numpy()
    got = flow.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(scheduler.sigmas.numpy()[[10, 900]]))
    assert rel(got, want) <= 1e-6
    # the target's x0 estimate recovers x0
    v = flow.velocity_target(jnp.asarray(x0), jnp.asarray(noise))
    x0_hat = got - jnp.asarray(scheduler.sigmas.numpy()[[10, 900]]).reshape(2, 1, 1, 1, 1, 1)[:, 0] * v
    assert rel(x0_hat, x0) <= 1e-5


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="flow_unipc, flow_euler"):
        flow.make_plan("ddim", 10, SHIFT)
