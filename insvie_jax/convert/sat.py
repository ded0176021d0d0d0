"""SAT checkpoint files: `<dir>/latest` naming `<dir>/<iter>/mp_rank_00_model_states.pt`, or the `.pt` itself.

The only module here that touches torch, imported inside the functions: reading a SAT file needs torch,
nothing else in the package does. Tensors cross as numpy arrays (bf16 as `ml_dtypes.bfloat16`, zero-copy).
"""

from __future__ import annotations

import io
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

STATES_FILE = "mp_rank_00_model_states.pt"
ITERATION_TAG = "1"
VAE_FILE = "3d-vae.pt"
SUFFIXES = (".pt", ".pth", ".ckpt")


class ConvertError(ValueError):
    """A checkpoint that cannot be read or written; the message names the path and what to do."""


class NotACheckpoint(ConvertError):
    """A path that holds no checkpoint of a known format."""


def require_torch():
    """The torch module, or a ConvertError saying how to install it (reading or writing SAT files needs it)."""
    try:
        import torch
    except ImportError:
        raise ConvertError("SAT (.pt) checkpoints need PyTorch, which is not installed: "
                           "pip install 'insvie-jax[convert]'") from None
    return torch


def states_file(path: str | Path) -> Path:
    """The `.pt` file of a SAT checkpoint given as the file, its iteration folder or the folder with `latest`."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "latest").is_file():
        tag = (path / "latest").read_text().strip()
        found = path / tag / STATES_FILE
        if not found.is_file():
            raise NotACheckpoint(f"{path / 'latest'} names iteration '{tag}' but {found} does not exist")
        return found
    if (path / STATES_FILE).is_file():
        return path / STATES_FILE
    raise NotACheckpoint(f"{path} is not a SAT checkpoint: no 'latest' file and no {STATES_FILE}")


def is_sat(path: str | Path) -> bool:
    path = Path(path)
    return (path.is_file() and path.suffix == ".pt") or (path / "latest").is_file() or (path / STATES_FILE).is_file()


def vae_file(path: str | Path) -> Path | None:
    """The SAT VAE `.pt` that `path` names: the file itself, or the `3d-vae.pt` in a folder."""
    path = Path(path)
    if path.is_dir():
        path = path / VAE_FILE
    return path if path.is_file() and path.suffix in SUFFIXES else None


def is_sat_vae(path: str | Path) -> bool:
    """Whether `path` is (or is a folder holding) a torch file whose `state_dict` has `encoder.`/`decoder.` keys."""
    file = vae_file(path)
    if file is None or (Path(path) / "config.json").exists():
        return False
    try:
        saved = torch_load(file)
    except (NotACheckpoint, OSError):  # not readable as weights: not a SAT VAE
        # (the transformer reader, which gets everything else, names the problem)
        return False
    sd = saved.get("state_dict") if isinstance(saved, dict) else None
    return isinstance(sd, dict) and any(str(k).startswith(("encoder.", "decoder.")) for k in sd)


def _to_numpy(tensor) -> np.ndarray:
    torch = require_torch()

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_torch(array: np.ndarray, dtype: str):
    torch = require_torch()

    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def torch_load(file: str | Path):
    """A torch pickle loaded weights-only onto the CPU, memory-mapped when its format allows. Anything that is not
    one (random bytes, a truncated file, a pickle that would import code) raises NotACheckpoint naming why."""
    torch = require_torch()
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 3": the error below says what matters
            warnings.simplefilter("ignore")
            try:
                return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:  # files in the pre-zip format cannot be memory-mapped
                if "mmap" not in str(err):
                    raise
                return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names what it refused, in wordings that vary ("Unsupported global: GLOBAL x",
        # "unsupported GLOBAL x whose module y is blocked") or not at all ("Unsupported operand 149" for protocol 4+
        # pickles): the pickle's own imports say whether it would run code.
        named = re.search(r"unsupported global\W+(?:GLOBAL\s+)?([\w.]+)", str(err), re.IGNORECASE)
        unsafe = [named.group(1)] if named else _unsafe_globals(Path(file))
        if unsafe:
            raise NotACheckpoint(f"{file} was refused as unsafe: its pickle would import {', '.join(unsafe[:3])} "
                                 "(code, not tensors); load only checkpoints you trust, re-saved as "
                                 "{'module': state_dict} with tensors only") from None
        raise NotACheckpoint(f"{file} is not a readable PyTorch checkpoint (not a torch pickle: "
                             f"{_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - torch reports damaged files with many types (EOFError,
        # UnicodeDecodeError, IndexError, KeyError, RuntimeError, ...): all mean "not a readable checkpoint"
        raise NotACheckpoint(f"{file} is not a readable PyTorch checkpoint (truncated or corrupt: "
                             f"{type(err).__name__}: {_first_line(err)})") from None


# What torch checkpoints import: their own rebuild functions and storages, and the containers of a state dict.
_SAFE_GLOBALS = ("torch.", "collections.OrderedDict", "numpy.", "_codecs.encode", "builtins.set", "builtins.slice")


def _unsafe_globals(file: Path) -> list[str]:
    """The globals (module.name) a pickle file would import beyond a checkpoint's own, read without running it:
    the pickle of a torch zip file (`*/data.pkl`), else the pickles of the file one after another."""
    try:
        if zipfile.is_zipfile(file):
            with zipfile.ZipFile(file) as archive:
                pickled = [archive.read(n) for n in archive.namelist() if n.endswith("data.pkl")]
        else:
            pickled = [file.read_bytes()]
    except (OSError, zipfile.BadZipFile, KeyError):
        return []
    found: list[str] = []
    for data in pickled:
        stream = io.BytesIO(data)
        for _ in range(8):  # torch's legacy format: magic, protocol, sys info, then the state dict
            start = stream.tell()
            found += _pickle_globals(stream)
            if stream.tell() in (start, len(data)):
                break
    return [g for g in dict.fromkeys(found) if not g.startswith(_SAFE_GLOBALS)]


def _pickle_globals(stream) -> list[str]:
    names, strings, memo = [], [], {}
    try:
        for op, arg, _ in pickletools.genops(stream):
            if op.name in ("GLOBAL", "INST"):
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif op.name == "MEMOIZE" and strings:
                memo[len(memo)] = strings[-1]
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT") and strings:
                memo[arg] = strings[-1]
            elif op.name in ("GET", "BINGET", "LONG_BINGET") and isinstance(memo.get(arg), str):
                strings.append(memo[arg])
            elif isinstance(arg, str):
                strings.append(arg)
    except Exception:  # noqa: BLE001 - a damaged pickle: the globals read up to the damage
        pass
    return names


def _first_line(err: BaseException) -> str:
    """The informative line of an error: torch's weights-only errors start with paragraphs of boilerplate."""
    text = str(err)
    text = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "no detail")[:200]


def read_module(path: str | Path, progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it) -> dict:
    """The `module` state dict of a SAT checkpoint as numpy arrays, read memory-mapped and weights-only."""
    file = states_file(path)
    saved = torch_load(file)
    if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
        keys = sorted(map(str, saved))[:8] if isinstance(saved, dict) else type(saved).__name__
        raise NotACheckpoint(f"{file} has no 'module' state dict (SAT/DeepSpeed layout); found {keys}")
    return {str(k): _to_numpy(v) for k, v in progress(saved["module"].items(), "read SAT") if hasattr(v, "dtype")}


def write_module(module: dict[str, np.ndarray], path: str | Path, dtype: str,
                 progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it) -> None:
    """Writes `{'module': state_dict}` as SAT saves it: a `.pt` path gets the file, a folder the full layout."""
    torch = require_torch()

    state = {k: to_torch(v, dtype) for k, v in progress(module.items(), "write SAT")}
    path = Path(path)
    if path.suffix == ".pt":
        torch.save({"module": state}, path)
        return
    (path / ITERATION_TAG).mkdir(parents=True)
    torch.save({"module": state}, path / ITERATION_TAG / STATES_FILE)
    (path / "latest").write_text(ITERATION_TAG)
