"""A user-registered pattern family works end to end: HeadSpec, Plan (JSON round trip), the enabled
pipeline, sparse_attention next to built-in heads, the search's block structures; bad registrations
are refused."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_pipelines import build

import sparsediff
from sparsediff.layout import TokenLayout
from sparsediff.mask import BlockSparseMask
from sparsediff.specs import HeadSpec


def _strided(layout, spec, block_size, device):
    """Key blocks at a multiple of ``stride`` from the query block (the diagonal included)."""
    n = layout.num_tokens
    nb = -(-n // block_size)
    i = torch.arange(nb, device=device)
    keep = (i.view(-1, 1) - i.view(1, -1)) % spec.get("stride") == 0
    return BlockSparseMask.from_dense(keep[None, None], block_size, (n, n))


def _check_stride(spec):
    if spec.get("stride") < 1:
        raise ValueError("stride must be >= 1")


def _first_key_block(q, k, layout, spec, block_size, scale):
    """Dynamic: the diagonal block plus the key block with the largest mean-pooled score."""
    B, H, N, _ = q.shape
    nb = -(-N // block_size)
    pad = nb * block_size - N
    qp = torch.nn.functional.pad(q, (0, 0, 0, pad)).view(B, H, nb, block_size, -1).mean(3)
    kp = torch.nn.functional.pad(k, (0, 0, 0, pad)).view(B, H, nb, block_size, -1).mean(3)
    best = (qp @ kp.transpose(-1, -2)).argmax(-1)
    keep = torch.eye(nb, dtype=torch.bool).expand(B, H, nb, nb).clone()
    keep.scatter_(-1, best.unsqueeze(-1), True)
    return keep


@pytest.fixture
def families():
    fams = [
        sparsediff.register_pattern(
            "strided",
            params={"stride": 2},
            checks={"stride": (lambda v: isinstance(v, int), "an int")},
            check=_check_stride,
            static_mask=_strided,
            doc="every stride-th key block",
        ),
        sparsediff.register_pattern("best_block", select=_first_key_block),
    ]
    yield fams
    for f in fams:
        sparsediff.unregister_pattern(f.name)
    assert "strided" not in sparsediff.specs.PATTERN_PARAMS


def test_registered_family_runs_through_a_plan_on_a_tiny_pipeline(families):
    tiny = build("wan")
    plan = sparsediff.Plan.uniform("strided", stride=3)
    plan = sparsediff.Plan.from_dict(json.loads(plan.to_json()))  # a plan file naming the family loads
    assert plan.default == HeadSpec.make("strided", stride=3)
    kw = dict(backend="reference", block_size=8, dense_steps=0, dense_layers=(), min_tokens=0)
    dense = tiny()
    with sparsediff.enable_sparse_attention(tiny.pipe, plan, **kw) as h:
        out = tiny()
        rep = h.report()["transformer"]
    assert rep["sparse_calls"] > 0
    n = tiny.layout.num_tokens
    expected = _strided(tiny.layout, HeadSpec.make("strided", stride=3), 8, None).density()
    assert rep["mean_density"] == pytest.approx(expected) and expected < 0.5
    out_t, dense_t = (torch.as_tensor(x) for x in (_frames(out), _frames(dense)))
    assert out_t.shape == dense_t.shape and torch.isfinite(out_t).all() and n > 0
    assert (out_t - dense_t).abs().max() > 1e-4  # the family's mask changed the result


def _frames(result):
    x = result.frames if hasattr(result, "frames") else result
    return torch.as_tensor(x[0] if isinstance(x, (list, tuple)) else x, dtype=torch.float32)


def test_registered_families_next_to_builtin_heads_match_the_token_oracle(families):
    from sparsediff.attention import sparse_attention
    from sparsediff.patterns import static_mask

    lay = TokenLayout.video(3, 4, 6, text_len=5, text_position="after")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, lay.num_tokens, 16, generator=g) for _ in range(3))
    specs = [
        HeadSpec.make("strided", stride=2),
        HeadSpec.make("radial", decay=0.5),
        HeadSpec.make("best_block"),
    ]
    out = sparse_attention(q, k, v, lay, specs, block_size=8, backend="reference")
    masks = [
        static_mask(lay, specs[0], 8).to_token_mask()[0, 0].expand(2, -1, -1),
        static_mask(lay, specs[1], 8).to_token_mask()[0, 0].expand(2, -1, -1),
        BlockSparseMask.from_dense(
            _first_key_block(q[:, 2:], k[:, 2:], lay, specs[2], 8, 0.25), 8, (77, 77)
        ).to_token_mask()[:, 0],
    ]
    tm = torch.stack(masks, 1)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=tm)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert HeadSpec.make("strided").is_static and not HeadSpec.make("best_block").is_static


def test_registered_family_is_a_search_candidate(families):
    from sparsediff.search.candidates import build_structures

    lay = TokenLayout.video(2, 4, 4)
    q = k = torch.randn(1, 2, lay.num_tokens, 8)
    st = build_structures(
        [HeadSpec.make("strided", stride=2), HeadSpec.make("best_block")], q, k, lay, 8, 8**-0.5
    )
    assert [s.spec.pattern for s in st] == ["strided", "best_block"]
    assert float(st[0].density(lay.num_tokens, 8).max()) == pytest.approx(0.5)


def test_bad_registrations_and_specs_are_refused(families):
    with pytest.raises(ValueError, match="built-in"):
        sparsediff.register_pattern("radial", static_mask=_strided)
    with pytest.raises(ValueError, match="already registered"):
        sparsediff.register_pattern("strided", static_mask=_strided)
    with pytest.raises(ValueError, match="exactly one"):
        sparsediff.register_pattern("both", static_mask=_strided, select=_first_key_block)
    with pytest.raises(ValueError, match="unknown parameters"):
        sparsediff.register_pattern(
            "badcheck", params={}, checks={"x": (bool, "a bool")}, static_mask=_strided
        )
    with pytest.raises(ValueError, match="stride"):
        HeadSpec.make("strided", stride=0)  # the family's cross check
    with pytest.raises(ValueError, match="no parameter"):
        HeadSpec.make("strided", width=3)
    with pytest.raises(ValueError, match="register_pattern"):
        HeadSpec.make("never_registered")
    assert "both" not in sparsediff.specs.PATTERN_PARAMS


# ---------------------------------------------------------------------- the full form: a cross-step family
def _frozen_topk_work(call, spec, heads):
    """Cached: the key blocks with the largest exact attention mass at the last dense pass, frozen until
    the next one (a user's own LSE-cache-like family)."""
    from sparsediff.patterns import GroupWork

    slot = call.state.family_state("frozen_topk") if call.state is not None else {}
    key = tuple(heads)
    if key not in slot:  # no dense pass yet: exact, and nothing to reuse
        return GroupWork(mask=call.full_mask(len(heads)))
    return GroupWork(mask=slot[key])


def _frozen_topk_on_dense(call, spec, heads, out, lse):
    hl, n, bs = list(heads), call.num_tokens, call.block_size
    q, k = call.q[:, hl].float(), call.k[:, hl].float()
    p = torch.softmax(q @ k.transpose(-1, -2) * call.scale, -1)  # exact probabilities [B, Hg, N, N]
    nb = -(-n // bs)
    pad = nb * bs - n
    mass = torch.nn.functional.pad(p, (0, pad, 0, pad)).view(*p.shape[:2], nb, bs, nb, bs).sum((3, 5))
    top = mass.topk(int(spec.get("keep")), dim=-1).indices
    keep = torch.zeros_like(mass, dtype=torch.bool).scatter_(-1, top, True)
    call.state.family_state("frozen_topk")[tuple(heads)] = BlockSparseMask.from_dense(keep, bs, (n, n))


@pytest.fixture
def cached_family():
    fam = sparsediff.register_pattern(
        "frozen_topk",
        params={"keep": 2},
        checks={"keep": (lambda v: isinstance(v, int) and v >= 1, "an int >= 1")},
        build_group=_frozen_topk_work,
        on_dense=_frozen_topk_on_dense,
        kind="cross_step",
    )
    yield fam
    sparsediff.unregister_pattern("frozen_topk")


def test_cached_family_reuses_its_dense_pass_state(cached_family):
    from sparsediff.attention import LayerState, sparse_attention

    lay = TokenLayout.video(2, 4, 8)
    g = torch.Generator().manual_seed(1)
    q0, k0, v0, q1, k1, v1 = (torch.randn(1, 2, lay.num_tokens, 16, generator=g) for _ in range(6))
    specs = [HeadSpec.make("frozen_topk"), HeadSpec.make("dense")]
    assert HeadSpec.make("frozen_topk").kind == "cross_step" and not HeadSpec.make("frozen_topk").is_static
    st = LayerState()
    sparse_attention(q0, k0, v0, lay, specs, st, step=0, force_dense=True, block_size=8, backend="reference")
    frozen = st.family_state("frozen_topk")[(0,)]
    assert frozen.density() == pytest.approx(2 / 8)  # 2 of 8 key blocks per query block
    out = sparse_attention(q1, k1, v1, lay, specs, st, step=1, block_size=8, backend="reference")
    # head 0 ran on the mask chosen from step 0's q/k (not step 1's), head 1 dense
    tm = frozen.to_token_mask()[0, 0]
    ref0 = torch.nn.functional.scaled_dot_product_attention(q1[:, :1], k1[:, :1], v1[:, :1], attn_mask=tm)
    torch.testing.assert_close(out[:, :1], ref0, rtol=1e-5, atol=1e-5)
    dense1 = torch.nn.functional.scaled_dot_product_attention(q1, k1, v1)
    torch.testing.assert_close(out[:, 1:], dense1[:, 1:], rtol=1e-5, atol=1e-5)
    assert (out[:, 0] - dense1[:, 0]).abs().max() > 1e-2
    st.reset()
    assert st.slots == {}


def test_cached_family_runs_through_a_pipeline_with_dense_warmup(cached_family):
    tiny = build("wan")
    kw = dict(backend="reference", block_size=8, dense_steps=1, dense_layers=(), min_tokens=0)
    dense = _frames(tiny())
    with sparsediff.enable_sparse_attention(
        tiny.pipe, sparsediff.Plan.uniform("frozen_topk", keep=1), **kw
    ) as h:
        out = _frames(tiny())
        rep = h.report()["transformer"]
    # the warm-up step filled the family's state; the later steps ran on it, sparse
    assert rep["sparse_calls"] > 0 and 0 < rep["mean_density"] < 1
    assert (out - dense).abs().max() > 1e-4


def test_full_form_registration_is_checked():
    with pytest.raises(ValueError, match="kind"):
        sparsediff.register_pattern("nokind", build_group=_frozen_topk_work)
    with pytest.raises(ValueError, match="on_dense"):
        sparsediff.register_pattern("odd", static_mask=_strided, on_dense=_frozen_topk_on_dense)
    assert "nokind" not in sparsediff.specs.PATTERN_PARAMS and "odd" not in sparsediff.specs.PATTERN_PARAMS


def test_builtin_families_are_declared_in_their_own_modules():
    from sparsediff.patterns.registry import get_family

    for name in sparsediff.PATTERNS:
        fam = get_family(name)
        assert fam.builtin and fam.build_group.__module__ == f"sparsediff.patterns.{name}", name
        assert set(fam.params) == set(fam.checks) == set(sparsediff.specs.PATTERN_PARAMS[name])
    kinds = {n: get_family(n).kind_of(HeadSpec.make(n)) for n in sparsediff.PATTERNS}
    assert kinds == {
        "dense": "static",
        "radial": "static",
        "tile": "static",
        "reordered": "static",
        "topp": "dynamic",
        "skip": "cross_step",
        "lse_cache": "cross_step",
    }
    assert (
        HeadSpec.make("reordered", order="cluster").kind == "dynamic"
        and HeadSpec.make("reordered", select="topp").kind == "dynamic"
    )


def test_the_old_cross_step_kind_name_is_accepted_with_a_warning():
    with pytest.warns(FutureWarning, match="kind='cached' is now kind='cross_step'"):
        fam = sparsediff.register_pattern(
            "frozen_topk_old", params={"keep": 2}, build_group=_frozen_topk_work, kind="cached"
        )
    try:
        assert fam.kind == "cross_step" and HeadSpec.make("frozen_topk_old").is_cross_step
    finally:
        sparsediff.unregister_pattern("frozen_topk_old")
