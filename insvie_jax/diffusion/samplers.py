"""Samplers as tables: every step's coefficients precomputed in float64 on the host, one generic update on device.

All three samplers share one update rule (DDIM is its first-order, noise-free case):

    x0̂     = c_skip·x + c_out·v                                   (v-prediction denoiser)
    D      = cur_weight·x0̂ − prev_weight·x0̂_prev                  (DPM-Solver++(2M) history term)
    x_next = x_coef·x + x0_coef·D + noise_coef·ε

so a sampling loop is one `lax.scan` over the rows of a `SamplerPlan`, with no Python state.

- `dpmpp_2m_sde`: SAT's `VPSDEDPMPP2MSampler` as InsViE samples (reference §4): SAT's timestep subset, a-values
  zero-SNR-rescaled over that subset with 1.0 appended, the denoiser's c_skip/c_out from the a snapped to the
  1000-entry table (the model's timestep stays the DDPM index), fresh noise every step, x0̂ returned at the end.
- `cogvideox_dpm`: diffusers' `CogVideoXDPMScheduler` (the same SDE update on the 1000-entry table, kept in
  float64 as diffusers does; trailing spacing, `set_alpha_to_one`).
- `ddim`: diffusers' `CogVideoXDDIMScheduler` (eta is ignored there, so it is deterministic).
"""

from __future__ import annotations

import dataclasses
import typing

import jax.numpy as jnp
import numpy as np

from insvie_jax import config as configlib
from insvie_jax.config import DiffusionConfig
from insvie_jax.diffusion import schedule

SAMPLERS = typing.get_args(configlib.DDPMSampler)  # the schema's list; make_plan has one branch each


@dataclasses.dataclass(frozen=True)
class SamplerPlan:
    """One row per model call, float64 (num_steps,) each; see the module docstring for the update."""

    timestep: np.ndarray  # DDPM index given to the model (c_noise)
    c_skip: np.ndarray
    c_out: np.ndarray
    x_coef: np.ndarray
    x0_coef: np.ndarray
    cur_weight: np.ndarray
    prev_weight: np.ndarray
    noise_coef: np.ndarray

    @property
    def num_steps(self) -> int:
        return len(self.timestep)

    @property
    def stochastic(self) -> bool:
        return bool(np.any(self.noise_coef != 0))

    def arrays(self, dtype=jnp.float32) -> dict[str, jnp.ndarray]:
        """The rows as device arrays (cast on the host so that float64 rounds once), for `lax.scan`."""
        return {f.name: jnp.asarray(np.asarray(getattr(self, f.name)).astype(dtype)) for f in dataclasses.fields(self)}


def to_x0(x: jnp.ndarray, v: jnp.ndarray, c_skip, c_out) -> jnp.ndarray:
    """x0̂ from a v-prediction."""
    return c_skip * x + c_out * v


def step(row: dict, x: jnp.ndarray, x0: jnp.ndarray, prev_x0: jnp.ndarray, noise: jnp.ndarray | None) -> jnp.ndarray:
    """x_next from one plan row; `prev_x0` is the previous step's x0̂ (any finite array on the first step),
    `noise` a standard normal like x (None for a deterministic plan)."""
    d = row["cur_weight"] * x0 - row["prev_weight"] * prev_x0
    x_next = row["x_coef"] * x + row["x0_coef"] * d
    if noise is not None:
        x_next = x_next + row["noise_coef"] * noise
    return x_next


def make_plan(sampler: str, num_steps: int, cfg: DiffusionConfig) -> SamplerPlan:
    if sampler == "dpmpp_2m_sde":
        return _sat_dpmpp_2m_sde(num_steps, cfg)
    if sampler == "cogvideox_dpm":
        return _cogvideox(num_steps, cfg, dpm=True)
    if sampler == "ddim":
        return _cogvideox(num_steps, cfg, dpm=False)
    raise ValueError(f"unknown sampler '{sampler}': expected one of {', '.join(SAMPLERS)} (sample.sampler)")


def _log_snr(a: np.ndarray) -> np.ndarray:
    """λ = log(a/σ) as both references write it, log(sqrt(a²/(1 − a²))): −inf at a = 0, +inf at a = 1."""
    ac = a * a
    with np.errstate(divide="ignore"):
        return np.log(np.sqrt(ac / (1.0 - ac)))


def _dpmpp_2m_sde_rows(a_prev: np.ndarray, a: np.ndarray, a_next: np.ndarray, first_order: np.ndarray) -> dict:
    """DPM-Solver++(2M) SDE coefficients. IEEE-safe at the ends: a = 0 (λ = −inf, h = +inf) gives
    x_next = a_next·x0̂ + σ_next·ε; a_next = 1 (h = +inf) gives x_next = x0̂; a_prev = 0 gives r = inf, so the
    second step is first order too, as in both references."""
    lam, lam_next, lam_prev = _log_snr(a), _log_snr(a_next), _log_snr(a_prev)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = lam_next - lam
        x_coef = np.sqrt((1.0 - a_next**2) / (1.0 - a**2)) * np.exp(-h)
        x0_coef = -np.expm1(-2.0 * h) * a_next
        noise_coef = np.sqrt(1.0 - a_next**2) * np.sqrt(1.0 - np.exp(-2.0 * h))
        half_inv_r = np.where(first_order, 0.0, 1.0 / (2.0 * ((lam - lam_prev) / h)))
    return dict(x_coef=x_coef, x0_coef=x0_coef, noise_coef=noise_coef, cur_weight=1.0 + half_inv_r,
                prev_weight=half_inv_r)


def _sat_dpmpp_2m_sde(num_steps: int, cfg: DiffusionConfig) -> SamplerPlan:
    timesteps = schedule.sat_timesteps(num_steps, cfg.num_train_timesteps)  # 999 … 19
    # a over the subset (rescaled over it, reference §4), noisiest first, then 1.0 for "clean".
    a = np.append(schedule.sqrt_alphas(cfg, timesteps[::-1])[::-1], 1.0)
    a_prev = np.concatenate([[0.0], a[:-2]])  # unused on the first step
    first_order = np.arange(num_steps) == 0
    first_order[-1] = True  # SAT returns x0̂ at the last step; the coefficients below give exactly that
    rows = _dpmpp_2m_sde_rows(a_prev, a[:-1], a[1:], first_order)
    table = schedule.sqrt_alphas(cfg)
    c_skip, c_out = schedule.v_scalings(table[schedule.snap_to_table(a[:-1], table)])
    return SamplerPlan(timestep=timesteps.astype(np.float64), c_skip=c_skip, c_out=c_out, **rows)


def _cogvideox(num_steps: int, cfg: DiffusionConfig, dpm: bool) -> SamplerPlan:
    timesteps = schedule.trailing_timesteps(num_steps, cfg.num_train_timesteps)
    table = schedule.sqrt_alphas(cfg, round_to_float32=False)
    a = table[timesteps]
    # diffusers steps to t − T//n (not the next listed timestep) and to a = 1 past the end (set_alpha_to_one).
    after = timesteps - cfg.num_train_timesteps // num_steps
    a_next = np.where(after >= 0, table[np.maximum(after, 0)], 1.0)
    c_skip, c_out = schedule.v_scalings(a)
    ones, zeros = np.ones(num_steps), np.zeros(num_steps)
    if dpm:
        a_prev = np.concatenate([[0.0], a[:-1]])  # `timestep_back` = the previous listed timestep
        first_order = (np.arange(num_steps) == 0) | (after < 0)
        rows = _dpmpp_2m_sde_rows(a_prev, a, a_next, first_order)
    else:
        x_coef = np.sqrt((1.0 - a_next**2) / (1.0 - a**2))
        rows = dict(x_coef=x_coef, x0_coef=a_next - a * x_coef, noise_coef=zeros, cur_weight=ones,
                    prev_weight=zeros)
    return SamplerPlan(timestep=timesteps.astype(np.float64), c_skip=c_skip, c_out=c_out, **rows)
