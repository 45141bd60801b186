"""The search core on tensors: the sampled-row estimator against the real op, row sampling, selection,
the cost model, and planted structure (matching family, Pareto against single-family plans)."""

from __future__ import annotations

import math

import pytest
import torch

from sparsediff.attention import LayerState, sparse_attention
from sparsediff.layout import TokenLayout
from sparsediff.reference import attention_ref
from sparsediff.search import (
    CostModel,
    LayerAccumulator,
    default_candidates,
    family,
    sample_rows,
    search_attention,
    select_global,
    select_per_head,
)
from sparsediff.search.core import layer_search
from sparsediff.specs import HeadSpec
from sparsediff.testing import drift, planted_qkv


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize(
    "layout",
    [
        TokenLayout.video(3, 5, 7, text_len=9, text_position="before"),  # ugly: 114 tokens, text first
        TokenLayout.video(4, 6, 6, text_len=5, text_position="after"),
    ],
)
def test_all_rows_estimate_equals_the_real_op(layout):
    """With every row sampled, the estimated error and density of each single-step candidate are the real
    sparse_attention output's error / mask density (same pattern builders, same block rule)."""
    torch.manual_seed(0)
    B, H, D, bs = 2, 2, 16, 16
    p = planted_qkv(layout, ["local", "cluster"], batch=B, head_dim=D, seed=3)
    ref, _ = attention_ref(p.q, p.k, p.v)
    cands = [c for c in default_candidates(layout, bs, cross_step=False)]
    res = search_attention(p.q, p.k, p.v, layout, block_size=bs, candidates=cands, num_rows=10_000)
    checked = 0
    for ci, spec in enumerate(cands):
        st = LayerState()
        out = sparse_attention(p.q, p.k, p.v, layout, [spec] * H, st, block_size=bs, backend="reference")
        dens = st.last_mask.density_per_head()  # [B, H]
        for h in range(H):
            want = sum(_rel(out[b, h], ref[b, h]) for b in range(B)) / B
            got = float(res.table["error"][h, ci])
            assert math.isclose(got, want, rel_tol=1e-3, abs_tol=1e-5), (spec, h, got, want)
            assert math.isclose(float(res.table["density"][h, ci]), float(dens[:, h].mean()), abs_tol=1e-6), (
                spec
            )
        checked += 1
    assert checked == len(cands) and len({family(c) for c in cands}) >= 6


def test_sample_rows_stratified_and_deterministic():
    lay = TokenLayout.video(6, 8, 10, text_len=20, text_position="after")
    r = sample_rows(lay, 100, seed=1)
    assert r.numel() == 100 and torch.equal(r, torch.unique(r))
    assert torch.equal(r, sample_rows(lay, 100, seed=1)) and not torch.equal(r, sample_rows(lay, 100, seed=2))
    coords = lay.grid_coords()[r]
    frames = torch.bincount(coords[coords[:, 0] >= 0, 0], minlength=6)
    assert int(frames.min()) >= 14 and int(frames.max()) <= 17  # ~ 480/500 * 100 / 6 each
    assert 3 <= int((r >= lay.grid_len).sum()) <= 5  # text: 20/500 of the rows
    assert torch.equal(sample_rows(lay, 10_000), torch.arange(lay.num_tokens))
    with pytest.raises(ValueError, match="num_rows"):
        sample_rows(lay, 0)


def test_bad_input():
    lay = TokenLayout.video(2, 4, 4)
    q = torch.randn(1, 2, lay.num_tokens, 16)
    with pytest.raises(ValueError, match="cross-step"):
        search_attention(q, q, q, lay, candidates=[HeadSpec.make("skip")], block_size=8)
    with pytest.raises(ValueError, match="tokens"):
        search_attention(q[:, :, :-1], q[:, :, :-1], q[:, :, :-1], lay, block_size=8)
    with pytest.raises(ValueError, match="twice"):
        search_attention(
            q, q, q, lay, candidates=[HeadSpec.make("dense"), HeadSpec.make("dense")], block_size=8
        )
    with pytest.raises(ValueError, match="grid"):
        search_attention(
            q,
            q,
            q,
            TokenLayout((lay.segments[0].text(32),)),
            candidates=[HeadSpec.make("tile")],
            block_size=8,
        )


def test_select_per_head_and_global_budget():
    err = torch.tensor([[0.0, 0.02, 0.2], [0.0, 0.3, 0.5]], dtype=torch.float64)
    cost = torch.tensor([[10.0, 3.0, 1.0], [10.0, 3.0, 1.0]], dtype=torch.float64)
    dens = cost / 10
    ch, met = select_per_head(err, cost, 0.05)
    assert ch.tolist() == [1, 0] and met.tolist() == [True, True]
    ch, met = select_per_head(err + 0.1, cost, 0.05)
    assert ch.tolist() == [0, 0] and met.tolist() == [False, False]
    # global: mean error <= 0.1 -> head 0 may carry error 0.2 (cheap), head 1 stays dense
    g = select_global([err], [dens], [cost], target_error=0.1)
    assert g.met and g.choices[0].tolist() == [2, 0] and g.total_cost == 11.0
    # density: mean density <= 0.2 -> minimal mean error: head 0 (cheap to sparsify) takes the sparsest
    g = select_global([err], [dens], [cost], density=0.2)
    assert g.met and g.mean_density <= 0.2 + 1e-9 and g.choices[0].tolist() == [2, 1]
    g = select_global([err], [dens], [cost], density=0.05)
    assert not g.met and "NOT met" in g.message and g.choices[0].tolist() == [2, 2]


def test_cost_model_orders_patterns():
    lay = TokenLayout.video(21, 30, 52)
    cm = CostModel.default("cpu", head_dim=128, block_size=64)
    dense = cm.dense_cost(lay)
    assert cm.cost(HeadSpec.make("radial"), 0.2, lay) < 0.25 * dense
    assert cm.cost(HeadSpec.make("tile"), 0.2, lay) > cm.cost(
        HeadSpec.make("radial"), 0.2, lay
    )  # gather / scatter
    assert cm.cost(HeadSpec.make("lse_cache", refresh=1), 0.2, lay) > cm.cost(
        HeadSpec.make("lse_cache", refresh=10), 0.2, lay
    )
    assert cm.cost(HeadSpec.make("skip"), 0.0, lay) < 0.01 * dense
    assert cm.cost(HeadSpec.make("radial"), 1.0, lay) == pytest.approx(dense)


def test_cost_calibration_cpu_smoke():
    cm = CostModel.calibrate(
        "cpu", head_dim=16, block_size=16, num_tokens=256, heads=1, backend="reference", repeats=1
    )
    assert cm.source == "calibrated" and cm.block_time > 0 and cm.dense_block_time > 0
    assert CostModel.from_dict(cm.to_dict()) == cm


# ---------------------------------------------------------------------- planted structure
PLANTED_CASES = [
    (
        TokenLayout.video(12, 10, 14, text_len=8, text_position="before"),
        32,
        ("local", "local", "temporal", "cluster", "stripe", "global"),
    ),
    (TokenLayout.video(5, 24, 24), 64, ("temporal", "cluster", "stripe", "local")),
]


@pytest.fixture(scope="module")
def planted_stats():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small ops: one thread is faster on a shared CPU
    try:
        return _planted_stats()
    finally:
        torch.set_num_threads(threads)


def _planted_stats():
    out = []
    for lay, bs, kinds in PLANTED_CASES:
        p = planted_qkv(lay, list(kinds), head_dim=32, seed=0)
        # skip is left out: planted outputs barely change between the two drifted "steps"
        cands = [c for c in default_candidates(lay, bs) if c.pattern != "skip"]
        acc = LayerAccumulator(cands, block_size=bs, num_rows=256)
        for step in range(2):  # two profiled steps: the cross-step lse_cache is measured on the second
            acc.add(drift(p.q, step, 0.001), drift(p.k, step, 0.001, seed=2), p.v, lay)
        out.append((lay, bs, kinds, acc.stats))
    return out


def test_planted_heads_get_the_matching_family(planted_stats):
    from sparsediff.search.planted import structure_matches

    hits, report = 0, []
    total = 0
    for lay, bs, kinds, stats in planted_stats:
        r = layer_search(
            stats, target_error=0.05, cost_model=CostModel.default("cpu", head_dim=32, block_size=bs)
        )
        assert bool(r.met.all()), r.format()
        for kind, spec, err, dens in zip(kinds, r.specs, r.error, r.density):
            ok = structure_matches(kind, spec, lay, bs)
            hits += ok
            total += 1
            report.append((kind, spec, round(float(err), 4), round(float(dens), 3), ok))
            assert float(err) <= 0.05
            if kind != "global":
                assert float(dens) < 0.5, report  # a sparse choice, not dense in disguise
    assert hits >= 0.9 * total, report


@pytest.mark.parametrize("density", [0.15, 0.3])
def test_planted_searched_plan_beats_every_single_family_at_matched_density(planted_stats, density):
    """Pareto: at the searched plan's mean density, each single family (every head at its best parameters
    of that family, same density budget) has a higher mean error -- or cannot reach the density at all."""
    from sparsediff.search.family_table import compare_families

    for lay, _bs, _kinds, stats in planted_stats:
        rows = compare_families([stats], density)
        searched = rows[0]
        assert searched.name == "searched" and searched.met and searched.mean_density <= density + 1e-9
        assert len(searched.counts) >= 2  # a mix of families
        for row in rows[1:]:
            if row.met:
                assert row.mean_error > searched.mean_error + 1e-3, (lay, density, row, searched)
            else:
                assert row.mean_density > density  # could not get under the budget
