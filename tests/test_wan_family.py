"""`model.family: cogvideox | wan` through config alone: the presets pick each family's model and VAE sections,
incoherent combinations are one line, the objective per family equals diffusers' schedulers, the tiny Wan
preset trains end to end on generated data and edits with its run folder."""

from __future__ import annotations

import json

import diffusers
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from insvie_jax import cli
from insvie_jax import config as configlib
from insvie_jax.config import ConfigError
from insvie_jax.data import records
from insvie_jax.diffusion import objective
from insvie_jax.models import family
from insvie_jax.train import export


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_presets_pick_each_familys_sections_and_survive_a_round_trip(tmp_path):
    wan = configlib.load("wan22-5b-edit")
    assert (type(wan.model), type(wan.vae)) == (configlib.WanModelConfig, configlib.WanVAEConfig)
    assert wan.text_encoder.family == "umt5" and wan.diffusion.objective == "flow"
    # Lucy-Edit's 81 x 704 x 1280 clip: diffusers' LucyEditPipeline makes 21 x 44 x 80 latents of 48 channels
    assert configlib.latent_shape(wan) == (21, 44, 80, 48)
    assert configlib.latent_shape(configlib.load("tiny-wan")) == (3, 4, 6, 12)
    cog = configlib.load("tiny")
    assert (type(cog.model), type(cog.vae), cog.model.family) == (configlib.ModelConfig, configlib.VAEConfig,
                                                                  "cogvideox")
    configlib.save(wan, tmp_path / "config.yaml")  # a run folder's config.yaml loads back the same
    assert configlib.load(tmp_path / "config.yaml") == wan


@pytest.mark.parametrize("preset,override,message", [
    ("tiny-wan", "diffusion.objective=v", "diffusion.objective=v does not fit model.family=wan (Wan is a "
     "rectified-flow model): set diffusion.objective=flow"),
    ("tiny-wan", "sample.sampler=dpmpp_2m_sde", "sample.sampler=dpmpp_2m_sde does not fit model.family=wan (the flow "
     "objective samples with a flow sampler): set sample.sampler=flow_unipc or flow_euler"),
    ("tiny-wan", "text_encoder.family=t5", "text_encoder.family=t5 does not fit model.family=wan (Wan reads UMT5 "
     "states): set text_encoder.family=umt5"),
    ("tiny", "sample.guidance=lucy", "sample.guidance=lucy does not fit model.family=cogvideox (the CogVideoX edit "
     "samples with InsViE's 3-way guidance): set sample.guidance=insvie"),
    ("tiny-wan", "model.in_channels=16", "model.in_channels=16 and model.out_channels=12 must equal vae.z_dim=12"),
    ("tiny-wan", "vae.scaling_factor=1.0", "unknown config key 'vae.scaling_factor'; did you mean 'vae.tiling'? "
     "(model.family=wan: the vae section is WanVAEConfig)"),
    ("tiny-wan", "model.family=sd3", "config key 'model.family' = 'sd3': expected one of cogvideox, wan"),
    ("tiny-wan", "data.height=80", "data.height=80 must be a positive multiple of 32 (VAE factor 16 x patch size 2)"),
])
def test_incoherent_family_settings_are_one_line(preset, override, message):
    with pytest.raises(ConfigError) as err:
        configlib.load(preset, [override])
    assert str(err.value).startswith(message), str(err.value)


def test_family_dispatch_counts_the_real_wan_model():
    wan = configlib.load("wan22-5b-edit").model
    # diffusers' WanTransformer3DModel at this config on the meta device (tests/test_wan_transformer.py)
    assert family.count_params(wan) == 5_000_377_536
    assert type(family.abstract(configlib.load("tiny").model)).__name__ == "EditTransformer"
    assert family.forward_flops(wan, 21, 44, 80) == pytest.approx(290.5e12, rel=1e-3)  # tools/WAN.md's count


def test_objectives_match_diffusers_noising_and_targets():
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((3, 2, 4, 6, 5)).astype(np.float32) for _ in range(2))
    index = np.array([0, 417, 999])

    wan = configlib.load("tiny-wan").diffusion
    noisy, timestep, target = objective.noised(wan, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(index))
    flow_scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=wan.flow_shift)
    t = flow_scheduler.timesteps[index]
    want = torch.cat([flow_scheduler.scale_noise(torch.from_numpy(x0[i:i + 1]), t[i:i + 1],
                                                 torch.from_numpy(noise[i:i + 1])) for i in range(3)]).numpy()
    np.testing.assert_allclose(np.asarray(timestep), t.numpy(), rtol=1e-6)
    assert rel(noisy, want) <= 1e-6
    assert rel(target, noise - x0) <= 1e-7  # diffusers' flow_prediction target (Wan's training loss)

    cog = configlib.load("tiny").diffusion
    noisy, timestep, target = objective.noised(cog, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(index))
    ddim = diffusers.CogVideoXDDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="v_prediction", rescale_betas_zero_snr=True, snr_shift_scale=cog.snr_shift_scale)
    ti = torch.from_numpy(index)
    assert rel(noisy, ddim.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), ti).numpy()) <= 1e-5
    assert rel(target, ddim.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), ti).numpy()) <= 1e-5
    np.testing.assert_array_equal(np.asarray(timestep), index.astype(np.float32))


def test_tiny_wan_trains_on_generated_data_and_edits_with_its_run(tmp_path, capsys, monkeypatch):
    """The whole path through config alone: generated clips encoded by the Wan VAE and UMT5, flow training,
    validation edits decoded, and `insvie-jax edit --checkpoint RUN` with the run's config and weights."""
    run = tmp_path / "run"
    small = ["data.num_frames=1", "data.height=32", "data.width=32"]  # the time is compiling: the VAE, 3 times
    code = cli.main(["train", "tiny-wan", f"train.run_dir={run}", "data.source=arrayrecord", "data.generate=2",
                     "data.batch_size=2", *small, "train.steps=2", "train.sample_every=2", "train.num_val_clips=2",
                     "train.val_sample_steps=1", "checkpoint.every=2", "train.log_every=1", "sample.steps=2"])
    out = capsys.readouterr().out
    assert code == 0, out[-2000:]
    summary = json.loads(out[out.index("{\n"):])
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0 and np.isfinite(summary["last_loss"])
    assert summary["validation"]["val_clips"] == 2
    assert (run / "samples" / "2" / "contact_sheet.png").is_file()
    manifest = records.read_manifest(run / "data")
    assert {tuple(b["latent_shape"]) for b in manifest["buckets"].values()} == {(1, 2, 2, 12)}  # 16x, z_dim 12
    assert tuple(manifest["text_shape"]) == (16, 32)  # UMT5 states, text_encoder.max_length x d_model

    video = sorted((run / "data" / "videos" / "source").glob("*.mp4"))[0]
    code = cli.main(["edit", "--checkpoint", str(run), "--video", str(video), "--instruction", "make the square green",
                     "--out", str(tmp_path / "edits")])
    assert code == 0, capsys.readouterr().err[-2000:]
    meta = json.loads(next((tmp_path / "edits").glob("*/meta.json")).read_text())
    assert (meta["family"], meta["guidance"], meta["sampler"], meta["frames"]) == ("wan", "lucy", "flow_unipc", 1)
    assert meta["checkpoint"] == str(run)

    # the run exported as a diffusers folder: diffusers loads it, and it holds the run's trained weights
    exported = export.export_model(run, tmp_path / "exported")
    # its fp32-kept modules (for 16-bit loads) demand `accelerate`, not installed here: off for this fp32 load
    monkeypatch.setattr(diffusers.WanTransformer3DModel, "_keep_in_fp32_modules", None)
    theirs = diffusers.WanTransformer3DModel.from_pretrained(exported)
    model, _ = export.read_run_model(run)
    assert sum(p.numel() for p in theirs.parameters()) == family.count_params(model.cfg)
    ours = np.asarray(model.proj_out.bias[...]).reshape(-1)
    np.testing.assert_array_equal(theirs.proj_out.bias.detach().numpy(), ours)
