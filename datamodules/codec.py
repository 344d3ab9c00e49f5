"""Video bytes <-> uint8 RGB frames with OpenCV, in memory.

Shards hold videos as bytes (``mp4``, ``edge.mp4``, ...), so decoding reads straight from
memory: ``cv2.VideoCapture(io.BytesIO(data), cv2.CAP_FFMPEG, [])`` (OpenCV >= 4.11 with the
FFmpeg backend; the pip wheels, 4.11/4.12/5.0, have it). Where that constructor is missing or
refuses the stream (older OpenCV, builds without the stream API) we fall back to a temporary file.

Conventions: frames are ``(T, H, W, 3)`` uint8 **RGB** (OpenCV itself is BGR; the conversion
happens here and nowhere else), fps is a float. Anything undecodable, truncated or empty raises
`VideoDecodeError`, which the data pipeline catches to skip and count a broken sample.

Encoding (`encode_video`, `write_video`) goes through ``cv2.VideoWriter``, which only writes to
a path, so bytes are produced via a temporary file. Two codecs:

- ``"mp4v"`` (MPEG-4 part 2 in .mp4): fast, lossy, what shards and control videos use.
- ``"vp9"`` (VP9 in .webm): what browsers play (reports, sample pages). libvpx is slow on
  noisy content (seconds for a few hundred 256^2 noise frames), fine for previews.

Both need even width and height (4:2:0 chroma); OpenCV would silently drop the last row or
column, so odd sizes are refused instead.
"""

from __future__ import annotations

import errno
import io
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .files import written

__all__ = [
    "CODECS",
    "VideoDecodeError",
    "VideoInfo",
    "clip_indices",
    "decode_video",
    "encode_video",
    "nearest_bucket",
    "probe",
    "resize_crop",
    "write_video",
]

# codec name -> (file suffix, fourcc). "VP90" and "vp09" both open a VP9 writer in the
# OpenCV 5 wheels; FFmpeg warns that the tag is not a WebM tag and writes the standard one.
# mp4v plays almost everywhere but not in browsers; VP9 WebM plays in browsers; FFV1 (.mkv) is
# lossless, for evaluating generated videos exactly (metrics on tiny clips are codec-sensitive)
# VP8 WebM plays in browsers too and encodes ~6x faster than VP9 (OpenCV exposes no VP9 speed
# setting): what inference writes long videos with
CODECS: dict[str, tuple[str, str]] = {
    "mp4v": (".mp4", "mp4v"),
    "vp9": (".webm", "VP90"),
    "ffv1": (".mkv", "FFV1"),
    "vp8": (".webm", "VP80"),
}
_SUFFIX_CODECS = {".mp4": "mp4v", ".webm": "vp9", ".mkv": "ffv1"}


class VideoDecodeError(ValueError):
    """The bytes are not a decodable video, or have fewer frames than were asked for."""


@dataclass
class VideoInfo:
    """Container metadata as OpenCV reports it (see `probe` for how far to trust it)."""

    frames: int
    fps: float
    width: int
    height: int


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------


@contextmanager
def _capture(data: bytes) -> Iterator[cv2.VideoCapture]:
    """An opened ``VideoCapture`` over `data`, released (and any temp file removed) on exit."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"expected video bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise VideoDecodeError("empty video bytes")
    stream = io.BytesIO(data)  # must outlive the capture: FFmpeg reads from it lazily
    tmp_path = None
    try:
        cap = cv2.VideoCapture(stream, cv2.CAP_FFMPEG, [])
    except (cv2.error, TypeError):
        # No stream constructor in this OpenCV build: decode from a temporary file instead.
        tmp_path = _write_temp(data)
        cap = cv2.VideoCapture(tmp_path, cv2.CAP_FFMPEG)
    try:
        if not cap.isOpened():
            raise VideoDecodeError(f"OpenCV could not open the video ({len(data)} bytes)")
        yield cap
    finally:
        cap.release()
        if tmp_path is not None:
            os.remove(tmp_path)


def _write_temp(data: bytes) -> str:
    """Write `data` to a named temporary file and return its path (the caller removes it)."""
    fd, path = tempfile.mkstemp(suffix=".video")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def probe(data: bytes) -> VideoInfo:
    """Frame count, fps and size from the container, without decoding frames.

    The frame count is the container's claim: exact for the mp4 files OpenCV/FFmpeg write,
    but estimated from duration x fps for some containers (webm, streams without an index), it
    can be -1/0 when unknown, and a truncated file still reports the full count. Only
    `decode_video` tells how many frames really decode; use it (it raises) where it matters.
    """
    with _capture(data) as cap:
        return VideoInfo(
            frames=int(cap.get(cv2.CAP_PROP_FRAME_COUNT)),
            fps=float(cap.get(cv2.CAP_PROP_FPS)),
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )


def decode_video(data: bytes, indices: Sequence[int] | None = None) -> tuple[np.ndarray, float]:
    """Decode `data` to ``(T, H, W, 3)`` uint8 RGB frames and the fps.

    indices: the frame indices to return, in the given order (normally ascending; duplicates
        are allowed, e.g. for wrap-around or padding). Decoding is sequential: frames before
        the last wanted one are `grab`-bed (demuxed and decoded, but not converted), and only
        wanted ones are `retrieve`-d. ``None`` returns every frame.

    Raises VideoDecodeError for undecodable bytes, a video with no frames, or an index past the
    last decodable frame (a truncated file decodes fewer frames than its header claims).
    """
    wanted = _check_indices(indices)
    with _capture(data) as cap:
        fps = float(cap.get(cv2.CAP_PROP_FPS))
        if wanted is None:
            frames = _read_all(cap)
        else:
            by_index = _read_wanted(cap, wanted)
            frames = [by_index[int(i)] for i in indices]  # type: ignore[union-attr]
    if not frames:
        raise VideoDecodeError("video has no decodable frames")
    return np.stack(frames), fps


def _check_indices(indices: Sequence[int] | None) -> set[int] | None:
    """Validate requested indices; the set of distinct ones, or None for all frames."""
    if indices is None:
        return None
    if len(indices) == 0:
        raise ValueError("indices is empty; pass None to decode every frame")
    for i in indices:
        if not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"frame indices must be non-negative ints, got {i!r}")
    return {int(i) for i in indices}


def _to_rgb(frame_bgr: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(frame_bgr, cv2.COLOR_BGR2RGB)


def _read_all(cap: cv2.VideoCapture) -> list[np.ndarray]:
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            return frames
        frames.append(_to_rgb(frame))


def _read_wanted(cap: cv2.VideoCapture, wanted: set[int]) -> dict[int, np.ndarray]:
    """Frames at the `wanted` indices, keyed by index; raises if the video ends first."""
    last = max(wanted)
    frames: dict[int, np.ndarray] = {}
    for i in range(last + 1):
        if not cap.grab():
            raise VideoDecodeError(
                f"video has only {i} decodable frames, frame {last} was requested"
                " (truncated or shorter than its header says)"
            )
        if i in wanted:
            ok, frame = cap.retrieve()
            if not ok:
                raise VideoDecodeError(f"frame {i} could not be retrieved")
            frames[i] = _to_rgb(frame)
    return frames


# --------------------------------------------------------------------------------------------
# Clip selection and geometry
# --------------------------------------------------------------------------------------------


def clip_indices(
    total: int,
    num_frames: int,
    stride: int = 1,
    src_fps: float | None = None,
    target_fps: float | None = None,
    start: int | None = None,
    rng: random.Random | None = None,
) -> list[int]:
    """Frame indices of a `num_frames` clip out of a `total`-frame video.

    Step: `stride` frames, or with `target_fps` the float step ``src_fps / target_fps``, each
    index rounded half up (``start + floor(i * step + 0.5)``), so 30 -> 24 fps gives
    0, 1, 2, 4, 5, 6, 8, ...; a target above the source rate repeats frames.
    Start: `start` if given, else uniform over all starts that fit when `rng` is given, else 0.

    Raises VideoDecodeError("video too short ...") when the clip does not fit (also for a fixed
    `start` too close to the end), ValueError for inconsistent arguments.
    """
    offsets = _clip_offsets(num_frames, stride, src_fps, target_fps)
    span = offsets[-1] + 1
    if total < span:
        raise VideoDecodeError(f"video too short: the clip spans {span} frames, video has {total}")
    last_start = total - span
    if start is None:
        start = rng.randint(0, last_start) if rng is not None else 0
    elif not 0 <= start <= last_start:
        raise VideoDecodeError(
            f"video too short: a clip of {span} frames starting at {start} needs"
            f" {start + span} frames, video has {total}"
        )
    return [start + o for o in offsets]


def _clip_offsets(num_frames: int, stride: int, src_fps: float | None, target_fps: float | None) -> list[int]:
    """Offsets from the clip start (the first is 0)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if target_fps is None:
        return [i * stride for i in range(num_frames)]
    if stride != 1:
        raise ValueError("give either stride or target_fps, not both")
    if src_fps is None or not src_fps > 0 or not target_fps > 0:
        raise ValueError(f"target_fps needs positive src_fps and target_fps, got {src_fps}, {target_fps}")
    step = src_fps / target_fps
    return [math.floor(i * step + 0.5) for i in range(num_frames)]


def resize_crop(frames: np.ndarray, height: int, width: int, interpolation: int = cv2.INTER_AREA) -> np.ndarray:
    """Scale `frames` to cover ``(height, width)`` and center-crop the excess (aspect kept).

    Works on ``(T, H, W, C)`` and ``(T, H, W)``, any dtype OpenCV resizes. Implemented as crop
    first (the centered window of the target aspect ratio in source pixels), then one resize
    to the exact size: the same picture as resize-then-crop, without rounding leftovers.
    Use ``cv2.INTER_NEAREST`` for label maps and masks (values must not blend).
    """
    if frames.ndim not in (3, 4):
        raise ValueError(f"expected (T, H, W) or (T, H, W, C) frames, got shape {frames.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    src_h, src_w = frames.shape[1:3]
    crop_h, crop_w = _cover_window(src_h, src_w, height, width)
    top, left = (src_h - crop_h) // 2, (src_w - crop_w) // 2
    window = frames[:, top : top + crop_h, left : left + crop_w]
    if (crop_h, crop_w) == (height, width):
        return np.ascontiguousarray(window)
    return np.stack([_resize(f, height, width, interpolation) for f in window])


def _cover_window(src_h: int, src_w: int, height: int, width: int) -> tuple[int, int]:
    """Largest source window with the target aspect ratio (the part that survives the crop)."""
    if src_w * height > width * src_h:  # source is wider than the target: trim the sides
        return src_h, max(1, min(src_w, round(src_h * width / height)))
    return max(1, min(src_h, round(src_w * height / width))), src_w


def _resize(frame: np.ndarray, height: int, width: int, interpolation: int) -> np.ndarray:
    out = cv2.resize(frame, (width, height), interpolation=interpolation)
    # cv2 drops a trailing channel axis of size 1; keep the caller's layout.
    return out.reshape(height, width, *frame.shape[2:])


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The ``(height, width)`` bucket whose aspect ratio is closest to ``height / width``.

    Distance is ``|log(h / w) - log(bh / bw)|``, so 2:1 and 1:2 are equally far from 1:1.
    Ties go to the first bucket listed.
    """
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {height}x{width}")
    if not buckets:
        raise ValueError("no buckets given")
    if any(bh < 1 or bw < 1 for bh, bw in buckets):
        raise ValueError(f"bucket sizes must be positive, got {list(buckets)}")
    target = math.log(height / width)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


# --------------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------------


def encode_video(frames: np.ndarray, fps: float, codec: str = "mp4v") -> bytes:
    """Encode ``(T, H, W, 3)`` uint8 RGB frames to the bytes of an .mp4 ("mp4v"), .webm ("vp9") or .mkv ("ffv1")."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}; choose from {sorted(CODECS)}")
    suffix, _ = CODECS[codec]
    fd, path = tempfile.mkstemp(suffix=suffix)
    os.close(fd)
    try:
        _write(path, frames, fps, codec)
        return Path(path).read_bytes()
    finally:
        os.remove(path)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: float, codec: str | None = None) -> None:
    """Write ``(T, H, W, 3)`` uint8 RGB frames to `path`; the suffix picks the codec
    (.mp4 -> mp4v, .webm -> vp9, .mkv -> lossless ffv1) unless `codec` names one."""
    suffix = Path(path).suffix.lower()
    if suffix not in _SUFFIX_CODECS:
        raise ValueError(f"unsupported video suffix {suffix!r}; use one of {sorted(_SUFFIX_CODECS)}")
    codec = codec or _SUFFIX_CODECS[suffix]
    if codec not in CODECS or CODECS[codec][0] != suffix:
        raise ValueError(f"codec {codec!r} does not write {suffix} files")
    with written(path) as tmp:  # under its final name only once complete
        _write(os.fspath(tmp), frames, fps, codec)
        _check_written(tmp, path)


def _check_written(tmp: Path, path: str | os.PathLike) -> None:
    """OpenCV's writer reports no failed write: on a full disk it leaves a truncated file. A
    video that does not open again is refused, as "No space left on device" when its disk is
    (nearly) full."""
    capture = cv2.VideoCapture(os.fspath(tmp), cv2.CAP_FFMPEG)
    opened = capture.isOpened()
    capture.release()
    if opened and tmp.stat().st_size > 0:
        return
    if shutil.disk_usage(tmp.parent).free < 2**20:
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(path))
    raise RuntimeError(f"{path}: OpenCV wrote a video that does not open again")


def _write(path: str, frames: np.ndarray, fps: float, codec: str) -> None:
    _check_frames_to_encode(frames, fps)
    _, height, width, _ = frames.shape
    fourcc = cv2.VideoWriter_fourcc(*CODECS[codec][1])
    writer = cv2.VideoWriter(path, cv2.CAP_FFMPEG, fourcc, float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError(
            f"OpenCV could not open a {codec} writer for {path} (missing folder, or an OpenCV"
            " build without this encoder)"
        )
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def _check_frames_to_encode(frames: np.ndarray, fps: float) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"expected (T, H, W, 3) RGB frames, got shape {shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 frames, got {frames.dtype}")
    t, height, width, _ = frames.shape
    if t == 0:
        raise ValueError("cannot encode a video with no frames")
    if height % 2 or width % 2:
        raise ValueError(
            f"width and height must be even for 4:2:0 video, got {height}x{width} (resize_crop to an even size first)"
        )
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
