"""Sampling a network: `Sampler` (teacher with CFG over a shifted grid, distilled student over its
fixed t-list, both through `denoise`), its `SamplerConfig`, and `GenerationSettings`, the
generation.json a model directory carries. Shared by sample videos, KD data and inference;
plain torch (no Lightning).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from . import flow
from .denoiser import Cond, Denoiser


@dataclass
class SamplerConfig:
    """How to sample. Teacher defaults follow Transfer2.5 (35 steps, guidance 3)."""

    sampler: str = "euler"
    """euler, dpmpp_2m (teacher grids) or student (fixed t-list, no CFG)."""
    steps: int = 35
    guidance: float = 3.0
    """Cosmos-form CFG weight: pred = cond + g (cond - uncond); 0 disables CFG."""
    shift: float = 5.0
    """Time shift of the teacher grid (and of the student's t-list)."""
    t_list: tuple[float, ...] = flow.STUDENT_T_LIST
    """Student times before the shift."""
    renoise: str = "fresh"
    """Student re-noising between steps: fresh noise or the deterministic eps estimate."""


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1] (the tokenizers' input range)."""
    return video.float().div(127.5).sub(1.0)


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    return video.float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def guided(denoiser: Denoiser, cond: Cond, guidance: float) -> flow.Denoise:
    """A denoise(x_t, t) closure with Cosmos-form CFG against the negative prompt."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = denoiser.denoise(x, t, cond)
        if guidance == 0:
            return x0
        return flow.cfg(x0, denoiser.denoise(x, t, cond.negative()), guidance)

    return fn


class Sampler(nn.Module):
    """A Denoiser with the tokenizer and text encoder inference uses beside it (optional for
    callers that bring latents and embeddings), sampled with `sample`."""

    def __init__(self, denoiser: Denoiser, tokenizer: nn.Module | None = None, text_encoder: nn.Module | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @torch.no_grad()
    def sample(
        self,
        cond: Cond,
        noise: torch.Tensor,
        cfg: SamplerConfig = SamplerConfig(),
        generator: torch.Generator | None = None,
        progress: bool = False,
        through: tuple[float, ...] = (),
        on_state: flow.OnState | None = None,
    ) -> torch.Tensor:
        """Latents x0 from `noise` (the state at t = 1) under `cond`.

        Teacher samplers: `through` (real times) makes the grid pass exactly through them
        (`flow.schedule_through`, KD data at the student's t-list) and `on_state(t, x)` sees the
        state at every grid time."""
        if cfg.sampler == "student":
            t_list = flow.student_t_list(cfg.t_list, cfg.shift)
            return flow.sample_student(guided(self.denoiser, cond, 0.0), noise, t_list, generator, cfg.renoise)
        samplers = {"euler": flow.sample_euler, "dpmpp_2m": flow.sample_dpmpp_2m}
        if cfg.sampler not in samplers:
            raise ValueError(f"unknown sampler {cfg.sampler!r}; choose euler, dpmpp_2m or student")
        ts = flow.schedule_through(cfg.steps, through, cfg.shift) if through else flow.schedule(cfg.steps, cfg.shift)
        return samplers[cfg.sampler](guided(self.denoiser, cond, cfg.guidance), noise, ts, progress, on_state)


GENERATION_FILE = "generation.json"
DEFAULT_FPS = 16.0


# --- what a model directory says about generating with it ------------------------------------------


@dataclass
class GenerationSettings:
    """`generation.json` next to a network's config.json: what inference needs besides weights.

    Written by every stage's export and by consolidate / combine, so `vidistill infer --model DIR`
    needs no recipe; infer's flags override it (imported Cosmos weights come without one)."""

    tokenizer: dict = field(default_factory=lambda: {"kind": "pixel", "path": None, "options": {"spatial": 4}})
    """TokenizerSpec fields: kind, path, options."""
    text: dict = field(default_factory=lambda: {"encoder": "tiny", "max_length": 64})
    """TextSpec fields: encoder, max_length."""
    sampler: dict = field(default_factory=lambda: asdict(SamplerConfig()))
    """SamplerConfig fields: a distilled student has sampler "student" and its t-list."""
    fps: float = DEFAULT_FPS
    """Frame rate of videos generated without an input video."""

    @classmethod
    def load(cls, path: str | Path) -> GenerationSettings | None:
        file = Path(path) / GENERATION_FILE
        if not file.is_file():
            return None
        data = json.loads(file.read_text())
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def save(self, path: str | Path) -> None:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / GENERATION_FILE).write_text(json.dumps(asdict(self), indent=2))

    def sampler_config(self) -> SamplerConfig:
        s = dict(self.sampler)
        s["t_list"] = tuple(s.get("t_list", flow.STUDENT_T_LIST))
        return SamplerConfig(**s)
