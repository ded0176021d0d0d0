"""CLIP in Flax vs transformers' CLIPModel (random small weights saved with save_pretrained, read without torch),
its BPE tokenizer vs CLIPTokenizer, and its image preprocessing vs CLIPImageProcessor."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from _clip_model import write_tiny_clip  # noqa: E402

from insvie_jax.convert import clip_keys  # noqa: E402
from insvie_jax.models import clip  # noqa: E402

TEXTS = ["make the circle red", "A Photo of  two cats, sitting on a mat!", "remove the square",
         "don't stop -- it's 42 o'clock", "x" * 5 + " long " * 40]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    return folder, write_tiny_clip(folder)


def _rel(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_clip_equals_transformers(clip_folder):
    folder, ref = clip_folder
    model, cfg = clip_keys.load_clip(folder)
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        ref_image = ref.get_image_features(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2)))
    ref_image = getattr(ref_image, "pooler_output", ref_image).numpy()
    assert _rel(np.asarray(clip._image_features(model, pixels)), ref_image) <= 1e-5  # as eval runs it

    tokenizer = clip_keys.load_tokenizer(folder)
    ids, pooled_at = clip.tokenize(tokenizer, TEXTS, cfg)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(folder)
    hf = hf_tok(TEXTS, padding="max_length", max_length=cfg.max_positions, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ref_text = ref.get_text_features(input_ids=hf["input_ids"], attention_mask=hf["attention_mask"])
    ref_text = getattr(ref_text, "pooler_output", ref_text).numpy()
    assert _rel(np.asarray(clip._text_features(model, ids, pooled_at)), ref_text) <= 1e-5


def test_tokenizer_ids_equal_clip_tokenizer(clip_folder):
    folder, _ = clip_folder
    hf_tok = transformers.CLIPTokenizer.from_pretrained(folder)
    ours = clip_keys.load_tokenizer(folder)  # built from vocab.json + merges.txt
    for text in TEXTS:
        assert ours.encode(text).ids == hf_tok(text)["input_ids"], text
    hf_tok.backend_tokenizer.save(str(folder / "tokenizer.json"))
    from_json = clip_keys.load_tokenizer(folder)  # and from tokenizer.json
    (folder / "tokenizer.json").unlink()
    assert [e.ids for e in from_json.encode_batch(TEXTS)] == [hf_tok(t)["input_ids"] for t in TEXTS]
    ids, pooled_at = clip.tokenize(ours, TEXTS, clip_keys.load_clip(folder)[1])
    long = hf_tok(TEXTS[-1], truncation=True, max_length=24)["input_ids"]
    assert ids[-1].tolist() == long and pooled_at[-1] == 23  # cut to keep the end token


def test_preprocessing_equals_clip_image_processor(clip_folder):
    folder, _ = clip_folder
    cfg = clip_keys.load_clip(folder)[1]
    prep = clip_keys.load_preprocessing(folder, cfg)
    processor = transformers.CLIPImageProcessorPil.from_pretrained(folder)
    rng = np.random.default_rng(1)
    for h, w in ((40, 60), (75, 50), (32, 32)):
        frames = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        ref = processor(list(frames), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = clip.preprocess(frames, prep)
        assert ours.shape == ref.shape == (2, 32, 32, 3)
        np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_not_a_clip_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="CLIP config.json"):
        clip_keys.load_clip(tmp_path)
