"""insvie-jax: instruction-based video editing (InsViE / CogVideoX) in JAX and Flax NNX.

Public API (imported on first use, so `import insvie_jax` stays light):
`load_transformer(path) -> (model, config)`, `save_transformer(model, config, path, format=...)`,
`load_vae` / `save_vae`, `load_t5` / `save_t5` likewise; `load_models(cfg, checkpoint=...)` -> Models (transformer,
VAE, T5, tokenizer as a config and a checkpoint or training run decide); configs through
`insvie_jax.config.load(path, overrides)`.
"""

from insvie_jax.parallel.topology import quiet_libtpu_without_tpu

__version__ = "0.1.0"
quiet_libtpu_without_tpu()

_PUBLIC = ("load_transformer", "save_transformer", "load_vae", "save_vae", "load_t5", "save_t5", "load_models")


def __getattr__(name):
    if name in _PUBLIC:  # convert/ imports them on first use
        from insvie_jax import convert

        return getattr(convert, name)
    raise AttributeError(f"module 'insvie_jax' has no attribute {name!r}")


__all__ = list(_PUBLIC)
