"""Bad config values found by trying the tools: ranges and allowed values live in the schema (config.py) and
every numeric key is checked when the config loads, with one line naming the key and what it must be."""

import subprocess
import sys

import pytest

from insvie_jax import config as configlib
from insvie_jax.config import ConfigError
from insvie_jax.diffusion import flow, guidance, samplers
from insvie_jax.models import remat


@pytest.mark.parametrize("override, message", [
    ("train.lr=.nan", "'train.lr' = nan: must be a finite number"),
    ("train.lr=.inf", "'train.lr' = inf: must be a finite number"),
    ("train.lr=-1e-4", "'train.lr' = -0.0001: must be > 0"),
    ("train.steps=-1", "'train.steps' = -1: must be >= 0"),
    ("train.warmup_steps=-5", "'train.warmup_steps' = -5: must be >= 0"),
    ("data.batch_size=0", "'data.batch_size' = 0: must be >= 1"),
    ("model.num_layers=0", "'model.num_layers' = 0: must be >= 1"),
    ("model.num_attention_heads=0", "'model.num_attention_heads' = 0: must be >= 1"),
    ("train.ema_decay=1.0", "'train.ema_decay' = 1.0: must be in [0, 1)"),
    ("vae.tile_overlap_width=-0.1", "'vae.tile_overlap_width' = -0.1: must be in [0, 1)"),
])
def test_out_of_range_values_are_refused_naming_key_and_range(override, message):
    with pytest.raises(ConfigError) as err:
        configlib.load("tiny", [override])
    assert str(err.value) == f"config key {message}"


def test_every_float_key_must_be_finite():
    wan = set(configlib.FAMILY_SECTIONS["wan"].values())
    floats = [("tiny-wan" if cls in wan else "tiny", f"{name}.{key}") for name in configlib._field_types(configlib.Config)
              if name != "stages" for cls in configlib.section_classes(name)
              for key, want in configlib._field_types(cls).items() if want is float]
    assert len(floats) > 40 and any(preset == "tiny-wan" for preset, _ in floats)
    for preset, key in floats:
        with pytest.raises(ConfigError, match=f"'{key}' = nan: must be a finite number"):
            configlib.load(preset, [f"{key}=.nan"])


def test_ranges_keep_the_shipped_presets_valid():
    for name in configlib.presets():
        configlib.load(name)


def test_nan_lr_stops_train_before_anything_is_written(env, tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "insvie_jax.cli", "train", "tiny", "train.lr=.nan",
                          f"train.run_dir={run_dir}"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "insvie-jax: config key 'train.lr' = nan: must be a finite number"
    assert not run_dir.exists()


@pytest.mark.parametrize("typo, suggestion", [
    ("train.learning_rate", "train.lr"),
    ("train.iterations", "train.steps"),
    ("data.bs", "data.batch_size"),
    ("model.num_layer", "model.num_layers"),
    ("train.source_dropuot", "train.source_dropout"),
    ("trian.lr", "train"),
])
def test_did_you_mean_matches_word_parts_and_synonyms(typo, suggestion):
    with pytest.raises(ConfigError, match=rf"did you mean '{suggestion}'\?"):
        configlib.load("tiny", [f"{typo}=1"])


def test_allowed_string_values_come_from_the_schema():
    assert samplers.SAMPLERS + flow.FLOW_SAMPLERS == configlib.choices("sample.sampler")
    assert guidance.SCHEDULES == configlib.choices("sample.guidance_schedule")
    assert set(remat.POLICIES) | {"none"} == set(configlib.choices("model.remat_policy"))
    for sampler in samplers.SAMPLERS:  # every allowed value has an implementation
        samplers.make_plan(sampler, 4, configlib.DiffusionConfig())
    for sampler in flow.FLOW_SAMPLERS:
        flow.make_plan(sampler, 4, configlib.DiffusionConfig().flow_shift)
    with pytest.raises(ConfigError, match="'sample.sampler' = 'euler': expected one of dpmpp_2m_sde, cogvideox_dpm, "
                                          "ddim, flow_unipc, flow_euler"):
        configlib.load("tiny", ["sample.sampler=euler"])


def test_presets_are_the_files_in_configs():
    assert configlib.presets() == sorted(p.stem for p in configlib.CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "cogvideox-2b-edit", "cogvideox-5b-edit"} <= set(configlib.presets())
