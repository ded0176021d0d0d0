"""`insvie-jax edit` with a checkpoint trained at more frames than the config's model: every clip of a batch,
the first included, is cut to the checkpoint's frame limit (the first one was cut to the config's). A row naming
a file longer than the filesystem allows is skipped with one line; the other rows are edited."""

import dataclasses
import json
import subprocess
import sys

import av
import numpy as np

from insvie_jax import config as configlib
from insvie_jax.convert import api
from insvie_jax.models import transformer as tr
from insvie_jax.models.params import param_shapes

SIZE = ["data.height=32", "data.width=48", "sample.steps=2"]


def _clip(path, frames=17):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.height, stream.width, stream.pix_fmt = 32, 48, "yuv420p"
        for i in range(frames):
            frame = np.full((32, 48, 3), 80, np.uint8)
            frame[8:20, i:i + 12] = (240, 50, 30)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_every_clip_takes_the_checkpoints_frame_limit(tmp_path, env):
    model = dataclasses.replace(configlib.load("tiny").model, sample_frames=13)  # trained at 13 frames; tiny: 9
    rng = np.random.default_rng(0)
    flat = {k: 0.02 * rng.standard_normal(s).astype(np.float32) for k, s in param_shapes(tr.abstract(model)).items()}
    checkpoint = api.write_flat(flat, model, tmp_path / "ckpt")
    videos = tmp_path / "videos"
    videos.mkdir()
    _clip(videos / "a.mp4")
    _clip(videos / "b.mp4")
    long_name = "y" * 296 + ".mp4"
    (tmp_path / "batch.csv").write_text("video,caption,instruction\na.mp4,c,make it blue\n"
                                        f"{long_name},c,make it long\nb.mp4,c,make it red\n")
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "edit", "tiny", *SIZE, "--csv",
                          str(tmp_path / "batch.csv"), "--test-folder", "videos", "--checkpoint", str(checkpoint),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]  # 1: a row was skipped
    assert (f"insvie-jax: skipped: {videos / long_name}: file name too long; rename the file (the filesystem "
            "limits a name to 255 bytes)") in out.stderr.splitlines()
    frames = {name: json.loads((tmp_path / "out" / name / "meta.json").read_text())["frames"]
              for name in ("a-make_it_blue", "b-make_it_red")}
    assert frames == {"a-make_it_blue": 13, "b-make_it_red": 13}
