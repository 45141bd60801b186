"""``dense``: exact attention (every block). Static; no parameters."""

from __future__ import annotations

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from .registry import GroupCall, GroupPlan, register_builtin, static_group

__all__ = ["dense_mask"]


def dense_mask(layout: TokenLayout, block_size: int = 64, device=None) -> BlockSparseMask:
    """Every block of ``layout`` (``[1, 1, Qb, Kb]``, :meth:`BlockSparseMask.full`)."""
    n = layout.num_tokens
    return BlockSparseMask.full(1, 1, block_size, (n, n), device)


def _plan(call: GroupCall, spec, heads) -> GroupPlan:
    return static_group(call, spec, heads, lambda: dense_mask(call.layout, call.block_size, call.device))


FAMILY = register_builtin(
    "dense",
    params={},
    checks={},
    kind="static",
    doc="exact attention",
    static_mask=lambda layout, spec, bs, device: dense_mask(layout, bs, device),
    plan=_plan,
)
