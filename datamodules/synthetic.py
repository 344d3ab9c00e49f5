"""The embedded-default dataset: captioned clips of moving shapes, generated, never downloaded.

Each clip shows 1-3 coloured shapes (circle, square, triangle) that move in one direction
(left/right/up/down) and grow or shrink, over a floor in one colour: textured (striped,
checkered, dotted or gradient, the default) or plain. Plain floors leave the shapes' outlines as
the only edges, which is what the CPU quickstart uses: a tiny model learns them in minutes, and
Edge F1 then separates a video that follows its edge control from one that does not (clips
paired at random score about 0.06 at 1 px; textures alone give 0.3). The caption names every
shape's size, colour, kind, direction and
scaling and the floor's colour and pattern, e.g.
``"a large red circle moves left and grows over a gray striped floor, and a small blue square
moves up and shrinks"``, so a text-conditioned model has something to learn from the words.

Everything is a function of a seed: clip ``i`` of a dataset is drawn from its own
``random.Random(f"{seed}:{i}")``, so any shard can be regenerated alone (resumable writing) and
the same seed gives byte-identical shards on any machine with the same OpenCV build.

Two writers:

* :func:`write_synthetic_shards`: real webdataset shards (``mp4`` + ``txt`` + ``json`` + real
  control videos such as ``edge.mp4``), the input of every pipeline stage on the embedded default.
* :func:`write_latent_shards`: shape-only shards of random latents and text embeddings at the
  real model's shapes (no videos), for GPU benchmarks where no real weights or videos exist.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence

import cv2
import numpy as np

from .seeds import mix_seed

__all__ = [
    "SHAPES",
    "SHAPE_COLOURS",
    "FLOOR_COLOURS",
    "PATTERNS",
    "SHAPES_MEMBER",
    "load_shapes",
    "shapes_bytes",
    "synthetic_clip",
    "write_synthetic_shards",
    "write_latent_shards",
]

SHAPES = ("circle", "square", "triangle")
# bright, saturated colours for the shapes (RGB)
SHAPE_COLOURS = {
    "red": (230, 30, 30),
    "green": (40, 200, 60),
    "blue": (40, 80, 240),
    "yellow": (250, 220, 40),
    "white": (245, 245, 245),
    "orange": (250, 140, 20),
    "purple": (150, 60, 200),
    "cyan": (40, 220, 230),
    "pink": (250, 130, 190),
}
# darker, muted colours for the floor, so every shape stands out against it (RGB)
FLOOR_COLOURS = {
    "gray": (110, 110, 110),
    "brown": (110, 70, 40),
    "navy": (30, 40, 100),
    "olive": (100, 100, 40),
    "teal": (30, 100, 100),
    "maroon": (110, 30, 40),
    "black": (25, 25, 25),
}
PATTERNS = ("striped", "checkered", "dotted", "gradient")  # the default textures
FLOORS = PATTERNS + ("plain",)
DIRECTIONS = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}

_SUBPIXEL = 4  # cv2 drawing with shift=4: 1/16-pixel positions, so slow motion stays smooth


def _floor(
    rng: random.Random,
    height: int,
    width: int,
    patterns: Sequence[str] = PATTERNS,
    colours: Sequence[str] | None = None,
) -> tuple[np.ndarray, str]:
    """A (H, W, 3) uint8 floor and its words, e.g. ``"gray striped"`` (``"gray"`` when plain)."""
    name = rng.choice(sorted(colours or FLOOR_COLOURS))
    pattern = rng.choice(tuple(patterns))
    if pattern == "plain":
        return np.broadcast_to(np.array(FLOOR_COLOURS[name], np.uint8), (height, width, 3)).copy(), name
    base = np.array(FLOOR_COLOURS[name], np.float32)
    light = np.minimum(base * 1.6 + 40, 255)  # the second tone of the texture
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    period = rng.uniform(0.08, 0.2) * min(height, width)
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)  # coordinate along a random direction
    if pattern == "striped":
        t = (np.floor(u / period) % 2).astype(np.float32)
    elif pattern == "checkered":
        v = -x * math.sin(angle) + y * math.cos(angle)
        t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    elif pattern == "dotted":
        cy, cx = (y % period) - period / 2, (x % period) - period / 2
        t = (cy * cy + cx * cx < (0.3 * period) ** 2).astype(np.float32)
    else:  # gradient along the random direction
        t = (u - u.min()) / max(float(u.max() - u.min()), 1e-6)
    img = base + t[..., None] * (light - base)
    return np.clip(img, 0, 255).astype(np.uint8), f"{name} {pattern}"


def _draw(frame: np.ndarray, kind: str, cx: float, cy: float, r: float, colour: tuple[int, int, int]) -> None:
    """Draw one filled shape centred at (cx, cy) with 'radius' r (pixels, sub-pixel accurate)."""
    s = 1 << _SUBPIXEL
    if kind == "circle":
        cv2.circle(frame, (round(cx * s), round(cy * s)), max(round(r * s), 1), colour, -1, cv2.LINE_AA, _SUBPIXEL)
        return
    if kind == "square":
        pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    else:  # triangle, pointing up
        pts = [(cx, cy - r), (cx + r * 0.866, cy + r * 0.5), (cx - r * 0.866, cy + r * 0.5)]
    poly = np.round(np.array(pts) * s).astype(np.int32)[None]
    cv2.fillPoly(frame, poly, colour, cv2.LINE_AA, _SUBPIXEL)


def synthetic_clip(
    rng: random.Random,
    num_frames: int,
    height: int,
    width: int,
    floors: Sequence[str] = PATTERNS,
    floor_colours: Sequence[str] | None = None,
    shape_scale: float = 1.0,
    with_shapes: bool = False,
) -> tuple[np.ndarray, str] | tuple[np.ndarray, str, np.ndarray]:
    """Draw one captioned clip of 1-3 moving, scaling shapes over a textured floor.

    Args:
        rng: the only source of randomness (the clip is a pure function of its state).
        num_frames: frames T.
        height: frame height H in pixels.
        width: frame width W in pixels.
        floors: floor patterns to draw from (`FLOORS`: the textures and "plain").
        floor_colours: floor colour names to draw from (`FLOOR_COLOURS`; None: all of them).
        shape_scale: multiplies every shape's size (1: radii of 7-20% of the shorter side). A
            tiny model on coarse tokens needs shapes several tokens wide to draw them.
        with_shapes: also return where the shapes are (the ground truth of `shape_iou`).

    Returns:
        ``(frames, caption)``: frames (T, H, W, 3) uint8 RGB and an English caption; with
        `with_shapes`, ``(frames, caption, shapes)``, shapes (T, H, W) bool: the pixels the
        shapes cover at least half (drawn with the same anti-aliasing, drawing no random number).
    """
    if num_frames < 1 or height < 8 or width < 8:
        raise ValueError(f"need num_frames >= 1 and a frame of at least 8x8, got {num_frames}x{height}x{width}")
    bad = [f for f in floors if f not in FLOORS]
    if bad or not floors:
        raise ValueError(f"floors must be a non-empty subset of {FLOORS}, got {list(floors)}")
    _check_colours(floor_colours)
    if not 0 < shape_scale <= 3:
        raise ValueError(f"shape_scale must be in (0, 3], got {shape_scale}")
    floor, floor_words = _floor(rng, height, width, floors, floor_colours)
    n = rng.choice((1, 1, 2, 2, 3))
    colours = rng.sample(sorted(SHAPE_COLOURS), n)  # distinct colours: every shape is nameable
    side = min(height, width)
    shapes, phrases = [], []
    for colour in colours:
        kind = rng.choice(SHAPES)
        direction = rng.choice(sorted(DIRECTIONS))
        grows = rng.random() < 0.5
        large = rng.random() < 0.5
        r0 = shape_scale * side * (rng.uniform(0.14, 0.2) if large else rng.uniform(0.07, 0.11))
        r1 = r0 * (rng.uniform(1.4, 1.8) if grows else rng.uniform(0.45, 0.65))
        dx, dy = DIRECTIONS[direction]
        travel = rng.uniform(0.35, 0.55) * (width if dx else height)
        # start so the shape ends up still (mostly) inside the frame
        cx = rng.uniform(0.25, 0.75) * width - dx * travel / 2
        cy = rng.uniform(0.25, 0.75) * height - dy * travel / 2
        shapes.append((kind, SHAPE_COLOURS[colour], cx, cy, dx * travel, dy * travel, r0, r1))
        size = "large" if large else "small"
        phrases.append(f"a {size} {colour} {kind} moves {direction} and {'grows' if grows else 'shrinks'}")
    article = "an" if floor_words[0] in "aeiou" else "a"
    caption = f"{phrases[0]} over {article} {floor_words} floor"
    if len(phrases) > 1:
        caption += ", and " + ", and ".join(phrases[1:])

    frames = np.empty((num_frames, height, width, 3), np.uint8)
    cover = np.zeros((num_frames, height, width), np.uint8)
    for t in range(num_frames):
        a = t / max(num_frames - 1, 1)  # 0 -> 1 over the clip
        frame = frames[t]
        frame[:] = floor
        for kind, rgb, cx, cy, mx, my, r0, r1 in shapes:
            _draw(frame, kind, cx + a * mx, cy + a * my, r0 + a * (r1 - r0), rgb)
            if with_shapes:
                _draw(cover[t], kind, cx + a * mx, cy + a * my, r0 + a * (r1 - r0), (255,))
    return (frames, caption, cover >= 128) if with_shapes else (frames, caption)


SHAPES_MEMBER = "shapes.npy"
"""The member holding a synthetic clip's shape masks: (T, H, W) bool as a .npy file."""


def shapes_bytes(shapes: np.ndarray) -> bytes:
    """(T, H, W) bool shape masks as the bytes of a .npy file (what SHAPES_MEMBER holds)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.asarray(shapes, dtype=bool), allow_pickle=False)
    return buf.getvalue()


def load_shapes(data: bytes) -> np.ndarray:
    """The (T, H, W) bool shape masks of a SHAPES_MEMBER or a `<name>.shapes.npy` file."""
    import io

    shapes = np.load(io.BytesIO(data), allow_pickle=False)
    if shapes.ndim != 3:
        raise ValueError(f"shape masks must be (T, H, W), got {shapes.shape}")
    return shapes.astype(bool)


def _check_colours(colours: Sequence[str] | None) -> None:
    bad = [c for c in colours or () if c not in FLOOR_COLOURS]
    if bad or colours is not None and not colours:
        raise ValueError(f"floor colours must be a non-empty subset of {sorted(FLOOR_COLOURS)}, got {list(colours)}")


def _sample_rng(seed: int, index: int) -> random.Random:
    # str seeding goes through SHA-512: stable across processes, machines and Python versions
    return random.Random(f"vidistill-synthetic:{seed}:{index}")


def write_synthetic_shards(
    out: str,
    num_samples: int = 64,
    samples_per_shard: int = 16,
    num_frames: int = 33,
    height: int = 64,
    width: int = 96,
    fps: float = 24.0,
    seed: int = 0,
    controls: Sequence[str] = ("edge",),
    progress: bool = True,
    prefix: str = "train",
    resume: bool = True,
    floors: Sequence[str] = PATTERNS,
    floor_colours: Sequence[str] | None = None,
    shape_scale: float = 1.0,
) -> list[str]:
    """Write the synthetic dataset as webdataset shards and return their paths.

    Per sample (key ``s{seed}-{index:06d}``): ``mp4`` (mp4v), ``txt`` (the caption), ``json``
    (caption, fps, frames, width, height, source "synthetic", seed, index) and one
    ``{modality}.mp4`` per entry of `controls`, computed from the clip's own frames with
    ``compute_control`` at the fixed "medium" preset (edge: Canny 100/200; blur: Transfer2.5's
    medium), so the control matches the pixels exactly. Deterministic: the same arguments give
    byte-identical shards; resumable like ``vidistill make-shards`` (index.json in `out`).

    Args:
        out: output folder.
        num_samples: number of clips.
        samples_per_shard: clips per shard.
        num_frames: frames per clip.
        height: frame height (even, for 4:2:0 video).
        width: frame width (even).
        fps: frame rate written to the video and json.
        seed: dataset seed.
        controls: computed control modalities to store ("edge", "blur").
        progress: show a progress bar.
        prefix: shard names are ``{prefix}-{index:06d}.tar``.
        resume: keep shards a previous identical run finished.
        floors: floor patterns to draw from (textures by default; "plain" for outline-only edges).
        floor_colours: floor colours to draw from (None: all of `FLOOR_COLOURS`).
        shape_scale: multiplies every shape's size (see `synthetic_clip`).
    """
    from datamodules.codec import encode_video
    from datamodules.controls import compute_control
    from datamodules.writer import write_shards

    controls = tuple(controls)
    floors = tuple(floors)
    if not floors or any(f not in FLOORS for f in floors):
        raise ValueError(f"floors must be a non-empty subset of {FLOORS}, got {list(floors)}")
    floor_colours = None if floor_colours is None else tuple(floor_colours)
    _check_colours(floor_colours)
    bad = [m for m in controls if m not in ("edge", "blur")]
    if bad:
        raise ValueError(f"synthetic clips can carry computed controls only (edge, blur), got {bad}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if height % 2 or width % 2:
        raise ValueError(f"height and width must be even (4:2:0 video), got {height}x{width}")
    keys = [f"s{seed}-{i:06d}" for i in range(num_samples)]

    def build(key: str) -> list[tuple[str, bytes]]:
        index = int(key.rsplit("-", 1)[1])
        frames, caption, cover = synthetic_clip(
            _sample_rng(seed, index), num_frames, height, width, floors, floor_colours, shape_scale, with_shapes=True
        )
        meta = {
            "caption": caption,
            "fps": float(fps),
            "frames": num_frames,
            "width": width,
            "height": height,
            "source": "synthetic",
            "seed": seed,
            "index": index,
            "controls": [f"{m}.mp4" for m in controls],
        }
        members = [("mp4", encode_video(frames, fps)), ("txt", caption.encode()), ("json", json.dumps(meta).encode())]
        members.append((SHAPES_MEMBER, shapes_bytes(cover)))
        for m in controls:
            members.append((f"{m}.mp4", encode_video(compute_control(m, frames, preset="medium"), fps)))
        return members

    config = {
        "mode": "synthetic-video",
        "seed": seed,
        "frames": num_frames,
        "size": [height, width],
        "fps": fps,
        "controls": controls,
        "version": 1,
        "shapes": SHAPES_MEMBER,  # shards written before the member existed are rewritten
    }
    if floors != PATTERNS:  # only then, so shards written before the option still resume
        config["floors"] = floors
    if floor_colours is not None:
        config["floor_colours"] = floor_colours
    if shape_scale != 1.0:
        config["shape_scale"] = shape_scale
    return write_shards(
        out,
        keys,
        build,
        samples_per_shard,
        prefix,
        config,
        resume,
        progress,
        info={"source": "synthetic video", "seed": seed},
    )


def write_latent_shards(
    out: str,
    num_samples: int = 64,
    latent_shape: tuple[int, int, int, int] = (16, 24, 88, 160),
    text_shape: tuple[int, int] = (512, 1024),
    samples_per_shard: int = 16,
    seed: int = 0,
    dtype: str = "bfloat16",
    control_modalities: Sequence[str] = ("edge",),
    fps: float = 24.0,
    prefix: str = "train",
    resume: bool = True,
    progress: bool = True,
) -> list[str]:
    """Write shape-only shards of random latents and text embeddings; returns their paths.

    For GPU benchmarks at the real model's shapes where no weights or videos exist. Per sample:
    ``latent.safetensors`` ("latent" and one "control.<m>" per modality, each `latent_shape`,
    standard normal), ``text.safetensors`` ("emb" `text_shape` standard normal, "mask" all
    ones uint8), ``txt`` "synthetic" and ``json`` (caption, fps). No video: read them with the
    datamodule's latent and text-embedding options. The defaults are the Wan2.1 latents of a
    720p 93-frame clip and a 512-token, 1024-wide embedding; a 16-sample shard of them is about
    370 MB in bfloat16.

    Args:
        out: output folder.
        num_samples: number of samples.
        latent_shape: (C, T', H', W') of every latent.
        text_shape: (L, D) of the text embedding.
        samples_per_shard: samples per shard.
        seed: seed of the random tensors (one torch.Generator per sample).
        dtype: "bfloat16", "float16" or "float32".
        control_modalities: names of the control latents to add.
        fps: frame rate written to the json (the datamodule reports it per clip).
        prefix: shard names are ``{prefix}-{index:06d}.tar``.
        resume: keep shards a previous identical run finished.
        progress: show a progress bar.
    """
    import torch
    from safetensors.torch import save as st_save

    from datamodules.formats import TEXT_MEMBER, save_text
    from datamodules.writer import write_shards

    store = getattr(torch, dtype, None) if isinstance(dtype, str) else None
    if not isinstance(store, torch.dtype) or not store.is_floating_point:
        raise ValueError(f"dtype must name a torch float dtype (bfloat16, float16, float32), got {dtype!r}")
    latent_shape, text_shape = tuple(int(v) for v in latent_shape), tuple(int(v) for v in text_shape)
    if len(latent_shape) != 4 or len(text_shape) != 2 or min(latent_shape + text_shape) < 1:
        raise ValueError(f"latent_shape must be (C, T, H, W) and text_shape (L, D), got {latent_shape}, {text_shape}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    control_modalities = tuple(control_modalities)
    keys = [f"l{seed}-{i:06d}" for i in range(num_samples)]
    meta = json.dumps({"caption": "synthetic", "fps": float(fps), "source": "synthetic latent"}).encode()

    def build(key: str) -> list[tuple[str, bytes]]:
        gen = torch.Generator().manual_seed(mix_seed(seed, int(key.rsplit("-", 1)[1])))
        rand = lambda shape: torch.randn(shape, generator=gen).to(store)  # noqa: E731
        latents = {"latent": rand(latent_shape)}
        for m in control_modalities:
            latents[f"control.{m}"] = rand(latent_shape)
        text = save_text(rand(text_shape), torch.ones(text_shape[0], dtype=torch.uint8))
        return [
            ("txt", b"synthetic"),
            ("json", meta),
            (TEXT_MEMBER, text),
            ("latent.safetensors", st_save(latents)),
        ]

    config = {
        "mode": "synthetic-latent",
        "seed": seed,
        "latent": latent_shape,
        "text": text_shape,
        "dtype": dtype,
        "controls": control_modalities,
        "fps": fps,
    }
    return write_shards(
        out,
        keys,
        build,
        samples_per_shard,
        prefix,
        config,
        resume,
        progress,
        info={"source": "synthetic latent", "seed": seed},
    )
