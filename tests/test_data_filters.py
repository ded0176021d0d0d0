"""`insvie-jax filter`: scores and named rejects for made-to-fail clips, SSIM sanity, the judge by callable and by
HTTP (a local fake server: batching, retries, cache), the CLI report and kept list."""

import base64
import dataclasses
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from _data_clips import edited, moving_texture, write_insvie_csv, write_pair

from insvie_jax import config as configlib
from insvie_jax.data import filters
from insvie_jax.data.sources import read_lists
from insvie_jax.data.video import write_video


def _cfg(**keys):
    cfg = configlib.load("tiny")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, fps=8.0),
                               filter=dataclasses.replace(cfg.filter, frames=9, **keys))


def _write(root, name, source, target, fps=8, target_fps=None):
    for folder, frames, rate in (("source", source, fps), ("edit", target, target_fps or fps)):
        (root / folder).mkdir(parents=True, exist_ok=True)
        write_video(root / folder / name, frames, rate)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    good = moving_texture(9, 32, 48)
    static = np.repeat(good[:1], 9, axis=0)
    noise = np.concatenate([moving_texture(1, 32, 48, seed=10 + t) for t in range(9)])  # a new scene every frame
    smooth = np.broadcast_to(np.linspace(60, 200, 48, dtype=np.uint8)[None, None, :, None], (9, 32, 48, 3)).copy()
    smooth += np.arange(9, dtype=np.uint8)[:, None, None, None] * 3
    dark = (good // 12).astype(np.uint8)
    blackened = good.copy()
    blackened[:3] = 0
    duplicated = np.repeat(moving_texture(3, 32, 48), 3, axis=0)
    cases = {
        "good.mp4": (good, edited(good)), "good2.mp4": (moving_texture(9, 32, 48, seed=5), edited(moving_texture(9, 32, 48, seed=5))),
        "static.mp4": (static, edited(static)), "chaotic.mp4": (noise, edited(noise)), "blurred.mp4": (smooth, smooth[:, :, ::-1]),
        "dark.mp4": (dark, edited(dark)), "black.mp4": (blackened, edited(blackened)), "dup.mp4": (duplicated, edited(duplicated)),
        "same.mp4": (good, good), "replaced.mp4": (good, moving_texture(9, 32, 48, seed=7)),
    }
    for name, (source, target) in cases.items():
        _write(root, name, source, target)
    _write(root, "fps.mp4", good, edited(good), fps=8, target_fps=16)
    write_pair(root, "counts.mp4", num_frames=9, edit_frames=13)
    names = [*cases, "fps.mp4", "counts.mp4"]
    write_insvie_csv(root / "train.csv", names, [f"{'good' if n.startswith('good') else 'meh'} edit {i}"
                                                  for i, n in enumerate(names)])
    return root


def test_each_made_to_fail_clip_is_rejected_for_its_reason(dataset):
    triplets, report = read_lists([dataset / "train.csv"], ["source", "edit"])
    rows = {r["sample"].split(":")[-1]: r for r in filters.filter_triplets(_cfg(), triplets, report)}
    expect = {"static.mp4": "static", "chaotic.mp4": "chaotic", "blurred.mp4": "blurred", "dark.mp4": "dark",
              "black.mp4": "black frames", "dup.mp4": "duplicate frames", "same.mp4": "edit changed nothing",
              "replaced.mp4": "edit replaced the source", "fps.mp4": "source/edit fps differ",
              "counts.mp4": "source/edit frame counts differ"}
    for name, reason in expect.items():
        assert rows[name]["keep"] == 0 and reason in rows[name]["reasons"], (name, rows[name])
    for name in ("good.mp4", "good2.mp4"):
        assert rows[name]["keep"] == 1 and rows[name]["reasons"] == "", rows[name]
    assert "static (motion 0" in rows["static.mp4"]["reasons"]  # the score and the bound are named
    assert 0.3 < rows["good.mp4"]["consistency"] < 0.95


def test_ssim_matches_its_definition_on_constant_and_equal_images():
    rng = np.random.default_rng(0)
    x = rng.random((2, 16, 16))
    assert filters.ssim(x, x) == pytest.approx(1.0)
    assert filters.ssim(x, 1 - x) < 0
    a, b, c1 = 0.3, 0.6, 0.01**2
    flat = filters.ssim(np.full((1, 9, 9), a), np.full((1, 9, 9), b))
    assert flat == pytest.approx((2 * a * b + c1) / (a * a + b * b + c1))  # no variance: luminance term only


def test_callable_judge_scores_only_the_passing_triplets(dataset):
    triplets, report = read_lists([dataset / "train.csv"], ["source", "edit"])
    cfg = _cfg(judge="_data_clips:judge_by_instruction", min_judge_score=0.5)
    rows = filters.filter_triplets(cfg, triplets, report, filters.make_judge(cfg.filter))
    judged = {r["sample"].split(":")[-1]: r.get("judge_score") for r in rows if r.get("judge_score") is not None}
    assert judged == {"good.mp4": 0.9, "good2.mp4": 0.9}


class FakeJudge(BaseHTTPRequestHandler):
    requests = []
    fail_once = set()

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append(body)
        if body["instruction"] in FakeJudge.fail_once:
            FakeJudge.fail_once.discard(body["instruction"])
            self.send_response(503)
            self.end_headers()
            return
        frames = [base64.b64decode(f) for f in body["source_frames"] + body["edited_frames"]]
        ok = len(frames) == 6 and all(f.startswith(b"\x89PNG") for f in frames)
        answer = {"score": (0.2 if "0" in body["instruction"] else 0.8) if ok else -1.0}
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_http_judge_with_batching_retries_and_cache(dataset, tmp_path):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/score"
        triplets, _ = read_lists([dataset / "train.csv"], ["source", "edit"])
        triplets = [t for t in triplets if "good" in t.source]  # instructions "good edit 0", "good edit 1"
        FakeJudge.fail_once = {triplets[1].instruction}
        cfg = _cfg(judge=url, judge_batch=2, judge_cache=str(tmp_path / "cache"),
                   judge_retries=2)
        judge = filters.make_judge(cfg.filter)
        judge.backoff = 0.01
        rows = filters.filter_triplets(cfg, triplets, None, judge)
        assert [r["judge_score"] for r in rows] == [0.2, 0.8]
        assert [r["keep"] for r in rows] == [0, 1] and "judge rejected (judge_score 0.2 < 0.5)" in rows[0]["reasons"]
        assert len(FakeJudge.requests) == 3  # one retry after the 503
        rows_again = filters.filter_triplets(cfg, triplets, None, judge)
        assert [r["judge_score"] for r in rows_again] == [0.2, 0.8] and len(FakeJudge.requests) == 3  # cached
    finally:
        server.shutdown()
        server.server_close()
    # A dead endpoint rejects the triplet with the error named; the run goes on.
    dead = _cfg(judge=url, judge_retries=1, judge_timeout=2.0)
    judge = filters.make_judge(dead.filter)
    judge.backoff = 0.01
    rows = filters.filter_triplets(dead, triplets[:1], None, judge)
    assert rows[0]["keep"] == 0 and rows[0]["reasons"].startswith("judge failed (judge http://127.0.0.1")


def test_cli_writes_report_and_kept_list(dataset, tmp_path):
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "filter", "tiny", "data.fps=8.0",
                          "filter.frames=9", "--list", str(dataset / "train.csv"), "--report",
                          str(tmp_path / "r.csv"), "--kept", str(tmp_path / "kept.jsonl"), "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary == {"report": str(tmp_path / "r.csv"), "triplets": 12, "kept": 2,
                       "kept_list": str(tmp_path / "kept.jsonl")}
    header = (tmp_path / "r.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["sample", "keep", "reasons", "motion", "sharpness"]
    kept, report = read_lists([tmp_path / "kept.jsonl"], [])
    assert sorted(t.source.split("/")[-1] for t in kept) == ["good.mp4", "good2.mp4"] and not report.entries
