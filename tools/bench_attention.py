"""Attention implementations at the 2B model's shapes: time of forward+backward and error against XLA.

    PYTHONPATH=. python3 tools/bench_attention.py --out bench_attention.json [--length 17776] [--batch 1]

On all local devices: the single-device kernels ("xla", "cudnn" on GPU, "splash" on TPU) run on device 0;
the context-parallel ones ("ring", "context_gather") run on a mesh whose `context` axis spans every device
(the length must divide by the device count; the default 17 776 = 2^4 x 1111 divides by 2, 4, 8 and 16).
bf16 inputs, 30 heads x 64. Errors: relative ‖a−b‖/‖b‖ of the output against "xla" in float32, measured at
--check-length (XLA's (L, L) scores do not fit at full length). Median of --repeats timed calls after one
compile call; prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench_attention.json")
    parser.add_argument("--length", type=int, default=17776)
    parser.add_argument("--check-length", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=30)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from insvie_jax.models.attention import attention
    from insvie_jax.parallel.sharding import logical_rules

    backend = jax.default_backend()
    single = ["xla"] + {"gpu": ["cudnn"], "tpu": ["splash"]}.get(backend, [])
    mesh = Mesh(np.array(jax.devices()).reshape(1, 1, 1, -1), ("data", "fsdp", "tensor", "context"))
    rules = [["batch", ["data", "fsdp"]], ["length", "context"], ["heads", "tensor"], ["head_dim", None]]

    def inputs(length, dtype):
        keys = jax.random.split(jax.random.key(0), 3)
        shape = (args.batch, length, args.heads, args.head_dim)
        return [jax.random.normal(key, shape, jnp.float32).astype(dtype) for key in keys]

    def compiled(impl, grad):
        """The jitted call, built once so that timed calls reuse its compilation."""
        fn = lambda q, k, v: attention(q, k, v, impl)  # noqa: E731
        if grad:
            fn = jax.grad(lambda q, k, v: jnp.sum(attention(q, k, v, impl).astype(jnp.float32)), argnums=(0, 1, 2))
        fn = jax.jit(fn)
        if impl not in ("ring", "context_gather"):
            return fn

        def under_mesh(q, k, v):  # the mesh is read while tracing
            with logical_rules(mesh, rules):
                return fn(q, k, v)
        return under_mesh

    rows = []
    want = compiled("xla", grad=False)(*inputs(args.check_length, jnp.float32))
    for impl in single + (["ring", "context_gather"] if jax.device_count() > 1 else []):
        row = {"implementation": impl, "devices": 1 if impl in single else jax.device_count()}
        # cuDNN takes 16-bit inputs only: its error is that of bf16 inputs against float32 XLA.
        check_dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
        got = compiled(impl, grad=False)(*inputs(args.check_length, check_dtype)).astype(jnp.float32)
        row["rel_err_fp32"] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
        q, k, v = inputs(args.length, jnp.bfloat16)
        step = compiled(impl, grad=True)
        try:
            jax.block_until_ready(step(q, k, v))
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                jax.block_until_ready(step(q, k, v))
                times.append(time.perf_counter() - start)
            row["fwd_bwd_ms"] = 1e3 * statistics.median(times)
        except Exception as error:  # noqa: BLE001 -- out of memory for "xla" at full length is a result
            row["error"] = f"{type(error).__name__}: {str(error)[:200]}"
        rows.append(row)
        print(f"{impl:16s} devices={row['devices']:2d} rel_err={row['rel_err_fp32']:.1e} "
              f"fwd+bwd={row.get('fwd_bwd_ms', float('nan')):9.2f} ms {row.get('error', '')}", flush=True)
    meta = {"backend": backend, "devices": jax.device_count(), **vars(args)}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
