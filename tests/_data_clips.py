"""Tiny clips and triplet lists for the data tests, written with PyAV (shared by tests/test_data_*.py)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from insvie_jax.data import synthetic_videos
from insvie_jax.data.video import write_image, write_video


def moving_texture(num_frames: int, height: int, width: int, seed: int = 0, speed: int = 1) -> np.ndarray:
    """uint8 (F, H, W, 3): a sharp random block texture sliding right by `speed` pixels per frame."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 4 + 1, (width + num_frames * speed) // 4 + 2, 3), dtype=np.uint8)
    texture = blocks.repeat(4, axis=0).repeat(4, axis=1)[:height]
    return np.stack([texture[:, t * speed:t * speed + width] for t in range(num_frames)])


def edited(frames: np.ndarray) -> np.ndarray:
    """The "edit": the left third of every frame recoloured, the rest kept."""
    out = frames.copy()
    third = frames.shape[2] // 3
    out[:, :, :third] = 255 - out[:, :, :third]
    return out


def write_pair(root: Path, name: str, num_frames: int = 9, height: int = 32, width: int = 48, fps: float = 8,
               seed: int = 0, edit_frames: int | None = None, roots=("source", "edit")) -> np.ndarray:
    """Writes root/source/name and root/edit/name; returns the source frames."""
    frames = moving_texture(num_frames, height, width, seed)
    (root / roots[0]).mkdir(parents=True, exist_ok=True)
    (root / roots[1]).mkdir(parents=True, exist_ok=True)
    write_video(root / roots[0] / name, frames, fps)
    target = edited(frames if edit_frames is None else moving_texture(edit_frames, height, width, seed))
    write_video(root / roots[1] / name, target, fps)
    return frames


def write_insvie_csv(path: Path, names: list[str], instructions: list[str] | None = None) -> None:
    rows = [[name, "a clip", instructions[i] if instructions else f"make it blue {i}", "a blue clip", "edit"]
            for i, name in enumerate(names)]
    synthetic_videos.write_insvie_csv(path, rows)


def write_image_pair(root: Path, name: str, height: int = 32, width: int = 48, seed: int = 0) -> None:
    image = moving_texture(1, height, width, seed)[0]
    root.mkdir(parents=True, exist_ok=True)
    write_image(root / f"{name}_src.png", image)
    write_image(root / f"{name}_edit.png", edited(image[None])[0])


def write_audio_only(path: Path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 16000), np.float32)
        frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
        frame.sample_rate = 16000
        frame.time_base = Fraction(1, 16000)
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def judge_by_instruction(source_frames, edited_frames, instruction):
    """A Python judge for `filter.judge=_data_clips:judge_by_instruction`: likes instructions saying "good"."""
    assert source_frames.ndim == 4 and source_frames.shape == edited_frames.shape
    return 0.9 if "good" in instruction else 0.1
