"""The editing transformer equals diffusers' CogVideoXTransformer3DModel(in_channels=32), number for number.

Tolerances (stated by the issue): forward ≤1e-5 and input gradients ≤1e-4 relative error ‖a−b‖/‖b‖, fp32 on CPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax.config import ModelConfig  # noqa: E402
from insvie_jax.convert.diffusers_keys import diffusers_config, transformer_from_diffusers  # noqa: E402
from insvie_jax.models import transformer as tr  # noqa: E402
from insvie_jax.models.params import set_flat_params  # noqa: E402
from _compare import rel  # noqa: E402
from _parity import diffusers_model, norms_and_biases  # noqa: E402

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4

# Tiny configs with sizes that are not powers of two: frames, text length, height and width.
SINCOS = ModelConfig(
    num_layers=2, num_attention_heads=3, attention_head_dim=16, time_embed_dim=24, text_embed_dim=20,
    text_length=7, sample_height=10, sample_width=14, sample_frames=9, positions="sincos",
    dtype="float32", param_dtype="float32",
)
ROPE = dataclasses.replace(SINCOS, positions="rope", num_attention_heads=2, attention_head_dim=32,
                           sample_height=12, sample_width=16)


def reference(cfg: ModelConfig, seed: int):
    """A diffusers model with random weights, including non-default norm weights and biases."""
    return diffusers_model(diffusers.CogVideoXTransformer3DModel, diffusers_config(cfg), seed, norms_and_biases)


def ours_from(ref, cfg: ModelConfig, **overrides):
    cfg = dataclasses.replace(cfg, **overrides)
    model = tr.build(cfg)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items() if "pos_embedding" not in k}
    set_flat_params(model, transformer_from_diffusers(sd, cfg))
    return model


def inputs(cfg: ModelConfig, frames: int, height: int, width: int, seed: int):
    rng = np.random.default_rng(seed)
    noisy = rng.standard_normal((2, frames, height, width, cfg.in_channels)).astype(np.float32)
    source = rng.standard_normal((2, frames, height, width, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, cfg.text_length, cfg.text_embed_dim)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    return noisy, source, text, t


def ref_rope(cfg: ModelConfig, frames: int, height: int, width: int):
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    p = cfg.patch_size
    gh, gw = height // p, width // p
    crops = get_resize_crop_region_for_grid((gh, gw), cfg.sample_width // p, cfg.sample_height // p)
    return get_3d_rotary_pos_embed(cfg.attention_head_dim, crops, (gh, gw), frames)


def ref_forward(ref, cfg, noisy, source, text, t):
    x = torch.from_numpy(np.concatenate([noisy, source], -1)).permute(0, 1, 4, 2, 3)
    rope = ref_rope(cfg, *noisy.shape[1:4]) if cfg.positions == "rope" else None
    out = ref(x, torch.from_numpy(text), torch.from_numpy(t), image_rotary_emb=rope, return_dict=False)[0]
    return out.permute(0, 1, 3, 4, 2)


# (frames, latent height, latent width): the config's own size and a different one, neither a power of two.
SIZES = [(3, 10, 14), (5, 6, 18)]


@pytest.mark.parametrize("cfg", [SINCOS, ROPE], ids=["sincos", "rope"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_forward_matches_diffusers(cfg, size, scan):
    ref = reference(cfg, seed=1)
    model = ours_from(ref, cfg, scan_layers=scan)
    noisy, source, text, t = inputs(cfg, *size, seed=2)
    with torch.no_grad():
        want = ref_forward(ref, cfg, noisy, source, text, t).numpy()
    got = np.asarray(model(noisy, source, text, t))
    assert got.shape == want.shape == noisy.shape
    assert rel(got, want) <= FORWARD_TOL, rel(got, want)


@pytest.mark.parametrize("cfg,remat_policy", [(SINCOS, "full"), (ROPE, "attention"), (ROPE, "attention_offload")],
                         ids=["sincos-full", "rope-attention", "rope-attention_offload"])
def test_input_gradients_match_diffusers(cfg, remat_policy):
    ref = reference(cfg, seed=3)
    model = ours_from(ref, cfg, remat_policy=remat_policy)
    noisy, source, text, t = inputs(cfg, 3, 10, 14, seed=4)
    weights = np.random.default_rng(5).standard_normal(noisy.shape).astype(np.float32)

    tn, ts, tt = (torch.from_numpy(a).requires_grad_(True) for a in (noisy, source, text))
    x = torch.cat([tn, ts], -1).permute(0, 1, 4, 2, 3)
    rope = ref_rope(cfg, 3, 10, 14) if cfg.positions == "rope" else None
    out = ref(x, tt, torch.from_numpy(t), image_rotary_emb=rope, return_dict=False)[0].permute(0, 1, 3, 4, 2)
    (out * torch.from_numpy(weights)).sum().backward()

    graphdef, state = nnx.split(model)

    def loss(noisy, source, text):
        return jnp.sum(nnx.merge(graphdef, state)(noisy, source, text, t) * weights)

    grads = jax.grad(loss, argnums=(0, 1, 2))(noisy, source, text)
    for got, want in zip(grads, (tn.grad, ts.grad, tt.grad)):
        assert rel(got, want.numpy()) <= GRAD_TOL, rel(got, want.numpy())


def test_edit_model_from_t2v_ignores_source_and_equals_t2v():
    """init_edit_from_t2v: the fresh edit model reproduces the 16-channel text-to-video model exactly."""
    cfg = SINCOS
    torch.manual_seed(7)
    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    t2v = diffusers.CogVideoXTransformer3DModel(**{**kwargs, "in_channels": cfg.in_channels}).eval()
    edit_ref = diffusers.CogVideoXTransformer3DModel(**kwargs).eval()
    sd = t2v.state_dict()
    edit_sd = {k: v for k, v in sd.items() if not k.startswith("patch_embed.proj.")}
    edit_sd["patch_embed.proj.weight"] = torch.zeros_like(edit_ref.state_dict()["patch_embed.proj.weight"])
    edit_sd["patch_embed.proj.bias"] = sd["patch_embed.proj.bias"]
    edit_sd = {k: v.numpy() for k, v in edit_sd.items() if "pos_embedding" not in k}

    model = tr.build(cfg)
    set_flat_params(model, transformer_from_diffusers(edit_sd, cfg))  # zero patch kernel: init fills it
    tr.init_edit_from_t2v(model, sd["patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0),
                          sd["patch_embed.proj.bias"].numpy())

    noisy, source, text, t = inputs(cfg, 3, 10, 14, seed=8)
    with torch.no_grad():
        x = torch.from_numpy(noisy).permute(0, 1, 4, 2, 3)
        want = t2v(x, torch.from_numpy(text), torch.from_numpy(t), return_dict=False)[0].permute(0, 1, 3, 4, 2)
    got = np.asarray(model(noisy, source, text, t))
    assert rel(got, want.numpy()) <= FORWARD_TOL
    other = np.asarray(model(noisy, 5 * source, text, t))
    np.testing.assert_array_equal(got, other)


def test_fix_proj_starts_from_the_noisy_stream_only():
    cfg = dataclasses.replace(SINCOS, patch_embed="fix_proj")
    model = tr.build(cfg)
    rng = np.random.default_rng(0)
    p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
    tr.init_edit_from_t2v(model, rng.standard_normal((p, p, c, d)).astype(np.float32),
                          rng.standard_normal(d).astype(np.float32))
    noisy, source, text, t = inputs(cfg, 3, 10, 14, seed=9)
    a = np.asarray(model(noisy, source, text, t))
    b = np.asarray(model(noisy, -source, text, t))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # source path starts at zero weight
    assert np.isfinite(a).all()


def test_bf16_compute_stays_close_to_fp32():
    ref = reference(SINCOS, seed=11)
    fp32 = ours_from(ref, SINCOS)
    bf16 = ours_from(ref, SINCOS, dtype="bfloat16")
    args = inputs(SINCOS, 3, 10, 14, seed=12)
    err = rel(bf16(*args), fp32(*args))
    assert err < 3e-2, err  # bf16 operands: ~1e-2 relative error expected
    assert nnx.state(bf16, nnx.Param)["proj_out"]["kernel"][...].dtype == jnp.float32
