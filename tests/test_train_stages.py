"""The tiny curriculum (configs/tiny-curriculum.yaml: images with LoRA -> videos with the same adapters and the
optimizer state kept -> a full fine-tune at a higher resolution) runs its three stages on one checkpoint series,
its videos stage on generated ArrayRecord shards (a weighted mixture of two folders). A run SIGKILLed just after
the images -> videos boundary checkpoint and again inside the videos stage, restarted each time, gives the same
per-step losses as the uninterrupted run, bit for bit (CPU). Going from stage to stage keeps the weights: a LoRA
stage followed by a full fine-tune merges the adapters (the model's output is unchanged), and
keep_optimizer carries Adam's moments with the learning-rate schedule restarted. Bad stages are ConfigErrors
that name the stage and the key."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from insvie_jax import config as configlib
from insvie_jax.data import records
from insvie_jax.models import lora as loralib
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.train import stages as stageslib
from insvie_jax.train import step as steplib

CONFIG = "tiny-curriculum"
STAGES = {"images": range(0, 12), "videos": range(12, 24), "hq": range(24, 36)}
NUM_FRAMES = {"images": 1, "videos": 5, "hq": 9}
MERGE_TOL = 1e-6  # max |difference| of merged weights, carry-over (jit) vs merge_lora (eager), float32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two folders of random latent records in the videos stage's shape (5 frames at 32x48 -> 2x4x6 latents)."""
    root = tmp_path_factory.mktemp("shards")
    records.write_synthetic(root / "a", {(2, 4, 6): 12}, (8, 32), shard_size=4, prefix="a/")
    records.write_synthetic(root / "b", {(2, 4, 6): 6}, (8, 32), shard_size=4, seed=1, prefix="b/")
    return root


def _command(run_dir, shards):
    return [sys.executable, "-m", "insvie_jax.cli", "train", CONFIG, f"train.run_dir={run_dir}", "checkpoint.keep=20",
            "stages.videos.data.source=arrayrecord", f"stages.videos.data.paths=[{shards}/a, {shards}/b]",
            "stages.videos.data.weights=[3, 1]"]


def _records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("}")]  # a killed writer may leave half a line


def _checkpoints(run_dir):
    folder = Path(run_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


@pytest.fixture(scope="module")
def reference(tmp_path_factory, env, shards):
    """An uninterrupted run: (run folder, summary)."""
    run_dir = tmp_path_factory.mktemp("reference")
    done = subprocess.run(_command(run_dir, shards), env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return run_dir, json.loads(done.stdout[done.stdout.index("{"):])


def test_curriculum_runs_its_stages_on_one_checkpoint_series(reference):
    run_dir, summary = reference
    losses = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in losses] == list(range(36))
    for name, steps in STAGES.items():
        assert {r["stage"] for r in losses if r["step"] in steps} == {name}
        assert losses[steps[0]]["lr"] == 0.0 < losses[steps[1]]["lr"]  # each stage's own warmup from 0
    assert losses[30]["lr"] == pytest.approx(3e-4)  # hq: constant schedule at its own lr
    assert [(s["name"], s["start_step"], s["steps"]) for s in summary["stages"]] == \
        [("images", 0, 12), ("videos", 12, 12), ("hq", 24, 12)]

    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    assert _checkpoints(run_dir) == list(range(4, 37, 4))
    for step in _checkpoints(run_dir):
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        name = next(n for n, steps in STAGES.items() if steps.start < step <= steps.stop)
        assert (meta["step"], meta["stage"], meta["data_position"]) == (step, name, step - STAGES[name].start)
        assert meta["config"]["data"]["num_frames"] == NUM_FRAMES[name]
        assert meta["config"]["lora"]["enabled"] == (name != "hq")
        assert meta["config"]["train"]["steps"] == 12
    videos_end = manager.restore(24, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    hq_first = manager.restore(28, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    assert "qkv_lora" in videos_end["params"]["blocks"]["attn"] and "ema" not in videos_end
    assert "qkv_lora" not in hq_first["params"]["blocks"]["attn"] and "ema" in hq_first  # merged: a full model
    lora = videos_end["params"]["blocks"]["attn"]["qkv_lora"]
    assert np.abs(lora["lora_b"]).max() > 0  # the adapters trained, so the merge changed the weights
    manager.close()


def _start_and_kill_when(run_dir, env, shards, ready):
    """Starts the run and SIGKILLs it as soon as `ready(checkpoints, records)`; returns the run's stderr."""
    proc = subprocess.Popen(_command(run_dir, shards), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ready(_checkpoints(run_dir), _records(run_dir)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.002)
    proc.wait()
    stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed:\n{stderr}"
    return stderr


def test_killed_at_a_stage_boundary_and_inside_a_stage_resumes_bit_for_bit(tmp_path, env, shards, reference):
    expected = {r["step"]: r["loss"] for r in _records(reference[0]) if "loss" in r}
    run_dir = tmp_path / "killed"
    # 1. Killed once the images stage's last checkpoint (12) is written: the restart begins the videos stage.
    _start_and_kill_when(run_dir, env, shards, lambda saved, _: 12 in saved)
    assert _checkpoints(run_dir)[-1] == 12
    # 2. Killed inside the videos stage (ArrayRecord data), a few steps after its checkpoint 16.
    resumed = _start_and_kill_when(
        run_dir, env, shards, lambda saved, recs: 16 in saved and any(r.get("step", 0) >= 18 for r in recs))
    assert "from checkpoint 12 (stage 'images', step 12 of 12)" in resumed, resumed
    inside = _checkpoints(run_dir)[-1]
    assert inside in (16, 20), inside
    final = subprocess.run(_command(run_dir, shards), env=env, capture_output=True, text=True, timeout=300,
                           check=False)
    assert final.returncode == 0, final.stderr
    assert f"from checkpoint {inside} (stage 'videos', step {inside - 12} of 12)" in final.stderr, final.stderr

    seen: dict[int, list[float]] = {}
    for r in _records(run_dir):
        if "loss" in r:
            seen.setdefault(r["step"], []).append(r["loss"])
    assert sorted(seen) == list(range(36))
    assert any(len(seen[s]) > 1 for s in range(inside, 24)), seen  # steps after the inside checkpoint ran twice
    mismatched = {s: (v, expected[s]) for s, v in seen.items() if any(x != expected[s] for x in v)}
    assert not mismatched, f"losses differ from the uninterrupted run at {mismatched}"


def _perturbed(tree, seed):
    """`tree` with every float leaf moved by a random amount (so that adapters and moments are non-zero)."""
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                        if jax.numpy.issubdtype(x.dtype, jax.numpy.floating) else x
                                        for x, k in zip(leaves, keys)])


def _nodes(tree, cls):
    return [node for node in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, cls)) if isinstance(node, cls)]


def test_stage_carry_over_keeps_optimizer_or_merges_lora():
    cfg = configlib.load(CONFIG)
    images, videos, hq = configlib.resolve_stages(cfg)
    mesh = meshlib.create_mesh(cfg.mesh)

    # images -> videos: the same adapters train; keep_optimizer carries the moments, the schedule restarts.
    opt_images = steplib.make_optimizer(images.config)
    graphdef, state, frozen, _, _ = steplib.init_state(images.config, mesh, opt_images)
    state = {**state, "params": _perturbed(state["params"], 0), "opt_state": _perturbed(state["opt_state"], 1)}
    state["opt_state"] = jax.tree.map(lambda x: x + 5 if x.dtype == np.int32 else x, state["opt_state"])  # counts
    before = {**jax.tree.map(np.asarray, state), "frozen": jax.tree.map(np.asarray, frozen)}
    opt_videos = steplib.make_optimizer(videos.config)
    graphdef, state, frozen, _, _ = stageslib.carry_over(images, graphdef, state, frozen, videos, mesh, opt_videos)
    assert jax.tree.all(jax.tree.map(np.array_equal, before["params"], jax.tree.map(np.asarray, state["params"])))
    adam_before, adam = _nodes(before["opt_state"], optax.ScaleByAdamState), _nodes(state["opt_state"],
                                                                                    optax.ScaleByAdamState)
    assert adam and jax.tree.all(jax.tree.map(np.array_equal, adam_before, jax.tree.map(np.asarray, adam)))
    schedule = _nodes(state["opt_state"], optax.ScaleByScheduleState)
    assert schedule and all(int(s.count) == 0 for s in schedule)

    # videos -> hq: LoRA -> full fine-tune; every weight of hq starts as merge_lora made it of videos' model.
    videos_model = nnx.merge(graphdef, *jax.tree.map(jax.numpy.copy, (state["params"], frozen)))  # not donated
    merged = nnx.state(loralib.merge_lora(videos_model), nnx.Param).to_pure_dict()
    opt_hq = steplib.make_optimizer(hq.config)
    graphdef, state, frozen, _, _ = stageslib.carry_over(videos, graphdef, state, frozen, hq, mesh, opt_hq)
    assert not jax.tree.leaves(frozen) and "qkv_lora" not in state["params"]["blocks"]["attn"]
    assert jax.tree.structure(merged) == jax.tree.structure(state["params"])
    errors = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state["params"], merged)
    assert max(jax.tree.leaves(errors)) < MERGE_TOL, errors
    qkv = state["params"]["blocks"]["attn"]["qkv"]["kernel"]
    assert np.abs(np.asarray(qkv) - before["frozen"]["blocks"]["attn"]["qkv"]["kernel"]).max() > 1e-3  # merged in
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(state["opt_state"]))  # fresh optimizer state
    assert jax.tree.all(jax.tree.map(np.array_equal, state["ema"], state["params"]))  # the EMA starts at the weights


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
