"""The cached remainder (``remainder="cached"``): the split against a float64 oracle, exact steps, the stale
remainder merged with fresh blocks against a float64 oracle, the refresh schedule, the warm-up seeding
through the hooks, state resets, pricing and bad input.

The oracle is written here from the definition, independently of :mod:`sparsediff.patterns.remainder`:
per (batch, head), in the head's own token order, the kept tokens' logits of *this* step and the left-out
tokens' logits and values of the *refresh* step form ONE softmax.
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from _integration import SPARSE_KW
from tiny_pipelines import build

import sparsediff.api as api
import sparsediff.attention as sd_attention
from sparsediff import HeadSpec, TokenLayout
from sparsediff.attention import CACHED_REMAINDER_SLOT, LayerState, MaskCache, sparse_attention
from sparsediff.hooks.ring import ring_unsupported
from sparsediff.patterns.remainder import merge_lse, split_remainder
from sparsediff.patterns.tile import tile_permutation
from sparsediff.plan import Plan
from sparsediff.search import CostModel
from sparsediff.search.price import price_plan

BS = 16
REF = "reference"  # the PyTorch twin (the Triton interpreter runs the same op, and is tested elsewhere)
LAYOUT = TokenLayout.video(4, 8, 8, text_len=5, text_position="before")  # 261 tokens: ragged last block
TILE = (2, 4, 4)
SPECS = [
    HeadSpec.make("tile", window=(1, 1, 1), tile=TILE, remainder="cached", remainder_refresh=3),
    HeadSpec.make("radial", decay=0.25, dense_dist=0, remainder="cached", remainder_refresh=3),
    HeadSpec.make("radial", decay=0.25, dense_dist=0, remainder="cached", remainder_refresh=2),
    HeadSpec.make("tile", window=(1, 1, 1), tile=TILE),  # no remainder: bit-identical to a plain call
]


def _qkv(seed: int, B: int = 2, H: int = len(SPECS), D: int = 16, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, LAYOUT.num_tokens, D, generator=g).to(dtype) for _ in range(3))


def _drift(base, step: int, eps: float = 0.15):
    """Inputs of a later denoising step: the base plus a step-dependent perturbation."""
    g = torch.Generator().manual_seed(100 + step)
    return tuple(x + eps * step * torch.randn(x.shape, generator=g) for x in base)


def _dense(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def _order(spec: HeadSpec) -> torch.Tensor:
    if spec.pattern == "tile":
        return tile_permutation(LAYOUT, spec.get("tile")).perm
    return torch.arange(LAYOUT.num_tokens)


def _oracle(now, then, kept_dense, heads):
    """float64 ``[B, H, N, D]`` for ``heads``: per head, one softmax over the kept tokens' logits/values at
    ``now`` and the left-out tokens' logits/values at ``then`` (the refresh step), in the head's order."""
    qn, kn, vn = (x.double() for x in now)
    qt, kt, vt = (x.double() for x in then)
    B, H, N, D = qn.shape
    blk = torch.arange(N) // BS
    scale = D**-0.5
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    for b in range(B):
        for h in heads:
            p = _order(SPECS[h])
            # [N, N] in the head's order
            tok = kept_dense[b if kept_dense.shape[0] > 1 else 0, h][blk][:, blk]
            ln = (qn[b, h, p] @ kn[b, h, p].T * scale).masked_fill(~tok, -math.inf)
            lt = (qt[b, h, p] @ kt[b, h, p].T * scale).masked_fill(tok, -math.inf)
            logits = torch.cat([ln, lt], 1)
            vals = torch.cat([vn[b, h, p], vt[b, h, p]], 0)
            o = torch.softmax(logits, -1) @ vals
            out[b, h, p] = o
    return out


def test_split_remainder_is_the_softmax_over_the_left_out_keys():
    g = torch.Generator().manual_seed(0)
    N, D = 40, 8
    q, k, v = (torch.randn(3, N, D, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.rand(3, N, N, generator=g) < 0.3
    keep[0, 5] = True  # a row keeping every key: no remainder
    keep[1, 7] = False  # a row keeping none: the remainder is the whole softmax
    logits = q @ k.transpose(-1, -2)

    def attn(m):
        lg = logits.masked_fill(~m, -math.inf)
        lse = torch.logsumexp(lg, -1)
        w = torch.where(m, torch.exp(lg - lse.unsqueeze(-1).clamp_min(-1e300)), torch.zeros_like(lg))
        return torch.nan_to_num(w) @ v, lse

    of, lf = attn(torch.ones_like(keep))
    os_, ls = attn(keep)
    orr, lr = attn(~keep)
    out_r, lse_r = split_remainder(of, lf, os_, ls)
    some = (~keep).any(-1)
    torch.testing.assert_close(out_r[some], orr[some], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse_r[some], lr[some], rtol=1e-9, atol=1e-9)
    assert torch.isneginf(lse_r[0, 5]) and bool((out_r[0, 5] == 0).all())
    merged, lse = merge_lse(os_, ls, out_r, lse_r)
    torch.testing.assert_close(merged, of, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lse, lf, rtol=1e-9, atol=1e-9)


def test_unchanged_inputs_are_exact_at_every_step_while_the_blocks_alone_are_not():
    """With the same q, k, v at every step the stored remainder is the exact one, so every step equals
    dense -- a remainder of the wrong head, tokens or order would not."""
    qkv = _qkv(1)
    ref = _dense(*qkv)
    st = LayerState()
    plain = sparse_attention(
        *qkv, LAYOUT, [s.with_remainder("none") for s in SPECS], None, block_size=BS, backend=REF
    )
    cached = [h for h, s in enumerate(SPECS) if s.remainder == "cached"]
    assert min(_rel(plain[:, h], ref[:, h]) for h in cached) > 0.05  # the blocks alone are not dense
    for step in range(5):
        out = sparse_attention(
            *qkv, LAYOUT, SPECS, st, step=step, block_size=BS, cache=MaskCache(), backend=REF
        )
        assert st.last_mask.density_per_head()[0, cached].max() < 0.9  # it ran sparse
        torch.testing.assert_close(out[:, cached].double(), ref[:, cached], rtol=2e-5, atol=2e-5)
        assert torch.equal(out[:, 3], plain[:, 3])  # the head without a remainder: untouched, bit for bit


def test_stale_remainder_merged_with_fresh_blocks_matches_float64_oracle():
    base = _qkv(2)
    st = LayerState()
    cache = MaskCache()
    inputs = {s: _drift(base, s) for s in range(6)}
    refreshes = {0: 0, 1: 0, 2: 2}  # heads 0, 1 (refresh 3): 0, 3; head 2 (refresh 2): 0, 2, 4
    for step in range(6):
        out = sparse_attention(
            *inputs[step], LAYOUT, SPECS, st, step=step, block_size=BS, cache=cache, backend=REF
        )
        kept = st.last_mask.to_dense()
        exact = _dense(*inputs[step])
        for h, r in ((0, 3), (1, 3), (2, 2)):
            t0 = step - step % r
            refreshes[h] = t0
            want = _oracle(inputs[step], inputs[t0], kept, [h])[:, h]
            tol = 1e-4
            torch.testing.assert_close(out[:, h].double(), want, rtol=tol, atol=tol)
            if t0 == step:
                torch.testing.assert_close(out[:, h].double(), exact[:, h], rtol=tol, atol=tol)
            else:
                assert _rel(out[:, h], exact[:, h]) > 1e-3  # stale: not the dense output
        slot = st.family_state(CACHED_REMAINDER_SLOT)
        assert {heads: e[2] for heads, e in slot.items()} == {(0, 1): refreshes[0], (2,): refreshes[2]}


def test_warm_up_call_seeds_the_remainder_and_new_generation_or_batch_starts_over():
    base = _qkv(3)
    st = LayerState()
    sparse_attention(*base, LAYOUT, SPECS, st, step=0, force_dense=True, block_size=BS, backend=REF)
    assert st.last_mask.density_per_head().min() == 1.0  # the warm-up step itself is dense
    slot = st.family_state(CACHED_REMAINDER_SLOT)
    assert {heads: e[2] for heads, e in slot.items()} == {(0, 1): 0, (2,): 0}
    later = _drift(base, 1)
    out = sparse_attention(*later, LAYOUT, SPECS, st, step=1, block_size=BS, backend=REF)
    want = _oracle(later, base, st.last_mask.to_dense(), [0, 1, 2])
    torch.testing.assert_close(out[:, :3].double(), want[:, :3], rtol=1e-4, atol=1e-4)
    # a new generation (the step goes back) refreshes: exact again
    out = sparse_attention(*later, LAYOUT, SPECS, st, step=0, block_size=BS, backend=REF)
    torch.testing.assert_close(out[:, :3].double(), _dense(*later)[:, :3], rtol=2e-5, atol=2e-5)
    # another batch size: its own remainder, never the other batch's
    one = tuple(x[:1] for x in _drift(base, 2))
    out = sparse_attention(*one, LAYOUT, SPECS, st, step=1, block_size=BS, backend=REF)
    torch.testing.assert_close(out[:, :3].double(), _dense(*one)[:, :3], rtol=2e-5, atol=2e-5)


def test_without_state_every_call_is_exact():
    qkv = _qkv(4)
    out = sparse_attention(*qkv, LAYOUT, SPECS, None, step=3, block_size=BS, backend=REF)
    torch.testing.assert_close(out[:, :3].double(), _dense(*qkv)[:, :3], rtol=2e-5, atol=2e-5)


def test_gradients_flow_through_the_fresh_blocks():
    base = _qkv(5)
    st = LayerState()
    sparse_attention(*base, LAYOUT, SPECS, st, step=0, block_size=BS, backend=REF)
    q, k, v = (x.clone().requires_grad_(True) for x in _drift(base, 1))
    out = sparse_attention(q, k, v, LAYOUT, SPECS, st, step=1, block_size=BS, backend=REF)
    out[:, :2].sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert float(q.grad[:, :2].abs().sum()) > 0 and float(q.grad[:, 2:].abs().sum()) == 0


def test_bad_input():
    with pytest.raises(ValueError, match="static mask"):
        HeadSpec.make("topp", remainder="cached")
    with pytest.raises(ValueError, match="remainder_refresh"):
        HeadSpec.make("tile", remainder="cached", remainder_refresh=0)
    with pytest.raises(ValueError, match="remainder"):
        HeadSpec.make("tile", remainder="stale")
    radial = SPECS[1]  # a family ring attention serves, but not with a cached remainder
    assert (
        ring_unsupported(
            LAYOUT, [radial.with_remainder("none")], torch.zeros(1), block_size=BS, cache=MaskCache()
        )
        is None
    )
    assert "cached remainder" in ring_unsupported(
        LAYOUT, [radial], torch.zeros(1), block_size=BS, cache=MaskCache()
    )
    plan = Plan.uniform("topp").with_remainder("cached", 4)
    assert plan.default == HeadSpec.make("topp")  # dynamic heads are left as they are
    plan = Plan.uniform("tile", window=(1, 1, 1)).with_remainder("cached", 4)
    assert plan.default.remainder == "cached" and plan.default.get("remainder_refresh") == 4
    round_trip = Plan.from_dict(plan.to_dict())
    assert round_trip.default == plan.default


def test_editing_a_searched_plan_drops_the_search_s_speed_prediction():
    # the search's predicted speedup priced the plan it wrote; `compare` shows it next to the plan, so an
    # edit that changes what runs must not carry it along
    searched = replace(
        Plan.uniform("tile", window=(1, 1, 1), tile=TILE, dense_steps=3),
        meta={"search": {"predicted_step_speedup": 2.1, "prediction": "replayed", "density": 0.1}, "x": 1},
    )
    for edited, how in [
        (searched.with_remainder("cached", 5), "with_remainder('cached')"),
        (searched.with_overrides(dense_steps=2), "with_overrides"),
    ]:
        assert edited != searched
        assert edited.meta["search"] == {"density": 0.1, "edited": [how]} and edited.meta["x"] == 1
        assert Plan.from_dict(edited.to_dict()).meta["search"]["edited"] == [how]
    # edits that change nothing keep it; the original is untouched
    assert searched.with_remainder("none").meta["search"]["predicted_step_speedup"] == 2.1
    assert searched.with_overrides(dense_steps=3).meta == searched.meta
    assert searched.meta["search"]["predicted_step_speedup"] == 2.1


def test_cost_and_price_count_the_refresh(monkeypatch):
    model = CostModel.default("cpu", head_dim=16, block_size=BS)
    plain = HeadSpec.make("tile", window=(1, 1, 1), tile=TILE)
    c5 = plain.with_remainder("cached")  # remainder_refresh 5 (the default)
    c2 = HeadSpec(c5.pattern, c5.params + (("remainder_refresh", 2),))
    base = model.cost(plain, 0.2, LAYOUT)
    assert model.cost(c5, 0.2, LAYOUT) - base == pytest.approx(model.cached_remainder_cost(LAYOUT, 5))
    assert model.cached_remainder_cost(LAYOUT, 5) > model.dense_cost(LAYOUT) / 5
    assert model.cost(c2, 0.2, LAYOUT) > model.cost(c5, 0.2, LAYOUT) > base
    # the replay runs the schedule the hooks run: the layer's last warm-up step seeds, later steps merge
    calls = []
    real = sd_attention.sparse_attention

    def spy(*a, **kw):
        calls.append((kw["step"], kw["force_dense"]))
        return real(*a, **kw)

    monkeypatch.setattr(sd_attention, "sparse_attention", spy)
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=TILE, dense_steps=2).with_remainder("cached", 3)
    price = price_plan(
        plan, LAYOUT, num_heads=2, head_dim=16, num_layers=1, num_steps=5, block_size=BS, backend=REF
    )
    assert len(price.per_step[0]) == 5
    # two replays, each: an untimed first call, step 0 is the model's SDPA, 1 seeds, 2..4 run sparse
    assert calls == [(0, False), (1, True), (2, False), (3, False), (4, False)] * 2


def test_pipeline_warm_up_seeds_and_steps_merge(monkeypatch):
    """Through the hooks on a tiny Wan pipeline (CFG: two calls per step): the last warm-up step's calls
    reach sparse_attention forced dense and seed every layer's remainder; later steps merge it until the
    refresh. The output differs from both dense and the blocks alone, and is closer to dense than the
    blocks alone."""
    tiny = build("wan")
    seen = []
    real = sd_attention.sparse_attention

    def spy(*a, **kw):
        out = real(*a, **kw)
        slot = a[5].family_state(CACHED_REMAINDER_SLOT)
        seen.append((kw["step"], kw["force_dense"], sorted({e[2] for e in slot.values()})))
        return out

    kw = {**SPARSE_KW, "dense_steps": 1}
    steps = dict(num_inference_steps=4)
    dense = tiny(**steps)
    plain_plan = Plan.uniform("tile", window=(1, 1, 1))
    with api.sparse_attention_enabled(tiny.pipe, plain_plan, **kw):
        plain = tiny(**steps)
    monkeypatch.setattr(sd_attention, "sparse_attention", spy)
    with api.sparse_attention_enabled(tiny.pipe, plain_plan.with_remainder("cached", 2), **kw):
        cached = tiny(**steps)
    per_step = [(0, True, [0])] * 4 + [(1, False, [0])] * 4 + [(2, False, [2])] * 4 + [(3, False, [2])] * 4
    assert seen == per_step  # 2 layers x 2 CFG branches per step
    assert _rel(cached, dense) > 1e-6 and _rel(cached, plain) > 1e-6
    assert _rel(cached, dense) < _rel(plain, dense)


def test_remainder_on_chosen_layers_only():
    """``with_remainder(..., layers=[1])`` on the tiny Wan pipeline: only layer 1's heads store and merge a
    remainder (layer 0 runs its blocks alone), so the output differs from the plain plan and from the
    remainder on every layer. Bad layer selections are refused."""
    tiny = build("wan")
    transformer = tiny.pipe.transformer
    n_layers, heads = len(transformer.blocks), transformer.config.num_attention_heads
    tile = HeadSpec.make("tile", window=(1, 1, 1))
    plain_plan = Plan.per_head(transformer, [[tile] * heads] * n_layers)
    partial_plan = plain_plan.with_remainder("cached", 2, layers=[1])
    assert [s.remainder for s in partial_plan.layers[0]] == ["none"] * heads
    cached_1 = [(s.remainder, s.get("remainder_refresh")) for s in partial_plan.layers[1]]
    assert cached_1 == [("cached", 2)] * heads
    assert Plan.from_dict(partial_plan.to_dict()) == partial_plan
    assert partial_plan.with_remainder("none") == plain_plan  # refresh dropped with the remainder
    for bad in ([], [n_layers], [-1], ["0"], "0", [True]):
        with pytest.raises(ValueError, match="layer"):
            plain_plan.with_remainder("cached", 2, layers=bad)
    with pytest.raises(ValueError, match="per-head plan"):
        Plan.uniform("tile").with_remainder("cached", layers=[0])

    stored = {}
    real = sd_attention.sparse_attention

    def spy(*a, **kw):
        out = real(*a, **kw)
        stored[id(a[5])] = len(a[5].family_state(CACHED_REMAINDER_SLOT))
        return out

    kw = {**SPARSE_KW, "dense_steps": 1}
    steps = dict(num_inference_steps=4)
    dense = tiny(**steps)
    outs, holding = {}, {}
    for name, plan in [
        ("plain", plain_plan),
        ("partial", partial_plan),
        ("every", plain_plan.with_remainder("cached", 2)),
    ]:
        stored.clear()
        sd_attention.sparse_attention = spy
        try:
            with api.sparse_attention_enabled(tiny.pipe, plan, **kw):
                outs[name] = tiny(**steps)
        finally:
            sd_attention.sparse_attention = real
        holding[name] = sum(n > 0 for n in stored.values())  # layer states (one per CFG branch) storing
    # a remainder: none; layer 1's; every layer's
    assert holding["plain"] == 0 and holding["partial"] > 0
    assert holding["every"] == n_layers * holding["partial"]
    assert _rel(outs["partial"], outs["plain"]) > 1e-6 and _rel(outs["partial"], outs["every"]) > 1e-6
    assert _rel(outs["every"], dense) < _rel(outs["plain"], dense)
