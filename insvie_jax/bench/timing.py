"""Timing done right: the first call (compile + warm-up) apart, the device synchronised, the median of N."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable

import jax

GIB = 2**30


def measure(step: Callable[[], Any], repeats: int) -> tuple[dict, Any]:
    """({"median_s", "compile_s", "first_s", "times"}, last output). `compile_s` = first call - median: the
    compilation plus the first run's one-off work (autotuning, allocations)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    start = time.perf_counter()
    out = jax.block_until_ready(step())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        # The previous call's outputs go first (a fwd+bwd's gradients are as large as the weights), as in a
        # training loop and as the references' `zero_grad(set_to_none=True)` does: the peak is one call's.
        out = None
        start = time.perf_counter()
        out = jax.block_until_ready(step())
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"median_s": median, "compile_s": max(first - median, 0.0), "first_s": first, "times": times}, out


def peak_gib(device=None) -> float | None:
    """The device's peak memory in use so far in this process (GPU, TPU); None where not reported (CPU)."""
    device = device or jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    peak = (stats or {}).get("peak_bytes_in_use")
    return peak / GIB if peak is not None else None


@dataclasses.dataclass
class Prepared:
    """One workload, built and ready: what is timed, and what its reference needs.

    step      one timed call (returns device arrays, or host data for the input pipeline)
    flops     model FLOPs of one call on all devices together (None: not counted)
    samples   samples one call processes (samples/s = samples / median)
    weights   () -> our flat parameters, for the reference (None: the reference needs none)
    inputs    the inputs, for the reference (numpy)
    compared  output of `step` -> the array the reference reproduces (None: not comparable)
    dtype     the reference's compute dtype (weights are written in it)
    info      extra fields for the row (shapes, settings)
    """

    step: Callable[[], Any]
    flops: float | None = None
    samples: int = 1
    weights: Callable[[], dict] | None = None
    inputs: dict = dataclasses.field(default_factory=dict)
    compared: Callable[[Any], Any] | None = None
    dtype: str = "float32"
    info: dict = dataclasses.field(default_factory=dict)
