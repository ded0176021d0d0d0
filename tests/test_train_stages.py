"""The tiny curriculum (configs/tiny-curriculum.yaml: images with LoRA -> videos with the same adapters and the
optimizer state kept -> a full fine-tune at a higher resolution) runs its three stages on one checkpoint series,
its videos stage on generated ArrayRecord shards (a weighted mixture of two folders). Its checkpoints show the
carry-over: keep_optimizer continues Adam's count with the schedule restarted; LoRA -> full merges the adapters
(hq's weights sit next to merge_lora of the videos stage's model). A run SIGKILLed just after the images ->
videos boundary checkpoint and again inside the videos stage, restarted each time, gives the same per-step losses
as the uninterrupted run, bit for bit (CPU). Bad stages are ConfigErrors that name the stage and the key."""

import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from _runs import checkpoints, records, run_and_kill_when
from flax import nnx

from insvie_jax import config as configlib
from insvie_jax.data import records as recordlib
from insvie_jax.models import lora as loralib
from insvie_jax.train import state as statelib

CONFIG = "tiny-curriculum"
STAGES = {"images": range(0, 12), "videos": range(12, 24), "hq": range(24, 36)}
NUM_FRAMES = {"images": 1, "videos": 5, "hq": 9}
# Four Adam updates at hq's lr (0, 1.5e-4, 3e-4, 3e-4 with warmup: 7.5e-4 in all) move no weight further than this.
HQ_MOVE_BOUND = 1e-3


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two folders of random latent records in the videos stage's shape (5 frames at 32x48 -> 2x4x6 latents)."""
    root = tmp_path_factory.mktemp("shards")
    recordlib.write_synthetic(root / "a", {(2, 4, 6): 12}, (8, 32), shard_size=4, prefix="a/")
    recordlib.write_synthetic(root / "b", {(2, 4, 6): 6}, (8, 32), shard_size=4, seed=1, prefix="b/")
    return root


def _command(run_dir, shards):
    return [sys.executable, "-m", "insvie_jax.cli", "train", CONFIG, f"train.run_dir={run_dir}", "checkpoint.keep=20",
            "stages.videos.data.source=arrayrecord", f"stages.videos.data.paths=[{shards}/a, {shards}/b]",
            "stages.videos.data.weights=[3, 1]"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, shards):
    """An uninterrupted run: (run folder, summary)."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_command(run_dir, shards), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return run_dir, json.loads(done.stdout[done.stdout.index("{"):])


def test_curriculum_runs_its_stages_on_one_checkpoint_series(reference):
    run_dir, summary = reference
    losses = [r for r in records(run_dir) if "loss" in r]
    assert [r["step"] for r in losses] == list(range(36))
    for name, steps in STAGES.items():
        assert {r["stage"] for r in losses if r["step"] in steps} == {name}
        assert losses[steps[0]]["lr"] == 0.0 < losses[steps[1]]["lr"]  # each stage's own warmup from 0
    assert losses[30]["lr"] == pytest.approx(3e-4)  # hq: constant schedule at its own lr
    assert [(s["name"], s["start_step"], s["steps"]) for s in summary["stages"]] == \
        [("images", 0, 12), ("videos", 12, 12), ("hq", 24, 12)]

    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    assert checkpoints(run_dir) == list(range(4, 37, 4))
    for step in checkpoints(run_dir):
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        name = next(n for n, steps in STAGES.items() if steps.start < step <= steps.stop)
        assert (meta["step"], meta["stage"], meta["data_position"]) == (step, name, step - STAGES[name].start)
        assert meta["config"]["data"]["num_frames"] == NUM_FRAMES[name]
        assert meta["config"]["lora"]["enabled"] == (name != "hq")
        assert meta["config"]["train"]["steps"] == 12
    state = {step: manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
             for step in (16, 24, 28)}
    videos_frozen = manager.restore(24, args=ocp.args.Composite(frozen=ocp.args.StandardRestore()))["frozen"]
    manager.close()
    # images -> videos (same adapters, keep_optimizer): Adam's moments and count go on, the LR schedule restarts.
    assert _counts(state[16]["opt_state"]) == (16, 4)
    # videos -> hq (LoRA -> full fine-tune): the adapters are merged into the weights, the optimizer starts afresh.
    assert _counts(state[28]["opt_state"]) == (4, 4)
    videos_end, hq_4 = state[24], state[28]
    assert "qkv_lora" in videos_end["params"]["blocks"]["attn"] and "ema" not in videos_end
    assert "qkv_lora" not in hq_4["params"]["blocks"]["attn"] and "ema" in hq_4
    videos = configlib.resolve_stages(configlib.load(CONFIG))[1].config
    graphdef = statelib.split_model(nnx.eval_shape(lambda: statelib.trained_model(videos)), videos)[0]
    model = nnx.merge(graphdef, videos_end["params"], videos_frozen)
    merged = nnx.state(loralib.merge_lora(model), nnx.Param).to_pure_dict()
    hq_moved = _max_difference(hq_4["params"], merged)  # four hq updates since the merge
    assert hq_moved < HQ_MOVE_BOUND, hq_moved
    attn, base = merged["blocks"]["attn"], videos_frozen["blocks"]["attn"]
    lora_delta = _max_difference([attn["qkv"]["kernel"], attn["out"]["kernel"]],
                                 [base["qkv"]["kernel"], base["out"]["kernel"]])
    assert lora_delta > 5 * HQ_MOVE_BOUND, lora_delta  # so the merge, not chance, explains the closeness


def _counts(opt_state) -> tuple[int, int]:
    """(Adam's update count, the learning-rate schedule's count) of a restored optax state."""
    nodes = [n for n in jax.tree.leaves(opt_state, is_leaf=lambda n: isinstance(n, dict) and "count" in n)
             if isinstance(n, dict)]
    return (next(int(n["count"]) for n in nodes if "mu" in n), next(int(n["count"]) for n in nodes if "mu" not in n))


def _max_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def _start_and_kill_when(run_dir, env, shards, ready):
    """Starts the run and SIGKILLs it as soon as `ready(checkpoints, records)`; returns the run's stderr."""
    return run_and_kill_when(_command(run_dir, shards), env, lambda: ready(checkpoints(run_dir), records(run_dir)))


def test_killed_at_a_stage_boundary_and_inside_a_stage_resumes_bit_for_bit(tmp_path, env, shards, reference):
    expected = {r["step"]: r["loss"] for r in records(reference[0]) if "loss" in r}
    run_dir = tmp_path / "killed"
    # 1. Killed once the images stage's last checkpoint (12) is written: the restart begins the videos stage.
    _start_and_kill_when(run_dir, env, shards, lambda saved, _: 12 in saved)
    assert checkpoints(run_dir)[-1] == 12
    # 2. Killed inside the videos stage (ArrayRecord data), a few steps after its checkpoint 16.
    resumed = _start_and_kill_when(
        run_dir, env, shards, lambda saved, recs: 16 in saved and any(r.get("step", 0) >= 18 for r in recs))
    assert "from checkpoint 12 (stage 'images', step 12 of 12)" in resumed, resumed
    inside = checkpoints(run_dir)[-1]
    assert inside in (16, 20), inside
    final = subprocess.run(_command(run_dir, shards), env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert final.returncode == 0, final.stderr
    assert f"from checkpoint {inside} (stage 'videos', step {inside - 12} of 12)" in final.stderr, final.stderr

    seen: dict[int, list[float]] = {}
    for r in records(run_dir):
        if "loss" in r:
            seen.setdefault(r["step"], []).append(r["loss"])
    assert sorted(seen) == list(range(36))
    assert any(len(seen[s]) > 1 for s in range(inside, 24)), seen  # steps after the inside checkpoint ran twice
    mismatched = {s: (v, expected[s]) for s, v in seen.items() if any(x != expected[s] for x in v)}
    assert not mismatched, f"losses differ from the uninterrupted run at {mismatched}"


@pytest.mark.parametrize("override, message", [
    ("stages.videos.data.num_frame=5", "stage 'videos' (stages[1]): unknown config key 'data.num_frame'; did you "
                                       "mean 'data.num_frames'?"),
    ("stages.hq.model.num_layers=3", "stage 'hq' (stages[2]): 'model.num_layers' cannot change between stages"),
    ("stages.hq.train.steps=3", "stage 'hq' (stages[2]): 'train.steps' cannot be set per stage"),
    ("stages.video.steps=3", "no stage 'video' (stages: images, videos, hq); did you mean 'stages.videos'?"),
    ("stages.hq.keep_optimizer=true", "stage 'hq' (stages[2]): keep_optimizer=true, but what trains changes"),
    ("stages.videos.data.num_frames=4", "stage 'videos' (stages[1]): data.num_frames=4 must be 4k+1"),
])
def test_bad_stages_are_config_errors_naming_the_stage_and_key(override, message):
    with pytest.raises(configlib.ConfigError) as err:
        configlib.load(CONFIG, [override])
    assert message in str(err.value)


def test_bad_stage_entry_in_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f"base: {configlib.CONFIG_DIR / 'tiny.yaml'}\nstages:\n  - name: a\n    step: 3\n")
    with pytest.raises(configlib.ConfigError, match=r"stages\[0\]: unknown stage key 'step'; did you mean 'steps'"):
        configlib.load(path)


@pytest.mark.parametrize("name", ["insvie-2b-curriculum", "insvie-5b-curriculum"])
def test_shipped_insvie_curricula_resolve(name):
    stages = configlib.resolve_stages(configlib.load(name))
    assert [(s.name, s.config.data.num_frames) for s in stages] == [("images", 1), ("videos", 49), ("hq", 49)]
    assert [s.start for s in stages] == [0, stages[0].steps, stages[0].steps + stages[1].steps]
    assert all(s.config.lora.enabled and s.config.lora.rank == 128 for s in stages)
    assert stages[1].config.data.weights == [0.9, 0.1] and len(stages[1].config.data.paths) == 2
