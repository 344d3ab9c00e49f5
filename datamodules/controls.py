"""Control videos for control training and inference, all on ``(T, H, W, 3)`` uint8 RGB frames.

Two modalities are computed on the fly from the RGB clip, as Cosmos-Transfer2.5 does:

- ``edge``: Canny per frame (`edge`), with Transfer's five threshold presets for inference and
  its random thresholds for training (`random_edge_thresholds`).
- ``blur`` (Transfer's "vis"): an edge-preserving smoothing plus a down-then-up resize
  (`blur`), with Transfer2.5's presets for inference and its random parameters for training.

Three come precomputed in the shard and are only loaded and aligned here: ``depth`` and ``seg``
(``<modality>.mp4``, decoded at the RGB clip's frame indices by `load_control_video`) and
``keypoint`` (``keypoint.json``, drawn by `render_keypoints`). `mask_video` reads the binary
spatial masks that restrict where a control applies.

Determinism: every random choice goes through the `random.Random` passed in (never the global
`random`/`np.random` state), so a seeded generator gives the same controls in any worker.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from datamodules.codec import VideoDecodeError, decode_video, resize_crop

__all__ = [
    "BLUR_PRESETS",
    "BLUR_REFERENCE_SIDE",
    "BLUR_TRAINING",
    "COCO_SKELETON",
    "CONTROL_INTERPOLATION",
    "EDGE_PRESETS",
    "MODALITIES",
    "blur",
    "compute_control",
    "edge",
    "load_control_video",
    "mask_video",
    "random_edge_thresholds",
    "render_keypoints",
]

MODALITIES = ("edge", "blur", "depth", "seg", "keypoint")
_COMPUTED = ("edge", "blur")

# Precomputed controls are resized like the RGB clip; label maps must not blend.
CONTROL_INTERPOLATION: dict[str, int] = {
    "depth": cv2.INTER_AREA,
    "seg": cv2.INTER_NEAREST,
    "keypoint": cv2.INTER_AREA,
    "edge": cv2.INTER_AREA,
    "blur": cv2.INTER_AREA,
}


def _check_frames(frames: np.ndarray) -> None:
    """Refuse anything but a (T, H, W, 3) uint8 video with at least one frame."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"expected (T, H, W, 3) RGB frames, got shape {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("expected at least one frame")


# --------------------------------------------------------------------------------------------
# Edge
# --------------------------------------------------------------------------------------------

# Cosmos-Transfer's Canny (lower, upper) presets. The thresholds apply to the Sobel gradient
# magnitude, which can exceed 255, so "high" and "very_high" are not out of range.
EDGE_PRESETS: dict[str, tuple[int, int]] = {
    "very_low": (20, 50),
    "low": (50, 100),
    "medium": (100, 200),
    "high": (200, 300),
    "very_high": (300, 400),
}


def random_edge_thresholds(rng: random.Random) -> tuple[int, int]:
    """Transfer's training thresholds: lower uniform in [20, 100), upper = lower + a uniform
    draw in [50, 150), capped at 255."""
    t_lower = rng.randrange(20, 100)
    return t_lower, min(255, t_lower + rng.randrange(50, 150))


def edge(
    frames: np.ndarray,
    preset: str | None = "medium",
    thresholds: tuple[int, int] | None = None,
    color: bool = False,
) -> np.ndarray:
    """Canny edges of each frame, ``(T, H, W, 3)`` uint8 in {0, 255}.

    thresholds: explicit (lower, upper); overrides `preset`.
    color: run Canny on the RGB frame (OpenCV then takes, per pixel, the channel with the
        largest gradient), which is what Transfer's own extractor does; the default runs it on
        the grayscale frame, so edges between equally bright colours are not found.
    The map is replicated to 3 channels so the tokenizer encodes it like any RGB video.
    """
    _check_frames(frames)
    lower, upper = _edge_thresholds(preset, thresholds)
    maps = [cv2.Canny(f if color else _gray(f), lower, upper) for f in frames]
    return np.repeat(np.stack(maps)[..., None], 3, axis=-1)


def _gray(frame: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _edge_thresholds(preset: str | None, thresholds: tuple[int, int] | None) -> tuple[int, int]:
    if thresholds is not None:
        lower, upper = thresholds
        if not 0 <= lower <= upper:
            raise ValueError(f"edge thresholds must satisfy 0 <= lower <= upper, got {thresholds}")
        return int(lower), int(upper)
    if preset is None:
        raise ValueError("edge() needs a preset or explicit thresholds")
    if preset not in EDGE_PRESETS:
        raise ValueError(f"unknown edge preset {preset!r}; choose from {list(EDGE_PRESETS)}")
    return EDGE_PRESETS[preset]


# --------------------------------------------------------------------------------------------
# Blur ("vis")
# --------------------------------------------------------------------------------------------
#
# Following Cosmos-Transfer2.5's AddControlInputBlur + Blur augmentors
# (cosmos_transfer2/_src/transfer2/datasets/augmentors/control_input.py and blur.py):
#   1. pre-downscale by `pre_downscale` (INTER_AREA),
#   2. filter: bilateral, gaussian, or bilateral then gaussian,
#   3. back to full size (INTER_LINEAR),
#   4. down-then-up resize by `downup` (area down, bicubic up), which sets most of the strength.
# Inference presets are Transfer2.5's exactly: bilateral d=30, sigma_color=150, sigma_space=100,
# and per preset the pre-downscale (1, 4, 2, 1, 4) and down-up factor (4, 4, 10, 16, 16);
# strength grows with the preset (low = very_low with a 4x coarser bilateral, very_high = high
# likewise). Training draws follow Transfer2.5's random_blur_config: the filter combination
# (bilateral 0.3 / gaussian 0.5 / both 0.2), its parameters, a pre-downscale in 1..4 and a
# down-up factor in 4..16. Transfer2.5 has one training distribution; here a preset given with an
# rng narrows the down-up factor to that preset's `downup_range` (our choice: overlapping
# bands of 4..16 around the preset's value), and preset=None uses the full 4..16.
#
# Transfer's filter sizes are in pixels of 720p video. We scale the spatial ones (d,
# sigma_space, gaussian ksize and sigma) by longest_side / 720 of the input video, so a 64 px
# toy clip is blurred like its 720p original (d=30 on 64 px would wipe out the picture).
# sigma_color is an intensity, not a distance, and stays unscaled.

BLUR_REFERENCE_SIDE = 720


def _blur_preset(pre_downscale: int, downup: int, downup_range: tuple[int, int]) -> dict[str, Any]:
    """A preset: Transfer2.5's inference values plus our training band for the down-up factor."""
    return {
        "bilateral": {"d": 30, "sigma_color": 150.0, "sigma_space": 100.0},
        "pre_downscale": pre_downscale,
        "downup": downup,
        "downup_range": downup_range,
    }


BLUR_PRESETS: dict[str, dict[str, Any]] = {
    "very_low": _blur_preset(1, 4, (4, 6)),
    "low": _blur_preset(4, 4, (4, 8)),
    "medium": _blur_preset(2, 10, (8, 12)),
    "high": _blur_preset(1, 16, (12, 16)),
    "very_high": _blur_preset(4, 16, (14, 16)),
}

# Training distribution (rng given); integer ranges inclusive.
BLUR_TRAINING: dict[str, Any] = {
    "filters": {("bilateral",): 0.3, ("gaussian",): 0.5, ("bilateral", "gaussian"): 0.2},
    "bilateral": {"d": (15, 49), "sigma_color": (100, 299), "sigma_space": (50, 149)},
    "gaussian": {"ksize": (21, 29), "sigma": (10.5, 14.5)},
    "pre_downscale": (1, 4),
    "downup": (4, 16),
}


@dataclass(frozen=True)
class _BlurParams:
    """One draw of blur parameters; filter sizes in 720p pixels (scaled at apply time)."""

    pre_downscale: int
    downup: int
    bilateral: tuple[int, float, float] | None  # d, sigma_color, sigma_space
    gaussian: tuple[int, float] | None  # ksize, sigma


def blur(frames: np.ndarray, preset: str | None = "medium", rng: random.Random | None = None) -> np.ndarray:
    """The blur ("vis") control of `frames`, ``(T, H, W, 3)`` uint8.

    rng None: the preset's fixed (Transfer2.5 inference) parameters. rng given: random
    parameters for training, with the down-up factor in the preset's `downup_range`
    (preset=None: Transfer2.5's full training distribution). One draw per video, so every
    frame of a clip gets the same blur.
    """
    _check_frames(frames)
    params = _fixed_blur_params(preset) if rng is None else _random_blur_params(preset, rng)
    scale = max(frames.shape[1:3]) / BLUR_REFERENCE_SIDE
    return np.stack([_blur_frame(f, params, scale) for f in frames])


def _preset(preset: str) -> dict[str, Any]:
    if preset not in BLUR_PRESETS:
        raise ValueError(f"unknown blur preset {preset!r}; choose from {list(BLUR_PRESETS)}")
    return BLUR_PRESETS[preset]


def _fixed_blur_params(preset: str | None) -> _BlurParams:
    if preset is None:
        raise ValueError("blur(preset=None) draws random parameters and needs an rng")
    p = _preset(preset)
    bilateral = (p["bilateral"]["d"], p["bilateral"]["sigma_color"], p["bilateral"]["sigma_space"])
    return _BlurParams(p["pre_downscale"], p["downup"], bilateral, None)


def _random_blur_params(preset: str | None, rng: random.Random) -> _BlurParams:
    """A Transfer2.5-style training draw (see the notes above BLUR_PRESETS)."""
    downup_range = BLUR_TRAINING["downup"] if preset is None else _preset(preset)["downup_range"]
    combos = list(BLUR_TRAINING["filters"])
    filters = rng.choices(combos, weights=list(BLUR_TRAINING["filters"].values()))[0]
    bilateral = gaussian = None
    if "bilateral" in filters:
        r = BLUR_TRAINING["bilateral"]
        d, sigma_color, sigma_space = (rng.randint(*r[k]) for k in ("d", "sigma_color", "sigma_space"))
        bilateral = (d, float(sigma_color), float(sigma_space))
    if "gaussian" in filters:
        r = BLUR_TRAINING["gaussian"]
        gaussian = (rng.randint(*r["ksize"]), rng.uniform(*r["sigma"]))
    pre_downscale = rng.randint(*BLUR_TRAINING["pre_downscale"])
    return _BlurParams(pre_downscale, rng.randint(*downup_range), bilateral, gaussian)


def _blur_frame(frame: np.ndarray, p: _BlurParams, scale: float) -> np.ndarray:
    """Pre-downscale, filter, restore size, then down-up resize one RGB frame."""
    h, w = frame.shape[:2]
    small = _shrink(frame, p.pre_downscale)
    if p.bilateral is not None:
        d, sigma_color, sigma_space = p.bilateral
        sigma_space = max(sigma_space * scale, 0.1)
        small = cv2.bilateralFilter(small, _odd(d * scale), sigma_color, sigma_space)
    if p.gaussian is not None:
        ksize, sigma = p.gaussian
        k = _odd(ksize * scale)
        small = cv2.GaussianBlur(small, (k, k), max(sigma * scale, 0.1))
    if small.shape[:2] != (h, w):
        small = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(_shrink(small, p.downup), (w, h), interpolation=cv2.INTER_CUBIC)


def _shrink(frame: np.ndarray, factor: int) -> np.ndarray:
    """Downscale by an integer factor with area averaging (antialiased), at least 1 px."""
    if factor <= 1:
        return frame
    h, w = frame.shape[:2]
    size = (max(1, w // factor), max(1, h // factor))
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _odd(x: float) -> int:
    """Nearest odd integer >= 1 (OpenCV kernel sizes must be odd)."""
    n = max(1, round(x))
    return n if n % 2 else n + 1


# --------------------------------------------------------------------------------------------
# Keypoints
# --------------------------------------------------------------------------------------------

# COCO's 17 keypoints: 0 nose, 1/2 eyes, 3/4 ears, 5/6 shoulders, 7/8 elbows, 9/10 wrists,
# 11/12 hips, 13/14 knees, 15/16 ankles (left, right). Limbs as in COCO's person skeleton.
COCO_SKELETON: tuple[tuple[int, int], ...] = (
    (15, 13),
    (13, 11),
    (16, 14),
    (14, 12),
    (11, 12),
    (5, 11),
    (6, 12),
    (5, 6),
    (5, 7),
    (6, 8),
    (7, 9),
    (8, 10),
    (1, 2),
    (0, 1),
    (0, 2),
    (1, 3),
    (2, 4),
    (3, 5),
    (4, 6),
)


def render_keypoints(
    keypoints: np.ndarray,
    height: int,
    width: int,
    skeleton: Sequence[tuple[int, int]] = COCO_SKELETON,
    radius: int = 3,
    thickness: int = 2,
) -> np.ndarray:
    """Draw pose keypoints as a ``(T, height, width, 3)`` uint8 RGB video on black.

    keypoints: ``(T, K, 2|3)`` for one person or ``(T, P, K, 2|3)`` for P people, in pixel
        coordinates (x, y), optionally with a confidence column. A point with confidence <= 0
        or a NaN anywhere is not drawn, nor is any limb touching it (the usual encoding of
        "not visible"; it also lets P vary per frame with NaN padding).
    Limbs get one colour each (evenly spaced hues), joints one colour per keypoint index, so
    left and right limbs stay distinguishable to the model.
    """
    kp = _as_people(keypoints)
    num_k = kp.shape[2]
    bad = [pair for pair in skeleton if not all(0 <= i < num_k for i in pair)]
    if bad:
        raise ValueError(f"skeleton limbs {bad} index past the {num_k} keypoints given")
    limb_colors, joint_colors = _palette(len(skeleton)), _palette(num_k)
    video = np.zeros((kp.shape[0], height, width, 3), np.uint8)
    for canvas, people in zip(video, kp):
        for person in people:
            _draw_person(canvas, person, skeleton, limb_colors, joint_colors, radius, thickness)
    return video


def _as_people(keypoints: np.ndarray) -> np.ndarray:
    """Normalise to ``(T, P, K, 3)`` float with a confidence column (1 where absent)."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.ndim == 3:
        kp = kp[:, None]
    if kp.ndim != 4 or kp.shape[-1] not in (2, 3):
        raise ValueError(f"expected keypoints (T, K, 2|3) or (T, P, K, 2|3), got shape {np.shape(keypoints)}")
    if kp.shape[-1] == 2:
        kp = np.concatenate([kp, np.ones(kp.shape[:-1] + (1,))], axis=-1)
    return kp


def _palette(n: int) -> list[tuple[int, int, int]]:
    """`n` saturated RGB colours with evenly spaced hues."""
    hues = np.linspace(0, 180, n, endpoint=False).astype(np.uint8)  # OpenCV hue is 0..179
    hsv = np.stack([hues, np.full(n, 255, np.uint8), np.full(n, 255, np.uint8)], -1)[None]
    return [tuple(int(c) for c in rgb) for rgb in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]]


def _draw_person(
    canvas: np.ndarray,
    person: np.ndarray,
    skeleton: Sequence[tuple[int, int]],
    limb_colors: list[tuple[int, int, int]],
    joint_colors: list[tuple[int, int, int]],
    radius: int,
    thickness: int,
) -> None:
    """Limbs first, joints on top, skipping invisible points."""
    visible = np.isfinite(person).all(axis=1) & (person[:, 2] > 0)
    # Far off-canvas points still give the right line direction; the clip only keeps them
    # inside OpenCV's int32 coordinates.
    xy = np.clip(np.nan_to_num(person[:, :2]), -(2**20), 2**20).round().astype(int)
    pts = [(int(x), int(y)) if v else None for (x, y), v in zip(xy, visible)]
    for (a, b), color in zip(skeleton, limb_colors):
        if pts[a] is not None and pts[b] is not None:
            cv2.line(canvas, pts[a], pts[b], color, thickness, cv2.LINE_AA)
    for pt, color in zip(pts, joint_colors):
        if pt is not None:
            cv2.circle(canvas, pt, radius, color, -1, cv2.LINE_AA)


# --------------------------------------------------------------------------------------------
# Precomputed controls and masks
# --------------------------------------------------------------------------------------------


def load_control_video(
    data: bytes,
    indices: Sequence[int],
    height: int,
    width: int,
    interpolation: int = cv2.INTER_AREA,
) -> np.ndarray:
    """A precomputed control clip (depth, seg, keypoint renders, ...) aligned with the RGB clip.

    Decodes the same frame `indices` as the RGB clip and applies the same `resize_crop` to
    ``(height, width)``, so both line up pixel for pixel when the control video has the RGB
    video's size (or aspect ratio). Pass ``interpolation=cv2.INTER_NEAREST`` for segmentation
    (see `CONTROL_INTERPOLATION`): label colours must not blend into colours of no class.
    Raises VideoDecodeError when the control video is undecodable or shorter than the clip.
    """
    try:
        frames, _ = decode_video(data, indices)
    except VideoDecodeError as e:
        raise VideoDecodeError(f"control video: {e}") from e
    return resize_crop(frames, height, width, interpolation)


def mask_video(
    data_or_frames: bytes | np.ndarray,
    indices: Sequence[int] | None,
    height: int,
    width: int,
) -> np.ndarray:
    """A binary mask video (white = control applies) as ``(T, height, width)`` float32 in {0, 1}.

    data_or_frames: video bytes, or frames ``(T, H, W)`` / ``(T, H, W, C)`` uint8.
    indices: the clip's frame indices (None: all frames). Pixels brighter than 127 (luma) are
    1; thresholding happens before the nearest-neighbour `resize_crop`, so codec noise and
    resizing never produce values other than 0 and 1.
    """
    frames = _mask_frames(data_or_frames, indices)
    if frames.ndim == 4:
        frames = frames[..., 0] if frames.shape[-1] == 1 else np.stack([_gray(f) for f in frames])
    binary = (frames > 127).astype(np.uint8)
    return resize_crop(binary, height, width, cv2.INTER_NEAREST).astype(np.float32)


def _mask_frames(data_or_frames: bytes | np.ndarray, indices: Sequence[int] | None) -> np.ndarray:
    if isinstance(data_or_frames, (bytes, bytearray, memoryview)):
        return decode_video(bytes(data_or_frames), indices)[0]
    frames = np.asarray(data_or_frames)
    if frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] not in (1, 3)):
        raise ValueError(f"expected mask frames (T, H, W) or (T, H, W, 1|3), got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 mask frames (white = 255), got {frames.dtype}")
    if indices is None:
        return frames
    if len(indices) == 0 or max(indices) >= len(frames) or min(indices) < 0:
        raise VideoDecodeError(f"mask has {len(frames)} frames, clip needs indices {list(indices)}")
    return frames[list(indices)]


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def compute_control(
    modality: str,
    frames: np.ndarray,
    rng: random.Random | None = None,
    preset: str | None = None,
) -> np.ndarray:
    """The control video of `modality` computed from RGB `frames`, ``(T, H, W, 3)`` uint8.

    edge: random thresholds (`random_edge_thresholds`) when `rng` is given and `preset` is
        None (training), else the preset (default "medium").
    blur: random parameters when `rng` is given (within `preset` if given, else Transfer2.5's
        full training distribution), else the preset (default "medium").
    depth / seg / keypoint need models or annotations and must come precomputed: ValueError.
    """
    if modality == "edge":
        if rng is not None and preset is None:
            return edge(frames, thresholds=random_edge_thresholds(rng))
        return edge(frames, preset or "medium")
    if modality == "blur":
        return blur(frames, preset if rng is not None else (preset or "medium"), rng)
    if modality in MODALITIES:
        source = "keypoint.json" if modality == "keypoint" else f"{modality}.mp4"
        raise ValueError(
            f"{modality!r} controls cannot be computed on the fly; they must come precomputed"
            f" ({source} in the shard). Computed modalities: {list(_COMPUTED)}"
        )
    raise ValueError(f"unknown control modality {modality!r}; choose from {list(MODALITIES)}")
