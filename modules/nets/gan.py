"""The DMD2 discriminator head: a small network on a DiT's intermediate token features.

DMD2 (Yin et al. 2024, Sec. 4.2) does not train a separate discriminator network: it reads the
fake score's (or, as Cosmos-Transfer1 does, the teacher's) trunk features at a noised input and
adds a light head that outputs one real/fake logit per sample. The trunk is shared, so the head
costs almost nothing next to the 2B forward it rides on.

Per tapped block: RMS-normalise the tokens, a two-layer MLP, mean over tokens (a clip of any
length gives one vector), a linear to one logit; the logits of all taps are summed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import RMSNorm
from .init import seeded_init

__all__ = ["GANHead", "GANHeadConfig"]


@dataclass
class GANHeadConfig:
    """Which trunk blocks the head reads and how wide it is."""

    dim: int = 64
    """Width of the trunk's tokens (the DiT's dim)."""
    taps: list[int] = field(default_factory=lambda: [1])
    """Trunk block indices whose outputs the head reads (0-based)."""
    hidden: int = 256
    """Width of the per-token MLP."""

    def to_dict(self) -> dict:
        return asdict(self)


class _Tap(nn.Module):
    def __init__(self, dim: int, hidden: int, device=None, dtype=None):
        super().__init__()
        self.norm = RMSNorm(dim, 1e-6, device, dtype)
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, hidden, device=device, dtype=dtype)
        self.out = nn.Linear(hidden, 1, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.fc2(F.silu(self.fc1(self.norm(h))))
        return self.out(F.silu(h).mean(dim=1)).squeeze(-1)


class GANHead(nn.Module):
    """features (one (B, N, dim) tensor per tap, in `cfg.taps` order) -> (B,) logits."""

    def __init__(self, cfg: GANHeadConfig, device=None, dtype=None):
        super().__init__()
        if not cfg.taps:
            raise ValueError("a GAN head needs at least one tapped block")
        self.cfg = cfg
        self.taps = nn.ModuleList(_Tap(cfg.dim, cfg.hidden, device, dtype) for _ in cfg.taps)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        if len(feats) != len(self.taps):
            raise ValueError(f"expected features of {len(self.taps)} blocks {self.cfg.taps}, got {len(feats)}")
        return sum(tap(h) for tap, h in zip(self.taps, feats))

    def init_weights(self, seed: int = 0) -> GANHead:
        """Seeded init, as the DiT's (`nets.init.seeded_init`)."""
        seeded_init(self, seed)
        return self
