"""Reading a training run's folder while it runs, and killing the run at a chosen moment (the resume tests)."""

import json
import signal
import subprocess
import time
from pathlib import Path


def records(run_dir) -> list[dict]:
    """metrics.jsonl as dicts; a killed writer may leave half a line, which is skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]


def checkpoints(run_dir) -> list[int]:
    """The steps of the checkpoints in the run folder, ascending."""
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def run_and_kill_when(command: list[str], env: dict, ready, timeout: float = 120) -> str:
    """Starts `command` and SIGKILLs it as soon as `ready()` is true; returns its stderr. Fails if the run
    ended on its own first."""
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr}"
    return stderr
