"""Tests of datamodules/codec.py on tiny synthetic videos (64x48, a few frames)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from datamodules.codec import (
    VideoDecodeError,
    clip_indices,
    decode_video,
    encode_video,
    nearest_bucket,
    probe,
    resize_crop,
    write_video,
)

T, H, W = 12, 48, 64


def moving_square(t: int = T, h: int = H, w: int = W) -> np.ndarray:
    """A red square moving right over a per-frame brightness ramp: every frame differs, and
    frame i's background level (20 + 15 i) identifies it after lossy coding."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i] = 20 + 15 * i
        frames[i, 12:28, 4 + 3 * i : 20 + 3 * i] = (230, 30, 30)
    return frames


def background(frames: np.ndarray) -> np.ndarray:
    """Per-frame background level (the top-left patch, away from the square)."""
    return frames[:, :8, :8].reshape(len(frames), -1).mean(axis=1)


@pytest.fixture(scope="module")
def mp4() -> bytes:
    return encode_video(moving_square(), fps=24.0)


def test_mp4_roundtrip(mp4: bytes) -> None:
    frames, fps = decode_video(mp4)
    assert frames.shape == (T, H, W, 3) and frames.dtype == np.uint8
    assert fps == pytest.approx(24.0)
    assert np.abs(frames.astype(int) - moving_square()).mean() < 10
    # RGB, not BGR: the square is red after decoding.
    r, g, b = frames[0, 16:24, 8:16].reshape(-1, 3).mean(axis=0)
    assert r > 180 and b < 80 and g < 80
    assert probe(mp4).frames == T and (probe(mp4).width, probe(mp4).height) == (W, H)


def test_vp9_webm_roundtrip(tmp_path) -> None:
    data = encode_video(moving_square(8), fps=12.0, codec="vp9")
    assert data[:4] == b"\x1a\x45\xdf\xa3"  # EBML magic: a Matroska/WebM file
    frames, fps = decode_video(data)
    assert frames.shape == (8, H, W, 3) and fps == pytest.approx(12.0)
    assert np.abs(frames.astype(int) - moving_square(8)).mean() < 10
    write_video(tmp_path / "a.webm", moving_square(8), 12.0)
    assert (tmp_path / "a.webm").read_bytes()[:4] == b"\x1a\x45\xdf\xa3"


def test_write_video_suffix(tmp_path) -> None:
    write_video(tmp_path / "a.mp4", moving_square(4), 8.0)
    assert decode_video((tmp_path / "a.mp4").read_bytes())[0].shape == (4, H, W, 3)
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "a.avi", moving_square(4), 8.0)


def test_indices_selection(mp4: bytes) -> None:
    want = [1, 4, 4, 9, 11]
    frames, _ = decode_video(mp4, want)
    assert frames.shape == (len(want), H, W, 3)
    expected = 20 + 15 * np.array(want)
    np.testing.assert_allclose(background(frames), expected, atol=6)
    # wrap-around order is kept as given
    wrapped, _ = decode_video(mp4, [10, 11, 0, 1])
    np.testing.assert_allclose(background(wrapped), 20 + 15 * np.array([10, 11, 0, 1]), atol=6)


def test_index_past_end_raises(mp4: bytes) -> None:
    with pytest.raises(VideoDecodeError, match="decodable"):
        decode_video(mp4, [0, T])


def test_truncated_and_empty_raise(mp4: bytes) -> None:
    with pytest.raises(VideoDecodeError):
        decode_video(mp4[: len(mp4) // 2])
    with pytest.raises(VideoDecodeError):
        decode_video(b"")
    with pytest.raises(VideoDecodeError):
        decode_video(b"not a video" * 50)
    with pytest.raises(VideoDecodeError):
        probe(b"")


def test_truncated_webm_raises_on_missing_frames() -> None:
    # WebM still opens when cut, and still claims all frames: only decoding finds the end.
    data = encode_video(moving_square(8), fps=12.0, codec="vp9")
    cut = data[: len(data) // 2]
    assert len(decode_video(cut)[0]) < 8
    with pytest.raises(VideoDecodeError, match="decodable"):
        decode_video(cut, list(range(8)))


def test_zero_frame_video_raises(tmp_path) -> None:
    import cv2

    # A writer closed without frames leaves a container with no video frames.
    path = str(tmp_path / "empty.mp4")
    cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 24.0, (W, H)).release()
    with pytest.raises(VideoDecodeError):
        decode_video((tmp_path / "empty.mp4").read_bytes())


def test_encode_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="even"):
        encode_video(np.zeros((2, 47, 64, 3), np.uint8), 24.0)
    with pytest.raises(ValueError, match="uint8"):
        encode_video(np.zeros((2, 48, 64, 3), np.float32), 24.0)
    with pytest.raises(ValueError, match="no frames"):
        encode_video(np.zeros((0, 48, 64, 3), np.uint8), 24.0)
    with pytest.raises(ValueError, match="codec"):
        encode_video(moving_square(2), 24.0, codec="h265")


# ---------------------------------------------------------------------------- clip_indices


def test_clip_indices_stride() -> None:
    assert clip_indices(100, 4) == [0, 1, 2, 3]
    assert clip_indices(100, 4, stride=3) == [0, 3, 6, 9]
    assert clip_indices(100, 4, stride=3, start=10) == [10, 13, 16, 19]


def test_clip_indices_target_fps() -> None:
    # 30 -> 24 fps: step 1.25, rounded half up per index
    assert clip_indices(100, 6, src_fps=30, target_fps=24) == [0, 1, 3, 4, 5, 6]
    assert clip_indices(100, 4, src_fps=30, target_fps=10) == [0, 3, 6, 9]
    # upsampling repeats frames
    assert clip_indices(100, 4, src_fps=10, target_fps=20) == [0, 1, 1, 2]
    with pytest.raises(ValueError):
        clip_indices(100, 4, target_fps=10)  # no src_fps
    with pytest.raises(ValueError):
        clip_indices(100, 4, stride=2, src_fps=30, target_fps=10)


def test_clip_indices_random_start_seeded() -> None:
    draws = [clip_indices(50, 8, stride=2, rng=random.Random(s)) for s in range(20)]
    assert draws[3] == clip_indices(50, 8, stride=2, rng=random.Random(3))
    starts = {d[0] for d in draws}
    assert len(starts) > 5 and min(starts) >= 0 and max(starts) <= 50 - 15
    assert all(d == list(range(d[0], d[0] + 16, 2)) for d in draws)


def test_clip_indices_too_short() -> None:
    assert clip_indices(15, 8, stride=2) == list(range(0, 15, 2))  # spans exactly 15
    with pytest.raises(VideoDecodeError, match="too short"):
        clip_indices(14, 8, stride=2)
    with pytest.raises(VideoDecodeError, match="too short"):
        clip_indices(20, 8, stride=2, start=6)
    with pytest.raises(VideoDecodeError, match="too short"):
        clip_indices(0, 1, rng=random.Random(0))


# ---------------------------------------------------------------------------- geometry


def test_resize_crop_shapes() -> None:
    assert resize_crop(moving_square(3), 32, 32).shape == (3, 32, 32, 3)
    assert resize_crop(moving_square(3), 96, 160).shape == (3, 96, 160, 3)
    assert resize_crop(np.zeros((2, 48, 64), np.uint8), 24, 40).shape == (2, 24, 40)
    assert resize_crop(np.zeros((2, 48, 64, 1), np.float32), 24, 40).shape == (2, 24, 40, 1)


def test_resize_crop_is_centered() -> None:
    # 48x96: left quarter red, right quarter blue, middle half green. A square crop keeps
    # only the middle, in both directions of the aspect mismatch.
    frames = np.zeros((1, 48, 96, 3), np.uint8)
    frames[:, :, :24] = (255, 0, 0)
    frames[:, :, 24:72] = (0, 255, 0)
    frames[:, :, 72:] = (0, 0, 255)
    out = resize_crop(frames, 32, 32)
    assert (out == (0, 255, 0)).all()
    tall = resize_crop(frames.transpose(0, 2, 1, 3), 32, 32)
    assert (tall == (0, 255, 0)).all()
    # a wider target keeps everything, only scaled
    wide = resize_crop(frames, 24, 48)
    assert (wide[:, :, :10] == (255, 0, 0)).all() and (wide[:, :, -10:] == (0, 0, 255)).all()


def test_nearest_bucket() -> None:
    buckets = [(480, 640), (640, 640), (640, 480), (384, 768)]
    assert nearest_bucket(720, 1280, buckets) == (384, 768)  # 16:9 is nearer 2:1 than 4:3
    assert nearest_bucket(1000, 1000, buckets) == (640, 640)
    assert nearest_bucket(1280, 960, buckets) == (640, 480)
    assert nearest_bucket(300, 410, buckets) == (480, 640)
    with pytest.raises(ValueError):
        nearest_bucket(10, 10, [])


def test_temp_file_fallback_without_stream_api(monkeypatch, mp4: bytes) -> None:
    # OpenCV builds without the in-memory stream constructor decode through a temp file.
    import io

    import cv2

    real = cv2.VideoCapture

    def no_streams(source, *args):
        if isinstance(source, io.BytesIO):
            raise TypeError("this OpenCV has no stream API")
        return real(source, *args)

    monkeypatch.setattr(cv2, "VideoCapture", no_streams)
    frames, fps = decode_video(mp4, [5])
    assert frames.shape == (1, H, W, 3) and fps == pytest.approx(24.0)
    np.testing.assert_allclose(background(frames), [20 + 15 * 5], atol=6)
