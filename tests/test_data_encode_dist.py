"""`insvie-jax encode` over several devices and processes writes what one device writes: one process of 8
devices, and two processes of 4 (launch/local.sh), against one device; records compared by sample name."""

import json
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest
from _data_clips import write_image_pair, write_insvie_csv, write_pair

from insvie_jax import config as configlib
from insvie_jax.data import records
from insvie_jax.data.encode import encode_lists

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["data.height=32", "data.width=48", "data.shard_size=2"]
ARRAYS = ("source_mean", "source_std", "target_mean", "target_std", "text")
# Every triplet is computed alone on one device, in a program of the same shapes whatever the device count:
# within one process the stored values agree bit for bit. Processes started with another simulated CPU device
# count (XLA_FLAGS) compile the same program to slightly different code: float32 outputs differ by up to
# ~1e-6 (measured 9.1e-7 absolute, 7e-7 relative), so an occasional bfloat16 value lands one rounding step away.
MAX_ABS_DIFF = 0.0
BF16_STEP = 2.0**-7  # relative spacing of bfloat16 values (8 significant bits), at most
F32_ATOL = 2e-6  # near zero, where a bfloat16 step is smaller than the float32 difference


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    names = [f"v{i}.mp4" for i in range(5)]
    for i, name in enumerate(names):
        write_pair(root, name, num_frames=9, height=32, width=48, seed=i)
    write_insvie_csv(root / "train.csv", names[:3] + ["missing.mp4"] + names[3:])
    write_image_pair(root / "img", "p0", seed=9)
    (root / "pairs.jsonl").write_text(
        json.dumps({"source": "img/p0_src.png", "target": "img/p0_edit.png", "instruction": "negate the left"})
        + "\n{not json\n")
    return [root / "train.csv", root / "pairs.jsonl"]  # 7 triplets: 4 units of 2 (the last of 1)


@pytest.fixture(scope="module")
def one_device(lists, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "enc"
    manifest = encode_lists(configlib.load("tiny", OVERRIDES), lists, out, show_progress=False,
                            devices=jax.devices()[:1])
    return out, manifest


def _records(out: Path) -> dict:
    manifest = records.read_manifest(out)
    stored = {}
    for entry in manifest["buckets"].values():
        for file in entry["files"]:
            for raw in records.read_all(out / file):
                record = records.unpack(raw)
                stored[record["name"]] = record
    return stored


def _max_abs_diff(got: dict, want: dict) -> float:
    assert sorted(got) == sorted(want)
    diff = 0.0
    for name, record in want.items():
        assert got[name]["instruction"] == record["instruction"]
        for key in ARRAYS:
            assert got[name][key].dtype == record[key].dtype and got[name][key].shape == record[key].shape
            a, b = (np.asarray(r[key], np.float32) for r in (got[name], record))
            diff = max(diff, float(np.abs(a - b).max()))
    return diff


def _within_one_bf16_step(got: dict, want: dict) -> bool:
    assert sorted(got) == sorted(want)
    for name, record in want.items():
        for key in ARRAYS:
            a, b = (np.asarray(r[key], np.float32) for r in (got[name], record))
            if not np.all(np.abs(a - b) <= BF16_STEP * np.maximum(np.abs(a), np.abs(b)) + F32_ATOL):
                return False
    return True


def _same_manifest(got: dict, want: dict) -> None:
    for key in ("count", "buckets", "bad", "config_hash"):
        assert got[key] == want[key], key


def test_eight_devices_write_what_one_device_writes(lists, one_device, tmp_path):
    want_out, want = one_device
    assert len(jax.devices()) == 8 and want["count"] == 6 and want["bad"]["count"] == 2
    assert {k: v["count"] for k, v in want["buckets"].items()} == {"3x4x6": 5, "1x4x6": 1}
    got = encode_lists(configlib.load("tiny", OVERRIDES), lists, tmp_path / "enc", show_progress=False)
    _same_manifest(got, want)
    assert _max_abs_diff(_records(tmp_path / "enc"), _records(want_out)) <= MAX_ABS_DIFF
    # Records are written in list order whatever the batch: the shards are the same files.
    for file in sorted(p.name for p in want_out.glob("*.array_record")):
        assert (tmp_path / "enc" / file).read_bytes() == (want_out / file).read_bytes(), file


def test_two_processes_of_four_devices_write_what_one_process_writes(lists, one_device, env, tmp_path):
    want_out, want = one_device
    out = tmp_path / "enc"
    env = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_DEFAULT_MATMUL_PRECISION="highest")

    def launch(num_processes):
        run = subprocess.run(["bash", str(ROOT / "launch" / "local.sh"), str(num_processes), "encode", "tiny",
                              *OVERRIDES, "--list", str(lists[0]), "--list", str(lists[1]), "--out", str(out),
                              "--quiet"], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
        assert run.returncode == 0, run.stderr[-3000:]
        assert run.stdout.count('"count": 6') == num_processes  # every process returns the merged manifest

    launch(2)
    _same_manifest(records.read_manifest(out), want)
    owners = {u: json.loads((out / f"part-{u:05d}.done.json").read_text())["process"] for u in range(4)}
    assert owners == {0: 0, 1: 1, 2: 0, 3: 1}
    assert _within_one_bf16_step(_records(out), _records(want_out))

    # A crash lost units 1 (process 1's) and 2 (process 0's); one process of 4 devices resumes: it redoes
    # exactly those two, byte for byte as the two processes wrote them.
    lost = {}
    for unit in (1, 2):
        (out / f"part-{unit:05d}.done.json").unlink()
        for shard in out.glob(f"part-{unit:05d}-*.array_record"):
            lost[shard.name] = shard.read_bytes()
            shard.rename(shard.with_name(shard.name + ".tmp"))
    (out / records.MANIFEST).unlink()
    kept = (out / "part-00000-3x4x6.array_record").stat().st_mtime_ns
    launch(1)
    assert (out / "part-00000-3x4x6.array_record").stat().st_mtime_ns == kept
    assert sorted(lost) == ["part-00001-3x4x6.array_record", "part-00002-3x4x6.array_record"]
    for name, data in lost.items():
        assert (out / name).read_bytes() == data, name
    assert not list(out.glob("*.tmp"))
    _same_manifest(records.read_manifest(out), want)
