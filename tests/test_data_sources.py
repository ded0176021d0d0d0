"""Triplet lists, InsViE frame sampling, paired crops, image pairs and named bad samples (clips from PyAV); the
video module's frame reading and the edit command's source-clip selection (4k+1 frames, cover resize, crop)."""

import json

import numpy as np
import pytest
from _data_clips import moving_texture, write_audio_only, write_image_pair, write_insvie_csv, write_pair

from insvie_jax.config import DataConfig
from insvie_jax.data import sources, video


def _data_cfg(**kw):
    return DataConfig(**{"num_frames": 9, "height": 16, "width": 32, "fps": 8.0, **kw})


@pytest.mark.parametrize(
    "num_raw, fps, expect",
    [
        # 300 frames at 30 fps > 49 frames at 7 fps: a 49/7 s = 210-frame window, stride 210 // 49 = 4.
        (300, 30.0, np.arange(0, 196, 4)),
        # 60 frames at 7 fps (8.6 s = 60 frames at 7 fps > 49): window 49 frames, stride 1.
        (60, 7.0, np.arange(49)),
        # 120 frames at 240 fps (0.5 s -> 3.5 frames at 7 fps) but > 49 raw frames: stride 120 // 49 = 2.
        (120, 240.0, np.arange(0, 98, 2)),
        # 30 frames at 60 fps: the largest 4k+1 = 29 frames, then the last repeated 20 times.
        (30, 60.0, np.r_[np.arange(29), np.full(20, 28)]),
        # 8 frames (a multiple of 4): InsViE's rule gives 5.
        (8, 60.0, np.r_[np.arange(5), np.full(44, 4)]),
    ],
)
def test_frame_sampling_follows_insvie(num_raw, fps, expect):
    got = sources.sample_frame_indices(num_raw, fps, 49, target_fps=7)
    np.testing.assert_array_equal(got, expect)
    unpadded = sources.sample_frame_indices(num_raw, fps, 49, target_fps=7, pad=False)
    assert len(unpadded) % 4 == 1 and len(unpadded) <= 49


def test_insvie_csv_source_and_edit_share_indices_and_crop(tmp_path):
    frames = write_pair(tmp_path, "a.mp4", num_frames=20, height=32, width=48, fps=8)
    write_insvie_csv(tmp_path / "train.csv", ["a.mp4"], ["turn the left side negative"])
    report = sources.BadSamples()
    (triplet,) = sources.read_list(tmp_path / "train.csv", ["source", "edit"], report)
    assert triplet.source == str(tmp_path / "source" / "a.mp4") and triplet.target == str(tmp_path / "edit" / "a.mp4")
    assert triplet.instruction == "turn the left side negative" and not report.entries
    cfg = _data_cfg(fps=4.0)  # 20 frames at 8 fps = 10 frames at 4 fps > 9: window of 18 raw frames, stride 2
    offsets = set()
    for seed in range(6):
        clip = sources.load_clip(triplet, cfg, seed=seed)
        assert clip.source.shape == clip.target.shape == (9, 16, 32, 3)
        # Locate the crop from sample frame 0 (= raw frame 0); then sample frame 1 must be raw frame 2 (stride 2).
        errors = {(y, x): np.abs(clip.source[0].astype(int) - frames[0, y:y + 16, x:x + 32]).mean()
                  for y in range(17) for x in range(17)}
        y, x = min(errors, key=errors.get)
        assert errors[(y, x)] < 12, errors[(y, x)]
        by_frame = [np.abs(clip.source[1].astype(int) - frames[t, y:y + 16, x:x + 32]).mean() for t in range(4)]
        assert np.argmin(by_frame) == 2, by_frame
        offsets.add((y, x))
        # The edit inverted the left third of the full frame; where the crop lies right of it, target = source.
        keep = slice(max(16 - x, 0), None)
        np.testing.assert_allclose(clip.target[:, :, keep].astype(float), clip.source[:, :, keep], atol=40)
        assert np.abs(clip.target[:, :, keep].astype(int) - clip.source[:, :, keep]).mean() < 6
        again = sources.load_clip(triplet, cfg, seed=seed)
        np.testing.assert_array_equal(again.source, clip.source)
    assert len(offsets) > 1, "random crops should differ across seeds"


def test_small_clips_are_resized_to_cover_and_image_pairs_are_single_frames(tmp_path):
    write_pair(tmp_path, "small.mp4", num_frames=5, height=16, width=24)
    write_image_pair(tmp_path / "img", "p")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"source": "img/p_src.png", "target": "img/p_edit.png", "instruction": "invert the left"}) + "\n"
        + json.dumps({"source": "source/small.mp4", "target": "edit/small.mp4", "instruction": "x"}) + "\n")
    report = sources.BadSamples()
    image, small = sources.read_list(tmp_path / "pairs.jsonl", [], report)
    clip = sources.load_clip(image, _data_cfg(height=32, width=48), seed=0)
    assert clip.source.shape == (1, 32, 48, 3)
    expect = moving_texture(1, 32, 48)[0]
    assert np.abs(clip.source[0].astype(int) - expect).mean() < 1  # PNG is lossless, no crop needed
    clip = sources.load_clip(small, _data_cfg(height=32, width=64), seed=0)  # 16x24 -> covers 32x64 as 43x64
    assert clip.source.shape == (9, 32, 64, 3)
    np.testing.assert_array_equal(clip.source[5], clip.source[8])  # 5 raw frames, padded with the last


def test_bad_samples_are_counted_and_named_not_fatal(tmp_path):
    write_pair(tmp_path, "good.mp4", num_frames=9)
    write_pair(tmp_path, "mismatch.mp4", num_frames=9, edit_frames=13)
    write_pair(tmp_path, "single.mp4", num_frames=1)
    for folder in ("source", "edit"):
        good = (tmp_path / folder / "good.mp4").read_bytes()
        (tmp_path / folder / "trunc.mp4").write_bytes(good[: len(good) // 2])
        (tmp_path / folder / "empty.mp4").write_bytes(b"")
        (tmp_path / folder / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(3000))
        write_audio_only(tmp_path / folder / "audio.mp4")
    names = ["good.mp4", "mismatch.mp4", "single.mp4", "trunc.mp4", "empty.mp4", "noise.mp4", "audio.mp4",
             "missing.mp4"]
    write_insvie_csv(tmp_path / "train.csv", names)
    with open(tmp_path / "train.csv", "ab") as f:
        f.write(b'broken.mp4\n"unclosed, quote\xff\xfe\n')
    report = sources.BadSamples()
    triplets = sources.read_list(tmp_path / "train.csv", ["source", "edit"], report)
    clips = [sources.try_load_clip(t, _data_cfg(), report) for t in triplets]
    assert [c.triplet.source.split("/")[-1] for c in clips if c is not None] == ["good.mp4"]
    reasons = {e["sample"].split(":")[-1] if e["sample"].endswith(".mp4") else e["sample"]: e["reason"]
               for e in report.entries}
    assert reasons["mismatch.mp4"].startswith("source/edit frame counts differ (9 vs 13)")
    assert reasons["single.mp4"].startswith("single frame")
    assert reasons["trunc.mp4"] in ("unreadable container", "truncated video", "undecodable video")
    assert reasons["empty.mp4"] == "zero-length file"
    assert reasons["noise.mp4"] == "unreadable container"
    assert reasons["audio.mp4"].startswith("no video stream")
    assert reasons["missing.mp4"] == "missing file"
    assert sum(r.startswith("unreadable CSV row") for r in reasons.values()) == 2, reasons
    assert len(report) == 9 and report.counts()["missing file"] == 1


def test_read_frames_seek_matches_sequential_decode(tmp_path, monkeypatch):
    frames = moving_texture(120, 32, 48)
    video.write_video(tmp_path / "long.mp4", frames, fps=24)
    wanted = [100, 64, 119, 64]
    seeking = video.read_frames(tmp_path / "long.mp4", wanted)
    monkeypatch.setattr(video, "SEEK_MIN_INDEX", 10**9)
    sequential = video.read_frames(tmp_path / "long.mp4", wanted)
    np.testing.assert_array_equal(seeking, sequential)
    assert np.abs(seeking[0].astype(int) - frames[100]).mean() < 12
    assert np.abs(seeking[0].astype(int) - frames[99]).mean() > 2 * np.abs(seeking[0].astype(int) - frames[100]).mean()
    with pytest.raises(video.VideoError, match="truncated video"):
        video.read_frames(tmp_path / "long.mp4", [5, 200])


def test_unknown_roots_for_insvie_csv_is_a_clear_error(tmp_path):
    write_insvie_csv(tmp_path / "t.csv", ["a.mp4"])
    with pytest.raises(ValueError, match="data.video_roots"):
        sources.read_list(tmp_path / "t.csv", ["only_one"], sources.BadSamples())


def test_resolution_buckets_follow_the_clip_aspect_and_short_clips_keep_their_length(tmp_path):
    write_pair(tmp_path, "portrait.mp4", num_frames=7, height=48, width=32)
    write_insvie_csv(tmp_path / "t.csv", ["portrait.mp4"])
    (triplet,) = sources.read_list(tmp_path / "t.csv", ["source", "edit"], sources.BadSamples())
    cfg = _data_cfg(buckets=[[32, 48], [48, 32]], pad_frames=False)
    clip = sources.load_clip(triplet, cfg, seed=0)
    assert clip.source.shape == (5, 48, 32, 3)  # portrait bucket; 7 frames -> largest 4k+1 = 5, unpadded


def test_source_clip_frame_selection_and_cover_crop():
    assert [video.usable_frames(n, 49) for n in (0, 1, 4, 5, 11, 49, 60)] == [0, 1, 1, 5, 9, 49, 49]
    assert video.usable_frames(60, 9) == 9
    assert video.cover_size(80, 112, 64, 96) == (68, 96)  # width binds: 112 -> 96, 80 -> 68.57 -> 68
    assert video.cover_size(1080, 1920, 480, 720) == (480, 853)  # height binds
    frame = np.zeros((80, 112, 3), np.uint8)
    frame[:, 56:] = 255  # right half white: the crop keeps the vertical edge at the centre
    out = video.resize_crop(frame, 64, 96)
    assert out.shape == (64, 96, 3)
    assert out[:, :46].max() == 0 and out[:, 50:].min() == 255
