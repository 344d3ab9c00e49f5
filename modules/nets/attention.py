"""The one attention function every network calls.

Backends (flash, cuDNN, memory-efficient) and context parallelism (context.py) plug in here and
nowhere else: blocks hand over (B, S, H, D) tensors and get (B, S, H, D) back.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .sparse import SparseAttention, sparse_attention

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


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    shard=None,
    sparse: SparseAttention | None = None,
    grid: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (B, S, H, D) tensors; `mask` is a bool (B, Sk) key mask (True = attend).

    `shard` (a modules.nets.context.Shard, self-attention only): q, k, v hold this rank's S/cp
    tokens of a sequence split across a context-parallel group; attention runs over the whole
    sequence through all-to-alls (context.ulysses_attention) and returns this rank's tokens.
    `sparse` (self-attention only): each query attends to the key tiles of the token `grid`
    (T', H', W') that the config keeps (sparse.py)."""
    if sparse is not None:
        if shard is not None or mask is not None:
            raise ValueError("sparse attention takes neither a key mask nor a context-parallel shard")
        return sparse_attention(q, k, v, sparse, grid)
    if shard is not None:
        from .context import ulysses_attention

        return ulysses_attention(q, k, v, mask, shard, _sdpa)
    return _sdpa(q, k, v, mask)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA on (B, S, H, D) tensors with the pinned backend."""
    if mask is not None:
        mask = mask[:, None, None, :]
    ctx = sdpa_kernel(_BACKENDS[_backend]) if _backend != "auto" and q.is_cuda else contextlib.nullcontext()
    with ctx:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)
