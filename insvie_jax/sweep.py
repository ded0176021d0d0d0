"""Sweeps: one base config, a grid or a list of overrides, one run folder per combination, one results table.

A sweep file (YAML):

    name: tiny-ablation                 # folder name under --dir (default: the file's stem)
    base: tiny                          # preset or YAML (relative to the sweep file)
    overrides: [train.steps=60]         # applied to every run
    grid:                               # cartesian product ...
      model.patch_embed: [double_ch, fix_proj]
      train.frame_loss_weight: [0.5, 1.0]
    runs:                               # ... and/or a list; with both, every run is crossed with every grid point
      - {lora.enabled: true, lora.rank: 16}

Layout of DIR/<name>/: one folder per run, named from its overrides (`patch_embed-fix_proj,frame_loss_weight-1.0`),
holding run.json (its overrides), config.yaml (the resolved config; `train.run_dir` is the folder itself) and
what `insvie-jax train` writes there; results.md, results.csv and loss_curves.png (`report`); commands-<kind>.sh
(`emit`). A run is finished when its checkpoint at `train.steps` exists; finished runs are skipped. DIR may be
an object-storage URL (gs://): run folders and the report go there, train.log is uploaded after each run.
"""

from __future__ import annotations

import collections
import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from etils import epath

from insvie_jax import config as configlib
from insvie_jax import storage

SWEEP_KEYS = ("name", "base", "overrides", "grid", "runs")
MAX_NAME = 100  # characters of a run folder name; longer names are cut and end in a hash of the overrides
FINAL_LOSS_WINDOW = 5  # the final loss is the mean of this many last logged losses
# `insvie-jax eval` metrics of each run's last validation videos (pixel data only), shown when some run has them
EVAL_COLUMNS = ("psnr_source", "ssim_source", "psnr_target", "ssim_target", "warp_error")
EMIT_KINDS = ("local", "slurm", "tpu")
STATUS_FILE = "status.json"  # written by `run_local` after each run: exit code and seconds


@dataclass
class Run:
    name: str
    index: int
    overrides: dict  # this run's own keys (grid point and/or `runs` entry), key -> value
    config: configlib.Config
    folder: epath.Path  # storage.path: local or an object-storage URL

    @property
    def config_path(self) -> epath.Path:
        return self.folder / "config.yaml"


@dataclass
class Sweep:
    name: str
    folder: epath.Path
    runs: list[Run]


def _override_text(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"  # JSON is YAML: the value reads back as written


def _name_value(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "empty"


def run_names(points: list[dict]) -> list[str]:
    """Short, filesystem-safe names that depend on the overrides alone: `key-value,...` with the last part of
    each key (the full key where two keys share it); too long or clashing names end in a hash of the overrides.
    No '=': `insvie-jax train` reads an argument holding one as an override, not as a config path."""
    keys = list(dict.fromkeys(k for point in points for k in point))
    tails = [k.rsplit(".", 1)[-1] for k in keys]
    short = {k: (t if tails.count(t) == 1 else k) for k, t in zip(keys, tails)}
    names = []
    for point in points:
        name = ",".join(f"{short[k]}-{_name_value(v)}" for k, v in point.items()) or "baseline"
        digest = hashlib.sha1(json.dumps(point, sort_keys=True).encode()).hexdigest()[:8]
        if len(name) > MAX_NAME:
            name = f"{name[:MAX_NAME - 9]}-{digest}"
        names.append((name, digest))
    counts = collections.Counter(name for name, _ in names)
    return [name if counts[name] == 1 else f"{name}-{digest}" for name, digest in names]


def _overrides_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):
        return [_override_text(k, v) for k, v in value.items()]
    if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
        return list(value)
    raise configlib.ConfigError(f"{where}: 'overrides' must be a list of key=value strings or a mapping")


def _points(spec: dict, where: str) -> list[dict]:
    grid, runs = spec.get("grid") or {}, spec.get("runs")
    if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
        raise configlib.ConfigError(f"{where}: 'grid' must map keys to non-empty lists of values")
    if runs is not None and (not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs) or not runs):
        raise configlib.ConfigError(f"{where}: 'runs' must be a non-empty list of mappings (key: value)")
    grid_points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    points = []
    for entry in runs or [{}]:
        clash = set(entry) & set(grid)
        if clash:
            raise configlib.ConfigError(f"{where}: {sorted(clash)} appear in both 'runs' and 'grid'")
        points += [{**entry, **point} for point in grid_points]
    seen = {}
    for number, point in enumerate(points, 1):
        key = json.dumps(point, sort_keys=True)
        if key in seen:
            raise configlib.ConfigError(f"{where}: runs {seen[key]} and {number} have the same overrides {point}")
        seen[key] = number
    return points


def load(path: str | Path, root: str | Path = "sweeps", extra_overrides: list[str] | tuple = ()) -> Sweep:
    """Reads a sweep file and resolves every run's config (all validated before anything runs); `extra_overrides`
    apply to every run after the file's own. Run folders are ROOT/<name>/<run>."""
    path = Path(path)
    if not path.is_file():
        raise configlib.ConfigError(f"sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise configlib.ConfigError(f"sweep file {path} is not valid YAML: {err}") from err
    where = f"sweep file {path}"
    if not isinstance(spec, dict):
        raise configlib.ConfigError(f"{where} must hold a mapping with keys {', '.join(SWEEP_KEYS)}")
    unknown = sorted(set(spec) - set(SWEEP_KEYS))
    if unknown:
        raise configlib.ConfigError(f"{where}: unknown keys {unknown}; a sweep file has {', '.join(SWEEP_KEYS)}")
    name = str(spec.get("name") or path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise configlib.ConfigError(f"{where}: name {name!r} may hold only letters, digits, '.', '_' and '-'")
    base = spec.get("base")
    if not base:
        raise configlib.ConfigError(f"{where}: 'base' (a preset name or a YAML config) is missing")
    base_path = path.parent / str(base)
    base = base_path if base_path.is_file() else str(base)
    shared = _overrides_list(spec.get("overrides"), where) + list(extra_overrides)
    points = _points(spec, where)
    folder = storage.absolute(root) / name
    runs = []
    for index, (point, run_name) in enumerate(zip(points, run_names(points))):
        try:
            cfg = configlib.load(base, shared + [_override_text(k, v) for k, v in point.items()])
        except configlib.ConfigError as err:
            raise configlib.ConfigError(f"{where}, run '{run_name}': {err}") from None
        cfg.train.run_dir = str(folder / run_name)
        runs.append(Run(run_name, index, point, cfg, folder / run_name))
    return Sweep(name, folder, runs)


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
    before, now = _flat(configlib.load(run.config_path).to_dict()), _flat(run.config.to_dict())
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


def _saved_steps(folder) -> list[int]:
    checkpoints = folder / "checkpoints"
    return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()) if checkpoints.is_dir() else []


def run_status(folder, steps: int) -> str:
    """done (checkpoint at train.steps), failed (the last local attempt exited nonzero), started (metrics but
    not done: crashed, stopped or still running), pending (nothing yet)."""
    folder = storage.path(folder)
    saved = _saved_steps(folder)
    if saved and saved[-1] >= steps:
        return "done"
    status = folder / STATUS_FILE
    if status.is_file() and json.loads(status.read_text()).get("returncode"):
        return "failed"
    return "started" if (folder / "metrics.jsonl").is_file() else "pending"


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


def _records(folder) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of metrics.jsonl, one per step: a resumed run logs some steps
    twice, the later record wins."""
    train, val = {}, {}
    path = folder / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if "loss" in record:
                train[record["step"]] = record
            elif "edit_mse" in record:
                val[record["step"]] = record
    return [train[s] for s in sorted(train)], [val[s] for s in sorted(val)]


def _finite(values) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _run_folders(folder) -> list[tuple[dict, epath.Path]]:
    runs = [(json.loads((p / "run.json").read_text()), p) for p in folder.iterdir() if (p / "run.json").is_file()]
    return sorted(runs, key=lambda item: (item[0].get("index", 0), item[0]["name"]))


def collect(folder) -> tuple[list[str], list[dict], dict]:
    """Reads every run folder under FOLDER: (columns, rows, {run: [(step, loss)]})."""
    from insvie_jax.eval import eval_run_samples

    folder = storage.path(folder)
    runs = _run_folders(folder) if folder.is_dir() else []
    if not runs:
        raise FileNotFoundError(f"no sweep runs (folders with run.json) in {folder}: pass the sweep's folder, "
                                "e.g. sweeps/<name>")
    keys = list(dict.fromkeys(k for info, _ in runs for k in info["overrides"]))
    columns = ["run", *keys, "status", "steps", "final_loss", "best_loss", "edit_mse", "source_mse", "step_s"]
    rows, curves = [], {}
    for info, path in runs:
        steps = yaml.safe_load((path / "config.yaml").read_text())["train"]["steps"]
        train, val = _records(path)
        losses = _finite(r["loss"] for r in train)
        step_s = _finite(r.get("step_s") for r in train)
        row = {"run": info["name"], **{k: info["overrides"].get(k) for k in keys},
               "status": run_status(path, steps), "steps": train[-1]["step"] + 1 if train else 0,
               "final_loss": statistics.fmean(losses[-FINAL_LOSS_WINDOW:]) if losses else None,
               "best_loss": min(losses) if losses else None,
               "edit_mse": val[-1]["edit_mse"] if val else None, "source_mse": val[-1]["source_mse"] if val else None,
               "step_s": statistics.median(step_s) if step_s else None}
        evals = eval_run_samples(path) or {}
        row.update({k: evals.get(k) for k in EVAL_COLUMNS})
        rows.append(row)
        curves[info["name"]] = [(r["step"], r["loss"]) for r in train]
    columns += [k for k in EVAL_COLUMNS if any(row[k] is not None for row in rows)]
    return columns, rows, curves


def _cell(value, measured: bool) -> str:
    """Overrides as written in the sweep (5.0 stays 5.0), measured numbers to 6 significant digits."""
    if value is None:
        return ""
    if measured and isinstance(value, float):
        return f"{value:.6g}"
    return value if isinstance(value, str) else json.dumps(value)


def _plot(curves: dict, path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in curves.items():
        if points:
            ax.plot(*zip(*points), label=name)
    ax.set(xlabel="step", ylabel="training loss", title=title)
    ax.grid(alpha=0.3)
    if any(curves.values()):
        ax.legend(fontsize="small")
    fig.tight_layout()
    with storage.local_file(path) as local:
        fig.savefig(local, dpi=100, metadata={"Software": None})
    plt.close(fig)


def report(folder) -> list[dict]:
    """Writes FOLDER/results.csv, results.md and loss_curves.png from the run folders; returns the rows."""
    folder = storage.path(folder)
    columns, rows, curves = collect(folder)
    overrides = set(columns[1:columns.index("status")])
    cells = [[_cell(row[c], c not in overrides) for c in columns] for row in rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(cells)
    (folder / "results.csv").write_text(buffer.getvalue())
    markdown = [f"# Sweep {folder.name}", "", "| " + " | ".join(columns) + " |",
                "|" + "|".join("---" for _ in columns) + "|",
                *("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells),
                "", f"final_loss: mean of the last {FINAL_LOSS_WINDOW} logged losses; edit_mse / source_mse: the last "
                "validation edit; step_s: median seconds per logged step"
                + ("; psnr_* / ssim_* / warp_error: `insvie-jax eval` of the last validation videos (edit vs source "
                   "/ target; README, Evaluating edits)." if columns[-1] in EVAL_COLUMNS else "."), ""]
    (folder / "results.md").write_text("\n".join(markdown))
    _plot(curves, folder / "loss_curves.png", f"sweep {folder.name}")
    return rows


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
