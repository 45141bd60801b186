"""Cached-LSE selection: the LSE identity against SDPA, refresh schedule on drifting q/k, seeding."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F
from tolerance import rel_error

from sparsediff.attention import LayerState, sparse_attention
from sparsediff.block_mass import block_mass
from sparsediff.layout import TokenLayout
from sparsediff.mask import BlockSparseMask
from sparsediff.ops import block_sparse_attention
from sparsediff.reference import attention_ref
from sparsediff.specs import HeadSpec
from sparsediff.testing import drift, planted_qkv


def _block_sum(p, bq, bk):
    """[B, H, Nq, Nk] -> [B, H, Qb, Kb] sums over (ragged) blocks."""
    B, H, nq, nk = p.shape
    qb, kb = -(-nq // bq), -(-nk // bk)
    p = F.pad(p, (0, kb * bk - nk, 0, qb * bq - nq))
    return p.view(B, H, qb, bq, kb, bk).sum((3, 5))


@pytest.mark.parametrize("nq,nk,bq,bk", [(97, 113, 16, 32), (64, 64, 16, 16), (50, 31, 32, 16)])
def test_lse_identity_against_sdpa(nq, nk, bq, bk):
    """mass from the op's LSE == block sums of the exact softmax, taken from SDPA with V = identity."""
    g = torch.Generator().manual_seed(0)
    B, H, D = 2, 3, 16
    q = torch.randn(B, H, nq, D, generator=g)
    k = torch.randn(B, H, nk, D, generator=g)
    v = torch.randn(B, H, nk, D, generator=g)
    full = BlockSparseMask.full(1, H, (bq, bk), (nq, nk))
    _, lse = block_sparse_attention(q, k, v, full, return_lse=True, backend="reference")
    probs = F.scaled_dot_product_attention(q, k, torch.eye(nk).expand(B, H, nk, nk))  # softmax rows exactly
    torch.testing.assert_close(
        lse, torch.logsumexp((q @ k.transpose(-1, -2)) * D**-0.5, -1), atol=1e-5, rtol=0
    )
    mass = block_mass(q, k, lse, block_q=bq, block_kv=bk, backend="reference")
    torch.testing.assert_close(mass, _block_sum(probs, bq, bk), atol=1e-5, rtol=1e-5)
    rows = torch.full((mass.shape[2],), float(bq))
    rows[-1] = nq - bq * (mass.shape[2] - 1)
    torch.testing.assert_close(mass.sum(-1), rows.expand_as(mass.sum(-1)), atol=1e-4, rtol=0)
    if importlib.util.find_spec("triton") is not None and nq <= 64:
        from sparsediff.ops import triton_reasons

        if not triton_reasons(q):  # the kernel (interpreter on CPU) against its twin
            mk = block_mass(q, k, lse, block_q=bq, block_kv=bk, backend="triton")
            torch.testing.assert_close(mk, mass, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tile_elems", [1 << 20, 1])
def test_block_mass_twin_chunks_and_ragged_blocks_against_float64(monkeypatch, tile_elems):
    """The twin works one head and one chunk of query blocks at a time; with 1-element tiles every chunk is
    one query block. Ragged query and key blocks, rows with lse = -inf (exactly 0), strided inputs and a
    non-default scale against the float64 block sums of exp(q.k * scale - lse)."""
    import sparsediff.block_mass as bm

    monkeypatch.setattr(bm, "_TILE_ELEMS", tile_elems)
    g = torch.Generator().manual_seed(1)
    B, H, nq, nk, D, bq, bk, scale = 2, 3, 150, 77, 8, 32, 16, 0.3
    q = torch.randn(B, nq, H, D, generator=g).transpose(1, 2)  # diffusers' layout, seen as [B, H, N, D]
    k = torch.randn(B, nk, H, D, generator=g).transpose(1, 2)
    lse = torch.logsumexp((q @ k.transpose(-1, -2)) * scale, -1) + 0.1 * torch.randn(B, H, nq, generator=g)
    lse[1, 2, 32:70] = -math.inf  # query block 1 (32..63) whole, and part of block 2
    got = bm.block_mass_reference(q, k, lse, block_q=bq, block_kv=bk, scale=scale)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale - lse.double()[..., None]
    want = _block_sum(torch.where(torch.isinf(lse)[..., None], 0.0, s.exp()), bq, bk).float()
    assert got.shape == want.shape == (B, H, 5, 5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1, 2, 1], torch.zeros(5))  # no row of query block 1 has an lse ...
    assert got[1, 2, 2].sum() > 0  # ... block 2 (64..95) still has rows 70..95


def test_lse_cache_refresh_schedule_on_drifting_inputs():
    """Refresh every 3 steps on slowly drifting planted q/k: the reused masks keep the true attention
    recall near the target and the error small; indices reused between refreshes; LSE cache refreshed."""
    layout = TokenLayout.video(4, 8, 8, text_len=6, text_position="before")
    base = planted_qkv(layout, ["local", "temporal", "stripe", "cluster"], head_dim=32, seed=3)
    recall = 0.99
    specs = [HeadSpec.make("lse_cache", recall=recall, refresh=3)] * 4
    st = LayerState()
    masks, table = {}, []
    for step in range(8):
        q, k = drift(base.q, step, 0.01, seed=11), drift(base.k, step, 0.01, seed=12)
        v = base.v
        out = sparse_attention(
            q, k, v, layout, specs, st, step=step, force_dense=step == 0, block_size=16, backend="reference"
        )
        ref, lse = attention_ref(q, k, v)
        masks[step] = next(iter(st.indices.values()))[0] if st.indices else None
        err = rel_error(out, ref)
        if step == 0:
            assert err < 1e-5
            continue
        p = torch.exp((q @ k.transpose(-1, -2)) * 32**-0.5 - lse.unsqueeze(-1))
        achieved = (p * st.last_mask.to_token_mask()).sum(-1).mean().item()  # true recall of the mask
        table.append((step, round(achieved, 4), round(err, 4), round(st.last_mask.density(), 3)))
        assert achieved >= recall - 0.02, table
        assert err < 0.15, table
        assert st.last_mask.density() < 0.75  # tiny grid: 17 blocks, text rows dense
        if step in (1, 4, 7):  # refresh steps: the cached-LSE recall of the new indices meets the target
            assert (st.last_recall[next(iter(st.last_recall))] >= recall - 1e-6).all()
        # the cached LSE is the op's LSE of this step: true LSE + log(row recall) <= true LSE, close on average
        assert (st.lse <= lse + 1e-4).all() and (lse - st.lse).mean() < -math.log(recall - 0.02)
    assert masks[2] is masks[1] and masks[3] is masks[1]  # reused until the next refresh
    assert masks[4] is not masks[3] and masks[5] is masks[4]
    print("step, true recall, rel err, density:", table)


def test_lse_cache_first_sparse_call_without_lse_is_dense():
    layout = TokenLayout.video(2, 8, 8)
    base = planted_qkv(layout, ["local"], head_dim=16, seed=0)
    st = LayerState()
    spec = [HeadSpec.make("lse_cache")]
    out = sparse_attention(
        base.q, base.k, base.v, layout, spec, st, step=3, block_size=16, backend="reference"
    )
    ref, lse = attention_ref(base.q, base.k, base.v)
    assert rel_error(out, ref) < 1e-5 and st.lse is not None
    torch.testing.assert_close(st.lse, lse, atol=1e-5, rtol=0)
    sparse_attention(base.q, base.k, base.v, layout, spec, st, step=4, block_size=16, backend="reference")
    assert st.indices and st.last_mask.density() < 1.0  # next call refreshes from that LSE
