"""Sparse self-attention over 3D tiles of the token grid: sliding-tile and top-k tile attention.

The grid (T', H', W') of a forward's tokens is cut into tiles of `tile` cells (padded at the far
edges where it does not divide); each query tile attends to `k` key tiles only:

- `tiles`: the key tiles in a `window` of tiles around it, the window shifted inside the grid at
  its borders so that every query tile keeps the same number (the sliding-tile idea: Zhang et al.
  2025, "Fast Video Generation with Sliding Tile Attention");
- `topk`: the key tiles whose mean key scores highest against the tile's mean query, a cheap
  attention between tile means (the coarse stage of video sparse attention: Zhang et al. 2025,
  "VSA: Faster Video Diffusion with Trainable Sparse Attention"). As in VSA's fine stage the
  choice itself is an index and passes no gradient; queries, keys and values get theirs through
  the tiles they attend to. A query tile always keeps its own tile.

A selection is a (B|1, H|1, n, k) index of key tiles per query tile. Two implementations run it:
`gather_attention` (any device, differentiable: each query tile's kept key tiles are gathered and
attended densely) and `flex_tile_attention` (FlexAttention block masks, one block per tile: the
GPU path, compiled; FlexAttention has no backward on CPU). Both equal dense attention restricted
to the kept tiles, and dense SDPA when every tile is kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Grid = tuple[int, int, int]
MODES = ("tiles", "topk")


@dataclass
class SparseAttention:
    """Which key tiles each query tile attends to (`DiTConfig.sparse`; None there is dense)."""

    mode: str = "tiles"
    """tiles (a fixed window of tiles around each query tile) or topk (the best `keep` tiles by
    pooled scores, chosen per head from the data)."""
    tile: tuple[int, int, int] = (1, 4, 4)
    """Tile size in token-grid cells (latent frames, rows, columns after patchify)."""
    window: tuple[int, int, int] = (2, 2, 2)
    """tiles: the window's size in tiles per axis (clipped to the grid), shifted to contain the
    query tile: keeps prod(window) tiles."""
    keep: int = 8
    """topk: key tiles kept per query tile, the query's own included."""

    def __post_init__(self) -> None:
        self.tile, self.window = tuple(self.tile), tuple(self.window)
        if self.mode not in MODES:
            raise ValueError(f"sparse.mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name, v in (("tile", self.tile), ("window", self.window)):
            if len(v) != 3 or any(int(x) != x or x < 1 for x in v):
                raise ValueError(f"sparse.{name} must be three positive integers (t, h, w), got {list(v)}")
        if self.keep < 1:
            raise ValueError(f"sparse.keep must be at least 1, got {self.keep}")

    @classmethod
    def from_dict(cls, d: dict) -> SparseAttention:
        """From a config's or recipe's mapping; an unknown key is refused naming the known ones."""
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"sparse: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return cls(**d)

    def tile_grid(self, grid: Grid) -> Grid:
        """Tiles per axis for a token grid (the last tile of an axis may be partly padding)."""
        return tuple(math.ceil(g / t) for g, t in zip(grid, self.tile))

    def kept_tiles(self, grid: Grid) -> int:
        """Key tiles each query tile attends to on this grid."""
        tiles = self.tile_grid(grid)
        if self.mode == "tiles":
            return math.prod(min(w, n) for w, n in zip(self.window, tiles))
        return min(self.keep, math.prod(tiles))

    def kept_fraction(self, grid: Grid) -> float:
        """Share of key tiles each query tile attends to."""
        return self.kept_tiles(grid) / math.prod(self.tile_grid(grid))


class TileLayout:
    """Tokens of a (T', H', W') grid in tile order: (B, S, H, D) <-> (B, n, m, H, D), n tiles of
    m = prod(tile) cells; cells past the grid's edge are padding (`valid` False)."""

    def __init__(self, grid: Grid, tile: Grid, device=None):
        self.grid, self.tile = grid, tile
        self.tiles = tuple(math.ceil(g / t) for g, t in zip(grid, tile))
        self.n, self.m = math.prod(self.tiles), math.prod(tile)
        self.padded = any(g % t for g, t in zip(grid, tile))
        self.valid = self.to_tiles(torch.ones(1, math.prod(grid), 1, 1, device=device, dtype=torch.bool))[0, :, :, 0, 0]

    def to_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S, H, D) in grid order -> (B, n, m, H, D), padding cells zero."""
        B, S, H, D = x.shape
        (T, R, C), (a, b, c), (nt, nr, nc) = self.grid, self.tile, self.tiles
        x = x.reshape(B, T, R, C, H * D)
        if self.padded:
            x = F.pad(x, (0, 0, 0, nc * c - C, 0, nr * b - R, 0, nt * a - T))
        x = x.reshape(B, nt, a, nr, b, nc, c, H, D).permute(0, 1, 3, 5, 2, 4, 6, 7, 8)
        return x.reshape(B, self.n, self.m, H, D)

    def from_tiles(self, x: torch.Tensor) -> torch.Tensor:
        """(B, n, m, H, D) -> (B, S, H, D) in grid order, padding dropped."""
        B, _, _, H, D = x.shape
        (T, R, C), (a, b, c), (nt, nr, nc) = self.grid, self.tile, self.tiles
        x = x.reshape(B, nt, nr, nc, a, b, c, H, D).permute(0, 1, 4, 2, 5, 3, 6, 7, 8)
        x = x.reshape(B, nt * a, nr * b, nc * c, H, D)[:, :T, :R, :C]
        return x.reshape(B, T * R * C, H, D)


def window_tiles(tiles: Grid, window: Grid, device=None) -> torch.Tensor:
    """(1, 1, n, k) key tiles of each query tile: the window of `window` tiles per axis (clipped to
    the grid) containing it, started at tile - (w - 1) // 2 and shifted inside the grid."""
    axes = []
    for n, w in zip(tiles, window):
        w = min(w, n)
        start = (torch.arange(n, device=device) - (w - 1) // 2).clamp(0, n - w)
        axes.append(start[:, None] + torch.arange(w, device=device))  # (n_axis, w)
    (nt, nr, nc), (at, ar, ac) = tiles, axes
    idx = (at[:, None, None, :, None, None] * nr + ar[None, :, None, None, :, None]) * nc + ac[
        None, None, :, None, None, :
    ]
    return idx.reshape(1, 1, nt * nr * nc, -1)


@torch.no_grad()
def topk_tiles(qt: torch.Tensor, kt: torch.Tensor, valid: torch.Tensor, keep: int) -> torch.Tensor:
    """(B, H, n, k) key tiles per query tile and head: the top `keep` of softmax-free pooled scores
    mean(q_tile) . mean(k_tile) / sqrt(d) (means over a tile's real cells), own tile always kept.
    qt, kt: (B, n, m, H, D) tiled queries and keys; valid (n, m)."""
    # padding cells are zeros (TileLayout.to_tiles): sums over a tile are sums over its real cells
    count = valid.sum(1).to(torch.float32)[None, :, None, None]
    qm = qt.sum(2, dtype=torch.float32) / count  # (B, n, H, D)
    km = kt.sum(2, dtype=torch.float32) / count
    scores = torch.einsum("bnhd,bmhd->bhnm", qm, km) / math.sqrt(qt.shape[-1])
    n = scores.shape[-1]
    own = torch.eye(n, dtype=torch.bool, device=scores.device)
    scores = scores.masked_fill(own, float("inf"))
    return scores.topk(min(keep, n), dim=-1).indices.sort(dim=-1).values


def select_tiles(cfg: SparseAttention, layout: TileLayout, qt: torch.Tensor, kt: torch.Tensor) -> torch.Tensor:
    """The kept key tiles (B|1, H|1, n, k) of every query tile for `cfg`'s mode."""
    if cfg.mode == "tiles":
        return window_tiles(layout.tiles, cfg.window, qt.device)
    return topk_tiles(qt, kt, layout.valid, cfg.keep)


def gather_attention(
    qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """Attention of each query tile over its kept key tiles only: the kept tiles' keys and values
    are gathered into one (k m)-long sequence per query tile and attended with SDPA (padding keys
    masked). qt, kt, vt (B, n, m, H, D); idx (B|1, H|1, n, k); valid (n, m). Returns (B, n, m, H, D)."""
    B, n, m, H, D = qt.shape
    k = idx.shape[-1]
    idx = idx.expand(B, H, n, k).reshape(B, H, n * k, 1)

    def gather(x: torch.Tensor) -> torch.Tensor:  # (B, n, m, H, D) -> (B, H, n, k m, D)
        x = x.permute(0, 3, 1, 2, 4).reshape(B, H, n, m * D)
        return x.gather(2, idx.expand(B, H, n * k, m * D)).view(B, H, n, k * m, D)

    mask = None
    if not bool(valid.all()):
        mask = valid[idx[..., 0]].view(B, H, n, 1, k * m)
    out = F.scaled_dot_product_attention(qt.permute(0, 3, 1, 2, 4), gather(kt), gather(vt), attn_mask=mask)
    return out.permute(0, 2, 3, 1, 4)


# Built eagerly even inside a compiled block: the mask is data (indices), and tracing its
# construction (vmapped index conversions) costs compile time for nothing the kernel needs.
@torch.compiler.disable
def block_mask(idx: torch.Tensor, layout: TileLayout, batch: int, heads: int, grad: bool):
    """A FlexAttention BlockMask of one block per tile that keeps `idx`'s tiles: tiles without
    padding as full blocks (no mask evaluated), tiles with padding as partial ones whose mask_mod
    drops the padding keys. The mask_mod also says which tiles are kept, so FlexAttention's
    unfused (eager) path, which evaluates it everywhere, computes the same thing."""
    from torch.nn.attention.flex_attention import BlockMask

    n, m = layout.n, layout.m
    idx = idx.expand(batch, heads, n, idx.shape[-1]).to(torch.int32)
    keep = torch.zeros(batch, heads, n, n, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, idx.long(), True)
    valid = layout.valid.reshape(-1)

    def mask_mod(b, h, q, kv):
        return keep[b, h, q // m, kv // m] & valid[kv]

    partial = (~layout.valid.all(-1))[idx.long()]

    def packed(first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # the tiles where `first` holds, first in each row, the row padded to n entries
        order = torch.argsort((~first).to(torch.int8), dim=-1, stable=True)
        rows = idx.gather(-1, order)
        rows = torch.cat([rows, rows.new_zeros(batch, heads, n, n - rows.shape[-1])], dim=-1)
        return first.sum(-1, dtype=torch.int32), rows.contiguous()

    num, rows = packed(partial)
    full_num, full_rows = packed(~partial)
    return BlockMask.from_kv_blocks(
        num, rows, full_num, full_rows, BLOCK_SIZE=m, mask_mod=mask_mod, compute_q_blocks=grad
    )


_FLEX: dict[bool, object] = {}


def kernel_options(m: int) -> dict | None:
    """The fused kernel's tile sizes must divide the mask's block (one tile of m tokens): its
    defaults (up to 128) do for tiles of a multiple of 128 tokens; smaller tiles (the quickstart's
    16) get kernel tiles of the largest power of two dividing m, at least 16."""
    if m % 128 == 0:
        return None
    size = m & -m  # largest power of two dividing m
    if size < 16:
        raise ValueError(f"sparse tiles of {m} tokens: the GPU kernel needs a multiple of 16")
    return {k: min(size, 64) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2")}


def flex_tile_attention(
    qt: torch.Tensor, kt: torch.Tensor, vt: torch.Tensor, idx: torch.Tensor, layout: TileLayout, compiled: bool = True
) -> torch.Tensor:
    """`gather_attention`'s result through FlexAttention over the tile-ordered sequence, compiled
    (the fused GPU kernel, which skips the tiles not kept) or eager (unfused, for checks)."""
    from torch.nn.attention.flex_attention import flex_attention

    if compiled not in _FLEX:
        _FLEX[compiled] = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    B, n, m, H, D = qt.shape
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (qt, kt, vt))
    mask = block_mask(idx, layout, B, H, grad)

    def seq(x: torch.Tensor) -> torch.Tensor:  # (B, n, m, H, D) -> (B, H, n m, D)
        return x.reshape(B, n * m, H, D).transpose(1, 2)

    out = _FLEX[compiled](seq(qt), seq(kt), seq(vt), block_mask=mask, kernel_options=kernel_options(m))
    return out.transpose(1, 2).reshape(B, n, m, H, D)


def sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SparseAttention, grid: Grid
) -> torch.Tensor:
    """Self-attention of (B, S, H, D) tokens of `grid` restricted to `cfg`'s kept tiles:
    FlexAttention on CUDA, the gathered form elsewhere."""
    if q.shape[1] != math.prod(grid):
        raise ValueError(f"sparse attention got {q.shape[1]} tokens for a {'x'.join(map(str, grid))} grid")
    layout = TileLayout(grid, cfg.tile, q.device)
    qt, kt, vt = (layout.to_tiles(x) for x in (q, k, v))
    idx = select_tiles(cfg, layout, qt, kt)
    if q.is_cuda:
        out = flex_tile_attention(qt, kt, vt, idx, layout)
    else:
        out = gather_attention(qt, kt, vt, idx, layout.valid)
    return layout.from_tiles(out)
