"""The pooled remainder (``remainder="pooled"``): op vs a float64 oracle, untouched heads, quality on
planted heads, gradients, search and plans.

The oracle (:func:`_oracle`) is written here from the definition, independently of
:mod:`sparsediff.patterns.remainder`: per (batch, head), in the head's own token order, ONE softmax over
the concatenation of the kept tokens' logits and one pooled key per unkept key block (mean key of the
block's real tokens, logit ``+ log(tokens in the block)``, value the block's mean value).
"""

from __future__ import annotations

import math

import pytest
import torch

import sparsediff
from sparsediff import BlockSparseMask, HeadSpec, TokenLayout
from sparsediff.attention import LayerState, MaskCache, sparse_attention
from sparsediff.hooks.ring import ring_unsupported
from sparsediff.ops import triton_reasons
from sparsediff.patterns.reordered import reordered_permutation
from sparsediff.patterns.tile import default_tile, tile_permutation
from sparsediff.plan import Plan
from sparsediff.search import CostModel, default_candidates, search_attention
from sparsediff.search.evaluate import LayerStats, evaluate_call
from sparsediff.search.price import pricing_spec
from sparsediff.testing import planted_qkv

BS = 16
# 5 text tokens before an 8 x 4 x 4 grid: N = 133 = 8 x 16 + 5. In natural order (radial, topp) the ragged
# last block holds 5 grid tokens (it can be left out, so pooled with its real count); the grid-first orders
# (tile, reordered) put the text in the ragged last block (always kept).
LAYOUT = TokenLayout.video(8, 4, 4, text_len=5, text_position="before")
TILE = default_tile(LAYOUT.grid, BS)
SPECS = [
    HeadSpec.make("radial", decay=0.25, dense_dist=0, remainder="pooled"),
    HeadSpec.make("tile", window=(1, 1, 1), tile=TILE, remainder="pooled"),
    HeadSpec.make("reordered", order="frame", band=8, remainder="pooled"),
    HeadSpec.make("topp", top_p=0.4, min_frac=0.0, remainder="pooled"),
    HeadSpec.make("radial", decay=0.25, dense_dist=0),  # not pooled
    HeadSpec.make("topp", top_p=0.4, min_frac=0.0),  # not pooled, same mask rule as head 3
]
POOLED = [0, 1, 2, 3]


def _perm(spec: HeadSpec, layout: TokenLayout) -> torch.Tensor | None:
    """The head's token order (``perm[i]`` = natural token at position ``i``), None = natural."""
    if spec.pattern == "tile":
        return tile_permutation(layout, spec.get("tile")).perm
    if spec.pattern == "reordered":
        return reordered_permutation(layout, spec.get("order")).perm
    return None


def _oracle(q, k, v, specs, mask_dense, layout, bs, scale, pooled_heads, *, log_count=True):
    """float64 ``[B, H, N, D]``: per head, softmax over kept tokens (+ pooled keys of unkept blocks for
    ``pooled_heads``) in the head's order, scattered back to natural order. ``mask_dense`` is the op's
    assembled mask ``[B|1, H, Qb, Kb]`` (each head in its order)."""
    q, k, v = (x.double() for x in (q, k, v))
    B, H, N, D = q.shape
    kb = -(-N // bs)
    blk = torch.arange(N) // bs
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            p = _perm(specs[h], layout)
            p = torch.arange(N) if p is None else p
            qh, kh, vh = q[b, h, p], k[b, h, p], v[b, h, p]
            kept = mask_dense[b if mask_dense.shape[0] > 1 else 0, h]  # [Qb, Kb]
            tok = kept[blk][:, blk]  # [N, N]
            logits = (qh @ kh.T * scale).masked_fill(~tok, -math.inf)
            vals = vh
            if h in pooled_heads:
                km = torch.stack([kh[blk == j].mean(0) for j in range(kb)])
                vm = torch.stack([vh[blk == j].mean(0) for j in range(kb)])
                cnt = torch.stack([(blk == j).sum() for j in range(kb)]).double()
                pl = qh @ km.T * scale + (cnt.log() if log_count else 0.0)
                pl = pl.masked_fill(kept[blk], -math.inf)  # only the blocks NOT kept by the row's block
                logits = torch.cat([logits, pl], 1)
                vals = torch.cat([vh, vm], 0)
            w = torch.softmax(logits, -1).nan_to_num()  # an all-masked row -> 0
            o = w @ vals
            out[b, h, p] = o
    return out


def _inputs(B=2, H=6, D=32, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    N = LAYOUT.num_tokens
    # diffusers' [B, N, H, D] memory layout, viewed as [B, H, N, D]
    q, k, v = (torch.randn(B, N, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3))
    return q, k, v


def _device(backend: str) -> str:
    """Where ``backend`` runs: the GPU when there is one (the real kernel), else the CPU (the Triton
    interpreter, set by conftest.py); skips when the Triton kernel cannot run at all."""
    if backend != "triton":
        return "cpu"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    reasons = triton_reasons(torch.empty(1, 1, 1, 16, device=dev))
    if reasons:
        pytest.skip("; ".join(reasons))
    return dev


def _run(q, k, v, specs, backend="reference"):
    dev = _device(backend)
    st = LayerState()
    q, k, v = (x.to(dev) for x in (q, k, v))
    out = sparse_attention(q, k, v, LAYOUT, specs, st, block_size=BS, backend=backend)
    return out.cpu(), st.last_mask.to("cpu")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_op_matches_float64_oracle(backend):
    q, k, v = _inputs()
    out, mask = _run(q, k, v, SPECS, backend)
    md = mask.to_dense()
    assert md.shape[0] == 2, "the top-p heads should give a per-batch mask"
    assert not torch.equal(md[0, 3], md[1, 3]), "batch elements should select differently"
    for h in POOLED:  # every pooled head must leave blocks out, or the test proves nothing
        assert not bool(md[:, h].all()), f"head {h} keeps every block"
    assert not bool(md[:, [0, 3], :, -1].all()), "the ragged last block is never left out"
    ref = _oracle(q, k, v, SPECS, md, LAYOUT, BS, q.shape[-1] ** -0.5, POOLED)
    assert out.shape == q.shape and out.stride() == q.stride()  # diffusers' memory layout kept
    err = (out.double() - ref).abs().max().item()
    assert err < 2e-5, f"{backend}: pooled op vs float64 oracle, max abs error {err:.2e}"


def test_heads_without_remainder_are_bit_identical():
    q, k, v = _inputs()
    plain = [s.without_remainder() for s in SPECS]
    out_p, mask_p = _run(q, k, v, SPECS)
    out_0, mask_0 = _run(q, k, v, plain)
    assert torch.equal(mask_p.to_dense(), mask_0.to_dense()), "the remainder must not change the mask"
    for h in range(len(SPECS)):
        if h in POOLED:
            assert not torch.equal(out_p[:, h], out_0[:, h]), f"pooled head {h} unchanged"
        else:
            assert torch.equal(out_p[:, h], out_0[:, h]), f"head {h} without the remainder changed"
    # an explicit remainder="none" is the default
    nones = [s.with_remainder("none") for s in SPECS]
    assert torch.equal(_run(q, k, v, nones)[0], out_0)


def test_rows_keeping_every_block_get_no_remainder_and_no_nan():
    """A window covering the whole grid keeps every block: pooled == plain, bit for bit, no NaN."""
    q, k, v = _inputs(H=2)
    full = HeadSpec.make("tile", window=(9, 9, 9), tile=TILE)
    plain, mask = _run(q, k, v, [full, full])
    pooled, _ = _run(q, k, v, [full.with_remainder("pooled")] * 2)
    assert bool(mask.to_dense().all())
    assert not torch.isnan(pooled).any()
    assert torch.equal(pooled, plain)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


PLANTED = TokenLayout.video(4, 8, 8)


def test_pooled_fixes_a_diffuse_head_not_a_local_one():
    """Same mask (a one-tile window) on a planted near-uniform head and a planted local head."""
    pl = planted_qkv(PLANTED, ["global", "local"], head_dim=32, seed=0, global_noise=0.5)
    q, k, v = pl.q, pl.k, pl.v
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    spec = HeadSpec.make("tile", window=(1, 1, 1))
    sparse, _ = _run_layout(q, k, v, [spec, spec])
    pooled, _ = _run_layout(q, k, v, [spec.with_remainder("pooled")] * 2)
    e_s = [_rel(sparse[:, h], dense[:, h]) for h in range(2)]
    e_p = [_rel(pooled[:, h], dense[:, h]) for h in range(2)]
    assert e_s[0] > 0.5 and e_p[0] < 0.25 * e_s[0], f"global head: sparse {e_s[0]:.3f}, pooled {e_p[0]:.3f}"
    assert e_p[1] >= 0.9 * e_s[1], f"local head: sparse {e_s[1]:.3f}, pooled {e_p[1]:.3f}"


def _run_layout(q, k, v, specs, layout=PLANTED, backend="reference"):
    st = LayerState()
    return sparse_attention(q, k, v, layout, specs, st, block_size=BS, backend=backend), st.last_mask


def test_search_measures_what_the_op_computes():
    """The evaluator's pooled error on all rows equals the op's error vs dense (same definition)."""
    pl = planted_qkv(PLANTED, ["global", "local"], head_dim=32, seed=1)
    q, k, v = pl.q, pl.k, pl.v
    cands = [
        HeadSpec.make("tile", window=(1, 1, 1)),
        HeadSpec.make("tile", window=(1, 1, 1), remainder="pooled"),
    ]
    stats = LayerStats.empty(cands, PLANTED, 2, 32)
    evaluate_call(q, k, v, PLANTED, cands, stats, block_size=BS, num_rows=PLANTED.num_tokens)
    err = stats.means()["err"]
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    for c, spec in enumerate(cands):
        out, _ = _run_layout(q, k, v, [spec, spec])
        for h in range(2):
            assert abs(err[h, c].item() - _rel(out[:, h], dense[:, h])) < 1e-4, (spec, h)


def test_search_picks_pooled_for_the_diffuse_head_only():
    # a near-uniform head (noise 0.2; at 0.5 a plain radial keeping most blocks can be cheaper for error 0.2
    # on this 256-token layout, depending on the pooled part's price)
    pl = planted_qkv(PLANTED, ["global", "local"], head_dim=32, seed=0, global_noise=0.2)
    cands = [
        c for c in default_candidates(PLANTED, BS, cross_step=False, remainder=True) if c.pattern != "dense"
    ]
    assert not any(c.remainder == "pooled" for c in default_candidates(PLANTED, BS))  # opt-in
    assert any(c.remainder == "pooled" for c in cands) and any(c.remainder == "none" for c in cands)
    cm = CostModel.default("cpu", head_dim=32, block_size=BS)
    res = search_attention(
        pl.q, pl.k, pl.v, PLANTED, target_error=0.2, block_size=BS, candidates=cands, cost_model=cm
    )
    g, loc = res.specs
    assert g.remainder == "pooled", f"diffuse head chose {g!r} (error {res.error[0]:.3f})"
    assert loc.remainder == "none", f"local head chose {loc!r}"
    # the pooled variant costs more than its plain spec at the same density
    base = g.without_remainder()
    assert cm.cost(g, 0.1, PLANTED) > cm.cost(base, 0.1, PLANTED)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_match_float64_oracle(backend):
    layout = TokenLayout.video(6, 2, 4, text_len=3, text_position="before")  # N = 51: 3 x 16 + 3
    bs = 16
    specs = [
        HeadSpec.make("tile", window=(1, 1, 1), tile=default_tile(layout.grid, bs), remainder="pooled"),
        HeadSpec.make("topp", top_p=0.4, min_frac=0.0, remainder="pooled"),
        HeadSpec.make("radial", decay=0.25, dense_dist=0),
    ]
    g = torch.Generator().manual_seed(3)
    B, H, N, D = 2, 3, layout.num_tokens, 16
    x = [torch.randn(B, H, N, D, generator=g) for _ in range(3)]
    go = torch.randn(B, H, N, D, generator=g)
    dev = _device(backend)
    q, k, v = (t.clone().to(dev).requires_grad_(True) for t in x)
    st = LayerState()
    out = sparse_attention(q, k, v, layout, specs, st, block_size=bs, backend=backend)
    (out * go.to(dev)).sum().backward()
    md = st.last_mask.to("cpu").to_dense()
    assert not bool(md[:, 0].all()) and not bool(md[:, 1].all()), "the pooled heads must leave blocks out"
    qd, kd, vd = (t.double().requires_grad_(True) for t in x)
    ref = _oracle(qd, kd, vd, specs, md, layout, bs, D**-0.5, [0, 1])
    (ref * go.double()).sum().backward()
    for name, a, r in (("q", q, qd), ("k", k, kd), ("v", v, vd)):
        err = (a.grad.cpu().double() - r.grad).abs().max().item()
        assert err < 1e-4, f"d{name}: max abs error {err:.2e} vs the float64 oracle"


def test_plan_json_round_trip(tmp_path):
    specs = (HeadSpec.make("topp", top_p=0.9, remainder="pooled"), HeadSpec.make("radial", decay=0.5))
    plan = Plan(layers=(specs,))
    path = plan.save(tmp_path / "plan.json")
    text = path.read_text()
    assert '"remainder": "pooled"' in text and text.count("remainder") == 1
    back = Plan.load(path)
    assert back.head_specs(0, 2) == specs and back.head_specs(0, 2)[0].remainder == "pooled"
    # a plan written before the parameter existed loads unchanged and means "none"
    old = Plan.from_dict(
        {"format": "sparsediff-plan", "version": 1, "default": {"pattern": "topp", "params": {"top_p": 0.9}}}
    )
    assert old.default == HeadSpec.make("topp", top_p=0.9) and old.default.remainder == "none"


def _strided(layout, spec, block_size, device):
    nb = -(-layout.num_tokens // block_size)
    i = torch.arange(nb, device=device)
    keep = (i.view(-1, 1) - i.view(1, -1)) % spec.get("stride") == 0
    n = layout.num_tokens
    return BlockSparseMask.from_dense(keep[None, None], block_size, (n, n))


def test_registered_family_with_remainder_true():
    fam = sparsediff.register_pattern(
        "pooled_strided", params={"stride": 3}, static_mask=_strided, remainder=True
    )
    try:
        assert fam.remainder and fam.params["remainder"] == "none"
        specs = [HeadSpec.make("pooled_strided", remainder="pooled"), HeadSpec.make("pooled_strided")]
        q, k, v = _inputs(H=2)
        out, mask = _run(q, k, v, specs)
        md = mask.to_dense()
        assert not bool(md.all())
        ref = _oracle(q, k, v, specs, md, LAYOUT, BS, q.shape[-1] ** -0.5, [0])
        assert (out.double() - ref).abs().max().item() < 2e-5
        grid = default_candidates(LAYOUT, BS, cross_step=False)
        assert not any(c.pattern == "pooled_strided" for c in grid)  # no candidates= given: not searched
    finally:
        sparsediff.unregister_pattern("pooled_strided")
    with pytest.raises(ValueError, match="single-step"):
        sparsediff.register_pattern(
            "pooled_frozen", build_group=lambda call, spec, heads: None, kind="cross_step", remainder=True
        )
    with pytest.raises(ValueError, match="added by remainder=True"):
        sparsediff.register_pattern(
            "pooled_twice", params={"remainder": "x"}, static_mask=_strided, remainder=True
        )
    # a user parameter that happens to be called "remainder" (no remainder=True) is the family's own
    sparsediff.register_pattern("own_remainder", params={"remainder": "pooled"}, static_mask=_strided)
    try:
        spec = HeadSpec.make("own_remainder", remainder="pooled")
        assert spec.remainder == "none" and spec.without_remainder() == spec
    finally:
        sparsediff.unregister_pattern("own_remainder")


def test_pooled_heads_are_priced_and_refused_under_ring():
    spec = HeadSpec.make("topp", top_p=0.9, remainder="pooled")
    assert pricing_spec(spec, 0.3).remainder == "pooled"  # the replayed price runs the pooled part too
    q = torch.zeros(1, 1, LAYOUT.num_tokens, 16)
    cache = MaskCache()
    assert ring_unsupported(LAYOUT, [spec.without_remainder()], q, block_size=BS, cache=cache) is None
    reason = ring_unsupported(LAYOUT, [spec], q, block_size=BS, cache=cache)
    assert reason is not None and "pooled remainder" in reason


def test_regional_compile_with_pooled_heads_one_graph_no_breaks():
    import torch._dynamo
    from _compiled import assert_one_graph_like_eager, eager_then_compiled
    from _integration import SPARSE_KW
    from tiny_pipelines import _wan_transformer

    import sparsediff.api as api

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    t = _wan_transformer().eval()
    pooled = HeadSpec.make("tile", window=(1, 1, 1), remainder="pooled")
    plan = Plan.per_head(
        t,
        [
            [HeadSpec("dense"), pooled],
            [HeadSpec.make("radial", decay=0.05, remainder="pooled"), HeadSpec.make("radial", decay=0.05)],
        ],
    )
    plain = Plan.per_head(t, [[s.without_remainder() for s in layer] for layer in plan.layers])
    x, enc = torch.randn(1, 16, 3, 8, 12), torch.randn(1, 4, 32)
    try:
        with torch.no_grad():
            api.enable_sparse_attention(t, plain, **SPARSE_KW)
            without = t(x, torch.tensor([900.0]), enc, return_dict=False)[0]
            api.disable_sparse_attention(t)
            api.enable_sparse_attention(t, plan, **SPARSE_KW)
            eager, compiled = eager_then_compiled(t, x, enc)
        api.disable_sparse_attention(t)
        assert_one_graph_like_eager(counters, eager, compiled)
        assert not torch.allclose(eager[0], without, atol=1e-4), "the pooled heads changed nothing"
    finally:
        torch._dynamo.reset()


def test_pooled_remainder_in_row_chunks_equals_one_pass():
    from sparsediff.patterns.remainder import pooled_remainder

    q, k, v = _inputs()
    _, mask = _run(q, k, v, SPECS)
    kept = mask.to_dense()
    one = pooled_remainder(q, k, v, kept, BS, 0.2)
    kb = kept.shape[-1]
    chunked = pooled_remainder(q, k, v, kept, BS, 0.2, chunk_elems=2 * 6 * kb * 7)  # 7 rows: not a block
    for a, b, what in zip(one, chunked, ("out", "lse")):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=what)
    assert bool(torch.isinf(one[1]).any()) and not bool(torch.isnan(one[0]).any())  # rows keeping every block


def test_density_budget_counts_the_pooled_part_as_density():
    """Under ``--density`` a pooled candidate is charged its pooled part as the density of the same predicted
    time (it computes no extra blocks, but is not free), the other candidates their block density."""
    from sparsediff.search.profile import _budget_density

    pl = planted_qkv(PLANTED, ["global", "local"], head_dim=32, seed=0, global_noise=0.5)
    cands = [
        c for c in default_candidates(PLANTED, BS, cross_step=False, remainder=True) if c.pattern != "dense"
    ]
    cm = CostModel.default("cpu", head_dim=32, block_size=BS)
    res = search_attention(
        pl.q, pl.k, pl.v, PLANTED, target_error=0.2, block_size=BS, candidates=cands, cost_model=cm
    )
    dens = _budget_density(res, cm)
    extra = cm.pooled_remainder_cost(PLANTED) / cm.dense_cost(PLANTED)
    assert 0 < extra < 0.5
    for c, spec in enumerate(res.candidates):
        want = res.table["density"][:, c] + (extra if spec.remainder == "pooled" else 0.0)
        torch.testing.assert_close(dens[:, c], want)
