"""Data-loading throughput: decoded training clips per second per DataLoader worker.

Measures what one worker of the video datamodule does per sample when it decodes pixels (no
precomputed latents): probe the container, pick a random clip (``clip_indices`` with an rng),
``decode_video`` those frames, ``resize_crop`` to the training size, and with edge on also
``compute_control("edge", rng=...)`` (random Canny thresholds, as in training). Tar reading,
collation and the host-to-device copy are left out (small next to decoding).

Without ``shards`` the source videos are synthesised first (4 clips per resolution, at that
resolution, mp4v as make-shards' synthetic data): a pan across a large 1/f ("pink") noise
texture -- the power spectrum of natural images -- with a few moving shapes and mild per-frame
sensor noise, 1.5 x num_frames long so the random clip start varies. Flat synthetic colours
would decode several times faster than camera video; this content is closer to it, but real
footage (and H.264/HEVC instead of MPEG-4 part 2) will differ: run it with ``shards`` on your
data for numbers that matter. The bitrate of the synthesised videos is printed with them.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

__all__ = ["RESOLUTIONS", "bench_data", "synth_source_clip"]

RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}
ALPHA = 1.25  # amplitude spectrum 1/f^ALPHA: natural images have about 1-1.4
CONTRAST = 45.0  # std of the texture, grey levels
SENSOR = 1.0  # std of the per-frame noise, grey levels


def _parse_resolution(name: str) -> tuple[int, int]:
    if name in RESOLUTIONS:
        return RESOLUTIONS[name]
    try:
        h, w = (int(v) for v in name.lower().split("x"))
    except ValueError:
        raise ValueError(f"resolution {name!r} is neither one of {', '.join(RESOLUTIONS)} nor HxW") from None
    return h, w


def _pink_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 colour texture with a 1/f amplitude spectrum (natural-image statistics)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    amp = np.maximum(np.sqrt(fx * fx + fy * fy), 1.0 / max(height, width)) ** -ALPHA
    channels = []
    for _ in range(3):
        spec = amp * np.exp(2j * np.pi * rng.random(amp.shape))
        img = np.fft.irfft2(spec, s=(height, width))
        channels.append((img - img.mean()) / (img.std() + 1e-8))
    img = np.stack(channels, -1) @ rng.uniform(0.3, 1.0, (3, 3))  # correlated colour channels
    img = (img - img.mean()) / (img.std() + 1e-8)
    return np.clip(128 + CONTRAST * img, 0, 255).astype(np.uint8)


def synth_source_clip(seed: int, num_frames: int, height: int, width: int) -> np.ndarray:
    """(T, H, W, 3) uint8: a camera pan over a pink-noise texture, moving shapes, sensor noise."""
    rng = np.random.default_rng(seed)
    tex = _pink_texture(rng, height * 3 // 2, width * 3 // 2)
    vy, vx = rng.uniform(-1.5, 1.5, 2) * min(height, width) / 480  # pixels per frame
    y0, x0 = (tex.shape[0] - height) / 2, (tex.shape[1] - width) / 2
    shapes = [
        (
            rng.uniform(0, width),
            rng.uniform(0, height),
            rng.uniform(-4, 4),
            rng.uniform(-3, 3),
            rng.uniform(0.04, 0.12) * height,
            tuple(int(c) for c in rng.integers(0, 256, 3)),
        )
        for _ in range(4)
    ]
    noise = np.empty((7, height, width, 3), np.int16)
    for n in noise:
        cv2.randn(n, 0, SENSOR)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        dy = np.clip(y0 + vy * (t - num_frames / 2), 0, tex.shape[0] - height)
        dx = np.clip(x0 + vx * (t - num_frames / 2), 0, tex.shape[1] - width)
        m = np.float32([[1, 0, -dx], [0, 1, -dy]])
        frame = cv2.warpAffine(tex, m, (width, height), flags=cv2.INTER_LINEAR)
        for cx, cy, sx, sy, r, colour in shapes:
            cv2.circle(frame, (int(cx + sx * t) % width, int(cy + sy * t) % height), int(r), colour, -1, cv2.LINE_AA)
        frames[t] = np.clip(frame.astype(np.int16) + noise[t % len(noise)], 0, 255).astype(np.uint8)
    return frames


def _synth_sources(folder: Path, height: int, width: int, num_frames: int, count: int = 4) -> tuple[list[bytes], str]:
    from datamodules.codec import encode_video

    videos, src_frames, fps = [], num_frames + num_frames // 2, 24.0
    for i in range(count):
        data = encode_video(synth_source_clip(1000 * height + i, src_frames, height, width), fps)
        (folder / f"{height}p_{i}.mp4").write_bytes(data)
        videos.append(data)
    mbps = sum(len(v) for v in videos) * 8 / (count * src_frames / fps) / 1e6
    return videos, f"synthetic pink-noise pan, mp4v {width}x{height}, {src_frames} frames @24fps, {mbps:.1f} Mbit/s"


def _shard_sources(shards: str, limit: int = 8) -> tuple[list[bytes], str]:
    from datamodules.shards import expand_shards, iter_tar_samples

    videos = []
    for url in expand_shards(shards):
        for sample in iter_tar_samples(url):
            if "mp4" in sample:
                videos.append(sample["mp4"])
            if len(videos) == limit:
                break
        if len(videos) == limit:
            break
    if not videos:
        raise ValueError(f"no mp4 samples in {shards!r}")
    return videos, f"{len(videos)} videos from {shards}"


def _loop(args: tuple) -> tuple[int, float]:
    """One worker: load clips for `seconds`; returns (clips, elapsed)."""
    from datamodules.codec import clip_indices, decode_video, probe, resize_crop
    from datamodules.controls import compute_control

    videos, height, width, num_frames, edge, seconds, seed = args
    rng = random.Random(seed)

    def one(i: int) -> None:
        data = videos[i % len(videos)]
        indices = clip_indices(probe(data).frames, num_frames, rng=rng)
        frames = resize_crop(decode_video(data, indices)[0], height, width)
        if edge:
            compute_control("edge", frames, rng=rng)

    one(0)  # warm-up (codec init, page cache)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one(n + 1)
        n += 1
    return n, time.perf_counter() - start


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_data(
    shards: str | None = None,
    resolutions: str = "480p,720p",
    num_frames: int = 93,
    seconds: float = 20.0,
    edge: str = "both",
    workers: int = 1,
) -> list[dict]:
    """Measure decoded training clips per second per data worker, with and without edge extraction.

    Args:
        shards: shards whose ``mp4`` members are decoded (up to 8 videos, resized to each
            resolution); None: synthesise source videos at each resolution (see the module doc).
        resolutions: comma-separated output sizes: 480p (480x832), 720p (720x1280) or HxW.
        num_frames: frames per clip.
        seconds: measuring time per configuration (after one warm-up clip).
        edge: "on", "off" or "both": also compute the edge control on the fly.
        workers: parallel worker processes (like DataLoader workers); clips/s is reported in
            total and per worker.

    Returns:
        One dict per configuration (also printed as JSON lines, then a markdown table).
    """
    if edge not in ("on", "off", "both"):
        raise ValueError(f"edge must be on, off or both, got {edge!r}")
    if workers < 1 or num_frames < 1 or seconds <= 0:
        raise ValueError("workers and num_frames must be >= 1 and seconds > 0")
    sizes = [(name.strip(), _parse_resolution(name.strip())) for name in resolutions.split(",") if name.strip()]
    edges = {"on": [True], "off": [False], "both": [False, True]}[edge]
    env = {
        "cpu": _cpu(),
        "cores": os.cpu_count(),
        "cv2": cv2.__version__,
        "cv2_threads": cv2.getNumThreads(),
        "python": platform.python_version(),
    }
    print(
        f"# data loading: {env['cpu']}, {env['cores']} cores, OpenCV {env['cv2']} "
        f"({env['cv2_threads']} threads), Python {env['python']}"
    )
    rows = []
    shard_videos = _shard_sources(shards) if shards is not None else None
    with tempfile.TemporaryDirectory(prefix="vidistill-bench-data-") as tmp:
        for name, (h, w) in sizes:
            if shard_videos is not None:
                videos, source = shard_videos
            else:
                t0 = time.perf_counter()
                videos, source = _synth_sources(Path(tmp), h, w, num_frames)
                print(f"# {name}: {source} (made in {time.perf_counter() - t0:.1f} s)")
            for on in edges:
                clips, elapsed = _run_workers(videos, h, w, num_frames, on, seconds, workers)
                row = {
                    "resolution": name,
                    "height": h,
                    "width": w,
                    "frames": num_frames,
                    "edge": on,
                    "workers": workers,
                    "clips": clips,
                    "seconds": round(elapsed, 2),
                    "clips_per_s": round(clips / elapsed, 3),
                    "clips_per_s_per_worker": round(clips / elapsed / workers, 3),
                    "ms_per_clip": round(1000 * elapsed * workers / max(clips, 1), 1),
                    "frames_per_s_per_worker": round(clips * num_frames / elapsed / workers, 1),
                    "source": source,
                    **env,
                }
                print(json.dumps(row))
                rows.append(row)
    print()
    print(format_table(rows))
    return rows


def _run_workers(
    videos: list[bytes], height: int, width: int, num_frames: int, edge: bool, seconds: float, workers: int
) -> tuple[int, float]:
    """(clips loaded by all workers, the longest worker's elapsed seconds)."""
    jobs = [(videos, height, width, num_frames, edge, seconds, 17 * i + 1) for i in range(workers)]
    if workers == 1:
        results = [_loop(jobs[0])]
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_loop, jobs)
    return sum(n for n, _ in results), max(e for _, e in results)


def format_table(rows: list[dict]) -> str:
    lines = [
        "| resolution | frames | edge | workers | clips/s per worker | ms per clip | frames/s per worker |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['resolution']} ({r['height']}x{r['width']}) | {r['frames']} | {'on' if r['edge'] else 'off'} | "
        f"{r['workers']} | {r['clips_per_s_per_worker']:.2f} | {r['ms_per_clip']:.0f} | "
        f"{r['frames_per_s_per_worker']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)
