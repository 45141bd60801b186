"""``dense``: exact attention (every block). Static; no parameters.

Search: always a candidate (the baseline), priced as the dense kernel (not the sparse op at density 1);
the structure of planted ``global`` (diffuse) heads.
"""

from __future__ import annotations

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from .registry import GroupCall, GroupWork, builtin_family, static_group
from .specs import HeadSpec

__all__ = ["dense_mask"]


def dense_mask(layout: TokenLayout, block_size: int = 64, device=None) -> BlockSparseMask:
    """Every block of ``layout`` (``[1, 1, Qb, Kb]``, :meth:`BlockSparseMask.full`)."""
    n = layout.num_tokens
    return BlockSparseMask.full(1, 1, block_size, (n, n), device)


def _build_group(call: GroupCall, spec, heads) -> GroupWork:
    return static_group(call, spec, heads, lambda: dense_mask(call.layout, call.block_size, call.device))


FAMILY = builtin_family(
    "dense",
    params={},
    checks={},
    kind="static",
    doc="exact attention",
    static_mask=lambda layout, spec, bs, device: dense_mask(layout, bs, device),
    build_group=_build_group,
    candidates=lambda layout, block_size: [HeadSpec.make("dense")],
    cost=lambda model, spec, density, layout: model.dense_cost(layout),
    planted=lambda kind, spec, layout, block_size: kind == "global",
)
