"""Data throughput at CogVideoX-2B sizes: pre-encoded ArrayRecord shards vs raw mp4.

Writes synthetic full-size records (latents 13x60x90x16 bf16 x 2 streams x (mean, std), text 226x4096 bf16)
and a few 720x480 clips into a scratch folder, then times the grain pipeline and raw decoding on this host.
Prints a table and writes JSON to $OUT/data_throughput.json (or the --json path).

    python tools/data_throughput.py [--records 24] [--workers 0 2] [--scratch /tmp/insvie_data_tp]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from insvie_jax import config as configlib  # noqa: E402
from insvie_jax.data import records  # noqa: E402
from insvie_jax.data.throughput import measure_arrayrecord, measure_video  # noqa: E402
from insvie_jax.data.video import write_video  # noqa: E402


def make_clips(root: Path, count: int, frames: int = 100, fps: int = 24) -> Path:
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        base = rng.integers(0, 256, (480 // 8, 720 // 8 + frames, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        clip = np.stack([base[:, t * 8 // 4:t * 8 // 4 + 720] for t in range(frames)])
        for folder in ("source", "edit"):
            (root / folder).mkdir(parents=True, exist_ok=True)
            write_video(root / folder / f"c{i}.mp4", clip if folder == "source" else 255 - clip, fps, crf=23)
        names.append(f"c{i}.mp4")
    csv = root / "train.csv"
    csv.write_text("video,caption,instruction,edited_caption,edit_folder\n" +
                   "".join(f"{n},c,invert,c,edit\n" for n in names))
    return csv


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=24)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--workers", type=int, nargs="+", default=[0])
    parser.add_argument("--clips", type=int, default=3)
    parser.add_argument("--scratch", default="/tmp/insvie_data_tp")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "data_throughput.json"))
    args = parser.parse_args()

    scratch = Path(args.scratch)
    shutil.rmtree(scratch, ignore_errors=True)
    shards = scratch / "shards"
    records.write_synthetic(shards, {(13, 60, 90): args.records}, (226, 4096), shard_size=8)
    csv = make_clips(scratch / "clips", args.clips)
    base = configlib.load("cogvideox-2b-edit")
    results = []
    for workers in args.workers:
        cfg = dataclasses.replace(base, data=dataclasses.replace(
            base.data, source="arrayrecord", paths=[str(shards)], batch_size=args.batch_size, num_workers=workers))
        results.append(measure_arrayrecord(cfg, batches=args.batches))
    video_cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, fps=7.0))
    results.append(measure_video(video_cfg, str(csv), clips=2 * args.clips))
    print(f"{'source':52s} {'workers':>7s} {'samples':>7s} {'seconds':>8s} {'samples/s':>9s}")
    for r in results:
        print(f"{r['source']:52s} {r.get('workers', '-')!s:>7s} {r['samples']:7d} {r['seconds']:8.2f} "
              f"{r['samples_per_s']:9.2f}")
    record_mb = sum(f.stat().st_size for f in shards.glob("*.array_record")) / args.records / 2**20
    summary = {"cpu_count": os.cpu_count(), "record_mb": record_mb, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=1))
    print(f"record size {record_mb:.1f} MiB; JSON: {args.json}")
    shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
