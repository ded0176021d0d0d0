"""`insvie-jax bench`: speed and memory of our workloads, side by side with their PyTorch references, as ratios.

Every row runs in subprocesses of its own: ours (JAX) first, then, once ours has exited and its memory is
released, the reference (insvie_jax/convert/torch_reference.py) on the same random weights and inputs, which
ours hands over through a scratch folder. Peaks are each side's own, and JAX's and torch's allocators never
share the card. Timing: first call (compile + warm-up) apart, device synchronised, median of --repeats.
Model FLOPs are counted analytically (transformer, attention, T5) and give TFLOP/s and MFU. Results go to a
table on stdout and JSON (--out).

This module imports no JAX: the parent process only starts workers (insvie_jax/bench/worker.py).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class Workload:
    ours: str  # "module:function" returning a bench.timing.Prepared
    reference: str | None  # function in insvie_jax.convert.torch_reference
    needs: tuple = ("torch", "diffusers")  # what the reference imports
    overrides: tuple = ()  # config defaults of this workload (the user's --set comes after) ...
    family: str = ""  # ... for this model.family only ("" = any)
    description: str = ""


WORKLOADS = {
    "transformer_fwd": Workload("insvie_jax.bench.transformer:forward", "transformer_forward",
                                description="edit transformer forward, batch 1, weights in the compute dtype"),
    # bf16 weights as the reference's eager bf16 model; train_step is the fp32-master-weight recipe.
    "transformer_fwdbwd": Workload("insvie_jax.bench.transformer:forward_backward", "transformer_forward_backward",
                                   overrides=("model.param_dtype=bfloat16",),
                                   description="loss + gradients (bf16 weights), batch 1; --remat, --lora"),
    "train_step": Workload("insvie_jax.bench.train:train_step", "train_step",
                           description="full jitted train step incl. AdamW, mesh from the config; --remat, --lora"),
    "vae_encode": Workload("insvie_jax.bench.vae:encode", "vae_encode", description="VAE encode; --tiled"),
    "vae_decode": Workload("insvie_jax.bench.vae:decode", "vae_decode", description="VAE decode; --tiled"),
    "edit": Workload("insvie_jax.bench.sample:edit", "edit", overrides=("sample.sampler=cogvideox_dpm",),
                     family="cogvideox", description="sample.steps-step guided edit, latents in and out (CogVideoX: "
                     "3-way; Wan: sample.guidance, vs LucyEditPipeline's loop)"),
    "t5": Workload("insvie_jax.bench.t5:encode", "t5", needs=("torch", "transformers"),
                   description="T5 encoder, one prompt of text_encoder.max_length tokens"),
    "attention": Workload("insvie_jax.bench.transformer:attention", "attention", needs=("torch",),
                          description="attention fwd+bwd at the model's sequence length (vs torch SDPA)"),
    "pipeline": Workload("insvie_jax.bench.data:pipeline", None,
                         description="input pipeline: pre-encoded ArrayRecord batches (grain)"),
    "pipeline_video": Workload("insvie_jax.bench.data:pipeline_video", None,
                               description="input pipeline: raw mp4 triplet decode + sample + crop, per clip"),
}
REMAT_WORKLOADS = ("transformer_fwdbwd", "train_step")
VAE_WORKLOADS = ("vae_encode", "vae_decode")

# `insvie-jax bench` with no workload named: the issue's list for one GPU.
DEFAULT_ROWS = (
    ("transformer_fwd", ()),
    ("transformer_fwdbwd", ("model.remat_policy=full",)),
    ("transformer_fwdbwd", ("model.remat_policy=attention",)),
    ("train_step", ("model.remat_policy=attention", "lora.enabled=true")),
    ("train_step", ("model.remat_policy=attention", "lora.enabled=false")),
    ("vae_encode", ()),
    ("vae_decode", ()),
    ("vae_encode", ("vae.tiling=true",)),
    ("vae_decode", ("vae.tiling=true",)),
    ("edit", ()),
    ("attention", ()),
    ("t5", ()),
    ("pipeline", ()),
    ("pipeline_video", ()),
)
TINY_OVERRIDES = ("sample.steps=4", "data.batch_size=1")


@dataclasses.dataclass
class Row:
    workload: str
    overrides: tuple

    @property
    def label(self) -> str:
        short = {"model.remat_policy=": "remat=", "lora.enabled=true": "lora", "lora.enabled=false": "full-ft",
                 "vae.tiling=true": "tiled", "vae.tiling=false": "", }
        parts = []
        for o in self.overrides:
            for long, s in short.items():
                if o.startswith(long):
                    o = s + o[len(long):] if long.endswith("=") else s
                    break
            if o:
                parts.append(o)
        return " ".join([self.workload, *parts])


def plan_rows(args) -> list[Row]:
    """The rows to run: the defaults, or each named workload times its --remat / --lora / --tiled variants."""
    if not args.workloads:
        return [Row(w, o) for w, o in DEFAULT_ROWS]
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
    flags = {"off": ("false",), "on": ("true",), "both": ("false", "true")}
    rows = []
    for w in args.workloads:
        variants = [()]
        if w in REMAT_WORKLOADS:
            remat = [(f"model.remat_policy={r}",) for r in args.remat] if args.remat else [()]
            lora = [(f"lora.enabled={v}",) for v in flags[args.lora]] if args.lora else [()]
            variants = [r + lo for r in remat for lo in lora]
        elif w in VAE_WORKLOADS and args.tiled:
            variants = [(f"vae.tiling={v}",) for v in flags[args.tiled]]
        rows += [Row(w, v) for v in variants]
    return rows


def _reference_available(workload: Workload) -> bool:
    return workload.reference is not None and all(importlib.util.find_spec(m) for m in workload.needs)


def _reference_skipped(workload: Workload, args) -> str | None:
    """Why a workload that has a reference runs without it (printed under its row), or None."""
    if workload.reference is None or args.reference == "none":
        return None
    if args.processes > 1:
        return f"reference skipped: it runs in one process (--processes {args.processes})"
    missing = [m for m in workload.needs if not importlib.util.find_spec(m)]
    if missing:
        return f"reference skipped: {', '.join(missing)} not installed (pip install 'insvie-jax[test]')"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_worker(spec: dict, env: dict, processes: int = 1) -> list[dict]:
    """Starts the worker (N processes for a multi-process JAX job); returns each process's result."""
    root = str(Path(__file__).resolve().parent.parent.parent)
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "insvie_jax.bench.worker", json.dumps(spec)]
    procs = []
    port = _free_port() if processes > 1 else None
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d] or [str(i) for i in
                                                                                         range(processes)]
    for i in range(processes):
        extra = {}
        if processes > 1:
            extra = {"INSVIE_COORDINATOR": f"127.0.0.1:{port}", "INSVIE_PROCESS_ID": str(i),
                     "INSVIE_NUM_PROCESSES": str(processes), "CUDA_VISIBLE_DEVICES": visible[i % len(visible)]}
        procs.append(subprocess.Popen(command, env={**env, **extra}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        lines = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not lines:
            tail = (stderr or stdout).strip()[-3000:]
            results.append({"error": tail or f"worker exited with {proc.returncode}"})
        else:
            results.append(json.loads(lines[-1][len("RESULT "):]))
    return results


def _combine(row: Row, ours: dict | None, ref: dict | None) -> dict:
    out = {"workload": row.workload, "label": row.label, "overrides": list(row.overrides)}
    if ours is not None:
        out["ours"] = ours
    if ref is not None:
        out["reference"] = ref
    o, r = ours or {}, ref or {}
    if o.get("median_s") and r.get("median_s"):
        out["speedup"] = r["median_s"] / o["median_s"]  # reference time / ours: > 1 means ours is faster
    if o.get("peak_gib") and r.get("peak_gib"):
        out["memory_ratio"] = o["peak_gib"] / r["peak_gib"]  # ours / reference: < 1 means ours uses less
    if r.get("rel_diff") is not None:
        out["rel_diff"] = r["rel_diff"]
    return out


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _ratio(value, width: int) -> str:
    return f"{_fmt(value, '.2f')}x".rjust(width) if isinstance(value, (int, float)) else "-".rjust(width)


def format_table(rows: list[dict]) -> str:
    header = (f"{'workload':40} {'ours s':>9} {'compile s':>9} {'peak GiB':>8} {'TFLOP/s':>8} {'MFU':>6} "
              f"{'ref s':>9} {'ref GiB':>8} {'speedup':>8} {'mem x':>6} {'rel diff':>9}")
    lines = [header, "-" * len(header)]
    for r in rows:
        o, ref = r.get("ours", {}), r.get("reference", {})
        lines.append(f"{r['label'][:40]:40} {_fmt(o.get('median_s'), '9.4f')} {_fmt(o.get('compile_s'), '9.1f')} "
                     f"{_fmt(o.get('peak_gib'), '8.2f')} {_fmt(o.get('tflops'), '8.1f')} {_fmt(o.get('mfu'), '6.1%')} "
                     f"{_fmt(ref.get('median_s'), '9.4f')} {_fmt(ref.get('peak_gib'), '8.2f')} "
                     f"{_ratio(r.get('speedup'), 8)} {_ratio(r.get('memory_ratio'), 6)} "
                     f"{_fmt(r.get('rel_diff'), '9.2e')}")
        for side, result in (("ours", o), ("reference", ref)):
            if "error" in result:
                last = result["error"].strip().splitlines()[-1] if result["error"].strip() else "?"
                lines.append(f"    {side} failed: {last[:200]}")
            elif "skipped" in result:
                lines.append(f"    {result['skipped']}" if side == "reference" else f"    {side}: {result['skipped']}")
        if "samples_per_s" in o and r["workload"] in ("train_step", "pipeline", "pipeline_video"):
            lines.append(f"    {o['samples_per_s']:.3f} samples/s")
        if "profile" in o:
            shares = ", ".join(f"{k} {v:.1%}" for k, v in o["profile"]["shares"].items())
            lines.append(f"    profile: {shares}")
    return "\n".join(lines)


def _write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2))
    partial.replace(path)


def run(args) -> int:
    """`insvie-jax bench` (arguments: see cli.py)."""
    rows = plan_rows(args)
    config = "tiny" if args.tiny else args.preset
    base_overrides = list(TINY_OVERRIDES if args.tiny else ()) + list(args.set or [])
    repeats = args.repeats if args.repeats else (2 if args.tiny else 5)
    # One preallocated pool of 95% of the card (torch may use all of it): grown on demand, XLA's allocator failed
    # the 2B no-remat step's single 50 GiB temporary buffer on an 80 GiB H100 with most of the card free.
    # Peaks are bytes in use, not the pool.
    jax_env = {"XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true"),
               "XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")}
    if args.xla_flags:
        jax_env["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), args.xla_flags]))
    ref_env = {"JAX_PLATFORMS": "cpu"}  # the reference process imports our numpy key maps; JAX stays off the GPU
    from insvie_jax import config as configlib  # no JAX: the config alone

    model_family = configlib.load(config, base_overrides).model.family
    results = []
    report = {"meta": {"config": config, "overrides": base_overrides, "repeats": repeats,
                       "reference": args.reference, "processes": args.processes, "xla_flags": args.xla_flags,
                       "argv": sys.argv[1:], "time": time.strftime("%Y-%m-%dT%H:%M:%S")},
              "rows": results}
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
    scratch_root = Path(tempfile.mkdtemp(prefix="insvie_bench_", dir=args.scratch))
    try:
        for i, row in enumerate(rows):
            workload = WORKLOADS[row.workload]
            with_ref = args.reference != "none" and args.processes == 1 and _reference_available(workload)
            if args.reference == "only" and not with_ref:
                continue
            scratch = scratch_root / f"row{i}"
            spec = {"workload": row.workload, "config": config, "repeats": repeats, "scratch": str(scratch),
                    "overrides": [*(workload.overrides if workload.family in ("", model_family) else ()),
                                  *row.overrides, *base_overrides],
                    "exchange": with_ref, "measure": args.reference != "only",
                    "profile": str(Path(args.profile) / re.sub(r"[^\w.=-]+", "_", row.label)) if args.profile
                    else None, "profile_calls": args.profile_calls}
            print(f"[{i + 1}/{len(rows)}] {row.label}: ours ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            per_process = _run_worker({**spec, "side": "jax"}, jax_env, args.processes)
            ours = per_process[0]
            if len(per_process) > 1:
                ours["peak_gib_per_process"] = [p.get("peak_gib") for p in per_process]
                ours["errors_per_process"] = [p["error"] for p in per_process if "error" in p] or None
            ours["wall_s"] = time.perf_counter() - started
            skipped = _reference_skipped(workload, args)
            ref = {"skipped": skipped} if skipped else None
            if with_ref and "error" not in ours:
                print(f"[{i + 1}/{len(rows)}] {row.label}: reference ... (ours: {_fmt(ours.get('median_s'), '.4f')} s, "
                      f"{_fmt(ours.get('peak_gib'), '.2f')} GiB)", file=sys.stderr, flush=True)
                started = time.perf_counter()
                ref = _run_worker({**spec, "side": "reference"}, ref_env)[0]
                ref["wall_s"] = time.perf_counter() - started
            results.append(_combine(row, ours if args.reference != "only" else None, ref))
            shutil.rmtree(scratch, ignore_errors=True)
            # Written after every row: a run cut short (time limit, lost machine) keeps what it measured.
            print("\n".join(format_table(results[-1:]).splitlines()[2:]), file=sys.stderr, flush=True)
            if args.out:
                _write_json(Path(args.out), report)
    finally:
        shutil.rmtree(scratch_root, ignore_errors=True)
    print(format_table(results))
    if args.out:
        print(f"wrote {args.out}")
    failed = any("error" in r.get("ours", {}) or "error" in r.get("reference", {}) for r in results)
    return 1 if failed else 0
