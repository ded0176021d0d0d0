"""The input pipeline: batches of pre-encoded triplets from ArrayRecord shards (written here, of the config's
latent and text shapes) through the grain pipeline that training reads (`data.pipeline.make_pipeline`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from insvie_jax.bench.timing import Prepared, latent_shape


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
