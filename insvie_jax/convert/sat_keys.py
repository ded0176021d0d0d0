"""Transformer parameters: SAT (SwissArmyTransformer, InsViE's release) state dict <-> our flat params.

Pure numpy; `convert/sat.py` reads and writes the `.pt` files. Names and shapes follow reference §5: keys
carry the prefix `model.diffusion_model.`, q|k|v are fused row-wise in `query_key_value`, and one 12-chunk
adaLN linear per layer holds (shift, scale, gate) x (attention, MLP) for video, then the same six for text.
The mapping goes through diffusers' layout (the renames of CogVideo's `convert_weight_sat2hf.py`) so that
`diffusers_keys` stays the one place that knows our own parameter layout.

SAT checkpoints carry no sizes: `infer_config` reads them from the tensors (and from the stored sin-cos
table, which encodes text length, latent grid and interpolation scales), or from the SAT yaml.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from insvie_jax.config import ModelConfig
from insvie_jax.convert.sat import ConvertError
from insvie_jax.convert.diffusers_keys import transformer_from_diffusers, transformer_to_diffusers
from insvie_jax.models import embeddings

PREFIX = "model.diffusion_model."
POS_TABLE = "mixins.pos_embed.pos_embedding"
T2V_PROJ = "mixins.patch_embed.proj"  # the pretrained 16-channel patch projection, dead in the edit model
# Buffers SAT may store that the model recomputes: RoPE tables (5B) and leftovers of SAT's base model.
_RECOMPUTED = ("mixins.pos_embed.freqs_sin", "mixins.pos_embed.freqs_cos", "transformer.position_embeddings.weight",
               "transformer.word_embeddings.weight")
_LORA = re.compile(r"^(.*)\.(query_key_value|dense)\.(original\.(weight|bias)|matrix_[AB]\.\d+)$")
_LORA_LAYER = re.compile(r"^transformer\.layers\.(\d+)\.attention\.(query_key_value|dense)$")

# SAT name -> diffusers name of tensors whose layout is the same on both sides ({i} = layer index).
_SAME = {
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
    "mixins.patch_embed.proj_edit": "patch_embed.proj",
    "mixins.patch_embed.text_proj": "patch_embed.text_proj",
    "transformer.final_layernorm": "norm_final",
    "mixins.final_layer.norm_final": "norm_out.norm",
    "mixins.final_layer.linear": "proj_out",
    "mixins.final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SAME_PER_LAYER = {
    "transformer.layers.{i}.input_layernorm": "transformer_blocks.{i}.norm1.norm",
    "transformer.layers.{i}.post_attention_layernorm": "transformer_blocks.{i}.norm2.norm",
    "transformer.layers.{i}.attention.dense": "transformer_blocks.{i}.attn1.to_out.0",
    "transformer.layers.{i}.mlp.dense_h_to_4h": "transformer_blocks.{i}.ff.net.0.proj",
    "transformer.layers.{i}.mlp.dense_4h_to_h": "transformer_blocks.{i}.ff.net.2",
    "mixins.adaln_layer.query_layernorm_list.{i}": "transformer_blocks.{i}.attn1.norm_q",
    "mixins.adaln_layer.key_layernorm_list.{i}": "transformer_blocks.{i}.attn1.norm_k",
}
_QKV = "transformer.layers.{i}.attention.query_key_value"
_ADALN = "mixins.adaln_layer.adaLN_modulations.{i}.1"


class SatFormatError(ConvertError):
    """A SAT state dict that cannot be read as the editing transformer; the message says why."""


def strip_prefix(module: dict) -> dict:
    """Keeps the transformer (`model.diffusion_model.*`) of an engine state dict, without the prefix."""
    sd = {k[len(PREFIX):]: v for k, v in module.items() if k.startswith(PREFIX)}
    if not sd:
        sample = ", ".join(sorted(module)[:5]) or "<empty>"
        raise SatFormatError(f"no key starts with '{PREFIX}': not a SAT diffusion checkpoint (keys: {sample})")
    return sd


# ---------------------------------------------------------------------------------------------------
# LoRA (SAT `lora2.LoraMixin`)


def has_lora(sd: dict) -> bool:
    return any(_LORA.match(k) for k in sd)


def split_lora(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """(state dict with the base weights `...original.weight|bias` under their plain names, adapters).

    Adapters: {layer name (`...query_key_value` | `...dense`): [(matrix_A.j (r, in), matrix_B.j (out/parts, r))]}.
    """
    out = {k: v for k, v in sd.items() if not _LORA.match(k)}
    adapters = {}
    for base in sorted({m.group(1) + "." + m.group(2) for k in sd if (m := _LORA.match(k))}):
        for kind in ("weight", "bias"):
            key = f"{base}.original.{kind}"
            if key not in sd:
                raise SatFormatError(f"LoRA layer {base} has adapters but no '{key}'")
            out[f"{base}.{kind}"] = sd[key]
        weight_shape = sd[f"{base}.original.weight"].shape
        parts = 3 if base.endswith("query_key_value") else 1
        rows = weight_shape[0] // parts
        pairs = []
        for j in range(parts):
            a, b = sd.get(f"{base}.matrix_A.{j}"), sd.get(f"{base}.matrix_B.{j}")
            if a is None or b is None:
                raise SatFormatError(f"LoRA layer {base} lacks matrix_A.{j} or matrix_B.{j}")
            if a.shape != (a.shape[0], weight_shape[1]) or b.shape != (rows, a.shape[0]):
                raise SatFormatError(
                    f"LoRA layer {base} part {j}: matrix_A {a.shape} and matrix_B {b.shape} do not fit "
                    f"a base weight {weight_shape} (expected A (r, {weight_shape[1]}), B ({rows}, r))"
                )
            pairs.append((a, b))
        adapters[base] = pairs
    return out, adapters


def merge_lora(sd: dict[str, np.ndarray], alpha: float = 1.0) -> dict[str, np.ndarray]:
    """Folds LoRA adapters into the base weights: W_part += B_j A_j alpha/r for each q|k|v (or dense) part.

    `...query_key_value.original.weight` becomes `...query_key_value.weight` etc.; computed in float32.
    """
    out, adapters = split_lora(sd)
    for base, pairs in adapters.items():
        weight = np.array(out[f"{base}.weight"], np.float32)
        rows = weight.shape[0] // len(pairs)
        for j, (a, b) in enumerate(pairs):
            a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
            weight[j * rows:(j + 1) * rows] += (b @ a) * np.float32(alpha / a.shape[0])
        out[f"{base}.weight"] = weight
    return out


def yaml_lora(network: dict | None) -> tuple[int | None, float]:
    """(r, lora_alpha) of a SAT yaml's `lora_config` (whole file or its network config); lora2's default alpha 1."""
    if network is None:
        return None, 1.0
    network = network.get("model", network)
    network = network.get("network_config", network)
    params = network.get("params", network).get("lora_config", {}).get("params", {})
    return params.get("r"), float(params.get("lora_alpha", 1.0))


def lora_to_flat(adapters: dict[str, list], cfg: ModelConfig) -> tuple[dict[str, np.ndarray], int, tuple[str, ...]]:
    """SAT adapters (from `split_lora`) -> (our stacked `lora_a` / `lora_b` flat params, rank, lora targets).

    Ours (models/lora.py): qkv A (layers, 3, D, r), B (layers, 3, r, heads, head_dim); out A (layers, heads,
    head_dim, r), B (layers, r, D): SAT's A (r, in) and B (out, r) transposed. A layer without adapters (SAT's
    `layer_range`) gets zeros, which add nothing.
    """
    h, hd, d, n = cfg.num_attention_heads, cfg.attention_head_dim, cfg.hidden_size, cfg.num_layers
    ranks = {a.shape[0] for pairs in adapters.values() for a, _ in pairs}
    if len(ranks) != 1:
        raise SatFormatError(f"LoRA adapters of different ranks {sorted(ranks)}: ours need one rank for all layers")
    (r,) = ranks
    kinds = {}
    for base, pairs in adapters.items():
        m = _LORA_LAYER.match(base)
        if m is None or int(m.group(1)) >= n:
            raise SatFormatError(f"LoRA adapters on {base}: only the attention query_key_value and dense of "
                                 f"layers 0..{n - 1} convert")
        kinds.setdefault(m.group(2), {})[int(m.group(1))] = pairs
    flat, targets = {}, []
    if "query_key_value" in kinds:
        a_all, b_all = np.zeros((n, 3, d, r), np.float32), np.zeros((n, 3, r, h, hd), np.float32)
        for i, pairs in kinds["query_key_value"].items():
            for j, (a, b) in enumerate(pairs):
                a_all[i, j], b_all[i, j] = a.T, b.T.reshape(r, h, hd)
        flat |= {"blocks.attn.qkv_lora.lora_a": a_all, "blocks.attn.qkv_lora.lora_b": b_all}
        targets.append("qkv")
    if "dense" in kinds:
        a_all, b_all = np.zeros((n, h, hd, r), np.float32), np.zeros((n, r, d), np.float32)
        for i, [(a, b)] in kinds["dense"].items():
            a_all[i], b_all[i] = a.T.reshape(h, hd, r), b.T
        flat |= {"blocks.attn.out_lora.lora_a": a_all, "blocks.attn.out_lora.lora_b": b_all}
        targets.append("attn_out")
    return flat, r, tuple(targets)


# ---------------------------------------------------------------------------------------------------
# Config from shapes, the stored sin-cos table, or the SAT yaml


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


# ---------------------------------------------------------------------------------------------------
# Names, shapes and the mapping


def sincos_table(cfg: ModelConfig) -> np.ndarray:
    """SAT's stored position table [1, text + frames*h*w, D]: zero text rows, then our 3D sin-cos."""
    frames = (cfg.sample_frames - 1) // cfg.temporal_compression + 1
    video = np.asarray(embeddings.sincos_3d(
        cfg.hidden_size, frames, cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size,
        cfg.spatial_interpolation_scale, cfg.temporal_interpolation_scale), np.float32)
    return np.concatenate([np.zeros((cfg.text_length, cfg.hidden_size), np.float32), video])[None]


def sat_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a SAT checkpoint of this config holds (what `transformer_to_sat` writes)."""
    d, p, c, t = cfg.hidden_size, cfg.patch_size, cfg.in_channels, cfg.time_embed_dim
    shapes = {
        "time_embed.0.weight": (t, d), "time_embed.0.bias": (t,),
        "time_embed.2.weight": (t, t), "time_embed.2.bias": (t,),
        "mixins.patch_embed.proj_edit.weight": (d, 2 * c, p, p), "mixins.patch_embed.proj_edit.bias": (d,),
        f"{T2V_PROJ}.weight": (d, c, p, p), f"{T2V_PROJ}.bias": (d,),
        "mixins.patch_embed.text_proj.weight": (d, cfg.text_embed_dim), "mixins.patch_embed.text_proj.bias": (d,),
        "transformer.final_layernorm.weight": (d,), "transformer.final_layernorm.bias": (d,),
        "mixins.final_layer.norm_final.weight": (d,), "mixins.final_layer.norm_final.bias": (d,),
        "mixins.final_layer.linear.weight": (p * p * cfg.out_channels, d),
        "mixins.final_layer.linear.bias": (p * p * cfg.out_channels,),
        "mixins.final_layer.adaLN_modulation.1.weight": (2 * d, t),
        "mixins.final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    if cfg.positions == "sincos":
        frames = (cfg.sample_frames - 1) // cfg.temporal_compression + 1
        n = frames * (cfg.sample_height // p) * (cfg.sample_width // p)
        shapes[POS_TABLE] = (1, cfg.text_length + n, d)
    per_layer = {
        "transformer.layers.{i}.input_layernorm": ((d,), (d,)),
        "transformer.layers.{i}.post_attention_layernorm": ((d,), (d,)),
        _QKV: ((3 * d, d), (3 * d,)),
        "transformer.layers.{i}.attention.dense": ((d, d), (d,)),
        "transformer.layers.{i}.mlp.dense_h_to_4h": ((cfg.mlp_dim, d), (cfg.mlp_dim,)),
        "transformer.layers.{i}.mlp.dense_4h_to_h": ((d, cfg.mlp_dim), (d,)),
        "mixins.adaln_layer.query_layernorm_list.{i}": ((cfg.attention_head_dim,),) * 2,
        "mixins.adaln_layer.key_layernorm_list.{i}": ((cfg.attention_head_dim,),) * 2,
        _ADALN: ((12 * d, t), (12 * d,)),
    }
    for i in range(cfg.num_layers):
        for name, (w, b) in per_layer.items():
            shapes[name.format(i=i) + ".weight"] = w
            shapes[name.format(i=i) + ".bias"] = b
    return shapes


def loadable_keys(sd: dict) -> dict:
    """The tensors that carry weights: drops what the model recomputes or never uses."""
    return {k: v for k, v in sd.items() if k not in _RECOMPUTED}


def _to_diffusers(sd: dict, cfg: ModelConfig) -> dict:
    out = {}
    for kind in ("weight", "bias"):
        for sat, ours in _SAME.items():
            out[f"{ours}.{kind}"] = sd[f"{sat}.{kind}"]
        for i in range(cfg.num_layers):
            for sat, ours in _SAME_PER_LAYER.items():
                out[f"{ours.format(i=i)}.{kind}"] = sd[f"{sat.format(i=i)}.{kind}"]
            q, k, v = np.split(sd[f"{_QKV.format(i=i)}.{kind}"], 3, axis=0)
            for name, part in zip("qkv", (q, k, v)):
                out[f"transformer_blocks.{i}.attn1.to_{name}.{kind}"] = part
            chunks = np.split(sd[f"{_ADALN.format(i=i)}.{kind}"], 12, axis=0)
            # SAT: video (shift, scale, gate) x (msa, mlp), then text; diffusers' norm1/norm2 each hold
            # (shift, scale, gate, text shift, text scale, text gate) of one branch.
            out[f"transformer_blocks.{i}.norm1.linear.{kind}"] = np.concatenate(chunks[0:3] + chunks[6:9])
            out[f"transformer_blocks.{i}.norm2.linear.{kind}"] = np.concatenate(chunks[3:6] + chunks[9:12])
    return out


def _from_diffusers(dsd: dict, cfg: ModelConfig) -> dict:
    out = {}
    for kind in ("weight", "bias"):
        for sat, ours in _SAME.items():
            out[f"{sat}.{kind}"] = dsd[f"{ours}.{kind}"]
        for i in range(cfg.num_layers):
            for sat, ours in _SAME_PER_LAYER.items():
                out[f"{sat.format(i=i)}.{kind}"] = dsd[f"{ours.format(i=i)}.{kind}"]
            out[f"{_QKV.format(i=i)}.{kind}"] = np.concatenate(
                [dsd[f"transformer_blocks.{i}.attn1.to_{n}.{kind}"] for n in "qkv"])
            n1 = np.split(dsd[f"transformer_blocks.{i}.norm1.linear.{kind}"], 6, axis=0)
            n2 = np.split(dsd[f"transformer_blocks.{i}.norm2.linear.{kind}"], 6, axis=0)
            out[f"{_ADALN.format(i=i)}.{kind}"] = np.concatenate(n1[:3] + n2[:3] + n1[3:] + n2[3:])
    return out


def transformer_from_sat(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Prefix-stripped, LoRA-merged SAT state dict (names and shapes already checked) -> our flat params."""
    return transformer_from_diffusers(_to_diffusers(sd, cfg), cfg)


def transformer_to_sat(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our flat params -> the SAT transformer state dict (without prefix) that SAT's edit model loads.

    Adds what SAT's module holds besides the used weights: the 16-channel `proj` (the noisy-stream channels of
    `proj_edit`, as InsViE's init relates them) and, for sin-cos models, the stored position table.
    """
    sd = _from_diffusers(transformer_to_diffusers(flat, cfg), cfg)
    proj_edit = sd["mixins.patch_embed.proj_edit.weight"]
    sd[f"{T2V_PROJ}.weight"] = proj_edit[:, :cfg.in_channels]
    sd[f"{T2V_PROJ}.bias"] = sd["mixins.patch_embed.proj_edit.bias"]
    if cfg.positions == "sincos":
        sd[POS_TABLE] = sincos_table(cfg)
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}
