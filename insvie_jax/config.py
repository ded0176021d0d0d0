"""Config as data: typed dataclasses, YAML files with `base:` includes, and `key=value` overrides.

Every key is validated when the config is loaded: an unknown key names the closest valid one, a value
of the wrong type names the key and the type it wants, and derived values (frame counts, resolution,
dtype) are checked once here so that nothing downstream has to.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Allowed values of string keys live in the schema as Literal types; `choices("section.key")` lists them.
ComputeDtype = Literal["float32", "bfloat16", "float16"]
ParamDtype = Literal["float32", "bfloat16"]
# No float16 for T5: v1.1 feed-forward activations overflow it (Hugging Face clamps; bf16 needs no clamp).
TextDtype = Literal["float32", "bfloat16"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and how to fix it."""


@dataclasses.dataclass(frozen=True)
class Range:
    """The allowed values of a numeric key: ">= 1", "> 0", "[0, 1)" (a closed / open interval), ..."""

    spec: str

    def __contains__(self, value: float) -> bool:
        spec = self.spec.replace(" ", "")
        if spec.startswith((">=", ">")):
            low = float(spec.lstrip(">="))
            return value >= low if spec.startswith(">=") else value > low
        low, high = (float(v) for v in spec[1:-1].split(","))
        above = value >= low if spec[0] == "[" else value > low
        below = value <= high if spec[-1] == "]" else value < high
        return above and below

    def __str__(self) -> str:
        return f"be {self.spec}" if self.spec[0] == ">" else f"be in {self.spec}"


def ranged(default: float, spec: str):
    """A numeric field whose allowed values are `spec` (see `Range`), checked when the config loads."""
    return dataclasses.field(default=default, metadata={"range": Range(spec)})


@dataclasses.dataclass
class ModelConfig:
    """The CogVideoX editing transformer. Sizes follow diffusers' `CogVideoXTransformer3DModel` names."""

    name: str = "cogvideox-2b-edit"
    num_layers: int = ranged(30, ">= 1")
    num_attention_heads: int = ranged(30, ">= 1")
    attention_head_dim: int = ranged(64, ">= 1")
    in_channels: int = ranged(16, ">= 1")  # latent channels of one stream; the edit patch embedding takes 2x this
    out_channels: int = ranged(16, ">= 1")
    patch_size: int = ranged(2, ">= 1")
    time_embed_dim: int = ranged(512, ">= 1")
    text_embed_dim: int = ranged(4096, ">= 1")
    text_length: int = ranged(226, ">= 1")
    mlp_ratio: float = ranged(4.0, "> 0")
    # Base size the positions are defined for: latent height/width, pixel frames (as diffusers).
    sample_height: int = ranged(60, ">= 1")
    sample_width: int = ranged(90, ">= 1")
    sample_frames: int = ranged(49, ">= 1")
    temporal_compression: int = ranged(4, ">= 1")
    positions: Literal["sincos", "rope"] = "sincos"  # sincos (2B) or rope (5B)
    spatial_interpolation_scale: float = ranged(1.875, "> 0")
    temporal_interpolation_scale: float = ranged(1.0, "> 0")
    rope_theta: float = ranged(10000.0, "> 0")
    patch_embed: Literal["double_ch", "fix_proj"] = "double_ch"  # double_ch: InsViE release; fix_proj: ablation
    norm_eps: float = ranged(1e-5, "> 0")
    qk_norm_eps: float = ranged(1e-6, "> 0")
    norm_out_eps: float = ranged(1e-5, "> 0")  # diffusers; SAT's final adaLN norm uses 1e-6
    param_dtype: ParamDtype = "float32"
    dtype: ComputeDtype = "bfloat16"
    attention: Literal["auto", "cudnn", "xla", "splash", "ring", "context_gather"] = "auto"  # models/attention.py
    # TPU splash-attention tiles (multiples of 128; block_kv_compute divides block_kv); backward uses the same.
    # 0: the tile for the TPU generation compiled for (models/attention.py SPLASH_TILES).
    splash_block_q: int = ranged(0, ">= 0")
    splash_block_kv: int = ranged(0, ">= 0")
    splash_block_kv_compute: int = ranged(0, ">= 0")
    splash_fused_bwd: bool = False  # one fused dQ/dK/dV backward kernel instead of two
    scan_layers: bool = True
    remat_policy: Literal["none", "full", "attention", "full_offload", "attention_offload", "attention_offload_all",
                          "dots", "dots_no_batch"] = "none"

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclasses.dataclass
class VAEConfig:
    """The CogVideoX 3D causal VAE. Architecture names follow diffusers' `AutoencoderKLCogVideoX`; a loaded
    checkpoint's own config.json replaces the architecture keys. The VAE returns unscaled latents:
    `scaling_factor` is applied where latents enter or leave the diffusion model."""

    path: str = ""  # diffusers `vae/` folder or SAT `3d-vae.pt`; empty = random init (tests, tiny)
    scaling_factor: float = ranged(1.15258426, "> 0")
    latent_channels: int = ranged(16, ">= 1")
    spatial_compression: int = ranged(8, ">= 1")  # = 2 ** (len(block_out_channels) - 1)
    temporal_compression: int = ranged(4, ">= 1")
    # Randomly initialised VAE only (empty `path`): > 0 = this constant posterior std instead of the drawn
    # log-variance head, whose std is as large as the means: posterior samples of it would be mostly noise.
    random_posterior_std: float = ranged(0.0, ">= 0")
    block_out_channels: list = dataclasses.field(default_factory=lambda: [128, 256, 256, 512])
    layers_per_block: int = ranged(3, ">= 1")
    norm_num_groups: int = ranged(32, ">= 1")
    norm_eps: float = ranged(1e-6, "> 0")
    # Memory modes; each gives the numbers of diffusers' same mode (the modes differ from each other slightly,
    # because group norms see only the frames / tile of one pass).
    # pixel frames per encoder pass, causal-conv cache carried over (diffusers: 8); 0 = all
    encode_frame_batch: int = ranged(8, ">= 0")
    decode_frame_batch: int = ranged(2, ">= 0")  # latent frames per decoder pass (diffusers: 2); 0 = all at once
    tiling: bool = False  # spatial tiles with blended overlaps (diffusers `enable_tiling`)
    tile_sample_height: int = ranged(240, ">= 1")  # pixel tile size (diffusers: half of sample_height/width 480x720)
    tile_sample_width: int = ranged(360, ">= 1")
    tile_overlap_height: float = ranged(1 / 6, "[0, 1)")
    tile_overlap_width: float = ranged(1 / 5, "[0, 1)")
    param_dtype: ParamDtype = "float32"
    dtype: ComputeDtype = "bfloat16"


# Wan2.2-TI2V-5B's per-channel latent statistics (its vae/config.json `latents_mean` / `latents_std`)
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)


@dataclasses.dataclass
class WanVAEConfig:
    """The Wan2.2 VAE (diffusers `AutoencoderKLWan` with `is_residual`); architecture names follow diffusers,
    defaults are Wan2.2-TI2V-5B's (16x spatial with the 2x2 patchify, 4x temporal, 48 latent channels). A loaded
    checkpoint's config.json replaces the architecture keys and the latent statistics. The VAE returns raw
    latents: `latents_mean` / `latents_std` are applied where latents enter or leave the diffusion model
    (`models.wan.vae.normalize_latents` / `denormalize_latents`)."""

    path: str = ""  # diffusers `vae/` folder (or a pipeline folder holding one); empty = random init
    base_dim: int = 160
    decoder_base_dim: int = 256
    z_dim: int = 48
    dim_mult: list = dataclasses.field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    temperal_downsample: list = dataclasses.field(default_factory=lambda: [False, True, True])  # diffusers' spelling
    patch_size: int = 2  # pixels are folded 2x2 into channels (3 -> 12) before the encoder
    latents_mean: list = dataclasses.field(default_factory=lambda: list(WAN22_LATENTS_MEAN))
    latents_std: list = dataclasses.field(default_factory=lambda: list(WAN22_LATENTS_STD))
    # Memory modes. Nothing normalises across frames, so frame batches give the numbers of one pass (diffusers
    # always runs 1 + 4 + 4 ... frames); tiles change them, as diffusers' `enable_tiling` does.
    encode_frame_batch: int = 4  # pixel frames per encoder pass after the first frame (a multiple of 4); 0 = all
    decode_frame_batch: int = 1  # latent frames per decoder pass after the first; 0 = all at once
    tiling: bool = False  # spatial tiles with blended overlaps (diffusers `enable_tiling`)
    tile_sample_height: int = 256  # diffusers' `tile_sample_min_height` / `_width` / `tile_sample_stride_*`
    tile_sample_width: int = 256
    tile_stride_height: int = 192
    tile_stride_width: int = 192
    param_dtype: str = "float32"
    dtype: str = "bfloat16"


@dataclasses.dataclass
class TextEncoderConfig:
    """The T5 v1.1 encoder. Sizes follow Hugging Face `T5Config` names; defaults are t5-v1_1-xxl (CogVideoX)."""

    path: str = ""  # Hugging Face T5 folder; empty = random init (tests, tiny)
    max_length: int = ranged(226, ">= 1")
    vocab_size: int = ranged(32128, ">= 3")
    d_model: int = ranged(4096, ">= 1")
    d_kv: int = ranged(64, ">= 1")
    num_heads: int = ranged(64, ">= 1")
    num_layers: int = ranged(24, ">= 1")
    d_ff: int = ranged(10240, ">= 1")
    relative_attention_num_buckets: int = ranged(32, ">= 1")
    relative_attention_max_distance: int = ranged(128, ">= 1")
    layer_norm_epsilon: float = ranged(1e-6, "> 0")
    param_dtype: ParamDtype = "float32"
    dtype: TextDtype = "bfloat16"
    scan_layers: bool = True


@dataclasses.dataclass
class DiffusionConfig:
    num_train_timesteps: int = ranged(1000, ">= 1")
    beta_start: float = ranged(0.00085, "(0, 1)")
    beta_end: float = ranged(0.012, "(0, 1)")
    snr_shift_scale: float = ranged(3.0, "> 0")  # 3.0 for 2B, 1.0 for 5B
    prediction: str = "v"


@dataclasses.dataclass
class MeshConfig:
    # Sizes of the named axes within a slice/host (ici_*) and across them (dcn_*); one may be -1 (the rest).
    ici_data: int = ranged(-1, ">= -1")
    ici_fsdp: int = ranged(1, ">= -1")
    ici_tensor: int = ranged(1, ">= -1")
    ici_context: int = ranged(1, ">= -1")
    dcn_data: int = ranged(1, ">= -1")
    dcn_fsdp: int = ranged(1, ">= -1")
    dcn_tensor: int = ranged(1, ">= -1")
    dcn_context: int = ranged(1, ">= -1")
    # Logical axis name -> mesh axis (or list of axes, or null = replicated).
    logical_axis_rules: list = dataclasses.field(
        default_factory=lambda: [
            ["batch", ["data", "fsdp"]],
            ["length", "context"],
            ["embed", "fsdp"],
            ["heads", "tensor"],
            ["mlp", "tensor"],
            ["head_dim", None],
            ["vocab", "tensor"],
            ["layers", None],
        ]
    )


@dataclasses.dataclass
class DataConfig:
    """Where training triplets come from and how clips are sampled (see insvie_jax/data/)."""

    # "synthetic": in-memory latent triplets (no files); "arrayrecord": shards written by `insvie-jax encode`
    # (`paths` = their folders); "video": triplet lists (`paths` = InsViE CSV / pair CSV / JSONL files),
    # decoded in the pipeline and encoded with the VAE and T5 in the main process.
    source: Literal["synthetic", "arrayrecord", "video"] = "synthetic"
    num_frames: int = ranged(49, ">= 1")  # pixel frames: 4k+1
    height: int = ranged(480, ">= 1")
    width: int = ranged(720, ">= 1")
    batch_size: int = ranged(1, ">= 1")  # global batch
    paths: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)  # mixture weight per path; empty = equal
    # InsViE CSV: [source_root, edit_root] folders, relative to the CSV's folder, holding same-named clips.
    video_roots: list = dataclasses.field(default_factory=lambda: ["source", "edit"])
    # A list row naming a file outside its data root (the list's folder; an InsViE CSV's video_roots) with `../`
    # or an absolute path is a bad row, unless this allows it.
    allow_outside_root: bool = False
    # An edited clip whose aspect ratio differs from its source's: "reject" (a bad sample) or "stretch" it to the
    # source's size.
    aspect_mismatch: Literal["reject", "stretch"] = "reject"
    fps: float = ranged(7.0, "> 0")  # frame sampling rate of InsViE's window rule
    skip_frames: int = ranged(0, ">= 0")  # raw frames skipped at the start (and end) of each clip
    pad_frames: bool = True  # pad short clips to num_frames by repeating the last frame; False = own 4k+1 length
    buckets: list = dataclasses.field(default_factory=list)  # [[height, width], ...]; empty = [[height, width]]
    crop: Literal["random", "center"] = "random"  # random: seeded per sample, same offsets for source and edit
    seed: int = ranged(0, ">= 0")  # shuffling, crops and posterior draws
    shuffle: bool = True
    # grain worker processes; 0 = in the training process. Batch order depends on it:
    num_workers: int = ranged(0, ">= 0")
    # a resumed run must keep the same value.
    prefetch: int = ranged(2, ">= 1")  # batches buffered per worker (or by a thread when num_workers = 0)
    # threads reading and decoding records, per stream (folder x bucket) and process
    read_threads: int = ranged(2, ">= 1")
    # input triplets per `encode` work unit (one ArrayRecord file per bucket each)
    shard_size: int = ranged(256, ">= 1")
    # triplets per `encode` step of a process, split over its devices; 0 = one per device
    encode_batch_size: int = ranged(0, ">= 0")
    report_dir: str = ""  # where the pipeline appends bad records (JSONL); empty = log only
    # data.source=video: InsViE's source augmentation, pixel noise of std exp(N(log_mean, log_std²)) (in [-1, 1]
    # units, one draw per clip) added to the source before the VAE; targets stay clean. Pre-encoded shards
    # (arrayrecord) hold clean posteriors and get none.
    source_noise: bool = True
    source_noise_log_mean: float = -3.0
    source_noise_log_std: float = ranged(0.5, ">= 0")
    # Moving-shape triplets (data/synthetic_videos.py) for data.source=arrayrecord: > 0 = where a data.paths
    # folder has no manifest, write this many triplets (mp4 + InsViE CSV in <folder>/videos) and encode them
    # there first; empty data.paths = [<train.run_dir>/data]. generate_instructions: a subset of the
    # generator's instructions (empty = all).
    generate: int = ranged(0, ">= 0")
    generate_instructions: list = dataclasses.field(default_factory=list)
    # `insvie-jax filter` thresholds; a triplet failing any is rejected with the failing score named.
    filter_frames: int = ranged(17, ">= 1")  # frames scored per clip
    filter_size: int = ranged(64, ">= 1")  # scoring resolution (shorter side, pixels)
    filter_min_motion: float = ranged(0.004, "[0, 1]")  # mean |frame difference| in [0, 1]: below = static
    filter_max_motion: float = ranged(0.15, "[0, 1]")  # above = chaotic (cuts, flashes, noise)
    filter_min_sharpness: float = ranged(20.0, ">= 0")  # variance of the Laplacian (0-255 grayscale): below = blurred
    filter_min_brightness: float = ranged(0.08, "[0, 1]")  # mean level in [0, 1]
    filter_max_brightness: float = ranged(0.92, "[0, 1]")
    filter_max_clipped: float = ranged(0.25, "[0, 1]")  # fraction of pixels at 0 or 255
    filter_max_duplicate: float = ranged(0.5, "[0, 1]")  # fraction of consecutive frame pairs that are near-identical
    filter_max_black: float = ranged(0.1, "[0, 1]")  # fraction of black frames
    # SSIM(source, edit): below = the edit replaced the whole clip
    filter_min_consistency: float = ranged(0.2, "[-1, 1]")
    filter_max_consistency: float = ranged(0.995, "[-1, 1]")  # above = the edit changed nothing
    filter_max_fps_ratio: float = ranged(1.01, ">= 1")  # max(fps) / min(fps) of source and edit
    # Optional VLM judge: "" = none; "http(s)://..." = JSON endpoint; "module:function" = Python callable.
    filter_judge: str = ""
    filter_min_judge_score: float = 0.5
    filter_judge_frames: int = ranged(3, ">= 1")
    filter_judge_batch: int = ranged(8, ">= 1")  # concurrent requests
    filter_judge_retries: int = ranged(3, ">= 0")
    filter_judge_timeout: float = ranged(60.0, "> 0")
    filter_judge_cache: str = ""  # folder of cached judge scores; empty = no cache


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = ranged(1000, ">= 0")  # train steps; each takes one global batch of data.batch_size
    seed: int = ranged(0, ">= 0")
    lr: float = ranged(1e-4, "> 0")
    warmup_steps: int = ranged(0, ">= 0")  # in optimizer updates (steps / grad_accum)
    schedule: Literal["cosine", "constant"] = "cosine"  # after warmup; cosine decays to 0 at the last update
    # optimizer update every grad_accum steps, on the mean gradient (optax.MultiSteps)
    grad_accum: int = ranged(1, ">= 1")
    ema_decay: float = ranged(0.0, "[0, 1)")  # EMA of the trainable weights, saved beside them; 0 = off
    init_from: str = ""  # SAT / diffusers / native transformer checkpoint to start from; empty = random init
    # steps with a non-finite loss/gradient are skipped; this many in a row stop
    max_nonfinite_in_a_row: int = ranged(10, ">= 1")
    weight_decay: float = ranged(1e-4, ">= 0")
    adam_b1: float = ranged(0.9, "[0, 1)")
    adam_b2: float = ranged(0.95, "[0, 1)")
    adam_eps: float = ranged(1e-8, ">= 0")
    grad_clip: float = ranged(1.0, "> 0")
    frame_loss_weight: float = ranged(0.5, ">= 0")
    text_dropout: float = ranged(0.1, "[0, 1]")
    source_dropout: float = ranged(0.05, "[0, 1]")
    source_dropout_per: Literal["batch", "sample"] = "batch"  # "batch": one draw per step (InsViE) | "sample"
    log_every: int = ranged(10, ">= 1")
    # Validation edits (train/validate.py): every this many steps, 0 = off; of up to num_val_clips clips
    # (the eval split's first, or the first synthetic batch's), with val_sample_steps sampler steps.
    sample_every: int = ranged(0, ">= 0")
    num_val_clips: int = ranged(2, ">= 1")
    val_sample_steps: int = ranged(10, ">= 1")


@dataclasses.dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = ranged(128, ">= 1")
    alpha: float = 1.0
    targets: list = dataclasses.field(default_factory=lambda: ["qkv", "attn_out"])
    also_train: list = dataclasses.field(default_factory=lambda: ["proj_edit"])


@dataclasses.dataclass
class CheckpointConfig:
    every: int = ranged(1000, ">= 1")  # save every this many steps (and at the end, and on SIGTERM)
    keep: int = ranged(3, ">= 1")  # the newest this many are kept ...
    keep_every: int = ranged(0, ">= 0")  # ... plus every step divisible by this; 0 = none
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass
class SampleConfig:
    steps: int = ranged(50, ">= 1")
    text_scale: float = ranged(7.5, ">= 0")
    source_scale: float = ranged(1.2, ">= 0")
    guidance_schedule: Literal["insvie", "cosine", "constant"] = "insvie"
    guidance_exponent: int = ranged(5, ">= 0")  # the cosine schedule's power (InsViE's `exp`)
    # "dpmpp_2m_sde": SAT's VP-SDE DPM++(2M) exactly as InsViE samples; "cogvideox_dpm" / "ddim": diffusers'
    # CogVideoXDPMScheduler / CogVideoXDDIMScheduler (trailing spacing).
    sampler: Literal["dpmpp_2m_sde", "cogvideox_dpm", "ddim"] = "dpmpp_2m_sde"
    fps: int = ranged(7, ">= 1")
    seed: int = ranged(0, ">= 0")


@dataclasses.dataclass
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    # A curriculum: [{name, steps, overrides: {"section.key": value}, keep_optimizer}, ...]; see `resolve_stages`.
    # Empty = one stage ("main") of train.steps steps.
    stages: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Loading


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


# Words people write for a key, by the key's own name: `train.learning_rate` -> `train.lr`.
_SYNONYMS = {"learning": "lr", "rate": "lr", "learningrate": "lr", "iterations": "steps", "iters": "steps",
             "epochs": "steps", "bs": "batch_size", "batch": "batch_size", "layers": "num_layers",
             "heads": "num_attention_heads", "frames": "num_frames", "warmup": "warmup_steps"}


def _closest(key: str, valid: list[str], prefix: str) -> str:
    """'; did you mean ...?' naming the valid key that shares the most word parts with `key` (synonyms and
    initials count: learning_rate -> lr), else the closest spelling."""
    words = [w for w in key.lower().replace("-", "_").split("_") if w]
    wanted = set(words) | {_SYNONYMS[w] for w in words if w in _SYNONYMS} | {"".join(w[0] for w in words)}
    wanted |= {_SYNONYMS["".join(words)]} if "".join(words) in _SYNONYMS else set()

    def overlap(name: str) -> int:
        return len(wanted & ({name} | set(name.split("_")))) + 2 * (name in wanted)

    best = max(valid, key=overlap, default=None)
    if best is not None and overlap(best) >= 2 and difflib.SequenceMatcher(None, key, best).ratio() < 0.8:
        match = [best]
    else:
        match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


def choices(key: str) -> tuple[str, ...]:
    """The allowed values of a string key ("sample.sampler"), from its Literal type in the schema."""
    section, name = key.split(".")
    return typing.get_args(_field_types(_field_types(Config)[section])[name])


def _coerce(path: str, value: Any, want: Any) -> Any:
    """Checks `value` against the annotated type; ints are accepted where floats are wanted."""
    origin = typing.get_origin(want)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(want):
            try:
                return _coerce(path, value, option)
            except ConfigError:
                pass
        raise ConfigError(f"config key '{path}': expected {want}, got {value!r} ({type(value).__name__})")
    if want is Any:
        return value
    if origin is Literal:
        if value in typing.get_args(want):
            return value
        raise ConfigError(f"config key '{path}' = {value!r}: expected one of {', '.join(typing.get_args(want))}")
    if want is bool:
        if isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `3e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is str:
        if isinstance(value, str):
            return value
    elif want is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    elif want is dict or origin is dict:
        if isinstance(value, dict):
            return value
    elif want is type(None):
        if value is None:
            return None
    name = getattr(want, "__name__", str(want))
    raise ConfigError(f"config key '{path}': expected {name}, got {value!r} ({type(value).__name__})")


def _check_number(path: str, value: Any, field: dataclasses.Field) -> None:
    """Every number must be finite, and within the field's `Range` when the schema gives one."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise ConfigError(f"config key '{path}' = {value}: must be a finite number")
    allowed = field.metadata.get("range")
    if allowed is not None and value not in allowed:
        raise ConfigError(f"config key '{path}' = {value}: must {allowed}")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = prefix + key
        if key not in types_:
            raise ConfigError(f"unknown config key '{path}'{_closest(key, list(types_), prefix)}")
        want = types_[key]
        if dataclasses.is_dataclass(want):
            kwargs[key] = _build(want, value or {}, path + ".")
        else:
            kwargs[key] = _coerce(path, value, want)
            _check_number(path, kwargs[key], fields[key])
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> dict:
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in seen:
        raise ConfigError(f"config file {path} includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = data.pop("base", None)
    if base:
        base_path = Path(base) if Path(base).is_absolute() else path.parent / base
        if not base_path.exists():  # `base: tiny` in a user's file names the shipped preset
            base_path = resolve_path(base)
        data = _merge(_read_yaml(base_path, seen + (path.resolve(),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """`model.num_layers=4` -> (['model', 'num_layers'], 4); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _apply_override(data: dict, keys: list[str], value: Any) -> None:
    if keys[0] == "stages" and len(keys) > 1:
        _apply_stage_override(data, keys, value)
        return
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{'.'.join(keys)}': '{k}' is not a section")
    node[keys[-1]] = value


def resolve_path(name: str | Path) -> Path:
    """A config path, or the name of a shipped preset (`tiny`, `cogvideox-2b-edit`)."""
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"config '{name}' is neither a file nor a preset; presets: {', '.join(presets())}")


def presets() -> list[str]:
    """The shipped presets: every YAML file in configs/ (sweep files live in configs/sweeps/)."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def from_dict(data: dict) -> Config:
    config = _build(Config, data)
    validate(config)
    resolve_stages(config)  # every stage's overrides are checked when the config loads, before any training
    return config


def load(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Loads a YAML config (or preset name), applies `key=value` overrides, validates."""
    data = _read_yaml(resolve_path(path)) if path else {}
    for text in overrides:
        keys, value = parse_override(text)
        _apply_override(data, keys, value)
    return from_dict(data)


def save(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def latent_shape(config: Config) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of the model input latents of config.data's clip."""
    d, v = config.data, config.vae
    return ((d.num_frames - 1) // v.temporal_compression + 1, d.height // v.spatial_compression,
            d.width // v.spatial_compression, config.model.in_channels)


# ---------------------------------------------------------------------------------------------------
# Validation of derived values

def _validate_vae(v: VAEConfig) -> None:
    levels = len(v.block_out_channels) - 1
    if v.spatial_compression != 2**levels:
        raise ConfigError(
            f"vae.spatial_compression={v.spatial_compression} does not fit vae.block_out_channels="
            f"{v.block_out_channels}: {len(v.block_out_channels)} blocks compress by {2**levels}"
        )
    if v.temporal_compression < 1 or v.temporal_compression & (v.temporal_compression - 1) or \
            v.temporal_compression > 2**levels:
        raise ConfigError(f"vae.temporal_compression={v.temporal_compression} must be a power of two <= {2**levels}")
    bad = [c for c in v.block_out_channels if c % v.norm_num_groups]
    if bad:
        raise ConfigError(f"vae.block_out_channels {bad} are not divisible by vae.norm_num_groups={v.norm_num_groups}")
    if min(v.tile_sample_height, v.tile_sample_width) < v.spatial_compression:
        raise ConfigError(
            f"vae.tile_sample_height/width must be at least vae.spatial_compression={v.spatial_compression}"
        )


def _validate_data(d: DataConfig, step: int) -> None:
    for bucket in d.buckets:
        if not (isinstance(bucket, (list, tuple)) and len(bucket) == 2 and
                all(isinstance(v, int) and v > 0 and v % step == 0 for v in bucket)):
            raise ConfigError(f"data.buckets entry {bucket!r} must be [height, width], positive multiples of {step}")
    if d.weights and (len(d.weights) != len(d.paths) or any(not isinstance(w, (int, float)) or w < 0
                                                              for w in d.weights) or not sum(d.weights)):
        raise ConfigError(f"data.weights={d.weights} must be one non-negative number per data.paths entry "
                          f"({len(d.paths)}), not all zero")
    if d.generate and d.source != "arrayrecord":
        raise ConfigError(f"data.generate={d.generate} writes encoded shards: set data.source=arrayrecord "
                          f"(not {d.source!r}), or data.generate=0")
    if d.source != "synthetic" and not d.paths and not d.generate:
        raise ConfigError(f"data.source={d.source!r} needs data.paths (shard folders for 'arrayrecord', triplet "
                          "lists for 'video')")


def validate(config: Config) -> None:
    _validate_vae(config.vae)
    m, d = config.model, config.data
    if m.hidden_size % 4 or (m.positions == "sincos" and m.hidden_size % 16):
        raise ConfigError(
            f"model hidden size {m.hidden_size} (heads x head_dim) must be divisible by 16 for sin-cos positions"
        )
    splash_blocks = {k: getattr(m, k) for k in ("splash_block_q", "splash_block_kv", "splash_block_kv_compute")}
    bad = [f"{k}={b}" for k, b in splash_blocks.items() if b % 128]
    if bad:
        raise ConfigError(f"model.{', model.'.join(bad)}: splash block sizes must be positive multiples of 128 "
                          "(or 0: chosen for the TPU generation)")
    if m.splash_block_kv_compute and m.splash_block_kv and m.splash_block_kv % m.splash_block_kv_compute:
        raise ConfigError(f"model.splash_block_kv_compute={m.splash_block_kv_compute} must divide "
                          f"model.splash_block_kv={m.splash_block_kv}")
    if m.positions == "rope" and m.attention_head_dim % 16:
        raise ConfigError(f"model.attention_head_dim={m.attention_head_dim} must be divisible by 16 for 3D RoPE")
    if d.num_frames < 1 or (d.num_frames - 1) % m.temporal_compression:
        k = max((d.num_frames - 1) // m.temporal_compression, 0)
        raise ConfigError(
            f"data.num_frames={d.num_frames} must be {m.temporal_compression}k+1 (e.g. "
            f"{m.temporal_compression * k + 1} or {m.temporal_compression * (k + 1) + 1})"
        )
    step = config.vae.spatial_compression * m.patch_size
    _validate_data(d, step)
    for key in ("height", "width"):
        value = getattr(d, key)
        if value <= 0 or value % step:
            raise ConfigError(
                f"data.{key}={value} must be a positive multiple of {step} (VAE factor "
                f"{config.vae.spatial_compression} x patch size {m.patch_size})"
            )
    if m.dtype == "float16" and m.hidden_size >= 3072:
        raise ConfigError(
            "model.dtype=float16 is refused for 5B-size models (CogVideoX-5B overflows to NaN in fp16): "
            "use model.dtype=bfloat16"
        )
    if not 1 <= config.sample.steps <= config.diffusion.num_train_timesteps:
        raise ConfigError(f"sample.steps={config.sample.steps} must be between 1 and diffusion.num_train_timesteps "
                          f"({config.diffusion.num_train_timesteps})")


# ---------------------------------------------------------------------------------------------------
# Stages (a curriculum)

STAGE_KEYS = ("name", "steps", "overrides", "keep_optimizer")
# What a stage may change: the data, the optimization, what trains and the validation sampling, plus model
# knobs that leave the weights as they are. The architecture, the mesh and the checkpoint series are the run's.
_STAGE_SECTIONS = ("data", "train", "lora", "sample")
_STAGE_MODEL_KEYS = ("model.remat_policy", "model.attention")
_STAGE_FIXED = {
    "train.steps": "a stage's length is its own `steps`",
    "train.run_dir": "all stages write one run folder",
    "train.init_from": "only the first stage starts from train.init_from (set it outside `stages`); later stages "
                       "start from the stage before",
}


@dataclasses.dataclass
class Stage:
    """One stage of a run, resolved: `config` is the base config plus the stage's overrides, with train.steps =
    `steps`; the stage covers the global steps [start, start + steps)."""

    name: str
    steps: int
    start: int
    keep_optimizer: bool
    config: Config

    @property
    def end(self) -> int:
        return self.start + self.steps


def what_trains(config: Config) -> tuple:
    """Equal for two configs exactly when their trainable parameter sets have the same structure."""
    lora = config.lora
    if lora.enabled:
        return ("lora", lora.rank, lora.alpha, tuple(lora.targets), tuple(lora.also_train))
    return ("full",)


def _stage_overrides(overrides: dict) -> dict[str, Any]:
    """{"section.key": value}; a section may also be given as a mapping (`data: {num_frames: 1}`)."""
    flat = {}
    for key, value in overrides.items():
        if isinstance(value, dict) and "." not in str(key):
            flat.update({f"{key}.{inner}": v for inner, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _check_stage_key(key: str, where: str) -> None:
    section = key.split(".")[0]
    if section not in _field_types(Config):
        return  # not a config key at all: _build names the closest one
    if key in _STAGE_FIXED:
        raise ConfigError(f"{where}: '{key}' cannot be set per stage: {_STAGE_FIXED[key]}")
    if section not in _STAGE_SECTIONS and key not in _STAGE_MODEL_KEYS:
        raise ConfigError(f"{where}: '{key}' cannot change between stages (stages share the model, mesh and "
                          f"checkpoint series); a stage may set {', '.join(s + '.*' for s in _STAGE_SECTIONS)}, "
                          f"{', '.join(_STAGE_MODEL_KEYS)}")


def _stage_entry(entry: Any, index: int) -> tuple[str, int, bool, dict]:
    where = f"stages[{index}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping with {', '.join(STAGE_KEYS)}, got {entry!r}")
    for key in entry:
        if key not in STAGE_KEYS:
            raise ConfigError(f"{where}: unknown stage key '{key}'{_closest(str(key), list(STAGE_KEYS), '')}")
    name = entry.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "-_" for c in name):
        raise ConfigError(f"{where}: 'name' must be a non-empty string of letters, digits, '-' and '_', got {name!r}")
    where = f"stage '{name}' ({where})"
    steps = entry.get("steps")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"{where}: 'steps' must be a positive integer, got {steps!r}")
    keep = entry.get("keep_optimizer", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"{where}: 'keep_optimizer' must be true or false, got {keep!r}")
    overrides = entry.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: 'overrides' must be a mapping of section.key: value, got {overrides!r}")
    return name, steps, keep, overrides


def resolve_stages(config: Config) -> list[Stage]:
    """The run's stages, each a validated Config (the base plus the stage's overrides, which are checked as
    command-line overrides are); a config without `stages` is one stage, "main", of train.steps steps.

    Stages run one after another on one global step count; each starts from the weights the stage before
    ended with (see train/stages.py for what happens when what trains changes)."""
    if not config.stages:
        return [Stage("main", config.train.steps, 0, False, config)]
    base = config.to_dict()
    base["stages"] = []
    stages: list[Stage] = []
    for index, entry in enumerate(config.stages):
        name, steps, keep, overrides = _stage_entry(entry, index)
        where = f"stage '{name}' (stages[{index}])"
        if any(s.name == name for s in stages):
            raise ConfigError(f"{where}: another stage is already named '{name}'; stage names must be unique")
        data = copy.deepcopy(base)
        for key, value in _stage_overrides(overrides).items():
            _check_stage_key(key, where)
            _apply_override(data, key.split("."), value)
        data["train"]["steps"] = steps
        try:
            stage_config = from_dict(data)
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if steps % stage_config.train.grad_accum:
            raise ConfigError(f"{where}: steps={steps} must be a multiple of train.grad_accum="
                              f"{stage_config.train.grad_accum} (an accumulation must not span two stages)")
        if keep:
            before = stages[-1].config if stages else None
            if before is None:
                raise ConfigError(f"{where}: keep_optimizer=true, but the first stage has no optimizer state to keep")
            if what_trains(before) != what_trains(stage_config):
                raise ConfigError(f"{where}: keep_optimizer=true, but what trains changes ({what_trains(before)} -> "
                                  f"{what_trains(stage_config)}), so the optimizer state does not fit: set "
                                  "keep_optimizer=false (a fresh optimizer state) or keep the lora.* keys")
            if (before.train.grad_accum > 1) != (stage_config.train.grad_accum > 1):
                raise ConfigError(f"{where}: keep_optimizer=true needs train.grad_accum > 1 in both this stage and "
                                  "the one before, or in neither (the optimizer state differs)")
        stages.append(Stage(name, steps, stages[-1].end if stages else 0, keep, stage_config))
    return stages


def _apply_stage_override(data: dict, keys: list[str], value: Any) -> None:
    """`stages.<name or index>.steps=N`, `stages.<name>.keep_optimizer=true`, `stages.<name>.data.num_frames=1`."""
    text = ".".join(keys)
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"override '{text}': the config has no stages")
    names = [s.get("name") if isinstance(s, dict) else None for s in stages]
    wanted = keys[1]
    if wanted in names:
        entry = stages[names.index(wanted)]
    elif wanted.isdigit() and int(wanted) < len(stages):
        entry = stages[int(wanted)]
    else:
        known = [str(n) for n in names]
        raise ConfigError(f"override '{text}': no stage '{wanted}' (stages: {', '.join(known)})"
                          f"{_closest(wanted, known, 'stages.')}")
    if not isinstance(entry, dict) or len(keys) < 3:
        raise ConfigError(f"override '{text}' must look like stages.<name>.steps=N or stages.<name>.section.key=value")
    if len(keys) == 3 and keys[2] in STAGE_KEYS:
        entry[keys[2]] = value
    else:
        overrides = entry.setdefault("overrides", {}) or {}
        entry["overrides"] = {**overrides, ".".join(keys[2:]): value}
