"""Regressions found in review. Each xfail(strict=True) marks a real bug; remove the mark with the fix."""

from __future__ import annotations

import pytest
import torch

import sparsediff
from sparsediff import BlockSparseMask
from sparsediff.attention import MaskCache, sparse_attention
from sparsediff.block_mass import block_mass, block_mass_reference
from sparsediff.layout import TokenLayout
from sparsediff.ops import triton_reasons
from sparsediff.specs import HeadSpec


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


def test_mask_negative_index_selects_last():
    m = BlockSparseMask.full(2, 3, 16, (40, 40))
    assert m[-1].batch == 1 and m[0, -1].heads == 1


def test_mask_out_of_range_index_raises():
    m = BlockSparseMask.full(2, 3, 16, (40, 40))
    with pytest.raises(IndexError):
        m[5]


def test_block_mass_auto_falls_back_for_unsupported_block_size():
    q, k = torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 16)
    if triton_reasons(q):
        pytest.skip("Triton cannot run here at all; auto goes to the twin anyway")
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, -1)
    got = block_mass(q, k, lse, block_q=24, block_kv=24, scale=0.25)
    torch.testing.assert_close(got, block_mass_reference(q, k, lse, block_q=24, block_kv=24, scale=0.25))


def test_cached_static_call_builds_no_per_call_tensors(monkeypatch):
    layout = TokenLayout.video(2, 4, 6, text_len=5)
    n = layout.num_tokens
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    specs = [HeadSpec.make("radial"), HeadSpec.make("tile")]
    cache = MaskCache()
    sparse_attention(q, k, v, layout, specs, None, block_size=16, cache=cache, backend="reference")
    calls = []
    orig = TokenLayout.dense_mask
    monkeypatch.setattr(
        TokenLayout, "dense_mask", lambda self, *a, **kw: calls.append(1) or orig(self, *a, **kw)
    )
    sparse_attention(q, k, v, layout, specs, None, block_size=16, cache=cache, backend="reference")
    assert not calls, f"dense_mask rebuilt {len(calls)}x on a fully cached static call"


@pytest.mark.parametrize(
    "pattern,params",
    [
        ("tile", {"window": 5}),
        ("topp", {"top_p": 1.5}),
        ("lse_cache", {"refresh": 0}),
        ("reordered", {"band": -5}),
    ],
)
def test_headspec_rejects_bad_parameter_values(pattern, params):
    with pytest.raises((TypeError, ValueError)):
        HeadSpec.make(pattern, **params)


def test_union_mismatched_batch_is_a_clear_error():
    a, b = BlockSparseMask.full(2, 1, 16, (40, 40)), BlockSparseMask.full(3, 1, 16, (40, 40))
    with pytest.raises(ValueError, match="batch"):
        a | b


@pytest.mark.parametrize("where", ["top", "schedule"])
def test_plan_unknown_keys_are_rejected(where):
    import json

    from sparsediff.plan import Plan, PlanError

    d = json.loads(Plan.dense().to_json())
    if where == "top":
        d["shedule"] = {"dense_steps": 3}
    else:
        d["schedule"] = {"dense_steps": 2, "dense_layer": [0]}
    with pytest.raises(PlanError):
        Plan.from_dict(d)


def test_twin_multi_chunk_path_matches_oracle(monkeypatch):
    """The suite's shapes all fit in one chunk of the twin; force many chunks (ragged, per-batch counts)."""
    from tolerance import assert_close_to_oracle

    from sparsediff import reference

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
