"""`insvie-jax eval` end to end on generated clips: InsViE CSVs, edit-command output folders, an eval CSV with
targets, CLIP scores from a tiny random CLIP folder, a judge, and bad input."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from _data_clips import moving_texture

from insvie_jax import cli
from insvie_jax.data import synthetic_videos
from insvie_jax.data.video import resize_crop, write_video
from insvie_jax.sample import edit as editlib


def _rows(folder):
    with open(folder / "per_clip.csv", newline="") as f:
        return list(csv.DictReader(f))


def _summary(folder):
    return json.loads((folder / "summary.json").read_text())


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    """4 moving-shape triplets (InsViE layout: source/, edit/, triplets.csv), 9 frames of 48 x 64."""
    folder = tmp_path_factory.mktemp("shapes")
    return synthetic_videos.write_triplets(folder, 4, 9, 48, 64, 8)


def _edit_outputs(triplets, out, frames_of):
    """Edit-command output folders (edit.mp4 + meta.json, written by the edit command's own writer) for each
    triplet: 5 of its frames, resized to cover 32 x 32 and centre-cropped as the edit command does."""
    with open(triplets, newline="") as f:
        rows = list(csv.reader(f))[1:]
    for name, _, instruction, *_ in rows:
        source = synthetic_videos.triplet(0, int(name[:5]), 9, 48, 64)[0]
        frames = np.stack([resize_crop(f, 32, 32) for f in frames_of(int(name[:5]))[:5]])
        meta = {"video": str(triplets.parent / "source" / name), "instruction": instruction}
        result = editlib.EditResult(out / editlib.output_name(name, instruction), frames,
                                    np.stack([resize_crop(f, 32, 32) for f in source[:5]]), meta)
        editlib.write(result, 8)
    return rows


def test_insvie_csv_of_a_dataset(triplets, tmp_path):
    assert cli.main(["eval", "--csv", str(triplets), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    rows, summary = _rows(tmp_path / "out"), _summary(tmp_path / "out")
    assert len(rows) == 4 and summary["measured"] == 4 and not summary["failed"]
    for row in rows:  # the dataset's edits change one shape or the background: kept in part, consistent in time
        assert 8 < float(row["psnr_source"]) < 35 and 0.5 < float(row["ssim_source"]) < 1
        assert float(row["warp_error"]) < 0.02 and row["frames"] == "9"
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| psnr_source |" in md and "4 of 4 clips measured" in md


def test_edit_folders_are_aligned_to_the_source(triplets, tmp_path):
    """Identity "edits" at the edit command's size and frame count: near-perfect once aligned to the source."""
    edits = tmp_path / "edits"
    _edit_outputs(triplets, edits, lambda i: synthetic_videos.triplet(0, i, 9, 48, 64)[0])
    assert cli.main(["eval", "--edits", str(edits), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    rows = _rows(tmp_path / "out")
    assert len(rows) == 4
    for row in rows:
        assert (row["frames"], row["height"], row["width"]) == ("5", "32", "32")
        assert float(row["psnr_source"]) > 27 and float(row["ssim_source"]) > 0.9  # misaligned by a frame: 19-25 dB


def test_insvie_csv_with_edit_outputs_uses_the_dataset_edit_as_target(triplets, tmp_path):
    edits = tmp_path / "edits"
    _edit_outputs(triplets, edits, lambda i: synthetic_videos.triplet(0, i, 9, 48, 64)[1])  # "edits" = targets
    assert cli.main(["eval", "--csv", str(triplets), "--edits", str(edits), "--out", str(tmp_path / "o"),
                     "--quiet"]) == 0
    for row in _rows(tmp_path / "o"):
        assert row["target"].endswith(row["name"].rsplit(":", 1)[1])
        assert float(row["psnr_target"]) > 27 > float(row["psnr_source"])
        assert float(row["ssim_target"]) > float(row["ssim_source"])


def test_eval_csv_with_targets_clip_scores_and_judge(tmp_path):
    pytest.importorskip("transformers")
    from _clip_model import write_tiny_clip

    write_tiny_clip(tmp_path / "clip")
    source = moving_texture(5, 32, 48, speed=1)
    still = np.repeat(source[:1], 5, axis=0)
    for name, video in (("src.mp4", source), ("same.mp4", source), ("still.mp4", still)):
        write_video(tmp_path / name, video, 8)
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["source", "edit", "instruction", "target", "source_caption", "edited_caption"])
        writer.writerow(["src.mp4", "same.mp4", "keep it", "same.mp4", "a texture", "a red texture"])
        writer.writerow(["src.mp4", "still.mp4", "stop it", "", "", ""])
        writer.writerow(["src.mp4", "missing.mp4", "lost", "", "", ""])
    code = cli.main(["eval", "--csv", str(tmp_path / "list.csv"), "--out", str(tmp_path / "out"), "--clip",
                     str(tmp_path / "clip"), "--judge", "_data_clips:judge_by_instruction", "--quiet"])
    assert code == 1  # one clip could not be measured
    same, still_row, missing = _rows(tmp_path / "out")
    assert float(same["psnr_target"]) == math.inf and float(same["ssim_target"]) == pytest.approx(1)
    assert -1 <= float(same["clip_text"]) <= 1 and -1 <= float(same["clip_direction"]) <= 1
    assert float(still_row["clip_frame"]) == pytest.approx(1, abs=1e-5)  # a still video: identical frames
    assert float(same["clip_frame"]) < float(still_row["clip_frame"])
    assert still_row["clip_direction"] == "" and still_row["psnr_target"] == ""  # no captions, no target
    assert same["judge_score"] == "0.1"
    assert "missing file" in missing["error"] and missing["psnr_source"] == ""
    summary = _summary(tmp_path / "out")
    assert summary["measured"] == 2 and summary["counts"]["clip_direction"] == 1 and summary["failed"] == ["list.csv:4"]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert cli.main(["eval", "--out", str(tmp_path)]) == 2
    assert "pass --csv" in capsys.readouterr().err
    assert cli.main(["eval", "--csv", str(tmp_path / "nope.csv"), "--out", str(tmp_path)]) == 2
    assert "eval list not found" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("a\n1\n")
    assert cli.main(["eval", "--csv", str(tmp_path / "bad.csv"), "--out", str(tmp_path)]) == 2
    assert "expected an eval CSV" in capsys.readouterr().err
    assert cli.main(["eval", "--edits", str(tmp_path), "--out", str(tmp_path)]) == 2
    assert "no edits in" in capsys.readouterr().err


def test_pair_csv_and_two_column_batch_file(triplets, tmp_path):
    """The data lists' pair CSV reads as a dataset (its target column is what is measured); the edit command's
    2-column batch file (video, instruction) with --edits measures the edit outputs against the dataset's edits."""
    folder = triplets.parent
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([["source", "target", "instruction"],
                                 [folder / "source/00000.mp4", folder / "edit/00000.mp4", "anything"]])
    assert cli.main(["eval", "--csv", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "a"), "--quiet"]) == 0
    (row,) = _rows(tmp_path / "a")
    assert row["edit"].endswith("edit/00000.mp4") and row["target"] == "" and float(row["psnr_source"]) < 35

    edits = tmp_path / "edits"
    rows = _edit_outputs(triplets, edits, lambda i: synthetic_videos.triplet(0, i, 9, 48, 64)[1])
    (folder / "batch.csv").write_text("video,instruction\n" + "".join(f"{r[0]},{r[2]}\n" for r in rows))
    assert cli.main(["eval", "--csv", str(folder / "batch.csv"), "--edits", str(edits), "--out", str(tmp_path / "b"),
                     "--quiet"]) == 0
    measured = _rows(tmp_path / "b")
    assert len(measured) == 4 and all(float(r["psnr_target"]) > 27 for r in measured)
