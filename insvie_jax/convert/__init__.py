"""Checkpoint readers and writers (SAT, diffusers, native); the only package that may import torch."""

from insvie_jax.convert.api import convert_main, load_transformer, save_transformer

__all__ = ["convert_main", "load_transformer", "save_transformer"]
