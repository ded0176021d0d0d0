"""The training loop on GPU: step time, TFLOP/s and MFU per device, peak memory, for LoRA and full fine-tunes.

    python tools/bench_train.py --out bench_train.json [--preset cogvideox-2b-edit] [--modes lora full]
        [--steps 8] [--remat full] [--batch 0] [--set mesh.ici_fsdp=-1 ...]

Each mode runs `insvie-jax train` in its own subprocess (its own peak memory) on synthetic latents of the
preset's clip size (49x480x720 -> 13x60x90 latents), batch = one sample per device unless --batch, and
reads RUN/metrics.jsonl: medians over the steps after the first two (compile and warm-up excluded).
`total_s` includes the end-of-run checkpoint write. The run folders are deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "lora": ["lora.enabled=true"],  # InsViE: r128 adapters on qkv + out, proj_edit trained
    "full": ["lora.enabled=false"],
}


def run_mode(preset: str, mode: str, steps: int, remat: str, batch: int, extra: list[str]) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench_train_{mode}_"))
    try:
        # Counted in a child process: a JAX client in this one would hold GPU memory during the run.
        devices = int(subprocess.run([sys.executable, "-c", "import jax; print(jax.device_count())"],
                                     capture_output=True, text=True, check=True).stdout.split()[-1])
        overrides = [f"train.run_dir={run_dir}", f"train.steps={steps}", "train.log_every=1",
                     f"checkpoint.every={steps}", f"model.remat_policy={remat}", "mesh.ici_data=-1",
                     f"data.batch_size={batch or devices}", *MODES[mode], *extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")
        out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "train", preset, *overrides], env=env,
                             capture_output=True, text=True, check=False)
        if out.returncode != 0:
            return {"mode": mode, "error": out.stderr[-2000:]}
        summary = json.loads(out.stdout[out.stdout.index("{"):])
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        steady = [r for r in records if "loss" in r and r["step"] >= 2] or records[-1:]

        def median(key):
            values = [r[key] for r in steady if r.get(key) is not None]
            return statistics.median(values) if values else None

        return {"mode": mode, "devices": devices, "batch": batch or devices, "step_s": median("step_s"),
                "samples_per_s": median("samples_per_s"), "tflops_per_device": median("tflops_per_device"),
                "mfu": median("mfu"), "peak_memory_gib": (median("peak_memory_bytes") or 0) / 2**30,
                "compile_s": summary["compile_s"], "total_s": summary["total_s"],
                "first_loss": summary["first_loss"], "last_loss": summary["last_loss"]}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_train.json"))
    parser.add_argument("--preset", default="cogvideox-2b-edit")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--remat", default="full", choices=("none", "full", "dots", "dots_no_batch"))
    parser.add_argument("--batch", type=int, default=0, help="global batch; 0 = one sample per device")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    rows = [run_mode(args.preset, mode, args.steps, args.remat, args.batch, args.set) for mode in args.modes]
    header = f"{'mode':6} {'dev':>4} {'batch':>5} {'step_s':>8} {'TFLOP/s/dev':>12} {'MFU':>6} {'peak GiB':>9} " \
             f"{'compile_s':>10}"
    print(header)
    for r in rows:
        if "error" in r:
            print(f"{r['mode']:6} error: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}")
            continue
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
        print(f"{r['mode']:6} {r['devices']:>4} {r['batch']:>5} {fmt(r['step_s'], '8.3f')} "
              f"{fmt(r['tflops_per_device'], '12.1f')} {fmt(r['mfu'], '6.1%')} {r['peak_memory_gib']:>9.1f} "
              f"{r['compile_s']:>10.1f}")
    Path(args.out).write_text(json.dumps({"preset": args.preset, "remat": args.remat, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
