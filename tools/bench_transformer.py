"""Transformer fwd+bwd on one GPU: ours (JAX) and diffusers (PyTorch) side by side, as ratios.

    python tools/bench_transformer.py --out bench.json [--presets cogvideox-2b-edit] [--remat none full]

Each workload runs in its own subprocess so that its peak memory is its own and JAX's and PyTorch's
allocators never share the card. Random weights of the real shapes; one 49x480x720 clip (13x60x90 latents,
17 776 tokens with text); batch 1; bf16 compute. Ours keeps fp32 master parameters and takes gradients
with respect to them (the training configuration); the reference runs diffusers in bf16 weights, eager,
SDPA attention, as measured in the issue. Timing: warm-up excluded, compile reported separately, device
synchronised, median of --repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_jax(preset: str, remat: str, frames: int, height: int, width: int, repeats: int) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.path.insert(0, str(ROOT))
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from insvie_jax import config as configlib
    from insvie_jax.models import transformer

    cfg = configlib.load(preset, [f"model.remat_policy={remat}", "model.dtype=bfloat16"]).model
    model = transformer.build(cfg)
    graphdef, params = nnx.split(model, nnx.Param)
    key = jax.random.key(0)
    shape = (1, frames, height // 8, width // 8, cfg.in_channels)
    batch = {
        "noisy": jax.random.normal(key, shape, jnp.bfloat16),
        "source": jax.random.normal(jax.random.fold_in(key, 1), shape, jnp.bfloat16),
        "text": jax.random.normal(jax.random.fold_in(key, 2), (1, cfg.text_length, cfg.text_embed_dim), jnp.bfloat16),
        "target": jax.random.normal(jax.random.fold_in(key, 3), shape, jnp.float32),
        "t": jnp.array([500.0], jnp.float32),
    }

    @jax.jit
    def grad_step(params, batch):
        def loss(params):
            out = nnx.merge(graphdef, params)(batch["noisy"], batch["source"], batch["text"], batch["t"])
            return jnp.mean(jnp.square(out - batch["target"]))

        return jax.value_and_grad(loss)(params)

    t0 = time.perf_counter()
    jax.block_until_ready(grad_step(params, batch))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(grad_step(params, batch))
        times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    flops = 3 * transformer.forward_flops(cfg, frames, height // 8, width // 8)
    return {
        "impl": "jax", "preset": preset, "remat": remat, "step_s": step, "compile_s": first - step,
        "times": times, "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "tflops": flops / step / 1e12,
        "device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
    }


def run_torch(preset: str, remat: str, frames: int, height: int, width: int, repeats: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from insvie_jax import config as configlib
    from insvie_jax.convert.diffusers_keys import diffusers_config
    from insvie_jax.models.embeddings import rope_3d
    from insvie_jax.models.transformer import forward_flops

    cfg = configlib.load(preset).model
    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    model = CogVideoXTransformer3DModel(**kwargs).to("cuda", torch.bfloat16).train()
    if remat != "none":
        model.enable_gradient_checkpointing()
    lat_h, lat_w = height // 8, width // 8
    x = torch.randn(1, frames, 2 * cfg.in_channels, lat_h, lat_w, device="cuda", dtype=torch.bfloat16)
    text = torch.randn(1, cfg.text_length, cfg.text_embed_dim, device="cuda", dtype=torch.bfloat16)
    target = torch.randn(1, frames, cfg.out_channels, lat_h, lat_w, device="cuda", dtype=torch.float32)
    t = torch.tensor([500], device="cuda")
    rope = None
    if cfg.positions == "rope":
        import numpy as np

        p = cfg.patch_size
        cos, sin = rope_3d(cfg.attention_head_dim, frames, lat_h // p, lat_w // p, cfg.sample_height // p,
                           cfg.sample_width // p, cfg.rope_theta)
        rope = (torch.from_numpy(np.asarray(cos)).cuda(), torch.from_numpy(np.asarray(sin)).cuda())

    def step():
        model.zero_grad(set_to_none=True)
        out = model(x, text, t, image_rotary_emb=rope, return_dict=False)[0]
        loss = torch.mean(torch.square(out.float() - target))
        loss.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    step_s = statistics.median(times)
    flops = 3 * forward_flops(cfg, frames, lat_h, lat_w)
    return {
        "impl": "torch", "preset": preset, "remat": remat, "step_s": step_s, "times": times,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "tflops": flops / step_s / 1e12,
        "torch": torch.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["cogvideox-2b-edit"])
    parser.add_argument("--remat", nargs="+", default=["none", "full"])
    parser.add_argument("--impls", nargs="+", default=["jax", "torch"])
    parser.add_argument("--frames", type=int, default=13, help="latent frames")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench_transformer.json")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        impl, spec = args.worker
        preset, remat = spec.split(":")
        fn = run_jax if impl == "jax" else run_torch
        print("RESULT " + json.dumps(fn(preset, remat, args.frames, args.height, args.width, args.repeats)))
        return 0

    results = []
    for preset in args.presets:
        for remat in args.remat:
            for impl in args.impls:
                cmd = [sys.executable, __file__, "--worker", impl, f"{preset}:{remat}", "--frames", str(args.frames),
                       "--height", str(args.height), "--width", str(args.width), "--repeats", str(args.repeats)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not lines:
                    results.append({"impl": impl, "preset": preset, "remat": remat, "error": proc.stderr[-3000:]})
                else:
                    results.append(json.loads(lines[-1][7:]))
                print(json.dumps(results[-1])[:400], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\n{'preset':20} {'remat':6} {'impl':6} {'step s':>8} {'compile s':>10} {'peak GiB':>9} {'TFLOP/s':>8}")
    by_key = {}
    for r in results:
        if "error" in r:
            print(f"{r['preset']:20} {r['remat']:6} {r['impl']:6} ERROR {r['error'][-200:]!r}")
            continue
        by_key[(r["preset"], r["remat"], r["impl"])] = r
        print(f"{r['preset']:20} {r['remat']:6} {r['impl']:6} {r['step_s']:8.3f} {r.get('compile_s', 0):10.1f} "
              f"{r['peak_gib']:9.1f} {r['tflops']:8.0f}")
    for (preset, remat, impl), r in by_key.items():
        ref = by_key.get((preset, remat, "torch"))
        if impl == "jax" and ref:
            print(f"{preset} remat={remat}: speed-up {ref['step_s'] / r['step_s']:.2f}x, "
                  f"memory {r['peak_gib'] / max(ref['peak_gib'], 1e-9):.2f}x of PyTorch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
