"""The results of a sweep's run folders: results.md, results.csv and loss_curves.png."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics

import yaml
from etils import epath

from insvie_jax import storage

FINAL_LOSS_WINDOW = 5  # the final loss is the mean of this many last logged losses
# `insvie-jax eval` metrics of each run's last validation videos (pixel data only), shown when some run has them
EVAL_COLUMNS = ("psnr_source", "ssim_source", "psnr_target", "ssim_target", "warp_error")


STATUS_FILE = "status.json"  # written by `run_local` after each run: exit code and seconds


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
