"""The input pipeline: batches of pre-encoded triplets from ArrayRecord shards (written here, of the config's
latent and text shapes) through the grain pipeline that training reads (`data.pipeline.make_pipeline`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from insvie_jax.bench.timing import Prepared
from insvie_jax.config import latent_shape


def pipeline(cfg, options: dict) -> Prepared:
    from insvie_jax.data import records
    from insvie_jax.data.pipeline import make_pipeline

    shards = Path(options["scratch"]) / "shards"
    f, h, w, c = latent_shape(cfg)
    batch = cfg.data.batch_size
    count = max(16, (options["repeats"] + 4) * batch)
    records.write_synthetic(shards, {(f, h, w): count}, (cfg.model.text_length, cfg.model.text_embed_dim),
                            latent_channels=c, shard_size=8)
    data_cfg = dataclasses.replace(cfg.data, source="arrayrecord", paths=[str(shards)])
    iterator = make_pipeline(dataclasses.replace(cfg, data=data_cfg), "train", 0, 1)
    return Prepared(step=lambda: next(iterator), samples=batch,
                    info={"records": count, "batch": batch, "workers": data_cfg.num_workers})


def _write_clips(root: Path, count: int, frames: int, height: int, width: int, fps: int) -> Path:
    """`count` moving-noise source clips and their inverted edits (mp4) and an InsViE CSV listing them."""
    import numpy as np

    from insvie_jax.data.synthetic_videos import write_insvie_csv
    from insvie_jax.data.video import write_video

    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        base = rng.integers(0, 256, (height // 8, width // 8 + frames, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        clip = np.stack([base[:, 2 * t:2 * t + width] for t in range(frames)])  # slides 2 px per frame
        for folder, video in (("source", clip), ("edit", 255 - clip)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            write_video(root / folder / f"c{i}.mp4", video, fps, crf=23)
        names.append(f"c{i}.mp4")
    csv = root / "train.csv"
    write_insvie_csv(csv, [[n, "c", "invert", "c", "edit"] for n in names])
    return csv


def pipeline_video(cfg, options: dict) -> Prepared:
    """Raw triplets: one source + edit mp4 pair decoded, frame-sampled and cropped per call, as the "video"
    source does before the VAE (clips of 2x data.num_frames frames at data.fps, the config's size)."""
    from insvie_jax.data.sources import BadSamples, read_list, try_load_clip

    d = cfg.data
    csv = _write_clips(Path(options["scratch"]) / "clips", 3, 2 * d.num_frames, d.height, d.width, int(d.fps))
    report = BadSamples()
    triplets = read_list(csv, d.video_roots, report, d.allow_outside_root)
    calls = {"n": 0}

    def step():
        calls["n"] += 1
        clip = try_load_clip(triplets[calls["n"] % len(triplets)], d, report, seed=calls["n"])
        if clip is None:
            raise RuntimeError(f"a generated clip failed to load: {report.entries[-1:]}")
        return clip.source

    return Prepared(step=step, info={"clips": len(triplets), "frames": 2 * d.num_frames})
