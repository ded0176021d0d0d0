"""File plumbing shared by every model's converter: staged writes, dtype casts, the native (orbax) format and
sharded safetensors folders. Knows nothing about any model; the models' key maps live beside it.

Native format: `config.json` = {"format": "insvie-jax-<model>", "<config section>": the dataclass as JSON} and
`params/`, an orbax checkpoint of the flat `{"a.b.kernel": array}` parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from insvie_jax.convert.sat import NotACheckpoint

DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}

Progress = Callable[[Iterable, str], Iterable]


def quiet(iterable, desc):
    return iterable


def cast(arrays: dict[str, np.ndarray], dtype: str, progress: Progress = quiet) -> dict[str, np.ndarray]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return {k: np.asarray(v).astype(DTYPES[dtype], copy=False) for k, v in progress(arrays.items(), f"cast {dtype}")}


@contextlib.contextmanager
def staged(path: str | Path) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write into; renamed to `path` only when the block succeeds, so
    an interrupted write leaves nothing half-written under the target name."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        elif tmp.exists():
            tmp.unlink()


# ---------------------------------------------------------------------------------------------------
# Native: orbax params + config.json


def native_format(path: str | Path) -> str | None:
    """The native format tag of a folder ("insvie-jax-vae", ...), or None when it is not a native checkpoint."""
    path = Path(path)
    if not ((path / "config.json").is_file() and (path / "params").is_dir()):
        return None
    try:
        return json.loads((path / "config.json").read_text()).get("format")
    except (json.JSONDecodeError, AttributeError):
        return None


def write_native(flat: dict[str, np.ndarray], tag: str, section: str, cfg, out: Path,
                 progress: Progress = quiet) -> None:
    """Writes `out/config.json` ({"format": tag, section: cfg as a dict}) and `out/params` (orbax)."""
    import orbax.checkpoint as ocp

    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"format": tag, section: dataclasses.asdict(cfg)}, indent=2))
    ocp.PyTreeCheckpointer().save((out / "params").absolute(), dict(progress(flat.items(), "write native")))


def read_native(path: str | Path, tag: str, progress: Progress = quiet) -> tuple[dict[str, np.ndarray], dict]:
    """(flat params as numpy, config.json) of a native folder whose format is `tag`."""
    import orbax.checkpoint as ocp

    path = Path(path)
    found = native_format(path)
    if found != tag:
        raise NotACheckpoint(f"{path} is not a native {tag} checkpoint (config.json + params/; format {found!r})")
    meta = json.loads((path / "config.json").read_text())
    restored = ocp.PyTreeCheckpointer().restore((path / "params").absolute())
    return {k: np.asarray(v) for k, v in progress(restored.items(), "read native")}, meta


# ---------------------------------------------------------------------------------------------------
# safetensors folders (diffusers and Hugging Face layouts)


def write_safetensors(sd: dict[str, np.ndarray], out: Path, weights: str, max_shard_bytes: int,
                      progress: Progress = quiet) -> None:
    """`out/<weights>`, or shards `<stem>-00001-of-0000N.safetensors` + `<weights>.index.json` when the tensors
    exceed `max_shard_bytes` (the names diffusers and transformers both read)."""
    from safetensors.numpy import save_file

    shards: list[dict] = [{}]
    size = 0
    for key in sorted(sd):
        nbytes = sd[key].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = np.ascontiguousarray(sd[key])
        size += nbytes
    if len(shards) == 1:
        save_file(dict(progress(shards[0].items(), f"write {weights}")), out / weights, metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = weights.replace(".safetensors", f"-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        save_file(dict(progress(shard.items(), f"write {name}")), out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in sd.values())}, "weight_map": weight_map}
    (out / (weights + ".index.json")).write_text(json.dumps(index, indent=2))


def safetensors_files(folder: Path, weights: str) -> list[str]:
    """The files of `weights` in `folder`: the shards its index names, or the single file."""
    index = folder / (weights + ".index.json")
    if index.is_file():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [weights]


def package_version(name: str, fallback: str) -> str:
    """The installed version of a library whose format we write (recorded in config.json), else `fallback`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:  # the library is not needed to write its format
        return fallback
