"""T5-XXL text encoder on one GPU: load time, forward time and bf16 error, ours (JAX) against transformers.

    python tools/bench_t5.py --out bench_t5.json [--batches 1 8] [--tiny]

Random weights of t5-v1_1-xxl's shapes, written by transformers' `save_pretrained` as sharded bf16
safetensors into a temporary folder, then read back by `load_t5` (so the loader is exercised at full size).
Inputs: 226 random token ids, as CogVideoX pads prompts to, no attention mask. Errors are ‖a−b‖/‖b‖
against transformers' fp32 forward of the same bf16-rounded weights; transformers' own bf16 forward is
listed for comparison. Timing: warm-up excluded, compile reported separately, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, num_heads=64, num_layers=24, d_ff=10240)
TINY = dict(vocab_size=128, d_model=64, d_kv=16, num_heads=4, num_layers=2, d_ff=96)


def rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def timed(fn, repeats: int, sync):
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), first - statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--length", type=int, default=226)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU smoke run of this script)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "bench_t5.json"))
    args = parser.parse_args()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np
    import torch
    import transformers
    from flax import nnx

    from insvie_jax.config import TextEncoderConfig
    from insvie_jax.convert.t5_keys import load_t5

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = TINY if args.tiny else XXL
    hf_config = transformers.T5Config(**sizes, feed_forward_proj="gated-gelu", dropout_rate=0.0)
    rng = np.random.default_rng(0)
    ids = {b: rng.integers(2, sizes["vocab_size"], (b, args.length)).astype(np.int32) for b in args.batches}
    results = {"device": str(jax.devices()[0].device_kind), "sizes": sizes, "length": args.length, "rows": []}

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        with torch.device(device):
            ref = transformers.T5EncoderModel(hf_config).to(torch.bfloat16).eval()
        t0 = time.perf_counter()
        ref.save_pretrained(folder, safe_serialization=True, max_shard_size="2GB")
        results["save_s"] = time.perf_counter() - t0
        want, torch_rows = {}, {}
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        with torch.no_grad():
            for b, x in ids.items():
                tx = torch.from_numpy(x).long().to(device)
                step, _ = timed(lambda: ref(input_ids=tx).last_hidden_state, args.repeats, lambda _: sync())
                bf16 = ref(input_ids=tx).last_hidden_state.float().cpu().numpy()
                torch_rows[b] = {"torch_bf16_s": step, "bf16_out": bf16}
            ref.float()
            for b, x in ids.items():
                want[b] = ref(input_ids=torch.from_numpy(x).long().to(device)).last_hidden_state.cpu().numpy()
        del ref
        if device == "cuda":
            torch.cuda.empty_cache()

        t0 = time.perf_counter()
        model, _ = load_t5(folder, TextEncoderConfig(dtype="bfloat16"))
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        results["load_s"] = time.perf_counter() - t0

    graphdef, state = nnx.split(model)  # parameters as arguments, not constants baked into the program
    run = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))

    def forward(x):
        return run(state, x)

    for b, x in ids.items():
        step, compile_s = timed(lambda: forward(x), args.repeats, jax.block_until_ready)
        got = np.asarray(forward(x), np.float32)
        row = {
            "batch": b, "jax_s": step, "jax_compile_s": compile_s, "torch_bf16_s": torch_rows[b]["torch_bf16_s"],
            "jax_bf16_rel_err": rel(got, want[b]), "torch_bf16_rel_err": rel(torch_rows[b]["bf16_out"], want[b]),
        }
        results["rows"].append(row)
    stats = jax.devices()[0].memory_stats() or {}
    results["jax_peak_gib"] = stats.get("peak_bytes_in_use", 0) / 2**30
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"device {results['device']}; save {results['save_s']:.1f} s, load_t5 {results['load_s']:.1f} s, "
          f"JAX peak {results['jax_peak_gib']:.1f} GiB")
    print(f"{'batch':>5} {'jax s':>8} {'compile s':>9} {'torch s':>8} {'jax err':>9} {'torch err':>9}")
    for r in results["rows"]:
        print(f"{r['batch']:5d} {r['jax_s']:8.4f} {r['jax_compile_s']:9.1f} {r['torch_bf16_s']:8.4f} "
              f"{r['jax_bf16_rel_err']:9.2e} {r['torch_bf16_rel_err']:9.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
