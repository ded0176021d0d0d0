"""`insvie-jax encode`: tiny random VAE/T5 posteriors and embeddings into ArrayRecord shards, resumable."""

import json

import jax.numpy as jnp
import numpy as np
from _data_clips import write_image_pair, write_insvie_csv, write_pair

from insvie_jax import config as configlib
from insvie_jax.data import records
from insvie_jax.convert.models import HashTokenizer
from insvie_jax.data.encode import encode_lists
from insvie_jax.data.sources import load_clip, read_list, BadSamples, to_unit_range
from insvie_jax.models import t5
from insvie_jax.models import vae as vae_model

TOL = 1e-2  # bfloat16 storage of float32 encoder outputs: relative error ~2^-8


def _rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tiny_cfg(*overrides):
    return configlib.load("tiny", ["data.height=32", "data.width=48", "data.shard_size=3", *overrides])


def make_dataset(root, num_videos=5):
    names = [f"v{i}.mp4" for i in range(num_videos)]
    for i, name in enumerate(names):
        write_pair(root, name, num_frames=9 + 4 * (i % 2), height=32, width=48, seed=i)
    write_insvie_csv(root / "train.csv", names + ["missing.mp4"])
    write_image_pair(root / "img", "p0", seed=9)
    (root / "pairs.jsonl").write_text(
        json.dumps({"source": "img/p0_src.png", "target": "img/p0_edit.png", "instruction": "negate the left"})
        + "\n{not json\n")
    return [root / "train.csv", root / "pairs.jsonl"]


def test_encode_writes_buckets_posteriors_text_and_manifest(tmp_path):
    lists = make_dataset(tmp_path)
    cfg = tiny_cfg()
    manifest = encode_lists(cfg, lists, tmp_path / "enc", show_progress=False)
    assert manifest["count"] == 6
    assert {k: v["count"] for k, v in manifest["buckets"].items()} == {"3x4x6": 5, "1x4x6": 1}
    assert manifest["buckets"]["3x4x6"]["latent_shape"] == [3, 4, 6, 16]
    reasons = {e["sample"]: e["reason"] for e in manifest["bad"]["samples"]}
    assert reasons == {"train.csv:7:missing.mp4": "missing file", "pairs.jsonl:2": reasons["pairs.jsonl:2"]}
    assert reasons["pairs.jsonl:2"].startswith("unreadable JSONL row")
    assert json.loads((tmp_path / "enc" / "manifest.json").read_text())["config_hash"] == manifest["config_hash"]

    stored = {}
    for key, entry in manifest["buckets"].items():
        for file in entry["files"]:
            for raw in records.read_all(tmp_path / "enc" / file):
                record = records.unpack(raw)
                assert records.check_record(record) is None
                assert record["source_mean"].dtype == jnp.bfloat16 and record["text"].shape == (8, 32)
                stored[record["name"]] = record
    assert len(stored) == 6
    # The stored arrays are the config's seeded random models applied to the clip as load_clip decodes it.
    report = BadSamples()
    triplet = read_list(lists[0], cfg.data.video_roots, report)[1]
    clip = load_clip(triplet, cfg.data, seed=cfg.data.seed)
    posterior = vae_model.build(cfg.vae, seed=cfg.data.seed).encode(jnp.asarray(to_unit_range(clip.target))[None])
    record = stored[triplet.name]
    assert _rel(record["target_mean"], posterior.mean[0]) < TOL and _rel(record["target_std"], posterior.std[0]) < TOL
    assert _rel(record["target_mean"], record["source_mean"]) > 0.05  # the edit shows in the latents
    ids, _ = t5.tokenize(HashTokenizer(cfg.text_encoder.vocab_size), [triplet.instruction], 8)
    text = t5.build(cfg.text_encoder, seed=cfg.data.seed)(ids)[0]
    assert _rel(record["text"], text) < TOL and record["instruction"] == triplet.instruction


def test_encode_resumes_after_a_crash_and_refuses_a_different_config(tmp_path):
    lists = make_dataset(tmp_path)
    out = tmp_path / "enc"
    first = encode_lists(tiny_cfg(), lists, out, show_progress=False)
    assert first["encoded_units"] == [0, 1, 2]
    # A crash inside unit 1: its done marker never written, a half-written shard left behind.
    (out / "part-00001.done.json").unlink()
    for shard in out.glob("part-00001-*.array_record"):
        shard.rename(shard.with_name(shard.name + ".tmp"))
    again = encode_lists(tiny_cfg(), lists, out, show_progress=False)
    assert again["encoded_units"] == [1]
    assert not list(out.glob("*.tmp"))
    for key in ("count", "buckets", "bad", "config_hash"):
        assert again[key] == first[key], key
    try:
        encode_lists(tiny_cfg("data.seed=1"), lists, out, show_progress=False)
    except FileExistsError as err:
        assert "different config" in str(err)
    else:
        raise AssertionError("a different config must not write into the same folder")
