"""LoRA on the Wan transformer: our adapters, exported in diffusers' and ComfyUI's key layouts, give diffusers'
model our numbers.

peft is not installed here, so diffusers' `load_lora_adapter` cannot run: each exported file is read by
diffusers' own Wan LoRA reader (`LucyEditPipeline.lora_state_dict`, which also converts the ComfyUI layout
to diffusers' names), and its deltas B·A (scale 1: peft's default lora_alpha = r for files without alphas)
are added to the diffusers model's weights in torch, as peft's merge would. Tolerances: forward ≤ FORWARD_TOL
relative error ‖a−b‖/‖b‖ vs diffusers (fp32 CPU); our own merge and our re-load of an export ≤ SELF_TOL.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax.convert import registry, wan_keys, wan_lora_keys  # noqa: E402
from insvie_jax.models import lora as loralib  # noqa: E402
from insvie_jax.models.params import module_from_flat, param_shapes  # noqa: E402
from insvie_jax.models.wan import transformer as wan  # noqa: E402
from _compare import rel  # noqa: E402
from test_wan_transformer import TINY, inputs, ref_forward, reference  # noqa: E402

FORWARD_TOL = 1e-5
SELF_TOL = 1e-6
RANK, ALPHA = 3, 5.0
TARGETS = ["qkv", "attn_out", "ffn"]
ADAPTED = TINY.num_layers * (2 * 4 + 2)  # per layer: q, k, v, out of both attentions, and the two FFN layers
SIZE = (2, 4, 6)  # latent frames, height, width


def ours_from(ref, cfg):
    """Our model holding the diffusers model's weights (built from shapes: no random init to compile)."""
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    return module_from_flat(wan.abstract(cfg), wan_keys.transformer_from_diffusers(sd, cfg))


def with_random_lora(ref, seed: int):
    model = loralib.add_lora(ours_from(ref, TINY), RANK, ALPHA, TARGETS, seed=seed)
    rng = np.random.default_rng(seed)
    for _, value in nnx.to_flat_state(nnx.state(model, loralib.is_lora_param)):
        value[...] = 0.3 * rng.standard_normal(value[...].shape).astype(np.float32)  # B is zero when fresh
    return model


def run_ours(model, x):
    """One compiled forward (XLA's backend optimisations off: compiling dominates on CPU)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args),
                      compiler_options={"xla_backend_optimization_level": 0})
    return np.asarray(forward(state, *x, np.array([700.0, 125.0], np.float32)))


def run_diffusers(ref, x):
    noisy, source, text = x
    with torch.no_grad():
        return ref_forward(ref, noisy, source, text, np.array([700.0, 125.0], np.float32)).numpy()


def diffusers_with_lora(ref_seed: int, lora_sd: dict) -> object:
    """A fresh diffusers model (same weights as `reference(TINY, ref_seed)`) with W += B·A for every adapter."""
    ref = reference(TINY, ref_seed)
    sd = ref.state_dict()
    adapted = 0
    with torch.no_grad():
        for key, a in lora_sd.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removeprefix("transformer.").removesuffix(".lora_A.weight")
            b = lora_sd[key.replace(".lora_A.", ".lora_B.")]
            sd[module + ".weight"] += torch.as_tensor(b) @ torch.as_tensor(a)
            adapted += 1
    ref.load_state_dict(sd)
    assert adapted == ADAPTED and len(lora_sd) == 2 * ADAPTED
    return ref


@pytest.mark.parametrize("layout", wan_lora_keys.LAYOUTS)
def test_exported_lora_gives_diffusers_our_numbers(tmp_path, layout):
    ref = reference(TINY, 41)
    model = with_random_lora(ref, 42)
    x = inputs(TINY, *SIZE, seed=43)
    ours = run_ours(model, x)
    assert rel(ours, run_diffusers(ref, x)) > 1e-2  # the adapters change the output: the comparison counts

    written = wan_lora_keys.save_wan_lora(model, tmp_path)
    name = {"diffusers": wan_lora_keys.WEIGHTS, "comfyui": wan_lora_keys.COMFYUI_WEIGHTS}[layout]
    assert tmp_path / name in written
    keys = load_file(tmp_path / name)
    expected = {"diffusers": "transformer.blocks.1.attn2.to_out.0.lora_B.weight",
                "comfyui": "diffusion_model.blocks.1.cross_attn.o.lora_B.weight"}[layout]
    assert keys[expected].shape == (TINY.hidden_size, RANK)
    lora_sd = diffusers.LucyEditPipeline.lora_state_dict(str(tmp_path), weight_name=name)
    lora_sd = {k: v.float() for k, v in lora_sd.items()}
    assert rel(ours, run_diffusers(diffusers_with_lora(41, lora_sd), x)) <= FORWARD_TOL


def test_merge_and_reload_keep_the_numbers(tmp_path):
    ref = reference(TINY, 44)
    model = with_random_lora(ref, 45)
    x = inputs(TINY, *SIZE, seed=46)
    want = run_ours(model, x)
    merged = loralib.merge_lora(model)
    assert not loralib.wan_adapters(merged) and len(loralib.wan_adapters(model)) == ADAPTED // TINY.num_layers
    assert rel(run_ours(merged, x), want) <= SELF_TOL

    wan_lora_keys.save_wan_lora(model, tmp_path)
    for path in (tmp_path, tmp_path / wan_lora_keys.COMFYUI_WEIGHTS):
        assert rel(run_ours(wan_lora_keys.load_wan_lora(ours_from(ref, TINY), path), x), want) <= SELF_TOL

    # kohya-style names with alphas: lora_down / lora_up, scale alpha / rank
    comfy = load_file(tmp_path / wan_lora_keys.COMFYUI_WEIGHTS)
    kohya = {}
    for key, value in comfy.items():
        if key.endswith(".lora_B.weight"):
            kohya[key.replace(".lora_B.", ".lora_up.")] = value * (RANK / 2.0)
            kohya[key.removesuffix(".lora_B.weight") + ".alpha"] = np.array(2.0, np.float32)
        else:
            kohya[key.replace(".lora_A.", ".lora_down.")] = value
    save_file(kohya, tmp_path / "kohya.safetensors")
    reloaded = wan_lora_keys.load_wan_lora(ours_from(ref, TINY), tmp_path / "kohya.safetensors")
    assert rel(run_ours(reloaded, x), want) <= SELF_TOL

    # `insvie-jax convert` (the codec registry) turns it into a diffusers-layout file, alpha folded into B
    out = registry.convert_main(str(tmp_path / "kohya.safetensors"), str(tmp_path / "converted.safetensors"),
                                to="diffusers")
    assert registry.detect(out).format == "diffusers"
    converted = wan_lora_keys.load_wan_lora(ours_from(ref, TINY), out)
    assert rel(run_ours(converted, x), want) <= SELF_TOL


def test_targets_and_fresh_adapters():
    assert loralib.wan_target_modules(["qkv", "attn_out"]) == [
        (a, p) for a in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out")]
    assert loralib.wan_target_modules(["attn1.qkv", "ffn.w2"]) == [
        ("attn1", "to_q"), ("attn1", "to_k"), ("attn1", "to_v"), ("ffn", "w2")]
    with pytest.raises(ValueError, match="lora.targets"):
        loralib.wan_target_modules(["proj_edit"])

    ref = reference(TINY, 47)
    x = inputs(TINY, *SIZE, seed=48)
    plain = run_ours(ours_from(ref, TINY), x)
    fresh = loralib.add_lora(ours_from(ref, TINY), RANK, ALPHA)  # the config's default targets
    assert len(loralib.wan_adapters(fresh)) == 8
    np.testing.assert_array_equal(run_ours(fresh, x), plain)  # B starts at zero
    trained = nnx.state(fresh, loralib.is_lora_param)
    n = sum(v[...].size for _, v in nnx.to_flat_state(trained))
    d, hd = TINY.hidden_size, TINY.num_attention_heads * TINY.attention_head_dim
    assert n == TINY.num_layers * 2 * 4 * RANK * (d + hd)


def test_adapters_shard_like_their_projections():
    """On a (data, fsdp, tensor) mesh of the 8 simulated devices the adapters take their projection's logical
    axes (A's input on fsdp, B's heads on tensor) and the sharded forward equals one device's (≤ FORWARD_TOL)."""
    from insvie_jax.config import MeshConfig
    from insvie_jax.parallel import mesh as meshlib
    from insvie_jax.parallel.sharding import batch_sharding, logical_rules, state_shardings
    from test_wan_sharding import CFG, inputs as sharding_inputs

    rng = np.random.default_rng(3)
    shapes = param_shapes(wan.abstract(CFG))  # random weights drawn in numpy: no init ops to compile
    flat = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    model = loralib.add_lora(module_from_flat(wan.abstract(CFG), flat), RANK, ALPHA, TARGETS, seed=2)
    for _, value in nnx.to_flat_state(nnx.state(model, loralib.is_lora_param)):
        value[...] = 0.3 * rng.standard_normal(value[...].shape).astype(np.float32)
    batch = sharding_inputs()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    forward = jax.jit(lambda params, batch: nnx.merge(graphdef, nnx.State(params), rest)(*batch))
    want = forward(params.to_pure_dict(), batch)

    mesh_cfg = MeshConfig(ici_data=2, ici_fsdp=2, ici_tensor=2, ici_context=1)
    mesh, rules = meshlib.create_mesh(mesh_cfg), mesh_cfg.logical_axis_rules
    abstract = nnx.eval_shape(lambda: loralib.add_lora(wan.WanEditTransformer(CFG, rngs=nnx.Rngs(0)), RANK, ALPHA,
                                                       TARGETS))
    shardings = state_shardings(nnx.state(abstract, nnx.Param), mesh, rules)
    q_lora = shardings["blocks"]["attn1"]["to_q_lora"]
    assert "fsdp" in jax.tree.leaves(tuple(q_lora["lora_a"].spec))
    assert "tensor" in jax.tree.leaves(tuple(q_lora["lora_b"].spec))
    sharded = jax.device_put(params.to_pure_dict(), shardings)
    batch = tuple(jax.device_put(a, batch_sharding(mesh, rules, a.ndim)) for a in batch)

    @jax.jit
    def run(params, batch):
        with logical_rules(mesh, rules):
            return nnx.merge(graphdef, nnx.State(params), rest)(*batch)

    assert rel(run(sharded, batch), want) <= FORWARD_TOL
