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
import math

import torch

from ..block_mass import block_mass
from ..mask import BlockSparseMask
from . import params
from .common import apply_dense_tokens, dense_token_blocks, min_count, select_cumulative
from .registry import CROSS_STEP, GroupWork, builtin_family
from .specs import HeadSpec

logger = logging.getLogger(__name__)

__all__ = ["lse_cache_select", "LseCacheState"]


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
NAME = "lse_cache"


class LseCacheState:
    """The family's slot of a layer state (``state.family_state("lse_cache", LseCacheState)``).

    Attributes:
        lse: ``[B, H, N]`` float32 LSE of the last pass of the family's heads (natural order), or None.
        lse_valid: bool ``[H]`` -- which heads' ``lse`` entries are current enough to use.
        indices: ``{(spec, heads): (mask, refresh_step)}`` -- block masks and when they were selected.
        last_recall: ``{(spec, heads): [B, Hg, Qb]}`` -- recall achieved at the last refresh (diagnostics).
    """

    def __init__(self) -> None:
        self.lse: torch.Tensor | None = None
        self.lse_valid: torch.Tensor | None = None
        self.indices: dict = {}
        self.last_recall: dict = {}

    def store_lse(self, lse: torch.Tensor, heads) -> None:
        """Keep ``lse [B, H, N]`` of ``heads`` (the other heads' entries are left as they are)."""
        B, H, N = lse.shape
        if self.lse is None:
            self.lse = torch.full((B, H, N), -math.inf, dtype=torch.float32, device=lse.device)
            self.lse_valid = torch.zeros(H, dtype=torch.bool)
        h = list(heads)
        self.lse[:, h] = lse[:, h].float()
        self.lse_valid[h] = True

    def has_lse(self, heads) -> bool:
        return self.lse is not None and bool(self.lse_valid[list(heads)].all())

    def __repr__(self) -> str:
        return f"LseCacheState(lse={'yes' if self.lse is not None else 'no'}, groups={len(self.indices)})"


def _slot(state) -> LseCacheState:
    return state.family_state(NAME, LseCacheState)


def _store_lse(slot: LseCacheState, heads):
    # lse_cache heads are never permuted: the op's LSE is in natural order
    return lambda out, lse: slot.store_lse(lse, heads)


def _build_group(call, spec, heads):
    """Mask of a group of lse_cache heads: refreshed per the schedule, else the cached one (module docs)."""
    state, step, hg = call.state, call.step, len(heads)
    if state is None:
        logger.debug("lse_cache heads %s without a LayerState run dense", heads)
        return GroupWork(mask=call.full_mask(hg))
    slot = _slot(state)
    after = _store_lse(slot, heads)  # the op's LSE refreshes the cache on every call
    key = (spec, tuple(heads))
    refresh = int(spec.get("refresh"))
    cached = slot.indices.get(key)
    due = cached is None or step is None or cached[1] is None or refresh <= 1 or step - cached[1] >= refresh
    if not due:
        return GroupWork(mask=cached[0], after=after)
    if not slot.has_lse(heads):  # no LSE yet: this call is dense and seeds the cache
        slot.indices.pop(key, None)
        return GroupWork(mask=call.full_mask(hg), after=after)
    hl = list(heads)
    mask, achieved = lse_cache_select(
        call.q[:, hl],
        call.k[:, hl],
        slot.lse[:, hl],
        call.dense_tokens(),
        call.block_size,
        recall=float(spec.get("recall")),
        min_frac=float(spec.get("min_frac")),
        scale=call.scale,
        backend=call.backend,
    )
    slot.indices[key] = (mask, step)
    slot.last_recall[key] = achieved
    return GroupWork(mask=mask, after=after)


def _on_dense(call, spec, heads, out, lse) -> None:
    """A dense pass (warm-up / refresh): its exact LSE seeds the next selection."""
    if call.state is not None:
        _slot(call.state).store_lse(lse, heads)


def _candidates(layout, block_size: int) -> list[HeadSpec]:
    return [HeadSpec.make(NAME, recall=r) for r in (0.9, 0.95, 0.98)]


def _cost(model, spec, density: float, layout) -> float:
    """The blocks, plus one QK^T block-mass pass over all blocks every ``refresh`` steps (amortised)."""
    return model.block_cost(density, layout) + model.block_mass_cost(layout, int(spec.get("refresh")))


FAMILY = builtin_family(
    NAME,
    params={"recall": 0.95, "refresh": 5, "min_frac": 0.0},
    checks={"recall": params.frac(True), "refresh": params.int_ge(1), "min_frac": params.frac(False)},
    kind=CROSS_STEP,
    doc="cached-LSE block selection: recall target, refresh (steps between selections), min_frac",
    build_group=_build_group,
    on_dense=_on_dense,
    candidates=_candidates,
    cost=_cost,
    # data-adaptive, it can serve every planted kind; it counts as the structure of sink stripes only
    planted=lambda kind, spec, layout, block_size: kind == "stripe",
    cross_step_measure="block_mass",
    refresh_param="refresh",
)
