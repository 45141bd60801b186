"""Sliding tile attention (3D windows counted in tiles) on the tiled token order.

Order: :func:`tile_permutation` -- grid tokens re-tiled into ``(tf, th, tw)`` tiles (frame-major tile
order, ragged edge tiles smaller, no padding), grid first, then all non-grid tokens (text) in their
original order, so the first tile starts at position 0.

Token-level definition -- the window of Sliding Tile Attention (STA, FastVideo), so a window setting
copied from STA gives STA's mask: the query token in tile ``(a, b, c)`` attends the key token in tile
``(a', b', c')`` iff on every axis ``x`` with ``n_x`` tiles and window ``w_x`` (in tiles), with
``h_x = w_x // 2`` and the centre ``c_x = clamp(a_x, h_x, n_x - 1 - h_x)``, ``|c_x - a'_x| <= h_x``.
The window is ``2 * h_x + 1`` tiles (``w_x`` for odd ``w_x``, **``w_x + 1`` for even** ``w_x``), its centre
clamped so it stays inside the grid; a window of ``n_x`` tiles or more covers the whole axis.
Equivalently the key tile lies in ``[s_x, s_x + m_x)`` with ``m_x = min(2 * h_x + 1, n_x)`` and
``s_x = clamp(a_x - h_x, 0, n_x - m_x)``. (Before issue 9 an even window kept exactly ``w_x`` tiles,
``[clamp(a_x - w_x // 2, 0, n_x - w_x), ... + w_x)``; odd windows are unchanged.) Every tile pair is
thus all-or-nothing. With ``tf*th*tw == block_size`` and no ragged tiles, tiles are exactly
blocks; otherwise a block can span parts of two tiles and is kept when any of its tile pairs is
(the "any pair" rule), which is a superset -- never a loss of accuracy.
"""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from ..permute import Permutation, lift, tile_ids, tile_order
from . import params
from .common import cdiv, mask_from_bool, reduce_segment_pairs, segments
from .registry import builtin_family, static_group
from .specs import HeadSpec

__all__ = ["default_tile", "tile_permutation", "tile_mask", "tile_window_rule"]


def default_tile(grid: tuple[int, int, int], block_size: int) -> tuple[int, int, int]:
    """Tile shape with ``tf*th*tw == block_size`` when the grid allows it.

    Factors of two are handed to the currently smallest side (ties: h, w, f) while it stays within the
    grid: 64 -> (4, 4, 4), 128 -> (4, 8, 4), images (F = 1) 64 -> (1, 8, 8). A block size that is not a
    power of two, or a grid too small, gives a smaller tile (then blocks span tiles; still correct).
    """
    t = [1, 1, 1]
    rem = block_size
    # hand out factors of two round-robin: h, w, f
    prio = (1, 2, 0)
    progress = True
    while rem % 2 == 0 and rem > 1 and progress:
        progress = False
        for ax in sorted(prio, key=lambda a: (t[a], prio.index(a))):
            if t[ax] * 2 <= grid[ax]:
                t[ax] *= 2
                rem //= 2
                progress = True
                break
    return (t[0], t[1], t[2])


def tile_permutation(layout: TokenLayout, tile: tuple[int, int, int], device=None) -> Permutation:
    """Grid-first tiled order (see module docstring)."""
    if layout.grid is None:
        return Permutation.identity(layout.num_tokens, device)
    return lift(layout, tile_order(layout.grid, tile, device), grid_first=True)


def tile_window_rule(
    qt: torch.Tensor, kt: torch.Tensor, ntiles: tuple[int, int, int], window: tuple[int, int, int]
) -> torch.Tensor:
    """``qt [..., 3]``, ``kt [..., 3]`` tile coordinates (broadcast): bool, key tile inside the query's
    window (STA's window, see the module docstring)."""
    ok = torch.ones(torch.broadcast_shapes(qt.shape[:-1], kt.shape[:-1]), dtype=torch.bool, device=qt.device)
    for ax in range(3):
        n, h = ntiles[ax], int(window[ax]) // 2
        m = min(2 * h + 1, n)  # STA: 2 * (w // 2) + 1 tiles, at most the axis
        s = (qt[..., ax] - h).clamp(0, n - m)
        ok = ok & (kt[..., ax] >= s) & (kt[..., ax] < s + m)
    return ok


def tile_mask(
    layout: TokenLayout,
    block_size: int = 64,
    *,
    window: tuple[int, int, int] = (3, 3, 3),
    tile: tuple[int, int, int] | None = None,
    device: torch.device | str | None = None,
) -> BlockSparseMask:
    """Sliding-tile mask ``[1, 1, Qb, Kb]`` on the order of :func:`tile_permutation` (same ``tile``)."""
    n = layout.num_tokens
    nb = cdiv(n, block_size)
    if layout.grid is None:
        return mask_from_bool(torch.ones(nb, nb, dtype=torch.bool, device=device), block_size, n)
    grid = layout.grid
    tile = tuple(tile) if tile is not None else default_tile(grid, block_size)
    ntiles = tuple(cdiv(grid[a], tile[a]) for a in range(3))
    ng = layout.grid_len
    tid_sorted = torch.sort(tile_ids(grid, tile, device)).values  # tile id at each grid position
    groups = torch.full((n,), -1, dtype=torch.int64, device=device)
    groups[:ng] = tid_sorted
    seg = segments(groups, block_size)
    g = seg.grp.clamp_min(0)
    coords = torch.stack([g // (ntiles[1] * ntiles[2]), (g // ntiles[2]) % ntiles[1], g % ntiles[2]], -1)
    keep = tile_window_rule(coords.unsqueeze(1), coords.unsqueeze(0), ntiles, window)
    return mask_from_bool(reduce_segment_pairs(seg, seg, keep, nb, nb), block_size, n)


# ---------------------------------------------------------------------- the family (see registry.py)
def _static(layout: TokenLayout, spec, block_size: int, device=None) -> BlockSparseMask:
    return tile_mask(layout, block_size, window=spec.get("window"), tile=spec.get("tile"), device=device)


def _build_group(call, spec, heads):
    layout, bs, dev = call.layout, call.block_size, call.device
    perm = None
    if layout.grid is not None:
        tile = spec.get("tile") or default_tile(layout.grid, bs)
        perm = call.cached(
            ("perm", layout, "tile", tuple(tile), str(dev)), lambda: tile_permutation(layout, tile, dev)
        )
    return static_group(call, spec, heads, lambda: _static(layout, spec, bs, dev), perm)


def _windows(ntiles: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """Tile windows that make sense for a grid of ``ntiles`` tiles: per axis the odd sizes 1 / 3 / 5 that
    fit and the whole axis, every combination except the whole grid (that is dense)."""

    def axis(n: int) -> list[int]:
        return sorted({w for w in (1, 3, 5) if w < n} | {n})

    out = []
    for t in axis(ntiles[0]):
        for h in axis(ntiles[1]):
            for w in axis(ntiles[2]):
                if (t, h, w) != tuple(ntiles):
                    out.append((t, h, w))
    return out


def _candidates(layout: TokenLayout, block_size: int) -> list[HeadSpec]:
    """The block-sized tile (:func:`default_tile`), windows of 1 / 3 / 5 tiles or the whole axis, per axis."""
    if layout.grid is None:
        return []
    tile = default_tile(layout.grid, block_size)
    ntiles = tuple(cdiv(layout.grid[a], tile[a]) for a in range(3))
    return [HeadSpec.make("tile", window=w, tile=tile) for w in _windows(ntiles)]


def _cost(model, spec, density: float, layout) -> float:
    """The blocks, plus gathering q, k, v into the tiled order and scattering the output back."""
    return model.block_cost(density, layout) + model.permute_cost(layout)


def _planted(kind: str, spec, layout: TokenLayout, block_size: int) -> bool:
    """``local``: any window; ``temporal``: a window spanning every frame."""
    if kind == "local":
        return True
    if kind == "temporal":
        tile = spec.get("tile") or default_tile(layout.grid, block_size)
        return 2 * (int(spec.get("window")[0]) // 2) + 1 >= cdiv(layout.grid[0], tile[0])
    return False


FAMILY = builtin_family(
    "tile",
    params={"window": (3, 3, 3), "tile": None},
    checks={
        "window": (params.int3, "three positive ints (wt, wh, ww), in tiles"),
        "tile": (
            (lambda v: v is None or params.int3(v)),
            "None or three positive ints (tf, th, tw), in tokens",
        ),
    },
    kind="static",
    doc="static 3D sliding-tile window: window (wt, wh, ww) in tiles with STA's meaning (an even w keeps "
    "w + 1 tiles), tile (tf, th, tw) in tokens (None = from the block size)",
    static_mask=_static,
    build_group=_build_group,
    candidates=_candidates,
    cost=_cost,
    planted=_planted,
    needs_grid=True,
    remainder=True,
)
