"""Per-chip memory of the bench's transformer fwd+bwd (bf16 weights, batch 1), compiled on this CPU machine by
the real TPU compiler for one abstract TPU chip (jax.experimental.topologies; no TPU needed), or for the
local device.

    ALLOW_MULTIPLE_LIBTPU_LOAD=1 python tools/memory_analysis.py cogvideox-2b-edit --remat full attention
    ... --dump DIR   # XLA's dumps (optimised HLO, buffer assignment / memory report)
    ... --topology local   # this machine's first device instead (a GPU: cuDNN attention), compiled only

Prints XLA's compiled memory_analysis(): arguments (weights + inputs), outputs (loss, gradients, model output),
temporaries, and the peak these imply. Attention is the splash kernel (what a TPU runs), so the `attention`
remat policy, which keeps cuDNN's flash forward outputs, saves nothing more than `full` here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GIB = 2**30


def analyse(preset: str, remat: str, overrides: list[str], topology: str) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.experimental import topologies
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from insvie_jax import config as configlib
    from insvie_jax.bench.transformer import loss_and_grads
    from insvie_jax.models import attention as attention_mod
    from insvie_jax.train import state as statelib

    tpu = topology != "local"
    cfg = configlib.load(preset, ["model.param_dtype=bfloat16", *(["model.attention=splash"] if tpu else []),
                                  f"model.remat_policy={remat}", *overrides])
    # The splash kernel picks interpret mode from the default backend (CPU here); the TPU compiler needs Mosaic.
    kernel = attention_mod._splash_kernel
    if tpu:
        attention_mod._splash_kernel = lambda *a, interpret, **k: kernel(*a, interpret=False, **k)
    try:
        devices = (topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                                chips_per_host_bounds=(1, 1, 1)).devices if tpu else jax.devices())
        mesh = Mesh(devices[:1], ("data",))
        replicated = NamedSharding(mesh, PartitionSpec())
        model = nnx.eval_shape(lambda: statelib.trained_model(cfg))
        graphdef, trainable, frozen = statelib.split_model(model, cfg)
        f, h, w, c = configlib.latent_shape(cfg)
        m = cfg.model
        bf16, f32 = jnp.dtype(m.dtype), jnp.float32
        batch = {"noisy": jax.ShapeDtypeStruct((1, f, h, w, c), bf16),
                 "source": jax.ShapeDtypeStruct((1, f, h, w, c), bf16),
                 "text": jax.ShapeDtypeStruct((1, m.text_length, m.text_embed_dim), bf16),
                 "target": jax.ShapeDtypeStruct((1, f, h, w, m.out_channels), f32),
                 "timestep": jax.ShapeDtypeStruct((1,), f32)}
        compiled = jax.jit(loss_and_grads(graphdef), in_shardings=replicated,
                           out_shardings=replicated).lower(trainable, frozen, batch).compile()
    finally:
        attention_mod._splash_kernel = kernel
    mem = compiled.memory_analysis()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((trainable, frozen)))
    row = {"preset": preset, "remat": remat, "topology": topology, "device": devices[0].device_kind,
           "overrides": overrides,
           "weights_gib": weights / GIB,
           "argument_gib": mem.argument_size_in_bytes / GIB, "output_gib": mem.output_size_in_bytes / GIB,
           "temp_gib": mem.temp_size_in_bytes / GIB, "alias_gib": mem.alias_size_in_bytes / GIB}
    row["total_gib"] = row["argument_gib"] + row["output_gib"] + row["temp_gib"] - row["alias_gib"]
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", help="config preset or YAML (cogvideox-2b-edit, cogvideox-5b-edit)")
    parser.add_argument("--remat", nargs="+", default=["full", "attention"])
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--topology", default="v5p:1x1x1")
    parser.add_argument("--dump", help="folder for XLA's dumps (one remat policy)")
    parser.add_argument("--out", help="JSON file of the rows")
    args = parser.parse_args(argv)
    if args.dump:  # read when the backend starts (GPU) or compiles (TPU topology)
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={args.dump} --xla_dump_hlo_as_text"
    rows = []
    for remat in args.remat:
        row = analyse(args.preset, remat, args.overrides, args.topology)
        rows.append(row)
        print(f"{args.preset} remat={remat} on one {args.topology} chip: weights {row['weights_gib']:.2f} GiB, "
              f"arguments {row['argument_gib']:.2f}, outputs {row['output_gib']:.2f}, "
              f"temporaries {row['temp_gib']:.2f}, aliased {row['alias_gib']:.2f}, total {row['total_gib']:.2f} GiB",
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
