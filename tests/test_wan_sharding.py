"""The Wan edit transformer sharded over 8 simulated CPU devices computes what one device computes: forward and
parameter gradients, on (data, fsdp, tensor, context) meshes with the default logical rules, including context
parallelism (ring self-attention; the text cross-attention keeps whole K/V). Tolerance TOL (relative)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from insvie_jax.config import MeshConfig
from insvie_jax.models.wan import transformer as wan
from insvie_jax.models.wan.config import WanModelConfig
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.parallel.sharding import batch_sharding, logical_rules, state_shardings
from _compare import rel

TOL = 1e-5
# 2 heads (tensor 2), 2x2x3 = 12 video tokens (context 2), batch 4 (data x fsdp up to 4).
CFG = WanModelConfig(num_layers=2, num_attention_heads=2, attention_head_dim=16, in_channels=3, out_channels=3,
                     text_embed_dim=12, text_length=6, freq_dim=16, ffn_dim=40, dtype="float32")
SIZE = (2, 4, 6)


def loss_and_grads(model, batch):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        out = nnx.merge(graphdef, params, rest)(*batch)
        return jnp.mean(jnp.square(out - 0.3)), out

    (value, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return value, out, grads


def inputs():
    rng = np.random.default_rng(0)
    noisy, source = (rng.standard_normal((4, *SIZE, CFG.in_channels)).astype(np.float32) for _ in range(2))
    text = rng.standard_normal((4, CFG.text_length, CFG.text_embed_dim)).astype(np.float32)
    return noisy, source, text, np.array([900.0, 500.0, 100.0, 3.0], np.float32)


@pytest.fixture(scope="module")
def reference():
    return jax.jit(loss_and_grads)(wan.build(CFG, seed=1), inputs())


@pytest.mark.parametrize("shape,attention", [((2, 2, 2, 1), "xla"), ((1, 2, 2, 2), "ring")])
def test_sharded_forward_and_grads_match_one_device(shape, attention, reference):
    cfg = dataclasses.replace(CFG, attention=attention)
    mesh_cfg = MeshConfig(ici_data=shape[0], ici_fsdp=shape[1], ici_tensor=shape[2], ici_context=shape[3])
    mesh = meshlib.create_mesh(mesh_cfg)
    rules = mesh_cfg.logical_axis_rules
    model = wan.build(cfg, seed=1)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shardings = state_shardings(nnx.state(wan.abstract(cfg), nnx.Param), mesh, rules)
    params = jax.device_put(params.to_pure_dict(), shardings)
    q_spec = shardings["blocks"]["attn1"]["to_q"]["kernel"].spec
    assert "tensor" in jax.tree.leaves(tuple(q_spec)) and "fsdp" in jax.tree.leaves(tuple(q_spec))
    batch = tuple(jax.device_put(a, batch_sharding(mesh, rules, a.ndim)) for a in inputs())

    @jax.jit
    def run(params, batch):
        with logical_rules(mesh, rules):
            state = nnx.State(params)
            return loss_and_grads(nnx.merge(graphdef, state, rest), batch)

    value, out, grads = run(params, batch)
    ref_value, ref_out, ref_grads = reference
    assert rel(out, ref_out) <= TOL and abs(float(value) - float(ref_value)) <= TOL * abs(float(ref_value))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert rel(got, want) <= TOL
