"""The Wan transformer's config (Wan2.2-TI2V-5B edit model in the Lucy-Edit layout).

`WanModelConfig` lives in the config schema (config/schema.py), where `model.family: wan` selects it.
"""

from __future__ import annotations


from insvie_jax.config.schema import WanModelConfig  # the schema's `model` section for `model.family: wan`

__all__ = ["PRESETS", "WanModelConfig"]


# The model sections of configs/wan22-5b-edit.yaml and configs/tiny-wan.yaml (tests build from these without a
# whole config). Wan2.2-TI2V-5B in the Lucy-Edit layout, and a tiny one for CI (odd sizes on purpose).
PRESETS = {
    "wan22-5b-edit": WanModelConfig(remat_policy="attention"),
    "tiny-wan": WanModelConfig(name="tiny-wan", num_layers=2, num_attention_heads=2, attention_head_dim=24,
                               in_channels=48, out_channels=48, text_embed_dim=32, text_length=16, freq_dim=32,
                               ffn_dim=96, dtype="float32"),
}
