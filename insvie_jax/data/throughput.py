"""Data-side throughput: samples/s of the ArrayRecord pipeline and of raw mp4 decoding (sampling + crop).

Used by tools/data_throughput.py; both functions time steady state after `warmup` batches / clips.
"""

from __future__ import annotations

import time

from insvie_jax.data.pipeline import make_pipeline
from insvie_jax.data.sources import BadSamples, read_list, try_load_clip


def measure_arrayrecord(cfg, batches: int = 20, warmup: int = 2) -> dict:
    """Batches from `make_pipeline(cfg, "train")` (cfg.data.source = "arrayrecord")."""
    iterator = make_pipeline(cfg, "train", 0, 1)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - start
    samples = batches * len(batch["source"])
    return {"source": "arrayrecord", "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds,
            "batch_shapes": {k: list(v.shape) for k, v in batch.items()}, "workers": cfg.data.num_workers,
            "read_threads": cfg.data.read_threads}


def measure_video(cfg, list_path: str, clips: int = 8, warmup: int = 1) -> dict:
    """Raw triplets decoded, frame-sampled and cropped as the "video" source does (no VAE), one at a time."""
    report = BadSamples()
    triplets = read_list(list_path, cfg.data.video_roots, report)
    data_cfg = cfg.data
    for triplet in triplets[:warmup]:
        try_load_clip(triplet, data_cfg, report, seed=0)
    start = time.perf_counter()
    done = 0
    shape = None
    for i in range(clips):
        clip = try_load_clip(triplets[i % len(triplets)], data_cfg, report, seed=i)
        if clip is not None:
            done += 1
            shape = list(clip.source.shape)
    seconds = time.perf_counter() - start
    return {"source": "video (decode + sample + crop, source and edit)", "samples": done, "seconds": seconds,
            "samples_per_s": done / seconds, "clip_shape": shape, "bad": len(report)}
