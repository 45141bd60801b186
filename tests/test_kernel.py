"""Triton block-sparse kernel vs the PyTorch twin and the fp32 dense oracle.

On CPU these run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py), which is slow:
shapes stay small (N <= ~256 mostly; the issue lengths 200 and 1023 once each; H <= 2). Tolerances follow the one rule
in ``tests/tolerance.py``: error vs the fp32 oracle <= 2 x the naive same-dtype error + floor.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tolerance import assert_close_to_oracle  # noqa: E402

import sparsediff  # noqa: E402
from sparsediff import BlockSparseMask, block_sparse_attention  # noqa: E402
from sparsediff.ops import triton_reasons  # noqa: E402
from sparsediff.reference import attention_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"

if DEV == "cpu" and triton_reasons(torch.empty(1, 1, 1, 16)):
    pytest.skip(
        "Triton kernel cannot run here: " + "; ".join(triton_reasons(torch.empty(1, 1, 1, 16))),
        allow_module_level=True,
    )


def _cdiv(a, b):
    return -(-a // b)


def _qkv(B, H, Nq, Nk, D, dtype, *, layout="bnhd"):
    """q/k/v as [B, H, N, D] views; 'bnhd' makes them transpose views of [B, N, H, D] buffers."""
    if layout == "bnhd":
        q = torch.randn(B, Nq, H, D, dtype=dtype, device=DEV).transpose(1, 2)
        k = torch.randn(B, Nk, H, D, dtype=dtype, device=DEV).transpose(1, 2)
        v = torch.randn(B, Nk, H, D, dtype=dtype, device=DEV).transpose(1, 2)
    else:
        q = torch.randn(B, H, Nq, D, dtype=dtype, device=DEV)
        k = torch.randn(B, H, Nk, D, dtype=dtype, device=DEV)
        v = torch.randn(B, H, Nk, D, dtype=dtype, device=DEV)
    return q, k, v


def _random_mask(Bm, H, Nq, Nk, bs, p=0.5, *, keep_diag=True):
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    bb = torch.rand(Bm, H, _cdiv(Nq, bq), _cdiv(Nk, bk)) < p
    if keep_diag:  # every row attends somewhere unless a test wants empty rows
        qb = torch.arange(bb.shape[2])
        bb[:, :, qb, torch.clamp(qb * bk // bq, max=bb.shape[3] - 1)] = True
    return BlockSparseMask.from_dense(bb, (bq, bk), (Nq, Nk)).to(DEV)


def _check(q, k, v, mask, *, scale=None):
    """Kernel vs (a) the fp32 dense oracle with the token mask, (b) the twin run in fp32; returns errors."""
    out, lse = block_sparse_attention(q, k, v, mask, scale=scale, return_lse=True, backend="triton")
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == q.stride()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    tok = mask.to_token_mask()
    o_ref, lse_ref = attention_ref(q, k, v, tok, scale=scale)  # fp32 oracle, independent of blocks
    o_naive, _ = attention_ref(q, k, v, tok, scale=scale, upcast=False)  # naive same-dtype
    naive = None if q.dtype == torch.float32 else o_naive
    assert_close_to_oracle(out, o_ref, naive, what="kernel out vs dense oracle")
    assert_close_to_oracle(lse, lse_ref, what="kernel lse vs dense oracle")
    o_twin, lse_twin = sparsediff.reference.block_sparse_attention(
        q.float(), k.float(), v.float(), mask, scale=scale, return_lse=True
    )
    assert_close_to_oracle(out, o_twin, naive, what="kernel out vs fp32 twin")
    assert_close_to_oracle(lse, lse_twin, what="kernel lse vs fp32 twin")
    return (out.float() - o_ref).abs().max().item(), (o_naive.float() - o_ref).abs().max().item()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("D", [16, 40, 64])
def test_kernel_vs_oracle_dtypes_head_dims(dtype, D):
    # ragged on both sides (97 = 6*16 + 1, 113 = 7*16 + 1), Nq != Nk, transpose views of [B, N, H, D]
    q, k, v = _qkv(1, 2, 97, 113, D, dtype)
    _check(q, k, v, _random_mask(1, 2, 97, 113, 16, p=0.4))


def test_kernel_head_dim_128():
    q, k, v = _qkv(1, 1, 64, 80, 128, torch.float16)
    _check(q, k, v, _random_mask(1, 1, 64, 80, 16, p=0.6))


@pytest.mark.parametrize("bs", [(32, 32), (16, 32), (32, 16)], ids=lambda b: f"bq{b[0]}-bk{b[1]}")
def test_kernel_block_sizes(bs):
    q, k, v = _qkv(1, 2, 113, 97, 32, torch.float16)
    _check(q, k, v, _random_mask(1, 2, 113, 97, bs, p=0.5))


@pytest.mark.parametrize(
    "nq,nk,bs,dtype",
    [(200, 200, 32, torch.float16), (1023, 1023, 128, torch.float32), (1023, 200, 64, torch.bfloat16)],
    ids=["200-b32-fp16", "1023-b128-fp32", "1023x200-b64-bf16"],
)
def test_kernel_issue_lengths(nq, nk, bs, dtype):
    # the issue's ugly lengths at block sizes 32/64/128 (GPU defaults), batch 2 with per-batch masks
    q, k, v = _qkv(2, 2, nq, nk, 32, dtype)
    _check(q, k, v, _random_mask(2, 2, nq, nk, bs, p=0.5))


@pytest.mark.parametrize("D", [1, 8, 24])
def test_kernel_small_and_odd_head_dims(D):
    q, k, v = _qkv(1, 1, 40, 40, D, torch.float32, layout="bhnd")
    _check(q, k, v, _random_mask(1, 1, 40, 40, 16))


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 50), (50, 1), (16, 16), (17, 33)])
def test_kernel_tiny_lengths(nq, nk):
    q, k, v = _qkv(1, 1, nq, nk, 16, torch.float16)
    _check(q, k, v, _random_mask(1, 1, nq, nk, 16, p=1.0))


def test_kernel_batch_shared_mask_and_per_batch_masks():
    q, k, v = _qkv(2, 2, 50, 70, 16, torch.float16)
    _check(q, k, v, _random_mask(1, 2, 50, 70, 16))  # Bm = 1: batch stride 0
    per_batch = _random_mask(2, 2, 50, 70, 16, p=0.3)
    assert not torch.equal(per_batch.to_dense()[0], per_batch.to_dense()[1])
    _check(q, k, v, per_batch)  # Bm = B


def test_kernel_heads_with_different_densities_one_launch():
    Nq = Nk = 96
    qb = kb = 6
    full = torch.ones(1, 1, qb, kb, dtype=torch.bool)
    diag = torch.eye(qb, dtype=torch.bool).view(1, 1, qb, kb)
    first_col = torch.zeros(1, 1, qb, kb, dtype=torch.bool)
    first_col[..., 0] = True
    mask = BlockSparseMask.from_dense(torch.cat([full, diag, first_col], 1), 16, (Nq, Nk)).to(DEV)
    dens = mask.density_per_head()[0].tolist()
    assert dens[0] == 1.0 and dens[1] < 0.2
    q, k, v = _qkv(1, 3, Nq, Nk, 16, torch.bfloat16)
    _check(q, k, v, mask)


def test_kernel_empty_rows_and_empty_mask():
    Nq, Nk = 70, 50
    bb = torch.rand(1, 2, 5, 4) < 0.5
    bb[0, 0, 1] = False  # an empty query block in head 0
    bb[0, 1] = False  # head 1 attends to nothing
    bb[0, 0, 0, 0] = True
    mask = BlockSparseMask.from_dense(bb, 16, (Nq, Nk)).to(DEV)
    for dtype in (torch.float32, torch.float16):
        q, k, v = _qkv(1, 2, Nq, Nk, 16, dtype)
        out, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="triton")
        assert not torch.isnan(out).any() and not torch.isnan(lse).any()
        assert torch.equal(out[0, 0, 16:32], torch.zeros_like(out[0, 0, 16:32]))
        assert torch.equal(out[0, 1], torch.zeros_like(out[0, 1]))
        assert torch.isneginf(lse[0, 0, 16:32]).all() and torch.isneginf(lse[0, 1]).all()
        assert torch.isfinite(lse[0, 0, :16]).all()
        _check(q, k, v, mask)
    empty = BlockSparseMask.from_dense(torch.zeros(2, 2, 5, 4, dtype=torch.bool), 16, (Nq, Nk)).to(DEV)
    q, k, v = _qkv(2, 2, Nq, Nk, 16, torch.bfloat16)
    out, lse = block_sparse_attention(q, k, v, empty, return_lse=True, backend="triton")
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_kernel_full_density_equals_sdpa():
    q, k, v = _qkv(1, 2, 97, 97, 32, torch.float32)
    mask = BlockSparseMask.full(1, 2, 16, (97, 97), device=DEV)
    out = block_sparse_attention(q, k, v, mask, backend="triton")
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_kernel_non_contiguous_inputs_and_custom_scale():
    B, H, N, D = 1, 2, 64, 32
    # q: transpose view; k: every other element of a wider head dim (stride_d = 2); v: plain contiguous
    q = torch.randn(B, N, H, D, dtype=torch.float16, device=DEV).transpose(1, 2)
    k = torch.randn(B, H, N, 2 * D, dtype=torch.float16, device=DEV)[..., ::2]
    v = torch.randn(B, H, N, D, dtype=torch.float16, device=DEV)
    assert not q.is_contiguous() and k.stride(-1) == 2
    mask = _random_mask(1, H, N, N, 16)
    _check(q, k, v, mask, scale=0.3)
    out = block_sparse_attention(q, k, v, mask, backend="triton")
    assert out.stride() == q.stride()  # out is [B, N, H, D] memory seen as [B, H, N, D], like q


def test_kernel_ignores_padding_entries_past_count():
    # entries past kv_counts may hold anything valid-looking; the kernel must never read them
    idx = torch.tensor([[[[1, 0, 0], [0, 2, 0]]]], dtype=torch.int32)
    cnt = torch.tensor([[[1, 2]]], dtype=torch.int32)
    mask = BlockSparseMask.from_kv_indices(idx, cnt, 16, (32, 40)).to(DEV)
    q, k, v = _qkv(1, 1, 32, 40, 16, torch.float32)
    _check(q, k, v, mask)


def test_kernel_rejects_unsupported_block_sizes_and_head_dims():
    from sparsediff.kernels.launch import not_supported_reasons

    q = torch.empty(1, 1, 48, 64)
    assert not_supported_reasons(q, (16, 64)) == []
    assert not_supported_reasons(q, (24, 16)) == ["block_q=24 is not a power of two >= 16"]
    assert not_supported_reasons(q, (16, 8)) == ["block_kv=8 is not a power of two >= 16"]
    assert "head dim 320 > 256" in not_supported_reasons(torch.empty(1, 1, 4, 320), (16, 16))
    mask = BlockSparseMask.full(1, 1, (24, 16), (48, 48), device=DEV)
    q, k, v = _qkv(1, 1, 48, 48, 16, torch.float16)
    with pytest.raises(RuntimeError, match="block_q=24 is not a power of two >= 16"):
        block_sparse_attention(q, k, v, mask, backend="triton")
    # auto falls back to the twin for what the kernel cannot run
    out = block_sparse_attention(q, k, v, mask, backend="auto")
    ref, _ = attention_ref(q, k, v)
    assert_close_to_oracle(out, ref, attention_ref(q, k, v, upcast=False)[0])


def test_kernel_launch_config_defaults():
    from sparsediff.kernels.block_sparse_attn import _SMEM_BUDGET, LaunchConfig, _smem_bytes, launch_config

    # (num_warps, num_stages, tile_q, tile_kv): a 128-token mask block runs as 64-key steps, 8 warps
    # only for 128-row query tiles; compiled spill-free for sm_80 / sm_90 (tests/test_kernel_inspect.py)
    assert launch_config(64, 64, 64) == LaunchConfig(4, 3, 64, 64)
    assert launch_config(128, 128, 64) == LaunchConfig(8, 3, 128, 64)
    assert launch_config(64, 64, 128) == LaunchConfig(4, 2, 64, 64)
    assert launch_config(128, 128, 128) == LaunchConfig(8, 3, 128, 64)
    assert launch_config(128, 128, 128, elem_bytes=4) == LaunchConfig(8, 1, 128, 64)  # fp32 tiles: one stage
    assert launch_config(128, 128, 256) == LaunchConfig(4, 2, 64, 32)
    assert launch_config(16, 32, 16) == LaunchConfig(4, 3, 16, 32)  # small blocks: tile = block
    assert launch_config(128, 128, 128, smem_budget=99 * 1024) == LaunchConfig(8, 2, 128, 64)  # sm_86 / sm_89
    for bq in (16, 32, 64, 128, 256):
        for bk in (16, 64, 128, 256):
            for bd in (16, 64, 128, 256):
                for eb in (2, 4):
                    w, s, tq, tk = launch_config(bq, bk, bd, eb)
                    assert w in (4, 8) and 1 <= s <= 3
                    assert bq % tq == 0 and bk % tk == 0 and 16 <= tq <= 128 and 16 <= tk <= 64
                    assert w == 4 or tq == 128  # 8 warps only for 128-row tiles
                    assert s == 1 or _smem_bytes(tq, tk, bd, eb, s) <= _SMEM_BUDGET


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("tiles", [(16, 16), (32, 16), (16, 32)], ids=lambda t: f"tq{t[0]}-tk{t[1]}")
def test_kernel_tiles_smaller_than_mask_blocks(dtype, tiles):
    # the GPU configs split mask blocks into kernel tiles (block 128 -> 64-key steps, several query tiles
    # per block); the same split at small sizes: 32 x 32 mask blocks, ragged ends, per-batch masks
    from sparsediff.kernels.block_sparse_attn import block_sparse_attention_fwd

    Nq, Nk, bs = 75, 90, 32
    q, k, v = _qkv(2, 2, Nq, Nk, 32, dtype)
    bb = torch.rand(2, 2, _cdiv(Nq, bs), _cdiv(Nk, bs)) < 0.5
    bb[..., 0] = True
    bb[1, 0, 1] = False  # an empty query block: zeros and lse = -inf in every query tile of it
    mask = BlockSparseMask.from_dense(bb, bs, (Nq, Nk)).to(DEV)
    tq, tk = tiles
    out, lse = block_sparse_attention_fwd(
        q,
        k,
        v,
        mask.kv_indices,
        mask.kv_counts,
        block_q=bs,
        block_kv=bs,
        scale=32**-0.5,
        tile_q=tq,
        tile_kv=tk,
    )
    tok = mask.to_token_mask()
    o_ref, lse_ref = attention_ref(q, k, v, tok)
    assert_close_to_oracle(out, o_ref, attention_ref(q, k, v, tok, upcast=False)[0], what="split tiles out")
    assert_close_to_oracle(lse, lse_ref, what="split tiles lse")
    assert (
        torch.equal(out[1, 0, 32:64], torch.zeros_like(out[1, 0, 32:64]))
        and torch.isneginf(lse[1, 0, 32:64]).all()
    )
    # the default tiles (here = the blocks) give the same result up to summation order
    out_default, _ = block_sparse_attention_fwd(
        q, k, v, mask.kv_indices, mask.kv_counts, block_q=bs, block_kv=bs, scale=32**-0.5
    )
    torch.testing.assert_close(out, out_default, atol=2e-2, rtol=0)


def test_kernel_rejects_bad_tile_overrides():
    from sparsediff.kernels.block_sparse_attn import block_sparse_attention_fwd

    q, k, v = _qkv(1, 1, 40, 40, 16, torch.float16)
    mask = _random_mask(1, 1, 40, 40, 32)
    for bad in (dict(tile_q=64), dict(tile_kv=24), dict(tile_kv=8)):
        with pytest.raises(ValueError, match="must be a power of two >= 16 and <= the block"):
            block_sparse_attention_fwd(
                q, k, v, mask.kv_indices, mask.kv_counts, block_q=32, block_kv=32, scale=0.25, **bad
            )


# ---------------------------------------------------------------- block mass from a cached lse
@pytest.mark.parametrize(
    "dtype,D,bs",
    [(torch.float32, 16, (16, 16)), (torch.float16, 40, (16, 32)), (torch.bfloat16, 32, (32, 16))],
)
def test_block_mass_kernel_vs_twin(dtype, D, bs):
    from sparsediff.block_mass import block_mass, block_mass_reference

    Nq, Nk = 70, 53  # ragged on both sides
    q, k, v = _qkv(2, 2, Nq, Nk, D, dtype)
    bq, bk = bs
    mask = _random_mask(1, 2, Nq, Nk, bs, p=0.6)
    _, lse = block_sparse_attention(q, k, v, mask, return_lse=True, backend="reference")
    lse[0, 1, 5:9] = float("-inf")  # rows that attended nothing contribute 0
    got = block_mass(q, k, lse, block_q=bq, block_kv=bk, backend="triton")
    ref = block_mass_reference(q, k, lse, block_q=bq, block_kv=bk)
    assert got.shape == (2, 2, _cdiv(Nq, bq), _cdiv(Nk, bk)) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
    # with the lse of the same mask, the mass inside the mask sums to the number of rows with finite lse
    qb = _cdiv(Nq, bq)
    finite_rows = torch.nn.functional.pad(torch.isfinite(lse).float(), (0, qb * bq - Nq)).view(2, 2, qb, bq)
    inside = (ref * mask.to_dense().float()).sum(-1)
    torch.testing.assert_close(inside, finite_rows.sum(-1), atol=1e-4, rtol=1e-4)


def test_block_mass_kernel_splits_128_blocks_into_key_tiles():
    # block 128 runs as two 64-key steps per key block (launch_config); ragged last block (200 = 128 + 72)
    from sparsediff.kernels.block_sparse_attn import launch_config

    from sparsediff.block_mass import block_mass, block_mass_reference

    assert launch_config(128, 128, 32).tile_kv == 64
    q, k, v = _qkv(1, 2, 200, 200, 32, torch.float16)
    _, lse = attention_ref(q, k, v)
    got = block_mass(q, k, lse, block_q=128, block_kv=128, backend="triton")
    ref = block_mass_reference(q, k, lse, block_q=128, block_kv=128)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.sum(-1), torch.tensor([128.0, 72.0]).expand(1, 2, 2), atol=1e-3, rtol=1e-4)


def test_block_mass_dense_lse_rows_sum_to_one():
    from sparsediff.block_mass import block_mass

    q, k, v = _qkv(1, 1, 33, 47, 16, torch.float32)
    _, lse = attention_ref(q, k, v)
    got = block_mass(q, k, lse, block_q=16, block_kv=16, backend="triton")
    torch.testing.assert_close(got.sum(-1), torch.tensor([[[16.0, 16.0, 1.0]]]), atol=1e-4, rtol=1e-5)


def test_autotune_is_explicit_and_cached(monkeypatch):
    from sparsediff.kernels import block_sparse_attn as mod

    assert mod._TUNED == {} or DEV == "cuda"  # nothing tunes unless asked
    q, k, v = _qkv(1, 1, 32, 32, 16, torch.float16)
    mask = _random_mask(1, 1, 32, 32, 16)
    args = (q, k, v, mask.kv_indices, mask.kv_counts)
    if DEV == "cpu":
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            mod.tune_launch_config(*args, block_q=16, block_kv=16, scale=0.25)
        # a cached config is picked up by later launches (the interpreter ignores warps/stages)
        monkeypatch.setitem(mod._TUNED, mod._config_key(q, 16, 16), mod.LaunchConfig(8, 1, 16, 16))
    else:
        cfg = mod.tune_launch_config(*args, block_q=16, block_kv=16, scale=0.25)
        assert mod.tune_launch_config(*args, block_q=16, block_kv=16, scale=0.25) == cfg
    _check(q, k, v, mask)
