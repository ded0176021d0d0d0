"""insvie-jax: instruction-based video editing (InsViE / CogVideoX) in JAX and Flax NNX."""

__version__ = "0.1.0"
