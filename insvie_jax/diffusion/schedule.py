"""Zero-terminal-SNR DDPM schedule with SNR shift (CogVideoX SAT `ZeroSNRDDPMDiscretization`).

Computed in float64 on the host, as the reference does; `a` = sqrt(alpha_bar) after the shift and the
zero-SNR rescale. The rescale runs over whichever index subset is requested: the whole 1000-step table in
training, the sampler's subset at sampling (reference §3, §4).
"""

from __future__ import annotations

import numpy as np

from insvie_jax.config import DiffusionConfig


def alphas_cumprod(cfg: DiffusionConfig) -> np.ndarray:
    """alpha_bar after the SNR shift, float64 (num_train_timesteps,)."""
    betas = np.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=np.float64) ** 2
    abar = np.cumprod(1.0 - betas)
    return abar / (cfg.snr_shift_scale + (1 - cfg.snr_shift_scale) * abar)


def sqrt_alphas(cfg: DiffusionConfig, indices: np.ndarray | None = None, *,
                round_to_float32: bool = True) -> np.ndarray:
    """Zero-SNR-rescaled a = sqrt(alpha_bar) at `indices` (default: all), rescaled over that subset.

    The reference (SAT) casts sqrt(alpha_bar) to float32 before the rescale; so do we, unless
    `round_to_float32=False` (diffusers' CogVideoX schedulers stay in float64; the two differ by ≤3.2e-8).
    Returns float64.
    """
    a = np.sqrt(alphas_cumprod(cfg))
    if round_to_float32:
        a = a.astype(np.float32).astype(np.float64)
    if indices is not None:
        a = a[np.asarray(indices)]
    first, last = a[0], a[-1]
    return (a - last) * first / (first - last)


def sat_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """DDPM indices SAT's samplers visit, noisiest first: 999, 979, …, 19 for 50 of 1000.

    SAT's `generate_roughly_equally_spaced_steps`: int(linspace(T − 1, 0, n, endpoint=False)).
    """
    _check_steps(num_steps, num_train_timesteps)
    return np.linspace(num_train_timesteps - 1, 0, num_steps, endpoint=False).astype(np.int64)


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> np.ndarray:
    """diffusers' `timestep_spacing="trailing"` (CogVideoX's scheduler configs), noisiest first.

    Equal to `sat_timesteps` when n divides T (e.g. 50 of 1000); they differ by one for some n (e.g. 30).
    """
    _check_steps(num_steps, num_train_timesteps)
    return np.round(np.arange(num_train_timesteps, 0, -num_train_timesteps / num_steps)).astype(np.int64) - 1


def _check_steps(num_steps: int, num_train_timesteps: int) -> None:
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"sampling steps = {num_steps}: must be between 1 and num_train_timesteps "
                         f"({num_train_timesteps}); set sample.steps accordingly")


def snap_to_table(a: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the table entry nearest to each a (first one on ties), as SAT's `DiscreteDenoiser`
    quantizes the a it is given before computing c_skip and c_out."""
    return np.abs(np.asarray(a)[..., None] - np.asarray(table)).argmin(axis=-1)


def v_scalings(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c_skip, c_out) of the v-prediction denoiser, x0̂ = c_skip·x_t + c_out·v: (a, −sqrt(1 − a²))."""
    a = np.asarray(a, np.float64)
    return a, -np.sqrt(1.0 - a * a)
