"""Pattern families, one module each, collected by :mod:`.registry` (see there for the protocol).

Static builders are pure functions ``(layout, block_size, **params) -> BlockSparseMask`` (batch 1, head 1);
dynamic ones take q/k. :func:`static_mask` builds the mask of any static :class:`~sparsediff.HeadSpec`.

Importing this package registers the built-in families, in this order (the order of the search's default
candidate grid and of :data:`sparsediff.PATTERNS`): dense, radial, tile, reordered, topp, lse_cache, skip.

Module order (one way, no cycles): ``layout``, ``mask``, ``permute`` -> ``patterns.registry`` (the family
table; imports no family) -> ``specs`` (``HeadSpec`` validates against the table) -> ``patterns.params`` /
``patterns.common`` -> ``patterns.<family>`` -> ``patterns`` (this package: registers the built-ins) ->
``plan`` -> ``defaults`` -> ``attention`` -> ``search.*``.
"""

from __future__ import annotations

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from . import dense, lse_cache, radial, reordered, skip, tile, topp
from .dense import dense_mask
from .lse_cache import lse_cache_select
from .radial import radial_mask
from .registry import (
    GroupCall,
    GroupPlan,
    GroupWork,
    PatternFamily,
    get_family,
    register_builtin,
    register_pattern,
    unregister_pattern,
)
from .reordered import (
    band_mask,
    cluster_permutations,
    cluster_topp_block_bool,
    reordered_band,
    reordered_permutation,
)
from .specs import HeadSpec
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
    "get_family",
    "PatternFamily",
    "GroupCall",
    "GroupWork",
    "GroupPlan",
]

# The built-in families, in search order (each declared in its own module as FAMILY).
for _module in (dense, radial, tile, reordered, topp, lse_cache, skip):
    register_builtin(_module.FAMILY)
del _module


def static_mask(layout: TokenLayout, spec: HeadSpec, block_size: int = 64, device=None) -> BlockSparseMask:
    """The ``[1, 1, Qb, Kb]`` mask of a static spec, in the order of its permutation (if any)."""
    fam = get_family(spec.pattern)
    if fam.static_mask is None:
        raise ValueError(f"{spec} has no static mask")
    return fam.static_mask(layout, spec, block_size, device)
