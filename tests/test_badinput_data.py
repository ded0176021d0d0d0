"""Bad list rows found by trying the data tools: paths outside the data root, a file name longer than the
filesystem allows, an edit with another aspect ratio than its source. `encode`, `filter` and the video pipeline
count and name every one, lose no good row, and the config keys say how to allow the first and the last."""

import csv
import json
import subprocess
import sys

import pytest
from _data_clips import moving_texture, write_pair

from insvie_jax import config as configlib
from insvie_jax.data import sources
from insvie_jax.data.pipeline import make_pipeline, read_bad_records
from insvie_jax.data.video import write_video

OVERRIDES = ["data.height=32", "data.width=48", "data.num_frames=5", "data.fps=8.0", "filter.frames=5"]
LONG_NAME = "x" * 296 + ".mp4"  # 300 characters: more than a file name may have (255 bytes)
GOOD = ["good0.mp4", "good1.mp4", "good2.mp4"]
OUTSIDE_ROWS = ["../../etc/passwd", "/etc/passwd", "../../outside.mp4"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("badrows")
    data = root / "data"
    for i, name in enumerate(GOOD):
        write_pair(data, name, seed=i)
    write_video(data / "source" / "wide.mp4", moving_texture(9, 32, 48, 5))
    write_video(data / "edit" / "wide.mp4", moving_texture(9, 32, 64, 5))  # 2:1 edit of a 3:2 source
    write_video(root / "outside.mp4", moving_texture(9, 32, 48, 7))  # a real clip, outside the data root
    with open(data / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption", "instruction", "edited_caption", "edit_folder"])
        for name in [GOOD[0], *OUTSIDE_ROWS, GOOD[1], LONG_NAME, "wide.mp4", GOOD[2]]:
            writer.writerow([name, "c", f"edit {name[:20]}", "c", "edit"])
    rows = [{"source": "source/good0.mp4", "target": "edit/good0.mp4", "instruction": "pair"},
            {"source": "../outside.mp4", "target": "edit/good1.mp4", "instruction": "up"},
            {"source": "source/good1.mp4", "target": str(root / "outside.mp4"), "instruction": "absolute"}]
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


def _expected_bad(data) -> dict[str, str]:
    """Sample name -> the start of its reason."""
    outside = f"path outside the data root {data / 'source'} (set data.allow_outside_root=true to allow it)"
    pair_outside = f"path outside the data root {data} (set data.allow_outside_root=true to allow it)"
    bad = {f"train.csv:{row}:{name.split('/')[-1]}": outside for row, name in zip((3, 4, 5), OUTSIDE_ROWS)}
    bad[f"train.csv:7:{LONG_NAME}"] = "file name too long"
    bad["train.csv:8:wide.mp4"] = "edit aspect ratio differs from the source (64x32 vs 48x32; data.aspect_mismatch="
    bad["pairs.jsonl:2:outside.mp4"] = pair_outside
    bad["pairs.jsonl:3:good1.mp4"] = pair_outside
    return bad


def _check_named(entries, data):
    found = {e["sample"]: e["reason"] for e in entries}
    for sample, reason in _expected_bad(data).items():
        assert found.get(sample, "").startswith(reason), (sample, found.get(sample), sorted(found))


def test_encode_counts_and_names_every_bad_row_and_keeps_the_good(dataset, tmp_path, env):
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "encode", "tiny", *OVERRIDES, "--list",
                          str(dataset / "train.csv"), "--list", str(dataset / "pairs.jsonl"), "--out",
                          str(tmp_path / "enc"), "--quiet"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["count"] == len(GOOD) + 1  # the CSV's good rows and the JSONL's one good pair
    assert summary["bad"] == len(_expected_bad(dataset))
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    _check_named(manifest["bad"]["samples"], dataset)


def test_filter_names_every_bad_row_and_scores_the_good(dataset, tmp_path, env):
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "filter", "tiny", *OVERRIDES, "--list",
                          str(dataset / "train.csv"), "--list", str(dataset / "pairs.jsonl"), "--report",
                          str(tmp_path / "report.csv"), "--quiet"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    with open(tmp_path / "report.csv", newline="") as f:
        rows = {r["sample"]: r for r in csv.DictReader(f)}
    assert len(rows) == len(GOOD) + 1 + len(_expected_bad(dataset))
    _check_named([{"sample": s, "reason": r["reasons"]} for s, r in rows.items() if r["keep"] == "0"], dataset)
    scored = [s for s, r in rows.items() if r["motion"] not in ("", None)]
    assert sorted(scored) == sorted([f"train.csv:{n}:{g}" for n, g in zip((2, 6, 9), GOOD)] +
                                    ["pairs.jsonl:1:good0.mp4"])


def test_video_pipeline_names_bad_rows(dataset, tmp_path):
    cfg = configlib.load("tiny", [*OVERRIDES, "data.source=video", "data.batch_size=2",
                                  f"data.paths=[{dataset / 'train.csv'}, {dataset / 'pairs.jsonl'}]",
                                  f"data.report_dir={tmp_path / 'report'}"])
    names = [n for b in make_pipeline(cfg, "eval", 0, 1, with_names=True) for n in b["name"]]
    assert sorted(n.split(":")[-1] for n in names) == sorted([*GOOD, "good0.mp4"])
    entries = read_bad_records(tmp_path / "report").entries
    _check_named(entries, dataset)


def test_config_keys_allow_outside_paths_and_stretching(dataset):
    cfg = configlib.load("tiny", [*OVERRIDES, "data.allow_outside_root=true", "data.aspect_mismatch=stretch"])
    triplets, report = sources.read_lists([dataset / "train.csv", dataset / "pairs.jsonl"], cfg.data.video_roots,
                                          cfg.data.allow_outside_root)
    assert not report.entries and len(triplets) == 11
    loaded = {t.name: sources.try_load_clip(t, cfg.data, report, seed=None) for t in triplets}
    usable = sorted(name for name, clip in loaded.items() if clip is not None)
    assert usable == sorted([f"train.csv:{n}:{g}" for n, g in zip((2, 6, 9), GOOD)] + [
        "train.csv:5:outside.mp4", "train.csv:8:wide.mp4", "pairs.jsonl:1:good0.mp4", "pairs.jsonl:2:outside.mp4",
        "pairs.jsonl:3:good1.mp4"])
    assert loaded["train.csv:8:wide.mp4"].target.shape == (5, 32, 48, 3)  # stretched to the source's size
    # /etc/passwd is read (allowed) and named as what it is (../../etc/passwd does not reach it from data/source);
    # the long name stays a bad row.
    assert {e["sample"]: e["reason"] for e in report.entries} == {
        "train.csv:3:passwd": "missing file", "train.csv:4:passwd": "unreadable container",
        f"train.csv:7:{LONG_NAME}": "file name too long"}


def test_filter_kept_list_declares_its_root(dataset, tmp_path):
    from insvie_jax.data import filters

    rows = [{"keep": 1, "source": str(dataset / "source" / g), "target": str(dataset / "edit" / g),
             "instruction": "x"} for g in GOOD]
    filters.write_kept(rows, tmp_path / "kept.jsonl")  # elsewhere than the data: its first line says where
    triplets, report = sources.read_lists([tmp_path / "kept.jsonl"], [])
    assert len(triplets) == len(GOOD) and not report.entries
