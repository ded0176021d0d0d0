"""The default run's pieces that make its edits visible and repeatable: the shipped tiny VAE reconstructs fresh
moving-shape scenes, two fresh runs of one config are bit-identical (clips, shards, losses), validation writes a
contact sheet, and `insvie-jax edit --checkpoint RUN` edits with the run as its summary prints it, conditioned
on exactly the text embeddings the run was trained on."""

import json
import shlex
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from insvie_jax import config as configlib
from insvie_jax.convert import models as modelslib
from insvie_jax.data import records
from insvie_jax.data import synthetic_videos as sv
from insvie_jax.sample import edit as editlib
from insvie_jax.sample.edit import output_name
from insvie_jax.train.export import find_run_checkpoint

ROOT = Path(__file__).resolve().parent.parent
SHORT = ["data.generate=4", "data.generate_val=2", "data.batch_size=2", "train.num_val_clips=2", "train.steps=3",
         "train.sample_every=3", "checkpoint.every=3", "train.val_sample_steps=2", "train.ema_decay=0.9",
         "train.log_every=1"]
MIN_PSNR_DB = 25.0


def _cli(args, env, timeout=600):
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", *args], capture_output=True, text=True, env=env,
                         timeout=timeout, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, env):
    """Two fresh runs of the same short config (each generates, encodes, trains, validates); their summaries.
    Run a chains data preparation into `train`; run b prepares it with `prepare` and trains the config it wrote."""
    base = tmp_path_factory.mktemp("runs")
    out = _cli(["train", f"train.run_dir={base / 'a'}", *SHORT], env)
    assert "preparing data first" in out.stderr and "then training" in out.stderr
    summaries = [json.loads(out.stdout[out.stdout.index("{\n"):])]
    prepared = _cli(["prepare", f"train.run_dir={base / 'b'}", *SHORT], env).stdout.strip()
    assert prepared == str(base / "b" / "config.yaml")
    assert configlib.load(prepared).data.paths == [str(base / "b" / "data")]
    out = _cli(["train", prepared], env)
    summaries.append(json.loads(out.stdout[out.stdout.index("{\n"):]))
    return base / "a", base / "b", summaries


def test_training_generated_data_that_is_not_prepared_names_the_command(tmp_path):
    from insvie_jax.data.prepare import DataNotPrepared
    from insvie_jax.train import loop

    cfg = configlib.load("tiny-shapes", [f"train.run_dir={tmp_path}", *SHORT])
    with pytest.raises(DataNotPrepared, match=r"data.generate=4: .*data.paths is empty.*insvie-jax prepare"):
        loop.run(cfg)
    cfg = configlib.load("tiny-shapes", [f"train.run_dir={tmp_path}", f"data.paths=[{tmp_path / 'none'}]", *SHORT])
    with pytest.raises(DataNotPrepared, match=r"no encoded shards in .*none, .*none/val"):
        loop.run(cfg)


def test_shipped_tiny_vae_reconstructs_fresh_scenes():
    cfg = configlib.load("tiny-shapes")
    vae, factor = modelslib.load_vae_of(cfg)
    config = json.loads((modelslib.SHIPPED_WEIGHTS / "tiny-shapes-vae" / "config.json").read_text())
    assert factor == config["scaling_factor"] == cfg.vae.scaling_factor  # encode, validation and edit agree
    d = cfg.data
    video = np.stack([clip for i in range(4) for clip in sv.triplet(4242, i, d.num_frames, d.height, d.width)[:2]])
    video = video.astype(np.float32) / 127.5 - 1
    decoded = np.clip(np.asarray(vae.decode(vae.encode(jnp.asarray(video)).mean)), -1, 1)
    psnr = 10 * np.log10(4 / np.mean((decoded - video) ** 2))
    assert psnr >= MIN_PSNR_DB, psnr


def test_fresh_runs_of_one_config_are_bit_identical(runs):
    run_a, run_b, _ = runs
    files = sorted(p.relative_to(run_a) for p in (run_a / "data").rglob("*")
                   if p.is_file() and p.suffix in (".mp4", ".csv", ".array_record"))
    assert len([f for f in files if f.suffix == ".mp4"]) == 2 * (4 + 2)
    for name in files:
        assert (run_a / name).read_bytes() == (run_b / name).read_bytes(), name

    def losses(run):
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["loss"], r["grad_norm"]) for r in lines if "loss" in r]

    assert len(losses(run_a)) == 3 and losses(run_a) == losses(run_b)


def test_validation_writes_a_contact_sheet_and_the_summary_says_where(runs):
    run_a, _, (summary, _) = runs
    samples = Path(summary["samples"])
    assert samples == run_a / "samples" / "3" and len(list(samples.glob("*.mp4"))) == 2
    sheet = np.asarray(Image.open(samples / "contact_sheet.png"))
    cfg = configlib.load(run_a / "config.yaml")
    # Per clip: a title line, source / edit / target rows of 5 frames enlarged 2x, a gap.
    assert sheet.shape[1] == 2 * 5 * cfg.data.width and sheet.shape[0] > 2 * 3 * 2 * cfg.data.height
    assert summary["validation"]["val_clips"] == 2 and summary["edit_command"].startswith("insvie-jax edit ")


def test_edit_with_the_run_folder_as_the_summary_prints_it(runs, env, tmp_path):
    run_a, _, (summary, _) = runs
    command = shlex.split(summary["edit_command"])
    assert command[:4] == ["insvie-jax", "edit", "--checkpoint", str(run_a)] and "--ema" in command
    instruction = command[command.index("--instruction") + 1]
    video = Path(command[command.index("--video") + 1])
    out = tmp_path / "edits"
    command[command.index("--out") + 1] = str(out)
    printed = _cli([*command[1:], "--steps", "2"], env).stdout.split()
    edited = out / output_name(video, instruction) / "edit.mp4"
    assert printed == [str(edited)] and edited.stat().st_size > 0
    # A step folder names the same run and step; other folders are not runs.
    assert find_run_checkpoint(run_a / "checkpoints" / "3") == (run_a, 3) == find_run_checkpoint(run_a)
    assert find_run_checkpoint(run_a / "data") is None

    # Edit conditions on exactly what encode stored (and the model trained on) for this instruction.
    cfg = configlib.load(run_a / "config.yaml")
    models = modelslib.load_models(cfg, checkpoint=str(run_a))
    text, truncated = editlib.encode_instruction(models, instruction)
    val = sv.validation_folders(cfg)[0]
    manifest = records.read_manifest(val)
    (bucket,) = manifest["buckets"].values()
    stored = [records.unpack(raw) for raw in records.read_all(val / bucket["files"][0])]
    match = [r for r in stored if r["name"].endswith(video.name)]
    assert len(match) == 1 and match[0]["instruction"] == instruction and not truncated
    np.testing.assert_array_equal(np.asarray(text[0]), match[0]["text"].astype(np.float32))
