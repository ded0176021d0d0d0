"""Synthetic in-memory editing triplets in latent space: a learnable task with no files and no encoders.

Each "instruction" k has a fixed random text embedding and a fixed edit rule applied to the source
latents (negate some channels, shift in time, scale, ...), so a model that reads both the text and the
source can drive the loss well below what it could reach ignoring either.
"""

from __future__ import annotations

import numpy as np

NUM_INSTRUCTIONS = 4


def _edit(source: np.ndarray, k: int) -> np.ndarray:
    if k == 0:  # "invert the first half of the channels"
        out = source.copy()
        out[..., : source.shape[-1] // 2] *= -1
        return out
    if k == 1:  # "play it one frame later"
        return np.roll(source, 1, axis=1)
    if k == 2:  # "fade it"
        return 0.5 * source
    return np.flip(source, axis=3).copy()  # "mirror it"


class SyntheticTriplets:
    """Yields dicts of numpy arrays: source, target (B, f, h, w, C) latents and text (B, L, D)."""

    def __init__(self, batch_size: int, latent_shape: tuple[int, int, int, int], text_length: int, text_dim: int,
                 seed: int = 0):
        self.batch_size = batch_size
        self.latent_shape = latent_shape
        rng = np.random.default_rng(seed)
        self.instructions = rng.standard_normal((NUM_INSTRUCTIONS, text_length, text_dim)).astype(np.float32)
        self.seed = seed

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The batch of `step`: a pure function of (seed, step), so a resumed run sees the same data."""
        return self.rows(step, range(self.batch_size))

    def rows(self, step: int, rows: range) -> dict[str, np.ndarray]:
        """Rows `rows` of the batch of `step`; each row is drawn on its own, so a process can make just its own."""
        f, h, w, c = self.latent_shape
        sources, kinds = [], []
        for row in rows:
            rng = np.random.default_rng([self.seed, step, row])
            # Smooth sources: low-resolution noise upsampled, so that edits have spatial structure to keep.
            coarse = rng.standard_normal((f, max(h // 2, 1), max(w // 2, 1), c)).astype(np.float32)
            sources.append(coarse.repeat(2, axis=1)[:, :h].repeat(2, axis=2)[:, :, :w])
            kinds.append(int(rng.integers(0, NUM_INSTRUCTIONS)))
        source = np.stack(sources) if sources else np.zeros((0, f, h, w, c), np.float32)
        target = np.stack([_edit(s, k) for s, k in zip(source, kinds)]) if kinds else source.copy()
        return {"source": source, "target": target, "text": self.instructions[np.asarray(kinds, int)]}
