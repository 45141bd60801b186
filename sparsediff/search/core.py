"""``search_attention``: the per-head search of one self-attention call, on tensors (no pipeline)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..specs import HeadSpec
from .candidates import default_candidates, family
from .cost import CostModel
from .evaluate import LayerAccumulator, LayerStats
from .select import select_per_head

__all__ = ["LayerSearch", "search_attention", "layer_search"]


@dataclass
class LayerSearch:
    """The search result of one layer.

    Attributes:
        candidates: the candidate specs (columns of ``table``).
        specs: the chosen spec per head (``len == H``).
        choice: int64 ``[H]`` column of the choice.
        error, density, recall, cost: float64 ``[H]`` of the choice (relative L2 error of the sampled
            rows' output, fraction of blocks computed, attention mass kept, predicted seconds per call).
        met: bool ``[H]``: the choice is within ``target_error`` (False: the head's lowest-error candidate).
        table: ``{"error", "recall", "density", "cost", "count"}`` -> float64 ``[H, C]`` for every candidate
            (NaN: never measured, e.g. a cross-step family after a single step).
        dense_cost: predicted seconds of one head's dense attention.
        target_error: the per-head target used.
        layout: the layout measured.
    """

    candidates: tuple[HeadSpec, ...]
    specs: tuple[HeadSpec, ...]
    choice: torch.Tensor
    error: torch.Tensor
    density: torch.Tensor
    recall: torch.Tensor
    cost: torch.Tensor
    met: torch.Tensor
    table: dict[str, torch.Tensor]
    dense_cost: float
    target_error: float
    layout: TokenLayout

    @property
    def num_heads(self) -> int:
        return len(self.specs)

    @property
    def attention_speedup(self) -> float:
        """Predicted dense / chosen attention time of the layer."""
        return self.dense_cost * self.num_heads / max(float(self.cost.sum()), 1e-30)

    def family_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.specs:
            out[family(s)] = out.get(family(s), 0) + 1
        return out

    def best_of_family(self, fam: str, *, max_density: float | None = None) -> torch.Tensor:
        """float64 ``[H]``: per head, the lowest error among candidates of family ``fam`` (with density
        at most ``max_density``); inf where none qualifies."""
        cols = [i for i, c in enumerate(self.candidates) if family(c) == fam]
        e = self.table["error"][:, cols]
        if max_density is not None:
            e = torch.where(self.table["density"][:, cols] <= max_density, e, torch.inf)
        e = torch.where(torch.isnan(e), torch.inf, e)
        return e.min(-1).values if cols else torch.full((self.num_heads,), torch.inf, dtype=torch.float64)

    def format(self) -> str:
        """A per-head table of the choice."""
        lines = [f"{'head':>4}  {'error':>7}  {'density':>7}  {'recall':>6}  choice"]
        for h, s in enumerate(self.specs):
            flag = "" if bool(self.met[h]) else "  (target not met)"
            lines.append(
                f"{h:>4}  {float(self.error[h]):7.4f}  {float(self.density[h]):7.3f}  {float(self.recall[h]):6.3f}  "
                f"{s!r}{flag}"
            )
        lines.append(f"predicted attention speedup {self.attention_speedup:.2f}x")
        return "\n".join(lines)


def cost_table(stats: LayerStats, cost_model: CostModel) -> torch.Tensor:
    """float64 ``[H, C]`` predicted seconds per head and call for every candidate (mean density)."""
    m = stats.means()
    dens = m["density"]
    out = torch.empty_like(dens)
    for c, spec in enumerate(stats.candidates):
        for h in range(stats.num_heads):
            d = float(dens[h, c])
            out[h, c] = float("nan") if d != d else cost_model.cost(spec, d, stats.layout)
    return out


def layer_search(
    stats: LayerStats, *, target_error: float, cost_model: CostModel, choice: torch.Tensor | None = None
) -> LayerSearch:
    """A :class:`LayerSearch` from accumulated statistics: per-head selection under ``target_error``
    (or the given ``choice [H]``, e.g. from :func:`~sparsediff.search.select_global`)."""
    m = stats.means()
    cost = cost_table(stats, cost_model)
    table = {
        "error": m["err"],
        "recall": m["recall"],
        "density": m["density"],
        "cost": cost,
        "count": stats.count.clone(),
    }
    if choice is None:
        choice, met = select_per_head(table["error"], cost, target_error)
    else:
        choice = choice.long()
        met = table["error"].gather(1, choice.view(-1, 1)).squeeze(1) <= target_error
    idx = torch.arange(stats.num_heads)
    return LayerSearch(
        candidates=stats.candidates,
        specs=tuple(stats.candidates[int(c)] for c in choice),
        choice=choice,
        error=table["error"][idx, choice],
        density=table["density"][idx, choice],
        recall=table["recall"][idx, choice],
        cost=cost[idx, choice],
        met=met,
        table=table,
        dense_cost=cost_model.dense_cost(stats.layout),
        target_error=float(target_error),
        layout=stats.layout,
    )


def search_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    *,
    target_error: float = 0.05,
    block_size: int = 64,
    candidates: Sequence[HeadSpec] | None = None,
    num_rows: int = 512,
    seed: int = 0,
    cost_model: CostModel | None = None,
) -> LayerSearch:
    """Search every head of one self-attention call for its cheapest pattern within ``target_error``.

    Args:
        q, k, v: ``[B, H, N, D]`` of one call (any dtype; measured in float32), ``N == layout.num_tokens``.
            Batch elements are measured separately and their statistics averaged.
        layout: the call's :class:`~sparsediff.layout.TokenLayout`.
        target_error: per head, the largest relative L2 error of the sampled rows' output
            (``||out_c - out|| / ||out||``) a choice may have.
        block_size: tokens per block of the masks (as the plan will run).
        candidates: specs to try (``None``: :func:`~sparsediff.search.default_candidates` without the
            cross-step families). ``lse_cache`` / ``skip`` need two steps: use
            :class:`~sparsediff.search.LayerAccumulator` (passing them here raises).
        num_rows: sampled query rows per head (:func:`~sparsediff.search.sample_rows`; all rows when
            ``N <= num_rows``). Memory is ``O(chunk x N)``, never ``N x N``.
        seed: row sampling seed.
        cost_model: prices candidates (``None``: :meth:`CostModel.default` for q's device).

    Returns:
        :class:`LayerSearch` with the choice per head and the full per-candidate table.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D], got shape {tuple(q.shape)}")
    if not isinstance(layout, TokenLayout):
        raise TypeError(f"layout must be a TokenLayout, got {type(layout).__name__}")
    if candidates is None:
        candidates = default_candidates(layout, block_size, cross_step=False)
    else:
        cross = [c for c in candidates if isinstance(c, HeadSpec) and c.is_cross_step]
        if cross:
            raise ValueError(
                f"{cross[0]!r} is a cross-step family: it needs two profiled steps of the layer -- measure with "
                "sparsediff.search.LayerAccumulator (add() once per step), not search_attention"
            )
    acc = LayerAccumulator(candidates, block_size=block_size, num_rows=num_rows, seed=seed)
    acc.add(q, k, v, layout)
    cm = cost_model or CostModel.default(q.device, head_dim=q.shape[-1], block_size=block_size, dtype=q.dtype)
    return layer_search(acc.stats, target_error=target_error, cost_model=cm)
