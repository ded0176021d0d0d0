"""The Wan2.2 VAE (diffusers `AutoencoderKLWan` with `is_residual`, Wan2.2-TI2V-5B's `vae/`), channels-last.

Video (B, F, H, W, 3) in [-1, 1] <-> latents (B, f, h, w, z): F = 1 + 4 k frames, f = 1 + k, h = H / 16,
w = W / 16. Pixels are first folded 2x2 into channels (3 -> 12, diffusers' `patchify`); the encoder then
halves H and W three times, and time twice (a strided time convolution plus an average-pooling shortcut per
residual down block); the decoder mirrors it (a time convolution to twice the channels whose halves become
two frames, plus a channel-duplicating shortcut).

Time is causal: convolutions see zeros before the first frame (CogVideoX's repeat that frame instead), and
the first frame is special at every time resampler (it passes through alone), so frame 0 is one latent frame
and every later 4 frames another. diffusers runs the encoder on frame 0, then 4 frames at a time, and the
decoder one latent frame at a time, carrying each convolution's last input frames (its "feature cache")
from pass to pass. Nothing in this VAE normalises across frames (its norms are per-pixel RMS norms, its
attention is per frame), so any such split gives the numbers of one pass over all frames: our frame batches
(`encode_frame_batch`, `decode_frame_batch`) only trade memory for passes. Tiles do change the numbers (the
mid-block attention sees one tile); the tiled mode equals diffusers' `enable_tiling` with the same sizes.

Latents are raw: `normalize_latents` / `denormalize_latents` apply the config's per-channel `latents_mean` /
`latents_std` (z - mean) / std, and are to be called where latents enter or leave the diffusion model
(encoding training data, the edit's source and its decoded result), nowhere else.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax.config import WanVAEConfig
from insvie_jax.models import latents as latents_lib
from insvie_jax.models.frames import scan_frame_batches
from insvie_jax.models.layers import param
from insvie_jax.models.params import host_random_weights, module_from_flat
from insvie_jax.models.vae import PointwiseConv, Posterior, _tiled

_CONV3D = ("NDHWC", "DHWIO", "NDHWC")
_CONV2D = ("NHWC", "HWIO", "NHWC")
# PyTorch's default convolution init, uniform in ±1/sqrt(fan_in); cheap to draw for random-weight models.
_KERNEL_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
RGB = 3


def _dtypes(cfg: WanVAEConfig):
    return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)


def spatial_levels(cfg: WanVAEConfig) -> int:
    """How many times the encoder halves H and W (after the patchify)."""
    return len(cfg.dim_mult) - 1


def spatial_compression(cfg: WanVAEConfig) -> int:
    return 2 ** spatial_levels(cfg) * cfg.patch_size


def temporal_compression(cfg: WanVAEConfig) -> int:
    return 2 ** sum(bool(t) for t in cfg.temperal_downsample)


# ---------------------------------------------------------------------------------------------------
# Layers


class CausalConv3d(nnx.Module):
    """3D convolution, zero-padded in space, causal in time: the first pass sees zeros before its first frame,
    a later one the last input frames of the previous pass (`cache`). Returns (output, cache for the next)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.kernel = param(rngs, _KERNEL_INIT, (*kernel, cin, cout), pdt, (None, None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), pdt, ("conv_out",))

    def __call__(self, x, cache=None):
        kt, kh, kw = self.kernel.shape[:3]
        x = x.astype(self.dtype)
        start = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), self.dtype) if cache is None else cache
        x = jnp.concatenate([start.astype(self.dtype), x], axis=1)
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(self.dtype), (1, 1, 1),
                                         ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), dimension_numbers=_CONV3D)
        return y + self.bias[...].astype(self.dtype), x[:, x.shape[1] - (kt - 1):]


class StridedTimeConv(nnx.Module):
    """A (3, 1, 1) convolution over time with stride 2 and no padding (the temporal downsamplers' `time_conv`)."""

    def __init__(self, channels: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.kernel = param(rngs, _KERNEL_INIT, (3, 1, 1, channels, channels), pdt,
                            (None, None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), pdt, ("conv_out",))

    def __call__(self, x):
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype), (2, 1, 1),
                                         "VALID", dimension_numbers=_CONV3D)
        return y + self.bias[...].astype(self.dtype)


class FrameConv(nnx.Module):
    """A 3x3 convolution of every frame on its own (the resamplers' `resample.1`, a torch Conv2d)."""

    def __init__(self, cin: int, cout: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.kernel = param(rngs, _KERNEL_INIT, (3, 3, cin, cout), pdt, (None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), pdt, ("conv_out",))

    def __call__(self, x, stride: int, padding):
        b, t = x.shape[:2]
        y = jax.lax.conv_general_dilated(x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
                                         self.kernel[...].astype(self.dtype), (stride, stride), padding,
                                         dimension_numbers=_CONV2D)
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class RMSNorm(nnx.Module):
    """diffusers' `WanRMS_norm`: x / max(‖x‖ over channels, 1e-12) · sqrt(C) · gamma, per pixel; in float32."""

    def __init__(self, channels: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.scale = param(rngs, nnx.initializers.ones, (channels,), pdt, ("conv_out",))

    def __call__(self, x):
        x = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))
        y = x / jnp.maximum(norm, 1e-12) * np.sqrt(x.shape[-1]) * self.scale[...].astype(jnp.float32)
        return y.astype(self.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(cin, cfg, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3), cfg, rngs=rngs)
        self.norm2 = RMSNorm(cout, cfg, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3), cfg, rngs=rngs)
        self.conv_shortcut = PointwiseConv(cin, cout, cfg, rngs=rngs) if cin != cout else None

    def __call__(self, x, cache):
        h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), _part(cache, "conv1"))
        h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), _part(cache, "conv2"))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return h + shortcut.astype(h.dtype), {"conv1": c1, "conv2": c2}


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame, with a residual connection."""

    def __init__(self, channels: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(channels, cfg, rngs=rngs)
        self.to_qkv = PointwiseConv(channels, 3 * channels, cfg, rngs=rngs)
        self.proj = PointwiseConv(channels, channels, cfg, rngs=rngs)

    def __call__(self, x):
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v).reshape(b, t, h, w, c)
        return x + self.proj(y).astype(x.dtype)


def _part(cache, key):
    """The cache of one sub-layer, or None on a clip's first pass."""
    return None if cache is None else cache[key]


def _avg_down(x, cout: int, factor_t: int, factor_s: int):
    """diffusers' `AvgDown3D` (the down blocks' shortcut): fold factor_t x factor_s x factor_s neighbours into
    channels (an odd clip gets a zero frame in front) and average groups of them down to `cout` channels."""
    b, t, h, w, c = x.shape
    pad = (factor_t - t % factor_t) % factor_t
    x = jnp.pad(x, ((0, 0), (pad, 0), (0, 0), (0, 0), (0, 0)))
    t = (t + pad) // factor_t
    x = x.reshape(b, t, factor_t, h // factor_s, factor_s, w // factor_s, factor_s, c)
    # torch's channel order: (c, factor_t, factor_s of H, factor_s of W)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, t, h // factor_s, w // factor_s, cout, -1)
    return x.astype(jnp.float32).mean(-1).astype(x.dtype)


def _dup_up(x, cout: int, factor_t: int, factor_s: int, first: bool):
    """diffusers' `DupUp3D` (the up blocks' shortcut): repeat channels and unfold them into factor_t frames and
    factor_s x factor_s pixels; a clip's first frame keeps only its last copy in time."""
    b, t, h, w, c = x.shape
    repeats = cout * factor_t * factor_s * factor_s // c
    x = jnp.repeat(x, repeats, axis=-1).reshape(b, t, h, w, cout, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, t * factor_t, h * factor_s, w * factor_s, cout)
    return x[:, factor_t - 1:] if first else x


class Downsample(nnx.Module):
    """diffusers' `WanResample` downsample2d/3d: per frame, pad right/bottom by one and a stride-2 3x3 conv; with
    `temporal`, then a stride-2 time conv (kernel 3, no padding) that leaves a clip's first frame as it is
    and continues each later pass from the previous pass's last frame."""

    def __init__(self, channels: int, temporal: bool, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.resample = FrameConv(channels, channels, cfg, rngs=rngs)
        self.time_conv = StridedTimeConv(channels, cfg, rngs=rngs) if temporal else None

    def __call__(self, x, cache):
        x = self.resample(jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0))), stride=2, padding=((0, 0), (0, 0)))
        if self.time_conv is None:
            return x, None
        last = x[:, -1:]
        if cache is None:  # a clip's first pass: frame 0 passes alone, the windows start at it
            out, x = x[:, :1], x
        else:
            out, x = x[:, :0], jnp.concatenate([cache.astype(x.dtype), x], axis=1)
        if x.shape[1] >= 3:
            out = jnp.concatenate([out, self.time_conv(x).astype(out.dtype)], axis=1)
        return out, last


class Upsample(nnx.Module):
    """diffusers' `WanResample` upsample2d/3d: with `temporal`, first a causal time conv to twice the channels
    whose two halves become two consecutive frames (a clip's first frame passes as it is, and the conv's
    context starts after it); then per frame nearest-neighbour 2x and a 3x3 conv."""

    def __init__(self, channels: int, temporal: bool, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.resample = FrameConv(channels, channels, cfg, rngs=rngs)
        self.time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1), cfg, rngs=rngs) if temporal else None

    def __call__(self, x, cache):
        new_cache = None
        if self.time_conv is not None:
            if cache is None:
                head, rest = x[:, :1], x[:, 1:]
                cache = jnp.zeros((x.shape[0], 2, *x.shape[2:]), self.time_conv.dtype)
            else:
                head, rest = x[:, :0], x
            if rest.shape[1]:
                y, new_cache = self.time_conv(rest, cache)
                b, t, h, w, _ = y.shape
                y = y.reshape(b, t, h, w, 2, -1).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, -1)
                x = jnp.concatenate([head.astype(y.dtype), y], axis=1)
            else:
                new_cache = cache
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.resample(x, stride=1, padding=((1, 1), (1, 1))), new_cache


def _run_resnets(resnets, x, cache):
    new = []
    for i, resnet in enumerate(resnets):
        x, c = resnet(x, _part(cache, i))
        new.append(c)
    return x, new


class DownBlock(nnx.Module):
    """diffusers' `WanResidualDownBlock`: residual blocks, a downsample, plus an average-pooling shortcut."""

    def __init__(self, cin: int, cout: int, down: bool, temporal: bool, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cout = cout
        self.factor_t, self.factor_s = (2 if temporal else 1), (2 if down else 1)
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                                 for i in range(cfg.num_res_blocks)])
        self.downsampler = Downsample(cout, temporal, cfg, rngs=rngs) if down else None

    def __call__(self, x, cache):
        shortcut = _avg_down(x, self.cout, self.factor_t, self.factor_s)
        x, resnets = _run_resnets(self.resnets, x, _part(cache, "resnets"))
        down = None
        if self.downsampler is not None:
            x, down = self.downsampler(x, _part(cache, "downsampler"))
        return x + shortcut.astype(x.dtype), {"resnets": resnets, "downsampler": down}


class UpBlock(nnx.Module):
    """diffusers' `WanResidualUpBlock`: residual blocks, an upsample, plus a channel-duplicating shortcut."""

    def __init__(self, cin: int, cout: int, up: bool, temporal: bool, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.up, self.cout, self.factor_t = up, cout, (2 if temporal else 1)
        self.resnets = nnx.List([ResidualBlock(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                                 for i in range(cfg.num_res_blocks + 1)])
        self.upsampler = Upsample(cout, temporal, cfg, rngs=rngs) if up else None

    def __call__(self, x, cache):
        shortcut = _dup_up(x, self.cout, self.factor_t, 2, first=cache is None) if self.up else None
        h, resnets = _run_resnets(self.resnets, x, _part(cache, "resnets"))
        upsampler = None
        if self.upsampler is not None:
            h, upsampler = self.upsampler(h, _part(cache, "upsampler"))
        if shortcut is not None:
            h = h + shortcut.astype(h.dtype)
        return h, {"resnets": resnets, "upsampler": upsampler}


class MidBlock(nnx.Module):
    def __init__(self, channels: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(channels, channels, cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(channels, cfg, rngs=rngs)])

    def __call__(self, x, cache):
        x, c0 = self.resnets[0](x, _part(cache, 0))
        x = self.attentions[0](x)
        x, c1 = self.resnets[1](x, _part(cache, 1))
        return x, [c0, c1]


class Encoder3D(nnx.Module):
    """One pass: patchified frames (B, T, H, W, 12) -> pre-quant moments (B, t, h, w, 2z), and its caches."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        dims = [cfg.base_dim * m for m in [1, *cfg.dim_mult]]
        last = len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(RGB * cfg.patch_size**2, dims[0], (3, 3, 3), cfg, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock(dims[i], dims[i + 1], i != last, bool(cfg.temperal_downsample[i]) if i != last else False,
                      cfg, rngs=rngs)
            for i in range(len(cfg.dim_mult))
        ])
        self.mid_block = MidBlock(dims[-1], cfg, rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], cfg, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3), cfg, rngs=rngs)

    def __call__(self, x, cache=None):
        new = {}
        x, new["conv_in"] = self.conv_in(x, _part(cache, "conv_in"))
        new["down_blocks"] = []
        for i, block in enumerate(self.down_blocks):
            x, c = block(x, _part(_part(cache, "down_blocks"), i))
            new["down_blocks"].append(c)
        x, new["mid_block"] = self.mid_block(x, _part(cache, "mid_block"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), _part(cache, "conv_out"))
        return x, new


class Decoder3D(nnx.Module):
    """One pass: latents (B, t, h, w, z) -> patchified frames (B, T, H, W, 12), and its caches."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        mult = cfg.dim_mult
        dims = [cfg.decoder_base_dim * m for m in [mult[-1], *reversed(mult)]]
        temporal_up = list(reversed(cfg.temperal_downsample))
        last = len(mult) - 1
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3), cfg, rngs=rngs)
        self.mid_block = MidBlock(dims[0], cfg, rngs=rngs)
        self.up_blocks = nnx.List([
            UpBlock(dims[i], dims[i + 1], i != last, bool(temporal_up[i]) if i != last else False, cfg, rngs=rngs)
            for i in range(len(mult))
        ])
        self.norm_out = RMSNorm(dims[-1], cfg, rngs=rngs)
        self.conv_out = CausalConv3d(dims[-1], RGB * cfg.patch_size**2, (3, 3, 3), cfg, rngs=rngs)

    def __call__(self, z, cache=None):
        new = {}
        x, new["conv_in"] = self.conv_in(z, _part(cache, "conv_in"))
        x, new["mid_block"] = self.mid_block(x, _part(cache, "mid_block"))
        new["up_blocks"] = []
        for i, block in enumerate(self.up_blocks):
            x, c = block(x, _part(_part(cache, "up_blocks"), i))
            new["up_blocks"].append(c)
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), _part(cache, "conv_out"))
        return x, new


# ---------------------------------------------------------------------------------------------------
# The VAE


def patchify(x, p: int):
    """(B, F, H, W, C) -> (B, F, H/p, W/p, C p p), channels in diffusers' order (c, column, row)."""
    if p == 1:
        return x
    b, f, h, w, c = x.shape
    x = x.reshape(b, f, h // p, p, w // p, p, c).transpose(0, 1, 2, 4, 6, 5, 3)
    return x.reshape(b, f, h // p, w // p, c * p * p)


def unpatchify(x, p: int):
    """The inverse of `patchify`."""
    if p == 1:
        return x
    b, f, h, w, cpp = x.shape
    x = x.reshape(b, f, h, w, cpp // (p * p), p, p).transpose(0, 1, 2, 6, 3, 5, 4)
    return x.reshape(b, f, h * p, w * p, cpp // (p * p))


def _frame_batched(module: nnx.Module, x, batch: int):
    """Runs a causal pass over time in batches: first `1 + (frames - 1) % batch` frames (frame 0 alone when
    batch divides the rest, as diffusers), then `batch` frames at a time."""
    frames = x.shape[1]
    first = frames - ((frames - 1) // batch) * batch if batch > 0 else frames
    return scan_frame_batches(module, x, first, batch)


class WanVAE(nnx.Module):
    """`encode(video) -> Posterior`, `decode(latents) -> video`; memory modes from the config (frame batches,
    tiles). Pure JAX: wrap in `nnx.jit` (e.g. `nnx.jit(lambda vae, v: vae.encode(v).mean)`)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        _check(cfg)
        # Plain (hashable) settings only: the module's static structure may be a `jax.jit` static argument.
        self.dtype = jnp.dtype(cfg.dtype)
        self.patch_size = cfg.patch_size
        self.levels = spatial_levels(cfg)
        self.time_factor = temporal_compression(cfg)
        self.encode_frame_batch, self.decode_frame_batch = cfg.encode_frame_batch, cfg.decode_frame_batch
        self.tiling = cfg.tiling
        self.tile_sample = (cfg.tile_sample_height, cfg.tile_sample_width)
        self.tile_stride = (cfg.tile_stride_height, cfg.tile_stride_width)
        self.encoder = Encoder3D(cfg, rngs=rngs)
        self.quant_conv = PointwiseConv(2 * cfg.z_dim, 2 * cfg.z_dim, cfg, rngs=rngs)
        self.post_quant_conv = PointwiseConv(cfg.z_dim, cfg.z_dim, cfg, rngs=rngs)
        self.decoder = Decoder3D(cfg, rngs=rngs)

    def encode(self, video) -> Posterior:
        """video (B, 1 + 4 k, H, W, 3) in [-1, 1] -> posterior over raw latents (B, 1 + k, H / 16, W / 16, z)."""
        _, frames, height, width, _ = video.shape
        step = 2**self.levels * self.patch_size
        if (frames - 1) % self.time_factor or height % step or width % step:
            raise ValueError(f"Wan VAE input {tuple(video.shape)}: needs 1 + {self.time_factor} k frames and a height "
                             f"and width divisible by {step}; crop or pad the video")
        x = patchify(video.astype(self.dtype), self.patch_size)

        def encode_frames(v):
            return self.quant_conv(_frame_batched(self.encoder, v, self.encode_frame_batch))

        if self.tiling and (width > self.tile_sample[1] or height > self.tile_sample[0]):
            # As diffusers: tiles of `tile_sample` (and strides) measured on the patchified frames.
            r = 2**self.levels
            latent_tile = tuple(t // r for t in self.tile_sample)
            latent_stride = tuple(s // r for s in self.tile_stride)
            blend = tuple(t - s for t, s in zip(latent_tile, latent_stride))
            moments = _tiled(encode_frames, x, self.tile_sample, self.tile_stride, blend, latent_stride)
            moments = moments[:, :, :x.shape[2] // r, :x.shape[3] // r]
        else:
            moments = encode_frames(x)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents) -> jax.Array:
        """raw latents (B, f, h, w, z) -> video (B, 1 + 4 (f - 1), 16 h, 16 w, 3) in [-1, 1] (clamped, as
        diffusers), float32."""
        z = latents.astype(self.dtype)
        p, r = self.patch_size, 2**self.levels

        def decode_frames(v):
            return _frame_batched(self.decoder, self.post_quant_conv(v), self.decode_frame_batch)

        latent_tile = tuple(t // (r * p) for t in self.tile_sample)
        if self.tiling and (z.shape[2] > latent_tile[0] or z.shape[3] > latent_tile[1]):
            latent_stride = tuple(s // (r * p) for s in self.tile_stride)
            keep = tuple(s // p for s in self.tile_stride)
            blend = tuple(t // p - k for t, k in zip(self.tile_sample, keep))
            x = _tiled(decode_frames, z, latent_tile, latent_stride, blend, keep)
            x = x[:, :, :z.shape[2] * r, :z.shape[3] * r]
        else:
            x = decode_frames(z)
        return jnp.clip(unpatchify(x.astype(jnp.float32), p), -1.0, 1.0)


def _check(cfg: WanVAEConfig) -> None:
    """One line naming the key and the fix for a config the architecture cannot take."""
    levels = spatial_levels(cfg)
    if len(cfg.temperal_downsample) != levels:
        raise ValueError(f"Wan VAE temperal_downsample {cfg.temperal_downsample} needs {levels} entries "
                         f"(one per down block but the last of dim_mult {cfg.dim_mult})")
    if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
        raise ValueError(f"Wan VAE latents_mean / latents_std need z_dim={cfg.z_dim} values each, got "
                         f"{len(cfg.latents_mean)} / {len(cfg.latents_std)}")
    if cfg.encode_frame_batch < 0 or cfg.encode_frame_batch % temporal_compression(cfg):
        raise ValueError(f"Wan VAE encode_frame_batch={cfg.encode_frame_batch} must be a multiple of "
                         f"{temporal_compression(cfg)} (0 = all frames in one pass)")
    if cfg.decode_frame_batch < 0:
        raise ValueError("Wan VAE decode_frame_batch must be >= 0 (0 = all latent frames in one pass)")
    step = 2**levels * cfg.patch_size
    sizes = (cfg.tile_sample_height, cfg.tile_sample_width, cfg.tile_stride_height, cfg.tile_stride_width)
    if any(s < step or s % step for s in sizes) or cfg.tile_stride_height > cfg.tile_sample_height or \
            cfg.tile_stride_width > cfg.tile_sample_width:
        raise ValueError(f"Wan VAE tile sizes / strides {sizes} must be multiples of {step}, strides <= tiles")


# ---------------------------------------------------------------------------------------------------
# Latent statistics: the one place they are applied


def normalize_latents(latents, cfg: WanVAEConfig):
    """Raw VAE latents (..., z) -> the diffusion model's latents, (z - latents_mean) / latents_std per channel
    (diffusers' Wan pipelines; `models.latents.to_model`). Apply where latents enter the diffusion model: on
    encoded training data (a posterior sample) and on an edit's encoded source."""
    return latents_lib.to_model(cfg, latents)


def denormalize_latents(latents, cfg: WanVAEConfig):
    """The inverse of `normalize_latents`: apply where latents leave the diffusion model, before `decode`."""
    return latents_lib.from_model(cfg, latents)


# ---------------------------------------------------------------------------------------------------
# Construction


def abstract(cfg: WanVAEConfig) -> WanVAE:
    """The VAE with shapes only (no memory)."""
    return nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))


def build(cfg: WanVAEConfig, seed: int = 0) -> WanVAE:
    """A VAE with PyTorch-style random weights drawn in numpy (uniform ±1/sqrt(fan_in) kernels, unit norms):
    initialising its many differently shaped convolutions op by op in JAX would compile each one."""
    model = abstract(cfg)
    return module_from_flat(model, host_random_weights(model, seed), "random Wan VAE")
