"""The edit transformer of `model.family`: one place that builds, sizes and counts either family's model, so that
train, compile, bench and metrics take a config and need not know which backbone it names.

- cogvideox: models/transformer.py `EditTransformer` (CogVideoX; source latents through `proj_edit`)
- wan: models/wan/transformer.py `WanEditTransformer` (Wan2.2, Lucy-Edit layout: source concatenated on channels)

Both are called `model(noisy, source, text, timestep) -> prediction` on channels-last latents (B, F, H, W, C);
their latents' shape for a config is `config.latent_shape` (CogVideoX's VAE 8x in space, Wan2.2's 16x; both 4x
in time).
"""

from __future__ import annotations

from types import ModuleType

from flax import nnx

from insvie_jax.config import ModelConfig, WanModelConfig
from insvie_jax.models import params as paramslib
from insvie_jax.models import transformer as cogvideox
from insvie_jax.models.wan import transformer as wan

_MODULES = {"cogvideox": cogvideox, "wan": wan}


def module(model_cfg: ModelConfig | WanModelConfig) -> ModuleType:
    """The family's transformer module (`build`, `abstract`, `forward_flops`, `init_edit_from_t2v`)."""
    return _MODULES[model_cfg.family]


def build(model_cfg: ModelConfig | WanModelConfig, seed: int = 0) -> nnx.Module:
    """The edit transformer of the config's `model` section, randomly initialised from `seed`."""
    return module(model_cfg).build(model_cfg, seed=seed)


def abstract(model_cfg: ModelConfig | WanModelConfig) -> nnx.Module:
    """The model with shapes only (no memory): for parameter counts and sharding plans."""
    return module(model_cfg).abstract(model_cfg)


def count_params(model_cfg: ModelConfig | WanModelConfig) -> int:
    return paramslib.count_params(abstract(model_cfg))


def forward_flops(model_cfg: ModelConfig | WanModelConfig, frames: int, height: int, width: int) -> float:
    """Model FLOPs of one forward pass of one sample on latents (frames, height, width); a train step is 3x."""
    return module(model_cfg).forward_flops(model_cfg, frames, height, width)

