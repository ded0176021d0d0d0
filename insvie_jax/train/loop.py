"""The training loop: (prepared) config -> mesh -> models -> TrainState -> compiled step -> metrics and
checkpoints in RUN. One straight line: data comes prepared (data/prepare.py, run before by `insvie-jax train`
when data.generate is set) and its batches from data/batches.py; the models from convert/models.py; the state
from train/state.py; validation gets its clips and VAE handed in.

A run pointed at a folder that holds checkpoints resumes from the latest one; because every random draw is
a function of (seed, step) and the data is either too (synthetic) or a grain pipeline whose per-process
iterator state is saved in each checkpoint (arrayrecord, video), the resumed run computes what the
uninterrupted one would have, bit for bit. SIGTERM saves a checkpoint after the current step and stops.

A run is a list of stages (config `stages`, a curriculum; none = one stage "main" of train.steps steps) on one
global step count: stage k covers [sum of earlier steps, + its steps) with its own config (data, schedule, what
trains, ...) and starts from the weights the stage before ended with (`TrainState.carry_over`, train/state.py). All stages write one
checkpoint series whose meta names the stage; a resumed run finds its stage from the checkpoint's step, and a
checkpoint at a stage's end resumes into the next stage.

The loop reads step N's metrics after launching step N+1, so the host never stalls the device.
Every `train.sample_every` steps the model edits a few validation clips (train/validate.py).
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import jax
import numpy as np
from tqdm import tqdm

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax.convert.models import load_training_models
from insvie_jax.data import synthetic_videos
from insvie_jax.data.batches import train_batches, validation_clips
from insvie_jax.data.prepare import check_prepared
from insvie_jax.parallel import distributed
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.train import metrics as metricslib
from insvie_jax.train import step as steplib
from insvie_jax.train import validate as validatelib
from insvie_jax.train.checkpoint import Checkpointer, saves_frozen
from insvie_jax.train.state import TrainState


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. non-finite losses in a row); the message says where and what to do."""


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


def _stage_of_checkpoint(stages: list[configlib.Stage], step: int, meta: dict, where) -> int:
    """The index of the stage that wrote checkpoint `step`: the one with start < step <= end (a checkpoint at a
    stage's end is that stage's last); checked against the stage name the checkpoint recorded."""
    index = next((i for i, s in enumerate(stages) if s.start < step <= s.end), len(stages) - 1)
    if meta.get("stage") != stages[index].name:
        plan = ", ".join(f"{s.name} [{s.start}, {s.end})" for s in stages)
        raise configlib.ConfigError(
            f"checkpoint {step} in {where} was written by stage {meta.get('stage')!r}, but this config puts step "
            f"{step} in stage {stages[index].name!r} (stages: {plan}): the stage list changed since the run began; "
            "restore it, or start a new train.run_dir")
    return index


class _Run:
    """What the stages of one run share: the mesh, the checkpoint series, the metrics writer, the stop signal,
    and the losses, compile time and stop reason so far."""

    def __init__(self, cfg: configlib.Config, stages: list[configlib.Stage], run_dir, mesh, groups: int,
                 main: bool):
        self.stages, self.run_dir, self.mesh, self.groups, self.main = stages, run_dir, mesh, groups, main
        self.staged = bool(cfg.stages)
        self.checkpoints = Checkpointer(run_dir, cfg)
        self.writer = metricslib.MetricsWriter(run_dir, enabled=main)
        self.losses: list[float] = []
        self.stage_summaries: list[dict] = []
        self.compile_s = 0.0
        self.interrupted = None
        self.validation = None  # the last validation record (edit_mse vs source_mse)
        self.skipped = 0
        self.stop = _StopSignal()

    def train_stage(self, index: int, state: TrainState, optimizer, data, start: int) -> TrainState:
        """Trains stage `index` from global step `start` to its end, or until a stop signal; returns the state."""
        stage = self.stages[index]
        cfg, t, mesh, checkpoints, writer = stage.config, stage.config.train, self.mesh, self.checkpoints, self.writer
        step_fn = steplib.make_train_step(cfg, state, optimizer, mesh, self.groups, first_step=stage.start)
        first_batch = data.batch(start)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state.variables, state.frozen, first_batch, np.int32(start)).compile()
        self.compile_s += time.perf_counter() - t0
        flops = metricslib.step_flops(cfg, configlib.latent_shape(cfg)[:3], mesh.size)
        device = jax.local_devices()[0]
        peak = metricslib.peak_tflops(device)
        validator = None
        if t.sample_every:  # only the main process decodes validation edits to videos: only it needs the VAE
            vae = load_training_models(cfg, vae=self.main and cfg.data.source != "synthetic").vae
            validator = validatelib.Validator(cfg, mesh, state.graphdef, validation_clips(cfg), vae, self.run_dir,
                                              writer, self.main)
        losses: list[float] = []
        last_report = time.perf_counter()

        def meta(done: int) -> dict:
            return {"step": done, "seed": t.seed, "data_position": done - stage.start, "stage": stage.name,
                    "stage_index": index, "stage_start": stage.start, "config": cfg.to_dict()}

        def save(done: int) -> None:
            try:
                checkpoints.save(done, state, meta(done), data.iterator)
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
            if step % t.log_every == 0 or step == stage.end - 1 or not finite:
                tflops = flops / step_s / 1e12 if flops else None
                writer.write({
                    "step": step, "stage": stage.name, "loss": loss, "lr": float(values["lr"]),
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

        bar = tqdm(total=stage.steps, initial=start - stage.start, desc=stage.name if self.staged else "train",
                   unit="step", disable=not self.main)
        pending = None
        try:
            for step in range(start, stage.end):
                batch = first_batch if step == start else data.batch(step)
                # Another bucket's shapes (arrayrecord data.buckets) compile once more through the jitted step.
                same_shapes = all(batch[k].shape == first_batch[k].shape for k in batch)
                variables, metrics = (compiled if same_shapes else step_fn)(state.variables, state.frozen, batch,
                                                                            np.int32(step))
                state = state.replace(variables=variables)
                if pending:
                    report(*pending)
                pending = (step, metrics)
                bar.update(1)
                done = step + 1
                if self.stop.received is not None:
                    self.interrupted = f"signal {self.stop.received} after step {step}"
                if done % cfg.checkpoint.every == 0 or done == stage.end or self.interrupted:
                    save(done)
                if validator and validator.due(done):
                    report(*pending)  # before sampling, so that no step_s counts the sampling time
                    pending = None
                    self.validation = validator(done, state.params, state.frozen)
                    last_report = time.perf_counter()
                if self.interrupted:
                    break
            if pending:
                report(*pending)
        finally:
            bar.close()
        self.losses += losses
        self.stage_summaries.append({"name": stage.name, "start_step": start, "steps": len(losses),
                                     "first_loss": losses[0] if losses else None,
                                     "last_loss": losses[-1] if losses else None})
        return state


def run(cfg: configlib.Config) -> dict:
    """Trains the run's stages one after another (config `stages`; none: one stage of train.steps steps),
    resuming RUN if it holds checkpoints; returns a summary. Data comes prepared: with data.generate, the config
    `data.prepare.prepare` returned (what `insvie-jax train` and `insvie-jax prepare` run first)."""
    check_prepared(cfg)
    distributed.initialize()
    main = distributed.is_main_process()
    stages = configlib.resolve_stages(cfg)
    run_dir = storage.path(cfg.train.run_dir)  # a local folder or an object-storage URL (gs://...)
    if main:
        storage.makedirs(run_dir)
        configlib.save(cfg, run_dir / "config.yaml")
    mesh = meshlib.create_mesh(cfg.mesh)
    groups = meshlib.data_parallel_size(mesh)
    for stage in stages:
        meshlib.check_batch_size(mesh, stage.config.data.batch_size, f"stage '{stage.name}': " if cfg.stages else "")
    total = stages[-1].end
    job = _Run(cfg, stages, run_dir, mesh, groups, main)
    checkpoints = job.checkpoints
    latest = checkpoints.latest_step()
    first = 0
    if latest is not None:
        first = _stage_of_checkpoint(stages, latest, checkpoints.meta(latest), checkpoints.directory)
        if main:
            where = (f" (stage '{stages[first].name}', step {latest - stages[first].start} of "
                     f"{stages[first].steps})") if cfg.stages else ""
            print(f"insvie-jax train: resuming {run_dir} from checkpoint {latest}{where}", file=sys.stderr, flush=True)
            if latest >= total:
                steps = "the stages' steps" if cfg.stages else "train.steps"
                print(f"insvie-jax train: {run_dir} is already at step {latest} of {steps}={total}: nothing to "
                      f"train (raise {steps.removesuffix(' steps')} to go on, or pick a new train.run_dir)",
                      file=sys.stderr, flush=True)

    start_time = time.perf_counter()
    state, before = None, None  # the state where stage `before` ended
    try:
        for index in range(first, len(stages)):
            stage = stages[index]
            optimizer = steplib.make_optimizer(stage.config)
            checkpoints.save_frozen = saves_frozen(stages, index)
            if before is None:
                models = load_training_models(stage.config)  # train.init_from's transformer, else none: random
                state = TrainState.init(stage.config, mesh, optimizer, models)
            else:
                state = state.carry_over(before, stage, mesh, optimizer)
            start, data = stage.start, None
            if index == first and latest is not None:
                start = min(latest, stage.end)
                if start < stage.end:  # at a stage's end its data is not needed: the next stage starts afresh
                    data = train_batches(stage.config, steplib.batch_shardings(stage.config, mesh))
                state, _ = checkpoints.restore(latest, state, data.iterator if data else None)
            if start < stage.end:
                data = data or train_batches(stage.config, steplib.batch_shardings(stage.config, mesh))
                state = job.train_stage(index, state, optimizer, data, start)
            job.skipped = int(jax.device_get(state.variables["skipped"]))
            if job.interrupted:
                break
            before = stage
    finally:
        job.stop.restore()
        try:
            checkpoints.wait()
        except Exception as err:  # noqa: BLE001 - reported, as for a save that fails at once
            job.writer.error(total, f"a checkpoint write failed ({type(err).__name__}: {err}); earlier checkpoints "
                                    f"in {checkpoints.directory} are untouched")
        checkpoints.close()
        job.writer.close()
    if job.interrupted and main:
        print(f"insvie-jax train: stopped by {job.interrupted}; checkpoint saved, rerun the same command to resume",
              file=sys.stderr, flush=True)
    losses = job.losses
    window = max(1, min(25, len(losses) // 4))
    summary = {
        "steps": len(losses),
        "start_step": latest or 0,
        "first_loss": float(np.mean(losses[:window])) if losses else None,
        "last_loss": float(np.mean(losses[-window:])) if losses else None,
        "skipped_steps": job.skipped,
        "compile_s": job.compile_s,
        "total_s": time.perf_counter() - start_time,
        "interrupted": job.interrupted,
        "validation": job.validation,
        "run_dir": str(run_dir),
    }
    if cfg.stages:
        summary["stages"] = job.stage_summaries
    if job.validation and "samples" in job.validation:
        summary["samples"] = job.validation["samples"]  # mp4s and contact_sheet.png of the last validation
    if checkpoints.latest_step() is not None:
        summary["edit_command"] = _edit_command(cfg, run_dir)
    return summary


def _edit_command(cfg: configlib.Config, run_dir) -> str:
    """The `insvie-jax edit` line that edits with this run (its latest checkpoint and its config): on a held-out
    generated clip when there is one."""
    import shlex

    video, instruction = "VIDEO.mp4", "INSTRUCTION"
    for folder in synthetic_videos.validation_folders(cfg)[:1]:
        known = synthetic_videos.instructions_of(folder)
        if known:
            name, instruction = sorted(known.items())[0]
            video = str(folder / "videos" / "source" / name)
    ema = " --ema" if cfg.train.ema_decay > 0 else ""
    return (f"insvie-jax edit --checkpoint {shlex.quote(str(run_dir))}{ema} --video {shlex.quote(video)} "
            f"--instruction {shlex.quote(instruction)} --out {shlex.quote(str(run_dir / 'edits'))}")
