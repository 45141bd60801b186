"""Negative controls of the integration checks (tests/_integration.py): each simulated wiring bug must
make the check that is meant to catch it fail. Without these, a check that cannot fail looks like a
passing test (issue 11, finding 7: the pipeline-level bound alone passes when attention returns zeros).
"""

from __future__ import annotations

import pytest
import torch
from _integration import SPARSE_REL_BOUND, check_full_window, check_sparse, rel_l2
from tiny_pipelines import build

import sparsediff.attention as sd_attention
from sparsediff.hooks import LayerContext


class _Recording:
    """A tiny pipeline that keeps its last output (to look at it after a check failed)."""

    def __init__(self, tiny) -> None:
        self.tiny, self.pipe, self.name, self.transformers = tiny, tiny.pipe, tiny.name, tiny.transformers
        self.last = None

    def __call__(self, **kw):
        self.last = self.tiny(**kw)
        return self.last


@pytest.fixture(scope="module")
def wan():
    tiny = build("wan")
    return _Recording(tiny), tiny()


def _break_op(monkeypatch, how: str, sparse_only: bool) -> None:
    """Make the block-sparse op (as sparse_attention calls it) return zeros or heads rolled by one --
    on every call, or only on calls whose mask is not full (a bug only sparse runs can show)."""
    real = sd_attention.block_sparse_attention

    def broken(q, k, v, mask, **kw):
        out, lse = real(q, k, v, mask, **kw)
        if sparse_only and mask.density() >= 1:
            return out, lse
        out = torch.zeros_like(out) if how == "zeros" else out.roll(1, dims=1)
        return out, lse

    monkeypatch.setattr(sd_attention, "block_sparse_attention", broken)


@pytest.mark.parametrize("how", ["zeros", "roll_heads"])
def test_full_window_check_fails_on_broken_attention(wan, monkeypatch, how):
    tiny, base = wan
    _break_op(monkeypatch, how, sparse_only=False)
    with pytest.raises(AssertionError, match="full mask differs from dense"):
        check_full_window(tiny, base)


@pytest.mark.parametrize("how", ["zeros", "roll_heads"])
def test_sparse_check_fails_on_bugs_only_sparse_runs_show(wan, monkeypatch, how):
    """Zeros / rolled heads only where the mask is sparse: the full-window check cannot see them, the
    per-call oracle must. Zeros stay inside the coarse pipeline bound (why the bound is not the check)."""
    tiny, base = wan
    _break_op(monkeypatch, how, sparse_only=True)
    with pytest.raises(AssertionError, match="differs from the oracle"):
        check_sparse(tiny, base)
    if how == "zeros":
        assert rel_l2(tiny.last, base) <= SPARSE_REL_BOUND


def test_sparse_check_fails_when_specs_land_on_the_wrong_heads(wan, monkeypatch):
    """The per-head plan (sparse even heads, dense odd heads) handed to the layer reversed."""
    tiny, base = wan
    real = LayerContext.specs
    monkeypatch.setattr(LayerContext, "specs", lambda self, *a: tuple(reversed(real(self, *a))))
    with pytest.raises(AssertionError, match="differs from the oracle"):
        check_sparse(tiny, base)


def test_checks_pass_unbroken(wan):
    tiny, base = wan
    check_full_window(tiny, base)
    dens = check_sparse(tiny, base)["transformer"]
    assert dens and all(0 < d < 1 for d in dens.values())
