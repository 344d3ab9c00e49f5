"""Control-adherence metrics for validation, evaluation and reports.

Each asks "does the generated video follow its control?" in the control's own terms, the way
Cosmos-Transfer evaluates its edge and blur branches:

- `edge_f1`: Canny edges of the generated video against the input edge map, matched within a
  few pixels (boundary precision / recall, pooled over all frames).
- `blur_ssim`: SSIM between the blurred generated video and the blurred reference, i.e. how
  well the generation keeps the layout and colours the blur control carries.

And three against ground truth, where a clip has one (the synthetic shards carry the shapes they
drew): `shape_iou` (are the shapes where they should be, filled?), `colour_match` (are they in
the caption's colours?) and `psnr` (how close are the pixels to the source clip?). Edge F1 alone
cannot tell a video of scattered blocks from one of filled shapes: random 4x4 blocks on a black
floor score 0.59 against a real clip's edges at 1 px.

Inputs are ``(T, H, W, 3)`` uint8 RGB numpy videos (decode or convert tensors beforehand).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    import torch

from datamodules.controls import blur, edge
from datamodules.synthetic import SHAPE_COLOURS

__all__ = ["FOREGROUND_LEVEL", "blur_ssim", "colour_match", "edge_f1", "psnr", "shape_iou"]

FOREGROUND_LEVEL = 40
"""A pixel is foreground (a shape) when its brightest channel exceeds this: the quickstart's floors
are black (25, 25, 25) and its shapes bright, saturated colours."""


def edge_f1(generated: np.ndarray, edge_map: np.ndarray, tolerance: int = 2, preset: str = "medium") -> float:
    """F1 of the generated video's Canny edges against the input edge map.

    generated: ``(T, H, W, 3)`` uint8; its edges are `edge(generated, preset)`, the same
        extractor that makes on-the-fly edge controls, so a video scores 1.0 against its own map.
    edge_map: ``(T, H, W, 3)`` or ``(T, H, W)``; nonzero pixels are edges.
    tolerance: a generated edge pixel counts as correct (precision) if a reference edge lies
        within this many pixels (Euclidean, a disk of radius `tolerance`), and symmetrically a
        reference pixel counts as found (recall). 0 requires exact overlap.

    Counts are pooled over all frames before P, R and F1 = 2PR / (P + R). Both videos without
    any edge: 1.0 (the control "nothing here" was followed); exactly one without edges: 0.0.
    """
    gen = edge(generated, preset)[..., 0] > 0
    ref = _edge_mask(edge_map)
    if ref.shape != gen.shape:
        raise ValueError(f"edge_map covers {ref.shape} (T, H, W), generated video {gen.shape}")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    n_gen, n_ref = int(gen.sum()), int(ref.sum())
    if n_gen == 0 or n_ref == 0:
        return 1.0 if n_gen == n_ref else 0.0
    precision = np.logical_and(gen, _dilate(ref, tolerance)).sum() / n_gen
    recall = np.logical_and(ref, _dilate(gen, tolerance)).sum() / n_ref
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def _edge_mask(edge_map: np.ndarray) -> np.ndarray:
    """Boolean ``(T, H, W)`` of edge pixels (any channel nonzero)."""
    edge_map = np.asarray(edge_map)
    if edge_map.ndim == 4:
        return (edge_map != 0).any(axis=-1)
    if edge_map.ndim == 3:
        return edge_map != 0
    raise ValueError(f"expected an edge map (T, H, W) or (T, H, W, C), got shape {edge_map.shape}")


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow each frame's True pixels by a disk of `radius` px (per frame, never across frames)."""
    if radius == 0:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) for m in mask]).astype(bool)


def blur_ssim(generated: np.ndarray, reference: np.ndarray, preset: str = "medium") -> float:
    """Mean per-frame SSIM between `blur(generated, preset)` and `blur(reference, preset)`.

    Both videos are ``(T, H, W, 3)`` uint8 of the same shape. The fixed preset blur (no rng)
    is applied to both, so only what the blur control carries is compared; SSIM is
    torchmetrics' (Gaussian window 11, sigma 1.5, data range 255, computed in float64 so
    identical inputs give 1 to rounding), averaged over frames. Frames smaller than 11 px use
    the largest odd window that fits.
    """
    # Imported here: torchmetrics pulls in torchvision and transformers and takes seconds to
    # import, which callers of edge_f1 alone (and data workers) should not pay.
    from torchmetrics.functional.image import structural_similarity_index_measure

    if generated.shape != reference.shape:
        raise ValueError(f"videos differ in shape: {generated.shape} vs {reference.shape}")
    preds, target = _to_tensor(blur(generated, preset)), _to_tensor(blur(reference, preset))
    side = min(generated.shape[1:3])
    kernel = min(11, side if side % 2 else side - 1)
    ssim = structural_similarity_index_measure(preds, target, data_range=255.0, kernel_size=kernel)
    return float(ssim)


def _to_tensor(frames: np.ndarray) -> torch.Tensor:
    """``(T, H, W, 3)`` uint8 -> ``(T, 3, H, W)`` float64, frames as the SSIM batch."""
    import torch

    return torch.from_numpy(frames).permute(0, 3, 1, 2).to(torch.float64)


def shape_iou(generated: np.ndarray, shapes: np.ndarray, level: int = FOREGROUND_LEVEL) -> float:
    """Mean over frames of the IoU between the generated video's foreground and the true shapes.

    generated: ``(T, H, W, 3)`` uint8; foreground = pixels whose max RGB exceeds `level`.
    shapes: ``(T, H, W)`` bool or 0/1, the shapes the clip really has (the generator's masks).
    A frame where both are empty counts 1 (nothing drawn where nothing is); one empty and the
    other not counts 0.
    """
    if generated.shape[:3] != shapes.shape[:3]:
        raise ValueError(f"video {generated.shape[:3]} and shape masks {shapes.shape[:3]} differ in size")
    fg = generated.max(axis=-1) > level
    truth = shapes.astype(bool)
    inter = (fg & truth).reshape(len(fg), -1).sum(1)
    union = (fg | truth).reshape(len(fg), -1).sum(1)
    return float(np.where(union > 0, inter / np.maximum(union, 1), 1.0).mean())


def colour_match(
    generated: np.ndarray, reference: np.ndarray, shapes: np.ndarray, level: int = FOREGROUND_LEVEL
) -> float:
    """The share of the true shapes' pixels that the generated video paints in the right colour.

    generated, reference: ``(T, H, W, 3)`` uint8, the generated video and the clip it should match.
    shapes: ``(T, H, W)`` bool or 0/1, the pixels the shapes cover (the generator's masks).

    A shape pixel counts when the generated pixel is bright (max RGB > `level`, as for
    `shape_iou`) and its nearest `SHAPE_COLOURS` entry (Euclidean in RGB) is the reference
    pixel's. The reference pixel, not the caption's words, names the colour because it tells
    which shape is drawn there (shapes overlap; a caption names several), and the clip was drawn
    in the caption's colours, so its pixels round to the entries the caption names: all of a
    shape's inside, and most of its anti-aliased, codec-blurred rim (a mask pixel is at least half
    shape). The rest are rim pixels half mixed with the floor that round to a neighbouring entry
    (yellow to orange, pink to purple): 2.5% of the mask of a 32x48 quickstart clip as drawn, 4%
    once mp4v-coded, up to 12% for a small shape. So a video painted in the caption's flat colours
    scores about 0.96 against a quickstart reference (mean over clips), a copy of the reference 1.

    Pooled over all shape pixels of all frames, so a frame counts by its shapes' area. A clip
    without any shape pixel has no colour to match: NaN, which means and spreads over clips leave
    out.
    """
    if generated.shape != reference.shape:
        raise ValueError(f"video {generated.shape} and reference {reference.shape} differ in size")
    if generated.shape[:3] != shapes.shape:
        raise ValueError(f"video {generated.shape[:3]} and shape masks {shapes.shape} differ in size")
    truth = shapes.astype(bool)
    if not truth.any():
        return float("nan")
    drawn, meant = generated[truth], reference[truth]  # (N, 3) each: only the shapes' pixels
    right = (drawn.max(axis=-1) > level) & (_nearest_shape_colour(drawn) == _nearest_shape_colour(meant))
    return float(right.mean())


_PALETTE = np.array(list(SHAPE_COLOURS.values()), np.int32)


def _nearest_shape_colour(pixels: np.ndarray) -> np.ndarray:
    """Index into `SHAPE_COLOURS` of the entry nearest each ``(N, 3)`` pixel (ties: the first)."""
    pixels = pixels.astype(np.int32)
    best = np.zeros(len(pixels), np.intp)
    best_d = np.full(len(pixels), np.iinfo(np.int32).max, np.int32)
    # one palette entry at a time: an (N, 9, 3) difference takes 108 bytes a shape pixel (1 GB
    # for a third of a 33-frame 720p clip)
    for i, colour in enumerate(_PALETTE):
        d = ((pixels - colour) ** 2).sum(axis=-1, dtype=np.int32)
        closer = d < best_d
        best[closer], best_d[closer] = i, d[closer]
    return best


def psnr(generated: np.ndarray, reference: np.ndarray, max_db: float = 100.0) -> float:
    """Peak signal-to-noise ratio in dB of a uint8 video against its reference (same shape):
    10 log10(255^2 / MSE) over every pixel and channel, at most `max_db` (identical videos: the
    cap, so means and spreads over clips stay finite)."""
    if generated.shape != reference.shape:
        raise ValueError(f"video {generated.shape} and reference {reference.shape} differ in size")
    mse = np.mean((generated.astype(np.float64) - reference.astype(np.float64)) ** 2)
    return max_db if mse == 0 else float(min(10 * np.log10(255.0**2 / mse), max_db))
