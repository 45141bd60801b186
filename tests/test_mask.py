"""BlockSparseMask: constructors, validation (one test per invariant), density, algebra, printing, Flex."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from sparsediff import BlockSparseMask
from sparsediff.reference import attention_ref


def _cdiv(a, b):
    return -(-a // b)


def _random_block_bool(bm, h, nq, nk, bs, p=0.5, gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    return torch.rand(bm, h, _cdiv(nq, bq), _cdiv(nk, bk), generator=g) < p


# ---------------------------------------------------------------- construction / round trips
@pytest.mark.parametrize(
    "nq,nk,bs", [(64, 64, 16), (97, 113, 16), (1, 1, 16), (200, 50, (32, 16)), (1023, 97, (64, 32))]
)
def test_from_dense_to_dense_round_trip(nq, nk, bs):
    bb = _random_block_bool(2, 3, nq, nk, bs)
    m = BlockSparseMask.from_dense(bb, bs, (nq, nk))
    assert m.kv_indices.dtype == torch.int32 and m.kv_counts.dtype == torch.int32
    assert torch.equal(m.to_dense(), bb)
    assert torch.equal(m.kv_counts, bb.sum(-1).to(torch.int32))
    # listed indices are strictly increasing and padding is 0
    valid = torch.arange(m.kv_indices.shape[-1]) < m.kv_counts.unsqueeze(-1)
    assert torch.equal(m.kv_indices[~valid], torch.zeros_like(m.kv_indices[~valid]))
    m2 = BlockSparseMask.from_kv_indices(m.kv_indices, m.kv_counts, bs, (nq, nk))
    assert torch.equal(m2.to_dense(), bb)


def test_from_kv_indices_explicit_lists():
    # 3 query blocks, 4 key blocks, per-row lists of different lengths; padding can be anything past count
    idx = torch.tensor([[[[0, 2, 3], [1, 0, 0], [0, 0, 0]]]])
    cnt = torch.tensor([[[3, 1, 0]]])
    m = BlockSparseMask.from_kv_indices(idx, cnt, 16, (40, 60))
    expect = torch.tensor([[[[1, 0, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]]]], dtype=torch.bool)
    assert torch.equal(m.to_dense(), expect)
    assert m.kv_indices.dtype == torch.int32 and m.num_computed_blocks() == 4
    assert m.memory_bytes() == (9 + 3) * 4


def test_full_mask():
    m = BlockSparseMask.full(2, 3, 16, (97, 113))
    assert m.to_dense().all() and m.density() == 1.0
    assert m.shape == (2, 3, 97, 113)
    assert (m.num_q_blocks, m.num_kv_blocks) == (7, 8)
    assert m.to_token_mask().all()


def test_to_token_mask_ragged_blocks():
    bb = _random_block_bool(1, 2, 50, 37, (16, 8))
    m = BlockSparseMask.from_dense(bb, (16, 8), (50, 37))
    tok = m.to_token_mask()
    assert tok.shape == (1, 2, 50, 37)
    for qi in (0, 15, 16, 49):
        for ki in (0, 7, 8, 36):
            assert bool(tok[0, 1, qi, ki]) == bool(bb[0, 1, qi // 16, ki // 8])


def test_all_empty_mask():
    m = BlockSparseMask.from_dense(torch.zeros(1, 2, 3, 4, dtype=torch.bool), 16, (48, 64))
    assert m.density() == 0.0 and m.num_computed_blocks() == 0
    assert m.kv_indices.shape[-1] == 1  # Kmax is at least 1
    assert not m.to_token_mask().any()


# ---------------------------------------------------------------- validation: one test per invariant
def _good():
    return torch.tensor([[[[0, 1], [1, 0]]]], dtype=torch.int32), torch.tensor([[[2, 1]]], dtype=torch.int32)


def test_valid_minimal_mask_constructs():
    idx, cnt = _good()
    BlockSparseMask(idx, cnt, 16, (32, 32))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda i, c: (i[0], c), "kv_indices must be 4-D"),
        (lambda i, c: (i, c[0]), "kv_counts must be 3-D"),
        (lambda i, c: (i, c[:, :, :1]), "leading shape"),
        (lambda i, c: (i.long(), c), "must be int32"),
        (lambda i, c: (i, c.float()), "must be int32"),
        (lambda i, c: (i, c - 3), "kv_counts must lie in"),
        (lambda i, c: (i, c + 1), "kv_counts must lie in"),
        (lambda i, c: (i + 5, c), r"kv_indices must lie in \[0, Kb=2\)"),
        (lambda i, c: (i - 1, c), r"kv_indices must lie in \[0, Kb=2\)"),
        (lambda i, c: (i.flip(-1).contiguous(), c), "strictly increasing"),
        (lambda i, c: (torch.zeros_like(i), c), "strictly increasing"),
    ],
    ids=[
        "idx-3d",
        "cnt-2d",
        "leading-mismatch",
        "idx-int64",
        "cnt-float",
        "count-negative",
        "count-too-large",
        "index-too-large",
        "index-negative",
        "decreasing",
        "repeated",
    ],
)
def test_validation_errors(make, match):
    idx, cnt = make(*_good())
    with pytest.raises((ValueError, TypeError), match=match):
        BlockSparseMask(idx, cnt, 16, (32, 32))


def test_validation_wrong_query_block_count():
    idx, cnt = _good()
    with pytest.raises(
        ValueError, match=r"mask has 2 query blocks but Nq=64 with bq=16 needs ceil\(Nq/bq\)=4"
    ):
        BlockSparseMask(idx, cnt, 16, (64, 32))


def test_validation_index_beyond_ragged_seq_len():
    # Nk=17 with bk=16 gives Kb=2 -> index 2 is out of range
    idx = torch.tensor([[[[0, 2]]]], dtype=torch.int32)
    cnt = torch.tensor([[[2]]], dtype=torch.int32)
    with pytest.raises(ValueError, match="Nk=17"):
        BlockSparseMask(idx, cnt, 16, (16, 17))


def test_validation_block_size_and_seq_lens():
    idx, cnt = _good()
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseMask(idx, cnt, (16, 16, 16), (32, 32))
    with pytest.raises(ValueError, match=r"block_size\[0\] must be >= 1"):
        BlockSparseMask(idx, cnt, (0, 16), (32, 32))
    with pytest.raises(ValueError, match="seq_lens must be non-negative"):
        BlockSparseMask(idx, cnt, 16, (-1, 32))
    with pytest.raises(TypeError, match="torch.Tensors"):
        BlockSparseMask(idx.tolist(), cnt, 16, (32, 32))


def test_from_dense_validation():
    with pytest.raises(ValueError, match="block_bool must be 4-D"):
        BlockSparseMask.from_dense(torch.ones(2, 2, dtype=torch.bool), 16, (32, 32))
    with pytest.raises(ValueError, match=r"needs \(Qb, Kb\)=\(2, 3\)"):
        BlockSparseMask.from_dense(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16, (32, 40))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        BlockSparseMask.from_dense([[True]], 16, (16, 16))


def test_mismatched_masks_in_algebra():
    a = BlockSparseMask.full(1, 1, 16, (32, 32))
    with pytest.raises(ValueError, match="masks differ"):
        a | BlockSparseMask.full(1, 1, 16, (32, 48))
    with pytest.raises(ValueError, match="masks differ"):
        a & BlockSparseMask.full(1, 1, (16, 32), (32, 32))
    with pytest.raises(ValueError, match="masks differ"):
        BlockSparseMask.cat_heads([a, BlockSparseMask.full(1, 1, 32, (32, 32))])


# ---------------------------------------------------------------- density
@pytest.mark.parametrize("nq,nk,bs", [(97, 113, 16), (50, 37, (16, 8)), (1, 200, 32), (64, 64, 16)])
def test_density_counts_ragged_blocks_exactly(nq, nk, bs):
    m = BlockSparseMask.from_dense(_random_block_bool(2, 3, nq, nk, bs, p=0.4), bs, (nq, nk))
    tok = m.to_token_mask().double()
    torch.testing.assert_close(m.density_per_head(), tok.mean((-1, -2)), rtol=0, atol=1e-12)
    assert math.isclose(m.density(), float(tok.mean()), abs_tol=1e-12)


def test_density_zero_length():
    m = BlockSparseMask.from_dense(torch.zeros(1, 2, 0, 1, dtype=torch.bool), 16, (0, 5))
    assert m.density() == 0.0
    assert m.density_per_head().shape == (1, 2)


# ---------------------------------------------------------------- slicing and algebra
def test_slicing_keeps_dims():
    bb = _random_block_bool(2, 4, 64, 64, 16)
    m = BlockSparseMask.from_dense(bb, 16, (64, 64))
    assert torch.equal(m[1].to_dense(), bb[1:2])
    assert torch.equal(m[:, 1:3].to_dense(), bb[:, 1:3])
    assert torch.equal(m[0, [1, 3]].to_dense(), bb[0:1][:, [1, 3]])
    assert torch.equal(m[1, 2].to_dense(), bb[1:2, 2:3])
    assert m[0, 1].shape == (1, 1, 64, 64)
    with pytest.raises(IndexError, match="batch, head"):
        m[0, 0, 0]


def test_union_intersection_broadcast():
    a = _random_block_bool(1, 2, 97, 97, 16, gen_seed=1)
    b = _random_block_bool(2, 2, 97, 97, 16, gen_seed=2)
    ma = BlockSparseMask.from_dense(a, 16, (97, 97))
    mb = BlockSparseMask.from_dense(b, 16, (97, 97))
    assert torch.equal((ma | mb).to_dense(), a | b)
    assert torch.equal((ma & mb).to_dense(), a & b)
    assert torch.equal(ma.union(mb).to_dense(), ma.intersection(mb).to_dense() | (a ^ b) | (a & b))


def test_cat_heads_and_expand_batch():
    a = _random_block_bool(1, 2, 64, 80, 16, gen_seed=3)
    b = _random_block_bool(2, 1, 64, 80, 16, p=0.9, gen_seed=4)
    m = BlockSparseMask.cat_heads(
        [BlockSparseMask.from_dense(a, 16, (64, 80)), BlockSparseMask.from_dense(b, 16, (64, 80))]
    )
    assert m.shape == (2, 3, 64, 80)
    assert torch.equal(m.to_dense(), torch.cat([a.expand(2, -1, -1, -1), b], 1))
    # re-validate: padding to a common Kmax must keep the format valid
    BlockSparseMask(m.kv_indices, m.kv_counts, m.block_size, m.seq_lens)
    e = BlockSparseMask.from_dense(a, 16, (64, 80)).expand_batch(3)
    assert e.batch == 3 and torch.equal(e.to_dense(), a.expand(3, -1, -1, -1))
    assert m.expand_batch(2) is m
    with pytest.raises(ValueError, match="cannot expand"):
        m.expand_batch(4)
    with pytest.raises(ValueError, match="at least one"):
        BlockSparseMask.cat_heads([])
    c3 = BlockSparseMask.from_dense(_random_block_bool(3, 1, 64, 80, 16), 16, (64, 80))
    with pytest.raises(ValueError, match="batch 2 and 3"):
        BlockSparseMask.cat_heads([m, c3])


# ---------------------------------------------------------------- printing
def test_repr_and_to_string():
    bb = torch.zeros(1, 2, 3, 4, dtype=torch.bool)
    bb[0, 0, 0, 0] = bb[0, 0, 2, 3] = True
    bb[0, 1] = True
    m = BlockSparseMask.from_dense(bb, 16, (48, 64))
    r = repr(m)
    for part in (
        "B=1",
        "H=2",
        "Nq=48",
        "Nk=64",
        "block_size=(16, 16)",
        "blocks=(3x4)",
        "density=58.33%",
        "cpu",
    ):
        assert part in r, (part, r)
    s = m.to_string()
    lines = s.splitlines()
    assert lines[0] == r
    assert "[batch 0, head 0] density=0.167" in s and "[batch 0, head 1] density=1.000" in s
    assert lines[2:5] == ["#...", "....", "...#"]
    assert lines[6:9] == ["####"] * 3
    big = BlockSparseMask.full(1, 1, 16, (16 * 10, 16 * 10))
    assert "(showing 4x4 of 10x10 blocks)" in big.to_string(max_blocks=4)


# ---------------------------------------------------------------- FlexAttention cross-check
def bm_flex_dense(m):
    """Block table of the Flex BlockMask (partial | full blocks), cropped to our (Qb, Kb)."""
    return m.to_flex_block_mask().to_dense()[..., : m.num_q_blocks, : m.num_kv_blocks].bool()


@pytest.mark.parametrize("bm,nq,nk", [(1, 50, 60), (2, 64, 64), (2, 33, 97)])
def test_to_flex_block_mask_matches_oracle(bm, nq, nk):
    fa = pytest.importorskip("torch.nn.attention.flex_attention")
    bs = 16
    bb = _random_block_bool(bm, 2, nq, nk, bs, p=0.5, gen_seed=5)
    bb[0, 0, 1] = True  # keep at least one full row
    m = BlockSparseMask.from_dense(bb, bs, (nq, nk))
    q, k, v = torch.randn(2, 2, nq, 16), torch.randn(2, 2, nk, 16), torch.randn(2, 2, nk, 16)
    with (
        warnings.catch_warnings()
    ):  # a failing conversion or flex call fails the test (torch >= 2.5 runs it on CPU)
        warnings.simplefilter("ignore")
        out = fa.flex_attention(q, k, v, block_mask=m.to_flex_block_mask())
    ref, lse = attention_ref(q, k, v, m.to_token_mask())
    rows = ~torch.isinf(lse)  # flex_attention's convention for fully masked rows is not ours; compare others
    assert rows.any()
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    flex_table = bm_flex_dense(m)
    assert torch.equal(flex_table, m.to_dense().expand_as(flex_table))
    with pytest.raises(ValueError, match="equal q/k block sizes"):
        BlockSparseMask.full(1, 1, (16, 32), (64, 64)).to_flex_block_mask()


def test_mask_negative_index_selects_last():
    m = BlockSparseMask.full(2, 3, 16, (40, 40))
    assert m[-1].batch == 1 and m[0, -1].heads == 1


def test_mask_out_of_range_index_raises():
    m = BlockSparseMask.full(2, 3, 16, (40, 40))
    with pytest.raises(IndexError):
        m[5]


def test_union_mismatched_batch_is_a_clear_error():
    a, b = BlockSparseMask.full(2, 1, 16, (40, 40)), BlockSparseMask.full(3, 1, 16, (40, 40))
    with pytest.raises(ValueError, match="batch"):
        a | b
