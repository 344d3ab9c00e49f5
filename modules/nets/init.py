"""Deterministic weight init shared by every network (the DiT with its control branches, the GAN head)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, distribute_tensor

from .dit import RMSNorm


def assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full tensor into a parameter; a sharded (FSDP2) one takes only its own shard, cut
    locally (every rank drew the same numbers, so nothing needs to be sent)."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


@torch.no_grad()
def seeded_init(module: nn.Module, seed: int) -> None:
    """Linears N(0, 0.02) (zero where the layer is marked `zero_init`), zero biases, unit norms.

    For one device type the weights depend only on the seed and the module's structure, so a
    meta-device build materialised with `to_empty` equals an eager build. Random numbers are
    drawn on the parameters' device (a 2B init on CPU takes minutes)."""
    first = next(module.parameters())
    device = first.to_local().device if isinstance(first, DTensor) else first.device
    gen = torch.Generator(device=device).manual_seed(seed)
    for mod in module.modules():
        if isinstance(mod, nn.Linear):
            if getattr(mod, "zero_init", False):
                mod.weight.zero_()
            else:
                w = torch.randn(mod.weight.shape, generator=gen, device=device, dtype=torch.float32)
                assign(mod.weight, w.mul_(0.02))
            if mod.bias is not None:
                mod.bias.zero_()
        elif isinstance(mod, RMSNorm):
            mod.weight.fill_(1.0)
