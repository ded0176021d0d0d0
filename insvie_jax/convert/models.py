"""Every model a command needs, decided and loaded in one place: the edit transformer, the VAE, the T5 text
encoder and its tokenizer.

`insvie-jax edit` (`load_models`), `insvie-jax encode` and data preparation (`load_encoders`), training
(`load_training_models`: train.init_from and the VAE validation decodes with) and `insvie-jax export` /
`edit --checkpoint RUN` (a run folder, read by train/export.py) all take them from here, so a model edits with
exactly the conditioning it was trained on:
- a transformer checkpoint: any format `convert.api` reads, or a training run folder (its latest, or `--ema`, weights);
  none = random weights of the config's model.
- `vae.path`: a diffusers `vae/` folder, a SAT `3d-vae.pt`, a native folder, or the name of a VAE shipped in
  configs/weights/ (`tiny-shapes-vae`); empty = a random stand-in.
- `text_encoder.path`: a Hugging Face T5 folder with its sentencepiece tokenizer; empty = a random stand-in T5
  with the word-hashing `HashTokenizer`.
- model.family wan: the transformer from a diffusers `WanTransformer3DModel` folder (or a pipeline's
  `transformer/`), the Wan2.2 VAE from a diffusers `AutoencoderKLWan` folder (its config.json's latent statistics
  replace vae.latents_mean/std: `Models.vae_cfg`), UMT5 from a Hugging Face folder (text_encoder.family umt5).
Random stand-ins are seeded by `data.seed` (`stand_in_seed`), so a run's encode, validation and edit build the
same ones. `build_transformer` is the one function that constructs a transformer with random weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

from insvie_jax import config as configlib
from insvie_jax.config import Config, ModelConfig

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = configlib.CONFIG_DIR / "weights"
# ModelConfig fields that say how to run the model, not what it is: taken from the config, not the checkpoint.
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention", "scan_layers", "remat_policy")


class ModelMismatch(configlib.ConfigError):
    """Models (or a checkpoint and a flag) that do not fit together; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Models:
    """What `load_models` / `load_encoders` / `load_training_models` decided; a field is None where not asked for."""

    transformer: object | None  # the edit transformer (models.transformer.EditTransformer)
    model_cfg: ModelConfig | None  # its architecture (a checkpoint's own) with the config's runtime fields
    vae: object | None
    scaling_factor: float | None  # latents = VAE latents x this (a checkpoint's config.json wins over vae.*); Wan: None
    text_encoder: object | None
    text_cfg: configlib.TextEncoderConfig | None
    tokenizer: object | None
    checkpoint: str | None = None  # where the transformer came from (None: random weights)
    vae_cfg: object | None = None  # the VAE's config (a checkpoint's own architecture and Wan latent statistics)


class HashTokenizer:
    """Stand-in for T5's sentencepiece model when no text encoder is configured (tests, tiny): each word maps
    to a stable id in [2, vocab), leaving 0 (pad) and 1 (EOS) free. Same `encode` call as sentencepiece."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, texts, out_type=int):
        def word_id(word: str) -> int:
            return 2 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % (self.vocab_size - 2)

        return [[word_id(w) for w in text.lower().split()] for text in texts]


def stand_in_seed(cfg: Config) -> int:
    return cfg.data.seed


def build_transformer(model_cfg: ModelConfig, seed: int):
    """The edit transformer of `model_cfg` with random weights drawn from `seed`: the one place a transformer is
    constructed (training's initial model, random stand-ins, checkpoint readers' skeletons)."""
    from insvie_jax.models import family

    return family.build(model_cfg, seed=seed)


# ---------------------------------------------------------------------------------------------------
# The frozen encoders


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


def load_vae_of(cfg: Config, path: str | None = None):
    """(VAE, scaling factor): `path` (default vae.path; empty = the random stand-in). A checkpoint's own
    config.json scaling factor wins over vae.scaling_factor."""
    from insvie_jax.models import vae as vae_model

    path = cfg.vae.path if path is None else path
    if cfg.model.family == "wan":
        return _load_wan_vae(cfg, path)[0], None
    if not path:
        return vae_model.build(cfg.vae, seed=stand_in_seed(cfg)), cfg.vae.scaling_factor
    from insvie_jax.convert.vae_keys import load_vae as load_vae_checkpoint

    vae, config = load_vae_checkpoint(vae_folder(path), cfg.vae)
    return vae, float(config.get("scaling_factor", cfg.vae.scaling_factor))


def _load_wan_vae(cfg: Config, path: str):
    """(Wan VAE, WanVAEConfig): a diffusers AutoencoderKLWan folder (its config.json's architecture and latent
    statistics win over the vae section's), or the random stand-in."""
    if not path:
        from insvie_jax.models import family

        return family.build_vae(cfg.vae, seed=stand_in_seed(cfg)), cfg.vae
    from insvie_jax.convert.wan_vae_keys import load_vae as load_wan_vae

    return load_wan_vae(weights_path(path), cfg.vae)


def load_text_encoder_of(cfg: Config, path: str | None = None):
    """(T5 or UMT5 encoder (text_encoder.family), TextEncoderConfig, tokenizer): `path` (default
    text_encoder.path; empty = the random stand-in with `HashTokenizer`)."""
    from insvie_jax.models import family

    path = cfg.text_encoder.path if path is None else path
    if not path:
        tcfg = cfg.text_encoder
        return family.build_text_encoder(tcfg, seed=stand_in_seed(cfg)), tcfg, HashTokenizer(tcfg.vocab_size)
    from insvie_jax.convert.t5_keys import load_t5, load_tokenizer
    from insvie_jax.convert.umt5_keys import load_umt5

    folder = weights_path(path)
    encoder, tcfg = (load_umt5 if cfg.text_encoder.family == "umt5" else load_t5)(folder, cfg.text_encoder)
    try:
        tokenizer = load_tokenizer(folder)
    except FileNotFoundError:
        tokenizer = load_tokenizer(folder.parent)  # `path` is a pipeline's text_encoder/, beside tokenizer/
    return encoder, tcfg, tokenizer


def load_encoders(cfg: Config, *, vae: str | None = None, text_encoder: str | None = None) -> Models:
    """The VAE, T5 and tokenizer alone (no transformer): what `encode` and data preparation need. Paths default
    to the config's."""
    encoder, text_cfg, tokenizer = load_text_encoder_of(cfg, text_encoder)
    if cfg.model.family == "wan":
        (vae_net, vae_cfg), scaling_factor = _load_wan_vae(cfg, cfg.vae.path if vae is None else vae), None
    else:
        (vae_net, scaling_factor), vae_cfg = load_vae_of(cfg, vae), cfg.vae
    return Models(None, None, vae_net, scaling_factor, encoder, text_cfg, tokenizer, vae_cfg=vae_cfg)


# ---------------------------------------------------------------------------------------------------
# The transformer


def _transformer_weights(cfg: Config, checkpoint: str | None, ema: bool = False):
    """(flat params or None for random weights, ModelConfig): the checkpoint's architecture, the config's runtime.
    `checkpoint` may be a training run folder (its latest checkpoint) or RUN/checkpoints/<step>; `ema` takes the
    run's EMA weights."""
    if not checkpoint:
        log.warning("insvie-jax edit: no --checkpoint: using a RANDOM transformer of config model '%s' "
                    "(smoke test; the edit will be noise)", cfg.model.name)
        return None, cfg.model
    from insvie_jax.convert import api
    from insvie_jax.models.params import flat_params

    # A run's orbax checkpoint is read with the training code (a lazy import: convert/ sits below train/).
    from insvie_jax.train import export

    run = export.find_run_checkpoint(checkpoint)
    if run is not None:
        model, run_cfg = export.read_run_model(*run, use_ema=ema)
        flat, ckpt_cfg = flat_params(model), run_cfg.model
    elif ema:
        raise ModelMismatch(f"--ema takes a training run's EMA weights; {checkpoint} is not a run folder")
    elif cfg.model.family == "wan":  # a diffusers WanTransformer3DModel folder (or a pipeline's transformer/)
        from insvie_jax.convert.wan_keys import read_diffusers

        flat, ckpt_cfg = read_diffusers(checkpoint)
    else:
        flat, ckpt_cfg = api.read_flat(checkpoint)
    return flat, dataclasses.replace(ckpt_cfg, **{k: getattr(cfg.model, k) for k in RUNTIME_FIELDS})


def load_models(cfg: Config, *, checkpoint: str | None = None, ema: bool = False, vae: str | None = None,
                text_encoder: str | None = None) -> Models:
    """The transformer (`checkpoint` in any format, a training run folder, or none: random weights of the
    config's model), VAE, T5 and tokenizer (`vae` / `text_encoder` paths default to the config's), checked to
    fit together."""
    encoders = load_encoders(cfg, vae=vae, text_encoder=text_encoder)
    flat, model_cfg = _transformer_weights(cfg, checkpoint, ema)
    if encoders.text_cfg.d_model != model_cfg.text_embed_dim:
        raise ModelMismatch(f"the text encoder gives {encoders.text_cfg.d_model}-wide embeddings but the transformer "
                            f"takes model.text_embed_dim={model_cfg.text_embed_dim}: use the T5 the model was trained "
                            "with (--t5 / text_encoder.*)")
    vae_cfg = encoders.vae_cfg
    latent_channels = vae_cfg.z_dim if cfg.model.family == "wan" else encoders.vae.decoder.conv_in.kernel.shape[-2]
    if latent_channels != model_cfg.in_channels:
        raise ModelMismatch(f"the VAE has {latent_channels} latent channels but the transformer takes "
                            f"model.in_channels={model_cfg.in_channels}: use the VAE the model was trained with (--vae)")
    if flat is None:
        transformer = build_transformer(model_cfg, seed=stand_in_seed(cfg))
    elif cfg.model.family == "wan":
        from insvie_jax.models import family
        from insvie_jax.models.params import module_from_flat

        transformer = module_from_flat(family.abstract(model_cfg), flat, "parameters")
    else:
        from insvie_jax.convert import api

        transformer = api.model_from_flat(flat, model_cfg)
    return dataclasses.replace(encoders, transformer=transformer, model_cfg=model_cfg, checkpoint=checkpoint or None)


def load_training_models(cfg: Config, *, vae: bool = False) -> Models:
    """What training starts from: `train.init_from`'s transformer (None: random weights, which the train state
    draws on the devices from train.seed), and with `vae` the config's VAE (validation decodes its edits)."""
    transformer = None
    if cfg.train.init_from and cfg.model.family == "wan":  # a diffusers Wan folder; a T2V/TI2V one is widened
        from insvie_jax.convert.wan_keys import load_wan_transformer

        transformer, _ = load_wan_transformer(cfg.train.init_from)
    elif cfg.train.init_from:
        from insvie_jax.convert.api import load_transformer

        transformer, _ = load_transformer(cfg.train.init_from)
    vae_net, scaling_factor, vae_cfg = None, None, None
    if vae and cfg.model.family == "wan":
        vae_net, vae_cfg = _load_wan_vae(cfg, cfg.vae.path)
    elif vae:
        (vae_net, scaling_factor), vae_cfg = load_vae_of(cfg), cfg.vae
    return Models(transformer, cfg.model, vae_net, scaling_factor, None, None, None, cfg.train.init_from or None,
                  vae_cfg=vae_cfg)
