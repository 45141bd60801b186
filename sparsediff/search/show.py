"""``sparsediff plan show PLAN [--png FILE]``: a plan's summary and a layer x head heatmap.

The heatmap has one cell per (layer, head): the colour is the head's family, the shade its density
(measured by the search when the plan carries ``stats``; pale = sparse, saturated = dense; cells
without a measurement are drawn at full shade with a dot).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..plan import Plan, PlanError
from .candidates import family

__all__ = ["main", "plan_rows", "save_heatmap", "FAMILY_COLORS"]

#: RGB in [0, 1] per family (colour-blind-friendly Okabe-Ito palette).
FAMILY_COLORS = {
    "dense": (0.0, 0.0, 0.0),
    "radial": (0.90, 0.62, 0.0),
    "tile": (0.34, 0.71, 0.91),
    "reordered": (0.0, 0.62, 0.45),
    "cluster": (0.80, 0.47, 0.65),
    "topp": (0.0, 0.45, 0.70),
    "lse_cache": (0.84, 0.37, 0.0),
    "skip": (0.6, 0.6, 0.6),
}


def _grid(plan: Plan) -> list[list[tuple[str, float | None]]]:
    """``[layer][head] -> (family, density or None)``."""
    if plan.layers is None:
        raise ValueError("a uniform plan has no per-head layers to show; its summary: " + plan.summary())
    out = []
    for li, layer in enumerate(plan.layers):
        row = []
        for hi, spec in enumerate(layer):
            d = None
            if plan.stats is not None and li < len(plan.stats) and hi < len(plan.stats[li]):
                v = plan.stats[li][hi].get("density")
                d = float(v) if v is not None else None
            row.append((family(spec), d))
        out.append(row)
    return out


def plan_rows(plan: Plan) -> list[str]:
    """Text lines: header, then per layer the family counts and the measured mean density / error."""
    lines = [plan.summary()]
    if plan.model is not None:
        lines.append(f"model: {plan.model.transformer_class} ({plan.model.num_layers} layers)")
    if plan.layout is not None:
        lines.append(f"searched at: {plan.layout}")
    meta = dict(plan.meta.get("search") or {}) if isinstance(plan.meta, dict) else {}
    if meta:
        lines.append(
            f"search: {meta.get('message', '')}; predicted attention speedup "
            f"{meta.get('predicted_attention_speedup') or float('nan'):.2f}x"
        )
        if meta.get("budget_met") is False:
            lines.append("WARNING: best-effort plan (the budget was not met)")
    if plan.layers is None:
        return lines
    lines.append(f"{'layer':>5}  {'density':>7}  {'error':>7}  patterns")
    for li, layer in enumerate(plan.layers):
        counts: dict[str, int] = {}
        for s in layer:
            counts[family(s)] = counts.get(family(s), 0) + 1
        st = plan.stats[li] if plan.stats is not None and li < len(plan.stats) else ()
        dens = [x.get("density") for x in st if x.get("density") is not None]
        errs = [x.get("error") for x in st if x.get("error") is not None]
        d = f"{sum(dens) / len(dens):7.3f}" if dens else f"{'-':>7}"
        e = f"{sum(errs) / len(errs):7.4f}" if errs else f"{'-':>7}"
        lines.append(f"{li:>5}  {d}  {e}  " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return lines


def save_heatmap(plan: Plan, path: str | Path) -> Path:
    """Write the layer x head heatmap as a PNG (matplotlib, imported lazily)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("plan show --png needs matplotlib: pip install matplotlib") from e
    import numpy as np

    grid = _grid(plan)
    L = len(grid)
    H = max(len(r) for r in grid)
    img = np.ones((L, H, 3))
    dots = []
    for li, row in enumerate(grid):
        for hi, (fam, d) in enumerate(row):
            c = np.array(FAMILY_COLORS.get(fam, (0.5, 0.5, 0.5)))
            s = 1.0 if d is None else 0.25 + 0.75 * min(1.0, max(0.0, d))
            img[li, hi] = 1.0 - s * (1.0 - c)
            if d is None:
                dots.append((hi, li))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * H + 2.5), max(3.0, 0.25 * L + 1.5)))
    ax.imshow(img, aspect="auto", interpolation="nearest")
    for x, y in dots:
        ax.plot(x, y, ".", color="white", markersize=3)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    title = plan.model.transformer_class if plan.model is not None else "plan"
    ax.set_title(f"{title}: family (colour), density (shade: pale = sparse)")
    used = sorted({f for row in grid for f, _ in row})
    ax.legend(
        handles=[Patch(color=FAMILY_COLORS.get(f, (0.5, 0.5, 0.5)), label=f) for f in used],
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)
    plt.close(fig)
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="sparsediff plan", description="Inspect sparsediff plans.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="summary and per-layer table; --png writes a layer x head heatmap")
    show.add_argument("plan")
    show.add_argument("--png", metavar="FILE")
    args = ap.parse_args(argv)
    try:
        plan = Plan.load(args.plan)
    except (FileNotFoundError, PlanError) as e:
        print(f"sparsediff plan: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(plan_rows(plan)))
    if args.png:
        if plan.layers is None:
            print("sparsediff plan: error: a uniform plan has no per-head heatmap", file=sys.stderr)
            return 2
        print(f"wrote {save_heatmap(plan, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
