"""One side of one bench row, in its own process: `python -m insvie_jax.bench.worker SPEC_JSON`.

side "jax": builds our workload, writes the reference's weights and inputs (spec.exchange), times it
(spec.measure), optionally traces it (spec.profile); side "reference": runs the PyTorch reference. Prints
one line `RESULT {json}`.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path


def run_ours(spec: dict) -> dict:
    import jax

    from insvie_jax import config as configlib
    from insvie_jax.bench import WORKLOADS, profile, timing
    from insvie_jax.convert import torch_reference
    from insvie_jax.train.metrics import peak_tflops

    cfg = configlib.load(spec["config"], spec["overrides"])
    module, name = WORKLOADS[spec["workload"]].ours.split(":")
    prepared = getattr(importlib.import_module(module), name)(cfg, {"scratch": spec["scratch"],
                                                                    "repeats": spec["repeats"]})
    device = jax.local_devices()[0]
    result = {"info": prepared.info, "device": device.device_kind, "backend": jax.default_backend(),
              "devices": jax.device_count(), "jax": jax.__version__}
    main = jax.process_index() == 0
    if spec["exchange"] and main:
        torch_reference.write_exchange(spec["scratch"], prepared.weights() if prepared.weights else None,
                                       prepared.inputs, prepared.dtype)
    if not spec["measure"]:
        return result
    timing_result, out = timing.measure(prepared.step, spec["repeats"])
    result.update(timing_result)
    result["peak_gib"] = timing.peak_gib(device)
    result["samples_per_s"] = prepared.samples / result["median_s"]
    if prepared.flops:
        devices = prepared.info.get("devices", 1)
        result["flops"] = prepared.flops
        result["tflops"] = prepared.flops / result["median_s"] / 1e12
        peak = peak_tflops(device)
        result["mfu"] = result["tflops"] / devices / peak if peak else None
    if spec["exchange"] and main and prepared.compared is not None:
        torch_reference.write_output(spec["scratch"], prepared.compared(out))
    del out
    if spec.get("profile"):
        folder = Path(spec["profile"]) / (f"process{jax.process_index()}" if jax.process_count() > 1 else "")
        calls = spec.get("profile_calls", 3)
        result["profile"] = profile.summarize(profile.capture(prepared.step, calls, folder), calls)
    return result


def run_reference(spec: dict) -> dict:
    from insvie_jax import config as configlib
    from insvie_jax.bench import WORKLOADS
    from insvie_jax.convert import torch_reference

    cfg = configlib.load(spec["config"], spec["overrides"])
    fn = getattr(torch_reference, WORKLOADS[spec["workload"]].reference)
    return fn(cfg, {}, Path(spec["scratch"]), spec["repeats"])


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    result = run_ours(spec) if spec["side"] == "jax" else run_reference(spec)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
