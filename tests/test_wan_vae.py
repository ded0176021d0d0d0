"""The Wan2.2 VAE equals diffusers' AutoencoderKLWan in each memory mode, its folders load and save both ways,
and its full-size parameter count is diffusers'.

Tolerance: encode mean, encode std and decode each ≤1e-4 relative error ‖a−b‖/‖b‖, fp32 on CPU, against
diffusers run in the same mode: diffusers always runs frame 0 then 4 frames at a time (encode) and one latent
frame at a time (decode), carrying its feature cache; ours runs all frames in one pass ("full") or in frame
batches carrying the causal caches through a `lax.scan` ("frames"); "tiled" is diffusers' `enable_tiling`
with the same tile sizes and strides.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from _compare import rel  # noqa: E402
from _parity import diffusers_model, jit_method, to_ours, to_torch, wan_vae_gammas_and_biases  # noqa: E402

from insvie_jax.config import WanVAEConfig  # noqa: E402
from insvie_jax.convert import wan_vae_keys  # noqa: E402
from insvie_jax.models.params import flat_params, module_from_flat, param_shapes  # noqa: E402
from insvie_jax.models.wan import vae as wan_vae  # noqa: E402

TOL = 1e-4
BF16_TOL = 5e-2
MODES_DIFFER = 1e-3  # tiles must visibly change diffusers' numbers, or the tiled comparison proves nothing
Z = 12
_stats = np.random.default_rng(7)
# Wan2.2's layout (residual blocks, 2x2 patchify, 16x spatial, 4x temporal) at odd, tiny widths:
# encoder channels 5, 5, 10, 20, 20; decoder 28, 28, 28, 14, 7.
TINY = WanVAEConfig(base_dim=5, decoder_base_dim=7, z_dim=Z, num_res_blocks=1, dtype="float32",
                    latents_mean=[float(v) for v in _stats.normal(size=Z)],
                    latents_std=[float(v) for v in _stats.uniform(0.5, 2.0, Z)],
                    tile_sample_height=32, tile_sample_width=32, tile_stride_height=16, tile_stride_width=16)
MODES = {
    "full": dict(encode_frame_batch=0, decode_frame_batch=0),
    "frames": dict(encode_frame_batch=4, decode_frame_batch=1),  # diffusers' own split, as a scan
    # tiles run one pass each (the same numbers as frame batches, and half the compiling)
    "tiled": dict(encode_frame_batch=0, decode_frame_batch=0, tiling=True),
}
# Pixels 32 x 64 are patchified 16 x 32, latents 2 x 4: with 32/16 tiles (diffusers measures the encoder's
# on the patchified frames), a 1 x 2 row of tiles in encode and a 2 x 4 grid in decode, blended on both axes.
HEIGHT, WIDTH = 32, 64


@pytest.fixture(scope="module")
def reference():
    """A diffusers VAE with random weights, its RMS-norm gammas and all biases perturbed so that they count."""
    return diffusers_model(diffusers.AutoencoderKLWan, wan_vae_keys.diffusers_vae_config(TINY), 0,
                           wan_vae_gammas_and_biases)


def set_reference_mode(ref, mode: str) -> None:
    if mode == "tiled":
        ref.enable_tiling(TINY.tile_sample_height, TINY.tile_sample_width, TINY.tile_stride_height,
                          TINY.tile_stride_width)
    else:
        ref.disable_tiling()


def untiled(ref, fn):
    """diffusers' result without tiles: tiles limit what the mid-block attention sees, so a tiled comparison
    must be a comparison of its own."""
    set_reference_mode(ref, "full")
    with torch.no_grad():
        out = fn()
    set_reference_mode(ref, "tiled")
    return to_ours(out)


def ours(ref, mode: str) -> wan_vae.WanVAE:
    flat = wan_vae_keys.vae_from_diffusers({k: v.numpy() for k, v in ref.state_dict().items()})
    return module_from_flat(wan_vae.abstract(dataclasses.replace(TINY, **MODES[mode])), flat)


_encode = jit_method("encode")
_decode = jit_method("decode")


def video(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (1, frames, HEIGHT, WIDTH, 3)).astype(np.float32)


def latents(frames: int, seed: int = 1) -> np.ndarray:
    shape = (1, frames, HEIGHT // 16, WIDTH // 16, Z)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# 9 = 1 + 4 + 4 frames: frame 0, then two 4-frame passes continuing from the caches (two scan steps).
@pytest.mark.parametrize("mode,frames", [("full", 9), ("frames", 9), ("tiled", 5)])
def test_encode_matches_diffusers(reference, mode, frames):
    x = video(frames)
    set_reference_mode(reference, mode)
    with torch.no_grad():
        expected = reference.encode(to_torch(x)).latent_dist
    posterior = _encode(ours(reference, mode), x)
    assert posterior.mean.shape == (1, (frames - 1) // 4 + 1, HEIGHT // 16, WIDTH // 16, Z)
    assert rel(posterior.mean, to_ours(expected.mean)) <= TOL
    assert rel(posterior.std, to_ours(expected.std)) <= TOL
    if mode == "tiled":
        plain = untiled(reference, lambda: reference.encode(to_torch(x)).latent_dist.mean)
        assert rel(to_ours(expected.mean), plain) > MODES_DIFFER


@pytest.mark.parametrize("mode,frames", [("full", 3), ("frames", 3), ("tiled", 2)])
def test_decode_matches_diffusers(reference, mode, frames):
    z = latents(frames)
    set_reference_mode(reference, mode)
    with torch.no_grad():
        expected = to_ours(reference.decode(to_torch(z)).sample)
    out = _decode(ours(reference, mode), z)
    assert out.shape == (1, 4 * (frames - 1) + 1, HEIGHT, WIDTH, 3) and out.dtype == np.float32
    assert np.mean(np.abs(expected) < 1) > 0.8  # mostly unclamped: the comparison sees the decoder's numbers
    assert rel(out, expected) <= TOL
    if mode == "tiled":
        assert rel(expected, untiled(reference, lambda: reference.decode(to_torch(z)).sample)) > MODES_DIFFER


def test_bfloat16_compute(reference):
    """bf16 compute (the default) runs the frame-batched decode (its scan carries bf16 caches) close to
    diffusers' fp32, and returns float32."""
    flat = wan_vae_keys.vae_from_diffusers({k: v.numpy() for k, v in reference.state_dict().items()})
    bf16 = module_from_flat(wan_vae.abstract(dataclasses.replace(TINY, **MODES["frames"], dtype="bfloat16")), flat)
    z = latents(3)
    set_reference_mode(reference, "frames")
    with torch.no_grad():
        expected = to_ours(reference.decode(to_torch(z)).sample)
    out = _decode(bf16, z)
    assert out.dtype == np.float32 and bf16.decoder.conv_in.kernel.dtype == np.float32  # fp32 parameters
    assert rel(out, expected) <= BF16_TOL


def test_bad_clip_length_is_named(reference):
    with pytest.raises(ValueError, match=r"1 \+ 4 k frames"):
        ours(reference, "full").encode(video(8))


def test_latent_normalization():
    """diffusers' Wan pipelines: latents = (z - latents_mean) / latents_std entering the transformer, and
    z = latents * latents_std + latents_mean before decoding."""
    z = latents(2)
    mean, std = np.asarray(TINY.latents_mean, np.float32), np.asarray(TINY.latents_std, np.float32)
    normalized = np.asarray(wan_vae.normalize_latents(z, TINY))
    np.testing.assert_allclose(normalized, (z - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(wan_vae.denormalize_latents(normalized, TINY)), z, rtol=1e-5, atol=1e-5)


def test_key_mapping_round_trip(reference):
    sd = {k: v.numpy() for k, v in reference.state_dict().items()}
    flat = wan_vae_keys.vae_from_diffusers(sd)
    assert sorted(param_shapes(wan_vae.abstract(TINY)).items()) == sorted((k, v.shape) for k, v in flat.items())
    back = wan_vae_keys.vae_to_diffusers(flat)
    assert sorted(back) == sorted(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_diffusers_folder_both_ways(reference, tmp_path):
    """A diffusers save loads into ours (as a pipeline folder's vae/), and what we save diffusers loads with
    the same weights and config."""
    reference.save_pretrained(tmp_path / "pipeline" / "vae")
    base = dataclasses.replace(WanVAEConfig(), dtype="float32")
    model, cfg = wan_vae_keys.load_vae(tmp_path / "pipeline", base)
    assert (cfg.base_dim, cfg.decoder_base_dim, cfg.z_dim, cfg.patch_size) == (5, 7, Z, 2)
    assert cfg.latents_std == pytest.approx(TINY.latents_std)
    expected = wan_vae_keys.vae_from_diffusers({k: v.numpy() for k, v in reference.state_dict().items()})
    loaded = flat_params(model)
    assert sorted(loaded) == sorted(expected) and all(np.array_equal(loaded[k], expected[k]) for k in expected)

    wan_vae_keys.save_vae(model, cfg, tmp_path / "ours")
    again = diffusers.AutoencoderKLWan.from_pretrained(tmp_path / "ours").eval()
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(again.config) == public(reference.config)
    sd = reference.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in again.state_dict().items())


def test_full_size_parameter_count():
    """Wan2.2-TI2V-5B's VAE built abstractly has diffusers' parameter count (diffusers on the meta device)."""
    kwargs = {k: v for k, v in wan_vae_keys.diffusers_vae_config(WanVAEConfig()).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan(**kwargs)
    theirs = sum(p.numel() for p in ref.parameters())
    ours_count = sum(int(np.prod(s)) for s in param_shapes(wan_vae.abstract(WanVAEConfig())).values())
    assert ours_count == theirs
    assert len(param_shapes(wan_vae.abstract(WanVAEConfig()))) == len(ref.state_dict())
