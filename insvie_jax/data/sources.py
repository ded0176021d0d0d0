"""Editing triplets on disk: InsViE-1M CSV lists, image-pair lists, frame sampling and paired cropping.

List formats (paths relative to the list file's folder unless absolute):
- InsViE-1M CSV: a header, then rows [source video name, source caption, instruction, edited caption, edit
  subfolder]; the source clip is `<csv dir>/<video_roots[0]>/<name>`, the edited clip
  `<csv dir>/<video_roots[1]>/<name>` (same file name), as InsViE's `SFTDataset_edit`.
- Pair CSV: a header naming the columns `source`, `target` and `instruction` (extra columns are ignored).
- JSONL: one object per line with keys `source`, `target`, `instruction`; the first line may declare the list's
  data root instead, `{"root": folder}` (as `insvie-jax filter --kept` writes).
Pairs of images (png/jpg/webp/bmp) are 1-frame samples; other files are read as videos.

Listed files must stay inside their data root: the list's folder (an InsViE CSV's video_roots, a JSONL's declared
root); a row that leaves it with `../` or an absolute path is a bad row unless data.allow_outside_root is true.

Nothing here raises on a bad sample: list rows that cannot be read and clips that cannot be used are
recorded in a `BadSamples` report ({sample, reason}) and skipped by the caller.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import hashlib
import json
import math
import os
import posixpath

import numpy as np

from insvie_jax import storage
from insvie_jax.data.video import VideoError, is_image, probe, read_frames

PAIR_COLUMNS = ("source", "target", "instruction")
# Source and edit aspect ratios this close (|log ratio|, about 1%) are the same: even-size rounding of encoders.
ASPECT_TOLERANCE = 0.01


@dataclasses.dataclass(frozen=True)
class Triplet:
    name: str  # unique within a run: "<list file name>:<row>:<source file name>"
    source: str
    target: str
    instruction: str

    @property
    def is_image(self) -> bool:
        return is_image(self.source)


class BadSamples:
    """The bad-sample report: every skipped sample by name with the reason, and counts per reason."""

    def __init__(self, entries: list[dict] | None = None):
        self.entries: list[dict] = list(entries or [])

    def add(self, sample: str, reason: str) -> None:
        self.entries.append({"sample": sample, "reason": reason})

    def extend(self, other: "BadSamples") -> None:
        self.entries.extend(other.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def counts(self) -> dict[str, int]:
        return dict(collections.Counter(e["reason"] for e in self.entries))

    def to_dict(self) -> dict:
        return {"count": len(self.entries), "by_reason": self.counts(), "samples": self.entries}


class SampleError(Exception):
    """A sample that cannot be used; `reason` names why (for the report)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


# ---------------------------------------------------------------------------------------------------
# Lists


def _resolve(folder, path: str) -> str:
    """`path` as written in a list, relative to the list's `folder` unless absolute (a URL is absolute)."""
    return path if storage.is_url(path) or path.startswith("/") else str(folder / path)


def _outside(path: str, root) -> bool:
    """Whether `path` leaves `root` (`../`, an absolute path elsewhere); by the names alone, so a symlink that the
    data root itself holds stays usable. URLs are compared as names too."""
    root, path = str(root), str(path)
    if storage.is_url(root) or storage.is_url(path):
        root_name = posixpath.normpath(root.split("://", 1)[-1])
        scheme = root.split("://", 1)[0] if storage.is_url(root) else ""
        if not path.startswith(scheme + "://"):
            return True
        return posixpath.commonpath([root_name, posixpath.normpath(path.split("://", 1)[1])]) != root_name
    root_name = os.path.normpath(os.path.abspath(root))
    return os.path.commonpath([root_name, os.path.normpath(os.path.abspath(path))]) != root_name


def _outside_reason(pairs, allow_outside_root: bool) -> str | None:
    """The bad-row reason when a (path, root) pair leaves its root and the config does not allow it."""
    for path, root in pairs:
        if not allow_outside_root and _outside(path, root):
            return f"path outside the data root {root} (set data.allow_outside_root=true to allow it)"
    return None


def _read_csv(path, video_roots: list[str], report: BadSamples, allow_outside_root: bool) -> list[Triplet]:
    folder = path.parent
    out: list[Triplet] = []
    # surrogateescape keeps undecodable bytes visible, so a broken row is reported rather than silently altered.
    with storage.csv_text(path, errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = next(reader)
        except (StopIteration, csv.Error):
            report.add(f"{path.name}:header", "unreadable CSV header")
            return out
        columns = [c.strip().lower() for c in header]
        pair_list = all(c in columns for c in PAIR_COLUMNS)
        if not pair_list and len(video_roots) != 2:
            raise ValueError(f"data.video_roots={video_roots} must name two folders [source_root, edit_root] "
                             f"(relative to {folder}) to read the InsViE CSV {path}")
        row_number = 1
        while True:
            row_number += 1
            sample = f"{path.name}:{row_number}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as err:
                report.add(sample, f"unreadable CSV row ({err})")
                continue
            if not row:
                continue
            if any("\udc80" <= ch <= "\udcff" for field in row for ch in field):
                report.add(sample, "unreadable CSV row (not UTF-8)")
                continue
            if pair_list:
                if len(row) < len(columns):
                    report.add(sample, f"unreadable CSV row ({len(row)} fields, header has {len(columns)})")
                    continue
                fields = dict(zip(columns, row))
                source, target, instruction = (fields[c].strip() for c in PAIR_COLUMNS)
                source, target = _resolve(folder, source), _resolve(folder, target)
                roots = (folder, folder)
            else:
                if len(row) < 3 or not row[0].strip():
                    report.add(sample, f"unreadable CSV row ({len(row)} fields, want >= 3 with a video name)")
                    continue
                name, instruction = row[0].strip(), row[2].strip()
                roots = (folder / video_roots[0], folder / video_roots[1])
                source, target = _resolve(roots[0], name), _resolve(roots[1], name)
            if not instruction:
                report.add(sample, "empty instruction")
                continue
            outside = _outside_reason(zip((source, target), roots), allow_outside_root)
            if outside:
                report.add(f"{sample}:{storage.name(source)}", outside)
                continue
            out.append(Triplet(f"{sample}:{storage.name(source)}", source, target, instruction))
    return out


def _read_jsonl(path, report: BadSamples, allow_outside_root: bool) -> list[Triplet]:
    out = []
    root = path.parent
    for line_number, line in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        sample = f"{path.name}:{line_number}"
        try:
            record = json.loads(line)
            if not out and isinstance(record, dict) and set(record) == {"root"}:  # the declared data root
                root = storage.path(_resolve(path.parent, str(record["root"])))
                continue
            source, target, instruction = (str(record[k]).strip() for k in PAIR_COLUMNS)
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            report.add(sample, f"unreadable JSONL row ({type(err).__name__}: {err})")
            continue
        if not instruction:
            report.add(sample, "empty instruction")
            continue
        source, target = _resolve(path.parent, source), _resolve(path.parent, target)
        outside = _outside_reason(((source, root), (target, root)), allow_outside_root)
        if outside:
            report.add(f"{sample}:{storage.name(source)}", outside)
            continue
        out.append(Triplet(f"{sample}:{storage.name(source)}", source, target, instruction))
    return out


def read_list(path, video_roots: list[str], report: BadSamples, allow_outside_root: bool = False) -> list[Triplet]:
    """The triplets of one list file (CSV or JSONL, see the module doc); unreadable rows, and rows naming files
    outside the data root (unless `allow_outside_root`), go to `report`."""
    path = storage.path(path)
    if not path.is_file():
        raise FileNotFoundError(f"triplet list {path} not found (data.paths / the list argument)")
    if path.suffix.lower() in (".jsonl", ".json"):
        return _read_jsonl(path, report, allow_outside_root)
    return _read_csv(path, video_roots, report, allow_outside_root)


def read_lists(paths, video_roots: list[str], allow_outside_root: bool = False) -> tuple[list[Triplet], BadSamples]:
    """The triplets of several list files, in order, and the report of their unreadable rows."""
    report = BadSamples()
    triplets = [t for path in paths for t in read_list(path, video_roots, report, allow_outside_root)]
    return triplets, report


# ---------------------------------------------------------------------------------------------------
# Frame sampling and cropping


def largest_4k_plus_1(n: int) -> int:
    """The largest 4k+1 <= n (InsViE's `nearest_smaller_4k_plus_1`)."""
    return n - 3 if n % 4 == 0 else n - n % 4 + 1


def sample_frame_indices(num_raw: int, fps: float, num_frames: int, target_fps: float = 7,
                         skip: int = 0, pad: bool = True) -> np.ndarray:
    """Raw frame indices of one clip, as InsViE's `SFTDataset_edit`:

    - clip longer than `num_frames` frames at `target_fps`: a window of num_frames / target_fps seconds from
      `skip`, stride floor(window / num_frames) raw frames;
    - else more than `num_frames` raw frames: stride max(floor(n / num_frames), 1) from `skip`;
    - else the largest 4k+1 frames from `skip`.
    Then truncated to `num_frames` and, with `pad`, padded by repeating the last index.
    """
    if num_raw - 2 * skip < 1:
        raise SampleError(f"too short ({num_raw} frames, skip {skip} at each end)")
    if num_raw / fps * target_fps > num_frames:
        start = skip
        end = int(start + num_frames / target_fps * fps)
        indices = np.arange(start, end, max((end - start) // num_frames, 1))
    elif num_raw > num_frames:
        start, end = skip, num_raw - skip
        indices = np.arange(start, end, max((end - start) // num_frames, 1))
    else:
        start = skip
        indices = np.arange(start, start + largest_4k_plus_1(num_raw - 2 * skip))
    indices = np.minimum(indices[:num_frames], num_raw - 1)
    if pad and len(indices) < num_frames:
        indices = np.concatenate([indices, np.full(num_frames - len(indices), indices[-1])])
    return indices.astype(np.int64)


def choose_resolution(height: int, width: int, buckets: list, default: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is closest to the clip's (first on ties)."""
    options = [tuple(b) for b in buckets] or [default]
    aspect = math.log(width / height)
    return min(options, key=lambda hw: abs(math.log(hw[1] / hw[0]) - aspect))


def cover_size(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
    """The smallest aspect-keeping size covering `target`, or the clip's own size when it already does.
    Square clips are stretched to `target` as InsViE does."""
    th, tw = target
    if height == width:
        return th, tw
    if height >= th and width >= tw:
        return height, width
    scale = max(th / height, tw / width)
    return max(th, math.ceil(height * scale)), max(tw, math.ceil(width * scale))


def crop_offsets(rng: np.random.Generator | None, size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a `target` crop in a frame of `size`: random with `rng`, centred without."""
    spare_h, spare_w = size[0] - target[0], size[1] - target[1]
    if rng is None:
        return spare_h // 2, spare_w // 2
    return int(rng.integers(0, spare_h + 1)), int(rng.integers(0, spare_w + 1))


@dataclasses.dataclass
class Clip:
    """One usable triplet, decoded: uint8 (F, H, W, 3) source and target frames."""

    triplet: Triplet
    source: np.ndarray
    target: np.ndarray
    source_fps: float
    target_fps: float


def sample_seed(seed: int, name: str) -> np.random.Generator:
    """A per-sample generator from the run seed and the sample's name (stable across list orders)."""
    digest = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def load_clip(triplet: Triplet, data_cfg, *, seed: int | None = 0, num_frames: int | None = None,
              size: tuple[int, int] | None = None) -> Clip:
    """Decodes a triplet: identical frame indices and crop offsets for source and target.

    `data_cfg` supplies num_frames, fps (sampling rate), skip_frames, pad_frames, buckets, height and width;
    `num_frames` / `size` override the count / the output resolution (e.g. small frames for filters). With
    `seed` None the crop is centred, otherwise random from (seed, sample name). Raises `SampleError` or
    `VideoError` (both with `.reason`).
    """
    frames_wanted = num_frames or data_cfg.num_frames
    src_info, tgt_info = probe(triplet.source), probe(triplet.target)
    if triplet.is_image or src_info.num_frames == 1 and is_image(triplet.target):
        indices = np.zeros(1, np.int64)
    else:
        if frames_wanted > 1 and src_info.num_frames < 2:
            raise SampleError(f"single frame where {frames_wanted} are wanted")
        if src_info.num_frames != tgt_info.num_frames:
            raise SampleError(f"source/edit frame counts differ ({src_info.num_frames} vs {tgt_info.num_frames})")
        indices = sample_frame_indices(src_info.num_frames, src_info.fps, frames_wanted, data_cfg.fps,
                                       data_cfg.skip_frames, data_cfg.pad_frames)
    # The edit is resized to the source's size below: another aspect ratio would be stretched.
    if data_cfg.aspect_mismatch == "reject" and abs(math.log(src_info.width / src_info.height * tgt_info.height /
                                                              tgt_info.width)) > ASPECT_TOLERANCE:
        raise SampleError(f"edit aspect ratio differs from the source ({tgt_info.width}x{tgt_info.height} vs "
                          f"{src_info.width}x{src_info.height}; data.aspect_mismatch=stretch resizes it anyway)")
    target_hw = size or choose_resolution(src_info.height, src_info.width, data_cfg.buckets,
                                          (data_cfg.height, data_cfg.width))
    resized = cover_size(src_info.height, src_info.width, target_hw)
    rng = None if seed is None else sample_seed(seed, triplet.name)
    top, left = crop_offsets(rng, resized, target_hw)
    unique, inverse = np.unique(indices, return_inverse=True)
    frames = []
    for path in (triplet.source, triplet.target):
        decoded = read_frames(path, unique, size=resized)[inverse]
        frames.append(np.ascontiguousarray(decoded[:, top:top + target_hw[0], left:left + target_hw[1]]))
    return Clip(triplet, frames[0], frames[1], src_info.fps, tgt_info.fps)


def try_load_clip(triplet: Triplet, data_cfg, report: BadSamples, **kwargs) -> Clip | None:
    """`load_clip`, or None with the reason added to `report`."""
    try:
        return load_clip(triplet, data_cfg, **kwargs)
    except (SampleError, VideoError) as err:
        report.add(triplet.name, err.reason)
        return None


def to_unit_range(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [-1, 1] (the VAE's input range)."""
    return frames.astype(np.float32) / 127.5 - 1.0
