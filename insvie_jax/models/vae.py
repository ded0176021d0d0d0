"""The CogVideoX 3D causal VAE (diffusers `AutoencoderKLCogVideoX`, SAT `3d-vae.pt`), channels-last.

Video (B, F, H, W, 3) in [-1, 1] <-> latents (B, f, h, w, C): f = (F - 1) / 4 + 1, h = H / 8, w = W / 8.
Convolutions are causal in time: a pass pads the start with copies of its first frame, or, when a video
runs through in several frame batches, with the last frames the same convolution saw in the previous
batch (its "cache"), so batches join without seams. Group norms see all frames (and the whole tile) of
one pass: frame batching and tiling save memory but change the numbers slightly; each memory mode equals
diffusers' same mode. Latents are unscaled (the config's `scaling_factor` is applied elsewhere).
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from insvie_jax.config import VAEConfig
from insvie_jax.models.frames import scan_frame_batches
from insvie_jax.models.layers import param
from insvie_jax.models.params import host_random_weights, module_from_flat

_CONV3D = ("NDHWC", "DHWIO", "NDHWC")
_CONV2D = ("NHWC", "HWIO", "NHWC")
# PyTorch's default convolution init, uniform in ±1/sqrt(fan_in); cheap to draw for random-weight models.
_KERNEL_INIT = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def _dtypes(cfg: VAEConfig):
    return jnp.dtype(cfg.param_dtype), jnp.dtype(cfg.dtype)


class CausalConv3d(nnx.Module):
    """3D convolution, zero-padded in space, causal in time; returns (output, cache for the next batch)."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.kernel = param(rngs, _KERNEL_INIT, (3, 3, 3, cin, cout), pdt, (None, None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), pdt, ("conv_out",))

    def __call__(self, x, cache=None):
        kt = self.kernel.shape[0]
        start = cache if cache is not None else jnp.repeat(x[:, :1], kt - 1, axis=1)
        x = jnp.concatenate([start.astype(self.dtype), x.astype(self.dtype)], axis=1)
        pad = (kt - 1) // 2
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(self.dtype), (1, 1, 1),
                                         ((0, 0), (pad, pad), (pad, pad)), dimension_numbers=_CONV3D)
        return y + self.bias[...].astype(self.dtype), x[:, x.shape[1] - (kt - 1):]


class PointwiseConv(nnx.Module):
    """A 1x1x1 convolution (diffusers' `conv_shortcut`, `conv_y`, `conv_b`) as a matmul over channels."""

    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.kernel = param(rngs, _KERNEL_INIT, (cin, cout), pdt, ("conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (cout,), pdt, ("conv_out",))

    def __call__(self, x):
        return x.astype(self.dtype) @ self.kernel[...].astype(self.dtype) + self.bias[...].astype(self.dtype)


class _Resample2d(nnx.Module):
    """Base of the resamplers: a per-frame 3x3 convolution (diffusers' `downsamplers.0.conv`, `upsamplers.0.conv`)."""

    def __init__(self, channels: int, compress_time: bool, cfg: VAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.compress_time = compress_time
        self.kernel = param(rngs, _KERNEL_INIT, (3, 3, channels, channels), pdt, (None, None, "conv_in", "conv_out"))
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), pdt, ("conv_out",))

    def conv(self, x, stride: int, padding: int):
        b, t = x.shape[:2]
        p = padding
        y = jax.lax.conv_general_dilated(x.reshape(b * t, *x.shape[2:]).astype(self.dtype),
                                         self.kernel[...].astype(self.dtype), (stride, stride), ((p, p), (p, p)),
                                         dimension_numbers=_CONV2D)
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, t, *y.shape[1:])


class GroupNorm(nnx.Module):
    """Group norm over (frames, H, W, channels of a group) of one sample; statistics in float32."""

    def __init__(self, channels: int, groups: int, eps: float, cfg: VAEConfig, *, rngs: nnx.Rngs):
        pdt, self.dtype = _dtypes(cfg)
        self.groups, self.eps = groups, eps
        self.scale = param(rngs, nnx.initializers.ones, (channels,), pdt, ("conv_out",))
        self.bias = param(rngs, nnx.initializers.zeros, (channels,), pdt, ("conv_out",))

    def __call__(self, x):
        shape = x.shape
        x = x.astype(jnp.float32).reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        axes = (1, 2, 3, 5)
        mean = x.mean(axes, keepdims=True)
        var = jnp.square(x - mean).mean(axes, keepdims=True)
        x = ((x - mean) * jax.lax.rsqrt(var + self.eps)).reshape(shape)
        return (x * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


def _part(cache, key):
    """The cache of one sub-layer, or None on a first pass (which pads by repeating its first frame)."""
    return None if cache is None else cache[key]


def _repeat_to(z, t: int, h: int, w: int):
    """Nearest-neighbour resize of (B, T, H, W, C) to (t, h, w) by whole-number factors."""
    for axis, size in ((1, t), (2, h), (3, w)):
        if size % z.shape[axis]:
            raise ValueError(f"cannot resize latents axis {axis} from {z.shape[axis]} to {size} by a whole factor")
        z = jnp.repeat(z, size // z.shape[axis], axis=axis)
    return z


def _resize_latents(z, t: int, h: int, w: int):
    """Latent-rate features to (t, h, w) as diffusers resizes the latents: an odd clip's first frame alone."""
    if t > 1 and t % 2 == 1:
        return jnp.concatenate([_repeat_to(z[:, :1], 1, h, w), _repeat_to(z[:, 1:], t - 1, h, w)], axis=1)
    return _repeat_to(z, t, h, w)


class SpatialNorm3D(nnx.Module):
    """Group norm of the features, then scale and shift computed from the latents resized to the features."""

    def __init__(self, channels: int, latent_channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.norm_layer = GroupNorm(channels, cfg.norm_num_groups, 1e-6, cfg, rngs=rngs)
        self.conv_y = PointwiseConv(latent_channels, channels, cfg, rngs=rngs)
        self.conv_b = PointwiseConv(latent_channels, channels, cfg, rngs=rngs)

    def __call__(self, f, zq):
        # The 1x1x1 convolutions commute with nearest-neighbour resizing: run them at the latent rate (the same
        # numbers as diffusers' resize-then-convolve, far less work) and let the resize fuse into the product.
        size = f.shape[1:4]
        scale, shift = _resize_latents(self.conv_y(zq), *size), _resize_latents(self.conv_b(zq), *size)
        return self.norm_layer(f) * scale + shift


class ResnetBlock3D(nnx.Module):
    def __init__(self, cin: int, cout: int, cfg: VAEConfig, *, rngs: nnx.Rngs, latent_channels: int | None = None):
        if latent_channels is None:
            self.norm1 = GroupNorm(cin, cfg.norm_num_groups, cfg.norm_eps, cfg, rngs=rngs)
            self.norm2 = GroupNorm(cout, cfg.norm_num_groups, cfg.norm_eps, cfg, rngs=rngs)
        else:
            self.norm1 = SpatialNorm3D(cin, latent_channels, cfg, rngs=rngs)
            self.norm2 = SpatialNorm3D(cout, latent_channels, cfg, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, cfg, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, cfg, rngs=rngs)
        self.conv_shortcut = PointwiseConv(cin, cout, cfg, rngs=rngs) if cin != cout else None

    def __call__(self, x, zq, cache):
        norm = (lambda n, h: n(h)) if zq is None else (lambda n, h: n(h, zq))
        h, c1 = self.conv1(jax.nn.silu(norm(self.norm1, x)), _part(cache, "conv1"))
        h, c2 = self.conv2(jax.nn.silu(norm(self.norm2, h)), _part(cache, "conv2"))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return h + x, {"conv1": c1, "conv2": c2}


def _run_resnets(resnets, x, zq, cache):
    new = []
    for i, resnet in enumerate(resnets):
        x, c = resnet(x, zq, _part(cache, i))
        new.append(c)
    return x, new


class Downsample(_Resample2d):
    """Halves H and W (pad right/bottom by one, 3x3 stride-2 conv); with `compress_time` first averages frame
    pairs, keeping an odd first frame alone."""

    def __call__(self, x):
        if self.compress_time:
            b, t = x.shape[:2]
            first, rest = (x[:, :1], x[:, 1:]) if t % 2 else (x[:, :0], x)
            pairs = rest.reshape(b, rest.shape[1] // 2, 2, *rest.shape[2:])
            x = jnp.concatenate([first, pairs.mean(2, dtype=jnp.float32).astype(x.dtype)], axis=1)
        return self.conv(jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0))), stride=2, padding=0)


class Upsample(_Resample2d):
    """Doubles H and W (nearest, then a 3x3 conv); with `compress_time` also repeats every frame but an odd
    first one."""

    def __call__(self, x):
        t = x.shape[1]
        if self.compress_time and t > 1:
            if t % 2:
                x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], 2, axis=1)], axis=1)
            else:
                x = jnp.repeat(x, 2, axis=1)
        x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
        return self.conv(x, stride=1, padding=1)


class DownBlock3D(nnx.Module):
    def __init__(self, cin: int, cout: int, downsample: bool, compress_time: bool, cfg: VAEConfig, *,
                 rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, cfg, rngs=rngs)
                                 for i in range(cfg.layers_per_block)])
        self.downsample = Downsample(cout, compress_time, cfg, rngs=rngs) if downsample else None

    def __call__(self, x, cache):
        x, cache = _run_resnets(self.resnets, x, None, cache)
        return (self.downsample(x) if self.downsample is not None else x), cache


class UpBlock3D(nnx.Module):
    def __init__(self, cin: int, cout: int, upsample: bool, compress_time: bool, cfg: VAEConfig, *,
                 rngs: nnx.Rngs):
        c = cfg.latent_channels
        self.resnets = nnx.List([ResnetBlock3D(cin if i == 0 else cout, cout, cfg, rngs=rngs, latent_channels=c)
                                 for i in range(cfg.layers_per_block + 1)])
        self.upsample = Upsample(cout, compress_time, cfg, rngs=rngs) if upsample else None

    def __call__(self, x, zq, cache):
        x, cache = _run_resnets(self.resnets, x, zq, cache)
        return (self.upsample(x) if self.upsample is not None else x), cache


class MidBlock3D(nnx.Module):
    def __init__(self, channels: int, cfg: VAEConfig, *, rngs: nnx.Rngs, latent_channels: int | None = None):
        self.resnets = nnx.List([ResnetBlock3D(channels, channels, cfg, rngs=rngs, latent_channels=latent_channels)
                                 for _ in range(2)])

    def __call__(self, x, zq, cache):
        return _run_resnets(self.resnets, x, zq, cache)


def _time_levels(cfg: VAEConfig) -> int:
    return int(np.log2(cfg.temporal_compression))


class Encoder3D(nnx.Module):
    """One pass: video frames (B, T, H, W, 3) -> moments (B, t, h, w, 2C), and the caches for the next pass."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        ch = cfg.block_out_channels
        self.conv_in = CausalConv3d(3, ch[0], cfg, rngs=rngs)
        self.down_blocks = nnx.List([
            DownBlock3D(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, i < _time_levels(cfg), cfg, rngs=rngs)
            for i in range(len(ch))
        ])
        self.mid_block = MidBlock3D(ch[-1], cfg, rngs=rngs)
        self.norm_out = GroupNorm(ch[-1], cfg.norm_num_groups, 1e-6, cfg, rngs=rngs)
        self.conv_out = CausalConv3d(ch[-1], 2 * cfg.latent_channels, cfg, rngs=rngs)

    def __call__(self, x, cache=None):
        new = {}
        x, new["conv_in"] = self.conv_in(x, _part(cache, "conv_in"))
        new["down_blocks"] = []
        for i, block in enumerate(self.down_blocks):
            x, c = block(x, _part(_part(cache, "down_blocks"), i))
            new["down_blocks"].append(c)
        x, new["mid_block"] = self.mid_block(x, None, _part(cache, "mid_block"))
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x)), _part(cache, "conv_out"))
        return x, new


class Decoder3D(nnx.Module):
    """One pass: latents (B, t, h, w, C) -> frames (B, T, H, W, 3), and the caches for the next pass."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        ch = list(reversed(cfg.block_out_channels))
        c = cfg.latent_channels
        self.conv_in = CausalConv3d(c, ch[0], cfg, rngs=rngs)
        self.mid_block = MidBlock3D(ch[0], cfg, rngs=rngs, latent_channels=c)
        self.up_blocks = nnx.List([
            UpBlock3D(ch[max(i - 1, 0)], ch[i], i < len(ch) - 1, i < _time_levels(cfg), cfg, rngs=rngs)
            for i in range(len(ch))
        ])
        self.norm_out = SpatialNorm3D(ch[-1], c, cfg, rngs=rngs)
        self.conv_out = CausalConv3d(ch[-1], 3, cfg, rngs=rngs)

    def __call__(self, z, cache=None):
        new = {}
        x, new["conv_in"] = self.conv_in(z, _part(cache, "conv_in"))
        x, new["mid_block"] = self.mid_block(x, z, _part(cache, "mid_block"))
        new["up_blocks"] = []
        for i, block in enumerate(self.up_blocks):
            x, c = block(x, z, _part(_part(cache, "up_blocks"), i))
            new["up_blocks"].append(c)
        x, new["conv_out"] = self.conv_out(jax.nn.silu(self.norm_out(x, z)), _part(cache, "conv_out"))
        return x, new


@struct.dataclass
class Posterior:
    """Diagonal Gaussian over the (unscaled) latents, float32; log-variance clamped to [-30, 20] as diffusers."""

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean


def _frame_batched(module: nnx.Module, x, batch: int):
    """Runs a causal pass over time as diffusers does: the first `batch + frames % batch` frames, then `batch`
    frames at a time (one pass for fewer than 2·batch frames)."""
    frames = x.shape[1]
    first = frames if batch <= 0 or frames < 2 * batch else batch + frames % batch
    return scan_frame_batches(module, x, first, batch)


def _blend(a, b, extent: int, axis: int):
    """Fades the first `extent` rows (along `axis`) of tile `b` in from the last rows of its neighbour `a`."""
    extent = min(a.shape[axis], b.shape[axis], extent)
    if extent == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = extent
    weight = jnp.asarray((np.arange(extent) / extent).reshape(shape), b.dtype)
    a_tail = jax.lax.slice_in_dim(a, a.shape[axis] - extent, a.shape[axis], axis=axis)
    b_head, b_rest = jnp.split(b, [extent], axis=axis)
    return jnp.concatenate([a_tail * (1 - weight) + b_head * weight, b_rest], axis=axis)


def _tiled(fn, x, tile: tuple[int, int], stride: tuple[int, int], blend: tuple[int, int], keep: tuple[int, int]):
    """diffusers' tiled encode/decode: `fn` on overlapping (H, W) tiles of x (B, T, H, W, C) starting every
    `stride`; each tile is blended with the (already blended) tiles above and to its left over `blend` rows and
    columns, cropped to `keep`, and the crops are joined. Tiles of one shape run as one `lax.map`."""
    rows = range(0, x.shape[2], stride[0])
    cols = range(0, x.shape[3], stride[1])
    tiles = {(i, j): x[:, :, r:r + tile[0], c:c + tile[1]] for i, r in enumerate(rows) for j, c in enumerate(cols)}
    by_shape = collections.defaultdict(list)
    for key, t in tiles.items():
        by_shape[t.shape].append(key)
    out = {}
    for keys in by_shape.values():
        if len(keys) == 1:
            out[keys[0]] = fn(tiles[keys[0]]).astype(jnp.float32)
        else:
            mapped = jax.lax.map(fn, jnp.stack([tiles[k] for k in keys]))
            out.update({k: mapped[n].astype(jnp.float32) for n, k in enumerate(keys)})
    result_rows = []
    for i in range(len(rows)):
        row = []
        for j in range(len(cols)):
            t = out[i, j]
            if i > 0:
                t = _blend(out[i - 1, j], t, blend[0], axis=2)
            if j > 0:
                t = _blend(out[i, j - 1], t, blend[1], axis=3)
            out[i, j] = t
            row.append(t[:, :, :keep[0], :keep[1]])
        result_rows.append(jnp.concatenate(row, axis=3))
    return jnp.concatenate(result_rows, axis=2)


class CogVideoXVAE(nnx.Module):
    """`encode(video) -> Posterior`, `decode(latents) -> video`; memory modes from the config (frame batches,
    tiles). Pure JAX: wrap in `nnx.jit` (e.g. `nnx.jit(lambda vae, v: vae.encode(v).mean)`)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        # Plain (hashable) settings only: the module's static structure may be a `jax.jit` static argument.
        self.dtype = jnp.dtype(cfg.dtype)
        self.encode_frame_batch, self.decode_frame_batch = cfg.encode_frame_batch, cfg.decode_frame_batch
        self.tiling = cfg.tiling
        self.tile_sample = (cfg.tile_sample_height, cfg.tile_sample_width)
        self.tile_latent = tuple(int(s / cfg.spatial_compression) for s in self.tile_sample)
        self.tile_overlap = (cfg.tile_overlap_height, cfg.tile_overlap_width)
        self.encoder = Encoder3D(cfg, rngs=rngs)
        self.decoder = Decoder3D(cfg, rngs=rngs)

    def _tile_plan(self, tile: tuple[int, int], out_tile: tuple[int, int]):
        """Stride, blend extent and kept size of diffusers' tiling, for input tiles `tile` giving `out_tile`."""
        stride = tuple(int(t * (1 - o)) for t, o in zip(tile, self.tile_overlap))
        blend = tuple(int(t * o) for t, o in zip(out_tile, self.tile_overlap))
        keep = tuple(t - b for t, b in zip(out_tile, blend))
        if min(stride) < 1:
            raise ValueError(f"VAE tiles {tile} with overlaps {self.tile_overlap} do not advance: lower "
                             "vae.tile_overlap_height/width")
        return stride, blend, keep

    def encode(self, video) -> Posterior:
        """video (B, F, H, W, 3) in [-1, 1] -> posterior over latents (B, (F - 1) / 4 + 1, H / 8, W / 8, C)."""
        x = video.astype(self.dtype)

        def encode_frames(v):
            return _frame_batched(self.encoder, v, self.encode_frame_batch)

        sample, latent = self.tile_sample, self.tile_latent
        if self.tiling and (x.shape[2] > sample[0] or x.shape[3] > sample[1]):
            moments = _tiled(encode_frames, x, sample, *self._tile_plan(sample, latent))
        else:
            moments = encode_frames(x)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return Posterior(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents) -> jax.Array:
        """latents (B, f, h, w, C), unscaled -> video (B, F, 8 h, 8 w, 3), float32; F = 4 (f - 1) + 1 for odd f
        (as CogVideoX makes them), 4 f for even f."""
        z = latents.astype(self.dtype)

        def decode_frames(v):
            return _frame_batched(self.decoder, v, self.decode_frame_batch)

        sample, latent = self.tile_sample, self.tile_latent
        if self.tiling and (z.shape[2] > latent[0] or z.shape[3] > latent[1]):
            return _tiled(decode_frames, z, latent, *self._tile_plan(latent, sample))
        return decode_frames(z).astype(jnp.float32)


def abstract(cfg: VAEConfig) -> CogVideoXVAE:
    """The VAE with shapes only (no memory)."""
    return nnx.eval_shape(lambda: CogVideoXVAE(cfg, rngs=nnx.Rngs(0)))


def build(cfg: VAEConfig, seed: int = 0) -> CogVideoXVAE:
    """A VAE with PyTorch-style random weights drawn in numpy (uniform ±1/sqrt(fan_in) kernels, unit norms).

    Drawn on the host because initialising its many differently shaped convolutions op by op in JAX compiles
    each one: about 15 s on CPU even for the tiny VAE, against well under a second here.
    `cfg.random_posterior_std` > 0 makes the encoder's log-variance output that constant (see VAEConfig).
    """
    model = abstract(cfg)
    flat = host_random_weights(model, seed)
    if cfg.random_posterior_std > 0:
        channels = cfg.latent_channels  # conv_out gives (mean, logvar) channels
        flat["encoder.conv_out.kernel"][..., channels:] = 0.0
        flat["encoder.conv_out.bias"][channels:] = 2 * np.log(cfg.random_posterior_std)
    return module_from_flat(model, flat, "random VAE")

