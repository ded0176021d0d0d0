"""Config as data: typed dataclasses, YAML files with `base:` includes, and `key=value` overrides.

Every key is validated when the config is loaded: an unknown key names the closest valid one, a value
of the wrong type names the key and the type it wants, and derived values (frame counts, resolution,
dtype) are checked once here so that nothing downstream has to.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message says which key and how to fix it."""


@dataclasses.dataclass
class ModelConfig:
    """The CogVideoX editing transformer. Sizes follow diffusers' `CogVideoXTransformer3DModel` names."""

    name: str = "cogvideox-2b-edit"
    num_layers: int = 30
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16  # latent channels of one stream; the edit patch embedding takes 2x this
    out_channels: int = 16
    patch_size: int = 2
    time_embed_dim: int = 512
    text_embed_dim: int = 4096
    text_length: int = 226
    mlp_ratio: float = 4.0
    # Base size the positions are defined for: latent height/width, pixel frames (as diffusers).
    sample_height: int = 60
    sample_width: int = 90
    sample_frames: int = 49
    temporal_compression: int = 4
    positions: str = "sincos"  # "sincos" (2B) or "rope" (5B)
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    rope_theta: float = 10000.0
    patch_embed: str = "double_ch"  # "double_ch" (InsViE release) or "fix_proj" (ablation)
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-6
    norm_out_eps: float = 1e-5  # diffusers; SAT's final adaLN norm uses 1e-6
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    attention: str = "auto"  # "auto" | "cudnn" | "xla" | "splash" | "ring" | "context_gather" (models/attention.py)
    # TPU splash-attention tiles (multiples of 128; block_kv_compute divides block_kv); backward uses the same.
    splash_block_q: int = 512
    splash_block_kv: int = 512
    splash_block_kv_compute: int = 512
    splash_fused_bwd: bool = False  # one fused dQ/dK/dV backward kernel instead of two
    scan_layers: bool = True
    remat_policy: str = "none"  # "none" | "full" | "attention" | "dots" | "dots_no_batch"

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
    scaling_factor: float = 1.15258426
    latent_channels: int = 16
    spatial_compression: int = 8  # = 2 ** (len(block_out_channels) - 1)
    temporal_compression: int = 4
    # Randomly initialised VAE only (empty `path`): > 0 = this constant posterior std instead of the drawn
    # log-variance head, whose std is as large as the means: posterior samples of it would be mostly noise.
    random_posterior_std: float = 0.0
    block_out_channels: list = dataclasses.field(default_factory=lambda: [128, 256, 256, 512])
    layers_per_block: int = 3
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    # Memory modes; each gives the numbers of diffusers' same mode (the modes differ from each other slightly,
    # because group norms see only the frames / tile of one pass).
    encode_frame_batch: int = 8  # pixel frames per encoder pass, causal-conv cache carried over (diffusers: 8); 0 = all
    decode_frame_batch: int = 2  # latent frames per decoder pass (diffusers: 2); 0 = all at once
    tiling: bool = False  # spatial tiles with blended overlaps (diffusers `enable_tiling`)
    tile_sample_height: int = 240  # pixel tile size (diffusers: half of sample_height/width 480x720)
    tile_sample_width: int = 360
    tile_overlap_height: float = 1 / 6
    tile_overlap_width: float = 1 / 5
    param_dtype: str = "float32"
    dtype: str = "bfloat16"


@dataclasses.dataclass
class TextEncoderConfig:
    """The T5 v1.1 encoder. Sizes follow Hugging Face `T5Config` names; defaults are t5-v1_1-xxl (CogVideoX)."""

    path: str = ""  # Hugging Face T5 folder; empty = random init (tests, tiny)
    max_length: int = 226
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    num_layers: int = 24
    d_ff: int = 10240
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    scan_layers: bool = True


@dataclasses.dataclass
class DiffusionConfig:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    snr_shift_scale: float = 3.0  # 3.0 for 2B, 1.0 for 5B
    prediction: str = "v"


@dataclasses.dataclass
class MeshConfig:
    # Sizes of the named axes within a slice/host (ici_*) and across them (dcn_*); one may be -1 (the rest).
    ici_data: int = -1
    ici_fsdp: int = 1
    ici_tensor: int = 1
    ici_context: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1
    dcn_context: int = 1
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
    source: str = "synthetic"
    num_frames: int = 49  # pixel frames: 4k+1
    height: int = 480
    width: int = 720
    batch_size: int = 1  # global batch
    paths: list = dataclasses.field(default_factory=list)
    weights: list = dataclasses.field(default_factory=list)  # mixture weight per path; empty = equal
    # InsViE CSV: [source_root, edit_root] folders, relative to the CSV's folder, holding same-named clips.
    video_roots: list = dataclasses.field(default_factory=lambda: ["source", "edit"])
    fps: float = 7.0  # frame sampling rate of InsViE's window rule
    skip_frames: int = 0  # raw frames skipped at the start (and end) of each clip
    pad_frames: bool = True  # pad short clips to num_frames by repeating the last frame; False = own 4k+1 length
    buckets: list = dataclasses.field(default_factory=list)  # [[height, width], ...]; empty = [[height, width]]
    crop: str = "random"  # "random" (seeded per sample, same offsets for source and edit) | "center"
    seed: int = 0  # shuffling, crops and posterior draws
    shuffle: bool = True
    num_workers: int = 0  # grain worker processes; 0 = in the training process. Batch order depends on it:
    # a resumed run must keep the same value.
    prefetch: int = 2  # batches buffered per worker (or by a thread when num_workers = 0)
    read_threads: int = 2  # threads reading and decoding records, per stream (folder x bucket) and process
    shard_size: int = 256  # input triplets per `encode` work unit (one ArrayRecord file per bucket each)
    encode_batch_size: int = 0  # triplets per `encode` step of a process, split over its devices; 0 = one per device
    report_dir: str = ""  # where the pipeline appends bad records (JSONL); empty = log only
    # data.source=video: InsViE's source augmentation, pixel noise of std exp(N(log_mean, log_std²)) (in [-1, 1]
    # units, one draw per clip) added to the source before the VAE; targets stay clean. Pre-encoded shards
    # (arrayrecord) hold clean posteriors and get none.
    source_noise: bool = True
    source_noise_log_mean: float = -3.0
    source_noise_log_std: float = 0.5
    # Moving-shape triplets (data/synthetic_videos.py) for data.source=arrayrecord: > 0 = where a data.paths
    # folder has no manifest, write this many triplets (mp4 + InsViE CSV in <folder>/videos) and encode them
    # there first; empty data.paths = [<train.run_dir>/data]. generate_instructions: a subset of the
    # generator's instructions (empty = all).
    generate: int = 0
    generate_instructions: list = dataclasses.field(default_factory=list)
    # `insvie-jax filter` thresholds; a triplet failing any is rejected with the failing score named.
    filter_frames: int = 17  # frames scored per clip
    filter_size: int = 64  # scoring resolution (shorter side, pixels)
    filter_min_motion: float = 0.004  # mean |frame difference| in [0, 1]: below = static
    filter_max_motion: float = 0.15  # above = chaotic (cuts, flashes, noise)
    filter_min_sharpness: float = 20.0  # variance of the Laplacian (0-255 grayscale): below = blurred
    filter_min_brightness: float = 0.08  # mean level in [0, 1]
    filter_max_brightness: float = 0.92
    filter_max_clipped: float = 0.25  # fraction of pixels at 0 or 255
    filter_max_duplicate: float = 0.5  # fraction of consecutive frame pairs that are near-identical
    filter_max_black: float = 0.1  # fraction of black frames
    filter_min_consistency: float = 0.2  # SSIM(source, edit): below = the edit replaced the whole clip
    filter_max_consistency: float = 0.995  # above = the edit changed nothing
    filter_max_fps_ratio: float = 1.01  # max(fps) / min(fps) of source and edit
    # Optional VLM judge: "" = none; "http(s)://..." = JSON endpoint; "module:function" = Python callable.
    filter_judge: str = ""
    filter_min_judge_score: float = 0.5
    filter_judge_frames: int = 3
    filter_judge_batch: int = 8  # concurrent requests
    filter_judge_retries: int = 3
    filter_judge_timeout: float = 60.0
    filter_judge_cache: str = ""  # folder of cached judge scores; empty = no cache


@dataclasses.dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    steps: int = 1000  # train steps; each takes one global batch of data.batch_size
    seed: int = 0
    lr: float = 1e-4
    warmup_steps: int = 0  # in optimizer updates (steps / grad_accum)
    schedule: str = "cosine"  # after warmup: "cosine" (decay to 0 at the last update) | "constant"
    grad_accum: int = 1  # optimizer update every grad_accum steps, on the mean gradient (optax.MultiSteps)
    ema_decay: float = 0.0  # EMA of the trainable weights, saved beside them; 0 = off
    init_from: str = ""  # SAT / diffusers / native transformer checkpoint to start from; empty = random init
    max_nonfinite_in_a_row: int = 10  # steps with a non-finite loss/gradient are skipped; this many in a row stop
    weight_decay: float = 1e-4
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    frame_loss_weight: float = 0.5
    text_dropout: float = 0.1
    source_dropout: float = 0.05
    source_dropout_per: str = "batch"  # "batch": one draw per step (InsViE) | "sample"
    log_every: int = 10
    # Validation edits (train/validate.py): every this many steps, 0 = off; of up to num_val_clips clips
    # (the eval split's first, or the first synthetic batch's), with val_sample_steps sampler steps.
    sample_every: int = 0
    num_val_clips: int = 2
    val_sample_steps: int = 10


@dataclasses.dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 128
    alpha: float = 1.0
    targets: list = dataclasses.field(default_factory=lambda: ["qkv", "attn_out"])
    also_train: list = dataclasses.field(default_factory=lambda: ["proj_edit"])


@dataclasses.dataclass
class CheckpointConfig:
    every: int = 1000  # save every this many steps (and at the end, and on SIGTERM)
    keep: int = 3  # the newest this many are kept ...
    keep_every: int = 0  # ... plus every step divisible by this; 0 = none
    async_save: bool = True  # write in the background while training goes on


@dataclasses.dataclass
class SampleConfig:
    steps: int = 50
    text_scale: float = 7.5
    source_scale: float = 1.2
    guidance_schedule: str = "insvie"  # "insvie" | "cosine" | "constant"
    guidance_exponent: int = 5  # the cosine schedule's power (InsViE's `exp`)
    # "dpmpp_2m_sde": SAT's VP-SDE DPM++(2M) exactly as InsViE samples; "cogvideox_dpm" / "ddim": diffusers'
    # CogVideoXDPMScheduler / CogVideoXDDIMScheduler (trailing spacing).
    sampler: str = "dpmpp_2m_sde"
    fps: int = 7
    seed: int = 0


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


def _closest(key: str, valid: list[str], prefix: str) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f"; did you mean '{prefix}{match[0]}'?" if match else ""


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


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    types_ = _field_types(cls)
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
    """A config path (or object-storage URL), or the name of a shipped preset (`tiny`, `cogvideox-2b-edit`)."""
    if "://" in str(name):  # e.g. a sweep's run folder on gs:// (insvie_jax/storage.py)
        from etils import epath

        return epath.Path(name)
    path = Path(name)
    if path.exists():
        return path
    for candidate in (CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml"):
        if candidate.exists():
            return candidate
    presets = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config '{name}' is neither a file nor a preset; presets: {', '.join(presets)}")


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
    from etils import epath  # a run folder may be an object-storage URL (insvie_jax/storage.py)

    epath.Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def latent_shape(config: Config) -> tuple[int, int, int, int]:
    """(frames, height, width, channels) of the model input latents of config.data's clip."""
    d, v = config.data, config.vae
    return ((d.num_frames - 1) // v.temporal_compression + 1, d.height // v.spatial_compression,
            d.width // v.spatial_compression, config.model.in_channels)


# ---------------------------------------------------------------------------------------------------
# Validation of derived values

_CHOICES = {
    "model.positions": ("sincos", "rope"),
    "model.patch_embed": ("double_ch", "fix_proj"),
    "model.attention": ("auto", "cudnn", "xla", "splash", "ring", "context_gather"),
    "model.remat_policy": ("none", "full", "attention", "dots", "dots_no_batch"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.param_dtype": ("float32", "bfloat16"),
    # No float16: T5 v1.1 feed-forward activations overflow it (Hugging Face clamps; bf16 needs no clamp).
    "text_encoder.dtype": ("float32", "bfloat16"),
    "text_encoder.param_dtype": ("float32", "bfloat16"),
    "sample.guidance_schedule": ("insvie", "cosine", "constant"),
    "sample.sampler": ("dpmpp_2m_sde", "cogvideox_dpm", "ddim"),
    "vae.dtype": ("float32", "bfloat16", "float16"),
    "vae.param_dtype": ("float32", "bfloat16"),
    "data.source": ("synthetic", "arrayrecord", "video"),
    "data.crop": ("random", "center"),
    "train.schedule": ("cosine", "constant"),
    "train.source_dropout_per": ("batch", "sample"),
}


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
    if v.encode_frame_batch < 0 or v.decode_frame_batch < 0:
        raise ConfigError("vae.encode_frame_batch / vae.decode_frame_batch must be >= 0 (0 = all frames in one pass)")
    for key in ("tile_overlap_height", "tile_overlap_width"):
        if not 0 <= getattr(v, key) < 1:
            raise ConfigError(f"vae.{key}={getattr(v, key)} must be in [0, 1)")
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
    if d.generate < 0 or d.source_noise_log_std < 0:
        raise ConfigError("data.generate and data.source_noise_log_std must be >= 0")
    if (d.fps <= 0 or min(d.skip_frames, d.num_workers, d.encode_batch_size) < 0
            or min(d.prefetch, d.shard_size, d.read_threads) < 1):
        raise ConfigError("data.fps must be > 0, data.skip_frames, data.num_workers and data.encode_batch_size >= 0, "
                          "data.prefetch, data.shard_size and data.read_threads >= 1")


def validate(config: Config) -> None:
    for path, options in _CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(config, section), key)
        if value not in options:
            raise ConfigError(f"config key '{path}' = {value!r}: expected one of {', '.join(options)}")
    _validate_vae(config.vae)
    m, d = config.model, config.data
    if m.hidden_size % 4 or (m.positions == "sincos" and m.hidden_size % 16):
        raise ConfigError(
            f"model hidden size {m.hidden_size} (heads x head_dim) must be divisible by 16 for sin-cos positions"
        )
    splash_blocks = {k: getattr(m, k) for k in ("splash_block_q", "splash_block_kv", "splash_block_kv_compute")}
    bad = [f"{k}={b}" for k, b in splash_blocks.items() if b <= 0 or b % 128]
    if bad:
        raise ConfigError(f"model.{', model.'.join(bad)}: splash block sizes must be positive multiples of 128")
    if m.splash_block_kv % m.splash_block_kv_compute:
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
    if config.lora.enabled and config.lora.rank <= 0:
        raise ConfigError(f"lora.rank={config.lora.rank} must be positive")
    t = config.train
    for key in ("grad_accum", "max_nonfinite_in_a_row", "log_every", "num_val_clips", "val_sample_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be at least 1")
    if t.sample_every < 0:
        raise ConfigError(f"train.sample_every={t.sample_every} must be >= 0 (0 = no validation edits)")
    if not 0 <= t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay={t.ema_decay} must be in [0, 1) (0 = no EMA)")
    if config.checkpoint.every < 1 or config.checkpoint.keep < 1 or config.checkpoint.keep_every < 0:
        raise ConfigError("checkpoint.every and checkpoint.keep must be at least 1, checkpoint.keep_every >= 0")


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
