"""The searched (mixed-family) choice against single-family choices at matched mean density.

Used by the planted-structure tests and ``samples/search_planted.py``: for a density budget ``D`` the
search (all candidates) and every single family (only that family's candidates, each head at its best
parameters of the family) minimise mean error subject to mean density <= ``D``
(:func:`~sparsediff.search.select_global`). A family that cannot get under ``D`` is reported as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .candidates import family
from .evaluate import LayerStats
from .select import select_global

__all__ = ["FamilyRow", "compare_families"]


@dataclass
class FamilyRow:
    """One row of the comparison: ``name`` ("searched" or a family), whether it reached the budget, and
    the mean error / density of its choice (over all heads of all layers)."""

    name: str
    met: bool
    mean_error: float
    mean_density: float
    counts: dict[str, int]


def _restrict(t: torch.Tensor, cols: list[int]) -> torch.Tensor:
    out = torch.full_like(t, float("nan"))
    out[:, cols] = t[:, cols]
    return out


def compare_families(stats: Sequence[LayerStats], density: float) -> list[FamilyRow]:
    """Rows: the searched choice over all candidates, then each family present, at mean density <= ``density``."""
    means = [s.means() for s in stats]
    errs = [m["err"] for m in means]
    dens = [m["density"] for m in means]
    fams = []
    for s in stats:
        for c in s.candidates:
            if family(c) not in fams:
                fams.append(family(c))
    rows = []
    for name in ["searched", *fams]:
        if name == "searched":
            e, d = errs, dens
        else:
            cols = [[i for i, c in enumerate(s.candidates) if family(c) == name] for s in stats]
            e = [_restrict(x, c) for x, c in zip(errs, cols)]
            d = [_restrict(x, c) for x, c in zip(dens, cols)]
        g = select_global(e, d, d, density=density)
        counts: dict[str, int] = {}
        for s, ch in zip(stats, g.choices):
            for c in ch.tolist():
                f = family(s.candidates[c])
                counts[f] = counts.get(f, 0) + 1
        rows.append(FamilyRow(name, g.met, g.mean_error, g.mean_density, counts))
    return rows
