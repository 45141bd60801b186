"""Backward of block-sparse attention: the transposed block lists, the PyTorch twin backward (the op's
gradient on CPU / ``backend="reference"``) and the Triton backward kernels (under the interpreter on CPU).

Oracle: autograd through float64 dense attention with the densified token mask (independent of blocks),
of the loss ``sum(out * g_out) + sum(finite(lse) * g_lse)``. fp32 gradients must match within 1e-5
relative to the largest oracle gradient; fp16 / bf16 kernel gradients follow the one tolerance rule
(``tests/tolerance.py``: at most 2x the error of the same computation done naively in that dtype).
Interpreter tests keep shapes small (N <= 113, H <= 2): the interpreter is slow.
"""

from __future__ import annotations

import math

import pytest
import torch
from tolerance import assert_close_to_oracle

from sparsediff import BlockSparseMask, block_sparse_attention
from sparsediff.reference import transposed_block_lists


def _cdiv(a, b):
    return -(-a // b)


def _qkv(B, H, Nq, Nk, D, dtype=torch.float32, *, layout="bnhd"):
    """q/k/v as [B, H, N, D] leaves; 'bnhd' makes them transpose views of [B, N, H, D] buffers."""
    if layout == "bnhd":
        ts = [torch.randn(B, n, H, D, dtype=dtype).transpose(1, 2) for n in (Nq, Nk, Nk)]
    else:
        ts = [torch.randn(B, H, n, D, dtype=dtype) for n in (Nq, Nk, Nk)]
    return [t.requires_grad_(True) for t in ts]


def _mask(Bm, H, Nq, Nk, bs, p=0.4, *, empty_qblock=None):
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    bb = torch.rand(Bm, H, _cdiv(Nq, bq), _cdiv(Nk, bk)) < p
    qb = torch.arange(bb.shape[2])
    bb[:, :, qb, torch.clamp(qb * bk // bq, max=bb.shape[3] - 1)] = True
    if empty_qblock is not None:  # (b, h, query block) that attends nothing: empty rows
        bb[empty_qblock] = False
    return BlockSparseMask.from_dense(bb, (bq, bk), (Nq, Nk))


def _finite(x):
    return torch.where(torch.isfinite(x), x, 0.0)


def _oracle_grads(q, k, v, mask, g_out, g_lse, scale=None, dtype=torch.float64):
    """Autograd of dense masked attention computed in ``dtype`` (float64: the oracle)."""
    q2, k2, v2 = (x.detach().to(dtype).requires_grad_(True) for x in (q, k, v))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tm = mask.to_token_mask()
    s = (q2 @ k2.transpose(-1, -2) * scale).masked_fill(~tm, -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.where(torch.isfinite(lse)[..., None], (s - _finite(lse)[..., None]).exp(), 0.0)
    out = p @ v2
    loss = (out * g_out.to(dtype)).sum()
    if g_lse is not None:
        loss = loss + (_finite(lse) * g_lse.to(dtype)).sum()
    return torch.autograd.grad(loss, (q2, k2, v2))


def _op_grads(q, k, v, mask, g_out, g_lse, backend, scale=None):
    out, lse = block_sparse_attention(q, k, v, mask, scale=scale, return_lse=True, backend=backend)
    loss = (out * g_out).sum()
    if g_lse is not None:
        loss = loss + (_finite(lse) * g_lse).sum()
    return torch.autograd.grad(loss, (q, k, v))


def _assert_rel(actual, oracle, tol, what):
    assert not torch.isnan(actual).any(), f"{what}: NaN"
    a, o = actual.double(), oracle.double()
    err = (a - o).abs().max().item()
    ref = o.abs().max().item()
    assert err <= tol * max(ref, 1e-30), f"{what}: max abs error {err:.3e} > {tol} x max|oracle| {ref:.3e}"


def _check_fp32(q, k, v, mask, backend, *, scale=None, with_lse=True, tol=1e-5):
    g_out = torch.randn(q.shape)
    g_lse = torch.randn(q.shape[:3]) if with_lse else None
    got = _op_grads(q, k, v, mask, g_out, g_lse, backend, scale)
    want = _oracle_grads(q, k, v, mask, g_out, g_lse, scale)
    for name, a, x, w in zip("qkv", got, (q, k, v), want):
        assert a.shape == x.shape and a.dtype == x.dtype
        _assert_rel(a, w, tol, f"{backend} d{name}")
    return got


# ----------------------------------------------------------------------------- transposed block lists
def _transposed_slow(mask):
    bm, h, qb, _ = mask.kv_indices.shape
    kb = mask.num_kv_blocks
    lists = [[[[] for _ in range(kb)] for _ in range(h)] for _ in range(bm)]
    for b in range(bm):
        for hh in range(h):
            for i in range(qb):
                for j in mask.kv_indices[b, hh, i, : int(mask.kv_counts[b, hh, i])].tolist():
                    lists[b][hh][j].append(i)
    return lists


@pytest.mark.parametrize(
    "Bm, H, Nq, Nk, bs, p",
    [
        (1, 3, 97, 113, 16, 0.3),
        (2, 2, 113, 97, (16, 32), 0.5),
        (1, 1, 64, 64, 16, 1.0),
        (2, 1, 40, 200, 8, 0.1),
    ],
)
def test_transposed_lists_match_slow_reference(Bm, H, Nq, Nk, bs, p):
    mask = _mask(Bm, H, Nq, Nk, bs, p, empty_qblock=(0, 0, 1))
    idx = mask.kv_indices.clone()
    # garbage past each row's count must be ignored
    past = torch.arange(idx.shape[-1]) >= mask.kv_counts[..., None]
    idx[past] = mask.num_kv_blocks - 1
    q_idx, q_cnt = transposed_block_lists(idx, mask.kv_counts, mask.num_kv_blocks)
    want = _transposed_slow(mask)
    assert q_idx.dtype == q_cnt.dtype == torch.int32
    assert q_idx.shape[:3] == (Bm, H, mask.num_kv_blocks) and q_idx.shape[3] >= 1
    for b in range(Bm):
        for h in range(H):
            for j in range(mask.num_kv_blocks):
                c = int(q_cnt[b, h, j])
                assert q_idx[b, h, j, :c].tolist() == want[b][h][j], (b, h, j)
                assert (q_idx[b, h, j, c:] == 0).all()
    assert int(q_cnt.sum()) == int(mask.kv_counts.sum())


def test_transposed_lists_of_an_empty_mask():
    mask = BlockSparseMask.from_dense(torch.zeros(1, 2, 3, 4, dtype=torch.bool), 16, (40, 60))
    q_idx, q_cnt = transposed_block_lists(mask.kv_indices, mask.kv_counts, mask.num_kv_blocks)
    assert q_idx.shape == (1, 2, 4, 1) and (q_cnt == 0).all()


# ----------------------------------------------------------------------------- PyTorch twin backward
@pytest.mark.parametrize(
    "B, Bm, H, Nq, Nk, D, bs, layout",
    [
        (1, 1, 2, 97, 113, 24, 16, "bnhd"),  # ragged both sides, Nq != Nk, transpose views
        (2, 2, 2, 113, 97, 64, (16, 32), "bhnd"),  # per-batch masks, rectangular blocks
        (2, 1, 1, 97, 97, 256, 32, "bnhd"),  # largest head dim, shared mask
        (1, 1, 2, 128, 64, 40, (32, 16), "bhnd"),  # block multiples
    ],
)
def test_twin_backward_matches_float64_oracle(B, Bm, H, Nq, Nk, D, bs, layout):
    q, k, v = _qkv(B, H, Nq, Nk, D, layout=layout)
    mask = _mask(Bm, H, Nq, Nk, bs, 0.4, empty_qblock=(0, H - 1, 2))
    dq, dk, dv = _check_fp32(q, k, v, mask, "reference")
    assert dq.stride() == q.stride() and dk.stride() == k.stride()
    bq = mask.block_size[0]
    assert (dq[0, H - 1, 2 * bq : 3 * bq] == 0).all()  # empty rows: zero gradient


def test_twin_backward_out_only_lse_only_and_custom_scale():
    q, k, v = _qkv(2, 2, 97, 70, 32)
    mask = _mask(1, 2, 97, 70, 16, 0.5)
    _check_fp32(q, k, v, mask, "reference", with_lse=False, scale=0.3)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    g_lse = torch.randn(lse.shape)
    got = torch.autograd.grad((_finite(lse) * g_lse).sum(), (q, k, v), allow_unused=True)
    want = _oracle_grads(q, k, v, mask, torch.zeros(q.shape), g_lse)
    for a, w in zip(got, want):
        _assert_rel(a, w, 1e-5, "lse-only")


def test_twin_backward_fully_empty_mask_and_half_dtypes():
    q, k, v = _qkv(1, 2, 50, 40, 16)
    mask = BlockSparseMask.from_dense(torch.zeros(1, 2, 4, 3, dtype=torch.bool), 16, (50, 40))
    g = _op_grads(q, k, v, mask, torch.randn(q.shape), torch.randn(q.shape[:3]), "reference")
    assert all((x == 0).all() for x in g)
    for dtype in (torch.float16, torch.bfloat16):
        q, k, v = _qkv(1, 2, 97, 113, 32, dtype)
        mask = _mask(1, 2, 97, 113, 16, 0.4, empty_qblock=(0, 0, 1))
        g_out = torch.randn(q.shape, dtype=dtype)
        got = _op_grads(q, k, v, mask, g_out, None, "reference")
        want = _oracle_grads(q, k, v, mask, g_out, None)
        naive = _oracle_grads(q, k, v, mask, g_out, None, dtype=dtype)
        for name, a, w, n in zip("qkv", got, want, naive):
            assert a.dtype == dtype
            assert_close_to_oracle(a, w.float(), n, what=f"twin d{name} {dtype}")


def test_twin_backward_compiles_fullgraph():
    q, k, v = _qkv(1, 2, 70, 70, 16)
    mask = _mask(1, 2, 70, 70, 16, 0.5)

    def f(q, k, v, kv_idx, kv_cnt):
        m = BlockSparseMask(kv_idx, kv_cnt, 16, (70, 70), validate=False)
        return block_sparse_attention(q, k, v, m, backend="reference").square().sum()

    eager = torch.autograd.grad(f(q, k, v, mask.kv_indices, mask.kv_counts), (q, k, v))
    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(cf(q, k, v, mask.kv_indices, mask.kv_counts), (q, k, v))
    torch._dynamo.reset()
    for a, w in zip(got, eager):
        torch.testing.assert_close(a, w, rtol=0, atol=0)


def test_backward_op_opcheck():
    from sparsediff import ops

    q, k, v = (x.detach() for x in _qkv(1, 2, 40, 50, 16, layout="bhnd"))
    mask = _mask(1, 2, 40, 50, 16, 0.5)
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    args = (q, k, v, out, lse, torch.randn(out.shape), torch.randn(lse.shape), mask.kv_indices,
            mask.kv_counts, 16, 16, 0.25, "reference")  # fmt: skip
    torch.library.opcheck(ops._block_sparse_attn_bwd_op, args, test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------- Triton backward kernels
def _triton_ok():
    from sparsediff.ops import triton_reasons

    return not triton_reasons(torch.empty(1, 1, 1, 16))


triton_only = pytest.mark.skipif(
    not _triton_ok(), reason="Triton kernel cannot run here (no GPU, no interpreter)"
)


@triton_only
@pytest.mark.parametrize(
    "B, Bm, H, Nq, Nk, D, bs, layout",
    [
        (1, 1, 2, 97, 113, 24, 16, "bnhd"),  # ragged both sides, odd head dim, transpose views
        (2, 2, 1, 113, 97, 16, (16, 32), "bhnd"),  # per-batch masks, 32-key blocks split into key tiles
        (1, 1, 1, 70, 50, 40, (32, 16), "bnhd"),  # 32-query blocks split into query tiles
    ],
)
def test_triton_backward_fp32_matches_float64_oracle(B, Bm, H, Nq, Nk, D, bs, layout):
    q, k, v = _qkv(B, H, Nq, Nk, D, layout=layout)
    mask = _mask(Bm, H, Nq, Nk, bs, 0.4, empty_qblock=(0, H - 1, 1))
    dq, dk, dv = _check_fp32(q, k, v, mask, "triton")
    bq = mask.block_size[0]
    assert (dq[0, H - 1, bq : 2 * bq] == 0).all()  # empty rows: zero gradient


@triton_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
def test_triton_backward_half_dtypes(dtype):
    q, k, v = _qkv(1, 2, 97, 113, 32, dtype)
    mask = _mask(1, 2, 97, 113, 16, 0.4, empty_qblock=(0, 0, 1))
    g_out, g_lse = torch.randn(q.shape, dtype=dtype), torch.randn(q.shape[:3])
    got = _op_grads(q, k, v, mask, g_out, g_lse, "triton")
    want = _oracle_grads(q, k, v, mask, g_out, g_lse)
    naive = _oracle_grads(q, k, v, mask, g_out, g_lse, dtype=dtype)
    for name, a, w, n in zip("qkv", got, want, naive):
        assert a.dtype == dtype
        assert_close_to_oracle(a, w.float(), n, what=f"kernel d{name} {dtype}")


@triton_only
def test_triton_backward_matches_twin_and_explicit_tiles():
    """Kernel vs twin (tight), and launch configs with tiles smaller than the mask blocks."""
    from sparsediff.kernels.block_sparse_attn import LaunchConfig
    from sparsediff.kernels.block_sparse_attn_bwd import BwdLaunchConfig, block_sparse_attention_bwd

    q, k, v = (x.detach() for x in _qkv(2, 2, 100, 90, 16))
    mask = _mask(1, 2, 100, 90, 32, 0.5, empty_qblock=(0, 1, 0))
    out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    g_out, g_lse = torch.randn(q.shape), torch.randn(lse.shape)
    from sparsediff.reference import backward_blocks

    want = backward_blocks(q, k, v, out, lse, g_out, g_lse, mask, 0.25)
    q_idx, q_cnt = transposed_block_lists(mask.kv_indices, mask.kv_counts, mask.num_kv_blocks)
    for cfg in (None, BwdLaunchConfig(LaunchConfig(4, 1, 16, 16), LaunchConfig(4, 1, 16, 16))):
        got = block_sparse_attention_bwd(
            q, k, v, out, lse, g_out, g_lse, mask.kv_indices, mask.kv_counts, q_idx, q_cnt,
            block_q=32, block_kv=32, scale=0.25, cfg=cfg,
        )  # fmt: skip
        for name, a, w in zip("qkv", got, want):
            _assert_rel(a, w, 1e-5, f"kernel d{name} vs twin (cfg {cfg})")


@triton_only
def test_triton_backward_fully_empty_mask_no_nan():
    q, k, v = _qkv(1, 1, 40, 40, 16)
    mask = BlockSparseMask.from_dense(torch.zeros(1, 1, 3, 3, dtype=torch.bool), 16, (40, 40))
    g = _op_grads(q, k, v, mask, torch.randn(q.shape), torch.randn(q.shape[:3]), "triton")
    assert all((x == 0).all() for x in g)


def test_bwd_launch_config_tiles_divide_blocks():
    pytest.importorskip("triton")
    from sparsediff.kernels.block_sparse_attn_bwd import bwd_launch_config

    for bq, bk in ((16, 16), (16, 32), (64, 64), (128, 128), (128, 64)):
        for d in (16, 64, 128, 256):
            c = bwd_launch_config(bq, bk, d)
            assert bq % c.dq.tile_q == 0 and bk % c.dq.tile_kv == 0
            assert bq % c.dkdv.tile_q == 0 and bk % c.dkdv.tile_kv == 0
            assert all(x.num_stages >= 1 for x in c)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=triton_only)])
def test_backward_of_a_plain_sum_expanded_zero_stride_gradient(backend):
    """``out.sum()`` hands the backward an expanded (all strides 0) gradient: read it in place."""
    q, k, v = _qkv(1, 2, 50, 45, 16)
    mask = _mask(1, 2, 50, 45, 16, 0.5, empty_qblock=(0, 1, 0))
    got = torch.autograd.grad(block_sparse_attention(q, k, v, mask, backend=backend).sum(), (q, k, v))
    want = _oracle_grads(q, k, v, mask, torch.ones(q.shape), None)
    for name, a, w in zip("qkv", got, want):
        _assert_rel(a, w, 1e-5, f"{backend} d{name}")
