"""The Wan transformer's config (Wan2.2-TI2V-5B edit model in the Lucy-Edit layout).

Field names follow `ModelConfig` (CogVideoX) where the two mean the same thing, and diffusers'
`WanTransformer3DModel` names otherwise, so that the two can join as `model.family: cogvideox | wan`.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass
class WanModelConfig:
    name: str = "wan22-ti2v-5b-edit"
    num_layers: int = 30
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    in_channels: int = 48  # latent channels of one stream; the edit patch embedding takes 2x this (Lucy-Edit: 96)
    out_channels: int = 48
    patch_size: list = dataclasses.field(default_factory=lambda: [1, 2, 2])  # (frames, height, width)
    text_embed_dim: int = 4096  # UMT5-XXL
    text_length: int = 512
    freq_dim: int = 256  # sinusoidal timestep features
    ffn_dim: int = 14336
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    param_dtype: str = "float32"
    dtype: str = "bfloat16"
    attention: str = "auto"  # as ModelConfig.attention (models/attention.py)
    splash_block_q: int = 512
    splash_block_kv: int = 512
    splash_block_kv_compute: int = 512
    splash_fused_bwd: bool = False
    scan_layers: bool = True
    remat_policy: str = "none"  # "none" | "full" | "attention" | "dots" | "dots_no_batch"

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return self.ffn_dim


# The presets' model sections, until `model.family: wan` joins config.py (then configs/wan22-5b-edit.yaml and
# configs/tiny-wan.yaml). Wan2.2-TI2V-5B in the Lucy-Edit layout, and a tiny one for CI (odd sizes on purpose).
PRESETS = {
    "wan22-5b-edit": WanModelConfig(remat_policy="attention"),
    "tiny-wan": WanModelConfig(name="tiny-wan", num_layers=2, num_attention_heads=2, attention_head_dim=24,
                               in_channels=48, out_channels=48, text_embed_dim=32, text_length=16, freq_dim=32,
                               ffn_dim=96, dtype="float32"),
}
