"""Dynamic top-p block selection on mean-pooled q/k (SpargeAttn-like, training-free default).

Per (batch, head, query block): ``p = softmax_k(scale * q̄ · k̄ + log |key block|)`` over key blocks
(mean-pooled over each block's valid tokens), keep key blocks in decreasing ``p`` until their
cumulative mass reaches ``top_p`` (the crossing block included), and at least
``ceil(min_frac * Kb)`` (>= 1) of them. The diagonal block is always kept (self-attention), and
rows/columns of blocks that hold a dense (non-grid) token are kept in full.
"""

from __future__ import annotations

import torch

from ..mask import BlockSparseMask
from . import params
from .common import apply_dense_tokens, dense_token_blocks, min_count, pooled_block_scores, select_cumulative
from .registry import GroupWork, builtin_family
from .specs import HeadSpec

__all__ = ["topp_block_bool", "topp_mask"]


def topp_block_bool(
    q: torch.Tensor,
    k: torch.Tensor,
    dense_tokens: torch.Tensor,
    block_size: int,
    *,
    top_p: float = 0.9,
    min_frac: float = 0.05,
    scale: float | None = None,
) -> torch.Tensor:
    """Bool ``[B, H, Qb, Kb]`` for ``q, k [B, H, N, D]`` in the order the mask will be used in;
    ``dense_tokens [N]`` bool in that same order."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    p = pooled_block_scores(q, k, block_size, block_size, scale)
    kb = p.shape[-1]
    keep = select_cumulative(p, top_p, min_count(min_frac, kb))
    qb = keep.shape[-2]
    if qb == kb:
        keep = keep | torch.eye(qb, dtype=torch.bool, device=keep.device)
    return apply_dense_tokens(keep, dense_token_blocks(dense_tokens.to(keep.device), block_size))


def topp_mask(q, k, dense_tokens, block_size, *, top_p=0.9, min_frac=0.05, scale=None) -> BlockSparseMask:
    """:class:`BlockSparseMask` ``[B, H, Qb, Kb]`` of :func:`topp_block_bool`."""
    bb = topp_block_bool(q, k, dense_tokens, block_size, top_p=top_p, min_frac=min_frac, scale=scale)
    n = q.shape[2]
    return BlockSparseMask.from_dense(bb, block_size, (n, k.shape[2]))


# ---------------------------------------------------------------------- the family (see registry.py)
def _build_group(call, spec, heads):
    hl, n = list(heads), call.num_tokens
    bb = topp_block_bool(
        call.q[:, hl],
        call.k[:, hl],
        call.dense_tokens(),
        call.block_size,
        top_p=float(spec.get("top_p")),
        min_frac=float(spec.get("min_frac")),
        scale=call.scale,
    )
    return GroupWork(mask=BlockSparseMask.from_dense(bb, call.block_size, (n, n)))


def _candidates(layout, block_size: int) -> list[HeadSpec]:
    return [HeadSpec.make("topp", top_p=tp, min_frac=0.02) for tp in (0.8, 0.9, 0.95, 0.98)]


def _cost(model, spec, density: float, layout) -> float:
    """The blocks, plus pooling q/k and the pooled score matrix (and its sort)."""
    return model.block_cost(density, layout) + model.pooled_selection_cost(layout)


FAMILY = builtin_family(
    "topp",
    params={"top_p": 0.9, "min_frac": 0.05},
    checks={"top_p": params.frac(True), "min_frac": params.frac(False)},
    kind="dynamic",
    doc="dynamic top-p over mean-pooled block scores: top_p (cumulative mass), min_frac (least kept)",
    build_group=_build_group,
    candidates=_candidates,
    cost=_cost,
    planted=lambda kind, spec, layout, block_size: kind == "stripe",  # finds sink columns
    remainder=True,
)
