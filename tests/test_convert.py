"""Checkpoint conversion of the editing transformer: SAT <-> native <-> diffusers, exact, with clear errors.

The SAT side is checked against the rules of CogVideo's `tools/convert_weight_sat2hf.py` (restated below as
data) and diffusers' own model and position table; forwards compare with diffusers at FORWARD_TOL.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax.config import ModelConfig  # noqa: E402
from insvie_jax.convert import api, registry, sat_keys  # noqa: E402
from insvie_jax.convert.diffusers_keys import diffusers_config, transformer_from_diffusers  # noqa: E402
from insvie_jax.convert.sat import NotACheckpoint  # noqa: E402
from insvie_jax.models import transformer as tr  # noqa: E402
from insvie_jax.models.lora import merge_lora  # noqa: E402
from insvie_jax.models.params import ParamMismatch, flat_params, param_shapes  # noqa: E402
from _compare import rel  # noqa: E402

FORWARD_TOL = 1e-5
MERGE_TOL = 1e-6  # models.lora.merge_lora of the loaded adapters vs the converter's merge
TABLE_TOL = 1e-6  # our exported sin-cos table vs diffusers' (float32 on both sides)
PREFIX = "model.diffusion_model."

CFG = ModelConfig(
    num_layers=2, num_attention_heads=3, attention_head_dim=16, time_embed_dim=24, text_embed_dim=20,
    text_length=7, sample_height=10, sample_width=14, sample_frames=9, positions="sincos",
    dtype="float32", param_dtype="float32",
)

# The SAT yaml's `model.network_config.params` of CFG.
NETWORK_PARAMS = {
    "num_layers": 2, "hidden_size": 48, "num_attention_heads": 3, "time_embed_dim": 24, "patch_size": 2,
    "in_channels": 16, "out_channels": 16, "num_frames": 9, "time_compressed_rate": 4,
    "latent_height": 10, "latent_width": 14,
    "modules": {"pos_embed_config": {"target": "dit_video_concat.Basic3DPositionEmbeddingMixin",
                                     "params": {"text_length": 7, "height_interpolation": 1.875,
                                                "width_interpolation": 1.875}},
                "patch_embed_config": {"params": {"text_hidden_size": 20, "emb_ver": "double_ch"}}},
}

# CogVideo tools/convert_weight_sat2hf.py, TRANSFORMER_KEYS_RENAME_DICT: applied in this order by str.replace.
SAT2HF_RENAMES = [
    ("transformer.final_layernorm", "norm_final"), ("transformer", "transformer_blocks"), ("attention", "attn1"),
    ("mlp", "ff.net"), ("dense_h_to_4h", "0.proj"), ("dense_4h_to_h", "2"), (".layers", ""), ("dense", "to_out.0"),
    ("input_layernorm", "norm1.norm"), ("post_attn1_layernorm", "norm2.norm"),
    ("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
    ("mixins.patch_embed", "patch_embed"), ("mixins.final_layer.norm_final", "norm_out.norm"),
    ("mixins.final_layer.linear", "proj_out"), ("mixins.final_layer.adaLN_modulation.1", "norm_out.linear"),
]


def sat2hf(sat_sd: dict) -> dict:
    """The script's transformer conversion, plus the edit model's custom step (proj_edit -> patch_embed.proj)."""
    sd = {}
    for key, value in sat_sd.items():
        key = key[len(PREFIX):]
        if key.startswith("mixins.pos_embed.") or key.startswith("mixins.patch_embed.proj."):
            continue  # dropped: the table is recomputed, the 16-channel proj is unused
        key = key.replace("mixins.patch_embed.proj_edit", "mixins.patch_embed.proj")
        for old, new in SAT2HF_RENAMES:
            key = key.replace(old, new)
        sd[key] = value
    for key in list(sd):
        kind = key.split(".")[-1]
        if "query_key_value" in key:
            for name, part in zip("qkv", torch.chunk(sd.pop(key), 3, dim=0)):
                sd[key.replace("query_key_value", f"to_{name}")] = part
        elif "query_layernorm_list" in key or "key_layernorm_list" in key:
            layer = key.split(".")[-2]
            sd[f"transformer_blocks.{layer}.attn1.norm_{'q' if 'query' in key else 'k'}.{kind}"] = sd.pop(key)
        elif "adaln_layer.adaLN_modulations" in key:
            layer = key.split(".")[-3]
            chunks = sd.pop(key).chunk(12, dim=0)
            sd[f"transformer_blocks.{layer}.norm1.linear.{kind}"] = torch.cat(chunks[0:3] + chunks[6:9])
            sd[f"transformer_blocks.{layer}.norm2.linear.{kind}"] = torch.cat(chunks[3:6] + chunks[9:12])
    return sd


HF2SAT_GLOBAL = {
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "patch_embed.proj": "mixins.patch_embed.proj_edit", "patch_embed.text_proj": "mixins.patch_embed.text_proj",
    "norm_final": "transformer.final_layernorm", "norm_out.norm": "mixins.final_layer.norm_final",
    "proj_out": "mixins.final_layer.linear", "norm_out.linear": "mixins.final_layer.adaLN_modulation.1",
}
HF2SAT_LAYER = {
    "norm1.norm": "transformer.layers.{i}.input_layernorm",
    "norm2.norm": "transformer.layers.{i}.post_attention_layernorm",
    "attn1.to_out.0": "transformer.layers.{i}.attention.dense",
    "ff.net.0.proj": "transformer.layers.{i}.mlp.dense_h_to_4h", "ff.net.2": "transformer.layers.{i}.mlp.dense_4h_to_h",
    "attn1.norm_q": "mixins.adaln_layer.query_layernorm_list.{i}",
    "attn1.norm_k": "mixins.adaln_layer.key_layernorm_list.{i}",
}


def hf2sat(ref, cfg: ModelConfig, seed: int) -> dict:
    """A SAT engine state dict of a diffusers model: the inverse of `sat2hf` (checked against it by a test)."""
    hf = {k: v.detach().clone() for k, v in ref.state_dict().items() if "pos_embedding" not in k}
    sat = {}
    for kind in ("weight", "bias"):
        for ours, name in HF2SAT_GLOBAL.items():
            sat[f"{PREFIX}{name}.{kind}"] = hf[f"{ours}.{kind}"]
        for i in range(cfg.num_layers):
            pre = f"transformer_blocks.{i}."
            for ours, name in HF2SAT_LAYER.items():
                sat[f"{PREFIX}{name.format(i=i)}.{kind}"] = hf[f"{pre}{ours}.{kind}"]
            sat[f"{PREFIX}transformer.layers.{i}.attention.query_key_value.{kind}"] = torch.cat(
                [hf[f"{pre}attn1.to_{n}.{kind}"] for n in "qkv"])
            n1, n2 = hf[f"{pre}norm1.linear.{kind}"].chunk(6), hf[f"{pre}norm2.linear.{kind}"].chunk(6)
            sat[f"{PREFIX}mixins.adaln_layer.adaLN_modulations.{i}.1.{kind}"] = torch.cat(n1[:3] + n2[:3] + n1[3:] + n2[3:])
    gen = torch.Generator().manual_seed(seed)
    d, c, p = cfg.hidden_size, cfg.in_channels, cfg.patch_size
    sat[PREFIX + "mixins.patch_embed.proj.weight"] = torch.randn(d, c, p, p, generator=gen)  # unused by the model
    sat[PREFIX + "mixins.patch_embed.proj.bias"] = torch.randn(d, generator=gen)
    sat[PREFIX + "mixins.pos_embed.pos_embedding"] = ref.patch_embed.pos_embedding.clone()
    return sat


def reference(cfg: ModelConfig, seed: int):
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    ref = diffusers.CogVideoXTransformer3DModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(0.2 * torch.randn_like(p) + (1.0 if name.endswith("norm.weight") else 0.0))
    return ref


def forwards(ref, model, cfg: ModelConfig, seed: int):
    rng = np.random.default_rng(seed)
    f, h, w = 3, cfg.sample_height, cfg.sample_width
    noisy, source = (rng.standard_normal((2, f, h, w, cfg.in_channels)).astype(np.float32) for _ in range(2))
    text = rng.standard_normal((2, cfg.text_length, cfg.text_embed_dim)).astype(np.float32)
    t = np.array([999.0, 37.0], np.float32)
    with torch.no_grad():
        x = torch.from_numpy(np.concatenate([noisy, source], -1)).permute(0, 1, 4, 2, 3)
        want = ref(x, torch.from_numpy(text), torch.from_numpy(t), return_dict=False)[0].permute(0, 1, 3, 4, 2)
    return np.asarray(model(noisy, source, text, t)), want.numpy()


def save_sat(module: dict, path: Path) -> Path:
    (path / "7").mkdir(parents=True)
    torch.save({"module": module, "iteration": 7}, path / "7" / "mp_rank_00_model_states.pt")
    (path / "latest").write_text("7\n")
    return path


def numpy_sd(sd: dict) -> dict:
    return {k: v.detach().numpy() for k, v in sd.items()}


def sat_module(path: Path) -> dict:
    file = path if path.suffix == ".pt" else path / (path / "latest").read_text().strip() / "mp_rank_00_model_states.pt"
    return torch.load(file, weights_only=True)["module"]


@pytest.fixture(scope="module")
def ref():
    return reference(CFG, seed=1)


@pytest.fixture(scope="module")
def sat_dir(ref, tmp_path_factory):
    return save_sat(hf2sat(ref, CFG, seed=2), tmp_path_factory.mktemp("sat") / "train_edit")


# ---------------------------------------------------------------------------------------------------


def test_test_helper_inverts_the_cogvideo_script_rules(ref):
    hf = {k: v for k, v in ref.state_dict().items() if "pos_embedding" not in k}
    back = sat2hf(hf2sat(ref, CFG, seed=2))
    assert sorted(back) == sorted(hf)
    for key in hf:
        assert torch.equal(back[key], hf[key]), key


def test_sat_from_diffusers_loads_to_the_diffusers_weights_and_forward(ref, sat_dir):
    flat, cfg = api.read_flat(sat_dir)
    # sizes from the tensors; text length, latent grid and interpolation from the stored table
    assert cfg == dataclasses.replace(CFG, dtype=cfg.dtype)
    want = transformer_from_diffusers(numpy_sd({k: v for k, v in ref.state_dict().items()
                                                if "pos_embedding" not in k}), CFG)
    assert sorted(flat) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(flat[key], want[key], err_msg=key)
    model, loaded_cfg = api.load_transformer(sat_dir)
    assert loaded_cfg == cfg and isinstance(model, tr.EditTransformer)
    model = api.model_from_flat(flat, dataclasses.replace(cfg, dtype="float32"))
    got, expected = forwards(ref, model, CFG, seed=3)
    assert rel(got, expected) <= FORWARD_TOL


def test_sat_native_sat_is_bit_exact(sat_dir, tmp_path):
    a = registry.convert_main(str(sat_dir), str(tmp_path / "a_sat"), to="sat")
    native = registry.convert_main(str(a), str(tmp_path / "native"), to="native")
    b = registry.convert_main(str(native), str(tmp_path / "b_sat"), to="sat")
    first, second = sat_module(a), sat_module(b)
    assert sorted(first) == sorted(second)
    for key in first:
        assert first[key].dtype == second[key].dtype == torch.float32
        assert torch.equal(first[key], second[key]), key
    # the weights equal those of the source file; the table is diffusers' table
    source = sat_module(sat_dir)
    for key in source:
        if "pos_embedding" not in key and "patch_embed.proj." not in key:
            assert torch.equal(first[key], source[key]), key
    table = PREFIX + sat_keys.POS_TABLE
    assert first[table].shape == source[table].shape
    assert float((first[table] - source[table]).abs().max()) <= TABLE_TOL
    proj_edit = first[PREFIX + "mixins.patch_embed.proj_edit.weight"]
    assert torch.equal(first[PREFIX + "mixins.patch_embed.proj.weight"], proj_edit[:, :CFG.in_channels])
    assert not list(tmp_path.glob(".*tmp*")), "temporary folders left behind"


def test_diffusers_native_diffusers_is_bit_exact_and_diffusers_loads_it(ref, tmp_path):
    ref.save_pretrained(tmp_path / "hf", max_shard_size="40KB")  # sharded: exercises the index
    native = registry.convert_main(str(tmp_path / "hf"), str(tmp_path / "native"), to="native")
    out = api.write_flat(*api.read_flat(native), tmp_path / "back", "diffusers", max_shard_bytes=50_000)
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    from safetensors.torch import load_file

    def tensors(folder):
        index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
        return {k: v for f in set(index["weight_map"].values()) for k, v in load_file(folder / f).items()}

    original, back = tensors(tmp_path / "hf"), tensors(out)
    assert sorted(original) == sorted(back)
    for key in original:
        assert torch.equal(original[key], back[key]), key
    loaded = diffusers.CogVideoXTransformer3DModel.from_pretrained(out).eval()
    assert loaded.config.in_channels == 2 * CFG.in_channels
    flat, cfg = api.read_flat(out)
    got, want = forwards(loaded, api.model_from_flat(flat, dataclasses.replace(cfg, dtype="float32")), CFG, seed=4)
    assert rel(got, want) <= FORWARD_TOL


def test_bf16_export_keeps_bf16_values(sat_dir, tmp_path):
    flat, cfg = api.read_flat(sat_dir)
    out = api.write_flat(flat, cfg, tmp_path / "ckpt.pt", "sat", dtype="bf16")
    module = sat_module(out)
    assert all(v.dtype == torch.bfloat16 for v in module.values())
    back, back_cfg = api.read_flat(out)  # the bf16 table still reads as the same positions
    assert back_cfg == cfg
    for fmt in ("native", "diffusers"):
        again, _ = api.read_flat(api.write_flat(back, cfg, tmp_path / fmt, fmt, dtype="bf16"))
        for key in flat:
            rounded = flat[key].astype(ml_dtypes.bfloat16)
            np.testing.assert_array_equal(np.asarray(back[key]), rounded, err_msg=key)
            np.testing.assert_array_equal(np.asarray(again[key]), rounded, err_msg=f"{fmt} {key}")


def test_text_to_video_sat_loads_as_the_fresh_edit_model(ref, tmp_path):
    """A checkpoint with only the 16-channel `proj` is initialised as InsViE does: source channels zero."""
    sat = hf2sat(ref, CFG, seed=2)
    for kind in ("weight", "bias"):
        del sat[f"{PREFIX}mixins.patch_embed.proj_edit.{kind}"]
    flat, cfg = api.read_flat(save_sat(sat, tmp_path / "t2v"))
    kernel = flat["patch_embed.proj_edit.kernel"]  # (p, p, 2C, D)
    np.testing.assert_array_equal(kernel[:, :, :CFG.in_channels],
                                  sat[PREFIX + "mixins.patch_embed.proj.weight"].numpy().transpose(2, 3, 1, 0))
    assert not kernel[:, :, CFG.in_channels:].any()
    np.testing.assert_array_equal(flat["patch_embed.proj_edit.bias"], sat[PREFIX + "mixins.patch_embed.proj.bias"])


def lora_sat(ref, rank: int, alpha: float, seed: int) -> tuple[dict, dict]:
    """(SAT lora2 state dict of `ref` with random non-zero adapters, the plain state dict of SAT's merge rule)."""
    sat = hf2sat(ref, CFG, seed=2)
    gen = torch.Generator().manual_seed(seed)
    merged = dict(sat)
    d = CFG.hidden_size
    for i in range(CFG.num_layers):
        for layer, parts in (("query_key_value", 3), ("dense", 1)):
            base = f"{PREFIX}transformer.layers.{i}.attention.{layer}"
            weight = sat.pop(f"{base}.weight")
            sat[f"{base}.original.weight"], sat[f"{base}.original.bias"] = weight, sat.pop(f"{base}.bias")
            deltas = []
            for j in range(parts):
                a, b = torch.randn(rank, d, generator=gen), 0.5 * torch.randn(d, rank, generator=gen)
                sat[f"{base}.matrix_A.{j}"], sat[f"{base}.matrix_B.{j}"] = a, b
                deltas.append(b @ a * (alpha / rank))  # SAT lora2: scaling = lora_alpha / r
            merged[f"{base}.weight"] = weight + torch.cat(deltas)
    return sat, merged


def test_lora_checkpoint_loads_merged(ref, tmp_path):
    sat, merged = lora_sat(ref, rank=4, alpha=1.0, seed=5)
    path = save_sat(sat, tmp_path / "lora")
    with pytest.raises(ValueError, match="merge_lora=True"):
        api.read_flat(path, merge_lora=False)
    flat, cfg = api.read_flat(path)
    merged_ref = reference(CFG, seed=1)
    merged_ref.load_state_dict(sat2hf(merged), strict=False)
    got, want = forwards(merged_ref, api.model_from_flat(flat, dataclasses.replace(cfg, dtype="float32")), CFG, 6)
    assert rel(got, want) <= FORWARD_TOL
    _, without_adapters = forwards(ref, api.model_from_flat(flat, dataclasses.replace(cfg, dtype="float32")), CFG, 6)
    assert rel(without_adapters, want) > 1e-2  # the adapters changed the function


@pytest.mark.parametrize("alpha", [None, 2.0])  # None: no yaml, SAT's default lora_alpha 1
def test_lora_checkpoint_loads_with_adapters_attached(ref, tmp_path, alpha):
    rank = 4
    sat, merged = lora_sat(ref, rank, 1.0 if alpha is None else alpha, seed=5)
    path = save_sat(sat, tmp_path / "lora")
    network = None if alpha is None else {"model": {"network_config": {"params": {
        **NETWORK_PARAMS, "lora_config": {"target": "sat.model.finetune.lora2.LoraMixin",
                                          "params": {"r": rank, "lora_alpha": alpha}}}}}}
    with_adapters, cfg = api.load_transformer(path, network, merge_lora=False, dtype="float32")
    adapters = {k: v for k, v in flat_params(with_adapters).items() if "lora" in k}
    assert sorted(adapters) == [f"blocks.attn.{m}.lora_{ab}" for m in ("out_lora", "qkv_lora") for ab in "ab"]
    assert adapters["blocks.attn.qkv_lora.lora_a"].shape == (CFG.num_layers, 3, CFG.hidden_size, rank)
    assert all(np.abs(v).min() > 0 for v in adapters.values())  # every layer and part got the file's A and B
    merged_load, _ = api.load_transformer(path, network, dtype="float32")

    merged_ref = reference(CFG, seed=1)
    merged_ref.load_state_dict(sat2hf(merged), strict=False)
    got, want = forwards(merged_ref, with_adapters, CFG, seed=6)
    assert rel(got, want) <= FORWARD_TOL
    got_merged, _ = forwards(merged_ref, merged_load, CFG, seed=6)
    assert rel(got, got_merged) <= FORWARD_TOL

    folded, plain = flat_params(merge_lora(with_adapters)), flat_params(merged_load)
    assert sorted(folded) == sorted(plain)
    for key in plain:
        assert rel(folded[key], plain[key]) <= MERGE_TOL, key


def test_lora_rank_disagreeing_with_the_yaml_is_refused(ref, tmp_path):
    path = save_sat(lora_sat(ref, rank=4, alpha=1.0, seed=5)[0], tmp_path / "lora")
    network = {"model": {"network_config": {"params": {**NETWORK_PARAMS, "lora_config": {"params": {"r": 8}}}}}}
    with pytest.raises(ValueError, match="rank 4 but the SAT yaml's lora_config says r=8"):
        api.load_transformer(path, network, merge_lora=False)


def test_sat_yaml_gives_the_config(sat_dir):
    network = {"model": {"network_config": {"params": NETWORK_PARAMS}}}
    _, cfg = api.read_flat(sat_dir, sat_config=network)
    assert cfg == dataclasses.replace(CFG, dtype=cfg.dtype)


@pytest.mark.parametrize("edit", ["missing", "unexpected", "wrong_shape"])
def test_sat_key_errors_name_the_keys(ref, tmp_path, edit):
    sat = hf2sat(ref, CFG, seed=2)
    name = PREFIX + "transformer.layers.1.mlp.dense_4h_to_h.weight"
    if edit == "missing":
        del sat[name]
        match = r"missing \(1\): transformer.layers.1.mlp.dense_4h_to_h.weight"
    elif edit == "unexpected":
        sat[PREFIX + "mixins.extra.weight"] = torch.zeros(3)
        match = r"unexpected \(1\): mixins.extra.weight"
    else:
        sat[name] = torch.zeros(48, 190)
        match = r"transformer.layers.1.mlp.dense_4h_to_h.weight: expected \(48, 192\), found \(48, 190\)"
    with pytest.raises(ParamMismatch, match=match):
        api.read_flat(save_sat(sat, tmp_path / edit))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(NotACheckpoint, match="not a transformer checkpoint"):
        api.read_flat(tmp_path)
    (tmp_path / "junk.pt").write_text("not a pickle")
    with pytest.raises(NotACheckpoint, match="not a readable PyTorch checkpoint"):
        api.read_flat(tmp_path / "junk.pt")
    torch.save({"module": {"first_stage_model.encoder.w": torch.zeros(2)}}, tmp_path / "vae.pt")
    with pytest.raises(ValueError, match="not a SAT diffusion checkpoint"):
        api.read_flat(tmp_path / "vae.pt")


def test_checkpoint_of_another_size_names_the_preset_it_fits(sat_dir, tmp_path):
    # A tiny-preset SAT file read with the 2B yaml (the 5B-vs-2B case, at a size a test can write).
    from insvie_jax.config import load

    tiny = load("tiny").model
    flat = {k: np.zeros(s, np.float32) for k, s in param_shapes(tr.abstract(tiny)).items()}
    path = api.write_flat(flat, tiny, tmp_path / "tiny_sat", "sat")
    two_b = {"model": {"network_config": {"params": {"num_layers": 30, "hidden_size": 1920,
                                                     "num_attention_heads": 30}}}}
    with pytest.raises(ParamMismatch, match=r"(?s)wrong shape.*preset 'tiny'"):
        api.read_flat(path, sat_config=two_b)
    # The 5B shapes against the 2B config, without memory: zero-stride arrays of the 5B shapes.
    five_b = load("cogvideox-5b-edit").model
    big = {k: np.broadcast_to(np.float32(0), s) for k, s in param_shapes(tr.abstract(five_b)).items()}
    with pytest.raises(ParamMismatch, match=r"(?s)expected \(30, 1920, 3, 30, 64\).*preset 'cogvideox-5b-edit'"):
        api.check_flat(big, load("cogvideox-2b-edit").model, "checkpoint")


def test_existing_destination_is_refused(sat_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(FileExistsError):
        registry.convert_main(str(sat_dir), str(tmp_path / "taken"), to="native")
