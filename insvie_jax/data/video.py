"""Data-side video and image I/O with PyAV: probe a file, decode the frames at given indices, write clips.

Every failure to read is a `VideoError` whose `reason` is a short fixed phrase (for bad-sample reports),
never a bare PyAV exception, so callers can count and name bad samples without crashing.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from fractions import Fraction

import av
import numpy as np

from insvie_jax import storage

# Decoding from the start is cheaper than a seek for indices this close to it (one GOP of typical encoders).
SEEK_MIN_INDEX = 48
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

X264_DETERMINISTIC = "threads=1:lookahead-threads=1:mbtree=0"

class VideoError(Exception):
    """A file that cannot be used as a clip; `reason` is a short phrase for bad-sample reports."""

    def __init__(self, path, reason: str, detail: str = ""):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else ""))


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


def is_image(path) -> bool:
    return storage.path(path).suffix.lower() in IMAGE_SUFFIXES


def _open(path):
    path = storage.path(path)
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise VideoError(path, "missing file") from None
    except OSError as err:  # e.g. a name longer than the filesystem allows (ENAMETOOLONG), a loop of links
        raise VideoError(path, _os_reason(err), err.strerror or "") from None
    if size == 0:
        raise VideoError(path, "zero-length file")
    try:
        container = av.open(storage.readable(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise VideoError(path, "unreadable container", str(err)) from err
    except OSError as err:  # a folder, no permission
        raise VideoError(path, _os_reason(err), err.strerror or "") from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no video stream (audio-only or data file)")
    return container


def _os_reason(err: OSError) -> str:
    if err.errno == errno.ENAMETOOLONG:
        return "file name too long"
    return f"unreadable file ({os.strerror(err.errno) if err.errno else type(err).__name__})"


def _frame_rate(stream) -> Fraction:
    return stream.average_rate or stream.guessed_rate or Fraction(1)


def probe(path) -> VideoInfo:
    """Frame count, fps and size from the container header; counts by decoding when the header has none."""
    with _open(path) as container:
        stream = container.streams.video[0]
        num_frames = stream.frames
        if num_frames <= 0:
            try:
                num_frames = sum(1 for _ in container.decode(stream))
            except av.FFmpegError as err:
                raise VideoError(path, "undecodable video", str(err)) from err
        width, height = stream.codec_context.width, stream.codec_context.height
        if num_frames <= 0 or width <= 0 or height <= 0:
            raise VideoError(path, "no frames")
        return VideoInfo(num_frames, float(_frame_rate(stream)), height, width)


def _to_array(frame, size: tuple[int, int] | None) -> np.ndarray:
    if size is None:
        return frame.to_ndarray(format="rgb24")
    return frame.to_ndarray(format="rgb24", height=size[0], width=size[1])


def read_frames(path, indices, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 (len(indices), H, W, 3) frames at `indices` (any order, repeats allowed), resized to `size`
    = (height, width) by libswscale when given.

    Decodes once up to the largest index, converting only the wanted frames; when the smallest index is
    far from the start, seeks to the keyframe before it first. A file that ends before an index raises
    `VideoError("truncated video")`.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if indices.size == 0 or indices.min() < 0:
        raise ValueError(f"frame indices must be non-negative and non-empty, got {indices}")
    wanted = set(indices.tolist())
    first, last = int(indices.min()), int(indices.max())
    got: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = _frame_rate(stream)
        start = stream.start_time or 0
        seeked = False
        if first >= SEEK_MIN_INDEX and stream.time_base:
            target = start + int(Fraction(first) / rate / stream.time_base)
            container.seek(target, stream=stream, backward=True, any_frame=False)
            seeked = True
        try:
            position = 0
            for frame in container.decode(stream):
                if seeked and frame.pts is not None:
                    position = round(float((frame.pts - start) * stream.time_base * rate))
                if position in wanted:
                    got[position] = _to_array(frame, size)
                if position >= last:
                    break
                position += 1
        except av.FFmpegError as err:
            raise VideoError(path, "undecodable video", str(err)) from err
    missing = wanted - got.keys()
    if missing:
        raise VideoError(path, "truncated video", f"frames {sorted(missing)[:5]} not decodable")
    return np.stack([got[i] for i in indices.tolist()])


def write_video(path, frames: np.ndarray, fps: float = 8, codec: str = "libx264", crf: int = 18) -> None:
    """Writes uint8 (F, H, W, 3) frames (even H and W for yuv420p) as an mp4; atomically (a local tmp + rename,
    or one upload for a URL)."""
    path = storage.path(path)
    if storage.is_url(path):
        with storage.local_file(path) as local:
            write_video(local, frames, fps, codec, crf)
        return
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    frames = np.asarray(frames, dtype=np.uint8)
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            # Bit-identical files from the same frames: one encoding and one lookahead thread (x264's output otherwise
            # depends on the machine), and no macroblock-tree rate control (with it, x264 core 165 under PyAV 18 gave
            # byte-different files from the same frames now and then, even single-threaded).
            stream.options = {"crf": str(crf), "threads": "1", "x264-params": X264_DETERMINISTIC}
            stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def write_image(path, image: np.ndarray) -> None:
    """Writes a uint8 (H, W, 3) image as PNG."""
    storage.path(path).write_bytes(encode_png(image))


def encode_png(image: np.ndarray) -> bytes:
    context = av.CodecContext.create("png", "w")
    context.width, context.height, context.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = context.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image, np.uint8), format="rgb24"))
    packets += context.encode(None)
    return b"".join(bytes(p) for p in packets)
