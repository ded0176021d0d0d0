"""The sweep report carries `insvie-jax eval` columns of each run's last validation videos (source | edit |
target mp4s, as train/validate.py writes them); runs without videos leave them blank."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml

from insvie_jax import sweep as sweeplib
from insvie_jax.data import synthetic_videos
from insvie_jax.data import video as videolib
from insvie_jax.eval import eval_run_samples

SWEEP = {"name": "evals", "base": "tiny", "overrides": ["train.steps=2"], "grid": {"train.lr": [0.001, 0.002]}}


def _write_validation(run_dir, step, edit_is_target: bool):
    """Validation's layout: RUN/samples/<step>/NN.mp4 = source | edit | target, and its metrics.jsonl record."""
    folder = run_dir / "samples" / str(step)
    folder.mkdir(parents=True)
    for index in range(2):
        source, target, _ = synthetic_videos.triplet(0, index, 9, 32, 48)
        edit = target if edit_is_target else source
        videolib.write_video(folder / f"{index:02d}.mp4", np.concatenate([source, edit, target], axis=2), 8)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step - 1, "loss": 0.5, "step_s": 0.1}) + "\n")
        f.write(json.dumps({"step": step, "edit_mse": 0.1, "source_mse": 0.2}) + "\n")


def test_report_has_eval_columns_of_the_last_validation_videos(tmp_path):
    sweep_file = tmp_path / "evals.yaml"
    sweep_file.write_text(yaml.safe_dump(SWEEP))
    sweep = sweeplib.load(sweep_file, tmp_path / "sweeps")
    sweeplib.prepare(sweep)
    good, none = sweep.runs[0].folder, sweep.runs[1].folder
    _write_validation(good, 1, edit_is_target=False)  # an earlier validation: not the one reported
    _write_validation(good, 2, edit_is_target=True)
    (none / "metrics.jsonl").write_text(json.dumps({"step": 0, "loss": 0.7}) + "\n")
    sweeplib.report(sweep.folder)

    with open(sweep.folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-5:] == list(sweeplib.EVAL_COLUMNS)
    assert float(rows[0]["psnr_target"]) > 27 > float(rows[0]["psnr_source"])  # the edit is the target
    assert float(rows[0]["ssim_target"]) > float(rows[0]["ssim_source"])
    assert 0 <= float(rows[0]["warp_error"]) < 0.02
    assert all(rows[1][k] == "" for k in sweeplib.EVAL_COLUMNS)
    markdown = (sweep.folder / "results.md").read_text()
    assert "| psnr_source | ssim_source | psnr_target | ssim_target | warp_error |" in markdown
    assert "insvie-jax eval" in markdown

    cached = json.loads((good / "samples" / "2" / "eval.json").read_text())
    assert cached["step"] == 2 and cached["eval_clips"] == 2
    assert eval_run_samples(good) == cached
    assert eval_run_samples(none) is None
    assert float(rows[0]["psnr_target"]) == pytest.approx(float(f"{cached['psnr_target']:.6g}"))
