"""Pre-encoded triplet records: ArrayRecord shards of msgpack'd numpy dicts, plus a manifest.json per folder.

One record (flax.serialization msgpack; arrays keep their dtype, bfloat16 included):
    name, instruction: str
    source_mean, source_std, target_mean, target_std: bfloat16 (f, h, w, C) VAE posterior, *unscaled*
    text: bfloat16 (L, D) T5 output
Shards are `part-<unit>-<f>x<h>x<w>.array_record` (one latent shape per file: the buckets), written by
`insvie_jax.data.encode`; the manifest lists them with counts, shapes, dtypes, the config hash and the
bad-sample report. A folder may be an object-storage URL (gs://): array_record reads gs:// shards itself, and
shards are written locally and uploaded whole.
"""

from __future__ import annotations

import json

import ml_dtypes  # noqa: F401  (bfloat16 arrays round-trip through msgpack)
import numpy as np
from flax import serialization

from insvie_jax import storage

FORMAT = "insvie-jax/arrayrecord-triplets-v1"
MANIFEST = "manifest.json"
LATENT_KEYS = ("source_mean", "source_std", "target_mean", "target_std")
# ArrayRecord groups of one record: random access (grain's shuffling) reads exactly one record.
WRITER_OPTIONS = "group_size:1,uncompressed"


def pack(record: dict) -> bytes:
    return serialization.msgpack_serialize(record)


def unpack(data: bytes) -> dict:
    return serialization.msgpack_restore(data)


def bucket_key(latent_shape) -> str:
    """'13x60x90' for latents (13, 60, 90, C)."""
    return "x".join(str(int(n)) for n in latent_shape[:3])


def writer(path: str):
    """An ArrayRecord writer of local file `path` (storage.local_file gives one for a URL)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    return ArrayRecordWriter(str(path), WRITER_OPTIONS)


def read_all(path) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return reader.read_all()
    finally:
        reader.close()


def read_manifest(folder) -> dict:
    path = storage.path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a folder written by `insvie-jax encode` "
                                "(or the encode did not finish; run it again to resume)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, this reader wants {FORMAT!r}")
    return manifest


def check_record(record: dict) -> str | None:
    """Why a decoded record cannot be trained on, or None when it can."""
    for key in (*LATENT_KEYS, "text"):
        value = record.get(key)
        if not isinstance(value, np.ndarray):
            return f"missing array '{key}'"
        if not np.isfinite(value.astype(np.float32)).all():
            return f"non-finite values in '{key}'"
    if record["source_mean"].shape != record["target_mean"].shape:
        return f"source/target latent shapes differ ({record['source_mean'].shape} vs {record['target_mean'].shape})"
    return None


def make_manifest(buckets: dict, text_shape, latent_channels: int, scaling_factor: float, config_hash: str,
                  bad: dict) -> dict:
    """The manifest of a folder; `buckets` maps bucket keys to {"count", "files"}."""
    for key, entry in buckets.items():
        entry["latent_shape"] = [int(n) for n in key.split("x")] + [latent_channels]
    return {
        "format": FORMAT,
        "serialization": "flax.serialization msgpack dict per ArrayRecord record",
        "count": sum(e["count"] for e in buckets.values()),
        "buckets": buckets,
        "text_shape": list(text_shape),
        "dtypes": {**{k: "bfloat16" for k in LATENT_KEYS}, "text": "bfloat16"},
        "latents": "unscaled VAE posterior (mean, std); multiply a sample by vae.scaling_factor",
        "scaling_factor": scaling_factor,
        "config_hash": config_hash,
        "bad": bad,
    }


def write_synthetic(folder, counts: dict, text_shape, latent_channels: int = 16, shard_size: int = 64,
                    seed: int = 0, prefix: str = "") -> dict:
    """A folder of random records for tests and throughput runs: `counts` maps latent (f, h, w) to a record count.
    Record i of a bucket is named "<prefix><f>x<h>x<w>/<i>"; source means are standard normal, target means their
    negation, stds uniform in [0.05, 0.15). Returns the manifest (also written)."""
    folder = storage.path(folder)
    storage.makedirs(folder)
    rng = np.random.default_rng(seed)
    bf16 = ml_dtypes.bfloat16
    buckets = {}
    for shape, count in counts.items():
        key = bucket_key(shape)
        entry = buckets.setdefault(key, {"count": 0, "files": []})
        latent = (*shape, latent_channels)
        text = rng.standard_normal(text_shape).astype(bf16)
        for start in range(0, count, shard_size):
            name = f"part-{start // shard_size:05d}-{key}.array_record"
            with storage.local_file(folder / name) as local:
                out = writer(local)
                for i in range(start, min(start + shard_size, count)):
                    mean = rng.standard_normal(latent, np.float32).astype(bf16)
                    std = (0.1 * rng.random(latent, np.float32) + 0.05).astype(bf16)
                    out.write(pack({"name": f"{prefix}{key}/{i}", "instruction": f"edit {i}", "source_mean": mean,
                                    "source_std": std, "target_mean": -mean, "target_std": std, "text": text}))
                out.close()
            entry["files"].append(name)
            entry["count"] += min(start + shard_size, count) - start
    manifest = make_manifest(buckets, text_shape, latent_channels, 1.0, "synthetic", {"count": 0, "by_reason": {},
                                                                                      "samples": []})
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest
