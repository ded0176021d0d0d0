"""The config system: presets load, overrides apply, and bad input gets an error that names the fix."""

import pytest

from insvie_jax import config as configlib
from insvie_jax.config import ConfigError


@pytest.mark.parametrize("preset", ["tiny", "cogvideox-2b-edit", "cogvideox-5b-edit"])
def test_presets_load(preset):
    cfg = configlib.load(preset)
    assert cfg.model.name == preset
    assert (cfg.data.num_frames - 1) % 4 == 0


def test_base_include_and_overrides_win():
    cfg = configlib.load("cogvideox-2b-edit", ["model.num_layers=4", "train.lr=3e-4", "lora.enabled=true"])
    assert cfg.model.num_layers == 4 and cfg.train.lr == pytest.approx(3e-4) and cfg.lora.enabled
    assert cfg.model.dtype == "bfloat16"  # from base.yaml through `base:`
    assert cfg.diffusion.snr_shift_scale == 3.0 and configlib.load("cogvideox-5b-edit").diffusion.snr_shift_scale == 1.0


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'model.num_layer'; did you mean 'model.num_layers'"):
        configlib.load("tiny", ["model.num_layer=4"])
    with pytest.raises(ConfigError, match=r"did you mean 'train'"):
        configlib.load("tiny", ["trian.lr=1"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lr=fast", r"'train.lr': expected float"),
        ("model.num_layers=2.5", r"'model.num_layers': expected int"),
        ("model.scan_layers=3", r"'model.scan_layers': expected bool"),
        ("model.positions=learned", r"'model.positions'.*sincos, rope"),
    ],
)
def test_wrong_type_names_key_and_type(override, message):
    with pytest.raises(ConfigError, match=message):
        configlib.load("tiny", [override])


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.num_frames=48", r"data.num_frames=48 must be 4k\+1 \(e.g. 45 or 49\)"),
        ("data.height=100", r"data.height=100 must be a positive multiple of 16"),
        ("data.width=712", r"data.width=712 must be a positive multiple of 16"),
    ],
)
def test_derived_values_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        configlib.load("cogvideox-2b-edit", [override])


def test_fp16_refused_for_5b_but_allowed_for_2b():
    with pytest.raises(ConfigError, match="bfloat16"):
        configlib.load("cogvideox-5b-edit", ["model.dtype=float16"])
    assert configlib.load("cogvideox-2b-edit", ["model.dtype=float16"]).model.dtype == "float16"


def test_yaml_file_with_base_and_round_trip(tmp_path):
    (tmp_path / "mine.yaml").write_text(f"base: {configlib.CONFIG_DIR / 'tiny.yaml'}\ntrain:\n  steps: 7\n")
    cfg = configlib.load(tmp_path / "mine.yaml")
    assert cfg.train.steps == 7 and cfg.model.name == "tiny"
    configlib.save(cfg, tmp_path / "resolved.yaml")
    assert configlib.load(tmp_path / "resolved.yaml") == cfg


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        configlib.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        configlib.load(tmp_path / "bad.yaml")
