"""Trains the default run's tiny VAE: the CogVideoX VAE class (models/vae.py) at the size configs/tiny-shapes.yaml
gives it, on freshly drawn moving-shape clips (data/synthetic_videos.py: sources and their edits, no clip seen
twice), and writes it as a diffusers `AutoencoderKLCogVideoX` folder (config.json + fp16 safetensors) with the
latent scaling factor that gives unit-variance latents.

    python tools/train_tiny_vae.py                      # -> configs/weights/tiny-shapes-vae (the shipped one)
    python tools/train_tiny_vae.py --steps 200 --out /tmp/vae

Everything is a function of --seed: scenes of step s are triplets (seed, s * batch + i); the fresh scenes the PSNR
is measured on come from another seed. A rerun on the same kind of device gives the same file; another device
gives the same within float rounding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from insvie_jax import config as configlib  # noqa: E402
from insvie_jax.convert import vae_keys  # noqa: E402
from insvie_jax.data import synthetic_videos as sv  # noqa: E402
from insvie_jax.models import vae as vae_model  # noqa: E402
from insvie_jax.models.params import flat_params  # noqa: E402

DEFAULT_OUT = configlib.CONFIG_DIR / "weights" / "tiny-shapes-vae"
EVAL_SEED_OFFSET = 1_000_003  # fresh scenes: another generator seed than any training step's


def clips(seed: int, first: int, count: int, frames: int, height: int, width: int) -> np.ndarray:
    """float32 (2 count, F, H, W, 3) in [-1, 1]: the source and the edit of triplets first .. first + count."""
    out = []
    for index in range(first, first + count):
        source, edit, _ = sv.triplet(seed, index, frames, height, width)
        out += [source, edit]
    return np.stack(out).astype(np.float32) / 127.5 - 1


def psnr(reference: np.ndarray, decoded: np.ndarray) -> float:
    """PSNR in dB of uint8-range pictures given in [-1, 1] (the decoded ones clipped to it)."""
    mse = np.mean((np.clip(decoded, -1, 1) - reference) ** 2) / 4  # in [0, 1] units
    return float(10 * np.log10(1 / mse))


def reconstruction_psnr(vae, cfg: configlib.Config, seed: int, count: int = 16) -> float:
    """Mean-latent reconstruction PSNR of `count` fresh triplets (sources and edits)."""
    d = cfg.data
    video = clips(seed + EVAL_SEED_OFFSET, 0, count, d.num_frames, d.height, d.width)
    decoded = np.concatenate([np.asarray(_reconstruct(vae, jnp.asarray(video[i:i + 8])))
                              for i in range(0, len(video), 8)])
    return psnr(video, decoded)


@nnx.jit
def _reconstruct(vae, video):
    return vae.decode(vae.encode(video).mean)


@nnx.jit
def _latent_means(vae, video):
    return vae.encode(video).mean


def train(cfg: configlib.Config, steps: int, batch: int, lr: float, kl_weight: float, decoder_noise: float, seed: int,
          log_every: int = 100):
    """The trained VAE and its training log."""
    d = cfg.data
    vae = vae_model.build(cfg.vae, seed=seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10 + 1), steps, lr / 20)
    optimizer = nnx.Optimizer(vae, optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule)), wrt=nnx.Param)

    @nnx.jit
    def step(vae, optimizer, video, key):
        def loss_fn(vae):
            posterior = vae.encode(video)
            # Extra latent noise: the decoder learns to map slightly-off latents (a diffusion model's samples)
            # to clean pictures rather than to smears. Its std is relative to the latents' spread (so in units of
            # the scaled latents the edit model works in): the encoder cannot outgrow it by inflating its latents.
            sample_key, noise_key = jax.random.split(key)
            spread = jax.lax.stop_gradient(jnp.std(posterior.mean))
            z = posterior.sample(sample_key) + decoder_noise * spread * jax.random.normal(noise_key, posterior.mean.shape)
            decoded = vae.decode(z)
            mse = jnp.mean((decoded - video) ** 2)
            kl = 0.5 * jnp.mean(posterior.mean ** 2 + jnp.exp(posterior.logvar) - 1 - posterior.logvar)
            return mse + kl_weight * kl, (mse, kl)

        (loss, (mse, kl)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(vae)
        optimizer.update(vae, grads)
        return mse, kl

    log, start = [], time.perf_counter()
    for s in range(steps):
        video = jnp.asarray(clips(seed, s * batch // 2, batch // 2, d.num_frames, d.height, d.width))
        mse, kl = step(vae, optimizer, video, jax.random.fold_in(jax.random.key(seed), s))
        if s % log_every == 0 or s == steps - 1:
            entry = {"step": s, "mse": float(mse), "kl": float(kl), "train_psnr": float(10 * np.log10(4 / float(mse))),
                     "seconds": round(time.perf_counter() - start, 1)}
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return vae, log


def scaling_factor(vae, cfg: configlib.Config, seed: int, count: int = 32) -> float:
    """1 / std of the posterior means over fresh clips: scaled latents of unit variance (as CogVideoX's factor)."""
    d = cfg.data
    video = clips(seed + EVAL_SEED_OFFSET, 1000, count, d.num_frames, d.height, d.width)
    means = np.concatenate([np.asarray(_latent_means(vae, jnp.asarray(video[i:i + 8])))
                            for i in range(0, len(video), 8)])
    return float(1 / means.std())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny-shapes", help="preset or YAML whose vae and data sizes are used")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=3800)
    parser.add_argument("--batch", type=int, default=16, help="clips per step (half sources, half edits)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--kl-weight", type=float, default=1e-5)
    parser.add_argument("--decoder-noise", type=float, default=0.15,
                        help="std of extra noise on the decoded latents, relative to their spread (scaled-latent units;"
                             " about the edit model's latent error, so that its edits decode clean)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)

    cfg = configlib.load(args.config, ["vae.path=", *args.set])
    # Trained in float32 with the memory modes (frame batches) it runs with, so its group norms see what they will.
    cfg = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, dtype="float32", random_posterior_std=0.0))
    vae, log = train(cfg, args.steps, args.batch, args.lr, args.kl_weight, args.decoder_noise, args.seed)
    fresh = reconstruction_psnr(vae, cfg, args.seed)
    factor = scaling_factor(vae, cfg, args.seed)
    out_cfg = dataclasses.replace(cfg.vae, scaling_factor=round(factor, 4))
    out = vae_keys.write_vae(flat_params(vae), out_cfg, args.out, "diffusers", "fp16")
    record = {"fresh_psnr_db": round(fresh, 2), "scaling_factor": round(factor, 4), "steps": args.steps,
              "batch": args.batch, "lr": args.lr, "kl_weight": args.kl_weight, "decoder_noise": args.decoder_noise,
              "seed": args.seed,
              "device": jax.devices()[0].device_kind, "seconds": log[-1]["seconds"]}
    (out / "training.json").write_text(json.dumps({**record, "log": log}, indent=1) + "\n")
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
