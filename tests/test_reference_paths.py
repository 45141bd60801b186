"""The twin's two paths -- grouped gathers through the CPU flash kernel (CPU), chunked padded gathers
(other devices) -- against the dense oracle, on ugly shapes: ragged last blocks, q != k lengths,
per-batch masks, heads that differ, empty rows, NaN inputs."""

from __future__ import annotations

import math

import pytest
import torch

import sparsediff
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
def test_paths_match_oracle_on_structured_masks(per_batch, nq, nk, bs):
    g = torch.Generator().manual_seed(nq + nk)
    B, H, D = 2, 4, 24
    q = torch.randn(B, nq, H, D, generator=g).transpose(1, 2)  # diffusers' layout, read as a view
    k, v = (torch.randn(B, H, nk, D, generator=g) for _ in range(2))
    qb, kb = math.ceil(nq / bs), math.ceil(nk / bs)
    mask = BlockSparseMask.from_dense(_banded(B, H, qb, kb, per_batch), bs, (nq, nk))
    ref_out, ref_lse = _oracle(q, k, v, mask)
    for path in (reference._forward_grouped, reference._forward_chunked):
        out, lse = path(q, k, v, mask, D**-0.5)
        torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
        assert torch.isneginf(lse[:, 1, bs : 2 * bs]).all() and (out[:, 1, bs : 2 * bs] == 0).all()  # empty


def test_scattered_masks_take_the_grouped_path_and_match_oracle():
    g = torch.Generator().manual_seed(0)
    B, H, N, D, bs = 1, 6, 300, 16, 16
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    nb = math.ceil(N / bs)
    blocks = torch.rand(1, H, nb, nb, generator=g) < 0.3
    mask = BlockSparseMask.from_dense(blocks, bs, (N, N))
    out, lse = reference.forward_blocks(q, k, v, mask, D**-0.5)
    ref_out, ref_lse = _oracle(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("nq,dtype", [(150, torch.float32), (160, torch.float32), (160, torch.bfloat16)])
@pytest.mark.parametrize("uniform", [False, True])
@pytest.mark.parametrize("budget_blocks", [1, 3, 7, 80, 1000])
def test_grouped_path_in_buffer_slices_matches_oracle(monkeypatch, budget_blocks, uniform, nq, dtype):
    """The grouped path refills its gather buffers slice by slice when a group does not fit
    (``_GATHER_ELEMS``): with a budget of a few key blocks every group is cut into many slices (and a
    row longer than the budget still runs whole) -- ragged last key block, per-batch masks, empty rows,
    q != k lengths -- and must equal the oracle exactly as the unsliced call does. ``uniform``: every
    row lists the same number of blocks, so all rows form one group of consecutive rows (the slice
    path, no index ops; with a budget of 80 or 1000 blocks, two or three whole heads per call); else
    one uniform head and two whose rows are grouped by count across heads (index ops). Inputs in diffusers' ``[B, N, H, D]`` layout
    (read through views; the output comes back in that layout and dtype), ``nq`` = 150 a ragged last
    query block (padded copies), 160 whole blocks (queries read and outputs written in place)."""
    g = torch.Generator().manual_seed(budget_blocks)
    B, H, nk, D, bs = 2, 3, 201, 8, 16
    q, k, v = (torch.randn(B, n, H, D, generator=g).to(dtype).transpose(1, 2) for n in (nq, nk, nk))
    qb, kb = math.ceil(nq / bs), math.ceil(nk / bs)
    if uniform:
        pick = torch.rand(B, H, qb, kb, generator=g).argsort(-1)[..., :4]
        blocks = torch.zeros(B, H, qb, kb, dtype=torch.bool).scatter_(-1, pick, True)
        assert blocks[..., -1].any() and not blocks[..., -1].all()  # the ragged block, in some slices
    else:
        blocks = torch.rand(B, H, qb, kb, generator=g) < 0.4
        blocks[:, :, :, -1] |= torch.rand(B, H, qb, generator=g) < 0.5  # the ragged block, in some slices
        blocks[0, 1, 2] = False  # an empty row
        pick = torch.rand(B, qb, kb, generator=g).argsort(-1)[..., :3]
        blocks[:, 0] = torch.zeros(B, qb, kb, dtype=torch.bool).scatter_(-1, pick, True)  # head 0 uniform
    mask = BlockSparseMask.from_dense(blocks, bs, (nq, nk))
    whole = reference._forward_grouped(q, k, v, mask, D**-0.5)
    # the budget is per thread: the effective budget is budget_blocks blocks whatever the thread count
    monkeypatch.setattr(reference, "_GATHER_ELEMS", budget_blocks * bs * D // torch.get_num_threads())
    out, lse = reference._forward_grouped(q, k, v, mask, D**-0.5)
    ref_out, ref_lse = _oracle(q, k, v, mask)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    assert out.dtype == dtype and out.stride() == q.stride()
    torch.testing.assert_close(out, ref_out, **tol)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out, whole[0], atol=0, rtol=0)
    if not uniform:
        assert torch.isneginf(lse[0, 1, 2 * bs : 3 * bs]).all() and (out[0, 1, 2 * bs : 3 * bs] == 0).all()


@pytest.mark.parametrize("path", ["grouped", "chunked"])
def test_nan_reaches_only_rows_that_attend_it(path):
    B, H, N, D, bs = 1, 2, 64, 8, 16
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    v[:, :, 60] = float("nan")  # in key block 3
    blocks = torch.zeros(1, H, 4, 4, dtype=torch.bool)
    blocks[..., 0, :2] = True  # query block 0 never sees block 3
    blocks[..., 1:, 2:] = True
    mask = BlockSparseMask.from_dense(blocks, bs, (N, N))
    out, _ = getattr(reference, f"_forward_{path}")(q, k, v, mask, D**-0.5)
    assert torch.isfinite(out[:, :, :bs]).all() and torch.isnan(out[:, :, bs:]).all()


@pytest.mark.parametrize("nq,nk,bs", [(97, 113, 16), (64, 130, 32)])
def test_full_mask_runs_dense_without_gathers_and_matches_oracle(nq, nk, bs, monkeypatch):
    """Every row listing every key block (a window covering the grid, a dense warm-up) takes the dense
    shortcut: one fused call on q/k/v, no gathers; same result as the oracle, q's layout and dtype kept."""
    g = torch.Generator().manual_seed(nq)
    B, H, D = 2, 3, 24
    q = torch.randn(B, nq, H, D, generator=g).transpose(1, 2)
    k, v = (torch.randn(B, H, nk, D, generator=g) for _ in range(2))
    mask = BlockSparseMask.full(1, H, bs, (nq, nk))
    gathers = []
    monkeypatch.setattr(
        reference, "_work_buffers", lambda *a: gathers.append(a) or (_ for _ in ()).throw(AssertionError)
    )
    out, lse = reference._forward_grouped(q, k, v, mask, D**-0.5)
    assert not gathers
    ref_out, ref_lse = _oracle(q, k, v, mask)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=1e-4)
    assert out.stride() == q.stride() and out.dtype == q.dtype
    # one block short of full (the last row drops its first block): the gather path, and still exact
    m2 = mask.to_dense().clone()
    m2[0, 0, -1, 0] = False
    part = BlockSparseMask.from_dense(m2, bs, (nq, nk))
    monkeypatch.undo()
    out2, lse2 = reference._forward_grouped(q, k, v, part, D**-0.5)
    ref2, ref_lse2 = _oracle(q, k, v, part)
    torch.testing.assert_close(out2, ref2, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse2, ref_lse2, atol=2e-5, rtol=1e-4)


def _two_row_mask(n=128, bs=32):
    # query block 0 lists key blocks {0, 1}; query block 1 lists only {1} (its 2nd slot is padding)
    bb = torch.zeros(1, 1, n // bs, n // bs, dtype=torch.bool)
    bb[0, 0, 0, :2] = True
    bb[0, 0, 1, 1] = True
    return BlockSparseMask.from_dense(bb, bs, (n, n))


def test_twin_nan_in_unlisted_value_block_does_not_leak():
    q, k, v = (torch.randn(1, 1, 128, 16) for _ in range(3))
    k[:, :, 1] = float("nan")  # tokens 0-31 live in key block 0, which query block 1 does not attend
    v[:, :, 0] = float("nan")
    out = sparsediff.block_sparse_attention(q, k, v, _two_row_mask(), backend="reference")
    assert not out[0, 0, 32:64].isnan().any()
    assert out[0, 0, :32].isnan().all()  # query block 0 does attend block 0: NaN propagates as in SDPA


def test_twin_multi_chunk_path_matches_oracle(monkeypatch):
    """The suite's shapes all fit in one chunk of the twin; force many chunks (ragged, per-batch counts)."""
    from tolerance import assert_close_to_oracle

    monkeypatch.setattr(reference, "_CHUNK_ELEMS", 4096)
    B, H, Nq, Nk, bs = 2, 2, 200, 150, 16
    q, k, v = torch.randn(B, H, Nq, 24), torch.randn(B, H, Nk, 24), torch.randn(B, H, Nk, 24)
    bb = torch.rand(B, H, -(-Nq // bs), -(-Nk // bs)) < 0.4
    bb[0, 1, 3] = False  # an empty row inside a chunk
    m = BlockSparseMask.from_dense(bb, bs, (Nq, Nk))
    out, lse = sparsediff.block_sparse_attention(q, k, v, m, return_lse=True, backend="reference")
    o_ref, lse_ref = reference.attention_ref(q, k, v, m.to_token_mask())
    assert_close_to_oracle(out, o_ref, what="chunked twin out")
    assert_close_to_oracle(lse, lse_ref, what="chunked twin lse")
