"""Non-finite steps are skipped inside the jitted step and counted; too many in a row stop the run."""

import json

import jax
import numpy as np
import pytest

from insvie_jax import config as configlib
from insvie_jax.convert.models import load_training_models
from insvie_jax.data.synthetic import SyntheticTriplets
from insvie_jax.parallel import mesh as meshlib
from insvie_jax.train import loop
from insvie_jax.train import step as steplib
from insvie_jax.train.state import TrainState

OVERRIDES = ["data.num_frames=5", "data.height=32", "data.width=48", "train.warmup_steps=1", "train.ema_decay=0.9"]


def _host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def test_nan_batch_skips_the_update_and_is_counted():
    cfg = configlib.load("tiny", OVERRIDES)
    mesh = meshlib.create_mesh(cfg.mesh)
    optimizer = steplib.make_optimizer(cfg)
    train_state = TrainState.init(cfg, mesh, optimizer, load_training_models(cfg))
    _graphdef, state, frozen = train_state.graphdef, train_state.variables, train_state.frozen
    step_fn = steplib.make_train_step(cfg, train_state, optimizer, mesh)
    data = SyntheticTriplets(cfg.data.batch_size, configlib.latent_shape(cfg), cfg.model.text_length,
                             cfg.model.text_embed_dim)
    shardings = steplib.batch_shardings(cfg, mesh)

    state, _ = step_fn(state, frozen, steplib.put_batch(data.batch(0), shardings), 0)
    before = _host(state)
    poisoned = data.batch(1)
    poisoned["target"][0, 0, 0, 0, 0] = np.nan
    state, metrics = step_fn(state, frozen, steplib.put_batch(poisoned, shardings), 1)
    after = _host(state)
    assert not np.isfinite(float(metrics["loss"]))
    assert int(after["skipped"]) == 1 and int(after["nonfinite_in_a_row"]) == 1
    for key in ("params", "opt_state", "ema"):  # untouched, bit for bit (the Adam count too)
        for got, want in zip(jax.tree.leaves(after[key]), jax.tree.leaves(before[key])):
            np.testing.assert_array_equal(got, want)

    state, metrics = step_fn(state, frozen, steplib.put_batch(data.batch(2), shardings), 2)
    later = _host(state)
    assert np.isfinite(float(metrics["loss"])) and int(metrics["skipped_steps"]) == 1
    assert int(later["nonfinite_in_a_row"]) == 0
    assert np.abs(later["params"]["proj_out"]["kernel"] - after["params"]["proj_out"]["kernel"]).max() > 0


def test_diverged_run_stops_with_a_message_naming_the_step(tmp_path):
    # lr 1e30 blows the weights up after the first update, so every later loss is non-finite.
    cfg = configlib.load("tiny", OVERRIDES + [f"train.run_dir={tmp_path}", "train.steps=30", "train.lr=1e30",
                                              "train.max_nonfinite_in_a_row=4", "train.log_every=100"])
    with pytest.raises(loop.TrainingStopped, match=r"4 steps in a row up to step \d+ .*train\.lr"):
        loop.run(cfg)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    nonfinite = [r for r in records if "loss" in r and not np.isfinite(r["loss"])]
    assert len(nonfinite) >= 4 and nonfinite[-1]["skipped_steps"] >= 4


def test_edit_region_weight_weighs_only_the_cells_the_edit_changes():
    from insvie_jax.diffusion import loss as losslib

    rng = np.random.default_rng(0)
    source = rng.standard_normal((2, 3, 4, 6, 16)).astype(np.float32)
    target = source.copy()
    target[0, 1, 2, 3] += 2.0  # clip 0: one edited cell; clip 1: no edit
    weights = np.asarray(losslib.edit_region_weights(source, target, 3.0))
    expected = np.ones((2, 3, 4, 6, 1), np.float32)
    expected[0, 1, 2, 3] = 4.0
    np.testing.assert_array_equal(weights, expected)
    # An error on the edited cell costs 1 + 3 times as much; one elsewhere as before.
    for cell in [(1, 2, 3), (0, 0, 0)]:
        err = np.zeros_like(source)
        err[:, cell[0], cell[1], cell[2]] = 1.0
        plain = np.asarray(losslib.edit_loss(err, np.zeros_like(err)))
        weighted = np.asarray(losslib.edit_loss(err, np.zeros_like(err), weights=weights))
        np.testing.assert_allclose(weighted, plain * [4.0 if cell == (1, 2, 3) else 1.0, 1.0], rtol=1e-6)
