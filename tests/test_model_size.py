"""Full-size 2B and 5B edit models instantiate abstractly; parameter counts equal diffusers' for the same config."""

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from insvie_jax import config as configlib  # noqa: E402
from insvie_jax.convert.diffusers_keys import diffusers_config  # noqa: E402
from insvie_jax.models import transformer  # noqa: E402


def diffusers_count(cfg) -> int:
    kwargs = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):  # shapes only, no memory
        ref = diffusers.CogVideoXTransformer3DModel(**kwargs)
    return sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("preset, approx", [("cogvideox-2b-edit", 1.69e9), ("cogvideox-5b-edit", 5.57e9)])
def test_full_size_parameter_count_matches_diffusers(preset, approx):
    cfg = configlib.load(preset).model
    ours = transformer.count_params(transformer.abstract(cfg))
    assert ours == diffusers_count(cfg)
    assert abs(ours - approx) / approx < 0.01, ours
