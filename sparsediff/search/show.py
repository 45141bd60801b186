"""``sparsediff plan show PLAN [--png FILE]``: a plan's summary and a layer x head heatmap.

The heatmap has one cell per (layer, head): the colour is the head's family only (a categorical palette,
legend on the right); the density measured by the search (when the plan carries ``stats``) is printed in
the cell when it fits, else shown as the area of a square outline in the cell (full cell = dense); cells
without a measurement show "-" / no square.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_args import Parser, deprecated_alias, fail
from ..plan import Plan, PlanError
from .candidates import family

__all__ = ["main", "build_parser", "plan_rows", "save_heatmap", "FAMILY_COLORS"]

#: RGB in [0, 1] per family (colour-blind-friendly Okabe-Ito palette; no two families share a hue).
FAMILY_COLORS = {
    "dense": (0.0, 0.0, 0.0),
    "radial": (0.90, 0.62, 0.0),
    "tile": (0.34, 0.71, 0.91),
    "reordered": (0.0, 0.62, 0.45),
    "cluster": (0.80, 0.47, 0.65),
    "topp": (0.94, 0.89, 0.26),
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


def _title(plan: Plan, width_in: float) -> str:
    import textwrap

    name = plan.model.transformer_class if plan.model is not None else "plan"
    text = f"{name}: {plan.summary()}"
    return "\n".join(textwrap.wrap(text, max(30, int(width_in * 11)))[:3])


def _text_colour(rgb) -> str:
    r, g, b = rgb
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def save_heatmap(plan: Plan, path: str | Path) -> Path:
    """Write the layer x head heatmap as a PNG (matplotlib, imported lazily): colour = family (legend),
    density printed per cell (or, for many heads, a white square whose area is the density)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch, Rectangle
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("plan show --png needs matplotlib: pip install matplotlib") from e
    import numpy as np

    grid = _grid(plan)
    L, H = len(grid), max(len(r) for r in grid)
    img = np.ones((L, H, 3))
    for li, row in enumerate(grid):
        for hi, (fam, _) in enumerate(row):
            img[li, hi] = FAMILY_COLORS.get(fam, (0.5, 0.5, 0.5))
    width_in = max(5.5, 0.42 * H + 3.0)
    fig, ax = plt.subplots(figsize=(width_in, max(3.2, 0.3 * L + 2.0)))
    ax.imshow(img, aspect="auto", interpolation="nearest")
    numbers = H <= 24 and L <= 48  # a printed number fits in the cell
    for li, row in enumerate(grid):
        for hi, (fam, d) in enumerate(row):
            rgb = FAMILY_COLORS.get(fam, (0.5, 0.5, 0.5))
            if numbers:
                label = "-" if d is None else f"{d:.2f}".lstrip("0") if d < 1 else "1"
                ax.text(hi, li, label, ha="center", va="center", fontsize=7, color=_text_colour(rgb))
            elif d is not None:
                side = 0.9 * float(np.sqrt(min(1.0, max(0.0, d))))
                ax.add_patch(
                    Rectangle((hi - side / 2, li - side / 2), side, side, fill=False, ec="white", lw=0.8)
                )
    ax.set_xticks(range(H))
    ax.set_yticks(range(L))
    ax.tick_params(labelsize=7)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(_title(plan, width_in), fontsize=9)
    used = sorted({f for row in grid for f, _ in row})
    how = (
        "number: density (fraction of blocks kept)" if numbers else "square area: density (full cell = dense)"
    )
    ax.legend(
        handles=[Patch(color=FAMILY_COLORS.get(f, (0.5, 0.5, 0.5)), label=f) for f in used],
        title=f"colour: family\n{how}",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8,
    )
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="sparsediff plan", description="Inspect sparsediff plans.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser(
        "show",
        prog="sparsediff plan show",
        help="summary and per-layer table; --png writes a layer x head heatmap",
    )
    show.add_argument("plan", help="a plan JSON file")
    show.add_argument("--png", metavar="FILE", help="write the layer x head heatmap to FILE")
    show.add_argument("--overwrite", action="store_true", help="replace an existing --png file")
    deprecated_alias(show, "--force", "--overwrite")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        plan = Plan.load(args.plan)
    except (FileNotFoundError, PlanError) as e:
        return fail("sparsediff plan", e)
    if args.png:
        if plan.layers is None:
            return fail("sparsediff plan", "a uniform plan has no per-head heatmap")
        if Path(args.png).exists() and not args.overwrite:
            return fail("sparsediff plan", f"--png {args.png} exists; pass --overwrite to replace it")
    print("\n".join(plan_rows(plan)))
    if args.png:
        print(f"wrote {save_heatmap(plan, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
