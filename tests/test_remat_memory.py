"""Where the fwd+bwd's memory goes: the layer scan saves one bf16 input per layer (no float32 copies), the
offloading remat policies keep those in host memory (same gradients: test_transformer_parity.py checks them
against diffusers), and the bench releases a call's outputs before the next call, as the references do."""

from __future__ import annotations

import dataclasses
import re
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from insvie_jax import config as configlib
from insvie_jax.convert.models import load_training_models
from insvie_jax.bench import timing
from insvie_jax.config import ModelConfig
from insvie_jax.data.synthetic import SyntheticTriplets
from insvie_jax.models import transformer as tr
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.train import step as steplib
from insvie_jax.train.state import TrainState

TINY = ModelConfig(num_layers=3, num_attention_heads=2, attention_head_dim=16, time_embed_dim=16, text_embed_dim=16,
                   text_length=5, sample_height=8, sample_width=8, sample_frames=5, dtype="bfloat16",
                   param_dtype="bfloat16", attention="xla")


def _inputs(cfg: ModelConfig, frames: int, height: int, width: int):
    rng = np.random.default_rng(0)
    latents = (1, frames, height, width, cfg.in_channels)
    return {"noisy": jnp.asarray(rng.standard_normal(latents), cfg.dtype),
            "source": jnp.asarray(rng.standard_normal(latents), cfg.dtype),
            "text": jnp.asarray(rng.standard_normal((1, cfg.text_length, cfg.text_embed_dim)), cfg.dtype),
            "target": jnp.asarray(rng.standard_normal(latents[:-1] + (cfg.out_channels,)), jnp.float32),
            "timestep": jnp.full((1,), 500.0, jnp.float32)}


def _layer_input_residual(cfg: ModelConfig, capsys) -> str:
    """The printed residual of the layer scan (the stacked layer inputs), e.g. 'bf16<host>[3,1,21,32] ...'."""
    model = tr.build(cfg)
    graphdef, params = nnx.split(model)
    batch = _inputs(cfg, 2, 4, 4)

    def loss(params):
        out = nnx.merge(graphdef, params)(batch["noisy"], batch["source"], batch["text"], batch["timestep"])
        return jnp.mean(jnp.square(out - batch["target"]))

    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, params)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "output of scan" in ln]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("policy,on_host", [("full", False), ("attention", False), ("full_offload", True),
                                            ("attention_offload", True), ("attention_offload_all", True)])
def test_offload_policies_keep_the_layer_inputs_on_the_host(policy, on_host, capsys):
    line = _layer_input_residual(dataclasses.replace(TINY, remat_policy=policy), capsys)
    # One bf16 input per layer, nothing in float32; on the host exactly for the *_offload policies.
    assert re.match(rf"bf16(<host>)?\[{TINY.num_layers},1,", line), line
    assert ("<host>" in line) == on_host, line


def test_bench_releases_the_previous_outputs_before_the_next_call():
    alive_during_call = []
    previous = []

    class Output:  # stands for a fwd+bwd's gradients, as large as the weights
        pass

    def step():
        alive_during_call.append(bool(previous) and previous[-1]() is not None)
        out = Output()
        previous.append(weakref.ref(out))
        return out

    timing.measure(step, repeats=3)
    assert alive_during_call == [False, False, False, False]


def test_sharded_train_steps_are_bit_identical_with_the_layer_inputs_on_the_host():
    """The real train step on a data 2 x fsdp 4 mesh (8 CPU devices): offloading changes where the saved
    inputs live, not a single bit of the losses."""
    losses = {}
    for policy in ("full", "attention_offload"):
        cfg = configlib.load("tiny", ["data.num_frames=1", "data.height=16", "data.width=16", "data.batch_size=8",
                                      "mesh.ici_data=2", "mesh.ici_fsdp=4", f"model.remat_policy={policy}"])
        mesh = meshlib.create_mesh(cfg.mesh)
        optimizer = steplib.make_optimizer(cfg)
        train_state = TrainState.init(cfg, mesh, optimizer, load_training_models(cfg))
        _graphdef, state, frozen = train_state.graphdef, train_state.variables, train_state.frozen
        step_fn = steplib.make_train_step(cfg, train_state, optimizer, mesh,
                                          meshlib.data_parallel_size(mesh))
        data = SyntheticTriplets(cfg.data.batch_size, configlib.latent_shape(cfg), cfg.model.text_length,
                                 cfg.model.text_embed_dim)
        losses[policy] = []
        for i in range(2):  # the second step runs on the parameters the first one's gradients updated
            state, metrics = step_fn(state, frozen, steplib.put_batch(data.batch(i), steplib.batch_shardings(
                cfg, mesh)), i)
            losses[policy].append(float(metrics["loss"]))
    assert np.isfinite(losses["full"]).all()
    assert losses["attention_offload"] == losses["full"], losses
