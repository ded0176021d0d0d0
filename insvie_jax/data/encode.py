"""`insvie-jax encode`: triplet lists -> VAE posteriors and T5 embeddings in ArrayRecord shards (see records.py).

Work is cut into units of `data.shard_size` input triplets (in list order). A unit writes one shard per
bucket (latent shape) under temporary names, then renames them and writes `part-<unit>.done.json` last; a
rerun skips units with a done file, so a crashed encode resumes where it stopped. The manifest is written
when every unit is done. With empty `vae.path` / `text_encoder.path` the config's randomly initialised
(seeded) models and a hashing tokenizer are used: that is how the tests run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from tqdm import tqdm

from insvie_jax.data import records
from insvie_jax.data.sources import BadSamples, Triplet, read_lists, to_unit_range, try_load_clip

TEXT_BATCH = 16


class HashTokenizer:
    """Stand-in for T5's sentencepiece model when no text encoder is configured (tests, tiny): each word maps
    to a stable id in [2, vocab), leaving 0 (pad) and 1 (EOS) free. Same `encode` call as sentencepiece."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, texts, out_type=int):
        def word_id(word: str) -> int:
            return 2 + int.from_bytes(hashlib.sha256(word.encode()).digest()[:4], "little") % (self.vocab_size - 2)

        return [[word_id(w) for w in text.lower().split()] for text in texts]


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


def load_vae_of(cfg):
    """The config's VAE: `vae.path`, or with an empty path the random one seeded by data.seed (tests, tiny)."""
    if cfg.vae.path:
        from insvie_jax.convert.vae_keys import load_vae

        return load_vae(cfg.vae.path, cfg.vae)[0]
    from insvie_jax.models import vae as vae_model

    return vae_model.build(cfg.vae, seed=cfg.data.seed)


class TripletEncoder:
    """The VAE and T5 of a config, jitted: pixels -> posterior (mean, std), instructions -> embeddings."""

    def __init__(self, cfg):
        from insvie_jax.models import t5

        self.cfg = cfg
        self.vae = load_vae_of(cfg)
        if cfg.text_encoder.path:
            from insvie_jax.convert.t5_keys import load_t5, load_tokenizer

            self.text_encoder, _ = load_t5(cfg.text_encoder.path, cfg.text_encoder)
            path = Path(cfg.text_encoder.path)
            try:
                self.tokenizer = load_tokenizer(path)
            except FileNotFoundError:
                self.tokenizer = load_tokenizer(path.parent)  # diffusers: text_encoder/ beside tokenizer/
        else:
            self.text_encoder = t5.build(cfg.text_encoder, seed=cfg.data.seed)
            self.tokenizer = HashTokenizer(cfg.text_encoder.vocab_size)
        self._tokenize = t5.tokenize

        @nnx.jit
        def encode_video(vae, video):
            posterior = vae.encode(video)
            return posterior.mean, posterior.std

        # CogVideoX runs T5 without an attention mask (padding tokens attend too), so neither do we.
        @nnx.jit
        def encode_text(encoder, ids):
            return encoder(ids).astype(jnp.bfloat16)

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
            ids, _ = self._tokenize(self.tokenizer, chunk + [""] * (TEXT_BATCH - len(chunk)),
                                    self.cfg.text_encoder.max_length)
            out.append(np.asarray(self._encode_text(self.text_encoder, ids))[: len(chunk)])
        return np.concatenate(out) if out else np.zeros((0, self.cfg.text_encoder.max_length,
                                                         self.cfg.text_encoder.d_model), ml_dtypes.bfloat16)


def encode_triplet(encoder: TripletEncoder, clip, text: np.ndarray) -> dict:
    mean, std = encoder.video(np.stack([clip.source, clip.target]))
    bf16 = ml_dtypes.bfloat16
    return {
        "name": clip.triplet.name, "instruction": clip.triplet.instruction,
        "source_mean": mean[0].astype(bf16), "source_std": std[0].astype(bf16),
        "target_mean": mean[1].astype(bf16), "target_std": std[1].astype(bf16),
        "text": np.asarray(text, bf16),
    }


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _encode_unit(encoder: TripletEncoder, unit: int, triplets: list[Triplet], out: Path, progress,
                 bad_before: int) -> dict:
    for stale in out.glob(f"part-{unit:05d}-*.tmp"):
        stale.unlink()
    report = BadSamples()
    writers, counts, names = {}, {}, []
    texts = encoder.text([t.instruction for t in triplets])
    seed = encoder.cfg.data.seed if encoder.cfg.data.crop == "random" else None
    for triplet, text in zip(triplets, texts):
        clip = try_load_clip(triplet, encoder.cfg.data, report, seed=seed)
        if clip is not None:
            record = encode_triplet(encoder, clip, text)
            problem = records.check_record(record)
            if problem:
                report.add(triplet.name, problem)
            else:
                key = records.bucket_key(record["source_mean"].shape)
                if key not in writers:
                    writers[key] = records.writer(out / f"part-{unit:05d}-{key}.array_record.tmp")
                writers[key].write(records.pack(record))
                counts[key] = counts.get(key, 0) + 1
                names.append(triplet.name)
        progress.update(1)
        progress.set_postfix(bad=bad_before + len(report), refresh=False)
    files = {}
    for key, w in writers.items():
        w.close()
        final = out / f"part-{unit:05d}-{key}.array_record"
        os.replace(out / f"part-{unit:05d}-{key}.array_record.tmp", final)
        files[key] = final.name
    done = {"unit": unit, "files": files, "counts": counts, "names": names, "bad": report.entries}
    _atomic_json(out / f"part-{unit:05d}.done.json", done)
    return done


def encode_lists(cfg, list_paths, out_dir, *, show_progress: bool = True) -> dict:
    """Encodes every triplet of `list_paths` into `out_dir` (resuming a previous run); returns the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = config_hash(cfg)
    stamp = out / "encode_config.json"
    if stamp.exists() and json.loads(stamp.read_text())["config_hash"] != digest:
        raise FileExistsError(f"{out} holds shards of a different config (hash {json.loads(stamp.read_text())['config_hash']}"
                         f", now {digest}): encode into a new folder, or restore the config it was made with")
    _atomic_json(stamp, {"config_hash": digest, "lists": [str(p) for p in list_paths]})
    triplets, list_report = read_lists(list_paths, cfg.data.video_roots)
    size = cfg.data.shard_size
    units = [triplets[i:i + size] for i in range(0, len(triplets), size)]
    done = {}
    for unit in range(len(units)):
        path = out / f"part-{unit:05d}.done.json"
        if path.exists():
            done[unit] = json.loads(path.read_text())
    finished = sum(len(units[u]) for u in done)
    encoder = None
    encoded_units = []
    start = time.time()
    with tqdm(total=len(triplets), initial=finished, unit="sample", disable=not show_progress,
              desc=f"encode {out.name}", dynamic_ncols=True) as progress:
        bad = sum(len(d["bad"]) for d in done.values())
        for unit, chunk in enumerate(units):
            if unit in done:
                continue
            encoder = encoder or TripletEncoder(cfg)
            done[unit] = _encode_unit(encoder, unit, chunk, out, progress, bad)
            bad += len(done[unit]["bad"])
            encoded_units.append(unit)
    manifest = _manifest(cfg, digest, [done[u] for u in range(len(units))], list_report)
    _atomic_json(out / records.MANIFEST, manifest)
    manifest["encoded_units"] = encoded_units  # this run's work, for callers; not stored
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
                                 cfg.vae.latent_channels, cfg.vae.scaling_factor, digest, bad.to_dict())
