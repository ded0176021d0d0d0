"""The Wan edit transformer equals diffusers' WanTransformer3DModel(in_channels=2C), number for number.

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

from insvie_jax.convert import wan_keys  # noqa: E402
from insvie_jax.models.params import set_flat_params  # noqa: E402
from insvie_jax.models.wan import transformer as wan  # noqa: E402
from insvie_jax.models.wan.config import WanModelConfig  # noqa: E402
from _compare import rel  # noqa: E402
from _parity import diffusers_model, norms_and_biases  # noqa: E402

FORWARD_TOL = 1e-5
GRAD_TOL = 1e-4

# Odd sizes everywhere: 3 heads of 16 (RoPE split t/h/w = 8/4/4), 5 latent channels, text 7 x 20.
TINY = WanModelConfig(num_layers=2, num_attention_heads=3, attention_head_dim=16, in_channels=5, out_channels=5,
                      text_embed_dim=20, text_length=7, freq_dim=34, ffn_dim=72, dtype="float32")


def reference(cfg: WanModelConfig, seed: int):
    """A diffusers model with random weights, including non-default norm weights and biases."""
    return diffusers_model(diffusers.WanTransformer3DModel, wan_keys.diffusers_config(cfg), seed, norms_and_biases)


def ours_from(ref, cfg: WanModelConfig, **overrides):
    cfg = dataclasses.replace(cfg, **overrides)
    model = wan.build(cfg)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    set_flat_params(model, wan_keys.transformer_from_diffusers(sd, cfg))
    return model


def inputs(cfg: WanModelConfig, frames: int, height: int, width: int, seed: int):
    rng = np.random.default_rng(seed)
    noisy = rng.standard_normal((2, frames, height, width, cfg.in_channels)).astype(np.float32)
    source = rng.standard_normal((2, frames, height, width, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, cfg.text_length, cfg.text_embed_dim)).astype(np.float32)
    return noisy, source, text


def ref_forward(ref, noisy, source, text, t):
    x = torch.cat([torch.as_tensor(noisy), torch.as_tensor(source)], -1).permute(0, 4, 1, 2, 3)
    out = ref(x, torch.as_tensor(t), torch.as_tensor(text), return_dict=False)[0]
    return out.permute(0, 2, 3, 4, 1)


def per_token_timesteps(cfg, frames, height, width, seed):
    """Distinct timesteps per token (TI2V's expand_timesteps), (B, N)."""
    pt, ph, pw = cfg.patch_size
    n = (frames // pt) * (height // ph) * (width // pw)
    return np.random.default_rng(seed).uniform(0, 1000, (2, n)).astype(np.float32)


# (frames, latent height, latent width): none a power of two.
SIZES = [(3, 10, 14), (5, 6, 18)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("per_token", [False, True], ids=["t-per-sample", "t-per-token"])
def test_forward_matches_diffusers(size, per_token):
    ref = reference(TINY, seed=1)
    model = ours_from(ref, TINY, scan_layers=per_token)  # both layer loops, each once
    noisy, source, text = inputs(TINY, *size, seed=2)
    t = per_token_timesteps(TINY, *size, seed=3) if per_token else np.array([999.0, 37.5], np.float32)
    with torch.no_grad():
        want = ref_forward(ref, noisy, source, text, t).numpy()
    got = np.asarray(model(noisy, source, text, t))
    assert got.shape == want.shape == noisy.shape
    assert rel(got, want) <= FORWARD_TOL, rel(got, want)


def test_per_sample_timestep_equals_expanded_constant():
    """(B,) timesteps give what diffusers' expand_timesteps mode gives with the same value on every token."""
    ref = reference(TINY, seed=4)
    model = ours_from(ref, TINY)
    noisy, source, text = inputs(TINY, 3, 10, 14, seed=5)
    t = np.array([500.0, 12.0], np.float32)
    expanded = np.repeat(t[:, None], 3 * 5 * 7, axis=1)
    with torch.no_grad():
        want = ref_forward(ref, noisy, source, text, expanded).numpy()
    assert rel(model(noisy, source, text, t), want) <= FORWARD_TOL


def test_cross_attn_norm_off_matches_diffusers():
    cfg = dataclasses.replace(TINY, cross_attn_norm=False, num_layers=1)
    ref = reference(cfg, seed=6)
    model = ours_from(ref, cfg)
    noisy, source, text = inputs(cfg, 3, 10, 14, seed=7)
    t = np.array([999.0, 37.5], np.float32)
    with torch.no_grad():
        want = ref_forward(ref, noisy, source, text, t).numpy()
    assert rel(model(noisy, source, text, t), want) <= FORWARD_TOL


@pytest.mark.parametrize("remat_policy", ["full", "attention"])
def test_input_gradients_match_diffusers(remat_policy):
    ref = reference(TINY, seed=8)
    model = ours_from(ref, TINY, remat_policy=remat_policy)
    noisy, source, text = inputs(TINY, 3, 10, 14, seed=9)
    t = per_token_timesteps(TINY, 3, 10, 14, seed=10)
    weights = np.random.default_rng(11).standard_normal(noisy.shape).astype(np.float32)

    tn, ts, tt = (torch.from_numpy(a).requires_grad_(True) for a in (noisy, source, text))
    (ref_forward(ref, tn, ts, tt, t) * torch.from_numpy(weights)).sum().backward()

    graphdef, state = nnx.split(model)

    def loss(noisy, source, text):
        return jnp.sum(nnx.merge(graphdef, state)(noisy, source, text, t) * weights)

    grads = jax.grad(loss, argnums=(0, 1, 2))(noisy, source, text)
    for got, want in zip(grads, (tn.grad, ts.grad, tt.grad)):
        assert rel(got, want.numpy()) <= GRAD_TOL, rel(got, want.numpy())


def test_full_size_abstract_parameter_count_equals_diffusers():
    """Wan2.2-TI2V-5B in the Lucy-Edit layout (in_channels 96): shapes only on both sides."""
    cfg = WanModelConfig()
    model = wan.abstract(cfg)
    kwargs = {k: v for k, v in wan_keys.diffusers_config(cfg).items() if not k.startswith("_")}
    assert kwargs["in_channels"] == 96 and kwargs["num_layers"] == 30 and kwargs["ffn_dim"] == 14336
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(**kwargs)
    want = sum(p.numel() for p in ref.parameters())
    assert wan.count_params(model) == want
    assert 4.9e9 < want < 5.1e9
    assert model.blocks.attn1.to_q.kernel.get_value().shape == (30, 3072, 24, 128)


def test_bf16_compute_stays_close_to_fp32():
    ref = reference(TINY, seed=12)
    fp32 = ours_from(ref, TINY)
    bf16 = ours_from(ref, TINY, dtype="bfloat16")
    noisy, source, text = inputs(TINY, 3, 10, 14, seed=13)
    t = np.array([999.0, 37.5], np.float32)
    err = rel(bf16(noisy, source, text, t), fp32(noisy, source, text, t))
    assert err < 3e-2, err  # bf16 operands: ~1e-2 relative error expected
    assert nnx.state(bf16, nnx.Param)["proj_out"]["kernel"][...].dtype == jnp.float32
