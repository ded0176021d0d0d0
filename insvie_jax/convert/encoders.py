"""The frozen encoders of a config, decided in one place: the VAE, the T5 text encoder and its tokenizer.

`insvie-jax encode`, the data pipeline's video source, training validation and `insvie-jax edit` all take them
from here, so a model edits with exactly the conditioning it was trained on:
- `vae.path`: a diffusers `vae/` folder, a SAT `3d-vae.pt`, a native folder, or the name of a VAE shipped in
  configs/weights/ (`tiny-shapes-vae`); empty = a random stand-in.
- `text_encoder.path`: a Hugging Face T5 folder with its sentencepiece tokenizer; empty = a random stand-in T5
  with the word-hashing `HashTokenizer`.
Random stand-ins are seeded by `data.seed`, so a run's encode, validation and edit build the same ones.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from insvie_jax import config as configlib

SHIPPED_WEIGHTS = configlib.CONFIG_DIR / "weights"


class HashTokenizer:
    """Stand-in for T5's sentencepiece model when no text encoder is configured (tests, tiny): each word maps
    to a stable id in [2, vocab), leaving 0 (pad) and 1 (EOS) free. Same `encode` call as sentencepiece."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, texts, out_type=int):
        def word_id(word: str) -> int:
            return 2 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % (self.vocab_size - 2)

        return [[word_id(w) for w in text.lower().split()] for text in texts]


def stand_in_seed(cfg: configlib.Config) -> int:
    return cfg.data.seed


def weights_path(path: str) -> Path:
    """A weights path as given, or the name of weights shipped in configs/weights/."""
    given = Path(path)
    if given.exists() or given.is_absolute():
        return given
    shipped = SHIPPED_WEIGHTS / path
    return shipped if shipped.exists() else given


def vae_folder(path: str) -> Path:
    folder = weights_path(path)
    if folder.is_dir() and not (folder / "config.json").exists() and (folder / "vae").is_dir():
        folder = folder / "vae"  # a diffusers pipeline folder
    if not folder.exists():
        shipped = ", ".join(sorted(p.name for p in SHIPPED_WEIGHTS.iterdir())) if SHIPPED_WEIGHTS.is_dir() else ""
        raise FileNotFoundError(f"VAE not found: {path}: pass a diffusers vae/ folder, a SAT 3d-vae.pt or a shipped "
                                f"VAE ({shipped}) as vae.path / --vae")
    return folder


def load_vae(cfg: configlib.Config, path: str | None = None):
    """(VAE, scaling factor): `path` (default vae.path; empty = the random stand-in). A checkpoint's own
    config.json scaling factor wins over vae.scaling_factor."""
    from insvie_jax.models import vae as vae_model

    path = cfg.vae.path if path is None else path
    if not path:
        return vae_model.build(cfg.vae, seed=stand_in_seed(cfg)), cfg.vae.scaling_factor
    from insvie_jax.convert.vae_keys import load_vae as load_vae_checkpoint

    vae, config = load_vae_checkpoint(vae_folder(path), cfg.vae)
    return vae, float(config.get("scaling_factor", cfg.vae.scaling_factor))


def load_text_encoder(cfg: configlib.Config, path: str | None = None):
    """(T5 encoder, TextEncoderConfig, tokenizer): `path` (default text_encoder.path; empty = the random stand-in
    with `HashTokenizer`)."""
    from insvie_jax.models import t5

    path = cfg.text_encoder.path if path is None else path
    if not path:
        tcfg = cfg.text_encoder
        return t5.build(tcfg, seed=stand_in_seed(cfg)), tcfg, HashTokenizer(tcfg.vocab_size)
    from insvie_jax.convert.t5_keys import load_t5, load_tokenizer

    folder = weights_path(path)
    encoder, tcfg = load_t5(folder, cfg.text_encoder)
    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError:
        tokenizer = load_tokenizer(folder.parent)  # `path` is a pipeline's text_encoder/, beside tokenizer/
    return encoder, tcfg, tokenizer
