"""Context parallelism: one sample's token sequence split across the ranks of a process group.

All-to-all ("Ulysses", Jacobs et al. 2023) rather than ring attention: each rank holds S/cp
tokens of every head; before attention one all-to-all gives it all S tokens of H/cp heads, the
unchanged SDPA runs on them (so the cuDNN / flash kernels and `attention.set_backend` apply at
full efficiency, padding masks included), and a second all-to-all brings the output back. Per
block that is 4 all-to-alls of (S/cp, d) tensors, a few ms over NVLink against attention's
tens of ms at video lengths, and no hand-written online-softmax merging as ring attention needs.
The price: cp must divide the number of heads (16 for 2b: cp 2, 4, 8, 16).

The split is along latent frames (tokens are frame-major), so each rank's tokens are whole
frames and per-frame timestep modulation stays a broadcast. Frames are padded with zero
frames to a multiple of cp; padded keys are masked out of self-attention and padded outputs
dropped at the gather, so results equal the unsplit network's (tests/test_context_parallel.py).

Gradients follow a partial-sum convention: every rank runs the same replicated loss, and a
replicated tensor's gradient on a rank is that rank's share (the true gradient is the sum over
the group, times cp because every rank seeds the loss with 1). Splitting is plain slicing (its
backward zero-pads the share), gathering is an all-gather whose backward is the adjoint
reduce-scatter (sum). Parameter gradients are therefore cp x the rank's share, and FSDP2's mean
over the flattened data x context mesh turns them into exactly the one-GPU gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """all_to_all_single along dim 0 (equal splits): chunk j goes to rank j, chunk j of the
    output came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)  # after contiguous: empty_like keeps a view's strides
    dist.all_to_all_single(out, x, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    """seq_to_heads (to_heads=True) or heads_to_seq with autograd: each one's backward is the other."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group, to_heads: bool) -> torch.Tensor:
        ctx.group, ctx.to_heads = group, to_heads
        return (seq_to_heads if to_heads else heads_to_seq)(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (heads_to_seq if ctx.to_heads else seq_to_heads)(grad, ctx.group), None, None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    """No-autograd all-to-all: send head group j of the local tokens to rank j."""
    n = dist.get_world_size(group)
    B, S, H, D = x.shape
    send = x.view(B, S, n, H // n, D).permute(2, 0, 1, 3, 4)  # (n, B, S_l, H/n, D)
    recv = _all_to_all(send, group)  # chunk j: rank j's tokens of my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(B, n * S, H // n, D)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """No-autograd all-to-all: send token block j (rank j's tokens) of the local heads to rank j."""
    n = dist.get_world_size(group)
    B, S, H, D = x.shape
    send = x.view(B, n, S // n, H, D).transpose(0, 1)  # (n, B, S_l, H/n, D)
    recv = _all_to_all(send, group)  # chunk j: my tokens of rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, S // n, n * H, D)


class _Gather(torch.autograd.Function):
    """(B, S/cp, ...) shards -> (B, S, ...) on every rank; backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        n = dist.get_world_size(group)
        out = x.new_empty(n * x.numel())  # flat buffers: the layout every backend accepts
        dist.all_gather_into_tensor(out, x.contiguous().view(-1), group=group)
        out = out.view(n, *x.shape)
        return out.transpose(0, 1).reshape(x.shape[0], n * x.shape[1], *x.shape[2:])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        n = dist.get_world_size(ctx.group)
        B, S = grad.shape[:2]
        send = grad.reshape(B, n, S // n, *grad.shape[2:]).transpose(0, 1).contiguous()
        out = grad.new_empty(send[0].numel())
        dist.reduce_scatter_tensor(out, send.view(-1), group=ctx.group)
        return out.view(send.shape[1:]), None


@dataclass
class Shard:
    """How one forward's tokens are split: this rank holds frames [rank * frames, (rank + 1) *
    frames) of the grid padded to `size * frames` frames."""

    group: object  # torch.distributed.ProcessGroup
    rank: int
    size: int
    frames: int
    """Frames per rank (after padding)."""
    grid_frames: int
    """Real frames of the token grid."""
    key_mask: torch.Tensor | None
    """(1, size * frames * tokens_per_frame) bool, False on padded tokens; None without padding."""

    @classmethod
    def plan(cls, group, grid: tuple[int, int, int], device) -> Shard:
        """The split of a (T', H', W') token grid over `group`: ceil(T' / size) frames per rank."""
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        nt, nh, nw = grid
        frames = -(-nt // size)
        mask = None
        if frames * size != nt:
            mask = torch.zeros(1, frames * size, nh * nw, dtype=torch.bool, device=device)
            mask[:, :nt] = True
            mask = mask.flatten(1)
        return cls(group, rank, size, frames, nt, mask)

    def local_frames(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's frames of x, whose `dim` is the (real) frame axis; zero frames pad it."""
        pad = self.frames * self.size - x.shape[dim]
        if pad:
            shape = list(x.shape)
            shape[dim] = pad
            x = torch.cat([x, x.new_zeros(shape)], dim=dim)
        return x.narrow(dim, self.rank * self.frames, self.frames)

    def local(self, tokens: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of (B, S, ...) frame-major tokens of the whole grid."""
        return self._tokens(tokens, 1)

    def local_table(self, table: torch.Tensor) -> torch.Tensor:
        """This rank's rows of an (S, ...) per-token table (RoPE)."""
        return self._tokens(table, 0)

    def _tokens(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Tokens along `dim` viewed as (frames, tokens per frame), this rank's frames kept."""
        per = x.shape[dim] // self.grid_frames
        shape = list(x.shape)
        framed = x.reshape(*shape[:dim], self.grid_frames, per, *shape[dim + 1 :])
        local = self.local_frames(framed, dim)
        return local.reshape(*shape[:dim], self.frames * per, *shape[dim + 1 :])

    def gather(self, tokens: torch.Tensor) -> torch.Tensor:
        """All ranks' tokens (B, S, ...), padding dropped (differentiable; see the module doc)."""
        full = _Gather.apply(tokens, self.group)
        per = tokens.shape[1] // self.frames
        return full[:, : self.grid_frames * per]


def ulysses_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, shard: Shard, attend
) -> torch.Tensor:
    """Self-attention over the whole sequence of (B, S/cp, H, D) shards: all-to-all to all
    tokens of H/cp heads, `attend` (the local SDPA) with the padding key mask, all-to-all back.
    H must divide by cp (`check_heads`, run when a network gets its group)."""
    if mask is not None:
        raise ValueError(
            "a key mask on context-parallel self-attention is not supported (padding is masked by the shard)"
        )
    q, k, v = (_AllToAll.apply(t, shard.group, True) for t in (q, k, v))
    out = attend(q, k, v, shard.key_mask)
    return _AllToAll.apply(out, shard.group, False)


def check_heads(heads: int, group) -> None:
    """Ulysses needs whole heads per rank: refuse a context-parallel size that does not divide them."""
    size = dist.get_world_size(group)
    if heads % size:
        raise ValueError(
            f"context parallel size {size} must divide the number of attention heads ({heads}); "
            f"choose one of {[n for n in range(1, heads + 1) if heads % n == 0]}"
        )
