"""T5 encoder: Hugging Face `T5EncoderModel` checkpoints <-> our parameters, the folder reader and writer
(Hugging Face or native: config.json + orbax `params/`), the tokenizer.

No torch: safetensors are read through their numpy API (memory-mapped), one Hugging Face tensor at a time.
PyTorch Linear weights are (out, in); our kernels are (in..., out...) with per-layer parameters stacked on
a leading `layers` axis, q/k/v fused into one (embed, 3, heads, head_dim) kernel and wi_0/wi_1 into one
(embed, 2, mlp) kernel. The relative position bias table, stored in block 0, is the encoder's own here.
Decoder and lm_head tensors of a full T5 checkpoint are ignored. Exports hold the tokens table as `shared.weight`
only, as `T5EncoderModel.save_pretrained` writes it (the encoder's table is tied to it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, so safetensors' numpy API reads BF16 files)
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, Sharding

from insvie_jax import config as config_lib
from insvie_jax.config import MeshConfig, TextEncoderConfig
from insvie_jax.convert import files, mapping, registry
from insvie_jax.convert.files import Progress, quiet
from insvie_jax.convert.mapping import LINEAR, VECTOR, fused, linear, rule
from insvie_jax.convert.sat import NotACheckpoint
from insvie_jax.models import t5
from insvie_jax.models.params import check_params, flat_params
from insvie_jax.parallel.sharding import logical_to_spec

WEIGHTS = files.HF_WEIGHTS
MAX_SHARD_BYTES = files.HF_SHARD_BYTES
TOKENIZER_FILES = files.TOKENIZER_FILES

EMBED_KEY = "encoder.embed_tokens.weight"
SHARED_KEY = "shared.weight"  # the same (tied) table; a file written with tied weights may hold only this one
BIAS_KEY = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"

_LAYER = "encoder.block.{i}."
_ATTN = _LAYER + "layer.0.SelfAttention."
_FF = _LAYER + "layer.1.DenseReluDense."

# q|k|v fused into one (embed, 3, heads, head_dim) kernel and wi_0|wi_1 into one (embed, 2, mlp) kernel.
RULES = [
    rule("embedding", EMBED_KEY),
    rule("relative_attention_bias", BIAS_KEY),
    rule("final_norm.scale", "encoder.final_layer_norm.weight", VECTOR),
    rule("blocks.attn_norm.scale", _LAYER + "layer.0.layer_norm.weight", VECTOR),
    rule("blocks.attn.qkv.kernel", [_ATTN + f"{n}.weight" for n in "qkv"], fused(LINEAR, axis=1)),
    rule("blocks.attn.out.kernel", _ATTN + "o.weight", linear(2)),
    rule("blocks.ff_norm.scale", _LAYER + "layer.1.layer_norm.weight", VECTOR),
    rule("blocks.ff.wi.kernel", [_FF + "wi_0.weight", _FF + "wi_1.weight"], fused(LINEAR, axis=1)),
    rule("blocks.ff.wo.kernel", _FF + "wo.weight", LINEAR),
]


def hf_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every Hugging Face encoder tensor our model needs, with its PyTorch shape."""
    return mapping.their_shapes(RULES, _our_shapes(cfg))


def t5_from_hf(state_dict: dict[str, np.ndarray], cfg: TextEncoderConfig,
               dtype=np.float32) -> dict[str, np.ndarray]:
    """A Hugging Face `T5EncoderModel` state dict (numpy) -> our flat params, in `dtype`."""
    sd = dict(state_dict)
    if EMBED_KEY not in sd and SHARED_KEY in sd:
        sd[EMBED_KEY] = sd[SHARED_KEY]
    found = {k: tuple(np.shape(v)) for k, v in sd.items() if k.startswith("encoder.")}
    check_params(hf_shapes(cfg), found, "T5 state dict")
    return mapping.to_ours(RULES, sd, _our_shapes(cfg), dtype)


def t5_to_hf(flat: dict[str, np.ndarray], cfg: TextEncoderConfig) -> dict[str, np.ndarray]:
    """Our flat params -> the state dict `T5EncoderModel.save_pretrained` writes (tokens table as `shared.weight`)."""
    check_params(_our_shapes(cfg), {k: np.shape(v) for k, v in flat.items()}, "T5 parameters")
    sd = mapping.to_theirs(RULES, flat)
    sd[SHARED_KEY] = sd.pop(EMBED_KEY)
    return sd


def _our_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    state = nnx.state(t5.abstract(cfg), nnx.Param)
    return {".".join(map(str, path)): tuple(v.get_value().shape) for path, v in nnx.to_flat_state(state)}


# ---------------------------------------------------------------------------------------------------
# Hugging Face folders


def config_from_hf(hf: dict, base: TextEncoderConfig | None = None) -> TextEncoderConfig:
    """A `T5Config` dict (config.json) -> our config; sizes from `hf`, runtime choices (dtype...) from `base`."""
    # transformers derives the activation from feed_forward_proj ("gated-gelu" means gelu_new, tanh form).
    if hf.get("feed_forward_proj") != "gated-gelu":
        raise NotACheckpoint(
            f"T5 config has feed_forward_proj={hf.get('feed_forward_proj')!r}: only T5 v1.1 'gated-gelu' "
            "encoders (such as t5-v1_1-xxl) are supported"
        )
    try:
        sizes = {key: hf[key] for key in ("vocab_size", "d_model", "d_kv", "num_heads", "num_layers", "d_ff")}
    except KeyError as err:
        raise NotACheckpoint(f"T5 config.json lacks {err.args[0]!r}; is this a Hugging Face T5 folder?") from err
    return dataclasses.replace(
        base or TextEncoderConfig(),
        **sizes,
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-6)),
    )


def hf_config(cfg: TextEncoderConfig) -> dict:
    """The config.json (T5Config fields) of a T5 v1.1 encoder of cfg's sizes, as `save_pretrained` writes it."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "dropout_rate": 0.1,
        "classifier_dropout": 0.0,
        "initializer_factor": 1.0,
        "is_encoder_decoder": False,
        "is_decoder": False,
        "tie_word_embeddings": False,  # v1.1: no lm_head tie (the encoder's table is tied to `shared` regardless)
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "transformers_version": files.package_version("transformers", "4.44.0"),
    }


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
        from safetensors import SafetensorError, safe_open

        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors in {folder}: save the T5 with safe_serialization=True")
        try:
            self._handles = {name: safe_open(folder / name, framework="numpy") for name in files}
        except (SafetensorError, OSError) as err:  # a truncated or corrupt file
            raise NotACheckpoint(f"{folder}: not a readable safetensors file among {', '.join(files)} "
                                 f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
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


def _open(path: str | Path, config: TextEncoderConfig | None, progress: Progress = quiet):
    """(our config, value) of a Hugging Face or native T5 folder; `value(name, shape, dtype, index=None)` is our
    parameter `name` (or its `index` block) in `dtype`, built from the checkpoint on demand."""
    folder = _model_folder(path)
    if registry.detect(folder, "t5").format == "native":
        flat, cfg, _ = registry.read(folder, "t5", base=config, progress=progress)
        cfg = dataclasses.replace(cfg, path=str(path))

        def value(name, shape, dtype, index=None):
            return np.ascontiguousarray(flat[name][index or ...], dtype)

        return cfg, value
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()), config)
    cfg = dataclasses.replace(cfg, path=str(path))
    return cfg, _hf_values(folder, RULES, hf_shapes(cfg), f"T5 checkpoint {folder}", _our_shapes(cfg))


def _hf_values(folder: Path, rules, expected: dict, what: str, our_shapes: dict):
    """`value(name, shape, dtype, index=None)`: our parameter (or its `index` block) converted on demand from a
    Hugging Face folder's memory-mapped tensors, after checking their names and shapes against `expected`."""
    reader = _SafetensorsFolder(folder)
    found = {k: v for k, v in reader.shapes().items() if k.startswith("encoder.")}
    check_params(expected, found, what)
    rule_of = {name: r for r in rules for name in r.ours}

    def value(name, shape, dtype, index=None):
        return mapping.convert_rule(rule_of[name], reader, our_shapes, dtype, index)[name]

    return value


def load_t5(
    path: str | Path,
    config: TextEncoderConfig | None = None,
    *,
    mesh: Mesh | None = None,
    rules=None,
    shardings: dict[str, Sharding] | None = None,
) -> tuple[t5.T5Encoder, TextEncoderConfig]:
    """Reads a Hugging Face T5 folder (config.json + safetensors, single or sharded) or a native folder
    (config.json + orbax params/) into our encoder.

    Sizes come from config.json; dtypes and `scan_layers` from `config`. Each parameter is converted on its
    own and placed straight onto its sharding: `shardings` (flat name -> Sharding), else from `mesh` and the
    logical axis `rules` (default: `MeshConfig().logical_axis_rules`), else the default device. With a
    sharding, each device's block of a Hugging Face checkpoint is converted from the memory-mapped files on its
    own, so neither host nor device builds a whole stacked fp32 parameter unless it is replicated; the price is
    that every device re-reads the layer tensors its block is cut from.
    """
    cfg, value = _open(path, config)
    graphdef, state = nnx.split(t5.abstract(cfg))
    rules = rules if rules is not None else MeshConfig().logical_axis_rules
    placements = _param_shardings(state, mesh, rules, shardings)
    for path_, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path_))
        spec = var.get_value()
        sharding = placements.get(name)
        if sharding is None:
            array = jax.device_put(value(name, spec.shape, spec.dtype))
        else:
            array = jax.make_array_from_callback(
                spec.shape, sharding, lambda index, name=name, spec=spec: value(name, spec.shape, spec.dtype, index)
            )
        var.set_value(array)
    return nnx.merge(graphdef, state), cfg


def read_t5(path: str | Path, config: TextEncoderConfig | None = None, dtype=np.float32,
            progress: Progress = quiet) -> tuple[dict[str, np.ndarray], TextEncoderConfig]:
    """(flat params in `dtype`, config) of a Hugging Face or native T5 folder, without building the model."""
    flat, cfg, _ = registry.read(path, "t5", base=config, progress=progress)
    return {k: np.asarray(v, dtype) for k, v in flat.items()}, dataclasses.replace(cfg, path=str(path))


def write_t5(flat: dict[str, np.ndarray], cfg: TextEncoderConfig, path: str | Path, format: str = "native",
             dtype: str = "fp32", tokenizer_from: str | Path | None = None, progress: Progress = quiet,
             max_shard_bytes: int | None = None) -> Path:
    """Writes `flat` as `format` ("native" | "hf": a folder `T5EncoderModel.from_pretrained` loads, sharded with
    an index beyond `max_shard_bytes`), staged, with the tokenizer files of `tokenizer_from` (spiece.model,
    tokenizer_config.json, ...) copied beside the weights. Returns the path."""
    return registry.write(flat, cfg, path, "t5", format, dtype=dtype, progress=progress,
                          max_shard_bytes=max_shard_bytes, tokenizer_from=tokenizer_from)


def save_t5(model: t5.T5Encoder, t5_cfg: TextEncoderConfig, path: str | Path, format: str = "native",
            dtype: str = "fp32", tokenizer_from: str | Path | None = None,
            max_shard_bytes: int | None = None) -> Path:
    """Writes the encoder's parameters as `format` ("native" | "hf") in `dtype` ("fp32" | "bf16"); see `write_t5`."""
    return write_t5(flat_params(model), t5_cfg, path, format, dtype, tokenizer_from, max_shard_bytes=max_shard_bytes)


# ---------------------------------------------------------------------------------------------------
# Codecs (convert/registry.py)


def check(flat: dict[str, np.ndarray], cfg: TextEncoderConfig, what: str) -> None:
    check_params(_our_shapes(cfg), {k: np.shape(v) for k, v in flat.items()}, what)


def native_config(section: dict, options, path) -> TextEncoderConfig:
    stored = config_lib.from_dict({"text_encoder": section}).text_encoder
    return dataclasses.replace(config_from_hf(hf_config(stored), options.base), path=str(path))


def read_hf(path: Path, options):
    cfg, value = _open(path, options.base, options.progress)
    shapes, dtype = _our_shapes(cfg), files.DTYPES[options.dtype]
    return {name: value(name, shapes[name], dtype) for name in options.progress(list(shapes), "convert T5")}, cfg


def write_hf(flat, cfg: TextEncoderConfig, folder: Path, options) -> None:
    config = {**hf_config(cfg), "dtype": files.TORCH_DTYPE_NAMES[options.dtype]}
    files.write_folder(folder, config, t5_to_hf(flat, cfg), WEIGHTS, options.dtype,
                       options.max_shard_bytes or MAX_SHARD_BYTES, options.progress)


def load_tokenizer(path: str | Path):
    """A T5 `spiece.model` (a file, a folder holding one, or a diffusers pipeline's `tokenizer/`)."""
    import sentencepiece

    path = Path(path)
    candidates = [path] if path.is_file() else [path / "spiece.model", path / "tokenizer" / "spiece.model"]
    for file in candidates:
        if file.is_file():
            return sentencepiece.SentencePieceProcessor(model_file=str(file))
    raise FileNotFoundError(f"no T5 sentencepiece model at {path} (looked for {', '.join(map(str, candidates))})")
