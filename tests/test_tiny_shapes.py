"""The default run's data: moving-shape triplets (edits touch only what the instruction names), their mp4/CSV
files, InsViE's pixel-noise source augmentation on the video path, per-process synthetic rows, and the default
recipe end to end (generate -> encode -> train on ArrayRecord shards -> validation metrics)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from insvie_jax import config as configlib
from insvie_jax.data import pipeline
from insvie_jax.data import synthetic_videos as sv
from insvie_jax.data.sources import BadSamples, read_list, try_load_clip
from insvie_jax.data.synthetic import SyntheticTriplets

F, H, W = 9, 64, 96
CODEC_TOL = 6.0  # mean |decoded - rendered| in 0..255 levels after H.264 (flat colours, sharp edges)
SMALL = ["data.num_frames=5", "data.height=32", "data.width=48"]


@pytest.mark.parametrize("instruction", sorted(sv.INSTRUCTIONS))
def test_edit_changes_only_what_the_instruction_names(instruction):
    for index in range(40):
        scene = sv.random_scene(np.random.default_rng([7, index]), H, W)
        if instruction in sv.applicable(scene):
            break
    source = sv.render(scene, F, H, W)
    edit = sv.render(scene, F, H, W, instruction)
    changed = np.any(source != edit, axis=-1)  # (F, H, W)
    target, _ = sv.INSTRUCTIONS[instruction]
    masks = {s.kind: sv.shape_mask(s, F, H, W) for s in scene.shapes}
    if target == "background":
        allowed = ~np.any(list(masks.values()), axis=0)
    else:
        allowed = masks[target]
    assert changed.any(), "the edit changed nothing"
    assert not (changed & ~allowed).any(), f"{instruction!r} changed pixels outside the {target}'s track"
    if target != "background":
        # The track really moves, and the unchanged region is most of the frame.
        assert not np.array_equal(masks[target][0], masks[target][-1]) and changed.mean() < 0.3


def test_triplets_are_deterministic_and_cover_the_instructions():
    a = [sv.triplet(3, i, F, H, W) for i in range(30)]
    b = [sv.triplet(3, i, F, H, W) for i in range(30)]
    assert all(np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) and x[2] == y[2] for x, y in zip(a, b))
    assert {t[2] for t in a} == set(sv.INSTRUCTIONS)
    assert {t[2] for t in (sv.triplet(3, i, F, H, W, ["remove the square"]) for i in range(5))} == {"remove the square"}


def test_written_clips_read_back_as_an_insvie_list(tmp_path):
    path = sv.write_triplets(tmp_path / "videos", 3, F, H, W, fps=7, seed=5)
    triplets = read_list(path, ["source", "edit"], BadSamples())
    assert [t.instruction for t in triplets] == [sv.triplet(5, i, F, H, W)[2] for i in range(3)]
    cfg = configlib.load("tiny", ["data.crop=center"])
    for i, t in enumerate(triplets):
        clip = try_load_clip(t, cfg.data, BadSamples())
        source, edit, _ = sv.triplet(5, i, F, H, W)
        assert clip.source.shape == source.shape
        assert np.abs(clip.source.astype(float) - source).mean() < CODEC_TOL
        assert np.abs(clip.target.astype(float) - edit).mean() < CODEC_TOL


def test_source_noise_sigma_follows_its_lognormal_and_is_seeded():
    frames = np.full((2, 4, 4, 3), 128, np.uint8)
    again = pipeline.source_noise(frames, 11, -3.0, 0.5)
    np.testing.assert_array_equal(pipeline.source_noise(frames, 11, -3.0, 0.5), again)
    assert not np.array_equal(pipeline.source_noise(frames, 12, -3.0, 0.5), again)
    big = np.full((1, 32, 32, 3), 128, np.uint8)
    log_sigmas = [np.log(np.std((pipeline.source_noise(big, s, -3.0, 0.5) - 128) / 127.5)) for s in range(300)]
    assert abs(np.mean(log_sigmas) + 3.0) < 0.1 and abs(np.std(log_sigmas) - 0.5) < 0.08


def test_video_path_noises_the_source_only_and_repeats_itself():
    cfg = configlib.load("tiny", [*SMALL, "data.source=video", "data.paths=[unused.csv]"])
    clips = [sv.triplet(1, i, 5, 32, 48) for i in range(2)]
    batch = {"source": np.stack([c[0] for c in clips]), "target": np.stack([c[1] for c in clips]),
             "instruction": [c[2] for c in clips], "noise_seed": np.array([4, 9])}
    encode = pipeline.EncodeBatch(cfg)  # what the data.source=video pipeline runs on each batch
    noisy, noisy_again = encode(batch), encode(batch)
    encode.noise = None  # data.source_noise=false
    clean = encode(batch)
    np.testing.assert_array_equal(noisy["source"], noisy_again["source"])  # a pure function of the seeds
    np.testing.assert_array_equal(noisy["target"], clean["target"])  # targets are encoded clean
    change = np.mean((noisy["source"] - clean["source"]) ** 2, axis=(1, 2, 3, 4)) / np.mean(clean["source"] ** 2)
    assert np.all((1e-6 < change) & (change < 0.5)), change  # pixel noise of std ~0.05 moves the latents a little


def test_each_process_draws_its_rows_of_the_same_global_batch():
    data = SyntheticTriplets(8, (2, 4, 6, 16), 8, 32, seed=3)
    whole = data.batch(5)
    parts = [data.rows(5, range(r, r + 2)) for r in range(0, 8, 2)]
    for key in whole:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


EDIT_GAIN = 0.7  # on fresh scenes, edit_mse must be below this fraction of source_mse


def test_default_recipe_generates_encodes_trains_and_edits_fresh_scenes_closer_than_the_source(tmp_path):
    """The default run, shortened (32 training clips, 300 steps, ~1 min): its validation edits of 32 held-out
    scenes end at least 30% closer to the targets than the unedited sources are."""
    run_dir = tmp_path / "run"
    args = ["train", f"train.run_dir={run_dir}", "data.generate=32", "train.steps=300", "train.sample_every=300",
            "checkpoint.every=300"]
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", *args], capture_output=True, text=True,
                         timeout=600, cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    data = run_dir / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    assert manifest["count"] == 32 and len(list((data / "videos" / "source").glob("*.mp4"))) == 32
    held_out = json.loads((data / "val" / "manifest.json").read_text())
    assert held_out["count"] == 32
    # The held-out scenes are drawn with their own generator seed: other scenes than the training ones.
    val_instructions = [row[2] for row in list(csv.reader(open(data / "val" / "videos" / "triplets.csv")))[1:]]
    assert val_instructions == [sv.triplet(sv.VAL_SEED_OFFSET, i, F, H, W)[2] for i in range(32)]
    assert val_instructions != [sv.triplet(0, i, F, H, W)[2] for i in range(32)]
    resolved = configlib.load(run_dir / "config.yaml")
    assert resolved.data.source == "arrayrecord" and resolved.data.paths == [str(data)]
    summary = json.loads(out.stdout[out.stdout.index("{\n"):])  # the summary ends stdout
    assert summary["steps"] == 300 and summary["last_loss"] < 0.5 * summary["first_loss"], summary
    val = summary["validation"]
    assert val["step"] == 300 and val["val_clips"] == 32
    assert val["edit_mse"] < EDIT_GAIN * val["source_mse"], val
    assert [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][-1] == val
    samples = run_dir / "samples" / "300"
    assert summary["samples"] == str(samples) and len(list(samples.glob("*.mp4"))) == 8
    assert (samples / "contact_sheet.png").stat().st_size > 0
    assert summary["edit_command"].startswith(f"insvie-jax edit --checkpoint {run_dir} ")
