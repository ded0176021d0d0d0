"""`--profile DIR`: a jax.profiler trace of a few timed calls, and where their device time went.

The summary reads the trace's .xplane.pb with `jax.profiler.ProfileData`: on GPU/TPU the kernels on the
device planes' stream lines, on CPU the host plane's XLA op events (those carrying an `hlo_op` stat). Each
kernel falls in one category by its name (first match wins, in the order of CATEGORIES).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import jax

CATEGORIES = (
    ("collectives", r"nccl|all-reduce|all_reduce|allreduce|all-gather|all_gather|allgather|reduce-scatter|"
                    r"reduce_scatter|reducescatter|all-to-all|all_to_all|alltoall|collective|send|recv"),
    ("attention", r"fmha|flash|attention|sdpa|splash|cudnn.*mha|mha"),
    ("copies", r"memcpy|memset|copy|transpose|dynamic-update-slice|dynamic_update_slice"),
    ("matmul/gemm/conv", r"gemm|cublas|nvjet|xmma|cutlass|dot|matmul|conv|wgmma"),
    ("fusions/elementwise", r"fusion|elementwise|reduce|broadcast|add|multiply|select|convert|loop_|input_|triton"),
)
OTHER = "other"


def categorize(name: str) -> str:
    lowered = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lowered):
            return category
    return OTHER


def capture(step: Callable[[], Any], calls: int, folder: str | Path) -> Path:
    """Traces `calls` synchronised calls of `step` into `folder`; returns the .xplane.pb written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.rglob("*.xplane.pb"))
    with jax.profiler.trace(str(folder)):
        for _ in range(calls):
            jax.block_until_ready(step())
    written = sorted(set(folder.rglob("*.xplane.pb")) - before, key=lambda p: p.stat().st_mtime)
    if not written:
        raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {folder}")
    return written[-1]


def _kernel_events(data):
    """(name, duration ns) of every device kernel, or on CPU of every XLA op on the host plane."""
    devices = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
    if devices:
        for plane in devices:
            lines = list(plane.lines)
            streams = [ln for ln in lines if ln.name.startswith("Stream")] or [
                ln for ln in lines if ln.name not in ("XLA Modules", "XLA Ops", "Steps", "XLA TraceMe")]
            for line in streams:
                for event in line.events:
                    yield event.name, event.duration_ns
        return
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    yield f"{event.name} {stats['hlo_op']}", event.duration_ns


def summarize(xplane: str | Path, calls: int = 1) -> dict:
    """{"shares": {category: fraction of kernel time}, "kernel_ms_per_call", "ms_by_category_per_call",
    "top_kernels": the 10 longest kernels by total time}."""
    from jax.profiler import ProfileData

    data = ProfileData.from_file(str(xplane))
    by_category: dict[str, float] = {}
    by_kernel: dict[str, float] = {}
    for name, duration in _kernel_events(data):
        category = categorize(name)
        by_category[category] = by_category.get(category, 0.0) + duration
        by_kernel[name] = by_kernel.get(name, 0.0) + duration
    total = sum(by_category.values())
    if total <= 0:
        raise RuntimeError(f"{xplane}: no kernel events found (planes: {[p.name for p in data.planes]})")
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:10]
    return {
        "trace": str(xplane),
        "shares": {c: by_category[c] / total for c in sorted(by_category, key=lambda c: -by_category[c])},
        "kernel_ms_per_call": total / 1e6 / calls,
        "ms_by_category_per_call": {c: v / 1e6 / calls for c, v in by_category.items()},
        "top_kernels": [{"name": n[:160], "ms_per_call": v / 1e6 / calls, "category": categorize(n)} for n, v in top],
    }
