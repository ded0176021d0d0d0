"""`insvie-jax filter`: per-triplet quality scores, a CSV report with the reasons for each reject, and an
optional VLM judge (a Python callable or an HTTP endpoint). Nothing calls out unless `filter.judge` is set.

Scores (grayscale in [0, 1] at `filter.size` pixels on the shorter side, `filter.frames` frames
sampled as for training but unpadded):
    motion       mean |frame t - frame t-1| of the source: static below filter.min_motion, chaotic above max
    sharpness    variance of the 3x3 Laplacian (0-255 scale), worst of source and edit
    brightness   mean level; clipped = fraction of pixels at 0 or 255 (worst of source and edit)
    duplicate    fraction of consecutive frame pairs that are near-identical (source)
    black        fraction of near-black frames (worst of source and edit)
    consistency  mean SSIM (7x7 windows) of source vs edit: how much of the source survives the edit
    fps_ratio    max / min of source and edit fps (frame counts must match or the triplet is a bad sample)
    judge_score  the judge's score, asked only for triplets that pass everything else

HTTP judge protocol: POST JSON {"instruction": str, "source_frames": [base64 PNG, ...], "edited_frames": [...]}
-> {"score": float}. Requests run `filter.judge_batch` at a time, retried with backoff on connection errors,
timeouts, 429/5xx and malformed answers; answers are cached on disk by request hash (`filter.judge_cache`).
Judge frames: `filter.judge_frames` evenly spaced frames at 4x the scoring resolution. A judge failure
rejects that triplet with the error named; it never stops the run.
"""

from __future__ import annotations

import base64
import concurrent.futures
import csv
import dataclasses
import hashlib
import importlib
import io
import json
import os
import posixpath
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Protocol, Sequence

import numpy as np
from tqdm import tqdm

from insvie_jax import storage
from insvie_jax.data.sources import BadSamples, Triplet, load_clip, try_load_clip
from insvie_jax.data.video import VideoError, encode_png, probe

SCORE_COLUMNS = ("motion", "sharpness", "brightness", "clipped", "duplicate", "black", "consistency", "fps_ratio",
                 "judge_score")
DUPLICATE_LEVEL = 0.5 / 255  # mean |difference| below which two frames count as the same
BLACK_LEVEL = 0.04
SSIM_WINDOW = 7


# ---------------------------------------------------------------------------------------------------
# Scores


def grayscale(frames: np.ndarray) -> np.ndarray:
    """uint8 (F, H, W, 3) -> float32 (F, H, W) luma in [0, 1] (BT.601 weights)."""
    return (frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)) / 255.0


def laplacian_variance(gray: np.ndarray) -> float:
    """Mean over frames of the variance of the 4-neighbour Laplacian, on the 0-255 scale."""
    g = gray * 255.0
    lap = g[:, 1:-1, :-2] + g[:, 1:-1, 2:] + g[:, :-2, 1:-1] + g[:, 2:, 1:-1] - 4 * g[:, 1:-1, 1:-1]
    return float(lap.reshape(len(g), -1).var(axis=1).mean())


def _box_mean(x: np.ndarray, k: int) -> np.ndarray:
    return np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(-2, -1)).mean(axis=(-2, -1))


def ssim(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW) -> float:
    """Mean SSIM of two (F, H, W) grayscale clips in [0, 1] with uniform windows (Wang et al. 2004 constants)."""
    c1, c2 = 0.01**2, 0.03**2
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = _box_mean(a, window), _box_mean(b, window)
    var_a = _box_mean(a * a, window) - mu_a**2
    var_b = _box_mean(b * b, window) - mu_b**2
    cov = _box_mean(a * b, window) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def clip_scores(source: np.ndarray, target: np.ndarray, source_fps: float, target_fps: float) -> dict:
    """The scores of the module doc; motion and duplicate are None for single frames (image pairs)."""
    gs, gt = grayscale(source), grayscale(target)
    diffs = np.abs(np.diff(gs, axis=0)).mean(axis=(1, 2)) if len(gs) > 1 else None
    return {
        "motion": None if diffs is None else float(diffs.mean()),
        "sharpness": min(laplacian_variance(gs), laplacian_variance(gt)),
        "brightness": float(gs.mean()),
        "clipped": max(float(((g <= 1 / 255) | (g >= 254 / 255)).mean()) for g in (gs, gt)),
        "duplicate": None if diffs is None else float((diffs < DUPLICATE_LEVEL).mean()),
        "black": max(float((g.mean(axis=(1, 2)) < BLACK_LEVEL).mean()) for g in (gs, gt)),
        "consistency": ssim(gs, gt),
        "fps_ratio": max(source_fps, target_fps) / max(min(source_fps, target_fps), 1e-6),
    }


def reject_reasons(scores: dict, f) -> list[str]:
    """The failed thresholds of `d` (a DataConfig), each naming the score, its value and the bound."""
    checks = [
        ("motion", "<", f.min_motion, "static"), ("motion", ">", f.max_motion, "chaotic"),
        ("sharpness", "<", f.min_sharpness, "blurred"),
        ("brightness", "<", f.min_brightness, "dark"), ("brightness", ">", f.max_brightness, "bright"),
        ("clipped", ">", f.max_clipped, "clipped exposure"),
        ("duplicate", ">", f.max_duplicate, "duplicate frames"),
        ("black", ">", f.max_black, "black frames"),
        ("consistency", "<", f.min_consistency, "edit replaced the source"),
        ("consistency", ">", f.max_consistency, "edit changed nothing"),
        ("fps_ratio", ">", f.max_fps_ratio, "source/edit fps differ"),
        ("judge_score", "<", f.min_judge_score, "judge rejected"),
    ]
    reasons = []
    for key, op, bound, what in checks:
        value = scores.get(key)
        if value is None or value == "":
            continue
        if (op == "<" and value < bound) or (op == ">" and value > bound):
            reasons.append(f"{what} ({key} {value:.4g} {op} {bound:g})")
    return reasons


# ---------------------------------------------------------------------------------------------------
# Judges


class Judge(Protocol):
    """Scores a batch of items: one float per item, or an Exception in its place when that item failed."""

    def __call__(self, items: Sequence["JudgeItem"]) -> list[float | Exception]: ...


@dataclasses.dataclass
class JudgeItem:
    source: np.ndarray  # uint8 (n, H, W, 3)
    edited: np.ndarray
    instruction: str


class JudgeError(Exception):
    """The judge could not score an item (after retries)."""


class CallableJudge:
    """A user function `fn(source_frames, edited_frames, instruction) -> float`, called per item."""

    def __init__(self, fn: Callable[[np.ndarray, np.ndarray, str], float]):
        self.fn = fn

    def __call__(self, items):
        return [float(self.fn(i.source, i.edited, i.instruction)) for i in items]


class HttpJudge:
    """POSTs each item to `url` (see the module doc), `batch` concurrently, with retries and a disk cache."""

    def __init__(self, url: str, *, batch: int = 8, retries: int = 3, timeout: float = 60.0, cache_dir: str = "",
                 backoff: float = 0.5):
        self.url, self.batch, self.retries, self.timeout, self.backoff = url, batch, retries, timeout, backoff
        self.cache = Path(cache_dir) if cache_dir else None
        if self.cache:
            self.cache.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def body(item: JudgeItem) -> bytes:
        def pngs(frames):
            return [base64.b64encode(encode_png(f)).decode() for f in frames]

        return json.dumps({"instruction": item.instruction, "source_frames": pngs(item.source),
                           "edited_frames": pngs(item.edited)}).encode()

    def _post(self, body: bytes) -> float:
        key = hashlib.sha256(self.url.encode() + b"\0" + body).hexdigest()
        cached = self.cache / f"{key}.json" if self.cache else None
        if cached and cached.exists():
            return float(json.loads(cached.read_text())["score"])
        error = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    score = float(json.loads(response.read())["score"])
            except urllib.error.HTTPError as err:
                error = f"HTTP {err.code}"
                if err.code != 429 and err.code < 500:
                    break  # the request itself is wrong: retrying will not help
                continue
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as err:
                error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
                continue
            except (ValueError, KeyError, TypeError) as err:
                error = f"malformed answer ({type(err).__name__}: {err})"
                continue
            if cached:
                cached.write_text(json.dumps({"score": score}))
            return score
        raise JudgeError(f"judge {self.url} failed after {attempt + 1} attempts: {error}")

    def __call__(self, items):
        bodies = [self.body(i) for i in items]
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, self.batch)) as pool:
            futures = [pool.submit(self._post, b) for b in bodies]
            return [f.result() if f.exception() is None else f.exception() for f in futures]


def make_judge(f) -> Judge | None:
    """The judge named by `filter.judge` ("" -> None, URL -> HttpJudge, "module:function" -> CallableJudge)."""
    spec = f.judge
    if not spec:
        return None
    if spec.startswith(("http://", "https://")):
        return HttpJudge(spec, batch=f.judge_batch, retries=f.judge_retries,
                         timeout=f.judge_timeout, cache_dir=f.judge_cache)
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"filter.judge={spec!r}: expected an http(s) URL or 'module:function'")
    return CallableJudge(getattr(importlib.import_module(module), name))


# ---------------------------------------------------------------------------------------------------
# The command


def _scoring_size(path: str, short_side: int) -> tuple[int, int]:
    info = probe(path)
    scale = short_side / min(info.height, info.width)
    return max(2, round(info.height * scale)), max(2, round(info.width * scale))


def _evenly(frames: np.ndarray, count: int) -> np.ndarray:
    return frames[np.linspace(0, len(frames) - 1, min(count, len(frames))).round().astype(int)]


def filter_triplets(cfg, triplets: list[Triplet], list_report: BadSamples | None = None, judge: Judge | None = None,
                    show_progress: bool = False) -> list[dict]:
    """One row per triplet (and per unreadable list row): scores, keep (1/0) and the reasons for a reject."""
    d, f = cfg.data, cfg.filter
    scoring = dataclasses.replace(d, pad_frames=False, buckets=[])
    rows, judged = [], []
    for entry in (list_report.entries if list_report else []):
        rows.append({"sample": entry["sample"], "keep": 0, "reasons": entry["reason"]})
    for triplet in tqdm(triplets, unit="triplet", disable=not show_progress, desc="filter"):
        row = {"sample": triplet.name, "source": triplet.source, "target": triplet.target,
               "instruction": triplet.instruction}
        rows.append(row)
        report = BadSamples()
        try:
            size = _scoring_size(triplet.source, f.size)
        except VideoError as err:
            row.update(keep=0, reasons=err.reason)
            continue
        clip = try_load_clip(triplet, scoring, report, seed=None, num_frames=f.frames, size=size)
        if clip is None:
            row.update(keep=0, reasons=report.entries[0]["reason"])
            continue
        row.update(clip_scores(clip.source, clip.target, clip.source_fps, clip.target_fps))
        reasons = reject_reasons(row, f)
        row.update(keep=int(not reasons), reasons="; ".join(reasons))
        if judge is not None and not reasons:
            judged.append((row, triplet))
    if judge is not None:
        _judge_rows(cfg, judge, judged)
    return rows


def _judge_rows(cfg, judge: Judge, judged: list) -> None:
    d, f = cfg.data, cfg.filter
    batch = max(1, f.judge_batch)
    for start in range(0, len(judged), batch):
        chunk = judged[start:start + batch]
        items = []
        for row, triplet in chunk:
            clip = load_clip(triplet, dataclasses.replace(d, pad_frames=False), seed=None,
                             num_frames=f.frames, size=_scoring_size(triplet.source, 4 * f.size))
            items.append(JudgeItem(_evenly(clip.source, f.judge_frames),
                                   _evenly(clip.target, f.judge_frames), triplet.instruction))
        try:
            scores = judge(items)
        except Exception as err:  # noqa: BLE001 - a user judge that raises fails its batch, not the run
            scores = [err] * len(items)
        for (row, _), score in zip(chunk, scores):
            if isinstance(score, Exception):
                row.update(keep=0, reasons=f"judge failed ({score})")
                continue
            row["judge_score"] = float(score)
            reasons = reject_reasons(row, f)
            row.update(keep=int(not reasons), reasons="; ".join(reasons))


def write_report(rows: list[dict], path) -> None:
    columns = ["sample", "keep", "reasons", *SCORE_COLUMNS, "source", "target", "instruction"]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    storage.path(path).write_text(text.getvalue())


def write_kept(rows: list[dict], path) -> int:
    """The kept triplets as a JSONL pair list (absolute paths or URLs), readable by `encode` and the pipeline; its
    first line declares the folder holding them all as the list's data root."""
    kept = [r for r in rows if r.get("keep")]

    def absolute(p: str) -> str:
        return p if storage.is_url(p) else os.path.realpath(p)

    files = [absolute(r[k]) for r in kept for k in ("source", "target")]
    lines = []
    if files:
        scheme = files[0].split("://", 1)[0] + "://" if storage.is_url(files[0]) else ""
        folders = [posixpath.dirname(f.removeprefix(scheme)) for f in files]
        lines.append(json.dumps({"root": scheme + posixpath.commonpath(folders)}))
    lines += [json.dumps({"source": absolute(r["source"]), "target": absolute(r["target"]),
                          "instruction": r["instruction"]}) for r in kept]
    storage.path(path).write_text("".join(line + "\n" for line in lines))
    return len(kept)
