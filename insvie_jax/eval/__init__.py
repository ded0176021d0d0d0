"""`insvie-jax eval`: the metrics video-editing papers report, per clip and summarised.

`evaluate(items, out, ...)` measures each (source, edit[, target]) item (`inputs.py` reads them from CSVs or an
edit command's output folder), writes OUT/per_clip.csv, OUT/summary.md and OUT/summary.json, and returns the
summary. `eval_clips(sources, edits, targets)` is the in-memory entry for training's validation and sweeps.
Metrics: `metrics.py`. CLIP scores need a local Hugging Face CLIP folder; the judge (`data/filters.py`'s
pluggable VLM judge: an HTTP endpoint or a Python function) is off unless named.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from insvie_jax.eval.inputs import EvalItem, load, read_csv, read_edit_folder  # noqa: F401  (the API)
from insvie_jax.eval.metrics import DESCRIPTIONS, METRICS, eval_clip, eval_clips, mean_metrics  # noqa: F401

ITEM_COLUMNS = ("name", "frames", "height", "width", "error", "source", "edit", "target", "instruction")
JUDGE_FRAMES = 3  # evenly spaced frames of source and edit sent to the judge (as the filter's default)


def make_judge(spec: str):
    """A judge from `spec` as `filter.judge` takes it: an http(s) URL or 'module:function'; '' = none."""
    from insvie_jax.config import FilterConfig
    from insvie_jax.data import filters

    return filters.make_judge(dataclasses.replace(FilterConfig(), judge=spec)) if spec else None


def _judge(judge, source: np.ndarray, edit: np.ndarray, instruction: str) -> float:
    from insvie_jax.data.filters import JudgeItem

    picks = np.unique(np.linspace(0, len(edit) - 1, min(JUDGE_FRAMES, len(edit))).round().astype(int))
    (score,) = judge([JudgeItem(source[picks], edit[picks], instruction)])
    if isinstance(score, Exception):
        raise score
    return float(score)


def evaluate(items: list[EvalItem], out: str | Path, *, clip: str | None = None, judge: str = "",
             max_frames: int = 49, show_progress: bool = False) -> dict:
    """Measures every item; an item that cannot be read gets its reason in the `error` column, the others go on.
    Writes OUT/per_clip.csv, summary.md, summary.json; returns the summary."""
    from insvie_jax.data.video import VideoError

    scorer = None
    if clip:
        from insvie_jax.convert.clip_keys import ClipScorer

        scorer = ClipScorer(clip)
    judge_fn = make_judge(judge)
    rows = []
    for item in tqdm(items, unit="clip", desc="eval", disable=not show_progress):
        row = {"name": item.name, "source": item.source, "edit": item.edit, "target": item.target or "",
               "instruction": item.instruction}
        rows.append(row)
        try:
            source, edit, target = load(item, max_frames)
        except (VideoError, FileNotFoundError) as err:
            row["error"] = str(err)
            continue
        row.update(frames=len(edit), height=edit.shape[1], width=edit.shape[2])
        try:
            row.update(eval_clip(source, edit, target, instruction=item.instruction, clip=scorer,
                                 source_caption=item.source_caption, edited_caption=item.edited_caption))
        except ValueError as err:  # e.g. frames too small for SSIM
            row["error"] = str(err)
            continue
        if judge_fn is not None:
            try:
                row["judge_score"] = _judge(judge_fn, source, edit, item.instruction)
            except Exception as err:  # noqa: BLE001 - a failing judge (JudgeError, a user function's) fails one score
                row["error"] = f"judge failed ({err})"
    summary = summarize(rows, clip=clip, judge=judge)
    write(rows, summary, out)
    return summary


def summarize(rows: list[dict], clip: str | None = None, judge: str = "") -> dict:
    measured = [r for r in rows if "psnr_source" in r]
    counts = {name: sum(1 for r in measured if isinstance(r.get(name), float) and not math.isnan(r[name]))
              for name in METRICS}
    return {"clips": len(rows), "measured": len(measured), "failed": [r["name"] for r in rows if r.get("error")],
            "metrics": mean_metrics(measured), "counts": {k: v for k, v in counts.items() if v},
            "clip_model": clip or None, "judge": judge or None}


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def markdown(summary: dict) -> str:
    lines = ["| metric | mean | clips | what it measures |", "|---|---|---|---|"]
    for name, value in summary["metrics"].items():
        lines.append(f"| {name} | {_cell(value)} | {summary['counts'].get(name, 0)} | {DESCRIPTIONS[name]} |")
    failed = summary["failed"]
    tail = f"{summary['measured']} of {summary['clips']} clips measured" + \
        (f"; not measured or partly: {', '.join(failed[:10])}{' ...' if len(failed) > 10 else ''}" if failed else "")
    return "\n".join(["# insvie-jax eval", "", *lines, "", tail, ""])


def write(rows: list[dict], summary: dict, out: str | Path) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = [*ITEM_COLUMNS[:5], *(m for m in METRICS if any(m in r for r in rows)), *ITEM_COLUMNS[5:]]
    with open(out / "per_clip.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in row.items()} for row in rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    return out


SAMPLES_EVAL = "eval.json"
PANEL_PARTS = 3  # validation's sample videos are source | edit | target side by side


def eval_run_samples(run_dir: str | Path) -> dict | None:
    """The mean metrics of a training run's last validation edits (RUN/samples/<step>/NN.mp4, each source | edit
    | target), cached in that folder's eval.json; None when the run wrote no sample videos."""
    from insvie_jax.data.video import probe, read_frames

    samples = Path(run_dir) / "samples"
    steps = sorted((int(p.name), p) for p in samples.iterdir() if p.name.isdigit()) if samples.is_dir() else []
    videos = sorted(steps[-1][1].glob("[0-9]*.mp4")) if steps else []
    if not videos:
        return None
    cached = steps[-1][1] / SAMPLES_EVAL
    if cached.is_file() and cached.stat().st_mtime >= max(v.stat().st_mtime for v in videos):
        return json.loads(cached.read_text())
    parts = []
    for video in videos:
        panel = read_frames(video, np.arange(probe(video).num_frames))
        parts.append(np.split(panel, PANEL_PARTS, axis=2))
    source, edit, target = (np.stack(p) for p in zip(*parts))
    result = {"step": steps[-1][0], **eval_clips(source, edit, target)}
    cached.write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(lists: list[str], edits: str | None, out: str, video_roots: list[str], clip: str | None, judge: str,
         max_frames: int, quiet: bool = False) -> int:
    """`insvie-jax eval`: 0 when every clip was measured, 1 when some could not be (named in the summary)."""
    items = [i for path in lists for i in read_csv(path, video_roots, edits)] if lists else read_edit_folder(edits)
    summary = evaluate(items, out, clip=clip, judge=judge, max_frames=max_frames, show_progress=not quiet)
    print(markdown(summary))
    print(f"per-clip: {Path(out) / 'per_clip.csv'}; summary: {Path(out) / 'summary.json'}", file=sys.stderr)
    return 1 if summary["failed"] else 0
