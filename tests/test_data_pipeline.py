"""grain pipeline over ArrayRecord shards: determinism, exact resume (threads and a worker process), host
shards, mixture weights, buckets, posterior draws, bad records named; the synthetic source's interface."""

import dataclasses
import json

import numpy as np
import pytest

from insvie_jax import config as configlib
from insvie_jax.data import records
from insvie_jax.data.pipeline import make_pipeline, read_bad_records

TEXT = (8, 32)


def cfg_for(paths, **data):
    cfg = configlib.load("tiny")
    return dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, source="arrayrecord", paths=[str(p) for p in paths], batch_size=2, **data))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    a = root / "a"
    records.write_synthetic(a, {(3, 4, 6): 10, (1, 4, 6): 6}, TEXT, shard_size=4, prefix="a/")
    b = root / "b"
    records.write_synthetic(b, {(3, 4, 6): 8}, TEXT, shard_size=8, seed=1, prefix="b/")
    return a, b


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for x, y in zip(batches_a, batches_b):
        assert x["name"] == y["name"]
        for key in ("source", "target", "text"):
            np.testing.assert_array_equal(x[key], y[key])


def test_batches_have_the_synthetic_layout_and_a_fresh_posterior_each_epoch(folders):
    cfg = cfg_for([folders[0]], seed=3)
    it = make_pipeline(cfg, "train", 0, 1, with_names=True)
    draws = {}
    for batch in take(it, 40):
        f = batch["source"].shape[1]
        assert batch["source"].shape == batch["target"].shape == (2, f, 4, 6, 16) and f in (1, 3)
        assert batch["text"].shape == (2, *TEXT) and batch["source"].dtype == np.float32
        for name, source in zip(batch["name"], batch["source"]):
            draws.setdefault(name, []).append(source)
    raw = {}
    for file in json.loads((folders[0] / "manifest.json").read_text())["buckets"]["3x4x6"]["files"]:
        for rec in map(records.unpack, records.read_all(folders[0] / file)):
            raw[rec["name"]] = rec
    name = "a/3x4x6/5"
    assert len(draws[name]) >= 2, "40 batches cover every record more than once"
    mean, std = raw[name]["source_mean"].astype(np.float32), raw[name]["source_std"].astype(np.float32)
    noise = [(d / cfg.vae.scaling_factor - mean) / std for d in draws[name]]
    assert abs(np.mean(noise[0])) < 0.1 and abs(np.std(noise[0]) - 1) < 0.1  # N(0, 1) noise, scaled latents
    assert np.abs(noise[0] - noise[1]).mean() > 0.5  # a new draw in the next epoch


def test_same_seed_same_batches_and_state_restores_the_exact_next_batch(folders):
    cfg = cfg_for(folders, weights=[1, 1])
    first = make_pipeline(cfg, "train", 0, 1, with_names=True)
    take(first, 7)
    state = first.get_state()
    json.dumps(state)  # checkpointable as JSON
    after = take(first, 6)
    assert_same(after, take(make_pipeline(cfg, "train", 0, 1, with_names=True), 13)[7:])
    resumed = make_pipeline(cfg, "train", 0, 1, with_names=True)
    resumed.set_state(state)
    assert_same(after, take(resumed, 6))
    other = take(make_pipeline(cfg_for(folders, weights=[1, 1], seed=1), "train", 0, 1, with_names=True), 6)
    assert [b["name"] for b in other] != [b["name"] for b in after]


def test_state_restores_with_worker_processes(folders):
    # The batch order depends on the number of workers (grain gives each its slice): a resumed run keeps it.
    cfg = cfg_for([folders[0]], num_workers=2)
    first = make_pipeline(cfg, "train", 0, 1, with_names=True)
    take(first, 5)
    state = first.get_state()
    after = take(first, 4)
    resumed = make_pipeline(cfg, "train", 0, 1, with_names=True)
    resumed.set_state(state)
    assert_same(after, take(resumed, 4))
    for it in (first, resumed):
        it.close()


def test_hosts_get_disjoint_shards_and_eval_reads_everything_once(folders):
    cfg = cfg_for(folders)
    seen = []
    for host in range(2):
        batches = list(make_pipeline(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=4)),
                                     "eval", host, 2, with_names=True))
        assert all(len(b["name"]) <= 2 for b in batches)  # 4 global = 2 per host
        seen.append([n for b in batches for n in b["name"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted([f"a/3x4x6/{i}" for i in range(10)] + [f"a/1x4x6/{i}" for i in range(6)]
                                               + [f"b/3x4x6/{i}" for i in range(8)])


def test_mixture_weights_and_buckets(folders):
    cfg = cfg_for(folders, weights=[1, 3])
    batches = take(make_pipeline(cfg, "train", 0, 1, with_names=True), 200)
    from_b = sum(b["name"][0].startswith("b/") for b in batches) / len(batches)
    assert abs(from_b - 0.75) < 0.05, from_b
    for b in batches:
        assert len({n.split("/")[1] for n in b["name"]}) == 1  # one bucket per batch
    short = sum(b["source"].shape[1] == 1 for b in batches if b["name"][0].startswith("a/"))
    share = short / sum(b["name"][0].startswith("a/") for b in batches)
    assert abs(share - 6 / 16) < 0.12, share  # buckets of a folder in proportion to their sizes


def test_bad_records_are_skipped_and_named(tmp_path, folders):
    good = records.unpack(records.read_all(folders[1] / "part-00000-3x4x6.array_record")[0])
    out = records.writer(tmp_path / "part-00000-3x4x6.array_record")
    for i in range(6):
        record = dict(good, name=f"r{i}", source_mean=good["source_mean"].copy())
        if i in (1, 4):
            record["source_mean"][0, 0, 0, 0] = np.nan
        out.write(records.pack(record) if i != 2 else b"\x00garbage")
    out.close()
    manifest = json.loads((folders[1] / "manifest.json").read_text())
    manifest["count"] = manifest["buckets"]["3x4x6"]["count"] = 6
    manifest["buckets"]["3x4x6"]["files"] = ["part-00000-3x4x6.array_record"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    cfg = cfg_for([tmp_path], report_dir=str(tmp_path / "report"))
    names = [n for b in make_pipeline(cfg, "eval", 0, 1, with_names=True) for n in b["name"]]
    assert names == ["r0", "r3", "r5"]
    bad = read_bad_records(tmp_path / "report")
    assert sorted(e["sample"] for e in bad.entries) == sorted(["r1", "r4", f"{tmp_path.name}/3x4x6:<undecodable record>"])
    assert bad.counts()["non-finite values in 'source_mean'"] == 2
    batches = take(make_pipeline(cfg, "train", 0, 1, with_names=True), 6)
    assert {n for b in batches for n in b["name"]} == {"r0", "r3", "r5"}


def test_synthetic_source_has_the_same_interface():
    cfg = configlib.load("tiny")
    it = make_pipeline(cfg, "train", 1, 2)
    take(it, 2)
    state = it.get_state()
    after = next(it)
    assert after["source"].shape[0] == cfg.data.batch_size // 2
    fresh = make_pipeline(cfg, "train", 1, 2)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["target"], after["target"])


def test_wrong_text_shape_is_a_clear_error(folders):
    cfg = cfg_for([folders[0]])
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_embed_dim=64))
    with pytest.raises(ValueError, match="model.text_embed_dim"):
        make_pipeline(cfg, "train", 0, 1)
