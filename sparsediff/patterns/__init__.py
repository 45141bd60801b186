"""Pattern builders. Each static builder is a pure function ``(layout, block_size, **params) -> BlockSparseMask``
(batch 1, head 1); dynamic ones take q/k. :func:`static_mask` dispatches a :class:`~sparsediff.HeadSpec`.
"""

from __future__ import annotations

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from ..specs import PATTERNS, HeadSpec
from .lse_cache import lse_cache_select
from .radial import radial_mask
from .registry import register_pattern, unregister_pattern
from .reordered import (
    band_mask,
    cluster_permutations,
    cluster_topp_block_bool,
    reordered_band,
    reordered_permutation,
)
from .tile import default_tile, tile_mask, tile_permutation
from .topp import topp_block_bool, topp_mask

__all__ = [
    "radial_mask",
    "tile_mask",
    "tile_permutation",
    "default_tile",
    "band_mask",
    "reordered_permutation",
    "reordered_band",
    "cluster_permutations",
    "cluster_topp_block_bool",
    "topp_mask",
    "topp_block_bool",
    "lse_cache_select",
    "static_mask",
    "dense_mask",
    "register_pattern",
    "unregister_pattern",
]


def dense_mask(layout: TokenLayout, block_size: int = 64, device=None) -> BlockSparseMask:
    """Every block of ``layout`` (``[1, 1, Qb, Kb]``, :meth:`BlockSparseMask.full`)."""
    n = layout.num_tokens
    return BlockSparseMask.full(1, 1, block_size, (n, n), device)


def static_mask(layout: TokenLayout, spec: HeadSpec, block_size: int = 64, device=None) -> BlockSparseMask:
    """The ``[1, 1, Qb, Kb]`` mask of a static spec, in the order of its permutation (if any)."""
    p = spec.pattern
    if p == "dense":
        return dense_mask(layout, block_size, device)
    if p == "radial":
        return radial_mask(
            layout,
            block_size,
            decay=float(spec.get("decay")),
            sink=bool(spec.get("sink")),
            dense_dist=int(spec.get("dense_dist")),
            block_rule=str(spec.get("block_rule")),
            device=device,
        )
    if p == "tile":
        return tile_mask(layout, block_size, window=spec.get("window"), tile=spec.get("tile"), device=device)
    if p == "reordered" and spec.get("select") == "static":
        band = reordered_band(layout, spec.get("band"), spec.get("band_frames"))
        return band_mask(layout, block_size, band=band, sink=bool(spec.get("sink")), device=device)
    if p not in PATTERNS:  # a user-registered family
        from .registry import get_family

        fam = get_family(p)
        if fam.static_mask is not None:
            return fam.static_mask(layout, spec, block_size, device)
    raise ValueError(f"{spec} has no static mask")
