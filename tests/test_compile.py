"""Regional compile with sparse attention enabled: one graph per repeated-block class, no recompiles."""

from __future__ import annotations

import pytest
import torch
from _integration import SPARSE_KW
from tiny_pipelines import _wan_transformer

import sparsediff.api as api
from sparsediff.plan import Plan
from sparsediff.specs import HeadSpec


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def _per_layer_plan(t):
    # different patterns per layer and per head: layer identity must not be a compile-time constant
    return Plan.per_head(
        t,
        [
            [HeadSpec("dense"), HeadSpec.make("tile", window=(1, 1, 1))],
            [HeadSpec.make("radial", decay=0.05)] * 2,
        ],
    )


@pytest.mark.parametrize("plan_kind", ["dense", "sparse"])
def test_wan_compile_repeated_blocks_no_recompiles(fresh_dynamo, plan_kind):
    counters = fresh_dynamo
    t = _wan_transformer().eval()
    x, enc = torch.randn(1, 16, 3, 8, 12), torch.randn(1, 4, 32)
    plan = Plan.dense() if plan_kind == "dense" else _per_layer_plan(t)
    with torch.no_grad():
        base = t(x, torch.tensor([900.0]), enc, return_dict=False)[0]
        api.enable_sparse_attention(t, plan, **SPARSE_KW)
        eager = [t(x, torch.tensor([tv]), enc, return_dict=False)[0] for tv in (900.0, 500.0)]
        t.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            compiled = [t(x, torch.tensor([tv]), enc, return_dict=False)[0] for tv in (900.0, 500.0)]
    api.disable_sparse_attention(t)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if plan_kind == "dense":
        torch.testing.assert_close(compiled[0], base, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(compiled[0], base, atol=1e-4)


def test_flux_compile_repeated_blocks_one_graph_per_block_class(fresh_dynamo):
    from tiny_pipelines import build

    counters = fresh_dynamo
    tiny = build("flux")
    pipe = tiny.pipe
    with torch.no_grad():
        eager = tiny()
        api.enable_sparse_attention(pipe, Plan.uniform("tile", window=(1, 1, 1)), **SPARSE_KW)
        sparse_eager = tiny()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = tiny()
    pipe.disable_sparse_attention()
    classes = len(pipe.transformer._repeated_blocks)
    assert counters["stats"]["unique_graphs"] <= classes, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, sparse_eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, eager)
