"""SAT checkpoint files: `<dir>/latest` naming `<dir>/<iter>/mp_rank_00_model_states.pt`, or the `.pt` itself.

The only module here that touches torch, imported inside the functions: reading a SAT file needs torch,
nothing else in the package does. Tensors cross as numpy arrays (bf16 as `ml_dtypes.bfloat16`, zero-copy).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

STATES_FILE = "mp_rank_00_model_states.pt"
ITERATION_TAG = "1"


class NotACheckpoint(ValueError):
    """A path that holds no checkpoint of a known format."""


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


def _to_numpy(tensor) -> np.ndarray:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def to_torch(array: np.ndarray, dtype: str):
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype == ml_dtypes.bfloat16:
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    return tensor.to({"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype])


def torch_load(file: str | Path):
    """A torch pickle loaded weights-only onto the CPU, memory-mapped when its format allows."""
    import torch

    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:  # files in the pre-zip format cannot be memory-mapped
        if "mmap" not in str(err):
            raise
        return torch.load(file, map_location="cpu", weights_only=True)


def read_module(path: str | Path, progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it) -> dict:
    """The `module` state dict of a SAT checkpoint as numpy arrays, read memory-mapped and weights-only."""
    file = states_file(path)
    try:
        saved = torch_load(file)
    except pickle.UnpicklingError as err:
        unsupported = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if not unsupported:
            raise NotACheckpoint(f"{file} is not a readable PyTorch checkpoint (not a torch pickle)") from err
        raise NotACheckpoint(
            f"{file} holds Python objects that weights-only loading refuses ({unsupported[0].split('.')[0]}); "
            "re-save it as {'module': state_dict} with tensors only"
        ) from err
    except (RuntimeError, EOFError) as err:
        raise NotACheckpoint(f"{file} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(saved, dict) or not isinstance(saved.get("module"), dict):
        keys = sorted(saved)[:8] if isinstance(saved, dict) else type(saved).__name__
        raise NotACheckpoint(f"{file} has no 'module' state dict (SAT/DeepSpeed layout); found {keys}")
    return {k: _to_numpy(v) for k, v in progress(saved["module"].items(), "read SAT") if hasattr(v, "dtype")}


def write_module(module: dict[str, np.ndarray], path: str | Path, dtype: str,
                 progress: Callable[[Iterable, str], Iterable] = lambda it, desc: it) -> None:
    """Writes `{'module': state_dict}` as SAT saves it: a `.pt` path gets the file, a folder the full layout."""
    import torch

    state = {k: to_torch(v, dtype) for k, v in progress(module.items(), "write SAT")}
    path = Path(path)
    if path.suffix == ".pt":
        torch.save({"module": state}, path)
        return
    (path / ITERATION_TAG).mkdir(parents=True)
    torch.save({"module": state}, path / ITERATION_TAG / STATES_FILE)
    (path / "latest").write_text(ITERATION_TAG)
