"""The training loop: config -> mesh -> sharded state -> compiled step -> metrics and checkpoints in RUN.

A run pointed at a folder that holds checkpoints resumes from the latest one; because every random draw is
a function of (seed, step) and the data is either too (synthetic) or a grain pipeline whose per-process
iterator state is saved in each checkpoint (arrayrecord, video), the resumed run computes what the
uninterrupted one would have, bit for bit. SIGTERM saves a checkpoint after the current step and stops.

The loop reads step N's metrics after launching step N+1, so the host never stalls the device.
Every `train.sample_every` steps the model edits a few validation clips (train/validate.py).
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from insvie_jax import config as configlib
from insvie_jax.data import synthetic_videos
from insvie_jax.data.pipeline import make_pipeline
from insvie_jax.data.synthetic import SyntheticTriplets
from insvie_jax.parallel import distributed
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.train import metrics as metricslib
from insvie_jax.train import step as steplib
from insvie_jax.train import validate as validatelib
from insvie_jax.train.checkpoint import Checkpointer

STAGE = "main"  # multi-stage schedules (config `stages`) are not run yet: every step belongs to one stage


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. non-finite losses in a row); the message says where and what to do."""


def latent_shape(cfg: configlib.Config) -> tuple[int, int, int, int]:
    d, v = cfg.data, cfg.vae
    return ((d.num_frames - 1) // v.temporal_compression + 1, d.height // v.spatial_compression,
            d.width // v.spatial_compression, cfg.model.in_channels)


class _SyntheticBatches:
    """Synthetic data: the global batch of each step, a pure function of (train.seed, step); nothing to save.
    Each process draws only the rows its devices hold (rows are drawn independently, so the global batch is the
    same for any process count)."""

    iterator = None

    def __init__(self, cfg: configlib.Config, shardings):
        self.data = SyntheticTriplets(cfg.data.batch_size, latent_shape(cfg), cfg.model.text_length,
                                      cfg.model.text_embed_dim, seed=cfg.train.seed)
        self.shardings = shardings
        b = cfg.data.batch_size
        self.shapes = {"source": (b, *latent_shape(cfg)), "target": (b, *latent_shape(cfg)),
                       "text": (b, cfg.model.text_length, cfg.model.text_embed_dim)}

    def batch(self, step: int) -> dict:
        drawn = {}  # rows -> arrays, shared by the devices (and keys) that hold the same rows

        def shard(key: str, index: tuple) -> np.ndarray:
            rows = range(*index[0].indices(self.data.batch_size))
            if rows not in drawn:
                drawn[rows] = self.data.rows(step, rows)
            return drawn[rows][key][(slice(None), *index[1:])]

        return {k: jax.make_array_from_callback(self.shapes[k], self.shardings[k], lambda i, k=k: shard(k, i))
                for k in self.shardings}

    def host_batch(self, step: int) -> dict:
        return self.data.batch(step)


class _PipelineBatches:
    """data.pipeline batches: this process's share of each global batch, in order; the grain iterator's state
    goes into every checkpoint (one file per process), so `step` only names the batch for error messages."""

    def __init__(self, cfg: configlib.Config, shardings):
        self.iterator = make_pipeline(cfg, "train", jax.process_index(), jax.process_count())
        self.shardings = shardings

    def batch(self, step: int) -> dict:
        try:
            local = next(self.iterator)
        except StopIteration:
            raise TrainingStopped(f"the data pipeline ended before step {step}") from None
        return {k: jax.make_array_from_process_local_data(self.shardings[k], np.asarray(local[k]))
                for k in self.shardings}


def _data(cfg: configlib.Config, shardings):
    if cfg.data.source == "synthetic":
        return _SyntheticBatches(cfg, shardings)
    return _PipelineBatches(cfg, shardings)


def _abstract_batch(cfg: configlib.Config, shardings) -> dict:
    """Batch shapes for compiling when no batch is read (a resumed run that is already done)."""
    b, (f, h, w, c) = cfg.data.batch_size, latent_shape(cfg)
    shapes = {"source": (b, f, h, w, c), "target": (b, f, h, w, c),
              "text": (b, cfg.model.text_length, cfg.model.text_embed_dim)}
    return {k: jax.ShapeDtypeStruct(shapes[k], np.float32, sharding=shardings[k]) for k in shapes}


class _StopSignal:
    """Records SIGTERM (preemption) so the loop can save and stop between steps."""

    def __init__(self):
        self.received = None
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

    def restore(self):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def run(cfg: configlib.Config) -> dict:
    """Trains to `cfg.train.steps` steps (resuming RUN if it holds checkpoints); returns a summary."""
    distributed.initialize()
    main = distributed.is_main_process()
    if cfg.data.generate:  # the default run's moving-shape clips, written and encoded once by the main process
        cfg = synthetic_videos.prepare(cfg, main)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("insvie-jax data.generate")
    run_dir = Path(cfg.train.run_dir)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        configlib.save(cfg, run_dir / "config.yaml")
    mesh = meshlib.create_mesh(cfg.mesh)
    groups = meshlib.data_parallel_size(mesh)
    if cfg.data.batch_size % groups:
        raise configlib.ConfigError(f"data.batch_size={cfg.data.batch_size} must be a multiple of the data-parallel "
                                    f"size {groups} (mesh data x fsdp = {dict(mesh.shape)})")

    optimizer = steplib.make_optimizer(cfg)
    graphdef, state, frozen, state_sh, frozen_sh = steplib.init_state(cfg, mesh, optimizer)
    batch_sh = steplib.batch_shardings(cfg, mesh)
    data = _data(cfg, batch_sh)
    checkpoints = Checkpointer(run_dir, cfg)
    start = 0
    if (latest := checkpoints.latest_step()) is not None:
        state, frozen, meta = checkpoints.restore(latest, state, state_sh, frozen, frozen_sh, data.iterator)
        start = int(meta["data_position"])
        if main:
            print(f"insvie-jax train: resuming {run_dir} from checkpoint {latest}", file=sys.stderr, flush=True)
            if start >= cfg.train.steps:
                print(f"insvie-jax train: {run_dir} is already at step {start} of train.steps={cfg.train.steps}: "
                      "nothing to train (raise train.steps to go on, or pick a new train.run_dir)",
                      file=sys.stderr, flush=True)

    step_fn = steplib.make_train_step(cfg, graphdef, optimizer, mesh, state_sh, frozen_sh, groups)
    first_batch = data.batch(start) if start < cfg.train.steps else None
    t0 = time.perf_counter()
    compiled = step_fn.lower(state, frozen, first_batch or _abstract_batch(cfg, batch_sh), np.int32(start)).compile()
    compile_s = time.perf_counter() - t0
    flops = metricslib.step_flops(cfg, latent_shape(cfg)[:3], mesh.size)
    device = jax.local_devices()[0]
    peak = metricslib.peak_tflops(device)
    writer = metricslib.MetricsWriter(run_dir, enabled=main)
    validator = None
    if cfg.train.sample_every:
        synthetic = data.host_batch(0) if cfg.data.source == "synthetic" else None
        validator = validatelib.Validator(cfg, mesh, graphdef, validatelib.validation_clips(cfg, synthetic), run_dir,
                                          writer, main)
    stop = _StopSignal()
    losses: list[float] = []
    t = cfg.train
    last_report = time.perf_counter()

    def meta(done: int) -> dict:
        return {"step": done, "seed": t.seed, "data_position": done, "stage": STAGE, "config": cfg.to_dict()}

    def save(done: int) -> None:
        try:
            checkpoints.save(done, state, frozen, meta(done), data.iterator)
        except Exception as err:  # noqa: BLE001 - a failed save (disk full, I/O error) must not end the run
            writer.error(done, f"checkpoint save at step {done} failed ({type(err).__name__}: {err}); training "
                               f"goes on, earlier checkpoints in {checkpoints.directory} are untouched")

    def report(step: int, metrics) -> None:
        nonlocal last_report
        values = jax.device_get(metrics)
        now = time.perf_counter()
        step_s, last_report = now - last_report, now
        loss = float(values["loss"])
        finite = bool(np.isfinite(loss) and np.isfinite(values["grad_norm"]))
        if finite:
            losses.append(loss)
        if step % t.log_every == 0 or step == t.steps - 1 or not finite:
            tflops = flops / step_s / 1e12 if flops else None
            writer.write({
                "step": step, "stage": STAGE, "loss": loss, "lr": float(values["lr"]),
                "grad_norm": float(values["grad_norm"]), "step_s": step_s,
                "samples_per_s": cfg.data.batch_size / step_s, "tflops_per_device": tflops,
                "mfu": tflops / peak if tflops and peak else None,
                "peak_memory_bytes": metricslib.peak_memory_bytes(device),
                "skipped_steps": int(values["skipped_steps"]),
            })
            if finite:
                bar.set_postfix(loss=f"{np.mean(losses[-t.log_every:]):.4f}")
        in_a_row = int(values["nonfinite_in_a_row"])
        if in_a_row >= t.max_nonfinite_in_a_row:
            raise TrainingStopped(
                f"{in_a_row} steps in a row up to step {step} had a non-finite loss or gradient (their updates "
                f"were skipped); stopping. The last checkpoint is {checkpoints.latest_step()} in "
                f"{checkpoints.directory}. Lower train.lr, raise train.warmup_steps, check the data near step "
                f"{step}, or raise train.max_nonfinite_in_a_row.")

    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", disable=not main)
    pending = None
    interrupted = None
    start_time = time.perf_counter()
    try:
        for step in range(start, t.steps):
            batch = first_batch if step == start else data.batch(step)
            # Another bucket's shapes (arrayrecord data.buckets) compile once more through the jitted step.
            same_shapes = all(batch[k].shape == first_batch[k].shape for k in batch)
            state, metrics = (compiled if same_shapes else step_fn)(state, frozen, batch, np.int32(step))
            if pending:
                report(*pending)
            pending = (step, metrics)
            bar.update(1)
            done = step + 1
            if stop.received is not None:
                interrupted = f"signal {stop.received} after step {step}"
            if done % cfg.checkpoint.every == 0 or done == t.steps or interrupted:
                save(done)
            if validator and validator.due(done):
                report(*pending)  # before sampling, so that no step_s counts the sampling time
                pending = None
                validator(done, state["params"], frozen)
                last_report = time.perf_counter()
            if interrupted:
                break
        if pending:
            report(*pending)
    finally:
        bar.close()
        stop.restore()
        try:
            checkpoints.wait()
        except Exception as err:  # noqa: BLE001 - reported, as for a save that fails at once
            writer.error(t.steps, f"a checkpoint write failed ({type(err).__name__}: {err}); earlier checkpoints "
                                  f"in {checkpoints.directory} are untouched")
        checkpoints.close()
        writer.close()
    if interrupted and main:
        print(f"insvie-jax train: stopped by {interrupted}; checkpoint saved, rerun the same command to resume",
              file=sys.stderr, flush=True)
    window = max(1, min(25, len(losses) // 4))
    return {
        "steps": len(losses),
        "start_step": start,
        "first_loss": float(np.mean(losses[:window])) if losses else None,
        "last_loss": float(np.mean(losses[-window:])) if losses else None,
        "skipped_steps": int(jax.device_get(state["skipped"])),
        "compile_s": compile_s,
        "total_s": time.perf_counter() - start_time,
        "interrupted": interrupted,
        "run_dir": str(run_dir),
    }
