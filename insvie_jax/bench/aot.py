"""`insvie-jax compile`: a config checked against a TPU pod slice before any pod is rented.

The mesh is built from the slice's abstract devices exactly as a run builds it (parallel/mesh.py), the train
step (and with `edit`, one guided sampling step: 3-way for CogVideoX, sample.guidance's for Wan) is lowered with
the run's shardings and compiled by the real TPU compiler (libtpu) on this machine, and the compiled program tells
per-chip memory, the collectives it runs and its cost. Nothing is allocated: arrays are shapes only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax import config as configlib
from insvie_jax.convert.models import build_transformer
from insvie_jax.diffusion import flow, flow_guidance, guidance, samplers
from insvie_jax.models import attention as attentionlib
from insvie_jax.models import family
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.parallel import sharding as shardlib
from insvie_jax.parallel import topology as topologylib
from insvie_jax.train import step as steplib
from insvie_jax.train.state import TrainState

GIB = 2**30
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


@dataclasses.dataclass
class Check:
    """What one compiled program needs per chip, and what it does."""

    program: str  # "train_step" | "edit_step"
    memory: dict  # bytes per chip: arguments, temporaries, outputs, aliased, code, total
    state: dict  # bytes per chip of each argument group (params, opt_state, ema, frozen, batch)
    largest: list  # the largest buffers of the program: [{shape, bytes, op}]
    collectives: dict  # kind -> {count, bytes} per step (loop bodies counted once per trip)
    model_flops_per_chip: float
    xla_flops: float | None
    xla_optimal_seconds: float | None
    compiler_message: str | None = None  # the TPU compiler's own word when it ran out of HBM


# ---------------------------------------------------------------------------------------------------
# Programs


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _batch_specs(cfg: configlib.Config, mesh, dtype=np.float32) -> dict:
    f, h, w, c = configlib.latent_shape(cfg)
    b, m = cfg.data.batch_size, cfg.model
    shapes = {"source": (b, f, h, w, c), "target": (b, f, h, w, m.out_channels),
              "text": (b, m.text_length, m.text_embed_dim)}
    shardings = steplib.batch_shardings(cfg, mesh)
    return {k: jax.ShapeDtypeStruct(s, dtype, sharding=shardings[k]) for k, s in shapes.items()}


def _per_chip_bytes(tree) -> int:
    """Bytes one chip holds of sharded ShapeDtypeStructs (the largest shard; shards are equal or padded)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def lower_train_step(cfg: configlib.Config, mesh):
    """(lowered train step, argument groups): the step a run compiles, on shapes only."""
    optimizer = steplib.make_optimizer(cfg)
    state = TrainState.abstract(cfg, mesh, optimizer)
    step = steplib.make_train_step(cfg, state, optimizer, mesh, meshlib.data_parallel_size(mesh))
    batch = _batch_specs(cfg, mesh)
    groups = {**{k: v for k, v in state.variables.items() if k in ("params", "opt_state", "ema")},
              "frozen": state.frozen, "batch": batch}
    return step.lower(state.variables, state.frozen, batch, np.int32(0)), groups


def lower_edit_step(cfg: configlib.Config, mesh):
    """(lowered guided sampling step, argument groups): one model call on the guidance branches of
    data.batch_size clips and the sampler update, weights in the compute dtype (as `edit` holds them)."""
    m = dataclasses.replace(cfg.model, param_dtype=cfg.model.dtype)
    abstract_model = nnx.eval_shape(lambda: build_transformer(m, seed=0))
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    rules = cfg.mesh.logical_axis_rules
    params_sh = shardlib.state_shardings(abstract_params, mesh, rules)
    params = _abstract(abstract_params.to_pure_dict(), params_sh)
    batch = _batch_specs(cfg, mesh, jnp.dtype(cfg.model.dtype))
    latents = batch["target"].update(dtype=np.float32)
    branches = 2 if cfg.sample.guidance == "lucy" else 3
    source_n = batch["source"].update(shape=(branches * latents.shape[0], *latents.shape[1:]))
    text_n = batch["text"].update(shape=(branches * latents.shape[0], *batch["text"].shape[1:]))
    if cfg.diffusion.objective == "flow":
        rows = flow.make_plan(cfg.sample.sampler, cfg.sample.steps, cfg.diffusion.flow_shift).arrays()
    else:
        plan = samplers.make_plan(cfg.sample.sampler, cfg.sample.steps, cfg.diffusion)
        rows = plan.arrays()
    row = {k: jax.ShapeDtypeStruct((), np.float32) for k in rows}
    row.update(text_scale=row["timestep"], source_scale=row["timestep"])

    def edit_step(params, x, carry, source_n, text_n, noise, row):
        with shardlib.logical_rules(mesh, rules):
            model = nnx.merge(graphdef, params)
            if cfg.diffusion.objective == "flow":  # carry: UniPC's (x_last, m1, m2)
                if branches == 2:
                    v = flow_guidance.two_way_velocity(model, x, source_n, text_n, row["timestep"], row["text_scale"])
                else:
                    v = flow_guidance.three_way_velocity(model, x, source_n, text_n, row["timestep"],
                                                         row["text_scale"], row["source_scale"])
                return flow.step(row, x, v, carry)
            x0 = guidance.guided_x0(model, x, source_n, text_n, row["timestep"], row["c_skip"], row["c_out"],
                                    row["text_scale"], row["source_scale"])
            return samplers.step(row, x, x0, carry, noise if plan.stochastic else None), x0

    carry = (latents, latents, latents) if cfg.diffusion.objective == "flow" else latents  # flow: (x_last, m1, m2)
    lowered = jax.jit(edit_step).lower(params, latents, carry, source_n, text_n, latents, row)
    return lowered, {"params": params, "batch": {"latents": latents, f"source{branches}": source_n,
                                                 f"text{branches}": text_n}}


# ---------------------------------------------------------------------------------------------------
# Reading the compiled program


def _shape_bytes(text: str) -> int:
    """Bytes of one HLO array shape `bf16[8,1920]{1,0}` (0 for tokens and unknown types)."""
    match = re.match(r"([a-z0-9]+)\[([0-9,]*)\]", text)
    if not match or match.group(1) not in _DTYPE_BYTES:
        return 0
    dims = [int(d) for d in match.group(2).split(",") if d]
    return _DTYPE_BYTES[match.group(1)] * math.prod(dims)


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_CALLEE = re.compile(r"\b(to_apply|calls|body|condition|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CONDITION = re.compile(r"condition=%?([\w.\-]+)")
_INT_CONSTANT = re.compile(r"[su]32\[\][^ ]* constant\((\d+)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """Computation name -> its instruction lines; and the entry computation's name."""
    bodies: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        header = _COMPUTATION.match(line)
        if header:
            current = header.group(2)
            bodies[current] = []
            entry = current if header.group(1) else entry
        elif line.strip() == "}":
            current = None
        elif current is not None:
            bodies[current].append(line)
    return bodies, entry


def _trip_count(line: str, bodies: dict[str, list[str]]) -> int:
    """A while loop's trip count: XLA's known_trip_count where it states one (GPU), else the bound of its
    condition `counter < N` (TPU), else 1."""
    known = _TRIP.search(line)
    if known:
        return int(known.group(1))
    condition = _CONDITION.search(line)
    cond = bodies.get(condition.group(1), []) if condition else []
    bounds = [int(c) for text in cond for c in _INT_CONSTANT.findall(text)]
    return bounds[0] if len(bounds) == 1 and any("direction=LT" in text for text in cond) else 1


def _executions(bodies: dict[str, list[str]], entry: str) -> dict[str, int]:
    """How many times each computation runs per program execution: loop bodies once per trip."""
    runs: dict[str, int] = defaultdict(int)

    def visit(name: str, times: int) -> None:
        runs[name] += times
        for line in bodies.get(name, ()):
            callees = _CALLEE.findall(line)
            trips = _trip_count(line, bodies) if any(kind == "body" for kind, _ in callees) else 1
            for kind, names in callees:
                if kind == "condition":
                    continue
                for callee in (n.strip(" {}%") for n in names.split(",")):
                    if callee in bodies:
                        visit(callee, times * (trips if kind == "body" else 1))

    visit(entry, 1)
    return runs


def collectives(hlo: str) -> dict[str, dict]:
    """Collectives of an optimized HLO module by kind: how many run per execution and the bytes they produce
    per chip (for an async start, its result)."""
    bodies, entry = _computations(hlo)
    runs = _executions(bodies, entry)
    out = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    for name, lines in bodies.items():
        for line in lines:
            inst = _INSTRUCTION.match(line)
            if not inst or not runs.get(name):
                continue
            op = inst.group(3).removesuffix("-start")
            if op not in out or inst.group(3).endswith("-done"):
                continue
            shapes = re.findall(r"[a-z0-9]+\[[0-9,]*\]", inst.group(2))
            if inst.group(3).endswith("-start"):  # (operand, result, context...): the result
                shapes = shapes[1:2] if len(shapes) > 1 else shapes
            out[op]["count"] += runs[name]
            out[op]["bytes"] += runs[name] * sum(_shape_bytes(shape) for shape in shapes)
    return out


def largest_buffers(hlo: str, top: int = 6) -> list[dict]:
    """The largest arrays the program materialises (results of unfused instructions), with the source op."""
    bodies, entry = _computations(hlo)
    runs = _executions(bodies, entry)
    seen: dict[str, dict] = {}
    for name, lines in bodies.items():
        if not runs.get(name) or name.startswith(("fused", "wrapped")):
            continue
        for line in lines:
            inst = _INSTRUCTION.match(line)
            if not inst or inst.group(3) in ("parameter", "get-tuple-element", "tuple", "bitcast", "constant"):
                continue
            for shape in re.findall(r"[a-z0-9]+\[[0-9,]*\]", inst.group(2)):
                size = _shape_bytes(shape)
                op = _OP_NAME.search(line)
                where = op.group(1).split("/")[-3:] if op else [inst.group(3)]
                # One array flows through several instructions (a loop's init, carry and result share a
                # buffer): listed once per shape, under the first op that makes it.
                if size and shape not in seen:
                    seen[shape] = {"shape": shape, "bytes": size, "op": "/".join(where)}
    return sorted(seen.values(), key=lambda b: -b["bytes"])[:top]


def _cost(compiled) -> tuple[float | None, float | None]:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional: not every backend reports it
        return None, None
    cost = cost[0] if isinstance(cost, list) and cost else cost
    cost = cost or {}
    return cost.get("flops"), cost.get("optimal_seconds")


_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(lowered, message: str, groups: dict) -> tuple[dict, list]:
    """Memory as far as a compile that ran out of HBM tells it: the temporaries it asked for (the compiler stops
    before it lays out the rest), the arguments from their shardings, and the allocation that failed, from a
    second compile told not to stop at the first one."""
    temporaries = re.search(r"HLO temporaries \(([\d.]+)([KMGT])", message)
    arguments = sum(_per_chip_bytes(v) for v in groups.values())
    memory = {"arguments": arguments, "temporaries": 0, "outputs": 0, "aliased": 0, "code": 0}
    if temporaries:
        memory["temporaries"] = int(float(temporaries.group(1)) * _UNITS[temporaries.group(2)])
    largest = []
    try:
        lowered.compile(compiler_options={"xla_tpu_no_crash_on_oom": True})
    except Exception as err:  # noqa: BLE001 - this compile is expected to fail; its message names the buffer
        for shape, op in re.findall(r"shape: ([a-z0-9]+\[[0-9,]*\]).*?:: ([\w.\-]+)", str(err)):
            largest.append({"shape": shape, "bytes": _shape_bytes(shape), "op": op})
    memory["total"] = memory["arguments"] + memory["temporaries"]
    return memory, largest


def check_program(program: str, lowered, groups: dict, model_flops_per_chip: float) -> Check:
    state = {k: _per_chip_bytes(v) for k, v in groups.items()}
    try:
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 - only running out of HBM is a finding; anything else is re-raised
        if "RESOURCE_EXHAUSTED" not in str(err):
            raise
        memory, largest = _out_of_memory(lowered, str(err), groups)
        return Check(program, memory, state, largest, {}, model_flops_per_chip, None, None,
                     str(err).strip().splitlines()[0])
    analysis = compiled.memory_analysis()
    memory = {"arguments": analysis.argument_size_in_bytes, "temporaries": analysis.temp_size_in_bytes,
              "outputs": analysis.output_size_in_bytes, "aliased": analysis.alias_size_in_bytes,
              "code": analysis.generated_code_size_in_bytes}
    # Donated arguments share their buffers with the outputs (aliased): counted once.
    memory["total"] = (memory["arguments"] + memory["temporaries"] + memory["outputs"] - memory["aliased"]
                       + memory["code"])
    hlo = compiled.as_text()
    flops, optimal = _cost(compiled)
    return Check(program, memory, state, largest_buffers(hlo), collectives(hlo), model_flops_per_chip, flops,
                 optimal)


# ---------------------------------------------------------------------------------------------------
# The whole check


def check(cfg: configlib.Config, topology: str, slices: int = 1, edit: bool = False, mfu: float = 0.4) -> dict:
    """Compiles the config's programs for `slices` slices of `topology`; returns the report (see `format`)."""
    devices = topologylib.abstract_devices(topology, slices)
    chip = topologylib.chip_of(devices[0])
    mesh = meshlib.create_mesh(cfg.mesh, devices)
    meshlib.check_batch_size(mesh, cfg.data.batch_size)
    f, h, w, _ = configlib.latent_shape(cfg)
    with shardlib.logical_rules(mesh, cfg.mesh.logical_axis_rules):
        attention = attentionlib.resolve_implementation(cfg.model.attention, cfg.model.dtype)
    forward = family.forward_flops(cfg.model, f, h, w) * cfg.data.batch_size / mesh.size
    programs = [check_program("train_step", *lower_train_step(cfg, mesh), 3 * forward)]
    if edit:
        branches = 2 if cfg.sample.guidance == "lucy" else 3
        programs.append(check_program("edit_step", *lower_edit_step(cfg, mesh), branches * forward))
    report = {
        "topology": topologylib.topology_name(topology), "slices": slices, "chips": len(devices),
        "hosts": len({d.process_index for d in devices}), "chip": chip.name if chip else devices[0].device_kind,
        "hbm_bytes": chip.hbm_bytes if chip else None, "usable_bytes": chip.usable_bytes if chip else None,
        "peak_tflops": chip.peak_tflops if chip else None,
        "mesh": dict(mesh.shape), "attention": attention, "remat_policy": cfg.model.remat_policy,
        "scan_layers": cfg.model.scan_layers, "batch_size": cfg.data.batch_size,
        "latents": [f, h, w], "mfu": mfu, "programs": [],
    }
    for p in programs:
        entry = dataclasses.asdict(p)
        entry["fits"] = p.compiler_message is None and (chip is None or p.memory["total"] <= chip.usable_bytes)
        if chip:
            entry["step_s_at_peak"] = p.model_flops_per_chip / (chip.peak_tflops * 1e12)
            entry["step_s_at_mfu"] = entry["step_s_at_peak"] / mfu
        entry["advice"] = [] if entry["fits"] else advice(cfg, p, chip, attention)
        report["programs"].append(entry)
    report["fits"] = all(p["fits"] for p in report["programs"])
    return report


def advice(cfg: configlib.Config, p: Check, chip: topologylib.Chip, attention: str) -> list[str]:
    """What to change when a program does not fit, from what dominates its memory."""
    tips = []
    over = p.memory["total"] - chip.usable_bytes
    state = {k: v for k, v in p.state.items() if k != "batch"}
    state_bytes = sum(state.values())
    if state_bytes > 0.4 * chip.hbm_bytes:
        parts = ", ".join(f"{k} {v / GIB:.1f}" for k, v in sorted(state.items(), key=lambda kv: -kv[1]))
        tips.append(f"the weights and optimizer state take {state_bytes / GIB:.1f} GiB per chip ({parts}): shard "
                    "them over more chips (a larger mesh.ici_fsdp, or mesh.ici_fsdp=-1), train LoRA "
                    "(lora.enabled=true), or drop the EMA (train.ema_decay=0)")
    if p.memory["temporaries"] > 0.3 * chip.hbm_bytes:
        big = "; ".join(f"{b['shape']} {b['bytes'] / GIB:.1f} GiB ({b['op']})" for b in p.largest[:3])
        tips.append(f"temporaries take {p.memory['temporaries'] / GIB:.1f} GiB per chip; the largest: {big}")
        if attention not in ("splash", "ring", "context_gather"):
            tips.append(f"attention runs as '{attention}', which materialises the (length x length) scores: set "
                        "model.attention=splash (or auto)")
        if cfg.model.remat_policy in ("none", "dots", "dots_no_batch") and p.program == "train_step":
            tips.append(f"model.remat_policy={cfg.model.remat_policy} keeps each layer's activations for the "
                        "backward pass: use model.remat_policy=full (least memory) or attention")
        tips.append("fewer clips per chip: lower data.batch_size, or split each clip's sequence over chips "
                    "(mesh.ici_context > 1, taken from ici_fsdp or ici_data)")
    need = "at least " if p.compiler_message else ""
    tips.insert(0, f"needs {need}{p.memory['total'] / GIB:.1f} GiB per chip, {over / GIB:.1f} GiB more than the "
                   f"{chip.usable_bytes / GIB:.2f} GiB a {chip.name} chip has for a program")
    return tips


def format_report(report: dict) -> str:
    """The report as a person reads it."""
    mesh = " x ".join(f"{k} {v}" for k, v in report["mesh"].items())
    lines = [f"{report['topology']}, {report['slices']} slice(s): {report['chips']} {report['chip']} chips on "
             f"{report['hosts']} hosts; mesh {mesh}; attention {report['attention']}, remat "
             f"{report['remat_policy']}, batch {report['batch_size']}, latents {'x'.join(map(str, report['latents']))}"]
    for p in report["programs"]:
        m = p["memory"]
        hbm = report["usable_bytes"]
        verdict = "FITS" if p["fits"] else "DOES NOT FIT"
        lines.append(f"\n{p['program']}: {verdict} ({m['total'] / GIB:.2f} GiB of the "
                     f"{hbm / GIB:.2f} GiB usable per chip)" if hbm else f"\n{p['program']}: {m['total'] / GIB:.2f} GiB")
        lines.append(f"  memory per chip: arguments {m['arguments'] / GIB:.2f} GiB, temporaries "
                     f"{m['temporaries'] / GIB:.2f} GiB, outputs {m['outputs'] / GIB:.2f} GiB (aliased with "
                     f"arguments {m['aliased'] / GIB:.2f} GiB), code {m['code'] / 2**20:.1f} MiB")
        lines.append("  arguments: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in p["state"].items()))
        lines.append("  largest buffers: " + "; ".join(f"{b['shape']} {b['bytes'] / GIB:.2f} GiB ({b['op']})"
                                                       for b in p["largest"][:3]))
        used = {k: v for k, v in p["collectives"].items() if v["count"]}
        collective_text = ", ".join(f"{k} {v['count']}x {v['bytes'] / GIB:.2f} GiB" for k, v in used.items())
        if p["compiler_message"]:
            collective_text = "not known (the compile stopped)"
        lines.append("  collectives per step: " + (collective_text or "none"))
        flops = f"  model FLOPs per chip per step: {p['model_flops_per_chip'] / 1e12:.1f} TFLOP"
        if "step_s_at_peak" in p:
            flops += (f"; step time {p['step_s_at_peak']:.3f} s at the chip's peak, {p['step_s_at_mfu']:.3f} s at "
                      f"{report['mfu']:.0%} MFU")
        lines.append(flops)
        if p["xla_optimal_seconds"] and p["xla_optimal_seconds"] > 0:
            note = " (counts the scanned layer loop once: not a step time)" if report["scan_layers"] else ""
            lines.append(f"  XLA optimal_seconds {p['xla_optimal_seconds']:.3f}{note}")
        if p["compiler_message"]:
            lines.append(f"  the TPU compiler: {p['compiler_message']}")
        lines += [f"  - {tip}" for tip in p["advice"]]
    return "\n".join(lines)
