"""Training: `insvie_jax.train.run(config)` is what `insvie-jax train` runs."""

from insvie_jax.train.loop import run

__all__ = ["run"]
