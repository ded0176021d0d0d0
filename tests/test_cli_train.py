"""`insvie-jax train` runs the tiny config end to end on synthetic data and the loss falls."""

import json
import subprocess
import sys

import yaml


def test_train_tiny_loss_falls_and_run_folder_is_written(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "insvie_jax.cli", "train", "tiny", f"train.run_dir={run_dir}", "train.steps=120",
         "train.log_every=10"],
        capture_output=True, text=True, check=True, timeout=300,
    )
    summary = json.loads(out.stdout[out.stdout.index("{"):])
    assert summary["steps"] == 120
    assert summary["last_loss"] < 0.75 * summary["first_loss"], summary
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["train"]["steps"] == 120 and resolved["model"]["name"] == "tiny"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["step"] == 0 and records[-1]["step"] == 119
    assert all({"loss", "grad_norm", "step_s"} <= set(r) for r in records)


def test_bad_override_is_a_clear_error_not_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "train", "model.num_layer=3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "did you mean 'model.num_layers'" in out.stderr and "Traceback" not in out.stderr


def test_config_path_with_an_equals_sign_is_a_path_not_an_override(tmp_path):
    folder = tmp_path / "lora.rank=4"  # how sweep runs name their folders
    folder.mkdir()
    (folder / "config.yaml").write_text("base: tiny\ntrain:\n  steps: 7\n")
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "config", str(folder / "config.yaml"), "train.lr=0.5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["steps"] == 7 and resolved["train"]["lr"] == 0.5 and resolved["model"]["name"] == "tiny"
