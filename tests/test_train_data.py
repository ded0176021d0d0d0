"""Training on real data: tiny mp4 triplets -> `insvie-jax encode` (the tiny config's random VAE and T5) ->
ArrayRecord shards -> `insvie-jax train data.source=arrayrecord`. The loss falls, and a run SIGKILLed after
a checkpoint and resumed (grain iterator state restored from the checkpoint) gives the same per-step
losses as an uninterrupted run, bit for bit (CPU). At the last step the run samples validation edits of
the eval split's first clips: edit_mse / source_mse in metrics.jsonl, decoded side-by-side mp4s, TensorBoard
frame strips."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from _data_clips import write_insvie_csv, write_pair
from _runs import run_and_kill_when

from insvie_jax import config as configlib
from insvie_jax.data.pipeline import make_pipeline

STEPS = 30
KILL_AFTER = 14  # steps done before the kill: a checkpoint at 10 exists, steps 10..14 run twice
CLIP = ["data.num_frames=9", "data.height=32", "data.width=48"]
VAL = [f"train.sample_every={STEPS}", "train.num_val_clips=2", "train.val_sample_steps=4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, env):
    """Eight clip pairs encoded with `insvie-jax encode`; the shard folder."""
    root = tmp_path_factory.mktemp("clips")
    names = [f"v{i}.mp4" for i in range(8)]
    for i, name in enumerate(names):
        write_pair(root, name, num_frames=9, height=32, width=48, seed=i)
    write_insvie_csv(root / "train.csv", names, [f"recolour the left side {i % 2}" for i in range(8)])
    out = root / "enc"
    done = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "encode", "tiny", *CLIP, "--list",
                           str(root / "train.csv"), "--out", str(out), "--quiet"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["buckets"] == {"3x4x6": 8}
    return out


def _overrides(shards):
    return [*CLIP, *VAL, "data.source=arrayrecord", f"data.paths=[{shards}]", "data.batch_size=2",
            f"train.steps={STEPS}", "train.warmup_steps=5", "train.log_every=1", "checkpoint.every=5",
            "checkpoint.keep=2"]


def _command(run_dir, shards):
    return [sys.executable, "-m", "insvie_jax.cli", "train", "tiny", f"train.run_dir={run_dir}", *_overrides(shards)]


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory, env, shards):
    """An uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_command(run_dir, shards), env=env, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    return run_dir


def _losses(run_dir) -> dict[int, list[float]]:
    path = Path(run_dir) / "metrics.jsonl"
    seen: dict[int, list[float]] = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        if line.endswith("}"):  # a killed writer may leave half a line
            record = json.loads(line)
            if "loss" in record:
                seen.setdefault(record["step"], []).append(record["loss"])
    return seen


def test_arrayrecord_training_learns_and_resumes_bit_for_bit(tmp_path, env, shards, reference_dir):
    reference = {step: values[0] for step, values in _losses(reference_dir).items()}
    assert sorted(reference) == list(range(STEPS))
    losses = np.array([reference[s] for s in range(STEPS)])
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.9 * losses[:10].mean(), losses
    assert (reference_dir / "checkpoints" / str(STEPS) / "data").is_dir()  # the iterator state is checkpointed

    run_dir = tmp_path / "killed"
    run_and_kill_when(_command(run_dir, shards), env, lambda: (
        max(_losses(run_dir), default=-1) >= KILL_AFTER and (run_dir / "checkpoints" / "10").is_dir()))
    resumed = subprocess.run(_command(run_dir, shards), env=env, capture_output=True, text=True, timeout=120,
                             check=False)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr

    seen = _losses(run_dir)
    assert sorted(seen) == list(range(STEPS))
    assert any(len(v) > 1 for v in seen.values())  # steps after the checkpoint ran again after the resume
    mismatched = {s: (v, reference[s]) for s, v in seen.items() if any(x != reference[s] for x in v)}
    assert not mismatched, f"losses differ from the uninterrupted run at {mismatched}"


def test_validation_edits_metrics_videos_and_tensorboard(reference_dir, shards):
    records = [json.loads(line) for line in (reference_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "edit_mse" in r]
    assert [(r["step"], r["val_clips"]) for r in val] == [(STEPS, 2)]
    # source_mse is that of the eval split's first two clips, as the pipeline yields them.
    first = next(iter(make_pipeline(configlib.load("tiny", _overrides(shards)), "eval", 0, 1)))
    want = float(np.mean((first["source"] - first["target"]) ** 2))
    assert abs(val[0]["source_mse"] - want) <= 1e-6 * want, (val[0], want)
    assert np.isfinite(val[0]["edit_mse"]) and val[0]["edit_mse"] > 0

    for index in range(2):
        with av.open(str(reference_dir / "samples" / str(STEPS) / f"{index:02d}.mp4")) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 9 and frames[0].shape == (32, 3 * 48, 3)  # source | edit | target
        assert np.std(np.stack(frames)) > 1  # decoded pictures, not a constant
    scores = json.loads((reference_dir / "samples" / str(STEPS) / "eval.json").read_text())  # `insvie-jax eval`
    assert scores["eval_clips"] == 2
    assert all(val[0][k] == scores[k] for k in ("psnr_source", "psnr_target", "warp_error"))
    events = b"".join(p.read_bytes() for p in (reference_dir / "tensorboard").iterdir())
    assert b"val/clip_00" in events and b"val/clip_01" in events and b"val/edit_mse" in events


def test_video_source_trains_and_resumes_from_its_checkpointed_iterator(tmp_path, env, shards):
    """data.source=video (decode + VAE/T5 in the pipeline): a finished run whose last checkpoint is deleted
    resumes from the one before and recomputes the same losses."""
    run_dir = tmp_path / "video"
    command = [sys.executable, "-m", "insvie_jax.cli", "train", "tiny", f"train.run_dir={run_dir}", *CLIP,
               "data.source=video", f"data.paths=[{shards.parent / 'train.csv'}]", "data.batch_size=2",
               "train.steps=6", "train.log_every=1", "checkpoint.every=3"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    first = {step: values[0] for step, values in _losses(run_dir).items()}
    assert sorted(first) == list(range(6)) and np.isfinite(list(first.values())).all()
    shutil.rmtree(run_dir / "checkpoints" / "6")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and "resuming" in done.stderr, done.stderr
    again = _losses(run_dir)
    assert {step: again[step][1] for step in (3, 4, 5)} == {step: first[step] for step in (3, 4, 5)}
