"""Edit metrics on synthetic clips with known answers: identical, shifted by a known motion, noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _data_clips import moving_texture

from insvie_jax.eval import metrics


def test_identical_clips_are_perfect():
    source = moving_texture(9, 48, 64, speed=2)
    row = metrics.eval_clip(source, source, source)
    assert row["psnr_source"] == math.inf and row["psnr_target"] == math.inf
    assert row["ssim_source"] == pytest.approx(1.0) and row["ssim_target"] == pytest.approx(1.0)
    assert row["warp_error"] == row["source_warp_error"] < 1e-4


def test_static_clip_has_zero_flow_and_zero_warp_error():
    source = np.repeat(moving_texture(1, 48, 64), 5, axis=0)
    flows = metrics.source_flows(source)
    assert all(np.abs(flow).max() < 1e-3 and trusted.all() for flow, trusted in flows)
    assert metrics.warp_error(source, flows) == 0.0


@pytest.mark.parametrize("speed", [1, 3])
def test_flow_finds_the_known_motion(speed):
    source = moving_texture(6, 48, 64, speed=speed)  # the texture moves `speed` pixels left per frame
    for flow, trusted in metrics.source_flows(source):
        assert trusted.mean() > 0.8
        inner = trusted.copy()
        inner[:, -8:] = False  # the right edge is newly revealed texture
        np.testing.assert_allclose(flow[inner].mean(0), [-speed, 0], atol=0.1)


def test_warp_error_orders_consistent_flickering_and_noise_edits():
    rng = np.random.default_rng(0)
    source = moving_texture(9, 48, 64, speed=2)
    flows = metrics.source_flows(source)
    consistent = 255 - source  # an edit that moves with the source: as consistent as the source
    flicker = np.clip(source.astype(int) + rng.integers(-40, 41, (9, 1, 1, 3)), 0, 255).astype(np.uint8)
    noise = rng.integers(0, 256, source.shape, dtype=np.uint8)
    errors = [metrics.warp_error(v, flows) for v in (source, consistent, flicker, noise)]
    assert errors[0] < 1e-4 and errors[1] < 1e-4
    assert 1e-3 < errors[2] < errors[3]
    assert errors[3] == pytest.approx(1 / 6, rel=0.1)  # two independent uniform values: E(a-b)^2 = 1/6


def test_psnr_of_a_known_error():
    a = np.full((2, 16, 16, 3), 100, np.uint8)
    b = a + np.uint8(5)  # MSE 25 everywhere
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 25))


def test_ssim_equals_scikit_image_settings_of_wang_et_al():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-20, 21, a.shape), 0, 255).astype(np.uint8)
    value = metrics.ssim(a, b)
    assert 0.5 < value < 0.99
    assert metrics.ssim(a, 255 - a) < 0


def test_float_clips_in_model_range_and_batches():
    source = moving_texture(5, 32, 32, speed=1)
    as_float = source.astype(np.float32) / 127.5 - 1
    means = metrics.eval_clips(as_float[None].repeat(2, 0), as_float[None].repeat(2, 0))
    assert means["eval_clips"] == 2 and means["psnr_source"] == math.inf and "psnr_target" not in means
    with pytest.raises(ValueError, match="one shape"):
        metrics.eval_clip(source, source[:3])
