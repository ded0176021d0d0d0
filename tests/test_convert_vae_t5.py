"""VAE and T5 checkpoint conversion, both ways, exact: diffusers/SAT/Hugging Face -> native -> back gives every
tensor bit for bit under the same names; diffusers and transformers load our exports and compute what we do.

Tolerances: diffusers' encode mean and decode on our VAE export, and transformers' T5 output on our T5 export,
each ≤1e-5 relative error ‖a−b‖/‖b‖ against our model (fp32, CPU). Round trips are exact (array_equal).
"""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from insvie_jax import cli  # noqa: E402
from insvie_jax.config import TextEncoderConfig, VAEConfig  # noqa: E402
from insvie_jax.config import load as load_config  # noqa: E402
from insvie_jax.convert import api, registry, t5_keys, vae_keys  # noqa: E402
from insvie_jax.models import t5  # noqa: E402
from insvie_jax.models import transformer as tr  # noqa: E402
from insvie_jax.models.params import flat_params, param_shapes, set_flat_params  # noqa: E402
from _compare import rel  # noqa: E402

FP32_TOL = 1e-5

VAE_CFG = VAEConfig(block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, dtype="float32",
                    tile_sample_height=32, tile_sample_width=48, encode_frame_batch=0, decode_frame_batch=0)
T5_HF = {"vocab_size": 100, "d_model": 32, "d_kv": 8, "num_heads": 4, "num_layers": 2, "d_ff": 48,
         "feed_forward_proj": "gated-gelu", "relative_attention_num_buckets": 8, "relative_attention_max_distance": 20,
         "dropout_rate": 0.0}
T5_CFG = TextEncoderConfig(**{k: T5_HF[k] for k in ("vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff",
                                                     "relative_attention_num_buckets",
                                                     "relative_attention_max_distance")}, dtype="float32")
TOKENIZER = {"spiece.model": b"\x00\x01sentencepiece bytes", "tokenizer_config.json": b'{"model_max_length": 226}'}


def assert_same_tensors(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def torch_numpy(sd: dict) -> dict:
    return {k: v.detach().float().numpy() for k, v in sd.items()}


def random_flat(shapes: dict, seed: int) -> dict[str, np.ndarray]:
    """Random parameters with norm scales near 1 and nonzero biases, so that every tensor is tested."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, shape in shapes.items():
        scale = 0.3 / np.sqrt(np.prod(shape[:-1])) if name.endswith("kernel") and len(shape) > 1 else 0.1
        flat[name] = (rng.standard_normal(shape) * scale + name.endswith("scale")).astype(np.float32)
    return flat


# ---------------------------------------------------------------------------------------------------
# VAE


@pytest.fixture(scope="module")
def vae_dirs(tmp_path_factory):
    """A diffusers VAE (random weights, every 1-D tensor perturbed) saved as a diffusers folder and a SAT file."""
    root = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    kwargs = {k: v for k, v in vae_keys.diffusers_vae_config(VAE_CFG).items() if not k.startswith("_")}
    ref = diffusers.AutoencoderKLCogVideoX(**kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    ref.save_pretrained(root / "diffusers")
    sat = vae_keys.diffusers_to_sat({k: v.clone() for k, v in ref.state_dict().items()})
    torch.save({"state_dict": {**sat, "loss.logvar": torch.zeros(())}}, root / "3d-vae.pt")
    return root


def test_vae_diffusers_native_diffusers_is_bit_exact(vae_dirs, tmp_path):
    native = registry.convert_main(str(vae_dirs / "diffusers"), str(tmp_path / "native"), to="native")
    back = registry.convert_main(str(native), str(tmp_path / "back"), to="diffusers")
    source = vae_dirs / "diffusers"
    assert_same_tensors(load_file(back / vae_keys.WEIGHTS), load_file(source / vae_keys.WEIGHTS))
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (back, source))
    shared = (set(ours) & set(theirs)) - {"_diffusers_version"}
    assert {"block_out_channels", "latent_channels", "scaling_factor", "sample_height", "norm_eps"} <= shared
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}


def test_vae_sat_native_sat_is_bit_exact(vae_dirs, tmp_path):
    tiny = load_config("tiny")  # a SAT file does not tell its norm groups: the tiny preset's VAE section does
    assert tiny.vae.norm_num_groups == VAE_CFG.norm_num_groups
    native = registry.convert_main(str(vae_dirs / "3d-vae.pt"), str(tmp_path / "native"), to="native", config=tiny)
    back = registry.convert_main(str(native), str(tmp_path / "back.pt"), to="sat")
    want = torch.load(vae_dirs / "3d-vae.pt", weights_only=True)["state_dict"]
    got = torch.load(back, weights_only=True)["state_dict"]
    want.pop("loss.logvar")  # SAT training leftovers are not part of the VAE
    assert_same_tensors({k: v.numpy() for k, v in got.items()}, {k: v.numpy() for k, v in want.items()})
    folder = registry.convert_main(str(native), str(tmp_path / "sat_dir"), to="sat")  # a folder holds 3d-vae.pt
    assert (folder / vae_keys.SAT_FILE).is_file() and registry.detect_model(folder) == "vae"


@functools.partial(jax.jit, static_argnums=0, compiler_options={"xla_backend_optimization_level": 0})
def _encode_decode(graphdef, state, video):
    vae = nnx.merge(graphdef, state)
    mean = vae.encode(video).mean
    return mean, vae.decode(mean)


def test_diffusers_loads_our_vae_export(tmp_path):
    flat = random_flat(vae_keys.vae_shapes(VAE_CFG), seed=1)
    model = vae_keys.vae_with_params(VAE_CFG, flat)
    path = vae_keys.save_vae(model, VAE_CFG, tmp_path / "vae", format="diffusers")
    ref, info = diffusers.AutoencoderKLCogVideoX.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    video = np.random.default_rng(2).uniform(-1, 1, (1, 5, 16, 24, 3)).astype(np.float32)
    mean, decoded = _encode_decode(*nnx.split(model), video)
    with torch.no_grad():
        want_mean = ref.eval().encode(torch.from_numpy(video.transpose(0, 4, 1, 2, 3))).latent_dist.mean
        want_decoded = ref.decode(want_mean).sample
    assert mean.shape == (1, 2, 2, 3, 16)
    assert rel(mean, want_mean.numpy().transpose(0, 2, 3, 4, 1)) <= FP32_TOL
    assert rel(decoded, want_decoded.numpy().transpose(0, 2, 3, 4, 1)) <= FP32_TOL
    loaded, config = vae_keys.load_vae(path, VAE_CFG)  # and our own loader reads the export
    assert config["scaling_factor"] == VAE_CFG.scaling_factor
    assert_same_tensors(flat_params(loaded), flat)


@pytest.mark.parametrize("fmt", ["native", "sat", "diffusers"])
def test_vae_bf16_export_round_trip(fmt, tmp_path):
    flat = random_flat(vae_keys.vae_shapes(VAE_CFG), seed=3)
    path = vae_keys.write_vae(flat, VAE_CFG, tmp_path / ("vae.pt" if fmt == "sat" else "vae"), fmt, dtype="bf16")
    if fmt == "diffusers":
        assert {v.dtype for v in load_file(path / vae_keys.WEIGHTS).values()} == {np.dtype(ml_dtypes.bfloat16)}
    elif fmt == "sat":
        assert {v.dtype for v in torch.load(path, weights_only=True)["state_dict"].values()} == {torch.bfloat16}
    back, cfg = vae_keys.read_vae(path, VAE_CFG)
    assert cfg == VAE_CFG
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in flat.items()}
    assert_same_tensors({k: np.asarray(v, np.float32) for k, v in back.items()}, rounded)
    assert any(not np.array_equal(rounded[k], flat[k]) for k in flat)  # the rounding is visible


# ---------------------------------------------------------------------------------------------------
# T5


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    """transformers' own save_pretrained folder of a random T5 encoder, with tokenizer files beside it."""
    folder = tmp_path_factory.mktemp("t5") / "hf"
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(transformers.T5Config(**T5_HF)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    ref.save_pretrained(folder)
    for name, data in TOKENIZER.items():
        (folder / name).write_bytes(data)
    return folder


def test_t5_hf_native_hf_is_bit_exact(t5_dir, tmp_path):
    native = registry.convert_main(str(t5_dir), str(tmp_path / "native"), to="native")
    back = registry.convert_main(str(native), str(tmp_path / "back"), to="hf", max_shard_bytes=20_000)
    index = json.loads((back / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    got = {k: v for shard in shards for k, v in load_file(back / shard).items()}
    assert_same_tensors(got, load_file(t5_dir / "model.safetensors"))
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (back, t5_dir))
    inference = {*T5_HF} - {"dropout_rate"}  # what the encoder computes depends on these
    for key in (*inference, "layer_norm_epsilon", "dense_act_fn", "is_gated_act", "model_type", "architectures"):
        assert ours[key] == theirs[key], key
    for folder in (native, back):  # the tokenizer travels with the weights
        assert {n: (folder / n).read_bytes() for n in TOKENIZER} == TOKENIZER


@pytest.fixture(scope="module")
def our_t5():
    model = t5.build(T5_CFG)
    flat = random_flat({k: v.shape for k, v in flat_params(model).items()}, seed=4)
    set_flat_params(model, flat)
    return model, flat


def test_transformers_loads_our_t5_export(our_t5, t5_dir, tmp_path):
    model, flat = our_t5
    path = t5_keys.save_t5(model, T5_CFG, tmp_path / "t5", format="hf", tokenizer_from=t5_dir, max_shard_bytes=20_000)
    assert (path / "model.safetensors.index.json").is_file() and (path / "spiece.model").is_file()
    ref, info = transformers.T5EncoderModel.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    ids = np.random.default_rng(5).integers(2, T5_HF["vocab_size"], (2, 30)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 11:] = 0
    with torch.no_grad():
        want = ref.eval()(input_ids=torch.from_numpy(ids).long(),
                          attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    assert rel(model(ids, mask), want) <= FP32_TOL
    loaded, cfg = t5_keys.load_t5(path, T5_CFG)  # our own loader reads the export back
    assert cfg.num_layers == T5_CFG.num_layers
    assert_same_tensors({k: np.asarray(v) for k, v in flat_params(loaded).items()}, flat)


@pytest.mark.parametrize("fmt", ["native", "hf"])
def test_t5_bf16_export_round_trip(our_t5, tmp_path, fmt):
    model, flat = our_t5
    path = t5_keys.save_t5(model, T5_CFG, tmp_path / "t5", format=fmt, dtype="bf16")
    if fmt == "hf":
        assert {v.dtype for v in load_file(path / "model.safetensors").values()} == {np.dtype(ml_dtypes.bfloat16)}
    rounded = {k: v.astype(ml_dtypes.bfloat16).astype(np.float32) for k, v in flat.items()}
    back, cfg = t5_keys.read_t5(path, T5_CFG)
    assert cfg == dataclasses.replace(T5_CFG, path=str(path))
    assert_same_tensors(back, rounded)
    loaded, _ = t5_keys.load_t5(path, T5_CFG)  # load_t5 reads native too
    assert_same_tensors({k: np.asarray(v) for k, v in flat_params(loaded).items()}, rounded)


# ---------------------------------------------------------------------------------------------------
# The convert command


def test_convert_cli_detects_each_model(vae_dirs, t5_dir, tmp_path, capsys):
    tiny = dataclasses.replace(load_config("tiny").model, num_layers=1)
    zeros = {k: np.zeros(s, np.float32) for k, s in param_shapes(tr.abstract(tiny)).items()}
    transformer = api.write_flat(zeros, tiny, tmp_path / "transformer", "diffusers")
    sources = {"vae": [vae_dirs / "diffusers", vae_dirs / "3d-vae.pt"], "t5": [t5_dir], "transformer": [transformer]}
    for model, paths in sources.items():
        for i, src in enumerate(paths):
            assert registry.detect_model(src) == model, src
            dst = tmp_path / f"{model}{i}"
            assert cli.main(["convert", str(src), str(dst), *(["--config", "tiny"] if model == "vae" else [])]) == 0
            assert f"({model}, native, fp32)" in capsys.readouterr().out
            assert registry.detect_model(dst) == model  # the native folder says what it holds


def test_convert_refuses_a_format_the_model_lacks(vae_dirs, t5_dir, tmp_path, capsys):
    assert cli.main(["convert", str(t5_dir), str(tmp_path / "t5.pt"), "--to", "sat"]) == 2
    assert "a t5 converts to native | hf, not 'sat'" in capsys.readouterr().err
    with pytest.raises(registry.UnsupportedConversion, match=r"a vae converts to native \| sat \| diffusers, not 'hf'"):
        registry.convert_main(str(vae_dirs / "3d-vae.pt"), str(tmp_path / "x"), to="hf")
    with pytest.raises(registry.UnsupportedConversion, match="--sat-config"):
        registry.convert_main(str(vae_dirs / "diffusers"), str(tmp_path / "y"), sat_config="model.yaml")
    assert not (tmp_path / "t5.pt").exists() and not (tmp_path / "x").exists()
