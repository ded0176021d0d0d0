"""Video and image files in and out with PyAV: the one place that opens, decodes and writes them.

Two readers over one opener: `read_frames` (frames at given indices, for the data pipeline, filters and eval)
and `read_clip` (a source clip as InsViE's `sample_video_edit.py` reads it, for `edit`: every frame at the
native rate, the largest 4k+1 of them that the model takes, a bicubic resize that covers the target size with
the aspect kept, a centre crop, and (x − 127.5) / 127.5). One writer, `write_video`, whose x264 settings make
reruns bit-identical.

Every failure to read is a `VideoError`: one line naming the file, a short fixed `reason` (for bad-sample
reports and counts) and the fix; never a bare PyAV or OS exception.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from fractions import Fraction

import av
import numpy as np
from PIL import Image

from insvie_jax import storage

# Decoding from the start is cheaper than a seek for indices this close to it (one GOP of typical encoders).
SEEK_MIN_INDEX = 48
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

# Bit-identical files from the same frames: one encoding and one lookahead thread (x264's output otherwise depends
# on the machine), and no macroblock-tree rate control (with it, x264 core 165 under PyAV 18 gave byte-different
# files from the same frames now and then, even single-threaded).
X264_DETERMINISTIC = "threads=1:lookahead-threads=1:mbtree=0"

_REENCODE = "re-encode it (e.g. ffmpeg -i IN -c:v libx264 OUT.mp4) or drop it from the list"
FIXES = {
    "missing file": "check the path (the list's rows, --video, or the data roots)",
    "file name too long": "rename the file (the filesystem limits a name to 255 bytes)",
    "zero-length file": "copy the file again; it is empty",
    "unreadable container": "is it a complete, valid video file? " + _REENCODE,
    "no video stream (audio-only or data file)": "pass a video file",
    "undecodable video": _REENCODE,
    "truncated video": "the file ends early: copy it again, or " + _REENCODE,
    "no frames": "pass a video with at least one frame",
}


class VideoError(ValueError):
    """A file that cannot be used as a clip. `reason` is a short fixed phrase for bad-sample reports; the message
    is one line: the file, the reason (with PyAV's or the OS's detail) and the fix."""

    def __init__(self, path, reason: str, detail: str = "", fix: str = ""):
        self.path, self.reason = str(path), reason
        fix = fix or FIXES.get(reason, "check the file")
        super().__init__(f"{path}: {reason}" + (f" ({detail})" if detail else "") + f"; {fix}")


@dataclasses.dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    height: int
    width: int


@dataclasses.dataclass
class SourceClip:
    frames: np.ndarray  # (F, H, W, 3) float32 in [-1, 1]
    fps: Fraction | None  # the file's frame rate, when it states one
    decoded: int  # frames read from the file (at most `max_frames`)


def is_image(path) -> bool:
    return storage.path(path).suffix.lower() in IMAGE_SUFFIXES


def _open(path):
    path = storage.path(path)
    try:
        size = storage.size(path)
    except FileNotFoundError:
        raise VideoError(path, "missing file") from None
    except OSError as err:  # e.g. a name longer than the filesystem allows (ENAMETOOLONG), a loop of links
        raise _os_error(path, err) from None
    if size == 0:
        raise VideoError(path, "zero-length file")
    try:
        container = av.open(storage.readable(path))
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as err:
        raise VideoError(path, "unreadable container", _detail(err)) from None
    except OSError as err:  # a folder, no permission
        raise _os_error(path, err) from None
    if not container.streams.video:
        container.close()
        raise VideoError(path, "no video stream (audio-only or data file)")
    return container


def _os_error(path, err: OSError) -> VideoError:
    if err.errno == errno.ENAMETOOLONG:
        return VideoError(path, "file name too long")
    reason = f"unreadable file ({os.strerror(err.errno) if err.errno else type(err).__name__})"
    return VideoError(path, reason, fix="check the path and its permissions")


def _detail(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err)


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
                raise VideoError(path, "undecodable video", _detail(err)) from None
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
            raise VideoError(path, "undecodable video", _detail(err)) from None
    missing = wanted - got.keys()
    if missing:
        raise VideoError(path, "truncated video", f"frames {sorted(missing)[:5]} not decodable")
    return np.stack([got[i] for i in indices.tolist()])


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


def read_clip(path, height: int, width: int, max_frames: int, temporal_compression: int = 4) -> SourceClip:
    """The source clip as the model takes it: (F, height, width, 3) in [-1, 1], F = 4k+1 ≤ max_frames. A damaged
    tail is cut off (the frames decoded before it are kept)."""
    frames = []
    with _open(path) as container:
        stream = container.streams.video[0]
        fps = stream.average_rate or stream.guessed_rate
        try:
            for frame in container.decode(stream):
                frames.append(resize_crop(frame.to_ndarray(format="rgb24"), height, width))
                if len(frames) >= max_frames:
                    break
        except av.FFmpegError as err:
            if not frames:
                raise VideoError(path, "undecodable video", _detail(err)) from None
    count = usable_frames(len(frames), max_frames, temporal_compression)
    if count == 0:
        raise VideoError(path, "no frames")
    clip = np.stack(frames[:count]).astype(np.float32)
    return SourceClip((clip - 127.5) / 127.5, Fraction(fps) if fps else None, len(frames))


def to_uint8(video: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 as InsViE writes them: clamp((x + 1) / 2), then 255·x truncated."""
    return (255.0 * np.clip((np.asarray(video, np.float32) + 1) / 2, 0, 1)).astype(np.uint8)


def _codec() -> str:
    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (av.FFmpegError, ValueError):  # an ffmpeg build without x264
        return "mpeg4"


def write_video(path, frames: np.ndarray, fps: float | Fraction = 8, crf: int = 18):
    """Writes uint8 (F, H, W, 3) frames (even H and W for yuv420p) as an H.264 mp4 (MPEG-4 part 2 when PyAV's
    ffmpeg has no libx264), atomically: a local tmp + rename, or one upload for a URL. Returns the path."""
    path = storage.path(path)
    if storage.is_url(path):
        with storage.local_file(path) as local:
            write_video(local, frames, fps, crf)
        return path
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    frames = np.asarray(frames, dtype=np.uint8)
    codec = _codec()
    with av.open(str(tmp), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "threads": "1", "x264-params": X264_DETERMINISTIC}
            stream.codec_context.thread_count = 1
        else:
            stream.bit_rate = 8_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    tmp.replace(path)
    return path


def side_by_side(source: np.ndarray, edited: np.ndarray) -> np.ndarray:
    """(F, H, W, 3) + (F, H, W, 3) -> (F, H, 2W, 3): source left, edit right."""
    return np.concatenate([source, edited], axis=2)


def contact_sheet(path, source: np.ndarray, edited: np.ndarray, columns: int = 4):
    """A PNG of `columns` evenly spaced frames: the source in the top row, the edit below."""
    picks = np.unique(np.linspace(0, len(edited) - 1, min(columns, len(edited))).round().astype(int))
    rows = [np.concatenate(list(video[picks]), axis=1) for video in (source, edited)]
    write_image(path, np.concatenate(rows, axis=0))
    return storage.path(path)


def write_image(path, image: np.ndarray) -> None:
    """Writes a uint8 (H, W, 3) image as PNG."""
    storage.path(path).write_bytes(encode_png(image))


def encode_png(image: np.ndarray) -> bytes:
    context = av.CodecContext.create("png", "w")
    context.width, context.height, context.pix_fmt = image.shape[1], image.shape[0], "rgb24"
    packets = context.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image, np.uint8), format="rgb24"))
    packets += context.encode(None)
    return b"".join(bytes(p) for p in packets)
