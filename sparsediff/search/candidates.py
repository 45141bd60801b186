"""Candidate head specs of the search and the block structure each one gives a head.

:func:`default_candidates` spans every pattern family with a parameter grid sized from the layout;
:func:`build_structures` turns candidates into what the evaluator needs per head -- the query / key
token orders and the ``[Qb, Kb]`` block bools -- using the same pattern builders the attention op uses
(:mod:`sparsediff.patterns`), so what is measured is what will run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..patterns import (
    cluster_permutations,
    cluster_topp_block_bool,
    reordered_permutation,
    static_mask,
    tile_permutation,
    topp_block_bool,
)
from ..patterns.common import block_token_counts, cdiv
from ..patterns.tile import default_tile
from ..permute import Permutation
from ..specs import AXIS_ORDERS, HeadSpec

__all__ = [
    "CROSS_STEP_PATTERNS",
    "default_candidates",
    "family",
    "Structure",
    "build_structures",
    "check_candidates",
]

#: Patterns that need an earlier profiled step of the same layer (see :class:`LayerAccumulator`).
CROSS_STEP_PATTERNS = frozenset({"lse_cache", "skip"})

S = HeadSpec.make


def family(spec: HeadSpec) -> str:
    """Family label used in reports and comparisons: the pattern name, with reordered heads split into
    ``"reordered"`` (static orders) and ``"cluster"`` (``order="cluster"``)."""
    if spec.pattern == "reordered" and spec.get("order") == "cluster":
        return "cluster"
    return spec.pattern


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


def _order_bands(layout: TokenLayout, order: str, block_size: int) -> list[int]:
    """Bands for a static reordered order: multiples of the token period of the order's inner axes
    (``"fhw"``: one row ``W`` and one frame ``H*W`` = tokens per frame; ``"frame"`` = ``hwf``: ``F`` frames
    of one position, ``W*F``...), plus block multiples for the Hilbert curve."""
    F, H, W = layout.grid
    n = layout.grid_len
    size = {"f": F, "h": H, "w": W}
    ax = "hwf" if order == "frame" else order
    if order == "hilbert":
        bands = [block_size, 2 * block_size, 4 * block_size, 8 * block_size]
    else:
        inner, inner2 = size[ax[2]], size[ax[1]] * size[ax[2]]
        bands = [inner, 2 * inner, inner2 // 2, inner2]
    return sorted({int(b) for b in bands if 1 <= b < n})


def default_candidates(
    layout: TokenLayout, block_size: int = 64, *, cross_step: bool = True
) -> list[HeadSpec]:
    """The default candidate grid for ``layout``: every family, parameters sized from the grid.

    * ``dense``;
    * ``radial``: decay 0.25 / 0.5 / 1 / 2, with and without the frame-0 sink (video only), each with the
      block rules ``"any"`` and ``"reference"`` (the authors' sparser column-density rule);
    * ``tile``: the block-sized tile (:func:`~sparsediff.patterns.tile.default_tile`), windows of 1 / 3 / 5
      tiles or the whole axis, per axis independently;
    * ``reordered`` static: ``"frame"`` (position-major), the axis orders that differ from the natural
      and frame orders, ``"hilbert"``; bands in multiples of each order's inner period (tokens per frame,
      rows, frames per position) -- orders whose permutation equals an earlier one are dropped; the
      ``"frame"`` order also with Sparse-VideoGen's sink (first ``H*W`` reordered keys kept);
      ``reordered`` top-p on the frame and Hilbert orders; ``reordered`` ``order="cluster"`` top-p 0.9 /
      0.95 / 0.98;
    * ``topp``: top_p 0.8 / 0.9 / 0.95 / 0.98 (min_frac 0.02);
    * ``cross_step=True``: ``lse_cache`` recall 0.9 / 0.95 / 0.98 and ``skip`` (need two profiled steps,
      :class:`~sparsediff.search.LayerAccumulator`).

    A layout without a grid gets dense, topp (and the cross-step families) only.
    """
    out: list[HeadSpec] = [S("dense")]
    grid = layout.grid
    if grid is not None:
        F = grid[0]
        for rule in ("any", "reference"):
            extra = {} if rule == "any" else {"block_rule": rule}
            for decay in (0.25, 0.5, 1.0, 2.0):
                out.append(S("radial", decay=decay, **extra))
                if F > 2:
                    out.append(S("radial", decay=decay, sink=True, **extra))
        tile = default_tile(grid, block_size)
        ntiles = tuple(cdiv(grid[a], tile[a]) for a in range(3))
        for w in _windows(ntiles):
            out.append(S("tile", window=w, tile=tile))
        seen: list[torch.Tensor] = [reordered_permutation(layout, "fhw").perm]  # natural (grid first)
        orders = []
        for order in ("frame", *AXIS_ORDERS, "hilbert"):
            p = reordered_permutation(layout, order).perm
            if any(torch.equal(p, s) for s in seen):
                continue
            seen.append(p)
            orders.append(order)
        for order in orders:
            for band in _order_bands(layout, order, block_size):
                out.append(S("reordered", order=order, band=band))
                if order == "frame" and grid[0] > 2:
                    out.append(S("reordered", order=order, band=band, sink=True))
        for order in [o for o in ("frame", "hilbert") if o in orders]:
            for tp in (0.9, 0.95):
                out.append(S("reordered", order=order, select="topp", top_p=tp, min_frac=0.0))
        if layout.grid_len >= 2 * block_size:
            for tp in (0.9, 0.95, 0.98):
                out.append(S("reordered", order="cluster", select="topp", top_p=tp, min_frac=0.0))
    for tp in (0.8, 0.9, 0.95, 0.98):
        out.append(S("topp", top_p=tp, min_frac=0.02))
    if cross_step:
        for r in (0.9, 0.95, 0.98):
            out.append(S("lse_cache", recall=r))
        out.append(S("skip"))
    return out


def check_candidates(candidates: Sequence[HeadSpec], layout: TokenLayout) -> list[HeadSpec]:
    """Validate a candidate list (HeadSpecs, no duplicates, grid patterns only with a grid)."""
    out = []
    for i, c in enumerate(candidates):
        if not isinstance(c, HeadSpec):
            raise TypeError(f"candidates[{i}] must be a HeadSpec, got {type(c).__name__}")
        if c in out:
            raise ValueError(f"candidates[{i}] = {c!r} is listed twice")
        if layout.grid is None and c.pattern in ("tile", "reordered", "radial"):
            raise ValueError(f"candidates[{i}] = {c!r} needs a layout with a video/image grid, got {layout}")
        out.append(c)
    if not out:
        raise ValueError("no candidates to search")
    return out


@dataclass
class Structure:
    """What one candidate computes for the heads of one call.

    Attributes:
        spec: the candidate.
        group: key of its key-token order (candidates sharing it share the per-block partial sums).
        q_pos: int64 ``[N]`` or ``[B, H, N]``: position of every natural-order token in the query order.
        k_perm: int64 ``[N]`` / ``[B, H, N]`` key order (``k_perm[i]`` = natural token at position ``i``),
            or None for the natural order.
        blocks: bool ``[Bm, Hm, Qb, Kb]`` kept (query block, key block) pairs in those orders
            (``Bm`` / ``Hm`` 1 when shared).
    """

    spec: HeadSpec
    group: tuple
    q_pos: torch.Tensor | None
    k_perm: torch.Tensor | None
    blocks: torch.Tensor

    def head(self, b: int, h: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """``(q_pos [N] | None, k_perm [N] | None, blocks [Qb, Kb])`` of batch ``b``, head ``h``."""

        def pick(t):
            if t is None or t.dim() == 1:
                return t
            return t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0]

        bb = self.blocks
        return (
            pick(self.q_pos),
            pick(self.k_perm),
            bb[b if bb.shape[0] > 1 else 0, h if bb.shape[1] > 1 else 0],
        )

    def density(self, num_tokens: int, block_size: int) -> torch.Tensor:
        """float64 ``[Bm, Hm]``: fraction of query x key pairs computed (ragged last blocks counted
        exactly, as :meth:`sparsediff.BlockSparseMask.density_per_head`)."""
        c = block_token_counts(num_tokens, block_size, self.blocks.device).double()
        pairs = torch.einsum("bhqk,q,k->bh", self.blocks.double(), c, c)
        return pairs / float(num_tokens * num_tokens)


def _perm_fields(p: Permutation) -> tuple[torch.Tensor, torch.Tensor]:
    return p.inv, p.perm


def build_structures(
    candidates: Sequence[HeadSpec],
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    block_size: int,
    scale: float,
) -> list[Structure]:
    """Block structures of the single-step candidates for q/k ``[B, H, N, D]`` (cross-step patterns are
    handled by the accumulator and skipped here)."""
    N = layout.num_tokens
    dev = q.device
    dense_nat = layout.dense_mask(dev)
    perms: dict[tuple, Permutation] = {}
    clusters: dict[tuple, tuple] = {}
    out = []
    for spec in candidates:
        p = spec.pattern
        if p in CROSS_STEP_PATTERNS:
            continue
        if p in ("dense", "radial"):
            bb = static_mask(layout, spec, block_size, dev).to_dense()
            out.append(Structure(spec, ("natural",), None, None, bb))
        elif p == "tile":
            tile = tuple(spec.get("tile") or default_tile(layout.grid, block_size))
            key = ("tile", tile)
            if key not in perms:
                perms[key] = tile_permutation(layout, tile, dev)
            qp, kp = _perm_fields(perms[key])
            bb = static_mask(layout, spec, block_size, dev).to_dense()
            out.append(Structure(spec, key, qp, kp, bb))
        elif p == "reordered" and spec.get("order") != "cluster":
            order = spec.get("order")
            key = ("order", order)
            if key not in perms:
                perms[key] = reordered_permutation(layout, order, dev)
            perm = perms[key]
            qp, kp = _perm_fields(perm)
            if spec.get("select") == "static":
                bb = static_mask(layout, spec, block_size, dev).to_dense()
            else:
                gf_dense = torch.arange(N, device=dev) >= layout.grid_len
                bb = topp_block_bool(
                    q[:, :, perm.perm],
                    k[:, :, perm.perm],
                    gf_dense,
                    block_size,
                    top_p=float(spec.get("top_p")),
                    min_frac=float(spec.get("min_frac")),
                    scale=scale,
                )
            out.append(Structure(spec, key, qp, kp, bb))
        elif p == "reordered":  # cluster
            ncl = int(spec.get("clusters")) or min(512, max(1, cdiv(layout.grid_len, block_size)))
            iters = int(spec.get("kmeans_iters"))
            key = ("cluster", ncl, iters)
            if key not in clusters:
                pq, pk, cents, labels = cluster_permutations(q, k, layout, ncl, iters, None)
                clusters[key] = (pq, pk, cents, labels)
            pq, pk, cents, labels = clusters[key]
            if spec.get("select") == "static":
                bb = static_mask(layout, spec, block_size, dev).to_dense()
            else:
                bb = cluster_topp_block_bool(
                    cents,
                    labels,
                    layout,
                    block_size,
                    top_p=float(spec.get("top_p")),
                    min_frac=float(spec.get("min_frac")),
                    scale=scale,
                )
            out.append(Structure(spec, key, pq.inv, pk.perm, bb))
        elif p == "topp":
            bb = topp_block_bool(
                q,
                k,
                dense_nat,
                block_size,
                top_p=float(spec.get("top_p")),
                min_frac=float(spec.get("min_frac")),
                scale=scale,
            )
            out.append(Structure(spec, ("natural",), None, None, bb))
        else:  # a user-registered family (sparsediff.register_pattern)
            from ..patterns.registry import get_family

            fam = get_family(p)
            perm = fam.permutation(layout, spec, dev) if fam.permutation is not None else None
            key = ("natural",) if perm is None else ("registered", spec)
            qp, kp = (None, None) if perm is None else _perm_fields(perm)
            if fam.static_mask is not None:
                bb = fam.static_mask(layout, spec, block_size, dev).to_dense()
            else:
                qq, kk = (q, k) if perm is None else (q[:, :, perm.perm], k[:, :, perm.perm])
                bb = torch.as_tensor(fam.select(qq, kk, layout, spec, block_size, scale)).to(torch.bool)
            out.append(Structure(spec, key, qp, kp, bb))
    return out
