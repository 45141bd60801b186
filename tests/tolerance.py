"""The one tolerance rule of the test suite.

Exactness checks (kernel vs twin, twin vs oracle) follow flash-attention's rule: the error of the
implementation under test against an fp32 oracle may be at most ``factor`` times the error of a naive
implementation computed in the input dtype, plus a small absolute floor for fp32. Quality checks
(sparse vs dense) use :func:`rel_error` / :func:`sqnr_db` with explicit thresholds instead.
"""

from __future__ import annotations

import math

import torch

_FLOOR = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def assert_close_to_oracle(
    actual: torch.Tensor,
    oracle: torch.Tensor,
    naive: torch.Tensor | None = None,
    *,
    factor: float = 2.0,
    what: str = "output",
) -> None:
    """Assert ``max|actual - oracle| <= factor * max|naive - oracle| + floor(dtype)``.

    ``oracle`` is an fp32 computation of the same quantity; ``naive`` is the same-dtype naive
    computation (omit it for fp32 inputs or when only the floor applies). Infinite entries (lse of
    empty rows) must match exactly. NaN anywhere fails.
    """
    assert actual.shape == oracle.shape, (
        f"{what}: shape {tuple(actual.shape)} != oracle {tuple(oracle.shape)}"
    )
    a, o = actual.float(), oracle.float()
    assert not torch.isnan(a).any(), f"{what}: NaN in result"
    inf_a, inf_o = torch.isinf(a), torch.isinf(o)
    assert torch.equal(inf_a, inf_o), (
        f"{what}: infinite entries differ ({int((inf_a ^ inf_o).sum())} mismatches)"
    )
    if inf_a.any():
        assert torch.equal(a[inf_a], o[inf_o]), f"{what}: signs of infinite entries differ"
    fin = ~inf_o
    err = (a - o)[fin].abs().max().item() if fin.any() else 0.0
    base = 0.0
    if naive is not None:
        n = naive.float()
        base = (n - o)[fin].abs().max().item() if fin.any() else 0.0
    tol = factor * base + _FLOOR.get(actual.dtype, 2e-5)
    assert err <= tol, (
        f"{what} ({actual.dtype}): max abs error vs fp32 oracle {err:.3e} > tolerance {tol:.3e} "
        f"(= {factor} x naive same-dtype error {base:.3e} + floor)"
    )


def rel_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Relative L2 error ``||a - r|| / ||r||`` in fp32."""
    a, r = actual.float(), reference.float()
    return (torch.linalg.vector_norm(a - r) / torch.linalg.vector_norm(r).clamp_min(1e-30)).item()


def sqnr_db(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Signal-to-quantisation-noise ratio in dB (higher is better)."""
    e = rel_error(actual, reference)
    return math.inf if e == 0 else -20.0 * math.log10(e)
