"""Planted-structure check of the search: matching family per head, and the searched (mixed) plan against
every single-family plan at the same mean density. Prints markdown tables.

Sizes and head mixes here include ones the tests do not use. Two drifted steps per case, so the
cross-step ``lse_cache`` is measured (``skip`` is left out: planted outputs barely change between steps).

    python samples/search_planted.py
"""

from __future__ import annotations

import torch

from sparsediff.layout import TokenLayout
from sparsediff.search import CostModel, LayerAccumulator, default_candidates
from sparsediff.search.core import layer_search
from sparsediff.search.family_table import compare_families
from sparsediff.search.planted import structure_matches
from sparsediff.testing import drift, planted_qkv

CASES = [
    (
        TokenLayout.video(8, 16, 16, text_len=16, text_position="after"),
        16,
        ["local", "temporal", "cluster", "stripe", "global"] * 2,
    ),
    (
        TokenLayout.video(12, 10, 14, text_len=8, text_position="before"),
        32,
        ["local", "local", "temporal", "cluster", "stripe", "global"],
    ),
    (TokenLayout.video(5, 24, 24), 64, ["temporal", "cluster", "stripe", "local"]),
    (
        TokenLayout.video(9, 20, 12, text_len=24, text_position="after"),
        32,
        ["stripe", "cluster", "local", "temporal", "temporal", "global", "local", "cluster"],
    ),
    (TokenLayout.video(16, 8, 8), 64, ["temporal", "local", "stripe", "cluster"]),
]


def main() -> None:
    torch.set_num_threads(1)
    hits = total = 0
    rows = []
    for lay, bs, kinds in CASES:
        p = planted_qkv(lay, kinds, head_dim=32, seed=0)
        acc = LayerAccumulator(
            [c for c in default_candidates(lay, bs) if c.pattern != "skip"], block_size=bs, num_rows=256
        )
        for step in range(2):
            acc.add(drift(p.q, step, 0.001), drift(p.k, step, 0.001, seed=2), p.v, lay)
        r = layer_search(
            acc.stats, target_error=0.05, cost_model=CostModel.default("cpu", head_dim=32, block_size=bs)
        )
        print(f"\n### {lay}, block {bs}: per-head choice at target error 0.05\n")
        print("| head | planted | choice | error | density | match |\n|---|---|---|---|---|---|")
        for h, (kind, spec, e, d) in enumerate(zip(kinds, r.specs, r.error, r.density)):
            ok = structure_matches(kind, spec, lay, bs)
            hits += ok
            total += 1
            print(
                f"| {h} | {kind} | `{spec!r}` | {float(e):.4f} | {float(d):.3f} | {'yes' if ok else 'no'} |"
            )
        for D in (0.15, 0.3):
            for row in compare_families([acc.stats], D):
                rows.append((str(lay), bs, D, row))
    print(f"\nmatching family: {hits}/{total} = {hits / total:.0%}\n")
    print(
        "### Searched plan vs single-family plans at matched mean density (each head at its family's best parameters)\n"
    )
    print(
        "| layout | block | density budget | plan | budget met | mean error | mean density | heads per family |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for lay, bs, D, row in rows:
        err = f"{row.mean_error:.4f}" if row.met else f"({row.mean_error:.4f} at its minimum density)"
        counts = ", ".join(f"{k} {v}" for k, v in sorted(row.counts.items()))
        print(
            f"| {lay} | {bs} | {D} | {row.name} | {'yes' if row.met else 'no'} | {err} | {row.mean_density:.3f} | {counts} |"
        )


if __name__ == "__main__":
    main()
