"""The config schema: one typed dataclass per section; allowed values (Literal types) and numeric ranges
(`ranged`) live on the fields, so that loading checks every key in one place."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal

# Allowed values of string keys live in the schema as Literal types; `choices("section.key")` lists them.
ComputeDtype = Literal["float32", "bfloat16", "float16"]
ParamDtype = Literal["float32", "bfloat16"]
# No float16 for T5: v1.1 feed-forward activations overflow it (Hugging Face clamps; bf16 needs no clamp).
TextDtype = Literal["float32", "bfloat16"]
Attention = Literal["auto", "cudnn", "xla", "splash", "ring", "context_gather"]  # models/attention.py
RematPolicy = Literal["none", "full", "attention", "full_offload", "attention_offload", "attention_offload_all",
                      "dots", "dots_no_batch"]
# The model families: `model.family` picks the model and vae sections' dataclasses (FAMILY_SECTIONS, below);
# the text encoder, objective, sampler and guidance must fit the family (validate.py says which).
ModelFamily = Literal["cogvideox", "wan"]
# DDPM samplers (v-prediction, CogVideoX) and flow-matching samplers (Wan: diffusion/flow.py).
DDPMSampler = Literal["dpmpp_2m_sde", "cogvideox_dpm", "ddim"]
FlowSampler = Literal["flow_unipc", "flow_euler"]


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and how to fix it."""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


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


@dataclasses.dataclass(frozen=True)
class TransformerExecution:
    """How either family's transformer runs (dtypes, attention kernel and tiles, layer scan, remat); the
    family's own section adds its sizes."""

    param_dtype: ParamDtype = "float32"
    dtype: ComputeDtype = "bfloat16"
    attention: Attention = "auto"  # models/attention.py
    # TPU splash-attention tiles (multiples of 128; block_kv_compute divides block_kv); backward uses the same.
    # 0: the tile for the TPU generation compiled for (models/attention.py SPLASH_TILES).
    splash_block_q: int = ranged(0, ">= 0")
    splash_block_kv: int = ranged(0, ">= 0")
    splash_block_kv_compute: int = ranged(0, ">= 0")
    splash_fused_bwd: bool = False  # one fused dQ/dK/dV backward kernel instead of two
    scan_layers: bool = True
    remat_policy: RematPolicy = "none"

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim


@dataclasses.dataclass(frozen=True)
class ModelConfig(TransformerExecution):
    """The CogVideoX editing transformer. Sizes follow diffusers' `CogVideoXTransformer3DModel` names."""

    family: Literal["cogvideox"] = "cogvideox"
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
    @property
    def mlp_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class WanModelConfig(TransformerExecution):
    """The Wan edit transformer (diffusers `WanTransformer3DModel`, Lucy-Edit layout: source latents concatenated
    on channels). Field names follow `ModelConfig` where the two mean the same, diffusers' otherwise; defaults
    are Wan2.2-TI2V-5B's in the edit layout (in_channels 96 = 2 x 48)."""

    family: Literal["wan"] = "wan"
    name: str = "wan22-ti2v-5b-edit"
    num_layers: int = ranged(30, ">= 1")
    num_attention_heads: int = ranged(24, ">= 1")
    attention_head_dim: int = ranged(128, ">= 1")
    in_channels: int = ranged(48, ">= 1")  # latent channels of one stream (= vae.z_dim); the patch embedding takes 2x
    out_channels: int = ranged(48, ">= 1")
    patch_size: list = dataclasses.field(default_factory=lambda: [1, 2, 2])  # (frames, height, width)
    text_embed_dim: int = ranged(4096, ">= 1")  # = text_encoder.d_model (UMT5-XXL)
    text_length: int = ranged(512, ">= 1")  # = text_encoder.max_length
    freq_dim: int = ranged(256, ">= 2")  # sinusoidal timestep features
    ffn_dim: int = ranged(14336, ">= 1")
    cross_attn_norm: bool = True
    eps: float = ranged(1e-6, "> 0")
    rope_max_seq_len: int = ranged(1024, ">= 1")
    rope_theta: float = ranged(10000.0, "> 0")
    @property
    def mlp_dim(self) -> int:
        return self.ffn_dim


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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
    param_dtype: ParamDtype = "float32"
    dtype: ComputeDtype = "bfloat16"

    @property
    def spatial_compression(self) -> int:  # the 2x2 patchify, then one halving per downsampling level
        return self.patch_size * 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def latent_channels(self) -> int:
        return self.z_dim


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    """The T5 v1.1 encoder (family t5), or UMT5 (family umt5: Wan's; a relative position bias in every layer).
    Sizes follow Hugging Face `T5Config` names; defaults are t5-v1_1-xxl (CogVideoX); `models.umt5.
    umt5_xxl_config()` gives UMT5-XXL's (vocab 256384, 512 tokens)."""

    family: Literal["t5", "umt5"] = "t5"
    path: str = ""  # Hugging Face T5 / UMT5 folder; empty = random init (tests, tiny)
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


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    num_train_timesteps: int = ranged(1000, ">= 1")
    beta_start: float = ranged(0.00085, "(0, 1)")
    beta_end: float = ranged(0.012, "(0, 1)")
    snr_shift_scale: float = ranged(3.0, "> 0")  # 3.0 for 2B, 1.0 for 5B
    prediction: str = "v"
    # "v": DDPM v-prediction (CogVideoX, the keys above); "flow": rectified flow, velocity target, σ shifted by
    # flow_shift (Wan: diffusion/flow.py; 5.0 for Wan2.2-TI2V-5B, 3.0 for 480p Wan2.1).
    objective: Literal["v", "flow"] = "v"
    flow_shift: float = ranged(5.0, "> 0")


@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
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
    # > 0: also this many fresh triplets (another seed) in <folder>/val, which validation edits instead of
    # training clips: the metric then says whether the model generalises rather than memorises.
    generate_val: int = ranged(0, ">= 0")


@dataclasses.dataclass(frozen=True)
class FilterConfig:
    """`insvie-jax filter` (data/filters.py): thresholds on the scores of a triplet (one failing = rejected, the
    failing score named) and the optional VLM judge."""

    frames: int = ranged(17, ">= 1")  # frames scored per clip
    size: int = ranged(64, ">= 1")  # scoring resolution (shorter side, pixels)
    min_motion: float = ranged(0.004, "[0, 1]")  # mean |frame difference| in [0, 1]: below = static
    max_motion: float = ranged(0.15, "[0, 1]")  # above = chaotic (cuts, flashes, noise)
    min_sharpness: float = ranged(20.0, ">= 0")  # variance of the Laplacian (0-255 grayscale): below = blurred
    min_brightness: float = ranged(0.08, "[0, 1]")  # mean level in [0, 1]
    max_brightness: float = ranged(0.92, "[0, 1]")
    max_clipped: float = ranged(0.25, "[0, 1]")  # fraction of pixels at 0 or 255
    max_duplicate: float = ranged(0.5, "[0, 1]")  # fraction of consecutive frame pairs that are near-identical
    max_black: float = ranged(0.1, "[0, 1]")  # fraction of black frames
    # SSIM(source, edit): below = the edit replaced the whole clip
    min_consistency: float = ranged(0.2, "[-1, 1]")
    max_consistency: float = ranged(0.995, "[-1, 1]")  # above = the edit changed nothing
    max_fps_ratio: float = ranged(1.01, ">= 1")  # max(fps) / min(fps) of source and edit
    # Optional VLM judge: "" = none; "http(s)://..." = JSON endpoint; "module:function" = Python callable.
    judge: str = ""
    min_judge_score: float = 0.5
    judge_frames: int = ranged(3, ">= 1")
    judge_batch: int = ranged(8, ">= 1")  # concurrent requests
    judge_retries: int = ranged(3, ">= 0")
    judge_timeout: float = ranged(60.0, "> 0")
    judge_cache: str = ""  # folder of cached judge scores; empty = no cache


@dataclasses.dataclass(frozen=True)
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
    # extra loss weight on the latent cells the edit changes (diffusion/loss.edit_region_weights); 0 = InsViE's
    edit_region_weight: float = ranged(0.0, ">= 0")
    text_dropout: float = ranged(0.1, "[0, 1]")
    source_dropout: float = ranged(0.05, "[0, 1]")
    source_dropout_per: Literal["batch", "sample"] = "batch"  # "batch": one draw per step (InsViE) | "sample"
    log_every: int = ranged(10, ">= 1")
    # Validation edits (train/validate.py): every this many steps, 0 = off; of up to num_val_clips clips
    # (the eval split's first, or the first synthetic batch's), with val_sample_steps sampler steps.
    sample_every: int = ranged(0, ">= 0")
    num_val_clips: int = ranged(2, ">= 1")
    val_sample_steps: int = ranged(10, ">= 1")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    enabled: bool = False
    rank: int = ranged(128, ">= 1")
    alpha: float = 1.0
    targets: list = dataclasses.field(default_factory=lambda: ["qkv", "attn_out"])
    also_train: list = dataclasses.field(default_factory=lambda: ["proj_edit"])


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = ranged(1000, ">= 1")  # save every this many steps (and at the end, and on SIGTERM)
    keep: int = ranged(3, ">= 1")  # the newest this many are kept ...
    keep_every: int = ranged(0, ">= 0")  # ... plus every step divisible by this; 0 = none
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    steps: int = ranged(50, ">= 1")
    text_scale: float = ranged(7.5, ">= 0")
    source_scale: float = ranged(1.2, ">= 0")
    guidance_schedule: Literal["insvie", "cosine", "constant"] = "insvie"
    guidance_exponent: int = ranged(5, ">= 0")  # the cosine schedule's power (InsViE's `exp`)
    # "dpmpp_2m_sde": SAT's VP-SDE DPM++(2M) exactly as InsViE samples; "cogvideox_dpm" / "ddim": diffusers'
    # CogVideoXDPMScheduler / CogVideoXDDIMScheduler (trailing spacing). Flow objective (Wan): "flow_unipc"
    # (Wan's UniPCMultistepScheduler) / "flow_euler" (FlowMatchEulerDiscreteScheduler).
    sampler: Literal[DDPMSampler, FlowSampler] = "dpmpp_2m_sde"
    # "insvie": 3-way (text_scale, source_scale; CogVideoX and Wan) | "lucy": 2-way text CFG, the source in both
    # branches (Wan, as LucyEditPipeline)
    guidance: Literal["insvie", "lucy"] = "insvie"
    negative_prompt: str = ""  # lucy's unconditional text (encoded); "" = the empty prompt
    fps: int = ranged(7, ">= 1")
    seed: int = ranged(0, ">= 0")


# The sections whose dataclass `model.family` picks; each family's value is its own `family` field's one value.
FAMILY_SECTIONS = {
    "cogvideox": {"model": ModelConfig, "vae": VAEConfig},
    "wan": {"model": WanModelConfig, "vae": WanVAEConfig},
}
assert tuple(FAMILY_SECTIONS) == typing.get_args(ModelFamily)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig | WanModelConfig = dataclasses.field(default_factory=ModelConfig)
    vae: VAEConfig | WanVAEConfig = dataclasses.field(default_factory=VAEConfig)
    text_encoder: TextEncoderConfig = dataclasses.field(default_factory=TextEncoderConfig)
    diffusion: DiffusionConfig = dataclasses.field(default_factory=DiffusionConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    filter: FilterConfig = dataclasses.field(default_factory=FilterConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    # A curriculum: [{name, steps, overrides: {"section.key": value}, keep_optimizer}, ...]; see `resolve_stages`.
    # Empty = one stage ("main") of train.steps steps.
    stages: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def latent_shape(config: Config) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of the model input latents of config.data's clip (CogVideoX: 8x spatial,
    Wan2.2: 16x; both 4x temporal)."""
    d, v = config.data, config.vae
    return ((d.num_frames - 1) // v.temporal_compression + 1, d.height // v.spatial_compression,
            d.width // v.spatial_compression, config.model.in_channels)
