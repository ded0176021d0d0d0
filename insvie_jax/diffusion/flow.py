"""Flow matching as Wan trains and samples it: the rectified-flow objective with timestep shift, and the
flow-matching Euler and UniPC samplers as tables stepped in one `lax.scan`.

Rectified flow: x_σ = (1 − σ)·x0 + σ·ε, the model predicts the velocity v = ε − x0 (diffusers'
`flow_prediction`), so x0̂ = x − σ·v; the model's timestep is 1000·σ. Wan shifts σ towards the noisy end:
σ' = s·σ / (1 + (s − 1)·σ) (s = 5 for Wan2.2-TI2V-5B).

Samplers as tables: every step's coefficients are computed on the host in float64 from diffusers' float32
sigmas, and one generic update covers both samplers:

    m0     = x − σ·v                                                   (x0̂ of this step)
    xc     = c_x·x + c_last·x_last + c_m0·m0 + c_m1·m1 + c_m2·m2        (UniC corrector; Euler: xc = x)
    x_next = p_x·xc + p_v·v + p_m0·m0 + p_m1·m1                        (UniP predictor; Euler: x + dσ·v)

with m1, m2 the x0̂ of the two previous steps and x_last the previous step's corrected sample.
- `flow_euler`: diffusers' `FlowMatchEulerDiscreteScheduler(shift=s)` (its timesteps: linspace between the
  shifted training table's ends, shifted again, as diffusers does).
- `flow_unipc`: diffusers' `UniPCMultistepScheduler` as Wan configures it (flow_prediction, use_flow_sigmas,
  flow_shift s, solver_order 2, bh2, predict_x0, lower_order_final, final sigma 0, linspace spacing).
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from insvie_jax.config.schema import FlowSampler

FLOW_SAMPLERS = typing.get_args(FlowSampler)  # the schema's list (sample.sampler); make_plan has one branch each


def shift_sigmas(sigma, shift: float):
    """Wan's timestep shift σ' = s·σ / (1 + (s − 1)·σ) (numpy or jax, any dtype)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


# ---------------------------------------------------------------------------------------------------
# Training objective


def training_sigmas(shift: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """The shifted training table of diffusers' FlowMatchEulerDiscreteScheduler, noisiest first, float32:
    σ = shift(t / T) for t = T … 1."""
    t = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1]
    return shift_sigmas(t / np.float32(num_train_timesteps), np.float32(shift)).astype(np.float32)


def sample_sigmas(key: jax.Array, batch: int, shift: float, num_train_timesteps: int = 1000):
    """(σ, timestep) per sample (B,), float32: an index drawn uniformly from the shifted training table;
    the model's timestep is 1000·σ, as in sampling."""
    table = jnp.asarray(training_sigmas(shift, num_train_timesteps))
    sigma = table[jax.random.randint(key, (batch,), 0, num_train_timesteps)]
    return sigma, sigma * num_train_timesteps


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, sigma: jnp.ndarray) -> jnp.ndarray:
    """x_σ = (1 − σ)·x0 + σ·ε with σ per sample (B,)."""
    sigma = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * noise


def velocity_target(x0: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
    """The rectified-flow target v = ε − x0 (so that x0 = x_σ − σ·v)."""
    return noise - x0


# ---------------------------------------------------------------------------------------------------
# Samplers


@dataclasses.dataclass(frozen=True)
class FlowPlan:
    """One row per model call, float64 (num_steps,) each; see the module docstring for the update."""

    timestep: np.ndarray  # given to the model (diffusers' value: 1000·σ, truncated to an integer by UniPC)
    sigma: np.ndarray
    c_x: np.ndarray
    c_last: np.ndarray
    c_m0: np.ndarray
    c_m1: np.ndarray
    c_m2: np.ndarray
    p_x: np.ndarray
    p_v: np.ndarray
    p_m0: np.ndarray
    p_m1: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timestep)

    def arrays(self, dtype=jnp.float32) -> dict[str, jnp.ndarray]:
        """The rows as device arrays (cast on the host so that float64 rounds once), for `lax.scan`."""
        return {f.name: jnp.asarray(np.asarray(getattr(self, f.name)).astype(dtype)) for f in dataclasses.fields(self)}


def init_carry(x: jnp.ndarray):
    """(x_last, m1, m2) before the first step (multiplied by zero coefficients there)."""
    return (jnp.zeros_like(x), jnp.zeros_like(x), jnp.zeros_like(x))


def step(row: dict, x: jnp.ndarray, v: jnp.ndarray, carry: tuple):
    """(x_next, carry) from one plan row, the model's velocity v at x, and the carry of the previous step."""
    x_last, m1, m2 = carry
    m0 = x - row["sigma"] * v
    xc = row["c_x"] * x + row["c_last"] * x_last + row["c_m0"] * m0 + row["c_m1"] * m1 + row["c_m2"] * m2
    x_next = row["p_x"] * xc + row["p_v"] * v + row["p_m0"] * m0 + row["p_m1"] * m1
    return x_next, (xc, m0, m1)


def make_plan(sampler: str, num_steps: int, shift: float, num_train_timesteps: int = 1000) -> FlowPlan:
    if num_steps < 1:
        raise ValueError(f"sampling steps = {num_steps}: must be at least 1 (sample.steps)")
    if sampler == "flow_euler":
        return _euler(num_steps, shift, num_train_timesteps)
    if sampler == "flow_unipc":
        return _unipc(num_steps, shift, num_train_timesteps)
    raise ValueError(f"unknown flow sampler '{sampler}': expected one of {', '.join(FLOW_SAMPLERS)} (sample.sampler)")


def _euler(n: int, shift: float, num_train: int) -> FlowPlan:
    table = training_sigmas(shift, num_train)
    sigma_max, sigma_min = float(table[0]), float(table[-1])
    t = np.linspace(sigma_max * num_train, sigma_min * num_train, n)
    s = np.append(shift_sigmas(t / num_train, shift).astype(np.float32), np.float32(0.0))
    timestep = (s[:-1] * np.float32(num_train)).astype(np.float32)
    zeros, ones = np.zeros(n), np.ones(n)
    dt = (s[1:] - s[:-1]).astype(np.float64)  # float32 difference, as diffusers takes it
    return FlowPlan(timestep=timestep.astype(np.float64), sigma=s[:-1].astype(np.float64), c_x=ones, c_last=zeros,
                    c_m0=zeros, c_m1=zeros, c_m2=zeros, p_x=ones, p_v=dt, p_m0=zeros, p_m1=zeros)


def _unipc(n: int, shift: float, num_train: int) -> FlowPlan:
    s = np.linspace(1, 1 / num_train, n + 1)[:-1]
    s = shift_sigmas(s, shift)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6  # diffusers: keeps log(σ) and log(1 − σ) finite at the first step
    timestep = (s * num_train).astype(np.int64).astype(np.float64)
    s = np.append(s, 0.0).astype(np.float32).astype(np.float64)
    alpha = 1 - s
    with np.errstate(divide="ignore"):
        lam = np.log(alpha) - np.log(s)  # +inf at the final σ = 0
    # Orders as diffusers' warm-up and lower_order_final give them: the predictor at step i has order p[i],
    # the corrector at step i (i ≥ 1) the previous predictor's order.
    order = np.minimum(np.minimum(2, n - np.arange(n)), np.arange(n) + 1)
    rows = {k: np.zeros(n) for k in ("c_x", "c_last", "c_m0", "c_m1", "c_m2", "p_x", "p_v", "p_m0", "p_m1")}
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(n):
            # UniP: from σ_i to σ_{i+1} with m0 = x0̂_i (and m1 = x0̂_{i−1} at order 2).
            h = lam[i + 1] - lam[i]
            h_phi_1 = np.expm1(-h)
            rows["p_x"][i] = s[i + 1] / s[i]
            rows["p_m0"][i] = -alpha[i + 1] * h_phi_1
            if order[i] == 2:
                rk = (lam[i - 1] - lam[i]) / h
                d = alpha[i + 1] * h_phi_1 * 0.5 / rk  # B_h = h_phi_1 for bh2; rho_p = 0.5
                rows["p_m0"][i] += d
                rows["p_m1"][i] = -d
            if i == 0:
                rows["c_x"][i] = 1.0
                continue
            # UniC: redo the step σ_{i−1} -> σ_i from x_last with m0 = x0̂_{i−1}, using the new x0̂_i.
            h = lam[i] - lam[i - 1]
            hh = -h
            h_phi_1 = np.expm1(hh)
            b_h = h_phi_1
            a = alpha[i]
            rows["c_last"][i] = s[i] / s[i - 1]
            rows["c_m1"][i] = -a * h_phi_1
            if order[i - 1] == 1:
                rho_t = 0.5
            else:
                rk = (lam[i - 2] - lam[i - 1]) / h
                h_phi_k = h_phi_1 / hh - 1
                b1 = h_phi_k / b_h
                b2 = (h_phi_k / hh - 0.5) * 2 / b_h
                rho_1, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array([b1, b2]))
                rows["c_m2"][i] = -a * b_h * rho_1 / rk  # D1 = (m2 − m1) / rk
                rows["c_m1"][i] += a * b_h * rho_1 / rk
            rows["c_m0"][i] = -a * b_h * rho_t  # D1_t = m0 − m1
            rows["c_m1"][i] += a * b_h * rho_t
    return FlowPlan(timestep=timestep, sigma=s[:-1], **rows)


def sample(velocity_fn: Callable, x: jnp.ndarray, plan: FlowPlan, *, return_trajectory: bool = False):
    """Runs the plan from x (pure noise, N(0, I)) in one `lax.scan`; `velocity_fn(x, timestep) -> v` (already
    guided, see flow_guidance). Returns the final x, and with `return_trajectory` every step's x."""
    rows = plan.arrays()

    def body(carry, row):
        x, history = carry
        x_next, history = step(row, x, velocity_fn(x, row["timestep"]).astype(x.dtype), history)
        return (x_next, history), (x_next if return_trajectory else None)

    (x, _), states = jax.lax.scan(body, (x, init_carry(x)), rows)
    return (x, states) if return_trajectory else x
