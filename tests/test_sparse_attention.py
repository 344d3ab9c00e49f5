"""Sparse tile attention (modules/nets/sparse.py): against dense SDPA, against FlexAttention's
forward, kept fractions, padding, and the network field that selects it."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from modules.nets import DiT, NetConfig, SparseAttention, preset
from modules.nets.sparse import (
    TileLayout,
    flex_tile_attention,
    gather_attention,
    select_tiles,
    sparse_attention,
    window_tiles,
)

# fp32 results of the gathered form against dense SDPA differ by summation order only: measured
# at most 6e-7 (outputs) and 2e-6 (gradients) on these shapes; the bounds leave a margin
TOL = dict(atol=1e-5, rtol=1e-5)

# the quickstart's token grid and tiles (issue 29), and an odd grid whose tiles need padding
GRIDS = [((4, 8, 12), (1, 4, 4)), ((3, 5, 7), (2, 2, 4))]


def qkv(grid, B=2, H=3, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, math.prod(grid), H, D, generator=g, requires_grad=True) for _ in range(3)]


def dense(q, k, v, mask=None):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


def assert_same_and_same_gradients(out, ref, inputs) -> None:
    """out equals ref, and so do the gradients of a loss of each with respect to the inputs."""
    torch.testing.assert_close(out, ref, **TOL)
    grads = torch.autograd.grad(out.square().sum(), inputs, retain_graph=True)
    for g, r in zip(grads, torch.autograd.grad(ref.square().sum(), inputs)):
        torch.testing.assert_close(g, r, **TOL)


def token_mask(idx, layout: TileLayout, B: int, H: int) -> torch.Tensor:
    """(B, H, S, S) bool in grid order: query token i may attend key token j when j's tile is kept
    for i's tile. Built from tile numbers of each grid position, independently of to_tiles."""
    T, R, C = layout.grid
    a, b, c = layout.tile
    nt, nr, nc = layout.tiles
    t, r, w = torch.meshgrid(torch.arange(T), torch.arange(R), torch.arange(C), indexing="ij")
    tile_of = ((t // a * nr + r // b) * nc + w // c).reshape(-1)  # (S,)
    keep = torch.zeros(B, H, layout.n, layout.n, dtype=torch.bool)
    keep.scatter_(-1, idx.expand(B, H, layout.n, idx.shape[-1]), True)
    return keep[:, :, tile_of][:, :, :, tile_of]


@pytest.mark.parametrize("grid,tile", GRIDS)
@pytest.mark.parametrize("mode", ["tiles", "topk"])
def test_every_tile_kept_equals_dense_sdpa(grid, tile, mode):
    q, k, v = qkv(grid)
    cfg = SparseAttention(mode=mode, tile=tile, window=(99, 99, 99), keep=10**6)
    assert cfg.kept_fraction(grid) == 1.0
    out = sparse_attention(q, k, v, cfg, grid)
    ref = dense(q, k, v)
    assert_same_and_same_gradients(out, ref, (q, k, v))


@pytest.mark.parametrize("grid,tile", GRIDS)
@pytest.mark.parametrize("mode", ["tiles", "topk"])
def test_sparse_equals_masked_dense_attention_and_its_gradients(grid, tile, mode):
    """Outputs and gradients of the gathered form equal dense SDPA under the token mask of the
    same selection (the selection itself passes no gradient, as in VSA's fine stage)."""
    q, k, v = qkv(grid, seed=1)
    cfg = SparseAttention(mode=mode, tile=tile, window=(1, 2, 1), keep=3)
    layout = TileLayout(grid, tile)
    with torch.no_grad():
        idx = select_tiles(cfg, layout, layout.to_tiles(q), layout.to_tiles(k))
    out = sparse_attention(q, k, v, cfg, grid)
    ref = dense(q, k, v, token_mask(idx, layout, 2, 3))
    assert not torch.allclose(out, dense(q, k, v), atol=1e-3)  # it is sparse
    assert_same_and_same_gradients(out, ref, (q, k, v))


@pytest.mark.parametrize("grid,tile", GRIDS)
@pytest.mark.parametrize("mode", ["tiles", "topk"])
def test_gathered_form_equals_flex_attention_forward(grid, tile, mode):
    q, k, v = (x.detach() for x in qkv(grid, seed=2))
    cfg = SparseAttention(mode=mode, tile=tile, window=(2, 1, 2), keep=4)
    layout = TileLayout(grid, tile)
    qt, kt, vt = (layout.to_tiles(x) for x in (q, k, v))
    idx = select_tiles(cfg, layout, qt, kt)
    with warnings.catch_warnings():  # "flex_attention called without torch.compile()": on purpose
        warnings.simplefilter("ignore")
        flex = flex_tile_attention(qt, kt, vt, idx, layout, compiled=False)
    gathered = gather_attention(qt, kt, vt, idx, layout.valid)
    torch.testing.assert_close(gathered, flex, **TOL)


@pytest.mark.parametrize("grid,tile", GRIDS)
def test_kept_fraction_is_the_configs(grid, tile):
    layout = TileLayout(grid, tile)
    q, k, _ = (x.detach() for x in qkv(grid))
    qt, kt = layout.to_tiles(q), layout.to_tiles(k)
    for cfg in (SparseAttention("tiles", tile, window=(2, 2, 2)), SparseAttention("topk", tile, keep=3)):
        idx = select_tiles(cfg, layout, qt, kt)
        kept = torch.zeros(*idx.shape[:-1], layout.n, dtype=torch.bool).scatter_(-1, idx, True)
        own = torch.eye(layout.n, dtype=torch.bool).expand_as(kept)
        assert (kept.sum(-1) == cfg.kept_tiles(grid)).all()  # no tile twice, the same count everywhere
        assert kept[own].all()  # every query tile keeps its own
        assert kept.float().mean().item() == pytest.approx(cfg.kept_fraction(grid))
    # the quickstart's selection: 24 tiles of 1x4x4, 8 kept (1/3) either way
    assert SparseAttention("tiles", (1, 4, 4), window=(2, 2, 2)).kept_fraction((4, 8, 12)) == pytest.approx(1 / 3)
    assert SparseAttention("topk", (1, 4, 4), keep=8).kept_fraction((4, 8, 12)) == pytest.approx(1 / 3)


def test_window_is_local_and_shifted_inside_the_grid():
    """On a 1x1x5 tile row a 3-tile window keeps tiles 0-2 for tiles 0 and 1 and 2-4 for tile 4."""
    idx = window_tiles((1, 1, 5), (1, 1, 3))
    assert idx[0, 0].tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [2, 3, 4]]


def test_padding_is_invisible_and_bad_input_refused_in_one_line():
    grid, tile = (3, 5, 7), (2, 2, 4)
    layout = TileLayout(grid, tile)
    assert layout.padded and layout.valid.sum() == math.prod(grid)
    x = torch.randn(2, math.prod(grid), 3, 4)
    assert torch.equal(layout.from_tiles(layout.to_tiles(x)), x)
    q, k, v = qkv(grid)
    with pytest.raises(ValueError, match="tokens for a 4x5x7 grid"):
        sparse_attention(q, k, v, SparseAttention(tile=tile), (4, 5, 7))
    for bad, match in [
        (dict(mode="sliding"), "mode must be one of tiles, topk"),
        (dict(tile=(1, 0, 4)), "tile must be three positive integers"),
        (dict(keep=0), "keep must be at least 1"),
        (dict(kept=3), "unknown field"),
    ]:
        with pytest.raises(ValueError, match=match):
            SparseAttention.from_dict(bad)


def net_pair(sparse: dict) -> tuple[DiT, DiT]:
    cfg = preset("tiny")
    dense_net = DiT(cfg.dit).eval()
    for p in dense_net.parameters():  # non-trivial attention: random weights everywhere
        torch.nn.init.normal_(p, std=0.2)
    sparse_net = DiT(preset("tiny", sparse=sparse).dit).eval()
    sparse_net.load_state_dict(dense_net.state_dict())
    return dense_net, sparse_net


def test_network_field_dense_by_default_and_selects_sparse():
    assert "sparse" not in preset("tiny").to_dict()["dit"]  # dense configs are written as before
    cfg = preset("tiny", sparse={"mode": "topk", "tile": [1, 2, 2], "keep": 3})
    assert NetConfig.from_dict(cfg.to_dict()).dit.sparse == cfg.dit.sparse
    x, t, text = torch.randn(1, 16, 4, 8, 12), torch.tensor([0.7]), torch.randn(1, 5, 32)
    dense_net, all_kept = net_pair({"mode": "topk", "tile": [1, 2, 2], "keep": 10**6})
    _, sparse_net = net_pair({"mode": "topk", "tile": [1, 2, 2], "keep": 3})
    with torch.no_grad():
        ref = dense_net(x, t, text)
        torch.testing.assert_close(all_kept(x, t, text), ref, **TOL)
        assert (sparse_net(x, t, text) - ref).abs().max() > 1e-3


def test_context_parallel_refused_in_one_line():
    net = DiT(preset("tiny", sparse={"mode": "tiles"}).dit)
    with pytest.raises(ValueError, match="sparse self-attention does not run context-parallel"):
        net.set_context_parallel(object())
