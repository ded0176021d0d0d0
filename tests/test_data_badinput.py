"""Fuzzed bad input: 200+ broken samples mixed into good ones. `encode` (CLI), `filter` and both pipeline
sources run to the end, name every bad sample in their reports, and lose no good sample."""

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _data_clips import write_audio_only, write_image_pair, write_pair

from insvie_jax import config as configlib
from insvie_jax.data import filters, records
from insvie_jax.data.pipeline import make_pipeline, read_bad_records
from insvie_jax.data.sources import read_lists

KINDS = ("truncated", "zero", "random", "audio", "single", "mismatch", "missing", "row")
PER_KIND = 26  # 8 kinds x 26 = 208 broken samples
OVERRIDES = ["data.height=32", "data.width=48", "data.fps=8.0", "data.shard_size=64", "filter.frames=9"]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    good = [f"good{i}.mp4" for i in range(6)]
    for i, name in enumerate(good):
        write_pair(root, name, num_frames=9, height=32, width=48, seed=i)
    write_pair(root, "template_single.mp4", num_frames=1, height=32, width=48)
    write_pair(root, "template_mismatch.mp4", num_frames=9, edit_frames=13, height=32, width=48)
    write_audio_only(root / "audio_template.mp4")
    rows, broken = [[name, "c", f"edit {name}", "c", "edit"] for name in good], []
    for kind in KINDS:
        for k in range(PER_KIND):
            name = f"{kind}{k}.mp4"
            for folder in ("source", "edit"):
                template = (root / folder / good[k % len(good)]).read_bytes()
                target = root / folder / name
                if kind == "truncated":
                    target.write_bytes(template[: int(len(template) * rng.uniform(0.1, 0.9))])
                elif kind == "zero":
                    target.write_bytes(b"")
                elif kind == "random":
                    target.write_bytes(rng.bytes(int(rng.integers(1, 4000))))
                elif kind == "audio":
                    shutil.copy(root / "audio_template.mp4", target)
                elif kind in ("single", "mismatch"):
                    shutil.copy(root / folder / f"template_{kind}.mp4", target)
            rows.append(['"broken' if kind == "row" else name, "c", f"edit {name}", "c", "edit"])
            broken.append(name)
    order = rng.permutation(len(rows))
    with open(root / "train.csv", "w", newline="") as f:
        f.write("video,caption,instruction,edited_caption,edit_folder\n")
        writer = csv.writer(f)
        for i in order:
            if rows[i][0] == '"broken':
                f.write('"broken, "unterminated\x00\n')  # one unreadable row per "row" sample
                f.write("short\n")
            else:
                writer.writerow(rows[i])
    write_image_pair(root / "img", "p", seed=3)
    (root / "pairs.jsonl").write_text(json.dumps({"source": "img/p_src.png", "target": "img/p_edit.png",
                                                  "instruction": "invert"}) + "\n{broken json\n")
    return root, good


def test_encode_names_every_bad_sample_and_keeps_every_good_one(fuzzed, tmp_path):
    root, good = fuzzed
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "encode", "tiny", *OVERRIDES, "--list",
                          str(root / "train.csv"), "--list", str(root / "pairs.jsonl"), "--out", str(tmp_path / "enc"),
                          "--quiet"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    manifest = records.read_manifest(tmp_path / "enc")
    assert summary["count"] == manifest["count"] == len(good) + 1
    bad = manifest["bad"]
    named = {e["sample"].split(":")[-1] for e in bad["samples"]}
    for kind in set(KINDS) - {"row"}:
        assert {f"{kind}{k}.mp4" for k in range(PER_KIND)} <= named, kind
    unreadable_rows = [e for e in bad["samples"] if e["reason"].startswith(("unreadable CSV row", "unreadable JSONL"))]
    assert len(unreadable_rows) >= PER_KIND + 1
    assert bad["count"] >= 7 * PER_KIND + PER_KIND + 1 and summary["bad"] == bad["count"]
    assert bad["by_reason"]["missing file"] == PER_KIND

    # A corrupted shard: NaN in some records, one record of garbage bytes. The pipeline skips and names them.
    bucket = manifest["buckets"]["3x4x6"]
    record = records.unpack(records.read_all(tmp_path / "enc" / bucket["files"][0])[0])
    writer = records.writer(tmp_path / "enc" / "corrupt-3x4x6.array_record")
    for i in range(3):
        broken = dict(record, name=f"nan{i}", text=record["text"].copy())
        broken["text"][i, 0] = np.nan
        writer.write(records.pack(broken))
    writer.write(b"garbage")
    writer.close()
    bucket["files"].append("corrupt-3x4x6.array_record")
    bucket["count"] += 4
    manifest["count"] += 4
    (tmp_path / "enc" / "manifest.json").write_text(json.dumps(manifest))
    cfg = configlib.load("tiny", [*OVERRIDES, "data.source=arrayrecord", f"data.paths=[{tmp_path / 'enc'}]",
                                  "data.batch_size=2", f"data.report_dir={tmp_path / 'report'}"])
    names = [n for b in make_pipeline(cfg, "eval", 0, 1, with_names=True) for n in b["name"]]
    assert sorted(n.split(":")[-1] for n in names) == sorted(good + ["p_src.png"])
    assert {e["sample"] for e in read_bad_records(tmp_path / "report").entries} >= {"nan0", "nan1", "nan2"}
    assert read_bad_records(tmp_path / "report").counts()["non-finite values in 'text'"] == 3


def test_filter_runs_to_the_end_and_names_every_bad_sample(fuzzed):
    root, good = fuzzed
    cfg = configlib.load("tiny", OVERRIDES)
    triplets, report = read_lists([root / "train.csv", root / "pairs.jsonl"], cfg.data.video_roots)
    rows = filters.filter_triplets(cfg, triplets, report)
    by_name = {r["sample"].split(":")[-1]: r for r in rows}
    for name in good:
        assert by_name[name]["motion"] is not None  # scored, not dropped
    for kind in set(KINDS) - {"row"}:
        for k in range(PER_KIND):
            row = by_name[f"{kind}{k}.mp4"]
            assert row["keep"] == 0 and row["reasons"], row
    assert sum(r["reasons"].startswith("unreadable") for r in rows) >= PER_KIND + 1


def test_video_pipeline_skips_and_names_bad_clips(fuzzed, tmp_path):
    root, good = fuzzed
    cfg = configlib.load("tiny", [*OVERRIDES, "data.source=video", f"data.paths=[{root / 'train.csv'}]",
                                  "data.batch_size=3", f"data.report_dir={tmp_path / 'report'}"])
    batches = list(make_pipeline(cfg, "eval", 0, 1, with_names=True))
    assert sorted(n.split(":")[-1] for b in batches for n in b["name"]) == sorted(good)
    assert batches[0]["source"].shape == (3, 3, 4, 6, 16) and batches[0]["text"].shape == (3, 8, 32)
    assert np.isfinite(batches[0]["target"]).all()
    named = {e["sample"].split(":")[-1] for e in read_bad_records(tmp_path / "report").entries}
    assert {f"{kind}{k}.mp4" for kind in set(KINDS) - {"row"} for k in range(PER_KIND)} <= named
