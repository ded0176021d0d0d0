"""Writes a random SAT checkpoint of the InsViE 2B edit transformer (real key names and shapes), for timing
conversion; optionally times `convert` to native and back and prints time and peak RSS.

    python tools/make_sat_checkpoint.py OUT_DIR [--dtype fp16|fp32] [--config cogvideox-2b-edit] [--time]

OUT_DIR gets `latest` + `1/mp_rank_00_model_states.pt` (about 3.4 GB in fp16). With --time, OUT_DIR.native
and OUT_DIR.sat are written too, and a JSON line of the measurements is printed (and written to --json).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from insvie_jax.config import load
from insvie_jax.convert import api, sat_keys

def write_random(out: Path, config: str, dtype: str, seed: int = 0) -> None:
    cfg = load(config).model
    gen = torch.Generator().manual_seed(seed)
    torch_dtype = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    module = {}
    for name, shape in sat_keys.sat_shapes(cfg).items():
        if name == sat_keys.POS_TABLE:
            module[sat_keys.PREFIX + name] = torch.from_numpy(sat_keys.sincos_table(cfg)).to(torch_dtype)
        else:  # 0.02-scaled normals in the target dtype, generated a tensor at a time to bound memory
            module[sat_keys.PREFIX + name] = (0.02 * torch.randn(shape, generator=gen)).to(torch_dtype)
    (out / "1").mkdir(parents=True)
    torch.save({"module": module}, out / "1" / "mp_rank_00_model_states.pt")
    (out / "latest").write_text("1")

def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--config", default="cogvideox-2b-edit")
    parser.add_argument("--time", action="store_true", help="time SAT -> native -> SAT conversion")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args()
    start = time.perf_counter()
    write_random(args.out, args.config, args.dtype)
    rows = {"write_random_s": time.perf_counter() - start, "rss_after_write_gb": peak_rss_gb()}
    if args.time:
        for src, dst, to in ((args.out, args.out.with_name(args.out.name + ".native"), "native"),
                             (args.out.with_name(args.out.name + ".native"),
                              args.out.with_name(args.out.name + ".sat"), "sat")):
            start = time.perf_counter()
            api.convert_main(str(src), str(dst), to=to, dtype="fp32")
            rows[f"to_{to}_s"] = time.perf_counter() - start
            rows[f"rss_after_to_{to}_gb"] = peak_rss_gb()
    rows = {k: round(v, 2) for k, v in rows.items()}
    print(json.dumps(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
