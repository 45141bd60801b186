"""A family registered with ``sparsediff.register_pattern`` alone -- its mask, candidate grid, cost terms,
label and planted rule -- is enumerated, measured, priced and chosen by the search exactly like a built-in.

The family, ``key_stripes``: every query block attends the key blocks whose index is a multiple of
``period`` (vertical stripes of whole key blocks). Planted heads attend exactly those keys; the search must
choose the family there (density 1 / period), and not on planted local / diffuse heads.
"""

from __future__ import annotations

import math

import pytest
import torch

import sparsediff
from sparsediff.layout import TokenLayout
from sparsediff.mask import BlockSparseMask
from sparsediff.search import default_candidates, family, search_attention
from sparsediff.search.planted import structure_matches
from sparsediff.specs import HeadSpec
from sparsediff.testing import planted_qkv

NAME = "key_stripes"
BLOCK = 16
LAYOUT = TokenLayout.video(4, 8, 8)  # 256 tokens, 16 blocks of 16


def _stripes(layout, spec, block_size, device):
    """``[1, 1, Qb, Kb]``: key blocks at a multiple of ``period``, for every query block."""
    n = layout.num_tokens
    nb = -(-n // block_size)
    keep = (torch.arange(nb, device=device) % spec.get("period") == 0).expand(nb, nb)
    return BlockSparseMask.from_dense(keep[None, None].contiguous(), block_size, (n, n))


def _grid(layout, block_size):
    return [HeadSpec.make(NAME, period=p) for p in (2, 3)]


def _cost(model, spec, density, layout):
    """The computed blocks plus one pass over the output (a distinctive term the test can recognise)."""
    return model.block_cost(density, layout) + model.copy_cost(layout)


def _register(**overrides):
    kw = dict(
        params={"period": 2},
        checks={"period": (lambda v: isinstance(v, int) and v >= 1, "an int >= 1")},
        static_mask=_stripes,
        candidates=_grid,
        cost=_cost,
        label="stripes",
        planted=lambda kind, spec, layout, block_size: kind == "stripe",
        doc="every period-th key block",
    )
    kw.update(overrides)
    return sparsediff.register_pattern(NAME, **kw)


@pytest.fixture
def stripes():
    fam = _register()
    try:
        yield fam
    finally:
        sparsediff.unregister_pattern(NAME)


def _planted_heads(period: int = 2):
    """Heads 0, 1: attention exactly on the key blocks of ``key_stripes(period)`` (logit +10 there, -10
    elsewhere, plus noise); head 2 local, head 3 diffuse (from :func:`sparsediff.testing.planted_qkv`)."""
    p = planted_qkv(LAYOUT, ["local", "global", "local", "global"], head_dim=16, seed=0)
    q, k = p.q.clone(), p.k.clone()
    n, d = LAYOUT.num_tokens, q.shape[-1]
    g = torch.Generator().manual_seed(1)
    kept = (torch.arange(n) // BLOCK) % period == 0
    root = d**0.25  # logits = q·k * d**-0.5
    for h in (0, 1):
        u = torch.randn(d, generator=g)
        u = u / u.norm()
        sign = torch.where(kept, 1.0, -1.0).view(-1, 1)
        q[0, h] = u * math.sqrt(10.0) * root + 0.05 * torch.randn(n, d, generator=g)
        k[0, h] = sign * u * math.sqrt(10.0) * root + 0.05 * torch.randn(n, d, generator=g)
    order = [0, 2, 1, 3]  # stripes, local, stripes, global
    return q[:, order], k[:, order], p.v[:, order]


def test_registered_family_is_enumerated_labelled_and_planted_like_a_builtin(stripes):
    cands = default_candidates(LAYOUT, BLOCK, cross_step=False)
    ours = [c for c in cands if c.pattern == NAME]
    assert ours == _grid(LAYOUT, BLOCK)  # its own grid, nothing else
    assert family(ours[0]) == "stripes"
    assert structure_matches("stripe", ours[0], LAYOUT, BLOCK)
    assert not structure_matches("local", ours[0], LAYOUT, BLOCK)


def test_search_chooses_the_registered_family_on_its_planted_heads(stripes):
    q, k, v = _planted_heads(period=2)
    res = search_attention(q, k, v, LAYOUT, block_size=BLOCK, target_error=0.05, num_rows=256)
    chosen = [s.pattern for s in res.specs]
    assert chosen[0] == NAME and chosen[2] == NAME, res.format()
    assert res.specs[0] == HeadSpec.make(NAME, period=2)
    assert chosen[1] != NAME and chosen[3] != NAME, res.format()
    for h in (0, 2):
        assert float(res.density[h]) == pytest.approx(0.5) and float(res.density[h]) < 1
        assert bool(res.met[h]) and float(res.error[h]) < 0.05
        # priced by the family's own cost terms (not the default "blocks only")
        cm = sparsediff.search.CostModel.default("cpu", head_dim=16, block_size=BLOCK, dtype=q.dtype)
        assert float(res.cost[h]) == pytest.approx(_cost(cm, res.specs[h], 0.5, LAYOUT))
    assert res.family_counts()["stripes"] == 2


def test_the_family_cost_terms_steer_the_choice():
    """The same heads with a family priced above dense attention: the search picks something else."""
    _register(cost=lambda model, spec, density, layout: 10 * model.dense_cost(layout))
    try:
        q, k, v = _planted_heads(period=2)
        res = search_attention(q, k, v, LAYOUT, block_size=BLOCK, target_error=0.05, num_rows=256)
        assert NAME not in [s.pattern for s in res.specs], res.format()
    finally:
        sparsediff.unregister_pattern(NAME)
    assert NAME not in sparsediff.specs.PATTERN_PARAMS


def test_a_family_without_a_grid_is_not_searched():
    _register(candidates=None)
    try:
        assert all(c.pattern != NAME for c in default_candidates(LAYOUT, BLOCK))
    finally:
        sparsediff.unregister_pattern(NAME)


def test_build_group_is_the_new_name_and_plan_group_is_deprecated():
    def work(call, spec, heads):
        return sparsediff.patterns.GroupWork(mask=call.full_mask(len(heads)))

    fam = sparsediff.register_pattern("all_blocks", build_group=work, kind="static")
    try:
        assert fam.build_group is work and fam.plan is work
        assert sparsediff.patterns.GroupPlan is sparsediff.patterns.GroupWork
    finally:
        sparsediff.unregister_pattern("all_blocks")
    with pytest.warns(FutureWarning, match="build_group"):
        sparsediff.register_pattern("all_blocks", plan_group=work, kind="static")
    sparsediff.unregister_pattern("all_blocks")
