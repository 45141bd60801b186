"""Shared helpers of the integration tests (the three-run test on tiny pipelines)."""

from __future__ import annotations

import contextlib
import copy
from unittest import mock

import numpy as np
import torch

import sparsediff.api as api
import sparsediff.attention as sd_attention
from sparsediff.hooks import get_state
from sparsediff.patterns import default_tile, reordered_permutation, static_mask, tile_permutation
from sparsediff.plan import Plan
from sparsediff.specs import HeadSpec

#: a plan that certainly changes the output of a tiny model: 1-tile windows everywhere, from step 0
SPARSE_PLAN = Plan.uniform("tile", window=(1, 1, 1))
#: the spec of the sparse heads of :func:`mixed_plan`
SPARSE_SPEC = HeadSpec.make("tile", window=(1, 1, 1))
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
#: bounds for the sparse run vs baseline. Measured with SPARSE_PLAN (every head sparse): wan 0.034, wan22
#: 0.034, wan_vace 0.034, skyreels_v2 0.034, hunyuan_video 0.017, cogvideox 0.047, ltx 0.040, flux 0.021,
#: qwenimage 0.019, sd3 0.028 (max 0.047: bound 0.1 = 2x margin) and mochi 0.41 (attention carries much
#: more of Mochi's output: zeroing it moves the output by 0.29; bound 0.6); with :func:`mixed_plan` (half
#: the heads sparse, the default of :func:`three_run`): <= 0.025, mochi 0.27. A sparse output 10x too
#: large, for instance, fails these.
SPARSE_REL_BOUND = 0.1
SPARSE_REL_BOUND_PER_MODEL = {"mochi": 0.6}
# The bound above passes when sparse attention returns zeros (see above), so the sparse run is checked
# sharply per attention call instead: every output of ``sparse_attention`` during the sparse run must
# equal an independent oracle (:func:`oracle_attention`: float64 softmax attention under each head's
# token-level mask, built per head from the spec the plan gives that head, un-permuted by indexing; it
# shares only the pattern builders, tested against slow references in tests/test_patterns.py, with
# the gather / op / scatter path) to float rounding. Measured (torch 2.13, CPU, fp32) over the 11 tiny
# pipelines with :func:`mixed_plan`: <= 2.3e-7 (sd3; the others <= 1.6e-7); zeros, rolled heads or specs
# on the wrong heads give O(1) errors (tests/test_integration_checks.py: each fails this check, and
# zeros pass the pipeline bound).
#: bound for every sparse_attention output vs the oracle (relative L2 per call)
ORACLE_REL_TOL = 1e-5


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


def mixed_plan(pipe, components) -> dict[str, Plan]:
    """{component: per-head plan}: even heads :data:`SPARSE_SPEC`, odd heads dense, in every layer.

    Heads with different masks in one layer make a head mix-up (a spec applied to another head, output
    heads rolled) change the result, which a uniform plan would hide.
    """
    from sparsediff.plan import ModelIdentity

    plans = {}
    for name in components:
        ident = ModelIdentity.of(getattr(pipe, name))
        plans[name] = Plan.per_head(ident, [mixed_specs(n) for n in ident.num_heads])
    return plans


def _token_order(layout, spec: HeadSpec, block_size: int) -> torch.Tensor | None:
    """int64 ``[N]`` natural index of each position of the head's order (None: natural order)."""
    if layout.grid is None:
        return None
    if spec.pattern == "tile":
        tile = spec.get("tile") or default_tile(layout.grid, block_size)
        return tile_permutation(layout, tuple(tile)).perm
    if spec.pattern == "reordered" and spec.get("select") == "static":
        return reordered_permutation(layout, spec.get("order")).perm
    return None


def oracle_attention(q, k, v, layout, head_specs, *, block_size, scale=None, force_dense=False):
    """Independent reference of :func:`sparsediff.attention.sparse_attention` for static specs.

    Per head: the spec's block mask (:func:`~sparsediff.patterns.static_mask`) expanded to tokens in the
    head's own order, moved to natural order by indexing (``M[perm[a], perm[b]] = Mp[a, b]``), then
    plain float64 ``softmax(q k^T * scale + mask) v``. q/k/v ``[B, H, N, D]``; returns float64 ``[B, H, N, D]``.
    """
    B, H, N, D = q.shape
    scale = D**-0.5 if scale is None else scale
    allowed = torch.ones(H, N, N, dtype=torch.bool)
    for h, spec in enumerate(head_specs):
        if force_dense or spec.pattern == "dense":
            continue
        if spec.pattern not in ("radial", "tile", "reordered") or not spec.is_static:
            raise ValueError(f"the oracle covers static patterns only, got {spec}")
        tok = static_mask(layout, spec, block_size).to_token_mask()[0, 0].cpu()
        perm = _token_order(layout, spec, block_size)
        if perm is None:
            allowed[h] = tok
        else:
            perm = perm.cpu()
            allowed[h, perm.unsqueeze(1), perm.unsqueeze(0)] = tok
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed.to(q.device), float("-inf"))
    return torch.softmax(logits, -1) @ v.double()


def mixed_specs(num_heads: int) -> tuple[HeadSpec, ...]:
    """The specs :func:`mixed_plan` gives heads ``0 .. num_heads - 1`` of every layer."""
    return tuple(SPARSE_SPEC if h % 2 == 0 else HeadSpec("dense") for h in range(num_heads))


@contextlib.contextmanager
def oracle_checked(specs_for=None):
    """Within the block, every ``sparse_attention`` call of the per-layer dispatch is compared with
    :func:`oracle_attention`; yields the list of relative L2 errors (one per call), filled as calls run.

    ``specs_for(num_heads)``: the specs the plan gives the call's heads, for the oracle (so a spec
    handed to the wrong head is caught); None: the specs the dispatch passes.
    The dispatch looks ``sparse_attention`` up on :mod:`sparsediff.attention` at call time, so patching
    the module attribute intercepts every layer call (and nothing else).
    """
    real = sd_attention.sparse_attention
    errors: list[float] = []

    def checked(q, k, v, layout, head_specs, state=None, **kw):
        out = real(q, k, v, layout, head_specs, state, **kw)
        ref = oracle_attention(
            q,
            k,
            v,
            layout,
            head_specs if specs_for is None else specs_for(q.shape[1]),
            block_size=kw.get("block_size") or sd_attention.DEFAULT_BLOCK_SIZE,
            scale=kw.get("scale"),
            force_dense=kw.get("force_dense", False),
        )
        errors.append(rel_l2(out, ref))
        return out

    with mock.patch.object(sd_attention, "sparse_attention", checked):
        yield errors


def check_full_window(tiny, base, **sparse_kw) -> None:
    """The sparse machinery with a full mask (:data:`FULL_WINDOW_PLAN`) equals ``base`` to float rounding,
    and every layer ran through the sparse op."""
    pipe = tiny.pipe
    h = pipe.enable_sparse_attention(FULL_WINDOW_PLAN, **{**SPARSE_KW, **sparse_kw})
    try:
        full = tiny()
        full_dens = h.densities()
    finally:
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


def check_sparse(tiny, base, sparse_plan=None, **sparse_kw):
    """A sparse run: ran sparse (every layer's density in (0, 1)), differs from ``base``, finite. With the
    default ``sparse_plan`` (:func:`mixed_plan`) every attention call equals :func:`oracle_attention`
    (:data:`ORACLE_REL_TOL`) and the output is within the coarse pipeline bound. Returns the densities."""
    pipe = tiny.pipe
    checked = sparse_plan is None
    plan = mixed_plan(pipe, tiny.transformers) if checked else sparse_plan
    h = pipe.enable_sparse_attention(plan, **{**SPARSE_KW, **sparse_kw})
    try:
        with oracle_checked(mixed_specs) if checked else contextlib.nullcontext([]) as errors:
            sparse = tiny()
        densities = h.densities()
    finally:
        pipe.disable_sparse_attention()
    assert torch.isfinite(sparse).all(), f"{tiny.name}: sparse output has non-finite values"
    assert not torch.equal(sparse, base), f"{tiny.name}: sparse plan did not change the output"
    for name in tiny.transformers:
        assert densities[name], f"{tiny.name}: {name} never ran sparse"
        assert all(0 < d < 1 for d in densities[name].values()), densities
    if checked:
        assert errors, f"{tiny.name}: no sparse_attention call was checked against the oracle"
        worst = max(errors)
        assert worst <= ORACLE_REL_TOL, (
            f"{tiny.name}: a sparse attention output differs from the oracle (masked float64 attention, "
            f"per head) by {worst:.2e} relative L2 (bound {ORACLE_REL_TOL:.0e}; {len(errors)} calls): "
            "wrong values, heads or token order in the sparse path"
        )
        bound = SPARSE_REL_BOUND_PER_MODEL.get(tiny.name, SPARSE_REL_BOUND)
        err = rel_l2(sparse, base)
        assert err <= bound, (
            f"{tiny.name}: sparse output is {err:.3f} from baseline (relative L2), bound {bound}"
        )
    return densities


def three_run(tiny, sparse_plan=None, **sparse_kw):
    """baseline; all-dense plan == baseline (bit); sparse machinery with a full mask ~= baseline (float
    rounding); sparse plan: ran sparse, changes the output, every attention call == the oracle
    (:func:`check_sparse`); disabled == baseline, with the processors and the scheduler state as they were.

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

    check_full_window(tiny, base, **sparse_kw)
    densities = check_sparse(tiny, base, sparse_plan, **sparse_kw)

    after = tiny()
    assert torch.equal(after, base), f"{tiny.name}: output after disable differs from baseline"
    assert processors(pipe) == procs and all(procs[k] is v for k, v in processors(pipe).items())
    assert all(get_state(getattr(pipe, n)) is None for n in tiny.transformers)
    assert "step" not in vars(pipe.scheduler) and "set_timesteps" not in vars(pipe.scheduler)
    _assert_same_scheduler_state(sched_base, _scheduler_state(pipe.scheduler), tiny.name)
    return densities
