"""Cached-LSE block selection (AdaSpa-style): exact block importance from a cached log-sum-exp.

At a refresh step, with ``lse`` cached from the layer's previous pass (dense warm-up, a dense seeding
call, or the LSE returned by the last sparse pass of these heads):
``mass = block_mass(q, k, lse)`` -- ``Σ exp(scale q·k − lse_q)`` per (query block, key block), one QKᵀ
pass and no PV (:func:`sparsediff.block_mass.block_mass`: the Triton kernel on CUDA / under the
interpreter, else the PyTorch twin). Per query block the masses are normalised to a distribution over
key blocks and the smallest set of key blocks reaching ``recall`` is kept (at least
``ceil(min_frac * Kb)``, at least 1). The indices are reused until the next refresh. Rows/cols of dense
(non-grid) tokens are kept in full.

Normalising per query block by its computed total (instead of by its token count) makes the selection
insensitive to a uniform drift of the cached LSE; :func:`sparsediff.sparse_attention` refreshes the
cached LSE of lse_cache heads from the LSE the attention op returns on every call, so it is at most one
step old (with a sparse pass it is ``lse_true + log(recall of the row)``, i.e. within a few percent).
"""

from __future__ import annotations

import logging

import torch

from ..mask import BlockSparseMask
from . import params
from .common import apply_dense_tokens, dense_token_blocks, min_count, select_cumulative
from .registry import register_builtin

logger = logging.getLogger(__name__)

__all__ = ["lse_cache_select"]


def lse_cache_select(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    dense_tokens: torch.Tensor,
    block_size: int,
    *,
    recall: float = 0.95,
    min_frac: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[BlockSparseMask, torch.Tensor]:
    """``q, k [B, H, N, D]``, ``lse [B, H, N]``, ``dense_tokens [N]`` ->
    ``(mask [B, H, Qb, Kb], achieved_recall [B, H, Qb])``.

    ``achieved_recall`` is the kept fraction of each query block's (cached-LSE) mass, >= ``recall``.
    """
    from ..block_mass import block_mass

    mass = block_mass(q, k, lse, block_q=block_size, block_kv=block_size, scale=scale, backend=backend)
    tot = mass.sum(-1, keepdim=True)
    p = torch.where(tot > 0, mass / tot.clamp_min(1e-30), torch.zeros_like(mass))
    kb = mass.shape[-1]
    keep = select_cumulative(p, recall, min_count(min_frac, kb) if min_frac > 0 else 1)
    achieved = (p * keep).sum(-1)
    keep = apply_dense_tokens(keep, dense_token_blocks(dense_tokens.to(keep.device), block_size))
    mask = BlockSparseMask.from_dense(keep, block_size, (q.shape[2], k.shape[2]))
    return mask, achieved


# ---------------------------------------------------------------------- the family (see registry.py)
def _store_lse(state, heads):
    # lse_cache heads are never permuted: the op's LSE is in natural order
    return lambda out, lse: state._store_lse(lse, heads)


def _plan(call, spec, heads):
    """Mask of a group of lse_cache heads: refreshed per the schedule, else the cached one (module docs)."""
    from .registry import GroupPlan

    state, step, hg = call.state, call.step, len(heads)
    if state is None:
        logger.debug("lse_cache heads %s without a LayerState run dense", heads)
        return GroupPlan(mask=call.full_mask(hg))
    after = _store_lse(state, heads)  # the op's LSE refreshes the cache on every call
    key = (spec, tuple(heads))
    refresh = int(spec.get("refresh"))
    cached = state.indices.get(key)
    due = cached is None or step is None or cached[1] is None or refresh <= 1 or step - cached[1] >= refresh
    if not due:
        return GroupPlan(mask=cached[0], after=after)
    if not state._has_lse(heads):  # no LSE yet: this call is dense and seeds the cache
        state.indices.pop(key, None)
        return GroupPlan(mask=call.full_mask(hg), after=after)
    hl = list(heads)
    mask, achieved = lse_cache_select(
        call.q[:, hl],
        call.k[:, hl],
        state.lse[:, hl],
        call.dense_tokens(),
        call.block_size,
        recall=float(spec.get("recall")),
        min_frac=float(spec.get("min_frac")),
        scale=call.scale,
        backend=call.backend,
    )
    state.indices[key] = (mask, step)
    state.last_recall[key] = achieved
    return GroupPlan(mask=mask, after=after)


FAMILY = register_builtin(
    "lse_cache",
    params={"recall": 0.95, "refresh": 5, "min_frac": 0.0},
    checks={"recall": params.frac(True), "refresh": params.int_ge(1), "min_frac": params.frac(False)},
    kind="cached",
    doc="cached-LSE block selection: recall target, refresh (steps between selections), min_frac",
    plan=_plan,
)
