"""Checks of derived values (frame counts, resolution, dtype, tiles) that no single field's range can say."""

from __future__ import annotations



import typing

from insvie_jax.config.schema import (
    Config,
    ConfigError,
    DataConfig,
    DDPMSampler,
    FlowSampler,
    VAEConfig,
    WanModelConfig,
    WanVAEConfig,
)

# What each model family needs of the other sections: (key, allowed values, why).
_FAMILY_NEEDS = {
    "cogvideox": (("text_encoder.family", ("t5",), "CogVideoX reads T5 v1.1 states"),
                  ("diffusion.objective", ("v",), "CogVideoX is a DDPM v-prediction model"),
                  ("sample.sampler", typing.get_args(DDPMSampler), "the v objective samples with a DDPM sampler"),
                  ("sample.guidance", ("insvie",), "the CogVideoX edit samples with InsViE's 3-way guidance")),
    "wan": (("text_encoder.family", ("umt5",), "Wan reads UMT5 states"),
            ("diffusion.objective", ("flow",), "Wan is a rectified-flow model"),
            ("sample.sampler", typing.get_args(FlowSampler), "the flow objective samples with a flow sampler")),
}


def _validate_family(config: Config) -> None:
    family = config.model.family
    for key, allowed, why in _FAMILY_NEEDS[family]:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}={value} does not fit model.family={family} ({why}): set {key}="
                              f"{' or '.join(allowed)}")


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


def _validate_wan(config: Config) -> None:
    m, v, te = config.model, config.vae, config.text_encoder
    assert isinstance(m, WanModelConfig) and isinstance(v, WanVAEConfig)
    if len(m.patch_size) != 3 or not all(isinstance(p, int) and p >= 1 for p in m.patch_size):
        raise ConfigError(f"model.patch_size={m.patch_size} must be three positive ints [frames, height, width]")
    if len(v.temperal_downsample) != len(v.dim_mult) - 1:
        raise ConfigError(f"vae.temperal_downsample={v.temperal_downsample} needs one entry per downsampling level "
                          f"({len(v.dim_mult) - 1} for vae.dim_mult={v.dim_mult})")
    for key in ("latents_mean", "latents_std"):
        if len(getattr(v, key)) != v.z_dim:
            raise ConfigError(f"vae.{key} has {len(getattr(v, key))} entries: it needs one per latent channel "
                              f"(vae.z_dim={v.z_dim})")
    if not m.in_channels == m.out_channels == v.z_dim:
        raise ConfigError(f"model.in_channels={m.in_channels} and model.out_channels={m.out_channels} must equal "
                          f"vae.z_dim={v.z_dim} (one latent stream; the patch embedding takes source + noisy)")
    if (m.text_embed_dim, m.text_length) != (te.d_model, te.max_length):
        raise ConfigError(f"model.text_embed_dim={m.text_embed_dim} / model.text_length={m.text_length} must equal "
                          f"text_encoder.d_model={te.d_model} / text_encoder.max_length={te.max_length}")
    if m.hidden_size % 2 or m.attention_head_dim < 6 or m.freq_dim % 2:
        raise ConfigError(f"model.attention_head_dim={m.attention_head_dim} must be >= 6 (3D RoPE splits it over "
                          f"frames, height, width) and model.freq_dim={m.freq_dim} even")


def validate(config: Config) -> None:
    _validate_family(config)
    if config.model.family == "wan":
        _validate_wan(config)
    else:
        _validate_vae(config.vae)
    m, d = config.model, config.data
    if m.family == "cogvideox" and (m.hidden_size % 4 or (m.positions == "sincos" and m.hidden_size % 16)):
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
    if m.family == "cogvideox" and m.positions == "rope" and m.attention_head_dim % 16:
        raise ConfigError(f"model.attention_head_dim={m.attention_head_dim} must be divisible by 16 for 3D RoPE")
    # CogVideoX's transformer counts frames itself (model.temporal_compression); Wan's follows its VAE.
    tc = m.temporal_compression if m.family == "cogvideox" else config.vae.temporal_compression
    if d.num_frames < 1 or (d.num_frames - 1) % tc:
        k = max((d.num_frames - 1) // tc, 0)
        raise ConfigError(f"data.num_frames={d.num_frames} must be {tc}k+1 (e.g. {tc * k + 1} or {tc * (k + 1) + 1})")
    patch = m.patch_size if m.family == "cogvideox" else max(m.patch_size[1:])
    step = config.vae.spatial_compression * patch
    _validate_data(d, step)
    for key in ("height", "width"):
        value = getattr(d, key)
        if value <= 0 or value % step:
            raise ConfigError(
                f"data.{key}={value} must be a positive multiple of {step} (VAE factor "
                f"{config.vae.spatial_compression} x patch size {patch})"
            )
    if m.dtype == "float16" and m.hidden_size >= 3072:
        raise ConfigError(
            "model.dtype=float16 is refused for 5B-size models (CogVideoX-5B overflows to NaN in fp16): "
            "use model.dtype=bfloat16"
        )
    if not 1 <= config.sample.steps <= config.diffusion.num_train_timesteps:
        raise ConfigError(f"sample.steps={config.sample.steps} must be between 1 and diffusion.num_train_timesteps "
                          f"({config.diffusion.num_train_timesteps})")
