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

import re

import numpy as np

from insvie_jax.config import ModelConfig
from insvie_jax.convert import diffusers_keys, mapping, sat_config
from insvie_jax.convert.mapping import LINEAR, VECTOR, regroup, rule, split_rows
from insvie_jax.convert.sat_config import POS_TABLE, PREFIX, SatFormatError
from insvie_jax.models import transformer as tr
from insvie_jax.models.params import param_shapes

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


def loadable_keys(sd: dict) -> dict:
    """The tensors that carry weights: drops what the model recomputes or never uses."""
    return {k: v for k, v in sd.items() if k not in _RECOMPUTED}


def _sat_name(diffusers_name: str) -> str:
    base, kind = diffusers_name.rsplit(".", 1)
    return f"{_SAT_OF[base]}.{kind}"


_SAT_OF = {ours: sat for sat, ours in {**_SAME, **_SAME_PER_LAYER}.items()}
_REGROUPED = ("blocks.attn.qkv.", "blocks.norm1.linear.", "blocks.norm2.linear.")
# SAT's adaLN linear: 12 row blocks, video (shift, scale, gate) x (msa, mlp), then text; diffusers' norm1 / norm2
# each hold (shift, scale, gate, text shift, text scale, text gate) of one branch.
_ADALN_ORDER = ((0, 1, 2, 6, 7, 8), (3, 4, 5, 9, 10, 11))
RULES = [
    *mapping.rename([r for r in diffusers_keys.RULES if not r.ours[0].startswith(_REGROUPED)], _sat_name),
    rule("blocks.attn.qkv.kernel", f"{_QKV}.weight", split_rows(3, LINEAR, axis=1)),
    rule("blocks.attn.qkv.bias", f"{_QKV}.bias", split_rows(3, VECTOR, axis=0)),
    rule(("blocks.norm1.linear.kernel", "blocks.norm2.linear.kernel"), f"{_ADALN}.weight",
         regroup(LINEAR, _ADALN_ORDER, 12)),
    rule(("blocks.norm1.linear.bias", "blocks.norm2.linear.bias"), f"{_ADALN}.bias",
         regroup(VECTOR, _ADALN_ORDER, 12)),
]


def sat_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a SAT checkpoint of this config holds (what `transformer_to_sat` writes)."""
    shapes = mapping.their_shapes(RULES, param_shapes(tr.abstract(cfg)))
    shapes[f"{T2V_PROJ}.weight"] = (cfg.hidden_size, cfg.in_channels, cfg.patch_size, cfg.patch_size)
    shapes[f"{T2V_PROJ}.bias"] = (cfg.hidden_size,)
    if cfg.positions == "sincos":
        shapes[POS_TABLE] = sat_config.table_shape(cfg)
    return shapes


def transformer_from_sat(sd: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Prefix-stripped, LoRA-merged SAT state dict (names and shapes already checked) -> our flat params."""
    return mapping.to_ours(RULES, sd, param_shapes(tr.abstract(cfg)))


def transformer_to_sat(flat: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Our flat params -> the SAT transformer state dict (without prefix) that SAT's edit model loads.

    Adds what SAT's module holds besides the used weights: the 16-channel `proj` (the noisy-stream channels of
    `proj_edit`, as InsViE's init relates them) and, for sin-cos models, the stored position table.
    """
    sd = mapping.to_theirs(RULES, flat)
    proj_edit = sd["mixins.patch_embed.proj_edit.weight"]
    sd[f"{T2V_PROJ}.weight"] = np.ascontiguousarray(proj_edit[:, :cfg.in_channels])
    sd[f"{T2V_PROJ}.bias"] = sd["mixins.patch_embed.proj_edit.bias"]
    if cfg.positions == "sincos":
        sd[POS_TABLE] = sat_config.sincos_table(cfg)
    return sd
