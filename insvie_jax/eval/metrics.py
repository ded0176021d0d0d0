"""Per-clip edit metrics: the ones that need no weights, and CLIP scores from a `ClipScorer` a user loads.

All take uint8 clips `(F, H, W, 3)` of one size (`eval_clip` aligns nothing: `insvie_jax.eval.inputs` does).

- psnr_* / ssim_*: the edit against the source (how much of the source survives) or the target; per frame, then
  the mean over frames. PSNR on the 0-255 scale (inf for identical frames). SSIM is scikit-image's
  `structural_similarity` with Wang et al. (2004)'s settings (Gaussian σ 1.5, K1 0.01, K2 0.03, population
  covariance), over the three colour channels.
- warp_error: temporal consistency as Lai et al. (2018, "Learning Blind Video Temporal Consistency") measure it:
  frame t+1 of the edit warped back onto frame t with the optical flow of the *source* (an edit should move as
  the source moves), squared difference per channel in [0, 1], averaged over the pixels where the flow is
  trusted (forward-backward consistent and inside the frame), then over frame pairs. Flow: OpenCV's DIS (dense
  inverse search, medium preset) on the source's grayscale frames. `source_warp_error` is the same on the source
  itself: the floor that flow errors leave.
- clip_text (CLIP-T): mean over edited frames of the cosine between the frame's and the text's CLIP embedding
  (the edited caption, else the instruction); clip_frame (CLIP-F): mean cosine of adjacent edited frames;
  clip_direction: mean over frames of the cosine between the image change (edited frame − source frame) and the
  text change (edited caption − source caption), unit embeddings, as InstructPix2Pix / TGVE report it.
"""

from __future__ import annotations

import math

import numpy as np

# Lai et al.'s (after Ruder et al. 2016) forward-backward consistency test: |fw + bw(x + fw)|² must be below
# ALPHA (|fw|² + |bw(x + fw)|²) + BETA (pixels²), else the pixel is occluded or the flow wrong there.
CONSISTENCY_ALPHA = 0.01
CONSISTENCY_BETA = 0.5
SSIM_SIGMA = 1.5

DESCRIPTIONS = {
    "psnr_source": "PSNR (dB) of the edit vs the source: how much of the source is kept",
    "ssim_source": "SSIM of the edit vs the source",
    "psnr_target": "PSNR (dB) of the edit vs the target edit",
    "ssim_target": "SSIM of the edit vs the target edit",
    "warp_error": "flow warping error of the edit, flow of the source (lower: temporally consistent)",
    "source_warp_error": "the same on the source itself (the floor flow errors leave)",
    "clip_text": "CLIP-T: cosine of edited frames and the edited caption (else instruction)",
    "clip_frame": "CLIP-F: cosine of adjacent edited frames",
    "clip_direction": "CLIP directional similarity: image change vs caption change",
    "judge_score": "the judge's score",
}
METRICS = tuple(DESCRIPTIONS)


def as_uint8(video) -> np.ndarray:
    """uint8 clips pass through; float clips in [-1, 1] (the models' range) become uint8 as edits are written."""
    video = np.asarray(video)
    if video.dtype == np.uint8:
        return video
    return (255.0 * np.clip((video.astype(np.float32) + 1) / 2, 0, 1)).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of the PSNR (dB, peak 255) of two uint8 clips; inf when every frame is identical."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return float(np.mean(10 * np.log10(255.0**2 / mse)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over frames of scikit-image's SSIM (Wang et al. settings) of two uint8 clips."""
    from skimage.metrics import structural_similarity

    if min(a.shape[1:3]) < 7:
        raise ValueError(f"SSIM needs frames of at least 7x7 pixels, got {a.shape[1]}x{a.shape[2]}")
    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255, gaussian_weights=True,
                                                sigma=SSIM_SIGMA, use_sample_covariance=False)
                          for x, y in zip(a, b)]))


def _gray(frame: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)


def _warp(image: np.ndarray, flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """image sampled at x + flow(x) (bilinear), and where that point lies inside the frame."""
    import cv2

    h, w = flow.shape[:2]
    grid_y, grid_x = np.mgrid[0:h, 0:w].astype(np.float32)
    map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
    warped = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    inside = (map_x >= 0) & (map_x <= w - 1) & (map_y >= 0) & (map_y <= h - 1)
    return warped, inside


def source_flows(source: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each adjacent pair of source frames: (flow t -> t+1, float32 (H, W, 2) in pixels (x, y), the mask of
    pixels where it is trusted)."""
    import cv2

    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    gray = [_gray(f) for f in source]
    out = []
    for a, b in zip(gray[:-1], gray[1:]):
        forward = dis.calc(a, b, None)
        backward = dis.calc(b, a, None)
        back_at_forward, inside = _warp(backward, forward)
        mismatch = np.sum((forward + back_at_forward) ** 2, axis=-1)
        bound = CONSISTENCY_ALPHA * (np.sum(forward**2, -1) + np.sum(back_at_forward**2, -1)) + CONSISTENCY_BETA
        out.append((forward, inside & (mismatch <= bound)))
    return out


def warp_error(video: np.ndarray, flows) -> float:
    """Lai et al.'s warping error of a uint8 clip under `source_flows` (nan for a single frame)."""
    if len(video) < 2:
        return math.nan
    errors = []
    for t, (flow, trusted) in enumerate(flows):
        nxt = video[t + 1].astype(np.float32) / 255
        warped, _ = _warp(nxt, flow)
        squared = ((warped - video[t].astype(np.float32) / 255) ** 2).mean(axis=-1)
        errors.append(float(squared[trusted].mean()) if trusted.any() else float(squared.mean()))
    return float(np.mean(errors))


def clip_scores(scorer, source: np.ndarray, edit: np.ndarray, text: str,
                source_caption: str | None = None, edited_caption: str | None = None) -> dict:
    """CLIP-T, CLIP-F and (with both captions) the directional similarity; see the module doc."""
    edit_emb = scorer.images(edit)
    text_emb = scorer.texts([edited_caption or text])[0]
    scores = {"clip_text": float(np.mean(edit_emb @ text_emb)),
              "clip_frame": float(np.mean(np.sum(edit_emb[1:] * edit_emb[:-1], -1))) if len(edit) > 1 else math.nan}
    if source_caption and edited_caption:
        source_emb = scorer.images(source)
        text_src, text_edit = scorer.texts([source_caption, edited_caption])
        image_change = edit_emb - source_emb
        text_change = text_edit - text_src
        cos = image_change @ text_change / (np.linalg.norm(image_change, axis=-1) * np.linalg.norm(text_change)
                                            + 1e-12)
        scores["clip_direction"] = float(np.mean(cos))
    return scores


def eval_clip(source, edit, target=None, *, instruction: str = "", source_caption: str | None = None,
              edited_caption: str | None = None, clip=None) -> dict:
    """The metrics of one edit: uint8 (or [-1, 1] float) clips (F, H, W, 3) of one shape; `clip` a `ClipScorer`."""
    source, edit = as_uint8(source), as_uint8(edit)
    if source.shape != edit.shape:
        raise ValueError(f"source {source.shape} and edit {edit.shape} must have one shape")
    flows = source_flows(source)
    row = {"psnr_source": psnr(edit, source), "ssim_source": ssim(edit, source),
           "warp_error": warp_error(edit, flows), "source_warp_error": warp_error(source, flows)}
    if target is not None:
        target = as_uint8(target)
        if target.shape != edit.shape:
            raise ValueError(f"target {target.shape} and edit {edit.shape} must have one shape")
        row.update(psnr_target=psnr(edit, target), ssim_target=ssim(edit, target))
    if clip is not None:
        row.update(clip_scores(clip, source, edit, instruction, source_caption, edited_caption))
    return row


def mean_metrics(rows: list[dict]) -> dict:
    """{metric: mean over the rows that have it} (inf stays inf; nan and missing values are left out)."""
    out = {}
    for name in METRICS:
        values = [r[name] for r in rows if isinstance(r.get(name), (int, float)) and not math.isnan(r[name])]
        if values:
            out[name] = float(np.mean(values))
    return out


def eval_clips(sources, edits, targets=None, *, instructions=None, clip=None) -> dict:
    """Mean metrics of a batch of edits (B, F, H, W, 3), uint8 or [-1, 1] floats, e.g. validation's decoded
    source | edit | target; plus `eval_clips` (how many were measured)."""
    rows = [eval_clip(sources[i], edits[i], None if targets is None else targets[i],
                      instruction=instructions[i] if instructions else "", clip=clip) for i in range(len(edits))]
    return {**mean_metrics(rows), "eval_clips": len(rows)}
