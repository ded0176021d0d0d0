"""Training: `insvie_jax.train.run(config)` is what `insvie-jax train` runs (after `data.prepare.prepare`)."""

from insvie_jax.train.loop import run

__all__ = ["run"]
