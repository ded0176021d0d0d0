"""The T5 v1.1 encoder equals transformers' T5EncoderModel; the loader reads save_pretrained folders; the
tokenizer gives T5Tokenizer's ids.

Tolerances: fp32 forward ≤1e-5 relative error ‖a−b‖/‖b‖ (with and without an attention mask); bf16
compute against the fp32 reference ≤1e-2.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")

from insvie_jax.config import ConfigError, MeshConfig, TextEncoderConfig  # noqa: E402
from insvie_jax.config import load as load_config  # noqa: E402
from insvie_jax.convert.t5_keys import load_t5, load_tokenizer, t5_from_hf  # noqa: E402
from insvie_jax.models import t5  # noqa: E402
from insvie_jax.models.params import ParamMismatch, set_flat_params  # noqa: E402
from _compare import rel  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 1e-2

HF_CONFIG = dict(
    vocab_size=100, d_model=32, d_kv=8, num_heads=4, num_layers=2, d_ff=48, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
)
LENGTH = 30  # longer than max_distance, so the log-spaced and clamped buckets are used


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(transformers.T5Config(**HF_CONFIG)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "layer_norm" in name:  # ones by default: perturb so that the norm scales are tested
                p.add_(0.2 * torch.randn_like(p))
    return ref


def our_config(**overrides) -> TextEncoderConfig:
    sizes = {k: HF_CONFIG[k] for k in ("vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff",
                                       "relative_attention_num_buckets", "relative_attention_max_distance")}
    return TextEncoderConfig(**{**sizes, "dtype": "float32", **overrides})


def ours_from(ref, cfg: TextEncoderConfig) -> t5.T5Encoder:
    model = t5.build(cfg)
    set_flat_params(model, t5_from_hf({k: v.numpy() for k, v in ref.state_dict().items()}, cfg))
    return model


def inputs(seed: int = 0):
    """Two rows: one full of tokens, one with 11 tokens then padding (id 0), as the tokenizer pads."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, HF_CONFIG["vocab_size"], (2, LENGTH)).astype(np.int32)
    mask = np.ones_like(ids)
    ids[1, 11:], mask[1, 11:] = 0, 0
    return ids, mask


def ref_forward(ref, ids, mask=None):
    with torch.no_grad():
        kwargs = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
        return ref(input_ids=torch.from_numpy(ids).long(), **kwargs).last_hidden_state.numpy()


@pytest.mark.parametrize("length,buckets,distance", [(LENGTH, 8, 20), (226, 32, 128)])
def test_position_buckets_match_transformers(length, buckets, distance):
    position = torch.arange(length)
    want = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        position[None, :] - position[:, None], bidirectional=True, num_buckets=buckets, max_distance=distance
    ).numpy()
    np.testing.assert_array_equal(t5.relative_position_buckets(length, buckets, distance), want)


@pytest.mark.parametrize("use_mask", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_forward_matches_transformers(reference, use_mask, scan):
    model = ours_from(reference, our_config(scan_layers=scan))
    ids, mask = inputs()
    mask = mask if use_mask else None
    want = ref_forward(reference, ids, mask)
    got = np.asarray(model(ids, mask))
    assert got.shape == want.shape == (2, LENGTH, HF_CONFIG["d_model"])
    assert rel(got, want) <= FP32_TOL, rel(got, want)


def test_mask_changes_padded_rows_only(reference):
    """Guards the test above: the mask must matter, and only where there is padding."""
    model = ours_from(reference, our_config())
    ids, mask = inputs()
    masked, unmasked = np.asarray(model(ids, mask)), np.asarray(model(ids))
    np.testing.assert_allclose(masked[0], unmasked[0], rtol=1e-6, atol=1e-6)
    assert rel(masked[1], unmasked[1]) > 1e-2


def test_bf16_forward_close_to_fp32_reference(reference):
    model = ours_from(reference, our_config(dtype="bfloat16"))
    ids, mask = inputs(seed=1)
    for m in (None, mask):
        got = model(ids, m)
        assert got.dtype == jax.numpy.bfloat16
        err = rel(np.asarray(got, np.float32), ref_forward(reference, ids, m))
        assert err <= BF16_TOL, err


@pytest.mark.parametrize("shard_size", [None, "20KB"], ids=["single_file", "sharded"])
def test_load_t5_from_save_pretrained(reference, tmp_path, shard_size):
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    reference.save_pretrained(tmp_path, safe_serialization=True, **kwargs)
    assert (tmp_path / "model.safetensors.index.json").exists() == (shard_size is not None)
    model, cfg = load_t5(tmp_path, TextEncoderConfig(dtype="float32"))
    assert (cfg.num_layers, cfg.d_ff, cfg.relative_attention_max_distance) == (2, 48, 20)
    ids, mask = inputs(seed=2)
    for m in (None, mask):
        err = rel(model(ids, m), ref_forward(reference, ids, m))
        assert err <= FP32_TOL, err


def test_load_t5_bf16_file_onto_mesh(reference, tmp_path):
    """A bf16 checkpoint placed parameter by parameter onto an (fsdp=4, tensor=2) mesh by logical names."""
    reference.to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    reference.to(torch.float32)
    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    rules = [r for r in MeshConfig().logical_axis_rules if r[0] in ("embed", "heads", "mlp", "head_dim", "vocab")]
    model, _ = load_t5(tmp_path, TextEncoderConfig(dtype="float32"), mesh=mesh, rules=rules)
    assert model.blocks.ff.wi.kernel[...].sharding.spec == PartitionSpec(None, "fsdp", None, "tensor")
    assert model.embedding[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert model.embedding[...].dtype == np.float32
    ids, _ = inputs(seed=3)
    want = ref_forward(reference.to(torch.bfloat16).to(torch.float32), ids)  # the same bf16-rounded weights
    err = rel(model(ids), want)
    assert err <= FP32_TOL, err


def test_load_t5_names_mismatched_tensors(reference, tmp_path):
    reference.save_pretrained(tmp_path, safe_serialization=True)
    hf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**hf, "num_layers": 3}))
    with pytest.raises(ParamMismatch, match=r"encoder\.block\.2\.layer\.0\.SelfAttention\.q\.weight"):
        load_t5(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**hf, "feed_forward_proj": "relu"}))
    with pytest.raises(ValueError, match="gated-gelu"):
        load_t5(tmp_path)


# ---------------------------------------------------------------------------------------------------
# Tokenizer

WORDS = ("the cat dog red blue video turns into a painting make sky snow winter sunny beach night city "
         "remove add replace car person tree style watercolor anime golden hour mountain river forest "
         "change color hair dress sunset rain fog storm ocean wave flower garden house bridge bird horse "
         "sketch oil pixel cartoon background foreground bright dark green yellow purple orange white").split()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_tokenizer")
    rng = np.random.default_rng(0)
    sentences = [" ".join(rng.choice(WORDS, rng.integers(3, 12))) + rng.choice(["", ".", "!", ","])
                 for _ in range(400)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(folder / "spiece"), vocab_size=80,
        model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    return folder


TEXTS = [
    "Make the sky a golden hour sunset.",
    "",
    "turn   the  car into\ta red anime car!",
    "remove the person, add snow and winter trees " * 6,  # longer than max_length: truncated
    "Ünïcode wörds and 123 digits",
]


def test_tokenize_matches_t5_tokenizer(tokenizer_dir):
    ours = load_tokenizer(tokenizer_dir)
    hf = transformers.T5Tokenizer.from_pretrained(tokenizer_dir)  # converts spiece.model itself
    max_length = 16
    ids, mask = t5.tokenize(ours, TEXTS, max_length=max_length)
    want = hf(TEXTS, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    assert ids.shape == mask.shape == (len(TEXTS), max_length)
    np.testing.assert_array_equal(ids, want["input_ids"])
    np.testing.assert_array_equal(mask, want["attention_mask"])
    assert mask[3].all() and ids[3, -1] == t5.EOS_ID  # truncated text still ends in EOS
    assert ids[1, 0] == t5.EOS_ID and mask[1].sum() == 1


def test_tokenize_default_length_and_errors(tokenizer_dir):
    ids, mask = t5.tokenize(load_tokenizer(tokenizer_dir / "spiece.model"), ["a red car"])
    assert ids.shape == (1, 226) and ids.dtype == np.int32 and 1 < mask.sum() < 226
    with pytest.raises(TypeError, match="list of texts"):
        t5.tokenize(load_tokenizer(tokenizer_dir), "a red car")
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_tokenizer(tokenizer_dir / "missing")


def test_text_encoder_config_refuses_float16():
    assert load_config(None, ["text_encoder.num_layers=2"]).text_encoder.num_layers == 2
    with pytest.raises(ConfigError, match="text_encoder.dtype"):
        load_config(None, ["text_encoder.dtype=float16"])
