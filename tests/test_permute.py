"""Token permutations: exact round trips, python-loop references of each order, text in place."""

import itertools

import pytest
import torch

from sparsediff.layout import TokenLayout
from sparsediff.permute import (
    Permutation,
    axis_order,
    cluster_order,
    gather_tokens,
    hilbert_order,
    layout_order,
    lift,
    tile_order,
)
from sparsediff.specs import AXIS_ORDERS

GRIDS = [(5, 7, 11), (3, 16, 9), (1, 8, 6), (2, 1, 5)]


def _nat(f, h, w, grid):
    return (f * grid[1] + h) * grid[2] + w


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("order", AXIS_ORDERS + ("frame",))
def test_axis_order_matches_nested_loops(grid, order):
    o = "hwf" if order == "frame" else order
    sizes = {"f": grid[0], "h": grid[1], "w": grid[2]}
    ref = []
    for a, b, c in itertools.product(range(sizes[o[0]]), range(sizes[o[1]]), range(sizes[o[2]])):
        d = {o[0]: a, o[1]: b, o[2]: c}
        ref.append(_nat(d["f"], d["h"], d["w"], grid))
    assert axis_order(grid, order).tolist() == ref


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("tile", [(2, 4, 4), (1, 3, 5), (4, 4, 4)])
def test_tile_order_matches_reference(grid, tile):
    F, H, W = grid
    tiles = {}
    for f, h, w in itertools.product(range(F), range(H), range(W)):
        tiles.setdefault((f // tile[0], h // tile[1], w // tile[2]), []).append(_nat(f, h, w, grid))
    ref = [t for key in sorted(tiles) for t in tiles[key]]  # tile-major, frame-major inside (ragged ok)
    assert tile_order(grid, tile).tolist() == ref


@pytest.mark.parametrize("grid", [(4, 4, 4), (8, 8, 8), (2, 2, 2)])
def test_hilbert_cube_is_unit_step_curve(grid):
    o = hilbert_order(grid)
    F, H, W = grid
    c = torch.stack([o // (H * W), (o // W) % H, o % W], -1)
    assert sorted(o.tolist()) == list(range(F * H * W))
    assert ((c[1:] - c[:-1]).abs().sum(-1) == 1).all()


@pytest.mark.parametrize("grid", GRIDS + [(21, 30, 52)])
def test_hilbert_any_size_is_permutation_and_local(grid):
    o = hilbert_order(grid)
    F, H, W = grid
    assert torch.equal(torch.sort(o).values, torch.arange(F * H * W))
    c = torch.stack([o // (H * W), (o // W) % H, o % W], -1)
    step = (c[1:] - c[:-1]).abs().sum(-1).float()
    assert step.mean() < 1.6  # mostly unit steps; jumps only where the curve leaves the grid


@pytest.mark.parametrize(
    "layout",
    [
        TokenLayout.video(5, 7, 11, text_len=13, text_position="before"),
        TokenLayout.video(3, 16, 9, text_len=6, text_position="after"),
        TokenLayout.image(8, 6, text_len=4),
    ],
)
@pytest.mark.parametrize("order", ["frame", "whf", "hilbert", "tile", "natural"])
@pytest.mark.parametrize("grid_first", [False, True])
def test_layout_permutation_round_trip_and_text(layout, order, grid_first):
    p = layout_order(layout, order, tile=(2, 3, 4), grid_first=grid_first)
    n = layout.num_tokens
    assert torch.equal(p.perm[p.inv], torch.arange(n)) and torch.equal(p.inv[p.perm], torch.arange(n))
    x = torch.randn(2, 3, n, 5)
    xp = p.apply(x)
    assert torch.equal(p.undo(xp), x)
    text = layout.text_mask()
    if grid_first:
        # grid tokens occupy positions [0, grid_len); text after them in order
        assert (p.perm[: layout.grid_len] >= layout.grid_offset).all()
        assert p.perm[layout.grid_len :].tolist() == torch.nonzero(text).flatten().tolist()
    else:
        assert torch.equal(p.perm[text], torch.nonzero(text).flatten())


def test_per_head_and_per_batch_permutations():
    layout = TokenLayout.video(2, 3, 4, text_len=3, text_position="before")
    n = layout.num_tokens
    g = torch.Generator().manual_seed(0)
    gp = torch.stack([torch.stack([torch.randperm(24, generator=g) for _ in range(3)]) for _ in range(2)])
    p = lift(layout, gp)  # [2, 3, N]
    x = torch.randn(2, 3, n, 4)
    y = p.apply(x)
    for b, h in itertools.product(range(2), range(3)):
        assert torch.equal(y[b, h], x[b, h, p.perm[b, h]])
    assert torch.equal(p.undo(y), x)
    # shared [H, N] index against a transposed (non-contiguous) view
    xv = torch.randn(2, n, 3, 4).transpose(1, 2)
    idx = p.perm[0]
    assert torch.equal(gather_tokens(xv, idx)[1, 2], xv[1, 2, idx[2]])


def test_identity_permutation():
    p = Permutation.identity(7)
    assert p.is_identity() and not Permutation.from_perm(torch.tensor([1, 0, 2])).is_identity()


def test_cluster_order_groups_planted_clusters():
    g = torch.Generator().manual_seed(0)
    cent = torch.randn(4, 8, generator=g) * 5
    lab = torch.randint(0, 4, (64,), generator=g)
    x = (cent[lab] + 0.05 * torch.randn(64, 8, generator=g)).view(1, 1, 64, 8)
    order, c, sl = cluster_order(x, 4, iters=6)
    assert order.shape == (1, 1, 64) and c.shape == (1, 1, 4, 8) and sl.shape == (1, 1, 64)
    grouped = lab[order[0, 0]]
    # each true group forms one contiguous run in cluster order
    runs = 1 + int((grouped[1:] != grouped[:-1]).sum())
    assert runs == 4
    assert torch.equal(torch.sort(sl[0, 0]).values, sl[0, 0])
