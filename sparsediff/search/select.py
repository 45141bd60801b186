"""Choosing one candidate per head: per head under an error target, or a global budget over all heads.

Inputs are per-layer tables ``[H, C]`` (error, density, predicted cost; NaN = not measured, never
chosen). Outputs are candidate indices ``[H]`` per layer.

* :func:`select_per_head` -- each head the cheapest candidate with error <= target (ties: lower error);
  a head with none gets its lowest-error candidate and is flagged.
* :func:`select_global` -- one budget over every head of every layer, by a Lagrangian sweep:

  - ``target_error=E``: minimise total predicted cost subject to *mean* error <= E. For a multiplier
    ``lam`` every head independently takes ``argmin cost + lam * error``; mean error falls as ``lam``
    grows, so the cheapest feasible sweep point is kept. Heads whose error barely rises when sparsified
    take most of the sparsity; sensitive heads stay (nearly) dense.
  - ``density=D``: minimise mean error subject to mean density <= D (``argmin error + mu * density``).

  Lagrangian points lie on the convex hull of the trade-off; a greedy pass of single-head moves inside
  the budget then closes most of the remaining gap.

  When the budget cannot be met (density below every head's sparsest candidate, or error below what the
  candidates reach) the closest plan is returned with ``met=False``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["select_per_head", "select_global", "GlobalChoice"]


def _clean(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(x), torch.full_like(x, float("inf")), x)


def select_per_head(
    error: torch.Tensor, cost: torch.Tensor, target_error: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``error, cost [H, C]`` -> ``(choice [H] int64, met [H] bool)`` (see module docstring)."""
    if target_error < 0:
        raise ValueError(f"target_error must be >= 0, got {target_error}")
    e, c = _clean(error.double()), _clean(cost.double())
    ok = e <= target_error
    big = torch.finfo(torch.float64).max
    # cheapest feasible; ties broken by lower error (lexicographic via a tiny error term)
    score = torch.where(ok, c + 1e-12 * e.clamp(max=1e6), torch.full_like(c, big))
    choice = score.argmin(-1)
    met = ok.any(-1)
    fallback = e.argmin(-1)
    choice = torch.where(met, choice, fallback)
    return choice, met


@dataclass
class GlobalChoice:
    """Result of :func:`select_global`.

    Attributes:
        choices: per layer, candidate index ``[H]`` per head.
        met: whether the budget was met (else the closest plan).
        mean_error, mean_density: over all heads, of the choice.
        total_cost: sum of predicted head costs of the choice.
        multiplier: the Lagrange multiplier of the chosen sweep point.
        message: what was asked and what was reached, one line.
    """

    choices: list[torch.Tensor]
    met: bool
    mean_error: float
    mean_density: float
    total_cost: float
    multiplier: float
    message: str


def _stack(tables: Sequence[torch.Tensor], fill: float) -> torch.Tensor:
    cmax = max(t.shape[1] for t in tables)
    rows = []
    for t in tables:
        t = _clean(t.double())
        if t.shape[1] < cmax:
            t = torch.cat([t, torch.full((t.shape[0], cmax - t.shape[1]), fill, dtype=t.dtype)], 1)
        rows.append(t)
    return torch.cat(rows, 0)


def _refine(primary: torch.Tensor, secondary: torch.Tensor, ch: torch.Tensor, limit: float) -> torch.Tensor:
    """Greedy single-head moves that lower the summed ``primary`` while the mean ``secondary`` stays within
    ``limit`` (closes the duality gap of the sweep on small problems); best move first."""
    ch = ch.clone()
    H = primary.shape[0]
    idx = torch.arange(H)
    budget = limit * H + 1e-12
    for _ in range(10 * H):
        cur_p = primary[idx, ch].unsqueeze(1)
        cur_s = secondary[idx, ch].unsqueeze(1)
        tot_s = float(secondary[idx, ch].sum())
        gain = cur_p - primary  # > 0: improvement
        ok = (tot_s - cur_s + secondary <= budget) & (gain > 1e-15) & torch.isfinite(primary)
        if not bool(ok.any()):
            break
        g = torch.where(ok, gain, torch.full_like(gain, -1.0))
        flat = int(g.argmax())
        ch[flat // primary.shape[1]] = flat % primary.shape[1]
    return ch


def select_global(
    errors: Sequence[torch.Tensor],
    densities: Sequence[torch.Tensor],
    costs: Sequence[torch.Tensor],
    *,
    target_error: float | None = None,
    density: float | None = None,
    points: int = 400,
) -> GlobalChoice:
    """Global budget selection over layers (lists of ``[H_l, C_l]`` tables); exactly one of
    ``target_error`` / ``density``."""
    if (target_error is None) == (density is None):
        raise ValueError("give exactly one of target_error= and density=")
    if target_error is not None and target_error < 0:
        raise ValueError(f"target_error must be >= 0, got {target_error}")
    if density is not None and not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if not errors:
        raise ValueError("no layers to select for")
    inf = float("inf")
    E, Dn, C = _stack(errors, inf), _stack(densities, inf), _stack(costs, inf)
    valid = torch.isfinite(E) & torch.isfinite(Dn) & torch.isfinite(C)
    E = torch.where(valid, E, inf)
    Dn = torch.where(valid, Dn, inf)
    C = torch.where(valid, C, inf)
    if not bool(valid.any(-1).all()):
        raise ValueError("a head has no measured candidate (every entry NaN)")
    Hn = E.shape[0]
    idx = torch.arange(Hn)
    if target_error is not None:
        primary, secondary, limit = C, E, float(target_error)
        scale = float(C[valid].median()) / max(
            float(E[valid & (E > 0)].median()) if bool((E > 0).any()) else 1.0, 1e-12
        )
    else:
        primary, secondary, limit = E, Dn, float(density)
        scale = float(E[valid].median() + 1e-6) / max(float(Dn[valid].median()), 1e-6)
    best = None
    lams = [0.0] + [scale * 10 ** (x / (points / 12)) for x in range(-points // 2, points // 2 + 1)]
    for lam in lams:
        obj = primary + lam * secondary
        ch = obj.argmin(-1)
        sec = float(secondary[idx, ch].mean())
        pri = float(primary[idx, ch].sum())
        if sec <= limit + 1e-12 and (best is None or pri < best[0] - 1e-15):
            best = (pri, lam, ch)
    met = best is not None
    if best is not None:  # Lagrangian points lie on the convex hull: improve greedily inside the budget
        best = (best[0], best[1], _refine(primary, secondary, best[2], limit))
    if best is None:  # closest: minimise the constrained quantity outright (ties by the objective)
        ch = (secondary + 1e-9 * primary / max(float(primary[valid].max()), 1e-30)).argmin(-1)
        best = (float(primary[idx, ch].sum()), inf, ch)
    ch = best[2]
    mean_err = float(E[idx, ch].mean())
    mean_den = float(Dn[idx, ch].mean())
    total = float(C[idx, ch].sum())
    if target_error is not None:
        asked = f"mean error <= {target_error:g}"
    else:
        asked = f"mean density <= {density:g}"
    reached = f"mean error {mean_err:.4f}, mean density {mean_den:.3f}"
    message = (
        f"budget met ({asked}): {reached}"
        if met
        else f"budget NOT met ({asked} is not reachable with these candidates): best effort {reached}"
    )
    out, o = [], 0
    for t in errors:
        out.append(ch[o : o + t.shape[0]].clone())
        o += t.shape[0]
    return GlobalChoice(out, met, mean_err, mean_den, total, best[1], message)
