"""Times the full-size CogVideoX VAE (2B/5B architecture, random weights, bf16): ours (JAX) vs diffusers (torch CUDA).

Encode a 49x480x720 clip and decode 13 latent frames, in the frame-batched mode (diffusers' default: 8 pixel /
2 latent frames per pass) and the tiled mode (diffusers `enable_tiling()` + `enable_slicing()`), with the same
weights and inputs on both sides. Prints a table (time, peak memory, ours/diffusers ratios, the relative
difference of the outputs, and each bf16 output's relative error to diffusers in float32) and writes JSON to
`$OUT/bench_vae.json` (or `--out`).

    python tools/bench_vae.py [--out DIR] [--repeats 3] [--skip-diffusers] [--frames 49 --height 480 --width 720]

Diffusers runs first and frees its CUDA cache before JAX starts (JAX is told not to preallocate), so the two do
not compete for memory. Our peak memory is XLA's compiled estimate (arguments + outputs + temporaries of the
one program) and the device's peak-in-use counter after the run (monotonic over the process).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GIB = 1024**3


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(frames: int, height: int, width: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    video = rng.uniform(-1, 1, (1, frames, height, width, 3)).astype(np.float32)
    latent_frames = (frames - 1) // 4 + 1
    latents = rng.standard_normal((1, latent_frames, height // 8, width // 8, 16)).astype(np.float32)
    return video, latents


def timed(fn, repeats: int, sync):
    """(first-call seconds, median of `repeats` further calls, last output)."""
    t = time.perf_counter()
    out = fn()
    sync(out)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        sync(out)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), out


def bench_diffusers(video, latents, repeats: int, device: str):
    """Random-weight diffusers VAE in bf16; returns (results, its state dict as float32 numpy)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX

    cuda = device.startswith("cuda")
    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX().to(device, torch.bfloat16).eval()
    state = {k: v.float().cpu().numpy() for k, v in vae.state_dict().items()}
    video_t = torch.from_numpy(video.transpose(0, 4, 1, 2, 3)).to(device, torch.bfloat16)
    latents_t = torch.from_numpy(latents.transpose(0, 4, 1, 2, 3)).to(device, torch.bfloat16)

    def sync(_):
        if cuda:
            torch.cuda.synchronize()

    results = {}
    for mode in ("frames", "tiled"):
        if mode == "tiled":
            vae.enable_tiling()
            vae.enable_slicing()
        for op, fn in (("encode", lambda: vae.encode(video_t).latent_dist.mean),
                       ("decode", lambda: vae.decode(latents_t).sample)):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            with torch.no_grad():
                first, median, out = timed(fn, repeats, sync)
            results[f"{op}/{mode}"] = {
                "first_s": first, "time_s": median,
                "peak_gib": torch.cuda.max_memory_allocated() / GIB if cuda else None,
                "output": out.float().cpu().numpy().transpose(0, 2, 3, 4, 1),
            }
    # float32 outputs of the same weights and mode: how far each bf16 run is from full precision
    vae.float()
    video_t, latents_t = video_t.float(), latents_t.float()
    for mode in ("frames", "tiled"):
        if mode == "frames":
            vae.disable_tiling()
        else:
            vae.enable_tiling()
        with torch.no_grad():
            for op, fn in (("encode", lambda: vae.encode(video_t).latent_dist.mean),
                           ("decode", lambda: vae.decode(latents_t).sample)):
                results[f"{op}/{mode}"]["fp32"] = fn().cpu().numpy().transpose(0, 2, 3, 4, 1)
                if cuda:
                    torch.cuda.empty_cache()
    del vae, video_t, latents_t
    if cuda:
        torch.cuda.empty_cache()
    return results, state


def bench_ours(state, video, latents, repeats: int):
    import jax
    from flax import nnx

    from insvie_jax.config import VAEConfig
    from insvie_jax.convert import vae_keys
    from insvie_jax.models import vae as vae_model
    from insvie_jax.models.params import flat_params

    base = VAEConfig(dtype="bfloat16", param_dtype="bfloat16")
    # diffusers' weights when it ran, else our own random ones
    flat = vae_keys.vae_from_diffusers(state) if state is not None else flat_params(vae_model.build(base))
    results = {}
    for mode, overrides in (("frames", {}), ("tiled", {"tiling": True})):
        model = vae_keys.vae_with_params(dataclasses.replace(base, **overrides), flat)
        graphdef, params = nnx.split(model)
        for op, x in (("encode", video), ("decode", latents)):
            def run(params, x, op=op):
                vae = nnx.merge(graphdef, params)
                return vae.encode(x).mean if op == "encode" else vae.decode(x)

            x = jax.device_put(x.astype(jax.numpy.bfloat16))
            t = time.perf_counter()
            compiled = jax.jit(run).lower(params, x).compile()
            compile_s = time.perf_counter() - t
            memory = compiled.memory_analysis()
            estimate = None
            if memory is not None:
                estimate = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                            - memory.alias_size_in_bytes) / GIB
            first, median, out = timed(lambda: compiled(params, x), repeats, lambda o: o.block_until_ready())
            stats = jax.devices()[0].memory_stats() or {}
            results[f"{op}/{mode}"] = {
                "compile_s": compile_s, "first_s": first, "time_s": median, "peak_gib": estimate,
                "device_peak_gib": stats.get("peak_bytes_in_use", 0) / GIB, "output": np.asarray(out, np.float32),
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "."), help="folder for bench_vae.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-diffusers", action="store_true", help="time ours only (no torch needed)")
    parser.add_argument("--torch-device", default="cuda")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=720)
    args = parser.parse_args()

    import jax

    video, latents = inputs(args.frames, args.height, args.width)
    theirs, state = ({}, None) if args.skip_diffusers else bench_diffusers(video, latents, args.repeats,
                                                                           args.torch_device)
    ours = bench_ours(state, video, latents, args.repeats)

    rows, report = [], {"device": str(jax.devices()[0].device_kind), "frames": args.frames, "height": args.height,
                        "width": args.width, "latent_frames": latents.shape[1], "repeats": args.repeats,
                        "results": {}}
    for key, o in ours.items():
        entry = {f"ours_{k}": v for k, v in o.items() if k != "output"}
        t = theirs.get(key)
        if t is not None:
            entry.update({f"diffusers_{k}": v for k, v in t.items() if k not in ("output", "fp32")})
            entry["ours_rel_to_fp32"] = rel(o["output"], t["fp32"])
            entry["diffusers_rel_to_fp32"] = rel(t["output"], t["fp32"])
            entry["time_ratio"] = o["time_s"] / t["time_s"]
            if t["peak_gib"]:
                entry["peak_ratio"] = (o["peak_gib"] or o["device_peak_gib"]) / t["peak_gib"]
            entry["rel_diff"] = rel(o["output"], t["output"])
        report["results"][key] = entry
        rows.append((key, o["time_s"], t and t["time_s"], o["peak_gib"], t and t["peak_gib"],
                     entry.get("time_ratio"), entry.get("rel_diff"), entry.get("ours_rel_to_fp32"),
                     entry.get("diffusers_rel_to_fp32")))

    def fmt(v, spec):
        return format(v, spec) if v is not None else "-"

    print(f"CogVideoX VAE, {args.frames}x{args.height}x{args.width} / {latents.shape[1]} latents, bf16, "
          f"{report['device']}")
    print(f"{'op/mode':16} {'ours s':>8} {'diff s':>8} {'ours GiB':>9} {'diff GiB':>9} {'t ratio':>8} "
          f"{'rel diff':>9} {'ours~f32':>9} {'diff~f32':>9}")
    for key, to, td, mo, md, ratio, diff, of32, df32 in rows:
        print(f"{key:16} {fmt(to, '8.3f')} {fmt(td, '8.3f')} {fmt(mo, '9.2f')} {fmt(md, '9.2f')} "
              f"{fmt(ratio, '8.2f')} {fmt(diff, '9.2e')} {fmt(of32, '9.2e')} {fmt(df32, '9.2e')}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_vae.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'bench_vae.json'}")


if __name__ == "__main__":
    main()
