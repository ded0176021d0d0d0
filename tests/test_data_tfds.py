"""The TFDS builder: `tfds.data_source` serves video triplets and image pairs equal to the decoded lists."""

import json

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from _data_clips import write_image_pair, write_insvie_csv, write_pair  # noqa: E402

from insvie_jax import config as configlib  # noqa: E402
from insvie_jax.data import sources  # noqa: E402
from insvie_jax.data.tfds_builder import InsvieEdit  # noqa: E402


def test_data_source_serves_video_triplets_and_image_pairs(tmp_path):
    write_pair(tmp_path, "a.mp4", num_frames=9, seed=1)
    write_pair(tmp_path, "b.mp4", num_frames=11, seed=2)
    write_insvie_csv(tmp_path / "train.csv", ["a.mp4", "b.mp4", "missing.mp4"], ["make a", "make b", "gone"])
    write_image_pair(tmp_path / "img", "p")
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"source": "img/p_src.png", "target": "img/p_edit.png", "instruction": "invert the left"}) + "\n")
    cfg = configlib.load("tiny", ["data.num_frames=5", "data.height=32", "data.width=48"]).data
    lists = [tmp_path / "train.csv", tmp_path / "pairs.jsonl"]

    builder = InsvieEdit(lists=lists, data_cfg=cfg, data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare()
    served = tfds.data_source("insvie_edit", data_dir=str(tmp_path / "tfds"))["train"]

    triplets, _ = sources.read_lists(lists, cfg.video_roots)
    by_name = {t.name: t for t in triplets}
    examples = [served[i] for i in range(len(served))]
    assert len(examples) == 3  # two clips and one image pair; the missing clip is skipped
    for example in examples:
        name = example["name"].decode()
        clip = sources.load_clip(by_name[name], cfg, seed=None)
        np.testing.assert_array_equal(example["source"], clip.source)
        np.testing.assert_array_equal(example["target"], clip.target)
        assert example["instruction"].decode() == by_name[name].instruction
    shapes = sorted(e["source"].shape for e in examples)
    assert shapes == [(1, 32, 48, 3), (5, 32, 48, 3), (5, 32, 48, 3)]
    bad = json.loads((tmp_path / "tfds" / "insvie_edit" / "1.0.0" / "bad_samples.json").read_text())
    assert bad["count"] == 1 and "missing.mp4" in json.dumps(bad)
