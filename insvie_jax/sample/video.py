"""Video files in and out with PyAV: source clips as InsViE reads them, edits as mp4 and a PNG contact sheet.

Reading follows InsViE's `sample_video_edit.py`: every frame at the native rate (no resampling), the largest
4k+1 of them that the model takes, a bicubic resize that covers the target size with the aspect kept, a centre
crop, and (x − 127.5) / 127.5.
"""

from __future__ import annotations

import dataclasses
import os
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from insvie_jax import storage
from insvie_jax.data.video import X264_DETERMINISTIC


class VideoError(ValueError):
    """A video that cannot be used; the message names the file and what to do."""


@dataclasses.dataclass
class SourceClip:
    frames: np.ndarray  # (F, H, W, 3) float32 in [-1, 1]
    fps: Fraction | None  # the file's frame rate, when it states one
    decoded: int  # frames read from the file (at most `max_frames`)


def usable_frames(available: int, max_frames: int, temporal_compression: int = 4) -> int:
    """The largest k·tc + 1 ≤ min(available, max_frames), or 0 when there is none."""
    limit = min(available, max_frames)
    return 0 if limit < 1 else (limit - 1) // temporal_compression * temporal_compression + 1


def cover_size(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """(h, w) of the aspect-preserving resize whose centre crop is target_h × target_w (sizes truncated to int)."""
    if width / height > target_w / target_h:
        return target_h, max(target_w, int(width * target_h / height))
    return max(target_h, int(height * target_w / width)), target_w


def resize_crop(frame: np.ndarray, target_h: int, target_w: int) -> np.ndarray:
    """uint8 (h, w, 3) -> uint8 (target_h, target_w, 3): bicubic cover resize, then centre crop."""
    h, w = cover_size(frame.shape[0], frame.shape[1], target_h, target_w)
    if (h, w) != frame.shape[:2]:
        frame = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC))
    top, left = (h - target_h) // 2, (w - target_w) // 2
    return frame[top:top + target_h, left:left + target_w]


def _open(path):
    path = storage.path(path)
    try:
        if not storage.is_url(path):
            os.stat(path)  # epath's is_file() answers False where the name itself is impossible
    except FileNotFoundError:
        pass
    except OSError as err:  # e.g. a name longer than the filesystem allows
        raise VideoError(f"cannot open video {path}: {err.strerror}; check the path (--video, or the CSV's rows)") \
            from None
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}: check the path (--video, or the CSV's --test-folder)")
    try:
        return av.open(storage.readable(path))
    except av.error.FFmpegError as err:
        raise VideoError(f"cannot read video {path}: {err.strerror or err}; is it a complete, valid video file?") \
            from None


def read_clip(path, height: int, width: int, max_frames: int, temporal_compression: int = 4) -> SourceClip:
    """The source clip as the model takes it: (F, height, width, 3) in [-1, 1], F = 4k+1 ≤ max_frames."""
    path = storage.path(path)
    frames = []
    with _open(path) as container:
        if not container.streams.video:
            raise VideoError(f"{path} has no video stream (audio only?): pass a video file")
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate
        try:
            for frame in container.decode(stream):
                frames.append(resize_crop(frame.to_ndarray(format="rgb24"), height, width))
                if len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as err:
            if not frames:
                raise VideoError(f"cannot decode video {path}: {err.strerror or err}; is the file complete?") from None
            # a damaged tail: keep the frames decoded before it
    count = usable_frames(len(frames), max_frames, temporal_compression)
    if count == 0:
        raise VideoError(f"{path} has no decodable frames: the edit needs at least 1 frame (4k+1 frames, up to "
                         f"{max_frames})")
    clip = np.stack(frames[:count]).astype(np.float32)
    return SourceClip((clip - 127.5) / 127.5, Fraction(fps) if fps else None, len(frames))


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 as InsViE writes them: clamp((x + 1) / 2), then 255·x truncated."""
    return (255.0 * np.clip((np.asarray(video, np.float32) + 1) / 2, 0, 1)).astype(np.uint8)


def _codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (av.error.FFmpegError, ValueError):  # an ffmpeg build without x264
        return "mpeg4"


def write_mp4(path, frames: np.ndarray, fps: int | Fraction):
    """uint8 (F, H, W, 3) -> an H.264 mp4 (MPEG-4 part 2 when PyAV's ffmpeg has no libx264); returns the path."""
    path = storage.path(path)
    codec = _codec()
    with storage.local_file(path) as local, av.open(local, "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "17", "threads": "1", "x264-params": X264_DETERMINISTIC}
            stream.codec_context.thread_count = 1
        else:
            stream.bit_rate = 8_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return path


def side_by_side(source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) + (F, H, W, 3) -> (F, H, 2W, 3): source left, edit right."""
    return np.concatenate([source, edited], axis=2)


def contact_sheet(path, source: np.ndarray, edited: np.ndarray, columns: int = 4):
    """A PNG of `columns` evenly spaced frames: the source in the top row, the edit below."""
    picks = np.unique(np.linspace(0, len(edited) - 1, min(columns, len(edited))).round().astype(int))
    rows = [np.concatenate(list(video[picks]), axis=1) for video in (source, edited)]
    with storage.local_file(path) as local:
        Image.fromarray(np.concatenate(rows, axis=0)).save(local)
    return storage.path(path)
