"""Checkpoint codecs (SAT, diffusers, Hugging Face, native) behind one registry (registry.py); the only package
that may import torch (bench/ aside). Names below are imported on first use, so the registry stays light."""

_LAZY = {
    "convert_main": "insvie_jax.convert.registry",
    "load_transformer": "insvie_jax.convert.api",
    "save_transformer": "insvie_jax.convert.api",
    "load_vae": "insvie_jax.convert.vae_keys",
    "save_vae": "insvie_jax.convert.vae_keys",
    "load_t5": "insvie_jax.convert.t5_keys",
    "save_t5": "insvie_jax.convert.t5_keys",
    "load_models": "insvie_jax.convert.models",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'insvie_jax.convert' has no attribute {name!r}")


__all__ = list(_LAZY)
