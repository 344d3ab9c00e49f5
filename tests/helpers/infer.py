"""Shared by the inference tests: a tiny two-branch teacher, tiny clips, spec files, in-process
`vidistill infer`."""

import json
import socket
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from datamodules.codec import write_video
from modules.denoiser import Denoiser
from modules.nets import preset
from modules.sampling import GenerationSettings, SamplerConfig
from tools.cli import main

ROOT = Path(__file__).resolve().parents[2]
H, W = 32, 48


def moving_square(frames: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    video = np.full((frames, H, W, 3), 40, np.uint8)
    color = rng.integers(120, 255, 3)
    for t in range(frames):
        video[t, 8:20, 4 + 3 * t : 16 + 3 * t] = color
    return video


def make_model(path: Path) -> str:
    """A tiny teacher with edge and blur branches (non-zero, so controls matter), saved in `path`."""
    cfg = preset("tiny", latent_channels=12)
    cfg.control.channels, cfg.modalities = 12, ["edge", "blur"]
    net = Denoiser.build(cfg, seed=0)
    with torch.no_grad():
        for p in net.controls.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    net.save_pretrained(path)
    GenerationSettings(
        tokenizer={"kind": "pixel", "path": None, "options": {"spatial": 2}},
        text={"encoder": "tiny", "max_length": 16},
        sampler=asdict(SamplerConfig(steps=2, guidance=0.0, shift=3.0)),
    ).save(path)
    return str(path)


def make_clips(path: Path) -> Path:
    """input.mp4 (a moving square, 10 frames) and mask.mp4 (its left half) in `path`."""
    write_video(path / "input.mp4", moving_square(10), 8.0)
    mask = np.zeros((10, H, W, 3), np.uint8)
    mask[:, :, : W // 2] = 255
    write_video(path / "mask.mp4", mask, 8.0)
    return path


def run_infer(*args):
    try:
        main(["infer", *map(str, args)])
    except SystemExit as err:
        return err.code
    return 0


def write_spec(folder: Path, text: str, name: str = "spec.json") -> Path:
    (folder / name).write_text(text)
    return folder / name


def long_spec(clips: Path, **kw) -> Path:
    spec = {
        "name": "long",
        "prompt": "a square",
        "video_path": "input.mp4",
        "resolution": "32x48",
        "num_video_frames_per_chunk": 4,
        "num_conditional_frames": 1,
        "num_steps": 2,
        "guidance": 0,
        "edge": {},
        **kw,
    }
    return write_spec(clips, json.dumps(spec))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
