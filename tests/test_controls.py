"""Tests of datamodules/controls.py and datamodules/metrics.py on tiny synthetic videos."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest

from datamodules.codec import VideoDecodeError, decode_video, encode_video, resize_crop
from datamodules.controls import (
    BLUR_PRESETS,
    EDGE_PRESETS,
    MODALITIES,
    blur,
    compute_control,
    edge,
    load_control_video,
    mask_video,
    random_edge_thresholds,
    render_keypoints,
)
from datamodules.metrics import blur_ssim, edge_f1, psnr, shape_iou

T, H, W = 8, 48, 64


def scene(t: int = T, seed: int = 0) -> np.ndarray:
    """Textured background (stripes + noise) with a moving red square: plenty of edges and
    high frequencies for the controls to act on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    frames = np.zeros((t, H, W, 3), np.uint8)
    for i in range(t):
        stripes = 60 + 50 * np.sin(xx / 2.0 + i) + 40 * np.cos(yy / 3.0)
        frames[i] = np.clip(stripes + rng.normal(0, 8, (H, W)), 0, 255)[..., None]
        frames[i, 10:30, 8 + 2 * i : 28 + 2 * i] = (230, 30, 30)
    return frames


def high_freq(video: np.ndarray) -> float:
    """Mean absolute neighbour difference: falls as a video gets blurrier."""
    v = video.astype(np.float64)
    return float(np.abs(np.diff(v, axis=1)).mean() + np.abs(np.diff(v, axis=2)).mean())


# ---------------------------------------------------------------------------- edge


def test_edge_presets_are_transfers() -> None:
    assert EDGE_PRESETS == {
        "very_low": (20, 50),
        "low": (50, 100),
        "medium": (100, 200),
        "high": (200, 300),
        "very_high": (300, 400),
    }


def test_edge_output_binary_rgb() -> None:
    e = edge(scene())
    assert e.shape == (T, H, W, 3) and e.dtype == np.uint8
    assert set(np.unique(e)) == {0, 255}
    assert (e[..., 0] == e[..., 1]).all() and (e[..., 0] == e[..., 2]).all()
    # the preset is honoured: it equals Canny of the gray frame with (100, 200)
    gray = cv2.cvtColor(scene()[3], cv2.COLOR_RGB2GRAY)
    np.testing.assert_array_equal(e[3, ..., 0], cv2.Canny(gray, 100, 200))
    # higher thresholds keep fewer edges
    assert (edge(scene(), "very_high") > 0).sum() < (edge(scene(), "very_low") > 0).sum()


def test_random_thresholds_range_and_seed() -> None:
    draws = [random_edge_thresholds(random.Random(s)) for s in range(300)]
    lowers = [lo for lo, _ in draws]
    assert min(lowers) >= 20 and max(lowers) < 100
    assert all(50 <= hi - lo < 150 or hi == 255 for lo, hi in draws)
    assert all(hi <= 255 for _, hi in draws)
    assert len(set(draws)) > 50
    assert random_edge_thresholds(random.Random(7)) == random_edge_thresholds(random.Random(7))


def test_compute_edge_deterministic_per_seed() -> None:
    frames = scene()
    a = compute_control("edge", frames, rng=random.Random(1))
    b = compute_control("edge", frames, rng=random.Random(1))
    np.testing.assert_array_equal(a, b)
    others = [compute_control("edge", frames, rng=random.Random(s)) for s in range(2, 6)]
    assert any(not np.array_equal(a, o) for o in others)
    # without rng: the medium preset
    np.testing.assert_array_equal(compute_control("edge", frames), edge(frames, "medium"))


# ---------------------------------------------------------------------------- blur


def test_blur_presets_follow_transfer() -> None:
    assert list(BLUR_PRESETS) == ["very_low", "low", "medium", "high", "very_high"]
    assert [p["downup"] for p in BLUR_PRESETS.values()] == [4, 4, 10, 16, 16]
    for p in BLUR_PRESETS.values():
        lo, hi = p["downup_range"]
        assert 4 <= lo <= p["downup"] <= hi <= 16


def test_blur_changes_image_and_keeps_shape() -> None:
    frames = scene()
    b = blur(frames)
    assert b.shape == frames.shape and b.dtype == np.uint8
    assert np.abs(b.astype(int) - frames).mean() > 5
    # the picture survives: the red square is still red on average
    r, g, _ = b[0, 14:26, 12:24].reshape(-1, 3).mean(axis=0)
    assert r > g + 60


def test_blur_strength_increases_with_preset() -> None:
    frames = scene()
    energy = [high_freq(blur(frames, p)) for p in BLUR_PRESETS]
    assert energy[0] < high_freq(frames)
    assert all(a > b for a, b in zip(energy, energy[1:])), energy


def test_blur_deterministic_with_seed() -> None:
    frames = scene()
    for preset in (None, "medium"):
        a = compute_control("blur", frames, rng=random.Random(3), preset=preset)
        b = blur(frames, preset, rng=random.Random(3))
        np.testing.assert_array_equal(a, b)
        others = [blur(frames, preset, rng=random.Random(s)) for s in range(4, 10)]
        assert any(not np.array_equal(a, o) for o in others)
    np.testing.assert_array_equal(blur(frames), blur(frames))
    with pytest.raises(ValueError, match="rng"):
        blur(frames, None)


def test_compute_control_precomputed_modalities_refused() -> None:
    assert MODALITIES == ("edge", "blur", "depth", "seg", "keypoint")
    for modality in ("depth", "seg", "keypoint"):
        with pytest.raises(ValueError, match="precomputed"):
            compute_control(modality, scene())
    with pytest.raises(ValueError, match="unknown"):
        compute_control("normals", scene())


def test_bad_frames_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        edge(scene().astype(np.float32))
    with pytest.raises(ValueError, match="shape"):
        blur(scene()[..., 0])
    with pytest.raises(ValueError, match="preset"):
        edge(scene(), "extreme")


# ---------------------------------------------------------------------------- keypoints


def test_render_keypoints_draws_and_skips() -> None:
    kp = np.zeros((2, 17, 3))
    kp[:, :, :2] = np.nan
    kp[:, 5] = (10, 10, 1.0)  # left shoulder
    kp[:, 7] = (40, 30, 0.9)  # left elbow: limb (5, 7) is drawn
    kp[:, 9] = (55, 40, 0.0)  # left wrist, confidence 0: neither it nor limb (7, 9)
    video = render_keypoints(kp, H, W)
    assert video.shape == (2, H, W, 3) and video.dtype == np.uint8
    assert video[0, 10, 10].any() and video[1, 30, 40].any()
    assert video[0, 20, 25].any()  # midpoint of the shoulder-elbow limb
    assert not video[0, 40, 55].any() and not video[0, 35, 48].any()
    # joints and limbs get different colours
    assert not np.array_equal(video[0, 10, 10], video[0, 20, 25])


def test_render_keypoints_people_and_no_confidence() -> None:
    kp = np.full((1, 2, 17, 2), np.nan)
    kp[0, 0, 0] = (5, 5)
    kp[0, 1, 0] = (50, 40)
    video = render_keypoints(kp, H, W, radius=2)
    assert video[0, 5, 5].any() and video[0, 40, 50].any()
    assert video[0].any(axis=-1).sum() < 80  # two small dots, nothing else
    assert not video[0, 22, 27].any()  # no limb between different people
    with pytest.raises(ValueError, match="shape"):
        render_keypoints(np.zeros((2, 17)), H, W)


# ---------------------------------------------------------------------------- precomputed


def test_load_control_video_aligns_with_clip() -> None:
    frames = scene(12)
    for i in range(12):  # a per-frame level to check which frames come back
        frames[i, :6, :6] = 20 + 18 * i
    data = encode_video(frames, 24.0)
    indices = [2, 4, 6, 8]
    control = load_control_video(data, indices, 24, 24)
    assert control.shape == (4, 24, 24, 3)
    rgb, _ = decode_video(data, indices)
    np.testing.assert_array_equal(control, resize_crop(rgb, 24, 24))
    # the level patch lies outside the center crop: check order on an uncropped load
    full = load_control_video(data, indices, H, W)
    np.testing.assert_allclose(full[:, 1:5, 1:5].mean(axis=(1, 2, 3)), 20 + 18 * np.array(indices), atol=8)
    with pytest.raises(VideoDecodeError, match="control video"):
        load_control_video(data, [8, 10, 12], 24, 24)


def test_load_seg_nearest_keeps_labels() -> None:
    seg = np.zeros((4, H, W, 3), np.uint8)
    seg[:, :, : W // 2] = (255, 0, 0)
    seg[:, :, W // 2 :] = (0, 0, 255)
    data = encode_video(seg, 24.0)
    out = load_control_video(data, [0, 1], 30, 30, interpolation=cv2.INTER_NEAREST)
    decoded = decode_video(data, [0, 1])[0].reshape(-1, 3)
    assert {tuple(c) for c in out.reshape(-1, 3)} <= {tuple(c) for c in decoded}


def test_mask_video_binary_and_resized() -> None:
    mask = np.zeros((6, H, W, 3), np.uint8)
    mask[:, :, W // 2 :] = 255  # right half applies
    out = mask_video(encode_video(mask, 24.0), [1, 3], 12, 16)
    assert out.shape == (2, 12, 16) and out.dtype == np.float32
    assert set(np.unique(out)) == {0.0, 1.0}
    assert (out[:, :, :7] == 0).all() and (out[:, :, 9:] == 1).all()
    # arrays work too, single channel, all frames
    gray = mask_video(mask[..., 0], None, 24, 32)
    assert gray.shape == (6, 24, 32) and gray[:, :, 16:].all() and not gray[:, :, :16].any()
    with pytest.raises(VideoDecodeError):
        mask_video(mask, [5, 6], 12, 16)


# ---------------------------------------------------------------------------- metrics


def test_edge_f1_identical_and_blank() -> None:
    frames = scene()
    assert edge_f1(frames, edge(frames)) == 1.0
    assert edge_f1(frames, edge(frames)[..., 0]) == 1.0  # (T, H, W) maps work too
    assert edge_f1(np.zeros_like(frames), edge(frames)) < 0.05
    assert edge_f1(np.zeros_like(frames), np.zeros((T, H, W), np.uint8)) == 1.0


def test_edge_f1_tolerance_counts_shifted_edges() -> None:
    frames = np.zeros((2, H, W, 3), np.uint8)
    frames[:, 12:36, 16:48] = 200  # one rectangle: sparse, well-separated edges
    shifted = np.roll(edge(frames), 1, axis=2)
    assert edge_f1(frames, shifted, tolerance=0) < 0.6
    assert edge_f1(frames, shifted, tolerance=1) == 1.0
    assert edge_f1(frames, np.roll(edge(frames), 4, axis=2), tolerance=2) < 0.6


def test_blur_ssim() -> None:
    a, b = scene(seed=0), scene(seed=0)[::-1].copy()
    assert blur_ssim(a, a) == pytest.approx(1.0, abs=1e-5)
    assert blur_ssim(a, b) < 0.99
    assert blur_ssim(a, np.zeros_like(a)) < blur_ssim(a, b)
    with pytest.raises(ValueError, match="shape"):
        blur_ssim(a, a[:4])


def _square_clip(x0: int, colour=(230, 30, 30)) -> tuple[np.ndarray, np.ndarray]:
    """A 2-frame 32x48 clip: a 12x12 square at column x0 on the black floor, and its mask."""
    video = np.full((2, 32, 48, 3), 25, np.uint8)
    shapes = np.zeros((2, 32, 48), bool)
    video[:, 10:22, x0 : x0 + 12] = colour
    shapes[:, 10:22, x0 : x0 + 12] = True
    return video, shapes


def test_shape_iou_perfect_empty_and_shifted() -> None:
    video, shapes = _square_clip(10)
    assert shape_iou(video, shapes) == 1.0  # exactly the shapes
    blank = np.full_like(video, 25)  # the floor alone (max 25 <= 40)
    assert shape_iou(blank, shapes) == 0.0
    assert shape_iou(blank, np.zeros_like(shapes)) == 1.0  # nothing where nothing is
    moved, _ = _square_clip(16)  # shifted by 6 of 12 columns: overlap 6x12, union 18x12
    assert shape_iou(moved, shapes) == pytest.approx(6 / 18)
    dim, _ = _square_clip(10, colour=(40, 40, 40))  # not brighter than the level: not a shape
    assert shape_iou(dim, shapes) == 0.0
    half = video.copy()
    half[1] = 25  # one frame right, one empty: the mean over frames
    assert shape_iou(half, shapes) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="differ in size"):
        shape_iou(video[:1], shapes)


def test_psnr_against_hand_computed_values() -> None:
    video, _ = _square_clip(10)
    assert psnr(video, video) == 100.0  # identical: the cap
    off = video.astype(np.int16) + 5  # every value 5 off: MSE 25
    assert psnr(off.clip(0, 255).astype(np.uint8), video) == pytest.approx(10 * np.log10(255**2 / 25))
    with pytest.raises(ValueError, match="differ in size"):
        psnr(video[:1], video)


def test_synthetic_shapes_are_the_drawn_shapes() -> None:
    """The masks synthetic shards carry are where the generator drew its shapes: the clip's own
    frames score near 1 against them (anti-aliased rims aside), and drawing them changes no pixel
    and no random draw of the clip."""
    import random

    from datamodules.synthetic import load_shapes, shapes_bytes, synthetic_clip

    plain = synthetic_clip(random.Random(3), 4, 32, 48, ("plain",), ("black",), 1.8)
    frames, caption, shapes = synthetic_clip(random.Random(3), 4, 32, 48, ("plain",), ("black",), 1.8, with_shapes=True)
    assert np.array_equal(plain[0], frames) and plain[1] == caption
    assert shapes.shape == (4, 32, 48) and 0.05 < shapes.mean() < 0.95
    assert shape_iou(frames, shapes) > 0.9
    assert np.array_equal(load_shapes(shapes_bytes(shapes)), shapes)
