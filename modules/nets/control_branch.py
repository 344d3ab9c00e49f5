"""VACE-style control branch (as in Cosmos-Transfer2.5) and multi-control mixing.

A control video is encoded by the same tokenizer as the target, zero-padded to a fixed channel
count, embedded, added to the base's embedded input through a zero-initialised projection, and
run through copies of the base's first blocks. After each control block a zero-initialised
projection produces a residual that is added to the base after block `i * every`. With the zero
init the controlled network equals the base exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import Block, DiT, DiTConfig, State, patchify


@dataclass
class ControlConfig:
    blocks: int = 4
    """Number of control blocks (copies of base blocks 0..blocks-1 at the start of training)."""
    every: int = 7
    """Control block i adds its residual after base block i * every."""
    channels: int = 128
    """Control latents are zero-padded to this many channels (Transfer2.5: 128)."""

    def targets(self) -> list[int]:
        return [i * self.every for i in range(self.blocks)]


class ControlBranch(nn.Module):
    def __init__(self, cfg: DiTConfig, ctrl: ControlConfig, device=None, dtype=None):
        super().__init__()
        if ctrl.targets()[-1] >= cfg.depth:
            raise ValueError(f"{ctrl.blocks} control blocks every {ctrl.every} do not fit a depth-{cfg.depth} base")
        self.cfg, self.ctrl = cfg, ctrl
        D = cfg.dim
        # +2: the same condition-mask and padding-mask channels the base input carries
        self.embed = nn.Linear((ctrl.channels + 2) * math.prod(cfg.patch), D, bias=False, device=device, dtype=dtype)
        self.before_proj = nn.Linear(D, D, device=device, dtype=dtype)
        self.blocks = nn.ModuleList(Block(cfg, device, dtype) for _ in range(ctrl.blocks))
        self.after_proj = nn.ModuleList(nn.Linear(D, D, device=device, dtype=dtype) for _ in range(ctrl.blocks))
        for proj in [self.before_proj, *self.after_proj]:
            proj.zero_init = True  # read by nets.init_weights

    def forward(self, control: torch.Tensor, s: State) -> list[torch.Tensor]:
        """Residuals (B, S, D), one per entry of `ctrl.targets()`, for control latents (B, C<=channels, T, H, W)."""
        C = control.shape[1]
        if C > self.ctrl.channels:
            raise ValueError(f"control latents have {C} channels, the branch takes at most {self.ctrl.channels}")
        control = F.pad(control.to(s.masks.dtype), (0, 0, 0, 0, 0, 0, 0, self.ctrl.channels - C))
        tokens = s.local(patchify(torch.cat([control, s.masks], dim=1), self.cfg.patch))  # this rank's, under CP
        h = self.before_proj(self.embed(tokens)) + s.x
        out = []
        for block, proj in zip(self.blocks, self.after_proj):
            h = block(h, s)
            out.append(proj(h))
        return out

    @torch.no_grad()
    def init_from_base(self, base: DiT) -> None:
        """Copy base blocks 0..N-1 into the control blocks (the start of control training)."""
        for mine, theirs in zip(self.blocks, base.blocks):
            mine.load_state_dict(theirs.state_dict())


def pool_weight(weight: float | torch.Tensor, grid: tuple[int, int, int], batch: int) -> torch.Tensor:
    """A control weight as (B or 1, S, 1): scalars broadcast; maps (B, 1, T, H, W) at any
    resolution are average-pooled onto the token grid (T', H', W')."""
    if not torch.is_tensor(weight) or weight.ndim == 0:
        return torch.as_tensor(weight, dtype=torch.float32).reshape(1, 1, 1)
    if weight.ndim != 5:
        raise ValueError(f"a control weight map must be (B, 1, T, H, W), got {tuple(weight.shape)}")
    pooled = F.adaptive_avg_pool3d(weight.float(), grid)
    return pooled.reshape(pooled.shape[0], -1, 1).expand(batch, -1, -1)


def mix_residuals(
    residuals: list[list[torch.Tensor]],
    weights: list[float | torch.Tensor],
    grid: tuple[int, int, int],
    local=None,
) -> list[torch.Tensor]:
    """Per-injection residual sum_i w_i r_i, w_i = control_weight_i * mask_i pooled to the token
    grid; where sum_i w_i > 1 at a token, every w_i there is divided by that sum (docs/design.md).
    `local` (State.local under context parallelism) keeps this rank's tokens of a pooled map."""
    if len(residuals) == 1 and not torch.is_tensor(weights[0]):
        # one branch with a scalar weight: the rule reduces to min(w, 1)
        w0 = min(float(weights[0]), 1.0)
        return residuals[0] if w0 == 1.0 else [r * w0 for r in residuals[0]]
    batch = residuals[0][0].shape[0]
    w = [pool_weight(wi, grid, batch).to(residuals[0][0].device) for wi in weights]
    if local is not None:
        w = [wi if wi.shape[1] == 1 else local(wi) for wi in w]
    total = sum(w)
    scale = torch.where(total > 1, total, torch.ones_like(total))
    w = [wi / scale for wi in w]
    mixed = []
    for per_branch in zip(*residuals):
        mixed.append(sum((wi * r.float()).to(r.dtype) for wi, r in zip(w, per_branch)))
    return mixed
