"""The UMT5 encoder equals transformers' UMT5EncoderModel (≤1e-5 relative, fp32 CPU) on a random small config
with odd sizes, read from a Hugging Face folder without torch (single file and sharded), and our export loads
back into transformers with the same numbers."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from insvie_jax.convert import umt5_keys  # noqa: E402
from insvie_jax.models import umt5  # noqa: E402
from _compare import rel  # noqa: E402

TOL = 1e-5
LENGTH = 23


def reference(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.UMT5Config(vocab_size=97, d_model=40, d_kv=12, num_heads=3, num_layers=2, d_ff=56,
                                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    ref = transformers.UMT5EncoderModel(config).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:  # RMS norm weights default to ones: perturb so that they are tested
                p.add_(0.1 * torch.randn_like(p))
    return ref


def inputs(seed: int = 1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 97, (2, LENGTH)).astype(np.int64)
    mask = np.ones((2, LENGTH), np.int64)
    mask[1, 15:] = 0
    ids[1, 15:] = 0
    return ids, mask


def ref_states(ref, ids, mask):
    with torch.no_grad():
        return ref(torch.from_numpy(ids), torch.from_numpy(mask)).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    ref = reference()
    path = tmp_path_factory.mktemp("umt5") / "hf"
    ref.save_pretrained(path)
    return ref, path


def test_every_layer_has_its_own_bias(folder):
    ref, _ = folder
    names = [n for n, _ in ref.named_parameters() if "relative_attention_bias" in n]
    assert len(names) == 2  # unlike T5, where only block 0 has one


@pytest.mark.parametrize("scan", [True, False], ids=["scan", "loop"])
def test_forward_matches_transformers(folder, scan):
    ref, path = folder
    config = umt5.umt5_xxl_config(dtype="float32", scan_layers=scan, max_length=LENGTH)
    model, cfg = umt5_keys.load_umt5(path, config)
    assert (cfg.d_model, cfg.num_layers, cfg.vocab_size, cfg.relative_attention_num_buckets) == (40, 2, 97, 8)
    ids, mask = inputs()
    want = ref_states(ref, ids, mask)
    assert rel(model(ids, mask), want) <= TOL
    # Wan's prompt embeddings: zero past each prompt's tokens
    got = np.asarray(umt5.prompt_states(model, ids, mask))
    assert rel(got[1, :15], want[1, :15]) <= TOL and not got[1, 15:].any()


def test_sharded_folder_and_export_round_trip(folder, tmp_path):
    ref, _ = folder
    sharded = tmp_path / "sharded"
    ref.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    flat, cfg = umt5_keys.read_umt5(sharded, umt5.umt5_xxl_config(dtype="float32"))
    out = umt5_keys.write_umt5(flat, cfg, tmp_path / "export")
    back = transformers.UMT5EncoderModel.from_pretrained(out).eval()
    ids, mask = inputs(2)
    np.testing.assert_array_equal(ref_states(back, ids, mask), ref_states(ref, ids, mask))


def test_t5_folder_is_refused_with_a_clear_message(tmp_path):
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=11, d_model=8, d_kv=4, num_heads=2, num_layers=1, d_ff=8,
                                   feed_forward_proj="gated-gelu")
    transformers.T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    with pytest.raises(ValueError, match="not 'umt5'"):
        umt5_keys.read_umt5(tmp_path / "t5")


def test_full_size_parameter_count_equals_transformers():
    cfg = umt5.umt5_xxl_config()
    ours = umt5.count_params(umt5.abstract(cfg))
    config = transformers.UMT5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv,
                                     num_heads=cfg.num_heads, num_layers=cfg.num_layers, d_ff=cfg.d_ff,
                                     feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        ref = transformers.UMT5EncoderModel(config)
    # transformers counts the tied token table once (shared = encoder.embed_tokens)
    assert ours == sum(p.numel() for p in ref.parameters())
    assert dataclasses.replace(cfg).max_length == 512
