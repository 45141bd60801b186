"""Shared helpers of the integration tests (the three-run test on tiny pipelines)."""

from __future__ import annotations

import torch

import sparsediff.api as api
from sparsediff.hooks import get_state
from sparsediff.plan import Plan

#: a plan that certainly changes the output of a tiny model: 1-tile windows everywhere, from step 0
SPARSE_PLAN = Plan.uniform("tile", window=(1, 1, 1))
#: run the PyTorch twin with small blocks (tiny sequences), no warm-up, no token threshold
SPARSE_KW = dict(backend="reference", block_size=8, dense_steps=0, dense_layers=(), min_tokens=0)


def processors(pipe):
    """{(component, module name): processor object} of every attention module of every transformer."""
    out = {}
    for cname, comp in pipe.components.items():
        if cname.startswith("transformer") and isinstance(comp, torch.nn.Module):
            for n, m in comp.named_modules():
                if hasattr(m, "processor"):
                    out[(cname, n)] = m.processor
    return out


def three_run(tiny, sparse_plan=SPARSE_PLAN, **sparse_kw):
    """baseline; all-dense plan == baseline (bit); sparse plan changes output, finite; disabled == baseline.

    Returns the densities measured during the sparse run.
    """
    pipe = tiny.pipe
    procs = processors(pipe)
    sched_dict = dict(vars(pipe.scheduler))
    base = tiny()
    assert torch.isfinite(base).all()

    h = api.enable_sparse_attention(pipe, Plan.dense(), backend="reference")
    assert set(h.states) == set(tiny.transformers)
    dense = tiny()
    api.disable_sparse_attention(pipe)
    assert torch.equal(dense, base), (
        f"{tiny.name}: all-dense plan changed the output (max {(dense - base).abs().max()})"
    )

    kw = {**SPARSE_KW, **sparse_kw}
    h = pipe.enable_sparse_attention(sparse_plan, **kw)
    sparse = tiny()
    densities = h.densities()
    pipe.disable_sparse_attention()
    assert torch.isfinite(sparse).all(), f"{tiny.name}: sparse output has non-finite values"
    assert not torch.equal(sparse, base), f"{tiny.name}: sparse plan did not change the output"
    for name in tiny.transformers:
        assert densities[name], f"{tiny.name}: {name} never ran sparse"
        assert all(0 < d < 1 for d in densities[name].values()), densities

    after = tiny()
    assert torch.equal(after, base), f"{tiny.name}: output after disable differs from baseline"
    assert processors(pipe) == procs and all(procs[k] is v for k, v in processors(pipe).items())
    assert all(get_state(getattr(pipe, n)) is None for n in tiny.transformers)
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    assert set(vars(pipe.scheduler)) == set(sched_dict) | (set(vars(pipe.scheduler)) - set(sched_dict))
    return densities
