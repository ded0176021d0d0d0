"""Data preparation, the step before training when `data.generate` > 0 (the default run): moving-shape triplets
written as clips (data/synthetic_videos.py) and encoded to ArrayRecord shards (data/encode.py) with the config's
VAE and T5.

`prepare(cfg)` (`insvie-jax prepare CONFIG`, and `insvie-jax train` first when data.generate is set) makes sure
every data.paths folder (empty = [<train.run_dir>/data]) holds encoded shards: where one has no manifest yet it
writes `data.generate` triplets (clips and CSV in <folder>/videos) and encodes them; with `data.generate_val`, the
same for that many fresh scenes in <folder>/val. It returns the config training reads: the same with data.paths
filled in (`prepared_config`). `insvie_jax.train.run` generates nothing: it checks that the data is there
(`check_prepared`) and says how to prepare it when it is not.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from insvie_jax import config as configlib
from insvie_jax import storage
from insvie_jax.data import records, synthetic_videos
from insvie_jax.parallel import distributed


class DataNotPrepared(configlib.ConfigError):
    """data.generate asks for generated clips that are not encoded yet."""


def prepared_config(cfg: configlib.Config) -> configlib.Config:
    """`cfg` with data.paths filled in as `prepare` fills it (empty = [<train.run_dir>/data]); writes nothing."""
    d = cfg.data
    if not d.generate or d.paths:
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(d, paths=[str(storage.path(cfg.train.run_dir) / "data")]))


def _folders(cfg: configlib.Config) -> list[tuple[object, int, int]]:
    """(folder, triplet count, generator seed) of every folder `cfg` (prepared) generates into."""
    d = cfg.data
    folders = [(storage.path(p), d.generate, d.seed + n) for n, p in enumerate(d.paths)]
    return folders + [(folder, d.generate_val, d.seed + n + synthetic_videos.VAL_SEED_OFFSET)
                      for n, folder in enumerate(synthetic_videos.validation_folders(cfg))]


def prepare(cfg: configlib.Config, then: str = "") -> configlib.Config:
    """Generates and encodes `data.generate` clips (and `data.generate_val` held-out ones) where they are not yet
    encoded; returns the prepared config (data.paths filled in). Says so on stderr (`then`: what comes next).
    Only the main process writes; the others wait for it (through the coordination service: no device
    collective, so minutes of waiting are fine)."""
    cfg = prepared_config(cfg)
    d = cfg.data
    if not d.generate:
        return cfg
    distributed.initialize()
    if distributed.is_main_process():
        print(f"insvie-jax: preparing data first (data.generate={d.generate}, data.generate_val={d.generate_val} "
              f"in {', '.join(d.paths)}; done once, kept for reruns){', then ' + then if then else ''}",
              file=sys.stderr, flush=True)
        for folder, count, seed in _folders(cfg):
            _generate_and_encode(cfg, folder, count, seed)
    distributed.barrier("insvie-jax data.generate")
    return cfg


def _generate_and_encode(cfg: configlib.Config, folder, count: int, seed: int) -> None:
    from insvie_jax.data.encode import encode_lists

    d = cfg.data
    if (folder / records.MANIFEST).exists():
        return
    videos = folder / "videos"
    csv_path = videos / "triplets.csv"
    spec = {"count": count, "frames": d.num_frames, "height": d.height, "width": d.width, "fps": d.fps,
            "seed": seed, "instructions": d.generate_instructions}
    stamp = videos / "generate.json"
    if not (csv_path.exists() and stamp.exists() and json.loads(stamp.read_text()) == spec):
        print(f"insvie-jax: writing {count} synthetic triplets to {videos}", file=sys.stderr, flush=True)
        synthetic_videos.write_triplets(videos, count, d.num_frames, d.height, d.width, d.fps, seed,
                                        d.generate_instructions or None)
        stamp.write_text(json.dumps(spec))
    encode_lists(cfg, [csv_path], folder)


def check_prepared(cfg: configlib.Config) -> None:
    """Raises `DataNotPrepared` (one line: what is missing and the command that makes it) unless every folder a
    data.generate config trains and validates on holds encoded shards."""
    if not cfg.data.generate:
        return
    if not cfg.data.paths:
        missing = "data.paths is empty (prepare fills it in)"
    else:
        absent = [str(folder) for folder, _, _ in _folders(cfg) if not (folder / records.MANIFEST).exists()]
        if not absent:
            return
        missing = f"no encoded shards in {', '.join(absent)}"
    raise DataNotPrepared(
        f"data.generate={cfg.data.generate}: the generated clips are not prepared ({missing}): run "
        "`insvie-jax prepare CONFIG [key=value ...]` first and train the config it writes, or `insvie-jax train "
        "CONFIG`, which prepares them (from Python: train.run(data.prepare.prepare(cfg)))")

