"""`insvie-jax edit` end to end on CPU with the tiny random models: video in (PyAV), edited mp4s out.

The source clip is 11 frames of 80x112 (not the tiny model's 64x96), so frame selection (the largest 4k+1
≤ 11 is 9) and the cover-resize + centre crop are exercised. The command runs as a subprocess twice (a
single video with no checkpoint; a 2-row CSV batch with a native checkpoint holding the same random
weights, whose first row must reproduce the first run exactly); seeds and errors are checked in process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from insvie_jax import cli
from insvie_jax import config as configlib
from insvie_jax.convert import save_transformer
from insvie_jax.convert.models import ModelMismatch
from insvie_jax.sample import edit as editlib
from insvie_jax.sample import video as videolib

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["sample.steps=3"]
SRC_FRAMES, SRC_H, SRC_W, SRC_FPS = 11, 80, 112, 10
FRAMES, H, W, FPS = 9, 64, 96, 7  # largest 4k+1 <= 11; tiny's data.height x data.width; sample.fps
INSTRUCTION = "make it snow on all the trees and hills"  # 9 word tokens with EOS: more than tiny's max_length=8


def make_clip(path: Path, frames: int = SRC_FRAMES, height: int = SRC_H, width: int = SRC_W) -> Path:
    """A square moving right and a bar moving down on a grey background."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=SRC_FPS)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for i in range(frames):
            frame = np.full((height, width, 3), 90, np.uint8)
            frame[20:44, 6 * i:6 * i + 24] = (250, 60, 20)
            frame[5 * i:5 * i + 8, :] = (20, 200, 90)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decode(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, "-m", "insvie_jax.cli", "edit", "tiny", *STEPS, *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return make_clip(tmp_path_factory.mktemp("videos") / "clip.mp4")


@pytest.fixture(scope="module")
def single_run(clip, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = run_cli("--video", str(clip), "--instruction", INSTRUCTION, "--seed", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out / f"clip-{INSTRUCTION.replace(' ', '_')}", proc


@pytest.fixture(scope="module")
def editor():
    return editlib.Editor(configlib.load("tiny", STEPS))


def test_cli_single_video(single_run):
    folder, proc = single_run
    assert proc.stdout.strip() == str(folder / "edit.mp4")
    assert "RANDOM transformer" in proc.stderr and "truncated" in proc.stderr  # warnings, not errors
    assert "sampling" in proc.stderr  # the progress bar

    edited, fps = decode(folder / "edit.mp4")
    assert edited.shape == (FRAMES, H, W, 3) and fps == FPS
    both, fps = decode(folder / "side_by_side.mp4")
    assert both.shape == (FRAMES, H, 2 * W, 3) and fps == FPS
    assert Image.open(folder / "contact_sheet.png").size == (4 * W, 2 * H)  # 4 frames; source row, edit row
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == {**meta, "seed": 5, "steps": 3, "text_scale": 7.5, "source_scale": 1.2, "frames": FRAMES,
                    "size": [H, W], "fps": FPS, "source_fps": SRC_FPS, "checkpoint": None,
                    "instruction": INSTRUCTION, "instruction_truncated": True}
    # The left half is the source as the model saw it: the 9 first frames, resized and cropped.
    source = videolib.to_uint8(videolib.read_clip(meta["video"], H, W, 49).frames[:FRAMES])
    assert np.abs(both[..., :W, :].astype(int) - source).mean() < 4  # lossy H.264


def test_same_seed_same_edit_other_seed_differs(editor, clip, tmp_path):
    first = editor.edit(clip, "snow", tmp_path / "a", seed=3, progress=False)
    again = editor.edit(clip, "snow", tmp_path / "b", seed=3, progress=False)
    other = editor.edit(clip, "snow", tmp_path / "c", seed=4, progress=False)
    assert first.frames.shape == (FRAMES, H, W, 3) and first.frames.dtype == np.uint8
    np.testing.assert_array_equal(first.frames, again.frames)
    assert np.abs(first.frames.astype(int) - other.frames).mean() > 1
    assert not first.meta["instruction_truncated"]  # "snow" + EOS fits 8 tokens


def test_cli_csv_batch_with_native_checkpoint(single_run, editor, clip, tmp_path):
    """Row 1 repeats the single run with a checkpoint of the same random weights: identical frames prove the
    checkpoint was read into the same model. Row 2 has two columns (instruction in column 1)."""
    if editor.models is None:
        editor.edit(clip, "snow", tmp_path / "warmup", progress=False)
    checkpoint = save_transformer(editor.models.transformer, editor.models.model_cfg, tmp_path / "ckpt")
    videos = tmp_path / "data" / "videos"
    videos.mkdir(parents=True)
    (videos / "clip.mp4").write_bytes(clip.read_bytes())
    make_clip(videos / "short.mp4", frames=6)  # 6 frames: 5 used
    csv_file = tmp_path / "data" / "edits.csv"
    csv_file.write_text(f'video,caption,instruction\nclip.mp4,a square,{INSTRUCTION}\nshort.mp4,"turn it / blue"\n')
    out = tmp_path / "out"
    proc = run_cli("--csv", str(csv_file), "--test-folder", "videos", "--checkpoint", str(checkpoint),
                   "--seed", "5", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "RANDOM transformer" not in proc.stderr

    first = out / f"clip-{INSTRUCTION.replace(' ', '_')}"
    np.testing.assert_array_equal(decode(first / "edit.mp4")[0], decode(single_run[0] / "edit.mp4")[0])
    assert json.loads((first / "meta.json").read_text())["checkpoint"] == str(checkpoint)
    short, fps = decode(out / "short-turn_it__blue" / "edit.mp4")
    assert short.shape == (5, H, W, 3) and fps == FPS


@pytest.mark.parametrize("case", ["missing", "random_bytes", "truncated", "audio_only"])
def test_unusable_video_is_a_one_line_error(case, clip, tmp_path, capsys):
    path = tmp_path / f"{case}.mp4"
    if case == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4000))
    elif case == "truncated":
        data = clip.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "audio_only":
        with av.open(str(path), "w") as container:
            stream = container.add_stream("aac", rate=16000)
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 16000
            container.mux(stream.encode(frame))
            container.mux(stream.encode())
    rc = cli.main(["edit", "tiny", "--video", str(path), "--instruction", "snow", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and str(path) in err, err
    assert {"missing": "video not found", "random_bytes": "cannot read video", "truncated": "cannot read video",
            "audio_only": "no video stream"}[case] in err
    assert not (tmp_path / "o").exists()


def test_usage_errors(clip, tmp_path, capsys):
    assert cli.main(["edit", "tiny", "--video", str(clip)]) == 2
    assert "--instruction" in capsys.readouterr().err
    assert cli.main(["edit", "tiny", "--csv", str(tmp_path / "none.csv")]) == 2
    assert "CSV not found" in capsys.readouterr().err


def test_text_width_mismatch_is_named(clip, tmp_path):
    cfg = configlib.load("tiny", [*STEPS, "text_encoder.d_model=48"])
    with pytest.raises(ModelMismatch, match="text_embed_dim=32"):
        editlib.edit(clip, "snow", tmp_path, cfg)


def test_frame_selection_and_cover_crop():
    assert [videolib.usable_frames(n, 49) for n in (0, 1, 4, 5, 11, 49, 60)] == [0, 1, 1, 5, 9, 49, 49]
    assert videolib.usable_frames(60, 9) == 9
    assert videolib.cover_size(80, 112, 64, 96) == (68, 96)  # width binds: 112 -> 96, 80 -> 68.57 -> 68
    assert videolib.cover_size(1080, 1920, 480, 720) == (480, 853)  # height binds
    frame = np.zeros((80, 112, 3), np.uint8)
    frame[:, 56:] = 255  # right half white: the crop keeps the vertical edge at the centre
    out = videolib.resize_crop(frame, 64, 96)
    assert out.shape == (64, 96, 3)
    assert out[:, :46].max() == 0 and out[:, 50:].min() == 255
