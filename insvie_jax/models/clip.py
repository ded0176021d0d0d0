"""CLIP (Radford et al. 2021) in Flax NNX: the vision and text towers and their projections, for the CLIP scores
of `insvie-jax eval` (CLIP-T, CLIP-F, directional similarity). Equal to transformers' `CLIPModel` in fp32
(tests/test_clip.py); weights come from a Hugging Face CLIP folder through `insvie_jax.convert.clip_keys`.

Both towers are pre-LN transformers; the vision tower embeds 1 class token + patches (a bias-free patch
projection), layer-norms before the encoder and pools the class token; the text tower is causal and pools the
end-of-text token. Images are channels-last `(B, H, W, 3)` after `preprocess` (CLIPImageProcessor's resize,
centre crop and normalisation).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from insvie_jax.models.layers import Dense, LayerNorm, param

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TowerConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    text: TowerConfig
    vision: TowerConfig
    projection_dim: int
    vocab_size: int
    max_positions: int  # text tokens (77 for OpenAI's CLIP)
    eos_token_id: int  # 2 marks an old config: the pooled token is then the one with the largest id (as transformers)
    image_size: int
    patch_size: int
    num_channels: int = 3

    @classmethod
    def from_hf(cls, hf: dict) -> "ClipConfig":
        """From a transformers `CLIPConfig` dict (config.json); transformers' defaults fill what it omits."""
        text, vision = hf.get("text_config") or {}, hf.get("vision_config") or {}

        def tower(c: dict, hidden: int, mlp: int, layers: int, heads: int) -> TowerConfig:
            act = c.get("hidden_act", "quick_gelu")
            if act not in ACTIVATIONS:
                raise ValueError(f"CLIP hidden_act {act!r} is not supported (one of {', '.join(ACTIVATIONS)})")
            return TowerConfig(c.get("hidden_size", hidden), c.get("intermediate_size", mlp),
                               c.get("num_hidden_layers", layers), c.get("num_attention_heads", heads), act,
                               float(c.get("layer_norm_eps", 1e-5)))

        return cls(text=tower(text, 512, 2048, 12, 8), vision=tower(vision, 768, 3072, 12, 12),
                   projection_dim=hf.get("projection_dim", 512), vocab_size=text.get("vocab_size", 49408),
                   max_positions=text.get("max_position_embeddings", 77), eos_token_id=text.get("eos_token_id", 49407),
                   image_size=vision.get("image_size", 224), patch_size=vision.get("patch_size", 32),
                   num_channels=vision.get("num_channels", 3))


class Attention(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_heads
        self.heads = h
        self.q = Dense((d,), (d,), ("embed", "heads"), rngs=rngs)
        self.k = Dense((d,), (d,), ("embed", "heads"), rngs=rngs)
        self.v = Dense((d,), (d,), ("embed", "heads"), rngs=rngs)
        self.out = Dense((d,), (d,), ("heads", "embed"), rngs=rngs)

    def __call__(self, x, causal: bool):
        b, n, d = x.shape
        q, k, v = (proj(x).reshape(b, n, self.heads, d // self.heads) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        if causal:
            scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -jnp.inf)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
        return self.out(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, d))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: TowerConfig, *, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs)
        self.fc1 = Dense((cfg.hidden_size,), (cfg.intermediate_size,), ("embed", "mlp"), rngs=rngs)
        self.fc2 = Dense((cfg.intermediate_size,), (cfg.hidden_size,), ("mlp", "embed"), rngs=rngs)

    def __call__(self, x, causal: bool):
        x = x + self.attn(self.norm1(x), causal)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


def _layers(cfg: TowerConfig, rngs: nnx.Rngs) -> nnx.List:
    return nnx.List([EncoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])


class VisionTower(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        v, p = cfg.vision, cfg.patch_size
        self.patch_size = p
        self.patch_embed = Dense((p, p, cfg.num_channels), (v.hidden_size,), (None, None, "conv_in", "embed"),
                                 rngs=rngs, use_bias=False)
        self.class_embedding = param(rngs, nnx.initializers.normal(1.0), (v.hidden_size,), jnp.float32, ("embed",))
        positions = (cfg.image_size // p) ** 2 + 1
        self.position_embedding = param(rngs, nnx.initializers.normal(0.02), (positions, v.hidden_size), jnp.float32,
                                        (None, "embed"))
        self.pre_norm = LayerNorm(v.hidden_size, v.layer_norm_eps, rngs=rngs)
        self.layers = _layers(v, rngs)
        self.post_norm = LayerNorm(v.hidden_size, v.layer_norm_eps, rngs=rngs)

    def __call__(self, pixels):
        """(B, S, S, C) normalised pixels -> (B, hidden) pooled class-token features."""
        b, h, w, c = pixels.shape
        p = self.patch_size
        patches = pixels.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = self.patch_embed(patches.reshape(b, (h // p) * (w // p), p, p, c))
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
        x = self.pre_norm(x)
        for layer in self.layers:
            x = layer(x, causal=False)
        return self.post_norm(x[:, 0])


class TextTower(nnx.Module):
    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        self.token_embedding = param(rngs, nnx.initializers.normal(0.02), (cfg.vocab_size, t.hidden_size), jnp.float32,
                                     ("vocab", "embed"))
        self.position_embedding = param(rngs, nnx.initializers.normal(0.01), (cfg.max_positions, t.hidden_size),
                                        jnp.float32, (None, "embed"))
        self.layers = _layers(t, rngs)
        self.final_norm = LayerNorm(t.hidden_size, t.layer_norm_eps, rngs=rngs)

    def __call__(self, ids, pooled_at):
        """(B, L) token ids and (B,) the end-of-text positions -> (B, hidden) features there."""
        x = jnp.take(self.token_embedding[...], ids, axis=0) + self.position_embedding[...][: ids.shape[1]]
        for layer in self.layers:
            x = layer(x, causal=True)
        x = self.final_norm(x)
        return jnp.take_along_axis(x, pooled_at[:, None, None], axis=1)[:, 0]


class ClipModel(nnx.Module):
    """`image_features(pixels)` and `text_features(ids, pooled_at)`: the projected (not yet normalised)
    embeddings, as transformers' `CLIPModel.get_image_features` / `get_text_features`."""

    def __init__(self, cfg: ClipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg, rngs=rngs)
        self.text = TextTower(cfg, rngs=rngs)
        self.visual_projection = Dense((cfg.vision.hidden_size,), (cfg.projection_dim,), ("embed", None), rngs=rngs,
                                       use_bias=False)
        self.text_projection = Dense((cfg.text.hidden_size,), (cfg.projection_dim,), ("embed", None), rngs=rngs,
                                     use_bias=False)

    def image_features(self, pixels):
        return self.visual_projection(self.vision(pixels))

    def text_features(self, ids, pooled_at):
        return self.text_projection(self.text(ids, pooled_at))


def build(cfg: ClipConfig, seed: int = 0) -> ClipModel:
    return ClipModel(cfg, rngs=nnx.Rngs(seed))


def abstract(cfg: ClipConfig) -> ClipModel:
    return nnx.eval_shape(lambda: ClipModel(cfg, rngs=nnx.Rngs(0)))


# ---------------------------------------------------------------------------------------------------
# Inputs


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """CLIPImageProcessor's settings (preprocessor_config.json): resize the shorter side to `shortest_edge`
    (PIL bicubic, the longer side truncated as transformers does), centre crop, scale to [0, 1], normalise."""

    shortest_edge: int = 224
    crop: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    @classmethod
    def from_hf(cls, hf: dict, image_size: int) -> "Preprocessing":
        size, crop = hf.get("size", image_size), hf.get("crop_size", image_size)
        short = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
        crop_hw = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
        return cls(short, crop_hw, tuple(hf.get("image_mean", OPENAI_CLIP_MEAN)),
                   tuple(hf.get("image_std", OPENAI_CLIP_STD)))


def preprocess(frames: np.ndarray, prep: Preprocessing = Preprocessing()) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, crop_h, crop_w, 3) model input."""
    out = []
    for frame in frames:
        h, w = frame.shape[:2]
        short, long = (h, w) if h <= w else (w, h)
        new_long = int(prep.shortest_edge * long / short)
        size = (prep.shortest_edge, new_long) if h <= w else (new_long, prep.shortest_edge)  # (h, w)
        image = np.asarray(Image.fromarray(frame).resize((size[1], size[0]), Image.Resampling.BICUBIC))
        top, left = (size[0] - prep.crop[0]) // 2, (size[1] - prep.crop[1]) // 2
        out.append(image[top:top + prep.crop[0], left:left + prep.crop[1]])
    scaled = np.stack(out).astype(np.float32) * np.float32(1 / 255)
    return (scaled - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)


def tokenize(tokenizer, texts: Sequence[str], cfg: ClipConfig) -> tuple[np.ndarray, np.ndarray]:
    """int32 (ids (B, max_positions), pooled-at positions (B,)) of `texts` through a `tokenizers.Tokenizer` that
    adds CLIP's start and end tokens (`convert.clip_keys.load_tokenizer`). Longer texts are cut to keep the end
    token, as transformers' `truncation=True`; the padding after it is never attended to (causal attention)."""
    if isinstance(texts, str):
        raise TypeError("tokenize() takes a list of texts; wrap a single text as [text]")
    length = cfg.max_positions
    ids = np.zeros((len(texts), length), np.int32)
    pooled_at = np.zeros(len(texts), np.int32)
    for row, encoding in enumerate(tokenizer.encode_batch(list(texts))):
        tokens = encoding.ids
        if len(tokens) > length:
            tokens = tokens[: length - 1] + tokens[-1:]
        ids[row, : len(tokens)] = tokens
        ids[row, len(tokens):] = tokens[-1]  # pad with the end token, as CLIP's pad token is
        # transformers pools at the first end token, or (configs with the old eos_token_id 2) at the largest id
        pooled_at[row] = len(tokens) - 1 if cfg.eos_token_id != 2 else int(np.argmax(ids[row]))
    return ids, pooled_at


# Scores are compared across machines: full fp32 matmuls (TPUs and GPUs may otherwise round inputs to bf16/tf32).
@nnx.jit
def _image_features(model, pixels):
    with jax.default_matmul_precision("highest"):
        return model.image_features(pixels)


@nnx.jit
def _text_features(model, ids, pooled_at):
    with jax.default_matmul_precision("highest"):
        return model.text_features(ids, pooled_at)


def embed_images(model: ClipModel, frames: np.ndarray, prep: Preprocessing, batch: int = 16) -> np.ndarray:
    """uint8 (N, H, W, 3) -> float32 (N, projection_dim) unit-norm image embeddings (fixed batches: one compile)."""
    pixels = preprocess(frames, prep)
    out = []
    for start in range(0, len(pixels), batch):
        chunk = pixels[start:start + batch]
        padded = np.concatenate([chunk, np.zeros((batch - len(chunk), *chunk.shape[1:]), np.float32)])
        out.append(np.asarray(_image_features(model, padded))[: len(chunk)])
    return _unit(np.concatenate(out))


def embed_texts(model: ClipModel, tokenizer, texts: Sequence[str]) -> np.ndarray:
    """float32 (len(texts), projection_dim) unit-norm text embeddings."""
    ids, pooled_at = tokenize(tokenizer, texts, model.cfg)
    return _unit(np.asarray(_text_features(model, ids, pooled_at)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)
