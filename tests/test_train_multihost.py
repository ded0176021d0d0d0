"""Two local processes with 4 CPU devices each (launch/local.sh, gloo collectives) train like one process
with 8 devices: the same per-step losses to LOSS_TOL, and only process 0 writes the run files."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from insvie_jax import config as configlib
from insvie_jax.train import loop

LOSS_TOL = 1e-5  # the gradient all-reduce runs over gloo in another order than within one process
ROOT = Path(__file__).resolve().parent.parent
ARGS = ["train.steps=3", "train.log_every=1", "data.batch_size=8", "data.num_frames=5", "data.height=32",
        "data.width=48", "checkpoint.every=1000"]


def _losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines)]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT))
    multi = tmp_path / "multi"
    out = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), "2", "tiny", f"train.run_dir={multi}",
                          "mesh.ici_data=4", "mesh.dcn_data=2", *ARGS],
                         env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count('"steps": 3') == 2  # both processes ran every step

    single = tmp_path / "single"
    loop.run(configlib.load("tiny", [f"train.run_dir={single}", "mesh.ici_data=8", *ARGS]))  # this process: 8 devices

    want = _losses(single)
    got = _losses(multi)  # written by process 0 alone: one record per step, not two
    assert len(got) == len(want) == 3
    np.testing.assert_allclose(got, want, rtol=0, atol=LOSS_TOL)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["3"]
