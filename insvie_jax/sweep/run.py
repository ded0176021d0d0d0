"""Running a sweep: run folders prepared, runs trained here one after another, or launch lines emitted."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax.data.prepare import prepared_config
from insvie_jax.sweep.report import STATUS_FILE, report, run_status
from insvie_jax.sweep.spec import Run, Sweep, load

EMIT_KINDS = ("local", "slurm", "tpu")


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_unchanged(run: Run) -> None:
    """A run that has begun keeps the config it began with: a finished run would otherwise be skipped with
    results of the old config filed under the new one, and a started one would resume under another config."""
    if not run.config_path.is_file() or run_status(run.folder, run.config.train.steps) == "pending":
        return
    # `train` records generated data's default folder (data.paths) in the config.yaml it rewrites: compare with it.
    now = prepared_config(run.config)
    before, now = _flat(configlib.load(run.config_path).to_dict()), _flat(now.to_dict())
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:5])
        more = f" (and {len(changed) - 5} more)" if len(changed) > 5 else ""
        raise configlib.ConfigError(
            f"run '{run.name}' in {run.folder} began with another config ({shown}{more}); write this sweep to "
            f"another --dir, or delete {run.folder} to run it again")


def prepare(sweep: Sweep) -> None:
    """Writes each run's folder: run.json (its overrides) and config.yaml (its resolved config). Refuses, before
    writing anything, if a run that has begun would get another config."""
    for run in sweep.runs:
        _check_unchanged(run)
    for run in sweep.runs:
        storage.makedirs(run.folder)
        (run.folder / "run.json").write_text(json.dumps({"name": run.name, "index": run.index,
                                                          "overrides": run.overrides}, indent=2) + "\n")
        configlib.save(run.config, run.config_path)


def _log(message: str) -> None:
    print(f"insvie-jax sweep: {message}", file=sys.stderr, flush=True)


def run_local(sweep: Sweep, python: str = sys.executable) -> int:
    """Trains the runs one after another, each in its own `insvie-jax train` process (memory is freed between
    runs; a crash ends only its run). Finished runs are skipped. Returns how many runs failed."""
    prepare(sweep)
    failed = 0
    for number, run in enumerate(sweep.runs, 1):
        label = f"[{number}/{len(sweep.runs)}] {run.name}"
        if run_status(run.folder, run.config.train.steps) == "done":
            _log(f"{label}: finished, skipped")
            continue
        _log(f"{label}: training (log: {run.folder / 'train.log'})")
        start = time.perf_counter()
        logs = storage.Mirror(run.folder, resume=("train.log",))  # a URL's log is uploaded after the run
        with open(os.path.join(logs.local, "train.log"), "a") as log:
            code = subprocess.call([python, "-m", "insvie_jax.cli", "train", str(run.config_path)],
                                   stdout=log, stderr=subprocess.STDOUT)
        logs.close()
        seconds = time.perf_counter() - start
        (run.folder / STATUS_FILE).write_text(json.dumps({"returncode": code, "seconds": seconds}) + "\n")
        if code:
            failed += 1
            _log(f"{label}: FAILED (exit {code}) after {seconds:.0f} s; see {run.folder / 'train.log'}")
        else:
            _log(f"{label}: done in {seconds:.0f} s")
    return failed


def launch_command(kind: str, run: Run, sweep_name: str, processes: int = 1) -> str:
    """One shell line that trains `run` through launch/ (run from the repository root)."""
    config = shlex.quote(str(run.config_path))
    if kind == "local":
        return f"launch/local.sh {processes} {config}"
    if kind == "slurm":
        job = shlex.quote(f"{sweep_name}-{run.name}")
        output = shlex.quote(str(run.folder / "slurm-%j.out"))
        return f"sbatch --job-name={job} --output={output} launch/slurm.sbatch {config}"
    if kind == "tpu":
        return f'launch/tpu_pod.sh "$TPU_NAME" "$TPU_ZONE" {config}'
    raise configlib.ConfigError(f"--emit {kind!r}: expected one of {', '.join(EMIT_KINDS)}")


def emit(sweep: Sweep, kind: str, processes: int = 1):
    """Writes DIR/<name>/commands-<kind>.sh: one launch line per run that is not finished yet."""
    prepare(sweep)
    todo = [run for run in sweep.runs if run_status(run.folder, run.config.train.steps) != "done"]
    lines = ["#!/usr/bin/env bash",
             f"# insvie-jax sweep {sweep.name}: {len(todo)} of {len(sweep.runs)} runs left; run from the insvie-jax "
             "checkout (the launchers are in launch/).",
             *(['# needs TPU_NAME and TPU_ZONE (e.g. export TPU_NAME=my-v5p-64 TPU_ZONE=us-east5-a)']
               if kind == "tpu" else []),
             *(launch_command(kind, run, sweep.name, processes) for run in todo)]
    path = sweep.folder / f"commands-{kind}.sh"
    path.write_text("\n".join(lines) + "\n")
    if not storage.is_url(path):  # an executable script where the launchers run it
        os.chmod(path, 0o755)
    return path


# ---------------------------------------------------------------------------------------------------
# Report


def main(file: str, root: str, overrides: list[str], kind: str | None, processes: int) -> int:
    """`insvie-jax sweep FILE`: runs (or emits) the sweep, then writes its report; 1 if a run failed."""
    sweep = load(file, root, overrides)
    _log(f"{sweep.name}: {len(sweep.runs)} runs in {sweep.folder}")
    if kind:
        path = emit(sweep, kind, processes)
        print(path)
        return 0
    failed = run_local(sweep, python=os.environ.get("PYTHON", sys.executable))
    report(sweep.folder)
    print(sweep.folder / "results.md")
    if failed:
        _log(f"{failed} of {len(sweep.runs)} runs failed")
    return 1 if failed else 0
