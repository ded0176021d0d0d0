"""Training batches from `data.source`: grain pipelines that are deterministic and checkpointable.

`make_pipeline(cfg, split, process_index, process_count)` returns an iterator of dicts
{source, target, text} of float32 numpy arrays, laid out as `data/synthetic.py`'s batches: latents
(B, f, h, w, C) already the diffusion model's (`models.latents.to_model`), text (B, L, D); B = data.batch_size /
process_count (this host's part of the global batch). `it.get_state()` / `it.set_state(state)` (JSON-able
dicts) restore the exact next batch, worker processes included.

"arrayrecord" (shards from `insvie-jax encode`, one folder per `data.paths` entry):
    per (folder, bucket) stream: records -> this host's slice -> seeded shuffle, reshuffled every epoch
    -> decode (bad records dropped and named) -> a fresh posterior sample per epoch -> batch;
    streams mixed with weights data.weights x bucket share -> prefetch (threads, or data.num_workers processes).
    A batch never mixes buckets (frame counts / resolutions).
"video" (triplet lists): per (list, video|image) stream: triplets -> host slice -> shuffle -> decode and crop
    (bad clips dropped and named) -> batch -> prefetch; then the VAE and T5 encode the batch in this process.
"synthetic": `data.synthetic.SyntheticTriplets` with the same iterator interface.
The "eval" split reads every record once, in order, unshuffled, keeping a short last batch.
"""

from __future__ import annotations

import hashlib
import json
import logging

import grain
import numpy as np

from insvie_jax import storage
from insvie_jax.data import records
from insvie_jax.models import latents as latents_lib
from insvie_jax.data.sources import BadSamples, read_list, try_load_clip

log = logging.getLogger(__name__)
BAD_RECORDS_FILE = "pipeline_bad_records.jsonl"
BAD_RECORDS_STEM = "pipeline_bad_records"


class BadRecordLog:
    """Drops marked-bad elements, naming each: a warning, a JSON line in `report_dir` (appended by every worker
    process; in object storage, which has no append, one object per record in BAD_RECORDS_FILE's stem folder),
    and an in-process count (complete only when data.num_workers = 0)."""

    def __init__(self, report_dir: str = ""):
        self.report_dir = report_dir
        self.count = 0

    def __call__(self, element: dict) -> bool:
        if "__bad__" not in element:
            return True
        self.count += 1
        entry = {"sample": element["__bad__"], "reason": element["reason"]}
        log.warning("data: skipping %s: %s", entry["sample"], entry["reason"])
        if self.report_dir:
            folder = storage.path(self.report_dir)
            if storage.is_url(folder):
                digest = hashlib.sha1(entry["sample"].encode("utf-8", "surrogateescape")).hexdigest()
                (folder / BAD_RECORDS_STEM / f"{digest}.json").write_text(json.dumps(entry) + "\n")
            else:
                folder.mkdir(parents=True, exist_ok=True)
                with (folder / BAD_RECORDS_FILE).open("a") as f:
                    f.write(json.dumps(entry) + "\n")
        return False


def read_bad_records(report_dir) -> BadSamples:
    """The pipeline's bad-record report (deduplicated: a restored iterator may meet a record twice)."""
    folder = storage.path(report_dir)
    path, objects = folder / BAD_RECORDS_FILE, folder / BAD_RECORDS_STEM
    lines = path.read_text().splitlines() if path.exists() else []
    if objects.is_dir():
        lines += [p.read_text() for p in sorted(objects.iterdir())]
    seen = {}
    for line in lines:
        if line.strip():
            entry = json.loads(line)
            seen[entry["sample"]] = entry
    return BadSamples(list(seen.values()))


class DecodeRecord:
    """ArrayRecord bytes -> record dict, or a bad marker naming the record and why."""

    def __init__(self, where: str):
        self.where = where

    def __call__(self, raw: bytes) -> dict:
        try:
            record = records.unpack(raw)
        except Exception as err:  # noqa: BLE001 - any corrupt payload is one bad record, never fatal
            return {"__bad__": f"{self.where}:<undecodable record>", "reason": f"undecodable record ({err})"}
        if not isinstance(record, dict):
            return {"__bad__": f"{self.where}:<undecodable record>", "reason": "undecodable record (not a dict)"}
        problem = records.check_record(record)
        if problem:
            return {"__bad__": str(record.get("name", f"{self.where}:<unnamed>")), "reason": problem}
        return record


class DrawPosterior:
    """A fresh posterior sample (mean + std * noise), into the diffusion model's latents (`models.latents.to_model`:
    x vae.scaling_factor, or Wan's per-channel statistics); float32 everywhere."""

    def __init__(self, vae_cfg, with_names: bool):
        self.vae_cfg, self.with_names = vae_cfg, with_names

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        if "__bad__" in record:
            return record
        out = {}
        for stream in ("source", "target"):
            mean = record[f"{stream}_mean"].astype(np.float32)
            std = record[f"{stream}_std"].astype(np.float32)
            noise = rng.standard_normal(mean.shape, dtype=np.float32)
            out[stream] = latents_lib.to_model(self.vae_cfg, mean + std * noise)
        out["text"] = record["text"].astype(np.float32)
        if self.with_names:
            out["name"] = record["name"]
        return out


def stack_batch(elements) -> dict:
    return {key: np.stack([e[key] for e in elements]) if key != "name" else [e[key] for e in elements]
            for key in elements[0]}


def _weights(cfg) -> list[float]:
    weights = cfg.data.weights or [1.0] * len(cfg.data.paths)
    return [float(w) / sum(weights) for w in weights]


def _host_batch(cfg, process_count: int) -> int:
    if cfg.data.batch_size % process_count:
        raise ValueError(f"data.batch_size={cfg.data.batch_size} must be divisible by the number of processes "
                         f"({process_count})")
    return cfg.data.batch_size // process_count


def _finish(stream: grain.MapDataset, cfg, train: bool, seed: int, batch: int, report: BadRecordLog,
            randomize=None) -> grain.IterDataset:
    if train:
        if cfg.data.shuffle:
            stream = stream.shuffle(seed=seed)
        stream = stream.repeat(None)
    if randomize is not None:
        stream = stream.random_map(randomize, seed=seed + 1)
    # grain's default read-ahead (16 threads, 500 elements) would hold ~4.5 GB of 2B-size records per stream.
    read = grain.ReadOptions(num_threads=cfg.data.read_threads, prefetch_buffer_size=max(2 * batch, 4))
    return stream.to_iter_dataset(read).filter(report).batch(batch, drop_remainder=train, batch_fn=stack_batch)


def _check_manifest(cfg, manifest: dict, folder: str) -> None:
    text = tuple(manifest["text_shape"])
    want_text = (cfg.model.text_length, cfg.model.text_embed_dim)
    if text != want_text:
        raise ValueError(f"{folder}: text embeddings {text}, the model wants (model.text_length, "
                         f"model.text_embed_dim) = {want_text}: re-encode with this config's text encoder")
    for key, bucket in manifest["buckets"].items():
        if bucket["latent_shape"][-1] != cfg.model.in_channels:
            raise ValueError(f"{folder}: bucket {key} has {bucket['latent_shape'][-1]} latent channels, "
                             f"model.in_channels={cfg.model.in_channels}")


def _arrayrecord_streams(cfg, train, process_index, process_count, batch, report, with_names):
    streams, weights = [], []
    draw = DrawPosterior(cfg.vae, with_names)
    for number, (folder, weight) in enumerate(zip(cfg.data.paths, _weights(cfg))):
        manifest = records.read_manifest(folder)
        _check_manifest(cfg, manifest, folder)
        for key, bucket in sorted(manifest["buckets"].items()):
            files = [str(storage.path(folder) / f) for f in bucket["files"]]  # array_record reads gs:// itself
            stream = grain.MapDataset.source(grain.sources.ArrayRecordDataSource(files))
            stream = stream[process_index::process_count]
            if train and len(stream) < batch:
                log.warning("data: %s bucket %s has %d records on this host, fewer than a batch (%d): unused",
                            folder, key, len(stream), batch)
                continue
            stream = stream.map(DecodeRecord(f"{storage.name(folder)}/{key}"))
            seed = cfg.data.seed + 1000 * number + sum(map(ord, key))
            streams.append(_finish(stream, cfg, train, seed, batch, report, draw))
            weights.append(weight * bucket["count"] / max(manifest["count"], 1))
    return streams, weights


class LoadTriplet:
    """A triplet -> uint8 frames and instruction, or a bad marker; crops random per epoch (from the rng)."""

    def __init__(self, data_cfg, with_names: bool):
        self.data_cfg, self.with_names = data_cfg, with_names

    def __call__(self, triplet, rng: np.random.Generator) -> dict:
        report = BadSamples()
        seed = int(rng.integers(2**31)) if self.data_cfg.crop == "random" else None
        clip = try_load_clip(triplet, self.data_cfg, report, seed=seed)
        if clip is None:
            return {"__bad__": triplet.name, "reason": report.entries[0]["reason"]}
        out = {"source": clip.source, "target": clip.target, "instruction": triplet.instruction,
               "noise_seed": np.int64(rng.integers(2**62))}
        if self.with_names:
            out["name"] = triplet.name
        return out


def _video_streams(cfg, train, process_index, process_count, batch, report, with_names):
    if cfg.data.buckets or not cfg.data.pad_frames:
        raise ValueError("data.source='video' decodes one shape per stream: leave data.buckets empty and "
                         "data.pad_frames true, or pre-encode with `insvie-jax encode` for buckets")
    streams, weights = [], []
    load = LoadTriplet(cfg.data, with_names)
    for number, (path, weight) in enumerate(zip(cfg.data.paths, _weights(cfg))):
        list_report = BadSamples()
        triplets = read_list(path, cfg.data.video_roots, list_report, cfg.data.allow_outside_root)
        for entry in list_report.entries:
            report({"__bad__": entry["sample"], "reason": entry["reason"]})
        for kind, members in (("video", [t for t in triplets if not t.is_image]),
                              ("image", [t for t in triplets if t.is_image])):
            stream = grain.MapDataset.source(members)[process_index::process_count]
            if not len(stream) or (train and len(stream) < batch):
                continue
            seed = cfg.data.seed + 1000 * number + (kind == "image")
            streams.append(_finish(stream, cfg, train, seed, batch, report, load))
            weights.append(weight * len(members) / max(len(triplets), 1))
    return streams, weights


def source_noise(frames: np.ndarray, seed: int, log_mean: float, log_std: float) -> np.ndarray:
    """InsViE's source augmentation: Gaussian pixel noise of std σ = exp(N(log_mean, log_std²)) in [-1, 1] units,
    one σ per clip, drawn from `seed`; uint8 frames in, float32 frames on the 0..255 scale out (unclipped)."""
    rng = np.random.default_rng([seed, 1])  # [seed] alone draws the latent posterior noise
    sigma = np.exp(rng.normal(log_mean, log_std))
    noise = rng.standard_normal(frames.shape, dtype=np.float32)
    return frames.astype(np.float32) + np.float32(127.5 * sigma) * noise


class EncodeBatch:
    """Pixel batches -> latent batches with the config's VAE and T5, in the main process; the sources get
    pixel noise first (`source_noise`, data.source_noise), the targets are encoded clean."""

    def __init__(self, cfg):
        from insvie_jax.data.encode import TripletEncoder

        self.encoder = TripletEncoder(cfg)
        self.vae_cfg = cfg.vae
        d = cfg.data
        self.noise = (d.source_noise_log_mean, d.source_noise_log_std) if d.source_noise else None

    def __call__(self, batch: dict) -> dict:
        size = len(batch["source"])
        source = batch["source"]
        if self.noise:
            source = np.stack([source_noise(clip, int(s), *self.noise)
                               for clip, s in zip(source, batch["noise_seed"])])
        mean, std = self.encoder.video(np.concatenate([source, batch["target"].astype(source.dtype)]))
        noise = np.stack([np.random.default_rng(int(s)).standard_normal(mean.shape[1:], dtype=np.float32)
                          for s in batch["noise_seed"]] * 2)
        latents = latents_lib.to_model(self.vae_cfg, mean + std * noise)
        out = {"source": latents[:size], "target": latents[size:],
               "text": self.encoder.text(list(batch["instruction"])).astype(np.float32)}
        if "name" in batch:
            out["name"] = batch["name"]
        return out


class SyntheticIterator:
    """`SyntheticTriplets` (seeded by train.seed) behind the pipeline interface: this host's rows of the global
    batch of each step; the state is the step."""

    def __init__(self, cfg, process_index: int, process_count: int):
        from insvie_jax.config import latent_shape
        from insvie_jax.data.synthetic import SyntheticTriplets

        self.data = SyntheticTriplets(cfg.data.batch_size, latent_shape(cfg), cfg.model.text_length,
                                      cfg.model.text_embed_dim, seed=cfg.train.seed)
        batch = _host_batch(cfg, process_count)
        self.rows = range(process_index * batch, (process_index + 1) * batch)
        self.step = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        rows = self.data.rows(self.step, self.rows)  # this host's rows only (each row is drawn on its own)
        self.step += 1
        return rows

    def get_state(self) -> dict:
        return {"step": self.step}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])


def _processes(process_index, process_count) -> tuple[int, int]:
    import jax

    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def make_dataset(cfg, split: str = "train", process_index: int | None = None, process_count: int | None = None,
                 *, with_names: bool = False) -> grain.IterDataset:
    """The grain dataset behind `make_pipeline` (for inspection and custom iteration)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'")
    process_index, process_count = _processes(process_index, process_count)
    train = split == "train"
    batch = _host_batch(cfg, process_count)
    report = BadRecordLog(cfg.data.report_dir)
    build = {"arrayrecord": _arrayrecord_streams, "video": _video_streams}[cfg.data.source]
    streams, weights = build(cfg, train, process_index, process_count, batch, report, with_names)
    if not streams:
        raise ValueError(f"data.paths={cfg.data.paths}: no stream holds a full batch of {batch} on process "
                         f"{process_index} of {process_count}")
    if train:
        dataset = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, weights)
    else:  # every record once, stream after stream
        dataset = grain.experimental.InterleaveIterDataset(streams, cycle_length=1)
    if cfg.data.num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; programs not run by absl.app have none
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.data.num_workers,
                                                                    per_worker_buffer_size=cfg.data.prefetch))
    else:
        dataset = grain.experimental.ThreadPrefetchIterDataset(dataset, prefetch_buffer_size=cfg.data.prefetch)
    if cfg.data.source == "video":
        dataset = dataset.map(EncodeBatch(cfg))
    return dataset


def make_pipeline(cfg, split: str = "train", process_index: int | None = None, process_count: int | None = None,
                  *, with_names: bool = False):
    """An iterator of batches with `get_state()` / `set_state(state)`; see the module doc. `with_names` adds a
    "name" list per batch (for tests and debugging; keep it off for jitted steps). Process index/count default to
    jax.process_index() / jax.process_count()."""
    if cfg.data.source == "synthetic":
        return SyntheticIterator(cfg, *_processes(process_index, process_count))
    return iter(make_dataset(cfg, split, process_index, process_count, with_names=with_names))
