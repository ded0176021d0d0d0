"""SAT config inference: the ModelConfig of a SAT checkpoint, which stores no sizes. Read off the tensor shapes,
the stored sin-cos position table (text length, latent grid, interpolation scales), or the SAT yaml.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from insvie_jax.config import ModelConfig
from insvie_jax.convert.sat import ConvertError
from insvie_jax.models import embeddings

PREFIX = "model.diffusion_model."
POS_TABLE = "mixins.pos_embed.pos_embedding"


class SatFormatError(ConvertError):
    """A SAT state dict that cannot be read as the editing transformer; the message says why."""


def table_shape(cfg: ModelConfig) -> tuple[int, int, int]:
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression + 1
    tokens = frames * (cfg.sample_height // cfg.patch_size) * (cfg.sample_width // cfg.patch_size)
    return (1, cfg.text_length + tokens, cfg.hidden_size)


def sincos_table(cfg: ModelConfig) -> np.ndarray:
    """SAT's stored position table [1, text + frames*h*w, D]: zero text rows, then our 3D sin-cos."""
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression + 1
    video = np.asarray(embeddings.sincos_3d(
        cfg.hidden_size, frames, cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size,
        cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale), np.float32)
    return np.concatenate([np.zeros((cfg.text_length, cfg.hidden_size), np.float32), video])[None]


def _shape(shapes: dict, key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise SatFormatError(f"SAT checkpoint lacks '{PREFIX}{key}', needed to read the model size")
    return tuple(shapes[key])


def shape_config(shapes: dict[str, tuple], base: ModelConfig | None = None) -> ModelConfig:
    """The sizes that the tensor shapes determine; the rest from `base` (default: the CogVideoX-2B values)."""
    base = base or ModelConfig()
    num_layers = sum(1 for k in shapes if re.fullmatch(r"transformer\.layers\.\d+\.input_layernorm\.weight", k))
    (hidden,) = _shape(shapes, "transformer.final_layernorm.weight")
    (head_dim,) = _shape(shapes, "mixins.adaln_layer.query_layernorm_list.0.weight")
    if "mixins.patch_embed.proj_edit_merge.weight" in shapes:
        raise SatFormatError("this is a `fix_proj` SAT checkpoint (proj_edit_merge); only `double_ch` converts")
    d, in_ch, p, _ = _shape(shapes, "mixins.patch_embed.proj_edit.weight")
    out_rows, _ = _shape(shapes, "mixins.final_layer.linear.weight")
    _, text_dim = _shape(shapes, "mixins.patch_embed.text_proj.weight")
    time_dim, _ = _shape(shapes, "time_embed.0.weight")
    mlp_rows, _ = _shape(shapes, "transformer.layers.0.mlp.dense_h_to_4h.weight")
    out_channels = out_rows // (p * p)
    if hidden % head_dim or d != hidden:
        raise SatFormatError(f"inconsistent sizes: hidden {hidden}, QK-norm size {head_dim}, proj_edit {(d, in_ch, p, p)}")
    return dataclasses.replace(
        base, num_layers=num_layers, num_attention_heads=hidden // head_dim, attention_head_dim=head_dim,
        # a text-to-video patch projection has one stream of channels, the edit one two
        in_channels=in_ch if in_ch == out_channels else in_ch // 2, out_channels=out_channels, patch_size=p,
        time_embed_dim=time_dim, text_embed_dim=text_dim, mlp_ratio=mlp_rows / hidden,
        positions="sincos" if POS_TABLE in shapes else "rope",
    )


def _angle(row: np.ndarray, half: int) -> float:
    """The position encoded by a 1-D sin-cos block [sin(p w_k) | cos(p w_k)] at its highest frequency w_0 = 1."""
    return float(np.arctan2(row[0], row[half]))


def _runs(rows: np.ndarray) -> int:
    """How many leading rows equal the first."""
    same = np.all(rows == rows[:1], axis=1)
    return int(np.argmin(same)) if not same.all() else len(rows)


def table_config(table: np.ndarray, cfg: ModelConfig, tol: float = 1e-2) -> ModelConfig:
    """Reads text length, latent grid and interpolation scales off a stored SAT sin-cos table [1, L, D].

    Text rows are zero; then frames of grid_h x grid_w tokens whose first D/4 dims (temporal) are constant
    within a frame and whose last 3D/8 (height) are constant along a row. Scales come from the angle of the
    second position and are snapped to the config's value or a round number when the table agrees. `tol`
    admits bf16 storage (2^-8); a wrong scale misses by far more at the far positions.
    """
    table = np.asarray(table, np.float32).reshape(-1, cfg.hidden_size)
    d, p = cfg.hidden_size, cfg.patch_size
    text_length = int(np.argmax(np.any(table != 0, axis=1)))
    video = table[text_length:]
    dt, ds = d // 4, 3 * d // 8
    per_frame = _runs(video[:, :dt])
    grid_w = _runs(video[:per_frame, dt + ds:])
    frames, grid_h = len(video) // per_frame, per_frame // grid_w
    if frames * per_frame != len(video) or grid_h * grid_w != per_frame:
        raise SatFormatError(f"{PREFIX}{POS_TABLE} {table.shape} is not a 3D sin-cos table (text | frames x h x w)")

    def scale(row_pos, half, default):
        if row_pos is None:
            return [default]
        estimate = 1.0 / _angle(row_pos, half)
        return [default, round(estimate, 1), round(estimate, 2), round(estimate, 3), estimate]

    spatial = scale(video[1, dt:dt + ds] if grid_w > 1 else None, ds // 2, cfg.spatial_interpolation_scale)
    temporal = scale(video[per_frame, :dt] if frames > 1 else None, dt // 2, cfg.temporal_interpolation_scale)
    shape = dict(text_length=text_length, sample_height=grid_h * p, sample_width=grid_w * p,
                 sample_frames=(frames - 1) * cfg.temporal_compression + 1)
    best = None
    for s in spatial:
        for t in temporal:
            candidate = dataclasses.replace(cfg, **shape, spatial_interpolation_scale=s,
                                            temporal_interpolation_scale=t)
            err = float(np.abs(sincos_table(candidate) - table).max())
            if err <= tol:
                return candidate
            best = min(best or (err, s, t), (err, s, t))
    raise SatFormatError(
        f"{PREFIX}{POS_TABLE} is not the sin-cos table of any interpolation scale tried (closest: spatial "
        f"{best[1]:.4f}, temporal {best[2]:.4f}, max error {best[0]:.2e}); give the model's yaml with --sat-config"
    )


def yaml_config(network: dict, base: ModelConfig | None = None) -> ModelConfig:
    """ModelConfig from a SAT yaml: the whole file, or its `model.network_config(.params)` mapping."""
    network = network.get("model", network)
    network = network.get("network_config", network)
    params = network.get("params", network)
    modules = params.get("modules", {})
    pos = modules.get("pos_embed_config", {})
    pos_params = pos.get("params", {})
    patch_params = modules.get("patch_embed_config", {}).get("params", {})
    cfg = base or ModelConfig()
    updates: dict = {}
    if "hidden_size" in params and "num_attention_heads" in params:
        updates["attention_head_dim"] = params["hidden_size"] // params["num_attention_heads"]
    for sat_key, ours in (("num_layers", "num_layers"), ("num_attention_heads", "num_attention_heads"),
                          ("patch_size", "patch_size"), ("in_channels", "in_channels"),
                          ("out_channels", "out_channels"), ("time_embed_dim", "time_embed_dim"),
                          ("num_frames", "sample_frames"), ("time_compressed_rate", "temporal_compression"),
                          ("latent_height", "sample_height"), ("latent_width", "sample_width")):
        if sat_key in params:
            updates[ours] = params[sat_key]
    if "text_length" in pos_params:
        updates["text_length"] = pos_params["text_length"]
    if "text_hidden_size" in patch_params:
        updates["text_embed_dim"] = patch_params["text_hidden_size"]
    if patch_params.get("emb_ver", "double_ch") != "double_ch":
        raise SatFormatError(f"SAT yaml emb_ver={patch_params['emb_ver']!r}: only double_ch converts")
    if "target" in pos:
        updates["positions"] = "rope" if "Rotary" in pos["target"] else "sincos"
    scales = {pos_params[k] for k in ("height_interpolation", "width_interpolation") if k in pos_params}
    if len(scales) > 1:
        raise SatFormatError(f"SAT yaml has different height/width interpolation {sorted(scales)}; ours is one scale")
    if scales:
        updates["spatial_interpolation_scale"] = float(scales.pop())
    return dataclasses.replace(cfg, **updates)


def infer_config(sd: dict, network_yaml: dict | None = None) -> ModelConfig:
    """ModelConfig of a (prefix-stripped, LoRA-merged) SAT state dict; the yaml, when given, has the last word."""
    if network_yaml is not None:
        return yaml_config(network_yaml)
    cfg = shape_config({k: tuple(v.shape) for k, v in sd.items()})
    if cfg.positions == "sincos":
        cfg = table_config(sd[POS_TABLE], cfg)
    return cfg

