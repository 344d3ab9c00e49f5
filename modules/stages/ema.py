"""EMA weights of a stage's trained network.

Not a Lightning Callback: the shadow weights are sharded like the parameters and must travel in
the sharded (DCP) checkpoint, which only carries the module's state dict, so they are buffers of
the stage, created in configure_model and updated after each optimizer step.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class EMAWeights(nn.Module):
    """Exponential moving average of trainable parameters, kept as (sharded) buffers:
    ema <- decay * ema + (1 - decay) * param, on each rank's local shards (no communication)."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        for name in self.names:
            self.register_buffer(name.replace(".", "__"), params[name].detach().clone())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        shadows = [_local(getattr(self, n.replace(".", "__"))) for n in self.names]
        current = [_local(params[n].detach()) for n in self.names]
        torch._foreach_lerp_(shadows, current, 1.0 - self.decay)

    def state_for(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's state dict with EMA values in place of the trained parameters."""
        state = dict(model.state_dict())
        for name in self.names:
            state[name] = getattr(self, name.replace(".", "__"))
        return state
