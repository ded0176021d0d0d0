"""The full training step (`insvie_jax.train.step`: InsViE loss, gradients, clipping, AdamW, in one jit) on
the mesh the config asks for (mesh.ici_data / ici_fsdp / ici_context ...), global batch data.batch_size.

With several processes (`insvie-jax bench --processes N`, one per GPU) each joins through
parallel.distributed and feeds its addressable shards of the same global batch.
"""

from __future__ import annotations

import jax
import numpy as np

from insvie_jax import config as configlib
from insvie_jax.bench.timing import Prepared
from insvie_jax.bench.transformer import transformer_inputs
from insvie_jax.models import family
from insvie_jax.models.params import flat_params
from insvie_jax.parallel import distributed
from insvie_jax.parallel import mesh as meshlib


def train_step(cfg, options: dict) -> Prepared:
    from insvie_jax.train import step as steplib
    from insvie_jax.convert.models import load_training_models
    from insvie_jax.train.state import TrainState

    distributed.initialize()
    mesh = meshlib.create_mesh(cfg.mesh)
    groups = meshlib.data_parallel_size(mesh)
    batch_size = cfg.data.batch_size
    if batch_size % groups:
        raise configlib.ConfigError(f"data.batch_size={batch_size} must be a multiple of the data-parallel size "
                                    f"{groups} (mesh {dict(mesh.shape)}): pass --set data.batch_size=...")
    optimizer = steplib.make_optimizer(cfg)
    state = TrainState.init(cfg, mesh, optimizer, load_training_models(cfg))
    inputs = transformer_inputs(cfg, family.abstract(cfg.model), batch=batch_size)
    batch = steplib.put_batch({k: inputs[k] for k in ("source", "target", "text")},
                              steplib.batch_shardings(cfg, mesh))
    step_fn = steplib.make_train_step(cfg, state, optimizer, mesh, groups)
    current = {"variables": state.variables, "index": 0}

    def step():
        current["variables"], metrics = step_fn(current["variables"], state.frozen, batch, np.int32(current["index"]))
        current["index"] += 1
        return metrics

    def weights():
        return flat_params(state.replace(variables=current["variables"]).model())

    f, h, w, _ = configlib.latent_shape(cfg)
    flops = 3 * family.forward_flops(cfg.model, f, h, w) * batch_size
    return Prepared(step=step, flops=flops, samples=batch_size,
                    weights=None if cfg.lora.enabled or jax.process_count() > 1 else weights,
                    inputs=inputs, dtype=cfg.model.dtype,
                    info={"mesh": dict(mesh.shape), "devices": mesh.size, "processes": jax.process_count(),
                          "batch": batch_size, "remat": cfg.model.remat_policy, "lora": cfg.lora.enabled})
