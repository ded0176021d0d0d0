"""T5 encoder: Hugging Face `T5EncoderModel` checkpoints <-> our parameters, the folder loader, the tokenizer.

No torch: safetensors are read through their numpy API (memory-mapped), one Hugging Face tensor at a time.
PyTorch Linear weights are (out, in); our kernels are (in..., out...) with per-layer parameters stacked on
a leading `layers` axis, q/k/v fused into one (embed, 3, heads, head_dim) kernel and wi_0/wi_1 into one
(embed, 2, mlp) kernel. The relative position bias table, stored in block 0, is the encoder's own here.
Decoder and lm_head tensors of a full T5 checkpoint are ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy API reads BF16 files)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding

from insvie_jax.config import MeshConfig, TextEncoderConfig
from insvie_jax.models import t5
from insvie_jax.models.params import check_params
from insvie_jax.parallel.sharding import logical_to_spec

EMBED_KEY = "encoder.embed_tokens.weight"
SHARED_KEY = "shared.weight"  # the same (tied) table; a file written with tied weights may hold only this one
BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
FINAL_NORM_KEY = "encoder.final_layer_norm.weight"

Read = Callable[[str], np.ndarray]


def _layer_key(i: int, name: str) -> str:
    return f"encoder.block.{i}.{name}"


_ATTN = "layer.0.SelfAttention."
_FF = "layer.1.DenseReluDense."


def hf_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face encoder tensor our model needs, with its PyTorch shape."""
    d, inner, f = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
    shapes = {
        EMBED_KEY: (cfg.vocab_size, d),
        BIAS_KEY: (cfg.relative_attention_num_buckets, cfg.num_heads),
        FINAL_NORM_KEY: (d,),
    }
    for i in range(cfg.num_layers):
        shapes.update({
            _layer_key(i, "layer.0.layer_norm.weight"): (d,),
            _layer_key(i, _ATTN + "q.weight"): (inner, d),
            _layer_key(i, _ATTN + "k.weight"): (inner, d),
            _layer_key(i, _ATTN + "v.weight"): (inner, d),
            _layer_key(i, _ATTN + "o.weight"): (d, inner),
            _layer_key(i, "layer.1.layer_norm.weight"): (d,),
            _layer_key(i, _FF + "wi_0.weight"): (f, d),
            _layer_key(i, _FF + "wi_1.weight"): (f, d),
            _layer_key(i, _FF + "wo.weight"): (d, f),
        })
    return shapes


@dataclasses.dataclass(frozen=True)
class _Rule:
    """How one of our parameters is made: from the whole checkpoint, or layer by layer (stacked)."""

    convert: Callable  # (read) -> array, or (read, layer) -> one layer's array when `stacked`
    stacked: bool


def conversion_rules(cfg: TextEncoderConfig) -> dict[str, _Rule]:
    """Our flat parameter name -> how to build it from Hugging Face tensors (read one at a time)."""
    d, h, dk = cfg.d_model, cfg.num_heads, cfg.d_kv

    def qkv(read, i):
        return np.stack([read(_layer_key(i, _ATTN + f"{n}.weight")).T.reshape(d, h, dk) for n in "qkv"], axis=1)

    def wi(read, i):
        return np.stack([read(_layer_key(i, _FF + f"wi_{j}.weight")).T for j in (0, 1)], axis=1)

    return {
        "embedding": _Rule(lambda read: read(EMBED_KEY), False),
        "relative_attention_bias": _Rule(lambda read: read(BIAS_KEY), False),
        "final_norm.scale": _Rule(lambda read: read(FINAL_NORM_KEY), False),
        "blocks.attn_norm.scale": _Rule(lambda read, i: read(_layer_key(i, "layer.0.layer_norm.weight")), True),
        "blocks.attn.qkv.kernel": _Rule(qkv, True),
        "blocks.attn.out.kernel": _Rule(lambda read, i: read(_layer_key(i, _ATTN + "o.weight")).T.reshape(h, dk, d),
                                        True),
        "blocks.ff_norm.scale": _Rule(lambda read, i: read(_layer_key(i, "layer.1.layer_norm.weight")), True),
        "blocks.ff.wi.kernel": _Rule(wi, True),
        "blocks.ff.wo.kernel": _Rule(lambda read, i: read(_layer_key(i, _FF + "wo.weight")).T, True),
    }


def _convert_slice(rule: _Rule, read: Read, shape, dtype, index=None) -> np.ndarray:
    """One parameter (or the `index` block of it that one device holds), in `dtype`."""
    index = index or tuple(slice(None) for _ in shape)
    if not rule.stacked:
        return np.ascontiguousarray(rule.convert(read)[index], dtype)
    layers = range(shape[0])[index[0]]
    out = None
    for j, i in enumerate(layers):
        layer = rule.convert(read, i)[index[1:]]
        if out is None:
            out = np.empty((len(layers), *layer.shape), dtype)
        out[j] = layer
    return out


def t5_from_hf(state_dict: dict[str, np.ndarray], cfg: TextEncoderConfig) -> dict[str, np.ndarray]:
    """A Hugging Face `T5EncoderModel` state dict (numpy) -> our flat params, float32."""
    sd = dict(state_dict)
    if EMBED_KEY not in sd and SHARED_KEY in sd:
        sd[EMBED_KEY] = sd[SHARED_KEY]
    found = {k: tuple(np.shape(v)) for k, v in sd.items() if k.startswith("encoder.")}
    check_params(hf_shapes(cfg), found, "T5 state dict")
    shapes = _our_shapes(cfg)
    return {name: _convert_slice(rule, sd.__getitem__, shapes[name], np.float32)
            for name, rule in conversion_rules(cfg).items()}


def _our_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    state = nnx.state(t5.abstract(cfg), nnx.Param)
    return {".".join(map(str, path)): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders


def config_from_hf(hf: dict, base: TextEncoderConfig | None = None) -> TextEncoderConfig:
    """A `T5Config` dict (config.json) -> our config; sizes from `hf`, runtime choices (dtype...) from `base`."""
    # transformers derives the activation from feed_forward_proj ("gated-gelu" means gelu_new, tanh form).
    if hf.get("feed_forward_proj") != "gated-gelu":
        raise ValueError(
            f"T5 config has feed_forward_proj={hf.get('feed_forward_proj')!r}: only T5 v1.1 'gated-gelu' "
            "encoders (such as t5-v1_1-xxl) are supported"
        )
    try:
        sizes = {key: hf[key] for key in ("vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff")}
    except KeyError as err:
        raise ValueError(f"T5 config.json lacks {err.args[0]!r}; is this a Hugging Face T5 folder?") from err
    return dataclasses.replace(
        base or TextEncoderConfig(),
        **sizes,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
    )


def _model_folder(path: str | Path) -> Path:
    """The folder holding config.json: `path` itself, or its `text_encoder/` (a diffusers pipeline)."""
    path = Path(path)
    for folder in (path, path / "text_encoder"):
        if (folder / "config.json").exists():
            return folder
    raise FileNotFoundError(f"no T5 config.json in {path} (nor in {path / 'text_encoder'})")


class _SafetensorsFolder:
    """Tensor name -> numpy array, across one `model.safetensors` or the shards of an index file."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {folder}: save the T5 with safe_serialization=True")
        self._handles = {name: safe_open(folder / name, framework="numpy") for name in files}
        self._file_of = {key: name for name, h in self._handles.items() for key in h.keys()}
        if EMBED_KEY not in self._file_of and SHARED_KEY in self._file_of:
            self._file_of[EMBED_KEY] = self._file_of[SHARED_KEY]
            self._alias = {EMBED_KEY: SHARED_KEY}
        else:
            self._alias = {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            key: tuple(self._handles[name].get_slice(self._alias.get(key, key)).get_shape())
            for key, name in self._file_of.items()
        }

    def __call__(self, key: str) -> np.ndarray:
        return self._handles[self._file_of[key]].get_tensor(self._alias.get(key, key))


def _param_shardings(abstract_state, mesh: Mesh | None, rules, shardings) -> dict[str, Sharding | None]:
    if shardings is not None:
        return dict(shardings)
    out = {}
    for path, var in nnx.to_flat_state(abstract_state):
        name = ".".join(map(str, path))
        if mesh is None:
            out[name] = None
        else:
            out[name] = NamedSharding(mesh, logical_to_spec(var.get_metadata()["out_sharding"], rules))
    return out


def load_t5(
    path: str | Path,
    config: TextEncoderConfig | None = None,
    *,
    mesh: Mesh | None = None,
    rules=None,
    shardings: dict[str, Sharding] | None = None,
) -> tuple[t5.T5Encoder, TextEncoderConfig]:
    """Reads a Hugging Face T5 folder (config.json + safetensors, single or sharded) into our encoder.

    Sizes come from config.json; dtypes and `scan_layers` from `config`. Each parameter is converted on its
    own and placed straight onto its sharding: `shardings` (flat name -> Sharding), else from `mesh` and the
    logical axis `rules` (default: `MeshConfig().logical_axis_rules`), else the default device. With a
    sharding, each device's block is converted from the memory-mapped files on its own, so neither host nor
    device builds a whole stacked fp32 parameter unless it is replicated; the price is that every device
    re-reads the layer tensors its block is cut from.
    """
    folder = _model_folder(path)
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), config)
    cfg = dataclasses.replace(cfg, path=str(path))
    reader = _SafetensorsFolder(folder)
    found = {k: v for k, v in reader.shapes().items() if k.startswith("encoder.")}
    check_params(hf_shapes(cfg), found, f"T5 checkpoint {folder}")

    graphdef, state = nnx.split(t5.abstract(cfg))
    rules = rules if rules is not None else MeshConfig().logical_axis_rules
    placements = _param_shardings(state, mesh, rules, shardings)
    conversion = conversion_rules(cfg)
    for path_, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path_))
        rule, spec = conversion[name], var.get_value()
        sharding = placements.get(name)
        if sharding is None:
            value = jax.device_put(_convert_slice(rule, reader, spec.shape, spec.dtype))
        else:
            value = jax.make_array_from_callback(
                spec.shape, sharding,
                lambda index, rule=rule, spec=spec: _convert_slice(rule, reader, spec.shape, spec.dtype, index),
            )
        var.set_value(value)
    return nnx.merge(graphdef, state), cfg


def load_tokenizer(path: str | Path):
    """A T5 `spiece.model` (a file, a folder holding one, or a diffusers pipeline's `tokenizer/`)."""
    import sentencepiece

    path = Path(path)
    candidates = [path] if path.is_file() else [path / "spiece.model", path / "tokenizer" / "spiece.model"]
    for file in candidates:
        if file.is_file():
            return sentencepiece.SentencePieceProcessor(model_file=str(file))
    raise FileNotFoundError(f"no T5 sentencepiece model at {path} (looked for {', '.join(map(str, candidates))})")
