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


def sqrt_alphas(cfg: DiffusionConfig, indices: np.ndarray | None = None) -> np.ndarray:
    """Zero-SNR-rescaled a = sqrt(alpha_bar) at `indices` (default: all), rescaled over that subset.

    The reference casts sqrt(alpha_bar) to float32 before the rescale; so do we. Returns float64.
    """
    a = np.sqrt(alphas_cumprod(cfg)).astype(np.float32).astype(np.float64)
    if indices is not None:
        a = a[np.asarray(indices)]
    first, last = a[0], a[-1]
    return (a - last) * first / (first - last)
