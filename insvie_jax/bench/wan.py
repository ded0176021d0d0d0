"""Wan2.2-TI2V-5B edit transformer (Lucy-Edit layout) speed and memory, ours against diffusers, one side per process:

    python -m insvie_jax.bench.wan jax   --frames 21 --height 44 --width 80 --out ours.json
    python -m insvie_jax.bench.wan torch --frames 21 --height 44 --width 80 --out ref.json
    python -m insvie_jax.bench.wan jax --loop 50 --remat --out ours.json   # the whole guided sampling loop only

Random weights of the real shapes in bf16 on both sides (as the CogVideoX fwd+bwd rows), batch 1 (2 for the
guided step: a 2-way CFG step is one batch-2 forward), latents (F, H, W) = 21x44x80 for 81x704x1280 video.
Rows: forward (per-sample and per-token timesteps), guided step, fwd+bwd (parameter gradients of a mean square)
with remat `attention` / `full` (diffusers: gradient checkpointing). Median of `--repeats` synchronised calls,
the first call apart; peak memory of the process's allocator. diffusers runs as `LucyEditPipeline` calls it:
per-token timesteps (`expand_timesteps`). `--loop N`: the whole N-step 2-way guided sampling loop (flow UniPC,
shift 5, CFG 5) timed once after a warm-up: ours one compiled `lax.scan` (`sample.wan_edit.sample_latents`),
diffusers the pipeline's denoising loop (two transformer calls a step, `UniPCMultistepScheduler`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def _median(fn, sync, repeats):
    start = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "first_s": first}


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from insvie_jax.models.wan import transformer as wan
    from insvie_jax.models.wan.config import WanModelConfig

    f, h, w = args.frames, args.height, args.width
    tokens = f * (h // 2) * (w // 2)
    rows = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}

    def inputs(batch):
        key = jax.random.key(0)
        noisy = jax.random.normal(key, (batch, f, h, w, 48), jnp.bfloat16)
        text = jax.random.normal(key, (batch, 512, 4096), jnp.bfloat16)
        return noisy, noisy, text

    def peak():
        return jax.devices()[0].memory_stats()["peak_bytes_in_use"] / 2**30

    if args.loop:
        return _jax_loop(args, rows, inputs, peak)
    for remat in ("none", *args.remat):
        cfg = WanModelConfig(param_dtype="bfloat16", dtype="bfloat16", remat_policy=remat)
        model = wan.build(cfg)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        del model
        if remat == "none":
            fwd = jax.jit(lambda p, *a: nnx.merge(graphdef, p, rest)(*a))
            for batch, name in ((1, "forward"), (2, "guided_step")):
                noisy, source, text = inputs(batch)
                t = jnp.full((batch,), 500.0)
                rows[name] = _median(lambda: fwd(params, noisy, source, text, t), jax.block_until_ready, args.repeats)
                rows[name]["peak_gib"] = peak()
            if args.per_token:
                t = jnp.full((1, tokens), 500.0)
                noisy, source, text = inputs(1)
                rows["forward_per_token_t"] = _median(lambda: fwd(params, noisy, source, text, t),
                                                      jax.block_until_ready, args.repeats)
            rows["flops_forward"] = wan.forward_flops(cfg, f, h, w)
        else:
            @jax.jit
            def fwdbwd(p, noisy, source, text, t):
                def loss(p):
                    return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(noisy, source, text, t)))
                return jax.grad(loss)(p)

            noisy, source, text = inputs(1)
            t = jnp.full((1,), 500.0)
            rows[f"fwdbwd_{remat}"] = _median(lambda: fwdbwd(params, noisy, source, text, t),
                                              jax.block_until_ready, args.repeats)
            rows[f"fwdbwd_{remat}"]["peak_gib"] = peak()
        params = rest = None  # free the weights before the next policy builds its own
    return rows


def _jax_loop(args, rows, inputs, peak) -> dict:
    """The whole guided sampling loop: compiled once (timed apart), then run once."""
    import jax
    from flax import nnx

    from insvie_jax.models.wan import transformer as wan
    from insvie_jax.models.wan.config import WanModelConfig
    from insvie_jax.sample import wan_edit

    graphdef, state = nnx.split(wan.build(WanModelConfig(param_dtype="bfloat16", dtype="bfloat16")))
    settings = wan_edit.WanEditSettings(steps=args.loop)
    noisy, source, text = inputs(1)
    negative = jax.numpy.zeros_like(text)

    @jax.jit
    def run(state, source, text, negative, noisy):
        return wan_edit.sample_latents(nnx.merge(graphdef, state), source, text, negative, noisy, settings)

    start = time.perf_counter()
    compiled = run.lower(state, source, text, negative, noisy).compile()
    rows["loop_compile_s"] = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, source, text, negative, noisy))
    rows[f"sample_loop_{args.loop}"] = {"s": time.perf_counter() - start, "peak_gib": peak()}
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("side", choices=("jax", "torch"))
    parser.add_argument("--frames", type=int, default=21)
    parser.add_argument("--height", type=int, default=44)
    parser.add_argument("--width", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--remat", nargs="*", default=["attention", "full"], help="fwd+bwd rows (jax side)")
    parser.add_argument("--per-token", action="store_true", help="also time per-token timesteps (jax side)")
    parser.add_argument("--loop", type=int, default=0, help="time only the whole N-step guided sampling loop")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.side == "jax":
        rows = run_jax(args)
    else:
        from insvie_jax.convert.torch_reference import wan_transformer_reference

        from insvie_jax.convert.torch_reference import wan_sampling_loop_reference

        rows = (wan_sampling_loop_reference(args.frames, args.height, args.width, args.loop) if args.loop else
                wan_transformer_reference(args.frames, args.height, args.width, args.repeats, _median))
    rows["latent"] = [args.frames, args.height, args.width]
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=2)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
