"""Pre-encoded triplet records: ArrayRecord shards of msgpack'd numpy dicts, plus a manifest.json per folder.

One record (flax.serialization msgpack; arrays keep their dtype, bfloat16 included):
    name, instruction: str
    source_mean, source_std, target_mean, target_std: bfloat16 (f, h, w, C) VAE posterior, *unscaled*
    text: bfloat16 (L, D) T5 output
Shards are `part-<unit>-<f>x<h>x<w>.array_record` (one latent shape per file: the buckets), written by
`insvie_jax.data.encode`; the manifest lists them with counts, shapes, dtypes, the config hash and the
bad-sample report.
"""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes  # noqa: F401  (bfloat16 arrays round-trip through msgpack)
import numpy as np
from flax import serialization

FORMAT = "insvie-jax/arrayrecord-triplets-v1"
MANIFEST = "manifest.json"
LATENT_KEYS = ("source_mean", "source_std", "target_mean", "target_std")
# ArrayRecord groups of one record: random access (grain's shuffling) reads exactly one record.
WRITER_OPTIONS = "group_size:1"


def pack(record: dict) -> bytes:
    return serialization.msgpack_serialize(record)


def unpack(data: bytes) -> dict:
    return serialization.msgpack_restore(data)


def bucket_key(latent_shape) -> str:
    """'13x60x90' for latents (13, 60, 90, C)."""
    return "x".join(str(int(n)) for n in latent_shape[:3])


def writer(path: str | Path):
    from array_record.python.array_record_module import ArrayRecordWriter

    return ArrayRecordWriter(str(path), WRITER_OPTIONS)


def read_all(path: str | Path) -> list[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return reader.read_all()
    finally:
        reader.close()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
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
