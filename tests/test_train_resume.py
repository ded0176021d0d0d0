"""A run killed with SIGKILL at random steps and restarted each time gives the same per-step losses as an
uninterrupted run, bit for bit (CPU), and SIGTERM saves a checkpoint before the run stops."""

import random
import signal
import subprocess
import sys
import time

from _runs import checkpoints, records, run_and_kill_when

STEPS = 60
ARGS = ["train.log_every=1", f"train.steps={STEPS}", "checkpoint.every=4", "checkpoint.keep=2", "data.num_frames=5",
        "data.height=32", "data.width=48"]


def _command(run_dir):
    return [sys.executable, "-m", "insvie_jax.cli", "train", "tiny", f"train.run_dir={run_dir}", *ARGS]


def _start_and_kill_after(run_dir, env, step):
    """Starts the run and SIGKILLs it once metrics.jsonl shows `step` and a checkpoint from within the
    last 8 steps is complete (so each restart resumes); returns the run's stderr."""
    return run_and_kill_when(_command(run_dir), env, lambda: (
        any(r.get("step", -1) >= step and "loss" in r for r in records(run_dir))
        and any(s >= step - 8 for s in checkpoints(run_dir))))


def test_killed_thrice_and_resumed_gives_the_same_losses_bit_for_bit(tmp_path, env):
    reference_dir = tmp_path / "reference"
    subprocess.run(_command(reference_dir), env=env, check=True, capture_output=True, timeout=300)
    reference = {r["step"]: r["loss"] for r in records(reference_dir) if "loss" in r}
    assert sorted(reference) == list(range(STEPS))

    rng = random.Random()
    kill_steps = [rng.randint(6, 16), rng.randint(22, 34), rng.randint(40, 50)]
    run_dir = tmp_path / "killed"
    stderrs = [_start_and_kill_after(run_dir, env, step) for step in kill_steps]
    final = subprocess.run(_command(run_dir), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert final.returncode == 0, final.stderr
    assert all("resuming" in s for s in stderrs[1:] + [final.stderr]), (kill_steps, stderrs, final.stderr)

    seen: dict[int, list[float]] = {}
    for r in records(run_dir):
        if "loss" in r:
            seen.setdefault(r["step"], []).append(r["loss"])
    assert sorted(seen) == list(range(STEPS)), kill_steps
    # Steps after a checkpoint and before a kill ran twice: the rerun must also agree exactly.
    assert sum(len(v) > 1 for v in seen.values()) >= 3, (kill_steps, seen)
    mismatched = {s: (v, reference[s]) for s, v in seen.items() if any(x != reference[s] for x in v)}
    assert not mismatched, f"kill steps {kill_steps}: losses differ from the uninterrupted run at {mismatched}"


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, env):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_command(run_dir), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not any(r.get("step", -1) >= 5 for r in records(run_dir)):
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    stderr = proc.stderr.read()
    assert proc.returncode == 143, stderr
    assert "stopped by signal" in stderr
    last = max(r["step"] for r in records(run_dir) if "loss" in r)
    saved = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == last + 1 and last + 1 < STEPS, (saved, last)  # saved right after the last step, not later
