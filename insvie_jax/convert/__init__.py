"""Checkpoint readers and writers (SAT, diffusers, Hugging Face, native); the only package that may import torch."""

from insvie_jax.convert.api import convert_main, load_transformer, save_transformer
from insvie_jax.convert.t5_keys import load_t5, save_t5
from insvie_jax.convert.vae_keys import load_vae, save_vae

__all__ = ["convert_main", "load_t5", "load_transformer", "load_vae", "save_t5", "save_transformer", "save_vae"]
