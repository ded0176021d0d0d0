"""Wan transformer conversion: a diffusers folder (single and sharded) loads without torch into a model equal to
diffusers'; our export loads in `WanTransformer3DModel.from_pretrained` with identical tensors; a text-to-video
(48 → C-channel) checkpoint becomes the edit model that reproduces the T2V model and ignores the source."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax.convert import wan_keys  # noqa: E402
from insvie_jax.models.params import flat_params  # noqa: E402
from insvie_jax.models.wan import transformer as wan  # noqa: E402
from insvie_jax.models.wan.config import WanModelConfig  # noqa: E402
from _compare import rel  # noqa: E402
from test_wan_transformer import FORWARD_TOL, TINY, inputs, ref_forward, reference  # noqa: E402

T = np.array([999.0, 37.5], np.float32)


def from_pretrained(path, monkeypatch):
    """`WanTransformer3DModel.from_pretrained`. Its fp32-kept modules (which only matter when loading in 16 bits)
    demand `accelerate`, which this environment lacks: they are switched off for an fp32 load."""
    monkeypatch.setattr(diffusers.WanTransformer3DModel, "_keep_in_fp32_modules", None)
    return diffusers.WanTransformer3DModel.from_pretrained(path).eval()


def test_load_from_sharded_diffusers_folder_and_save_round_trip(tmp_path, monkeypatch):
    ref = reference(TINY, seed=31)
    ref.save_pretrained(tmp_path / "ref", max_shard_size="40KB")
    assert (tmp_path / "ref" / (wan_keys.WEIGHTS + ".index.json")).is_file()
    model, cfg = wan_keys.load_wan_transformer(tmp_path / "ref", dtype="float32")
    assert (cfg.in_channels, cfg.num_layers, cfg.ffn_dim, cfg.text_embed_dim) == (5, 2, 72, 20)
    noisy, source, text = inputs(cfg, 3, 10, 14, seed=32)
    with torch.no_grad():
        want = ref_forward(ref, noisy, source, text, T).numpy()
    assert rel(model(noisy, source, text, T), want) <= FORWARD_TOL

    out = wan_keys.save_wan_transformer(model, cfg, tmp_path / "export")
    back = from_pretrained(out, monkeypatch)
    ref_sd, back_sd = ref.state_dict(), back.state_dict()
    assert set(ref_sd) == set(back_sd)
    for key in ref_sd:
        np.testing.assert_array_equal(back_sd[key].numpy(), ref_sd[key].numpy(), err_msg=key)
    assert json.loads((out / "config.json").read_text())["in_channels"] == 10


def test_pipeline_folder_layout(tmp_path):
    ref = reference(TINY, seed=33)
    ref.save_pretrained(tmp_path / "pipe" / "transformer")
    flat, _ = wan_keys.read_diffusers(tmp_path / "pipe")
    np.testing.assert_array_equal(flat["blocks.ffn.w1.kernel"][1],
                                  ref.blocks[1].ffn.net[0].proj.weight.detach().numpy().T)


def test_text_to_video_checkpoint_initialises_the_edit_model(tmp_path):
    """InsViE's rule on a C-channel (T2V/TI2V) checkpoint: first C input channels copied, source half zero."""
    kwargs = {k: v for k, v in wan_keys.diffusers_config(TINY).items() if not k.startswith("_")}
    torch.manual_seed(34)
    t2v = diffusers.WanTransformer3DModel(**{**kwargs, "in_channels": TINY.in_channels}).eval()
    t2v.save_pretrained(tmp_path / "t2v")
    model, cfg = wan_keys.load_wan_transformer(tmp_path / "t2v", dtype="float32")
    assert cfg.in_channels == TINY.in_channels
    kernel = flat_params(model)["patch_embedding.kernel"]  # (pt, ph, pw, 2C, D)
    assert kernel.shape[3] == 2 * TINY.in_channels and not kernel[:, :, :, TINY.in_channels:].any()

    noisy, source, text = inputs(cfg, 3, 10, 14, seed=35)
    with torch.no_grad():
        x = torch.from_numpy(noisy).permute(0, 4, 1, 2, 3)
        want = t2v(x, torch.from_numpy(T), torch.from_numpy(text), return_dict=False)[0].permute(0, 2, 3, 4, 1)
    got = np.asarray(model(noisy, source, text, T))
    assert rel(got, want.numpy()) <= FORWARD_TOL
    np.testing.assert_array_equal(got, np.asarray(model(noisy, 3 * source, text, T)))

    # the same rule on a built model (transformer.init_edit_from_t2v, ours (pt, ph, pw, C, D) layout)
    fresh = wan.build(cfg)
    sd = t2v.state_dict()
    wan.init_edit_from_t2v(fresh, sd["patch_embedding.weight"].numpy().transpose(2, 3, 4, 1, 0),
                           sd["patch_embedding.bias"].numpy())
    np.testing.assert_array_equal(flat_params(fresh)["patch_embedding.kernel"], kernel)


def test_unsupported_and_mismatched_folders_are_named(tmp_path):
    with pytest.raises(ValueError, match="image_dim"):
        wan_keys.config_from_diffusers({**wan_keys.diffusers_config(TINY), "image_dim": 1280})
    ref = reference(TINY, seed=36)
    ref.save_pretrained(tmp_path / "ref")
    config = json.loads((tmp_path / "ref" / "config.json").read_text())
    (tmp_path / "ref" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ValueError, match="missing"):
        wan_keys.read_diffusers(tmp_path / "ref")


def test_full_size_config_round_trips():
    cfg = WanModelConfig()
    back, is_edit = wan_keys.config_from_diffusers(wan_keys.diffusers_config(cfg))
    assert back == cfg and is_edit


def test_convert_command_round_trips_a_wan_checkpoint(tmp_path, capsys):
    """`insvie-jax convert` detects a Wan transformer through the codec registry: diffusers -> native -> diffusers
    gives diffusers' own tensors back, bit for bit."""
    from safetensors.numpy import load_file

    from insvie_jax import cli

    ref = reference(TINY, seed=35)
    ref.save_pretrained(tmp_path / "ref")
    assert cli.main(["convert", str(tmp_path / "ref"), str(tmp_path / "native")]) == 0
    assert "(wan, native, fp32)" in capsys.readouterr().out
    assert cli.main(["convert", str(tmp_path / "native"), str(tmp_path / "back"), "--to", "diffusers"]) == 0
    want, got = load_file(tmp_path / "ref" / wan_keys.WEIGHTS), load_file(tmp_path / "back" / wan_keys.WEIGHTS)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
