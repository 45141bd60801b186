"""Offline per-head pattern search (``sparsediff search``).

On tensors: :func:`search_attention` (one call), :class:`LayerAccumulator` (consecutive profiled steps,
cross-step families). Pricing: :class:`CostModel` / :class:`CostCache`. Selection: :func:`select_per_head`,
:func:`select_global`. Pipelines: :func:`profile_pipeline` (dense generation through the hooks' observer)
and :func:`plan_from_stats`. See README "Searching a per-head plan" and docs/CONTRACTS.md.
"""

from __future__ import annotations

from .candidates import CROSS_STEP_PATTERNS, cross_step_patterns, default_candidates, family
from .core import LayerSearch, layer_search, search_attention
from .cost import CostCache, CostModel
from .evaluate import LayerAccumulator, LayerStats, sample_rows
from .select import GlobalChoice, select_global, select_per_head

__all__ = [
    "CROSS_STEP_PATTERNS",
    "CostCache",
    "CostModel",
    "GlobalChoice",
    "LayerAccumulator",
    "LayerSearch",
    "LayerStats",
    "cross_step_patterns",
    "default_candidates",
    "family",
    "layer_search",
    "sample_rows",
    "search_attention",
    "select_global",
    "select_per_head",
]
