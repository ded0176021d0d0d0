"""Checkpoint contents and retention, and a save that fails mid-run (the disk "fills up": the process's
file-size limit is lowered while it runs, which fails writes with EFBIG even for root)."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp

# The same program in every run (steps, EMA), so that the compilation cache serves all but the first.
ARGS = ["train.log_every=1", "train.steps=40", "train.ema_decay=0.5", "data.num_frames=5", "data.height=32", "data.width=48"]
FILE_LIMIT = 30_000  # bytes: above metrics.jsonl of the run, below the checkpoint's array files


def _command(run_dir, *extra):
    return [sys.executable, "-m", "insvie_jax.cli", "train", "tiny", f"train.run_dir={run_dir}", *ARGS, *extra]


def _records(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _steps(run_dir):
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir() if p.name.isdigit())


def test_checkpoints_keep_n_plus_every_k_and_hold_the_run_state(tmp_path, env):
    run_dir = tmp_path / "run"
    subprocess.run(_command(run_dir, "checkpoint.every=2", "checkpoint.keep=2", "checkpoint.keep_every=12"),
                   env=env, check=True, capture_output=True, timeout=300)
    assert _steps(run_dir) == [12, 24, 36, 38, 40]  # the newest 2 plus the multiples of 12
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    meta = manager.restore(40, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert meta["step"] == 40 and meta["data_position"] == 40 and meta["seed"] == 0 and meta["stage"] == "main"
    assert meta["config"]["train"]["ema_decay"] == 0.5 and meta["config"]["model"]["name"] == "tiny"
    state = manager.restore(40, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert {"params", "opt_state", "ema", "skipped", "nonfinite_in_a_row"} <= set(state)
    kernel, ema = state["params"]["proj_out"]["kernel"], state["ema"]["proj_out"]["kernel"]
    assert kernel.shape == ema.shape and 0 < np.abs(np.asarray(kernel) - np.asarray(ema)).max() < 0.1


def test_a_failed_save_is_reported_and_the_run_goes_on_and_earlier_checkpoints_resume(tmp_path, env):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_command(run_dir, "checkpoint.every=4", "checkpoint.keep=10"),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_dir / "checkpoints" / "4").exists():
        time.sleep(0.002)
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr  # the run finished despite the failing saves
    summary = json.loads(stdout[stdout.index("{"):])
    assert summary["steps"] == 40
    assert "checkpoint save at step" in stderr and "failed" in stderr, stderr
    errors = [r for r in _records(run_dir) if "error" in r]
    assert errors and all("checkpoint" in r["error"] for r in errors), errors
    good = _steps(run_dir)
    assert good and good[-1] < 40, good  # the end-of-run checkpoint could not be written

    # The checkpoints written before the disk "filled up" are intact: a rerun resumes from the newest.
    again = subprocess.run(_command(run_dir, "checkpoint.every=4"), env=env, capture_output=True,
                           text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    assert f"from checkpoint {good[-1]}" in again.stderr
    assert json.loads(again.stdout[again.stdout.index("{"):])["start_step"] == good[-1]
    assert _steps(run_dir)[-1] == 40
