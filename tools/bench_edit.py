"""A 3-way-guided edit on one GPU: our jitted sampling loop (JAX) against diffusers (PyTorch), as ratios.

    PYTHONPATH=. python3 tools/bench_edit.py --out bench_edit.json [--steps 50] [--with-vae]

Workloads, each in its own subprocess (so each peak memory is its own and JAX's and PyTorch's allocators
never share the card):
- `loop`: the 2B edit transformer with random weights of the real shapes, bf16, sampling one 49x480x720 clip
  (13x60x90x16 latents, 226 text tokens) for --steps steps with InsViE's 3-way guidance, latents in, latents
  out. Ours: `insvie_jax.sample.loop.sample` (one jitted `lax.scan`; the three guidance branches batched in
  one model call per step; sampler --sampler, default diffusers' CogVideoX DPM so both run the same update).
  diffusers: `CogVideoXTransformer3DModel` called on a batch of 3 per step + `CogVideoXDPMScheduler`, eager,
  bf16 weights, the pipeline's loop written out (guidance on the model output, as the pipeline does).
- `vae` (with --with-vae): encode (posterior sample) + decode of the 49x480x720 clip with the CogVideoX VAE,
  random weights, bf16, default frame batching, no tiling; ours vs diffusers' `AutoencoderKLCogVideoX`.
The T5 runs once per edit and is not timed here (tools/bench_t5.py). Timing: ours reports compile
separately (first call minus a timed second call); diffusers is warmed up with 2 steps first. Device
synchronised; median of --repeats.
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


def _config(args):
    sys.path.insert(0, str(ROOT))
    from insvie_jax import config as configlib

    return configlib.load(args.preset, [f"sample.steps={args.steps}", f"sample.sampler={args.sampler}",
                                   "model.dtype=bfloat16", f"model.param_dtype={args.param_dtype}",
                                   "vae.dtype=bfloat16", f"vae.param_dtype={args.param_dtype}"])


def _latent_shape(cfg):
    d, v = cfg.data, cfg.vae
    return ((d.num_frames - 1) // v.temporal_compression + 1, d.height // v.spatial_compression,
            d.width // v.spatial_compression, cfg.model.in_channels)


def _timed_jax(fn, repeats: int):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def run_jax(workload: str, args) -> dict:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    cfg = _config(args)
    import jax
    import jax.numpy as jnp

    from insvie_jax.models import transformer
    from insvie_jax.models import vae as vae_model
    from insvie_jax.sample import edit, loop

    key = jax.random.key(0)
    if workload == "loop":
        model = transformer.build(cfg.model)
        source = jax.random.normal(key, (1, *_latent_shape(cfg)), jnp.float32)
        text = jax.random.normal(jax.random.fold_in(key, 1), (1, cfg.model.text_length, cfg.model.text_embed_dim),
                                 jnp.bfloat16)
        first, times = _timed_jax(
            lambda: loop.sample(model, source, text, key, cfg.sample, cfg.diffusion, progress=args.progress),
            args.repeats)
    else:
        vae = vae_model.build(cfg.vae, 0)
        d = cfg.data
        video = jax.random.uniform(key, (1, d.num_frames, d.height, d.width, 3), jnp.float32, -1, 1)
        first, times = _timed_jax(lambda: edit.decode_latents(vae, edit.encode_video(vae, video, key)), args.repeats)
    run_s = statistics.median(times)
    stats = jax.devices()[0].memory_stats() or {}
    return {"impl": "jax", "workload": workload, "run_s": run_s, "compile_s": first - run_s, "times": times,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30, "device": jax.devices()[0].device_kind,
            "jax": jax.__version__, "sampler": args.sampler, "param_dtype": args.param_dtype}


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke runs of this script only


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _torch_loop(cfg, args):
    """The diffusers pipeline's denoising loop, InsViE-style: [noisy | source] channels, 3 branches per call."""
    import numpy as np
    import torch
    from diffusers import CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from insvie_jax.convert.diffusers_keys import diffusers_config
    from insvie_jax.diffusion.guidance import guidance_scales

    kwargs = {k: v for k, v in diffusers_config(cfg.model).items() if not k.startswith("_")}
    model = CogVideoXTransformer3DModel(**kwargs).to(_device(), torch.bfloat16).eval()
    diff = cfg.diffusion
    scheduler = CogVideoXDPMScheduler(
        num_train_timesteps=diff.num_train_timesteps, beta_start=diff.beta_start, beta_end=diff.beta_end,
        beta_schedule="scaled_linear", prediction_type="v_prediction", rescale_betas_zero_snr=True,
        snr_shift_scale=diff.snr_shift_scale, timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    f, h, w, c = _latent_shape(cfg)
    gen = torch.Generator(_device()).manual_seed(0)
    source = torch.randn(1, f, c, h, w, device=_device(), dtype=torch.bfloat16, generator=gen)
    text = torch.randn(1, cfg.model.text_length, cfg.model.text_embed_dim, device=_device(), dtype=torch.bfloat16,
                       generator=gen)
    source3 = torch.cat([torch.zeros_like(source), source, source])
    text3 = torch.cat([torch.zeros_like(text), torch.zeros_like(text), text])

    @torch.no_grad()
    def sample(steps: int):
        scheduler.set_timesteps(steps, device=_device())
        timesteps = scheduler.timesteps
        s_txt, s_src = guidance_scales(cfg.sample.guidance_schedule, np.asarray(timesteps.cpu()),
                                       cfg.sample.text_scale, cfg.sample.source_scale, cfg.sample.guidance_exponent)
        latents = torch.randn(1, f, c, h, w, device=_device(), dtype=torch.bfloat16, generator=gen)
        old_x0 = None
        for i, t in enumerate(timesteps):
            x3 = torch.cat([latents] * 3)
            v = model(hidden_states=torch.cat([x3, source3], dim=2), encoder_hidden_states=text3,
                      timestep=t.expand(3), return_dict=False)[0].float()
            v_uu, v_cu, v_cc = v.chunk(3)
            v = v_uu + float(s_src[i]) * (v_cu - v_uu) + float(s_txt[i]) * (v_cc - v_cu)
            latents, old_x0 = scheduler.step(v, old_x0, t, timesteps[i - 1] if i > 0 else None, latents,
                                             return_dict=False)
            latents = latents.to(torch.bfloat16)
        return latents

    return sample


def _torch_vae(cfg):
    import torch
    from diffusers import AutoencoderKLCogVideoX

    from insvie_jax.convert.vae_keys import diffusers_vae_config

    kwargs = {k: v for k, v in diffusers_vae_config(cfg.vae).items() if not k.startswith("_")}
    vae = AutoencoderKLCogVideoX(**kwargs).to(_device(), torch.bfloat16).eval()
    d = cfg.data
    video = torch.rand(1, 3, d.num_frames, d.height, d.width, device=_device(), dtype=torch.bfloat16) * 2 - 1

    @torch.no_grad()
    def run(_steps=None):
        return vae.decode(vae.encode(video).latent_dist.sample()).sample

    return run


def run_torch(workload: str, args) -> dict:
    cfg = _config(args)
    import torch

    fn = _torch_loop(cfg, args) if workload == "loop" else _torch_vae(cfg)
    fn(2)  # warm-up: cuDNN / kernel selection
    _sync()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        fn(args.steps)
        _sync()
        times.append(time.perf_counter() - t0)
    return {"impl": "torch", "workload": workload, "run_s": statistics.median(times), "times": times,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "torch": torch.__version__}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cogvideox-2b-edit", help="model sizes (tiny: a CPU smoke run)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="cogvideox_dpm", choices=("cogvideox_dpm", "dpmpp_2m_sde", "ddim"),
                        help="our sampler (diffusers always runs CogVideoXDPMScheduler)")
    parser.add_argument("--param-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="our weights' dtype (diffusers: bf16); compute is bf16 either way")
    parser.add_argument("--progress", action="store_true", help="our loop with its progress bar (host callbacks)")
    parser.add_argument("--with-vae", action="store_true", help="also time VAE encode + decode")
    parser.add_argument("--impls", nargs="+", default=["jax", "torch"])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default="bench_edit.json")
    parser.add_argument("--worker", nargs=2, metavar=("IMPL", "WORKLOAD"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        impl, workload = args.worker
        result = (run_jax if impl == "jax" else run_torch)(workload, args)
        print("RESULT " + json.dumps({**result, "steps": args.steps}))
        return 0

    workloads = ["loop", "vae"] if args.with_vae else ["loop"]
    results = []
    for workload in workloads:
        for impl in args.impls:
            cmd = [sys.executable, __file__, "--worker", impl, workload, "--preset", args.preset, "--steps", str(args.steps),
                   "--sampler",
                   args.sampler, "--param-dtype", args.param_dtype, "--repeats", str(args.repeats)]
            cmd += ["--progress"] if args.progress else []
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode or not lines:
                results.append({"impl": impl, "workload": workload, "error": proc.stderr[-3000:]})
            else:
                results.append(json.loads(lines[-1][7:]))
            print(json.dumps(results[-1])[:400], flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))

    print(f"\n{'workload':9} {'impl':6} {'run s':>8} {'s/step':>8} {'compile s':>10} {'peak GiB':>9}")
    by_key = {}
    for r in results:
        if "error" in r:
            print(f"{r['workload']:9} {r['impl']:6} ERROR {r['error'][-300:]!r}")
            continue
        by_key[(r["workload"], r["impl"])] = r
        per_step = f"{r['run_s'] / args.steps:8.3f}" if r["workload"] == "loop" else f"{'':8}"
        print(f"{r['workload']:9} {r['impl']:6} {r['run_s']:8.2f} {per_step} {r.get('compile_s', 0):10.1f} "
              f"{r['peak_gib']:9.1f}")
    for workload in workloads:
        ours, ref = by_key.get((workload, "jax")), by_key.get((workload, "torch"))
        if ours and ref:
            print(f"{workload}: speed-up {ref['run_s'] / ours['run_s']:.2f}x over diffusers, "
                  f"memory {ours['peak_gib'] / max(ref['peak_gib'], 1e-9):.2f}x of diffusers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
