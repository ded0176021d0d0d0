"""`insvie-jax encode`: triplet lists -> VAE posteriors and T5 embeddings in ArrayRecord shards (see records.py).

Work is cut into units of `data.shard_size` input triplets (in list order). A unit writes one shard per
bucket (latent shape) under temporary names, then renames them and writes `part-<unit>.done.json` last; a
rerun skips units with a done file, so a crashed encode resumes where it stopped. The manifest is written
when every unit is done. With empty `vae.path` / `text_encoder.path` the config's randomly initialised
(seeded) models and a hashing tokenizer are used (convert/models.py `load_encoders` decides): that is how the tests run.

Several processes (hosts) run the same command: unit i belongs to process i % process_count, each writes
its units' shards and done files into the one shared output folder, and after a barrier process 0 merges
the done files (shards, counts, bad samples) into the manifest. Within a process, clips of one shape are
encoded `data.encode_batch_size` triplets at a time in one jitted VAE + T5 step, data-parallel over the
local devices. Records are written in list order and, with the default batch (one triplet per device),
every triplet is computed alone on a device in a program of the same shapes, so the output does not depend
on the number of devices or processes. The output folder may be an object-storage URL (gs://): shards are
then written in a local folder and uploaded whole, and the JSON files written directly (one object each).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from insvie_jax import storage
from insvie_jax.config import MeshConfig
from insvie_jax.convert.models import load_encoders
from insvie_jax.data import records
from insvie_jax.data.sources import BadSamples, Clip, SampleError, Triplet, load_clip, read_lists, to_unit_range
from insvie_jax.data.video import VideoError
from insvie_jax.models import family
from insvie_jax.parallel import distributed
from insvie_jax.parallel.mesh import create_mesh

TEXT_BATCH = 16
_CALLS = itertools.count()  # numbers the barriers of successive encode_lists calls (the same on every process)


def config_hash(cfg) -> str:
    """Hash of everything that changes the stored arrays: VAE, text encoder and clip sampling settings."""
    d = cfg.data
    relevant = {
        "vae": dataclasses.asdict(cfg.vae),
        "text_encoder": dataclasses.asdict(cfg.text_encoder),
        "data": {k: getattr(d, k) for k in ("num_frames", "height", "width", "fps", "skip_frames", "pad_frames",
                                            "buckets", "crop", "seed", "video_roots")},
    }
    relevant["vae"].pop("encode_frame_batch"), relevant["vae"].pop("decode_frame_batch")
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


class TripletEncoder:
    """The VAE and T5 of a config, jitted: pixels -> posterior (mean, std), instructions -> embeddings.

    `video` / `text` run on the default device (the pipeline's `video` source); `triplets` runs batches of
    `batch_size` triplets data-parallel over `devices` (default: this process's), as `encode` does.
    """

    def __init__(self, cfg, devices=None):
        from insvie_jax.models import t5

        self.cfg = cfg
        self.devices = list(devices if devices is not None else jax.local_devices())
        per_step = cfg.data.encode_batch_size or len(self.devices)
        self.batch_size = -(-per_step // len(self.devices)) * len(self.devices)  # a multiple of the device count
        self._step = None
        models = load_encoders(cfg)
        self.vae, self.text_encoder, self.tokenizer = models.vae, models.text_encoder, models.tokenizer
        self._tokenize = t5.tokenize

        @nnx.jit
        def encode_video(vae, video):
            posterior = vae.encode(video)
            return posterior.mean, posterior.std

        # CogVideoX runs T5 without an attention mask (padding tokens attend too), so neither do we; Wan runs UMT5
        # masked, zero past each prompt (models.family.text_states).
        text_cfg = cfg.text_encoder

        @nnx.jit
        def encode_text(encoder, ids, mask):
            return family.text_states(text_cfg, encoder, ids, mask).astype(jnp.bfloat16)

        self._encode_video, self._encode_text = encode_video, encode_text

    def video(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (B, F, H, W, 3) -> float32 posterior mean and std (B, f, h, w, C), unscaled."""
        mean, std = self._encode_video(self.vae, jnp.asarray(to_unit_range(frames)))
        return np.asarray(mean), np.asarray(std)

    def text(self, instructions: list[str]) -> np.ndarray:
        """Instructions -> bfloat16 (B, max_length, d_model) T5 embeddings."""
        out = []
        for i in range(0, len(instructions), TEXT_BATCH):
            chunk = list(instructions[i:i + TEXT_BATCH])
            ids, mask = self._tokenize(self.tokenizer, chunk + [""] * (TEXT_BATCH - len(chunk)),
                                       self.cfg.text_encoder.max_length)
            out.append(np.asarray(self._encode_text(self.text_encoder, ids, mask))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.text_encoder.max_length,
                                                         self.cfg.text_encoder.d_model), ml_dtypes.bfloat16)

    def _sharded_step(self):
        """One jitted VAE + T5 step with the batch split over the `data` axis of a mesh of `devices`; the
        models are replicated onto them (in place, so no second copy stays on the first device)."""
        mesh = create_mesh(MeshConfig(ici_data=-1), self.devices)
        replicated, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
        for model in (self.vae, self.text_encoder):
            nnx.update(model, jax.device_put(nnx.state(model), replicated))
        vae_graph, text_graph = nnx.graphdef(self.vae), nnx.graphdef(self.text_encoder)

        text_cfg = self.cfg.text_encoder

        @jax.jit
        def step(vae_state, text_state, video, ids, mask):
            posterior = nnx.merge(vae_graph, vae_state).encode(video)
            # the family's text states (see `text`)
            text = family.text_states(text_cfg, nnx.merge(text_graph, text_state), ids, mask)
            return posterior.mean, posterior.std, text.astype(jnp.bfloat16)

        def run(video: np.ndarray, ids: np.ndarray, mask: np.ndarray):
            video, ids, mask = (jax.device_put(a, split) for a in (video, ids, mask))
            return step(nnx.state(self.vae), nnx.state(self.text_encoder), video, ids, mask)

        return run

    def triplets(self, clips: list[Clip]) -> list[dict]:
        """Up to `batch_size` clips of one shape -> their records (bfloat16 posteriors and text), in one step.

        The batch is padded to `batch_size` (one compiled step per clip shape); padding rows are dropped.
        A triplet's source and target sit on the same device, next to each other.
        """
        if not 0 < len(clips) <= self.batch_size:
            raise ValueError(f"triplets() takes 1 to {self.batch_size} clips, got {len(clips)}")
        self._step = self._step or self._sharded_step()
        pad = self.batch_size - len(clips)
        pairs = np.stack([np.stack([c.source, c.target]) for c in clips])  # (n, 2, F, H, W, 3)
        pairs = np.concatenate([pairs, np.zeros((pad, *pairs.shape[1:]), np.uint8)])
        ids, mask = self._tokenize(self.tokenizer, [c.triplet.instruction for c in clips] + [""] * pad,
                                   self.cfg.text_encoder.max_length)
        mean, std, text = self._step(to_unit_range(pairs.reshape(-1, *pairs.shape[2:])), ids, mask)
        mean, std = (np.asarray(a).reshape(self.batch_size, 2, *a.shape[1:]) for a in (mean, std))
        bf16, text = ml_dtypes.bfloat16, np.asarray(text)
        return [{"name": c.triplet.name, "instruction": c.triplet.instruction,
                 "source_mean": mean[i, 0].astype(bf16), "source_std": std[i, 0].astype(bf16),
                 "target_mean": mean[i, 1].astype(bf16), "target_std": std[i, 1].astype(bf16), "text": text[i]}
                for i, c in enumerate(clips)]


def _atomic_json(path, data) -> None:
    storage.write_text_whole(path, json.dumps(data, indent=1))


def _encode_unit(encoder: TripletEncoder, unit: int, triplets: list[Triplet], out, progress,
                 bad_before: int) -> dict:
    """Encodes one unit: clips batched by shape (bucket), records written in list order as soon as every
    earlier triplet is settled, so the shards do not depend on the batch size."""
    # Shards are written under temporary names in `staging`: `out` itself, or a local folder for a URL.
    staging = storage.path(tempfile.mkdtemp(prefix="insvie-encode-")) if storage.is_url(out) else out
    for stale in staging.glob(f"part-{unit:05d}-*.tmp"):
        stale.unlink()
    data = encoder.cfg.data
    seed = data.seed if data.crop == "random" else None
    report, writers, counts, names = BadSamples(), {}, {}, []
    settled: dict[int, dict | str] = {}  # triplet index -> its record, or why it was dropped
    pending: dict[tuple, list[tuple[int, Clip]]] = {}  # clip shape -> loaded clips waiting for a full batch
    next_index = 0

    def encode_group(shape):
        group = pending.pop(shape)
        for (index, _), record in zip(group, encoder.triplets([clip for _, clip in group])):
            settled[index] = records.check_record(record) or record
        progress.update(len(group))

    def write_settled():
        nonlocal next_index
        while next_index in settled:
            result, name = settled.pop(next_index), triplets[next_index].name
            if isinstance(result, str):
                report.add(name, result)
            else:
                key = records.bucket_key(result["source_mean"].shape)
                if key not in writers:
                    writers[key] = records.writer(str(staging / f"part-{unit:05d}-{key}.array_record.tmp"))
                writers[key].write(records.pack(result))
                counts[key] = counts.get(key, 0) + 1
                names.append(name)
            next_index += 1
        progress.set_postfix(bad=bad_before + len(report), refresh=False)

    for index, triplet in enumerate(triplets):
        try:
            clip = load_clip(triplet, data, seed=seed)
        except (SampleError, VideoError) as err:
            settled[index] = err.reason
            progress.update(1)
        else:
            pending.setdefault(clip.source.shape, []).append((index, clip))
            if len(pending[clip.source.shape]) == encoder.batch_size:
                encode_group(clip.source.shape)
        write_settled()
    for shape in list(pending):
        encode_group(shape)
    write_settled()
    files = {}
    for key, w in writers.items():
        w.close()
        tmp, final = staging / f"part-{unit:05d}-{key}.array_record.tmp", out / f"part-{unit:05d}-{key}.array_record"
        if staging is out:
            tmp.replace(final)
        else:
            storage.upload(tmp, final)
        files[key] = final.name
    if staging is not out:
        shutil.rmtree(staging)
    done = {"unit": unit, "files": files, "counts": counts, "names": names, "bad": report.entries,
            "process": jax.process_index()}
    _atomic_json(out / f"part-{unit:05d}.done.json", done)
    return done


def encode_lists(cfg, list_paths, out_dir, *, show_progress: bool = True, devices=None) -> dict:
    """Encodes every triplet of `list_paths` into `out_dir` (resuming a previous run); returns the manifest.

    In a multi-process job every process calls this with the same arguments and `out_dir` on a filesystem
    they share; each encodes its units (i % process_count) on `devices` (default: all of its own), and every
    process returns the manifest that process 0 wrote. The progress bar shows process 0's share.
    """
    distributed.initialize()
    call, process, num_processes = next(_CALLS), jax.process_index(), jax.process_count()
    out = storage.path(out_dir)
    storage.makedirs(out)
    digest = config_hash(cfg)
    stamp = out / "encode_config.json"
    if stamp.exists() and json.loads(stamp.read_text())["config_hash"] != digest:
        raise FileExistsError(f"{out} holds shards of a different config (hash {json.loads(stamp.read_text())['config_hash']}"
                         f", now {digest}): encode into a new folder, or restore the config it was made with")
    if process == 0:
        _atomic_json(stamp, {"config_hash": digest, "lists": [str(p) for p in list_paths]})
    triplets, list_report = read_lists(list_paths, cfg.data.video_roots, cfg.data.allow_outside_root)
    size = cfg.data.shard_size
    units = [triplets[i:i + size] for i in range(0, len(triplets), size)]
    mine = [u for u in range(len(units)) if u % num_processes == process]
    done = {u: json.loads(p.read_text()) for u in mine if (p := out / f"part-{u:05d}.done.json").exists()}
    encoder = None
    encoded_units = []
    start = time.time()
    share = f" (process 0 of {num_processes})" if num_processes > 1 else ""
    with tqdm(total=sum(len(units[u]) for u in mine), initial=sum(len(units[u]) for u in done), unit="sample",
              disable=not show_progress or process != 0, desc=f"encode {out.name}{share}",
              dynamic_ncols=True) as progress:
        bad = sum(len(d["bad"]) for d in done.values())
        for unit in mine:
            if unit in done:
                continue
            encoder = encoder or TripletEncoder(cfg, devices)
            done[unit] = _encode_unit(encoder, unit, units[unit], out, progress, bad)
            bad += len(done[unit]["bad"])
            encoded_units.append(unit)
    distributed.barrier(f"insvie_jax encode {call}: units done")
    missing = [u for u in range(len(units)) if not (out / f"part-{u:05d}.done.json").exists()]
    if missing:
        raise RuntimeError(f"encode: units {missing[:10]} of {out} have no done file after every process "
                           "finished: the output folder must be one filesystem shared by all processes")
    parts = [json.loads((out / f"part-{u:05d}.done.json").read_text()) for u in range(len(units))]
    manifest = _manifest(cfg, digest, parts, list_report)
    if process == 0:
        _atomic_json(out / records.MANIFEST, manifest)
    distributed.barrier(f"insvie_jax encode {call}: manifest written")
    manifest["encoded_units"] = encoded_units  # this process's work in this run, for callers; not stored
    manifest["seconds"] = time.time() - start
    return manifest


def _manifest(cfg, digest: str, units: list[dict], list_report: BadSamples) -> dict:
    buckets: dict[str, dict] = {}
    bad = BadSamples(list_report.entries)
    for unit in units:
        bad.extend(BadSamples(unit["bad"]))
        for key, file in unit["files"].items():
            entry = buckets.setdefault(key, {"count": 0, "files": []})
            entry["count"] += unit["counts"][key]
            entry["files"].append(file)
    return records.make_manifest(buckets, (cfg.text_encoder.max_length, cfg.text_encoder.d_model),
                                 cfg.vae.latent_channels, getattr(cfg.vae, "scaling_factor", None), digest,
                                 bad.to_dict())
