"""The twin's three CPU/GPU paths -- contiguous runs on K/V views (structured masks), grouped gathers
(scattered masks), chunked padded gathers (non-CPU devices) -- against the dense oracle, on ugly shapes:
ragged last blocks, q != k lengths, per-batch masks, heads that share runs non-contiguously, empty rows."""

from __future__ import annotations

import math

import pytest
import torch

from sparsediff import reference
from sparsediff.mask import BlockSparseMask


def _banded(B: int, H: int, qb: int, kb: int, per_batch: bool) -> torch.Tensor:
    """Block mask [Bm, H, qb, kb]: each head a band of half-width w_h around the diagonal plus a sink block
    (two runs); heads 0 and 2 identical (a non-contiguous group), row 1 of head 1 empty."""
    Bm = B if per_batch else 1
    i = torch.arange(qb)[:, None] * kb // qb
    j = torch.arange(kb)[None, :]
    m = torch.zeros(Bm, H, qb, kb, dtype=torch.bool)
    for b in range(Bm):
        for h in range(H):
            w = (1, 2, 1, 3)[h % 4] + b
            m[b, h] = ((j - i).abs() <= w) | (j == 0)
    if H > 1:
        m[:, 1, 1] = False
    return m


def _oracle(q, k, v, mask: BlockSparseMask):
    tok = mask.to_token_mask()  # [Bm, H, Nq, Nk]
    return reference.attention_ref(q, k, v, tok)


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("nq,nk,bs", [(97, 113, 16), (200, 200, 32), (64, 130, 16)])
def test_run_path_matches_oracle_on_structured_masks(per_batch, nq, nk, bs):
    g = torch.Generator().manual_seed(nq + nk)
    B, H, D = 2, 4, 24
    q = torch.randn(B, nq, H, D, generator=g).transpose(1, 2)  # diffusers' layout, read as a view
    k, v = (torch.randn(B, H, nk, D, generator=g) for _ in range(2))
    qb, kb = math.ceil(nq / bs), math.ceil(nk / bs)
    mask = BlockSparseMask.from_dense(_banded(B, H, qb, kb, per_batch), bs, (nq, nk))
    plan = reference._run_plan(mask, B, D, force=True)
    assert any(len(r[3]) == 2 for r in plan)  # runs path, with LSE merges
    assert any(r[2] == [0, 2] for r in plan)  # a non-contiguous head group
    out, lse = reference._forward_runs(q, k, v, mask, D**-0.5, plan)
    ref_out, ref_lse = _oracle(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    assert torch.isneginf(lse[:, 1, bs : 2 * bs]).all() and (out[:, 1, bs : 2 * bs] == 0).all()  # empty row
    # the three paths agree with each other
    for path in (reference._forward_grouped, reference._forward_chunked):
        o2, l2 = path(q, k, v, mask, D**-0.5)
        torch.testing.assert_close(o2, out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(l2, lse, atol=2e-5, rtol=1e-4)


def test_scattered_masks_take_the_grouped_path_and_match_oracle():
    g = torch.Generator().manual_seed(0)
    B, H, N, D, bs = 1, 6, 300, 16, 16
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    nb = math.ceil(N / bs)
    blocks = torch.rand(1, H, nb, nb, generator=g) < 0.3
    mask = BlockSparseMask.from_dense(blocks, bs, (N, N))
    assert reference._run_plan(mask, B, D) is None  # too many runs: gathers are cheaper than calls
    out, lse = reference._forward(q, k, v, mask, D**-0.5)
    ref_out, ref_lse = _oracle(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


def test_nan_reaches_only_rows_that_attend_it_on_the_run_path():
    B, H, N, D, bs = 1, 2, 64, 8, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    v[:, :, 60] = float("nan")  # in key block 3
    blocks = torch.zeros(1, H, 4, 4, dtype=torch.bool)
    blocks[..., 0, :2] = True  # query block 0 never sees block 3
    blocks[..., 1:, 2:] = True
    mask = BlockSparseMask.from_dense(blocks, bs, (N, N))
    plan = reference._run_plan(mask, B, D, force=True)
    out, _ = reference._forward_runs(q, k, v, mask, D**-0.5, plan)
    assert torch.isfinite(out[:, :, :bs]).all() and torch.isnan(out[:, :, bs:]).all()


def test_uniform_banded_masks_take_the_run_path():
    # all heads share the band: one call per run and query block beats gathering every listed block
    B, H, N, D, bs = 1, 8, 4096, 64, 64  # gathers would exceed the cache (64 MiB)
    blocks = _banded(B, 1, N // bs, N // bs, per_batch=False).expand(1, H, -1, -1)
    mask = BlockSparseMask.from_dense(blocks, bs, (N, N))
    plan = reference._run_plan(mask, B, D)
    assert plan is not None and all(r[2] == list(range(H)) for r in plan)
