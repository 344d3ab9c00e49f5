"""The one attention function every network calls.

Backends (flash, cuDNN, memory-efficient) and, later, context parallelism plug in here and
nowhere else: blocks hand over (B, S, H, D) tensors and get (B, S, H, D) back.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_BACKENDS = {
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
_backend: str = "auto"


def set_backend(name: str) -> None:
    """Pin SDPA to one backend ("auto" lets torch choose). Affects every later attention call."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose auto, {', '.join(_BACKENDS)}")
    global _backend
    _backend = name


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, S, H, D) tensors; `mask` is a bool (B, Sk) key mask (True = attend)."""
    if mask is not None:
        mask = mask[:, None, None, :]
    ctx = sdpa_kernel(_BACKENDS[_backend]) if _backend != "auto" and q.is_cuda else contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
