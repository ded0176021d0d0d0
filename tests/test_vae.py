"""The CogVideoX VAE equals diffusers' AutoencoderKLCogVideoX in each memory mode, and both checkpoint formats load.

Tolerance: encode mean, encode std and decode each ≤1e-4 relative error ‖a−b‖/‖b‖, fp32 on CPU, against
diffusers run in the same mode (all frames at once / 8-frame and 2-latent-frame batches carrying the
causal-conv cache / overlapping tiles).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from _compare import rel  # noqa: E402
from _parity import diffusers_model, jit_method, to_ours, to_torch  # noqa: E402

from insvie_jax.config import VAEConfig  # noqa: E402
from insvie_jax.convert import vae_keys  # noqa: E402
from insvie_jax.models import vae as vae_model  # noqa: E402
from insvie_jax.models.params import flat_params  # noqa: E402

TOL = 1e-4
BF16_TOL = 5e-2
MODES_DIFFER = 1e-3  # the modes must give visibly different numbers, or the per-mode tests prove nothing

# 4 blocks: 8x spatial and (blocks 0, 1 compress time) 4x temporal compression, as the real VAE.
TINY = VAEConfig(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, dtype="float32",
                 tile_sample_height=32, tile_sample_width=48, tile_overlap_height=0.5, tile_overlap_width=1 / 3)
MODES = {
    "full": dict(encode_frame_batch=0, decode_frame_batch=0),
    "frames": dict(encode_frame_batch=8, decode_frame_batch=2),
    "tiled": dict(encode_frame_batch=8, decode_frame_batch=2, tiling=True),
}
HEIGHT, WIDTH = 48, 80  # > one tile in both directions, non-square


@pytest.fixture(scope="module")
def reference():
    """A diffusers VAE with random weights, norm scales and all biases perturbed so that they are tested."""

    def perturb(name, p):
        if p.ndim == 1:
            p.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))

    return diffusers_model(diffusers.AutoencoderKLCogVideoX, vae_keys.diffusers_vae_config(TINY), 0, perturb)


def set_reference_mode(ref, mode: str) -> None:
    big = 10**6  # more frames than any clip: one pass, as `_encode`/`_decode` compute their batches
    ref.num_sample_frames_batch_size = big if mode == "full" else 8
    ref.num_latent_frames_batch_size = big if mode == "full" else 2
    if mode == "tiled":
        ref.enable_tiling(TINY.tile_sample_height, TINY.tile_sample_width, TINY.tile_overlap_height,
                          TINY.tile_overlap_width)
    else:
        ref.disable_tiling()


def ours(ref, mode: str) -> vae_model.CogVideoXVAE:
    flat = vae_keys.vae_from_diffusers({k: v.numpy() for k, v in ref.state_dict().items()})
    return vae_keys.vae_with_params(dataclasses.replace(TINY, **MODES[mode]), flat)


_encode = jit_method("encode")
_decode = jit_method("decode")


def video(frames: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (1, frames, HEIGHT, WIDTH, 3)).astype(np.float32)


def latents(frames: int, seed: int = 1) -> np.ndarray:
    h, w = HEIGHT // 8, WIDTH // 8
    return np.random.default_rng(seed).standard_normal((1, frames, h, w, TINY.latent_channels)).astype(np.float32)


# 9 frames are one pass in every mode; 17 frames are a 9-frame pass, then 8 frames continuing from its caches.
@pytest.mark.parametrize("mode,frames", [("full", 9), ("frames", 17), ("tiled", 9)])
def test_encode_matches_diffusers(reference, mode, frames):
    x = video(frames)
    set_reference_mode(reference, mode)
    with torch.no_grad():
        expected = reference.encode(to_torch(x)).latent_dist
    posterior = _encode(ours(reference, mode), x)
    assert posterior.mean.shape == (1, (frames - 1) // 4 + 1, HEIGHT // 8, WIDTH // 8, 16)
    assert rel(posterior.mean, to_ours(expected.mean)) <= TOL
    assert rel(posterior.std, to_ours(expected.std)) <= TOL


# Odd latent counts keep a lone first frame (5 -> 17 frames; batches 3 + 2); even ones double every frame
# (6 -> 24 frames; batches 2 + 2 + 2, two scanned passes). Tiles run the frame batches inside each tile.
@pytest.mark.parametrize("mode,frames", [("full", 6), ("frames", 5), ("frames", 6), ("tiled", 5)])
def test_decode_matches_diffusers(reference, mode, frames):
    z = latents(frames)
    set_reference_mode(reference, mode)
    with torch.no_grad():
        expected = to_ours(reference.decode(to_torch(z)).sample)
    out = _decode(ours(reference, mode), z)
    assert out.shape == (1, 4 * (frames - 1) + 1 if frames % 2 else 4 * frames, HEIGHT, WIDTH, 3)
    assert rel(out, expected) <= TOL


def test_memory_modes_differ(reference):
    """Frame batches and tiles change the group-norm statistics, so the per-mode comparisons above are three
    different comparisons (shown on diffusers' side, which each of ours equals)."""

    def run(mode, fn):
        set_reference_mode(reference, mode)
        with torch.no_grad():
            return fn()

    decode6 = {m: run(m, lambda: reference.decode(to_torch(latents(6))).sample) for m in ("full", "frames")}
    decode5 = {m: run(m, lambda: reference.decode(to_torch(latents(5))).sample) for m in ("frames", "tiled")}
    encode17 = {m: run(m, lambda: reference.encode(to_torch(video(17))).latent_dist.mean) for m in ("full", "frames")}
    assert rel(decode6["frames"], decode6["full"]) > MODES_DIFFER
    assert rel(decode5["tiled"], decode5["frames"]) > MODES_DIFFER
    assert rel(encode17["frames"], encode17["full"]) > MODES_DIFFER


def test_bfloat16_compute(reference):
    """bf16 compute (the default) runs the frame-batched path (its scan carries bf16 caches) and stays close to
    fp32; the output is float32."""
    flat = vae_keys.vae_from_diffusers({k: v.numpy() for k, v in reference.state_dict().items()})
    bf16 = vae_keys.vae_with_params(dataclasses.replace(TINY, **MODES["frames"], dtype="bfloat16"), flat)
    z = latents(5)
    out = _decode(bf16, z)
    assert out.dtype == np.float32
    assert rel(out, _decode(ours(reference, "frames"), z)) < BF16_TOL


def test_posterior_sample(reference):
    posterior = _encode(ours(reference, "full"), video(9))
    draw = posterior.sample(jax.random.key(0))
    noise = (np.asarray(draw) - np.asarray(posterior.mean)) / np.asarray(posterior.std)
    assert draw.shape == posterior.mean.shape and np.array_equal(posterior.mode(), posterior.mean)
    assert abs(noise.mean()) < 0.1 and abs(noise.std() - 1) < 0.1


def test_key_mapping_round_trip(reference):
    sd = {k: v.numpy() for k, v in reference.state_dict().items()}
    back = vae_keys.vae_to_diffusers(vae_keys.vae_from_diffusers(sd))
    assert sorted(back) == sorted(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


def test_load_diffusers_folder(reference, tmp_path):
    reference.save_pretrained(tmp_path / "vae")
    base = dataclasses.replace(VAEConfig(), dtype="float32", encode_frame_batch=0, decode_frame_batch=0)
    model, config = vae_keys.load_vae(tmp_path / "vae", base)
    assert config["block_out_channels"] == TINY.block_out_channels and config["norm_num_groups"] == 4
    assert model.tile_sample == (reference.config.sample_height // 2, reference.config.sample_width // 2)
    set_reference_mode(reference, "full")
    x = video(9)
    with torch.no_grad():
        expected = reference.encode(to_torch(x)).latent_dist.mean
    assert rel(_encode(model, x).mean, to_ours(expected)) <= TOL


def test_load_sat_pt(reference, tmp_path):
    sd = {k: v.clone() for k, v in reference.state_dict().items()}
    sat = vae_keys.diffusers_to_sat(sd)
    assert "decoder.up.3.block.0.norm1.norm_layer.weight" in sat  # up blocks reversed: diffusers 0 is SAT 3
    assert "encoder.mid.block_1.conv1.conv.weight" in sat and "encoder.down.1.block.0.nin_shortcut.weight" in sat
    sat["loss.logvar"] = torch.zeros(())  # SAT training leftovers are ignored
    torch.save({"state_dict": sat}, tmp_path / "3d-vae.pt")
    model, config = vae_keys.load_vae(tmp_path / "3d-vae.pt", dataclasses.replace(TINY, **MODES["full"]))
    assert config["layers_per_block"] == 1 and config["latent_channels"] == 16
    expected = vae_keys.vae_from_diffusers({k: v.numpy() for k, v in sd.items()})
    loaded = flat_params(model)
    assert sorted(loaded) == sorted(expected)
    assert all(np.array_equal(loaded[k], expected[k]) for k in expected)
