"""LoRA in the InsViE layout: trainable count, forward vs SAT's merge rule, merge/export, and a LoRA run that
trains only the adapters and `proj_edit` (frozen weights get no optimizer state), with gradient
accumulation, EMA and `train.init_from`.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from insvie_jax import config as configlib
from insvie_jax.convert.models import load_training_models
from insvie_jax.convert import sat_keys
from insvie_jax.convert.api import save_transformer
from insvie_jax.data.synthetic import SyntheticTriplets
from insvie_jax.models import lora as loralib
from insvie_jax.models import transformer
from insvie_jax.models.params import flat_params, set_flat_params
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.train import loop
from insvie_jax.train import state as statelib
from insvie_jax.train import step as steplib
from insvie_jax.train.state import TrainState

FORWARD_TOL = 1e-5  # relative error of forwards that differ only in where the adapters are applied
RANK = 4
OVERRIDES = ["data.num_frames=5", "data.height=32", "data.width=48", "lora.enabled=true", f"lora.rank={RANK}",
             "lora.alpha=1.0"]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def _inputs(cfg, seed=0):
    f, h, w, c = configlib.latent_shape(cfg)
    k = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(k[0], (2, f, h, w, c)), jax.random.normal(k[1], (2, f, h, w, c)),
            jax.random.normal(k[2], (2, cfg.model.text_length, cfg.model.text_embed_dim)), jnp.array([10.0, 700.0]))


def _lora_model(cfg):
    """A tiny LoRA model with non-zero B (a fresh adapter is a no-op and would prove nothing)."""
    model = statelib.trained_model(cfg)
    attn = model.blocks.attn
    for i, lora in enumerate((attn.qkv_lora, attn.out_lora)):
        b = lora.lora_b[...]
        lora.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(10 + i), b.shape, b.dtype)
    return model


def test_insvie_2b_layout_trains_lora_r128_and_proj_edit_only():
    cfg = configlib.load("cogvideox-2b-edit", ["lora.enabled=true"])
    abstract = nnx.eval_shape(lambda: statelib.trained_model(cfg))
    _, trainable, frozen = nnx.split(abstract, statelib.trainable_filter(cfg), nnx.Param)
    count = lambda s: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s))
    assert count(trainable) == 58_982_400 + 247_680  # reference/insvie.md §1: LoRA + proj_edit
    assert count(frozen) + 247_680 == transformer.count_params(transformer.abstract(cfg.model))  # all but proj_edit


def test_lora_forward_equals_sat_merge_rule_and_merge_lora():
    cfg = configlib.load("tiny", OVERRIDES)
    model = _lora_model(cfg)
    args = _inputs(cfg)
    out = model(*args)

    # SAT layout: base weights under `.original`, matrix_A.j (r, in), matrix_B.j (out_part, r); convert's
    # merge (SAT lora2's rule) folds them, and that model must compute what the adapters compute.
    flat = {k: v for k, v in flat_params(model).items() if "lora" not in k}
    sd = sat_keys.transformer_to_sat(flat, cfg.model)
    qa, qb = np.asarray(model.blocks.attn.qkv_lora.lora_a[...]), np.asarray(model.blocks.attn.qkv_lora.lora_b[...])
    oa, ob = np.asarray(model.blocks.attn.out_lora.lora_a[...]), np.asarray(model.blocks.attn.out_lora.lora_b[...])
    for i in range(cfg.model.num_layers):
        for base in (f"transformer.layers.{i}.attention.query_key_value", f"transformer.layers.{i}.attention.dense"):
            for kind in ("weight", "bias"):
                sd[f"{base}.original.{kind}"] = sd.pop(f"{base}.{kind}")
        qkv = f"transformer.layers.{i}.attention.query_key_value"
        for j in range(3):
            sd[f"{qkv}.matrix_A.{j}"] = qa[i, j].T
            sd[f"{qkv}.matrix_B.{j}"] = qb[i, j].reshape(RANK, -1).T
        dense = f"transformer.layers.{i}.attention.dense"
        sd[f"{dense}.matrix_A.0"] = oa[i].reshape(-1, RANK).T
        sd[f"{dense}.matrix_B.0"] = ob[i].T
    reference = transformer.build(cfg.model)
    set_flat_params(reference, sat_keys.transformer_from_sat(sat_keys.merge_lora(sd, alpha=1.0), cfg.model))
    want = reference(*args)
    assert _rel(out, want) < FORWARD_TOL
    assert _rel(out, transformer.build(cfg.model, seed=cfg.train.seed)(*args)) > 1e-3  # the adapters matter

    merged = loralib.merge_lora(model)
    assert not any("lora" in k for k in flat_params(merged))
    assert _rel(merged(*args), want) < FORWARD_TOL
    assert model.blocks.attn.qkv_lora is not None  # the original keeps its adapters


def test_lora_run_updates_adapters_and_proj_edit_only(tmp_path):
    base_cfg = configlib.load("tiny", OVERRIDES[:3])
    pretrained = transformer.build(base_cfg.model, seed=7)
    save_transformer(pretrained, base_cfg.model, tmp_path / "pretrained")
    cfg = configlib.load("tiny", OVERRIDES + [f"train.init_from={tmp_path / 'pretrained'}", "train.grad_accum=2",
                                              "train.ema_decay=0.5", "train.warmup_steps=0",
                                              "train.schedule=constant"])
    mesh = meshlib.create_mesh(cfg.mesh)
    optimizer = steplib.make_optimizer(cfg)
    train_state = TrainState.init(cfg, mesh, optimizer, load_training_models(cfg))
    _graphdef, state, frozen = train_state.graphdef, train_state.variables, train_state.frozen
    want = flat_params(pretrained)
    frozen_flat = {".".join(k.key for k in path): v for path, v in jax.tree_util.tree_flatten_with_path(frozen)[0]}
    assert "blocks.ff.w1.kernel" in frozen_flat and "patch_embed.proj_edit.kernel" not in frozen_flat
    for name, value in frozen_flat.items():
        np.testing.assert_array_equal(np.asarray(value), want[name])
    np.testing.assert_array_equal(state["params"]["patch_embed"]["proj_edit"]["kernel"],
                                  want["patch_embed.proj_edit.kernel"])
    trainable_size = sum(x.size for x in jax.tree.leaves(state["params"]))
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    assert moments == 3 * trainable_size  # accumulator + Adam mu, nu of the trainable weights only

    step_fn = steplib.make_train_step(cfg, train_state, optimizer, mesh)
    data = SyntheticTriplets(cfg.data.batch_size, configlib.latent_shape(cfg), cfg.model.text_length,
                             cfg.model.text_embed_dim)
    shardings = steplib.batch_shardings(cfg, mesh)
    host = lambda s: jax.tree.map(np.asarray, jax.device_get(s))
    start = host(state)
    state, metrics = step_fn(state, frozen, steplib.put_batch(data.batch(0), shardings), 0)
    first = host(state)
    for a, b in zip(jax.tree.leaves(first["params"]) + jax.tree.leaves(first["ema"]),
                    jax.tree.leaves(start["params"]) + jax.tree.leaves(start["ema"])):
        np.testing.assert_array_equal(a, b)  # the first of two accumulated steps applies nothing
    state, metrics = step_fn(state, frozen, steplib.put_batch(data.batch(1), shardings), 1)
    second = host(state)
    assert float(metrics["lr"]) == np.float32(cfg.train.lr)
    p, p0, e = second["params"], start["params"], second["ema"]
    assert np.abs(p["blocks"]["attn"]["qkv_lora"]["lora_b"]).max() > 0  # B leaves zero: the adapters learn
    assert np.abs(p["patch_embed"]["proj_edit"]["kernel"] - p0["patch_embed"]["proj_edit"]["kernel"]).max() > 0
    np.testing.assert_allclose(e["patch_embed"]["proj_edit"]["kernel"],
                               0.5 * p0["patch_embed"]["proj_edit"]["kernel"] + 0.5 * p["patch_embed"]["proj_edit"]["kernel"],
                               rtol=1e-6, atol=1e-7)


def test_trained_lora_run_exports_merged_weights_and_ema(tmp_path):
    import orbax.checkpoint as ocp

    from insvie_jax.convert.api import load_transformer
    from insvie_jax.train.export import export_model

    cfg = configlib.load("tiny", OVERRIDES + [f"train.run_dir={tmp_path / 'run'}", "train.steps=4", "train.lr=1e-2",
                                              "train.warmup_steps=0", "train.ema_decay=0.5", "train.log_every=10"])
    loop.run(cfg)
    exported, _ = load_transformer(export_model(tmp_path / "run", tmp_path / "plain"))
    ema, _ = load_transformer(export_model(tmp_path / "run", tmp_path / "ema", use_ema=True))

    # The adapters as trained, applied at run time (not merged), from the checkpoint's own arrays.
    items = ocp.CheckpointManager(tmp_path / "run" / "checkpoints").restore(
        4, args=ocp.args.Composite(state=ocp.args.StandardRestore(), frozen=ocp.args.StandardRestore()))
    graphdef, _, _ = statelib.split_model(statelib.trained_model(cfg), cfg)
    trained = nnx.merge(graphdef, items["state"]["params"], items["frozen"])
    assert np.abs(np.asarray(trained.blocks.attn.qkv_lora.lora_b[...])).max() > 0
    args = _inputs(cfg)
    want = trained(*args)
    assert _rel(exported(*args), want) < FORWARD_TOL
    assert _rel(ema(*args), want) > 1e-6  # the EMA lags the trained weights
