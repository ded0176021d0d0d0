"""Setup shared by the parity tests (ours against diffusers): the seeded reference model with perturbed weights
(default ones and zeros would leave their key mapping untested), video between diffusers' channels-first and our
channels-last layout, and a quickly compiled model method."""

import functools

import jax
import numpy as np
from flax import nnx


def diffusers_model(cls, config: dict, seed: int, perturb):
    """`cls` built from a diffusers config (its `_` metadata keys left out) after `torch.manual_seed(seed)`, in
    eval mode; then `perturb(name, parameter)` changes each parameter in place."""
    import torch

    torch.manual_seed(seed)
    model = cls(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            perturb(name, p)
    return model


def norms_and_biases(name: str, p) -> None:
    """The transformers: norm weights off their ones and zeros, biases nonzero."""
    import torch

    if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
    if name.endswith("bias"):
        p.copy_(0.05 * torch.randn_like(p))


def wan_vae_gammas_and_biases(name: str, p) -> None:
    """The Wan VAE: RMS-norm gammas near 1, every 1-D tensor (biases) nonzero."""
    import torch

    if name.endswith("gamma"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
    elif p.ndim == 1:
        p.copy_(0.1 * torch.randn_like(p))


def to_torch(video: np.ndarray):
    """(B, F, H, W, C) -> torch (B, C, F, H, W)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3)))


def to_ours(t) -> np.ndarray:
    """torch (B, C, F, H, W) -> (B, F, H, W, C)."""
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def jit_method(method: str):
    """`module.<method>(x)` compiled per (module structure, shape) with XLA's backend optimisations off, which
    halves the compile time that dominates the VAE tests on CPU (the convolutions are library calls either way)."""

    @functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
    def run(graphdef, state, x):
        return getattr(nnx.merge(graphdef, state), method)(x)

    return lambda module, x: run(*nnx.split(module), x)
