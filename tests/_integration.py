"""Shared helpers of the integration tests (the three-run test on tiny pipelines)."""

from __future__ import annotations

import copy

import numpy as np
import torch

import sparsediff.api as api
from sparsediff.hooks import get_state
from sparsediff.plan import Plan

#: a plan that certainly changes the output of a tiny model: 1-tile windows everywhere, from step 0
SPARSE_PLAN = Plan.uniform("tile", window=(1, 1, 1))
#: the sparse machinery with a mask that keeps every block: tile windows larger than any tiny grid. The
#: tokens are still permuted into tile order, gathered per head, run through the block-sparse op and
#: scattered back -- only the mask is full -- so the result must equal dense attention to float rounding.
FULL_WINDOW_PLAN = Plan.uniform("tile", window=(99, 99, 99))
#: run the PyTorch twin with small blocks (tiny sequences), no warm-up, no token threshold
SPARSE_KW = dict(backend="reference", block_size=8, dense_steps=0, dense_layers=(), min_tokens=0)

# Closeness bounds: relative L2 error ||out - base|| / ||base|| of the pipeline's final output.
#
# Random-init attention is near uniform, so a *correct* sparse run is not close to dense at the attention
# output (a mean over 10 % of the keys is a much noisier estimate of mean(v) than the mean over all), and
# in these 1-2 layer models attention is a small part of the final output (the residual path dominates):
# replacing every attention output by zeros moves the final output by only 1-5 % (Mochi: 29 %). A bound
# on the real sparse run can therefore only catch gross failures (blow-ups, garbage of large magnitude),
# while wrong-but-bounded wiring (heads swapped, token order not restored, wrong scale) moves the output
# by about as much as correct sparsity does. The sharp check is FULL_WINDOW_PLAN: measured (torch 2.13,
# CPU, fp32) over all 11 tiny pipelines its error is <= 4.9e-7, and simulated wiring bugs on the same pass
# give >= 2.9e-3 (softmax scale off by sqrt(2)), 7.7e-3 (uniform attention), 1.0e-2 (tokens rolled by
# one), 1.7e-2 (heads swapped) -- so 1e-5 sits 20x above the correct error and 290x below the mildest bug.
#: bound for FULL_WINDOW_PLAN vs baseline (float rounding only)
FULL_WINDOW_REL_TOL = 1e-5
#: bounds for SPARSE_PLAN vs baseline. Measured: wan 0.034, wan22 0.034, wan_vace 0.034, skyreels_v2
#: 0.034, hunyuan_video 0.017, cogvideox 0.047, ltx 0.040, flux 0.021, qwenimage 0.019, sd3 0.028 (max
#: 0.047: bound 0.1 = 2x margin) and mochi 0.41 (attention carries much more of Mochi's output: zeroing it
#: moves the output by 0.29; bound 0.6). A sparse output 10x too large, for instance, fails these.
SPARSE_REL_BOUND = 0.1
SPARSE_REL_BOUND_PER_MODEL = {"mochi": 0.6}


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    return float((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300))


def processors(pipe):
    """{(component, module name): processor object} of every attention module of every transformer."""
    out = {}
    for cname, comp in pipe.components.items():
        if cname.startswith("transformer") and isinstance(comp, torch.nn.Module):
            for n, m in comp.named_modules():
                if hasattr(m, "processor"):
                    out[(cname, n)] = m.processor
    return out


def _snapshot(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_snapshot(x) for x in v)
    return copy.deepcopy(v)


def _same(x, y) -> bool:
    if type(x) is not type(y):
        return False
    if isinstance(x, torch.Tensor):
        return x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, np.ndarray):
        return np.array_equal(x, y)
    if isinstance(x, (list, tuple)):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    return bool(x == y)


def _scheduler_state(scheduler) -> dict:
    """The scheduler's instance attributes, copied (compared after identical pipeline calls)."""
    return {k: _snapshot(v) for k, v in vars(scheduler).items()}


def _assert_same_scheduler_state(a: dict, b: dict, what: str) -> None:
    assert set(a) == set(b), f"{what}: scheduler attributes differ: {sorted(set(a) ^ set(b))}"
    for k in a:
        assert _same(a[k], b[k]), f"{what}: scheduler.{k} = {b[k]!r}, after the baseline call it was {a[k]!r}"


def three_run(tiny, sparse_plan=SPARSE_PLAN, **sparse_kw):
    """baseline; all-dense plan == baseline (bit); sparse machinery with a full mask ~= baseline (float
    rounding); sparse plan changes the output, finite, within a coarse bound; disabled == baseline, with
    the processors and the scheduler state as they were.

    Returns the densities measured during the sparse run.
    """
    pipe = tiny.pipe
    procs = processors(pipe)
    base = tiny()
    assert torch.isfinite(base).all()
    sched_base = _scheduler_state(pipe.scheduler)  # the state a plain call leaves behind

    h = api.enable_sparse_attention(pipe, Plan.dense(), backend="reference")
    assert set(h.states) == set(tiny.transformers)
    dense = tiny()
    api.disable_sparse_attention(pipe)
    assert torch.equal(dense, base), (
        f"{tiny.name}: all-dense plan changed the output (max {(dense - base).abs().max()})"
    )

    kw = {**SPARSE_KW, **sparse_kw}
    h = pipe.enable_sparse_attention(FULL_WINDOW_PLAN, **kw)
    full = tiny()
    full_dens = h.densities()
    pipe.disable_sparse_attention()
    for name in tiny.transformers:
        assert full_dens[name] and all(d == 1.0 for d in full_dens[name].values()), (
            f"{tiny.name}: {name}: the full-window plan did not run every layer through the sparse op "
            f"with a full mask: {full_dens[name]}"
        )
    err = rel_l2(full, base)
    assert err <= FULL_WINDOW_REL_TOL, (
        f"{tiny.name}: sparse path with a full mask differs from dense by {err:.2e} (relative L2, "
        f"bound {FULL_WINDOW_REL_TOL:.0e}): token order, head mapping or scale is wrong"
    )

    h = pipe.enable_sparse_attention(sparse_plan, **kw)
    sparse = tiny()
    densities = h.densities()
    pipe.disable_sparse_attention()
    assert torch.isfinite(sparse).all(), f"{tiny.name}: sparse output has non-finite values"
    assert not torch.equal(sparse, base), f"{tiny.name}: sparse plan did not change the output"
    for name in tiny.transformers:
        assert densities[name], f"{tiny.name}: {name} never ran sparse"
        assert all(0 < d < 1 for d in densities[name].values()), densities
    if sparse_plan is SPARSE_PLAN:
        bound = SPARSE_REL_BOUND_PER_MODEL.get(tiny.name, SPARSE_REL_BOUND)
        err = rel_l2(sparse, base)
        assert err <= bound, (
            f"{tiny.name}: sparse output is {err:.3f} from baseline (relative L2), bound {bound}"
        )

    after = tiny()
    assert torch.equal(after, base), f"{tiny.name}: output after disable differs from baseline"
    assert processors(pipe) == procs and all(procs[k] is v for k, v in processors(pipe).items())
    assert all(get_state(getattr(pipe, n)) is None for n in tiny.transformers)
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    _assert_same_scheduler_state(sched_base, _scheduler_state(pipe.scheduler), tiny.name)
    return densities
