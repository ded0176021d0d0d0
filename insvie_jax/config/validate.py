"""Checks of derived values (frame counts, resolution, dtype, tiles) that no single field's range can say."""

from __future__ import annotations



from insvie_jax.config.schema import Config, ConfigError, DataConfig, VAEConfig


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
