"""File plumbing shared by every model's converter: staged writes, dtype casts, the native (orbax) format and
sharded safetensors folders. Knows nothing about any model; the models' key maps live beside it.

Native format: `config.json` = {"format": "insvie-jax-<model>", "<config section>": the dataclass as JSON} and
`params/`, an orbax checkpoint of the flat `{"a.b.kernel": array}` parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from insvie_jax.convert.sat import ConvertError, NotACheckpoint

DTYPES = {"fp32": np.float32, "bf16": ml_dtypes.bfloat16, "fp16": np.float16}
TORCH_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # config.json's "dtype"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_SHARD_BYTES = 10 * 2**30  # diffusers' default shard size
HF_WEIGHTS = "model.safetensors"
HF_SHARD_BYTES = 5 * 10**9  # transformers' customary shard size ("5GB")
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")

Progress = Callable[[Iterable, str], Iterable]


def quiet(iterable, desc):
    return iterable


def cast(arrays: dict[str, np.ndarray], dtype: str, progress: Progress = quiet) -> dict[str, np.ndarray]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return {k: np.asarray(v).astype(DTYPES[dtype], copy=False) for k, v in progress(arrays.items(), f"cast {dtype}")}


def output_bytes(flat: dict[str, np.ndarray], dtype: str) -> int:
    """Bytes of the tensors of `flat` written in `dtype` (a lower bound of the files' size)."""
    return sum(int(np.size(v)) for v in flat.values()) * np.dtype(DTYPES.get(dtype, np.float32)).itemsize


# Below this much free space after a failed write, the failure is taken for a full disk: torch reports one as
# "iostream error" / "unexpected pos" without the OS error.
NEARLY_FULL_BYTES = 1 << 20


def _out_of_space(err: BaseException, folder: Path) -> bool:
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        if any(s in str(seen) for s in ("No space left on device", "os error 28", "os_error_code='28'")):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def _no_space(path: Path, needed: int = 0) -> ConvertError:
    want = f" (needs at least {needed / 2**20:.1f} MiB)" if needed else ""
    return ConvertError(f"no space left on {path.parent}{want}; nothing written to {path}: free some space or "
                        "choose another destination")


@contextlib.contextmanager
def staged(path: str | Path, nbytes: int = 0) -> Iterator[Path]:
    """Yields a temporary sibling of `path` to write into; renamed to `path` only when the block succeeds, so
    an interrupted write leaves nothing half-written under the target name. `nbytes` (the tensors' size) is
    checked against the free space first; a disk that fills up during the write is reported the same way."""
    path = Path(path).absolute()
    if path.exists():
        raise FileExistsError(f"{path} exists; remove it or choose another destination")
    path.parent.mkdir(parents=True, exist_ok=True)
    if nbytes and shutil.disk_usage(path.parent).free < nbytes:
        raise _no_space(path, nbytes)
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        if _out_of_space(err, path.parent):
            raise _no_space(path) from None
        raise
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
    # orbax also logs a failed write (e.g. a full disk) with tracebacks from its writer threads; the error itself
    # reaches us and is reported once, by `staged`.
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    try:
        ocp.PyTreeCheckpointer().save((out / "params").absolute(), dict(progress(flat.items(), "write native")))
    finally:
        absl_logger.setLevel(level)


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


def write_folder(out: Path, config: dict, sd: dict[str, np.ndarray], weights: str, dtype: str,
                 max_shard_bytes: int, progress: Progress = quiet) -> None:
    """A diffusers / Hugging Face model folder: `config.json` and the tensors of `sd` cast to `dtype`."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_safetensors(cast(sd, dtype, progress), out, weights, max_shard_bytes, progress)


def read_folder(folder: Path, weights: str, progress: Progress = quiet) -> dict[str, np.ndarray]:
    """The tensors of a model folder's `weights` (the single file, or the shards its index names)."""
    names = safetensors_files(folder, weights)
    missing = [f for f in names if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {missing} (only safetensors weights are read)")
    sd = {}
    for name in names:
        sd.update(read_safetensors(folder / name, progress))
    return sd


def read_safetensors(file: Path, progress: Progress = quiet) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file; a truncated or corrupt file raises NotACheckpoint naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(file, framework="numpy") as f:
            return {key: f.get_tensor(key) for key in progress(list(f.keys()), f"read {file.name}")}
    except (SafetensorError, OSError, ValueError) as err:
        raise NotACheckpoint(f"{file} is not a readable safetensors file (truncated or corrupt: "
                             f"{str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


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


def tokenizer_folder(path: str | Path) -> Path | None:
    """Where the tokenizer files of a text encoder folder are: the folder itself, its `tokenizer/`, or the
    `tokenizer/` beside it (a pipeline's `text_encoder/`); None when there are none."""
    path = Path(path)
    for folder in (path, path / "tokenizer", path.parent / "tokenizer"):
        if any((folder / name).is_file() for name in TOKENIZER_FILES[:2]):
            return folder
    return None


def copy_tokenizer(source: str | Path, out: Path) -> None:
    """Copies the tokenizer files (spiece.model, tokenizer_config.json, ...) of `source` beside the weights."""
    folder = tokenizer_folder(source)
    if folder is None:
        raise FileNotFoundError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)}) in {source} or its tokenizer/ "
                                "folder")
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy2(folder / name, out / name)
