"""The training loop: config -> model -> jitted step -> metrics in the run folder.

This is the foundation's loop on synthetic in-memory latents; data pipelines, sharding, LoRA and
checkpoints plug in here as they land.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flax import nnx
from tqdm import tqdm

from insvie_jax import config as configlib
from insvie_jax.data.synthetic import SyntheticTriplets
from insvie_jax.models import transformer
from insvie_jax.train.step import make_optimizer, make_train_step, step_key


def latent_shape(cfg: configlib.Config) -> tuple[int, int, int, int]:
    d, v = cfg.data, cfg.vae
    return ((d.num_frames - 1) // v.temporal_compression + 1, d.height // v.spatial_compression,
            d.width // v.spatial_compression, cfg.model.in_channels)


def run(cfg: configlib.Config) -> dict:
    """Trains for `cfg.train.steps` steps; returns a summary (first/last logged loss, timings)."""
    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    configlib.save(cfg, run_dir / "config.yaml")

    if cfg.data.source != "synthetic":
        raise configlib.ConfigError(f"data.source={cfg.data.source!r}: only 'synthetic' is available in this build")
    data = SyntheticTriplets(cfg.data.batch_size, latent_shape(cfg), cfg.model.text_length,
                             cfg.model.text_embed_dim, seed=cfg.train.seed)
    model = transformer.build(cfg.model, seed=cfg.train.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    optimizer = make_optimizer(cfg)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(cfg, graphdef, optimizer)

    losses = []
    start = time.perf_counter()
    compile_s = None
    with open(run_dir / "metrics.jsonl", "a") as log, tqdm(total=cfg.train.steps, desc="train", unit="step") as bar:
        for step in range(cfg.train.steps):
            t0 = time.perf_counter()
            params, opt_state, metrics = step_fn(params, opt_state, data.batch(step), step_key(cfg.train.seed, step))
            loss = float(metrics["loss"])
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}: lower train.lr or check the data")
            losses.append(loss)
            if compile_s is None:
                compile_s = time.perf_counter() - t0
            if step % cfg.train.log_every == 0 or step == cfg.train.steps - 1:
                record = {"step": step, "loss": loss, "grad_norm": float(metrics["grad_norm"]),
                          "step_s": time.perf_counter() - t0}
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{np.mean(losses[-cfg.train.log_every:]):.4f}")
            bar.update(1)
    window = max(1, min(25, len(losses) // 4))
    return {
        "steps": len(losses),
        "first_loss": float(np.mean(losses[:window])),
        "last_loss": float(np.mean(losses[-window:])),
        "compile_s": compile_s,
        "total_s": time.perf_counter() - start,
        "run_dir": str(run_dir),
    }
