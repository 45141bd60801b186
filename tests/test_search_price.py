"""Pricing a plan by replaying the op (``sparsediff.search.price``): what is replayed, not how fast it is.

Speed itself is measured in benchmarks (``sparsediff compare`` reports the prediction next to the measured
speed-up); these tests check that the replay runs exactly the calls the hooks would make (warm-up steps,
dense layers, refresh steps, the plan's masks, data-dependent heads at the measured density) and that the
search's speed guard makes slow layers dense.
"""

from __future__ import annotations

import pytest
import torch

from sparsediff import attention as attention_mod
from sparsediff.layout import TokenLayout
from sparsediff.plan import Plan
from sparsediff.search import price as price_mod
from sparsediff.search.price import PlanPrice, price_plan, pricing_spec
from sparsediff.specs import DenseSchedule, HeadSpec

LAYOUT = TokenLayout.video(4, 8, 8)  # 256 tokens
KW = dict(num_heads=2, head_dim=16, num_layers=3, num_steps=6, block_size=16, backend="reference")


@pytest.fixture
def calls(monkeypatch):
    """Record every replayed sparse_attention call: (layer-independent) step, force_dense, mask density."""
    seen = []
    real = attention_mod.sparse_attention

    def spy(q, k, v, layout, specs, state, **kw):
        out = real(q, k, v, layout, specs, state, **kw)
        seen.append({"step": kw["step"], "force": kw["force_dense"], "specs": specs, "mask": state.last_mask})
        return out

    monkeypatch.setattr(attention_mod, "sparse_attention", spy)
    return seen


def test_pricing_spec_sets_data_dependent_thresholds_to_the_measured_density():
    assert pricing_spec(HeadSpec.make("topp", top_p=0.9), 0.2) == HeadSpec.make(
        "topp", top_p=0.2, min_frac=0.05
    )
    assert pricing_spec(HeadSpec.make("topp"), 0.01).get("min_frac") == 0.01  # the floor never exceeds it
    assert pricing_spec(HeadSpec.make("lse_cache", recall=0.95), 0.3).get("recall") == 0.3
    r = pricing_spec(HeadSpec.make("reordered", select="topp", top_p=0.9), 0.4)
    assert r.get("top_p") == 0.4 and r.get("select") == "topp"
    for s in (HeadSpec.make("radial", decay=0.2), HeadSpec.make("tile"), HeadSpec.make("reordered")):
        assert pricing_spec(s, 0.1) == s  # static heads keep their exact masks
    assert pricing_spec(HeadSpec.make("topp"), None) == HeadSpec.make("topp")


def test_dense_and_all_warm_up_plans_price_as_dense(calls):
    for plan in (Plan.dense(), Plan.uniform("tile", dense_steps=1.0)):
        pp = price_plan(plan, LAYOUT, **KW)
        assert pp.sparse_seconds == pp.dense_seconds and pp.attention_speedup == pytest.approx(1.0)
        assert pp.step_speedup(0.7) == pytest.approx(1.0)
    # the all-warm-up tile plan still built its masks once (the untimed first call) and timed nothing else
    assert all(c["step"] == 0 and not c["force"] for c in calls)


def test_replay_follows_the_schedule_and_the_plans_masks(calls):
    plan = Plan.uniform("tile", window=(1, 3, 3), dense_steps=2, dense_layers=(1,))
    pp = price_plan(plan, LAYOUT, **KW)
    assert set(pp.sparse_seconds) == {0, 1, 2}
    assert pp.sparse_seconds[1] == pp.dense_seconds[1]  # a dense layer is never replayed
    # layers 0 and 2, two replays each: one untimed call, then steps 2..5 (0, 1 are warm-up: dense SDPA)
    assert [c["step"] for c in calls] == [0, 2, 3, 4, 5] * 4
    assert not any(c["force"] for c in calls)
    dens = {round(c["mask"].density(), 4) for c in calls}
    assert len(dens) == 1 and 0 < dens.pop() < 1  # the tile masks, the same every step
    assert len(pp.per_step[0]) == 6 and pp.per_step[0][:2] == [pp.dense_seconds[0] / 6] * 2


def test_data_dependent_heads_replay_at_the_measured_density(calls):
    plan = Plan.uniform("topp", top_p=0.95)
    price_plan(plan, LAYOUT, densities={0: [0.25, 0.25], 1: [0.6, 0.6], 2: [None, None]}, **KW)
    by_layer = [calls[i * 14] for i in range(3)]  # per layer two replays of 1 untimed + 6 steps
    assert by_layer[0]["specs"][0].get("top_p") == 0.25 and by_layer[1]["specs"][0].get("top_p") == 0.6
    assert by_layer[2]["specs"][0].get("top_p") == 0.95  # no measurement: the plan's own threshold
    d0, d1 = (by_layer[i]["mask"].density() for i in (0, 1))
    assert abs(d0 - 0.25) < 0.12 and abs(d1 - 0.6) < 0.12, (d0, d1)


def test_cross_step_heads_refresh_at_the_plans_refresh_steps(calls):
    plan = Plan.uniform("lse_cache", dense_steps=1, refresh_steps=(3,))
    price_plan(plan, LAYOUT, **{**KW, "num_layers": 1})
    steps = [(c["step"], c["force"]) for c in calls[1:7]]
    assert steps == [(0, True), (1, False), (2, False), (3, True), (4, False), (5, False)]


def test_search_guard_makes_layers_that_are_not_faster_dense(monkeypatch):
    from sparsediff.embedded import tiny_random_pipeline
    from sparsediff.search import profile as profile_mod
    from sparsediff.search.evaluate import LayerStats

    pipe = tiny_random_pipeline()
    t = pipe.transformer
    n = len(t.blocks)
    h = t.config.num_attention_heads
    plan = Plan.per_head(t, [[HeadSpec.make("tile")] * h] * n, schedule=DenseSchedule(0, ()))

    priced = []

    def fake_price(plan, layout, **kw):
        priced.append(plan.schedule.dense_layers)
        slow = {1} - set(plan.schedule.dense_layers)  # layer 1 is slower than dense until made dense
        sparse = {
            i: (1.2 if i in slow else 1.0 if i in plan.schedule.dense_layers else 0.5) for i in range(n)
        }
        return PlanPrice(sparse, dict.fromkeys(range(n), 1.0), 4, "cpu", (1, 64, h, 32))

    monkeypatch.setattr(price_mod, "price_plan", fake_price)
    monkeypatch.setattr(profile_mod, "attention_fraction", lambda stats, n: 0.8)
    stats = profile_mod.SearchStats(
        {0: LayerStats.empty([HeadSpec("dense")], TokenLayout.video(2, 4, 8), h, 32)}
    )
    out, pp, lines = price_mod.price_searched_plan(plan, stats, t, num_steps=4)
    assert out.schedule.dense_layers == (1,) and priced == [(), (1,)]
    assert "layers [1]" in lines[0] and "made dense" in lines[0]
    s = out.meta["search"]
    assert (
        s["predicted_step_speedup"] == pytest.approx(pp.step_speedup(0.8)) and s["attention_fraction"] == 0.8
    )
    kept, _, _ = price_mod.price_searched_plan(plan, stats, t, num_steps=4, guard=False)
    assert kept.schedule.dense_layers == ()


def test_step_speedup_combines_attention_share_and_attention_speedup():
    pp = PlanPrice({0: 1.0}, {0: 4.0}, 1, "cpu", (1, 1, 1, 1))
    assert pp.attention_speedup == 4.0
    assert pp.step_speedup(0.0) == 1.0 and pp.step_speedup(1.0) == pytest.approx(4.0)
    assert pp.step_time_ratio(0.8) == pytest.approx(0.2 + 0.8 / 4)
    assert torch.isfinite(torch.tensor(pp.step_speedup(0.5)))
