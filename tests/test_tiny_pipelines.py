"""The tiny offline pipelines of ``tests/tiny_pipelines.py`` run, and their declared layouts are true.

Two checks per model, independent of sparsediff's hooks:

* a dense pipeline call (2 steps) returns a finite tensor, every transformer component is called and
  the declared self-attention regexes match attention modules;
* the declared token layout (grid after patchify, text length and position) matches the actual token
  order of the first self-attention layer: a signal planted on the latent patch of grid token
  ``(f, h, w)`` changes exactly query row ``grid_offset + f*H*W + h*W + w``, and the sequence length is
  ``layout.num_tokens`` (see :func:`tiny_pipelines.probe_token_order`).

Run ``pytest tests/test_tiny_pipelines.py --durations=0`` for the per-factory runtimes.
"""

from __future__ import annotations

import re

import pytest
import torch
from tiny_pipelines import FACTORIES, build, corner_positions, expected_token, probe_token_order


@pytest.fixture(scope="module", params=list(FACTORIES))
def tiny(request):
    """One tiny pipeline per model, built once (its build time shows as this fixture's setup)."""
    return build(request.param)


def test_factory_runs_dense(tiny):
    name = tiny.name
    calls = {c: 0 for c in tiny.transformers}
    handles = []
    for c in tiny.transformers:
        model = getattr(tiny.pipe, c)
        handles.append(model.register_forward_pre_hook(lambda *a, c=c: calls.__setitem__(c, calls[c] + 1)))
    try:
        out = tiny()
    finally:
        for h in handles:
            h.remove()
    assert torch.is_tensor(out) and out.numel() > 0
    assert torch.isfinite(out).all(), f"{name}: non-finite output"
    assert all(n > 0 for n in calls.values()), f"{name}: a transformer was never called: {calls}"
    for c in tiny.transformers:
        regs = [re.compile(p) for p in tiny.self_attn]
        mods = [(n, m) for n, m in getattr(tiny.pipe, c).named_modules() if any(r.fullmatch(n) for r in regs)]
        assert mods, f"{name}.{c}: no module matches {tiny.self_attn}"
        for n, m in mods:
            assert hasattr(m, "processor"), f"{name}.{c}: {n} is not an attention module"
            head_dim = getattr(m, "head_dim", None) or m.inner_dim // m.heads
            assert head_dim == 16, f"{name}.{c}: {n} has head dim {head_dim}"


def test_declared_layout_matches_token_order(tiny):
    name = tiny.name
    positions = corner_positions(tiny.layout)
    n, changed = probe_token_order(tiny, positions)
    assert n == tiny.layout.num_tokens, (
        f"{name}: attention saw {n} tokens, layout {tiny.layout} has {tiny.layout.num_tokens}"
    )
    expected = [[expected_token(tiny.layout, *p)] for p in positions]
    assert changed == expected, (
        f"{name}: planted patches {positions} changed query rows {changed}, layout {tiny.layout} says {expected}"
    )


def test_wan22_runs_both_experts():
    """With boundary_ratio=0.9 and 2 steps, step 0 runs ``transformer`` and step 1 ``transformer_2``."""
    tiny = build("wan22")
    seen = []
    hs = [
        getattr(tiny.pipe, c).register_forward_pre_hook(lambda *a, c=c: seen.append(c))
        for c in tiny.transformers
    ]
    try:
        tiny()
    finally:
        for h in hs:
            h.remove()
    assert seen[0] == "transformer" and seen[-1] == "transformer_2", seen
