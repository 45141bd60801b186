"""sparse_attention: per-head specs against a token-mask oracle, one launch, caches, state, layouts."""

import importlib.util

import pytest
import torch
from tolerance import assert_close_to_oracle

from sparsediff.attention import LayerState, MaskCache, group_heads, sparse_attention
from sparsediff.layout import TokenLayout
from sparsediff.patterns import default_tile, reordered_permutation, static_mask, tile_permutation
from sparsediff.reference import attention_ref
from sparsediff.specs import HeadSpec


def _qkv(layout, H, B=2, D=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # diffusers hands [B, N, H, D]; the integration passes transpose(1, 2) views
    return [torch.randn(B, layout.num_tokens, H, D, generator=g).to(dtype).transpose(1, 2) for _ in range(3)]


def _natural_token_mask(layout, spec, block):
    """Token mask [N, N] in natural order for a static spec (un-permuting the pattern's order)."""
    m = static_mask(layout, spec.normalized(), block).to_token_mask()[0, 0]
    if spec.pattern == "tile":
        perm = tile_permutation(layout, spec.get("tile") or default_tile(layout.grid, block)).perm
    elif spec.pattern == "reordered":
        perm = reordered_permutation(layout, spec.get("order")).perm
    else:
        return m
    out = torch.zeros_like(m)
    out[perm[:, None], perm[None, :]] = m
    return out


@pytest.mark.parametrize(
    "layout",
    [
        TokenLayout.video(3, 5, 7, text_len=13, text_position="before"),
        TokenLayout.video(4, 4, 6, text_len=9, text_position="after"),
        TokenLayout.image(7, 9, text_len=4),
    ],
    ids=repr,
)
def test_mixed_static_heads_match_token_mask_oracle(layout):
    specs = [
        HeadSpec.make("dense"),
        HeadSpec.make("radial", decay=0.3),
        HeadSpec.make("tile", window=(1, 1, 2)),
        HeadSpec.make("reordered", order="frame", band=9),
        HeadSpec.make("radial", decay=0.3),  # same spec as head 1: shares its mask
        HeadSpec.make("reordered", order="hilbert", band=20),
        HeadSpec.make("reordered", order="whf", band=5),
    ]
    q, k, v = _qkv(layout, len(specs))
    out = sparse_attention(q, k, v, layout, specs, block_size=16, backend="reference")
    assert out.shape == q.shape and out.stride() == q.stride()
    tm = torch.stack([_natural_token_mask(layout, s, 16) for s in specs])[None]
    ref, _ = attention_ref(q, k, v, tm)
    assert_close_to_oracle(out, ref, what="sparse_attention vs token-mask oracle")


def test_all_dense_equals_dense_attention_and_force_dense():
    layout = TokenLayout.video(3, 5, 7, text_len=13, text_position="before")
    q, k, v = _qkv(layout, 3)
    ref, _ = attention_ref(q, k, v)
    out = sparse_attention(q, k, v, layout, [HeadSpec.make("dense")] * 3, block_size=32, backend="reference")
    assert_close_to_oracle(out, ref, what="all-dense")
    specs = [HeadSpec.make("radial", decay=0.1), HeadSpec.make("topp", top_p=0.1), HeadSpec.make("lse_cache")]
    st = LayerState()
    out = sparse_attention(
        q, k, v, layout, specs, st, step=0, force_dense=True, block_size=32, backend="reference"
    )
    assert_close_to_oracle(out, ref, what="force_dense")
    assert st.lse is not None and st.lse.shape == (2, 3, layout.num_tokens)
    assert st.last_mask.density() == 1.0


def test_topp_full_mass_is_dense_and_heads_grouped():
    layout = TokenLayout.video(2, 6, 6, text_len=5)
    q, k, v = _qkv(layout, 5)
    specs = [
        HeadSpec.make("topp", top_p=1.0),
        HeadSpec.make("radial"),
        HeadSpec.make("topp", top_p=1.0),
        HeadSpec.make("reordered", order="cluster", select="topp", top_p=1.0),
        HeadSpec.make("reordered", order="hilbert", select="topp", top_p=1.0),
    ]
    groups = group_heads(specs)
    assert list(groups.values()) == [(0, 2), (1,), (3,), (4,)]
    st = LayerState()
    out = sparse_attention(q, k, v, layout, specs, st, block_size=16, backend="reference")
    ref, _ = attention_ref(q, k, v)
    for h in (0, 2, 3, 4):
        assert_close_to_oracle(out[:, h], ref[:, h], what=f"top_p=1 head {h}")
    assert st.last_mask.batch == 2  # dynamic heads: one mask per sample
    assert (specs[3].normalized(), (3,)) in st.centroids  # k-means warm start kept in the layer state


def test_skip_head_reuses_dense_output():
    layout = TokenLayout.video(2, 4, 4, text_len=3)
    q, k, v = _qkv(layout, 2)
    specs = [HeadSpec.make("dense"), HeadSpec.make("skip")]
    st = LayerState()
    dense = sparse_attention(
        q, k, v, layout, specs, st, step=0, force_dense=True, block_size=16, backend="reference"
    )
    q2, k2, v2 = _qkv(layout, 2, seed=1)
    out = sparse_attention(q2, k2, v2, layout, specs, st, step=1, block_size=16, backend="reference")
    assert torch.equal(out[:, 1], dense[:, 1])  # skip: the cached output
    ref, _ = attention_ref(q2, k2, v2)
    assert_close_to_oracle(out[:, 0], ref[:, 0], what="dense head next to a skip head")
    # without a cache the skip head is computed densely (and cached)
    st2 = LayerState()
    out2 = sparse_attention(q2, k2, v2, layout, specs, st2, step=5, block_size=16, backend="reference")
    assert_close_to_oracle(out2[:, 1], ref[:, 1], what="skip head without cache")
    assert 1 in st2.skip_out


def test_mask_cache_keys_include_resolution():
    cache = MaskCache(max_entries=8)
    specs = [HeadSpec.make("radial"), HeadSpec.make("tile")]
    a = TokenLayout.video(3, 4, 4)
    b = TokenLayout.video(3, 4, 5)
    for lay in (a, a, b):
        q, k, v = _qkv(lay, 2, B=1)
        out = sparse_attention(q, k, v, lay, specs, cache=cache, block_size=16, backend="reference")
        tm = torch.stack([_natural_token_mask(lay, s, 16) for s in specs])[None]
        ref, _ = attention_ref(q, k, v, tm)
        assert_close_to_oracle(out, ref, what=f"cached masks at {lay}")
    assert cache.hits > 0 and cache.misses >= 6
    assert any(isinstance(key, tuple) and b in key for key in cache._d)
    small = MaskCache(max_entries=2)
    q, k, v = _qkv(a, 2, B=1)
    sparse_attention(q, k, v, a, specs, cache=small, block_size=16, backend="reference")
    assert len(small) == 2


def test_state_resets_on_new_layout_or_earlier_step():
    lay = TokenLayout.video(2, 4, 4)
    q, k, v = _qkv(lay, 1)
    st = LayerState()
    sparse_attention(
        q,
        k,
        v,
        lay,
        [HeadSpec.make("lse_cache")],
        st,
        step=0,
        force_dense=True,
        block_size=16,
        backend="reference",
    )
    sparse_attention(
        q, k, v, lay, [HeadSpec.make("lse_cache")], st, step=1, block_size=16, backend="reference"
    )
    assert st.indices
    sparse_attention(
        q, k, v, lay, [HeadSpec.make("lse_cache")], st, step=0, block_size=16, backend="reference"
    )
    assert not st.indices  # new pipeline call (step went back): no stale indices
    lay2 = TokenLayout.video(2, 4, 5)
    q2, k2, v2 = _qkv(lay2, 1)
    sparse_attention(
        q2, k2, v2, lay2, [HeadSpec.make("lse_cache")], st, step=1, block_size=16, backend="reference"
    )
    assert st.key[0] == lay2
    st.reset()
    assert st.lse is None and not st.skip_out


def test_input_errors():
    lay = TokenLayout.video(2, 4, 4)
    q, k, v = _qkv(lay, 2)
    with pytest.raises(ValueError, match="head specs"):
        sparse_attention(q, k, v, lay, [HeadSpec.make("dense")], backend="reference")
    with pytest.raises(ValueError, match="tokens"):
        sparse_attention(
            q, k, v, TokenLayout.video(2, 4, 5), [HeadSpec.make("dense")] * 2, backend="reference"
        )
    with pytest.raises(TypeError):
        sparse_attention(q, k, v, lay, ["dense", "dense"], backend="reference")


def test_half_precision_runs_and_matches():
    lay = TokenLayout.video(2, 4, 6, text_len=3, text_position="before")
    q, k, v = _qkv(lay, 2, dtype=torch.bfloat16)
    specs = [HeadSpec.make("radial", decay=0.5), HeadSpec.make("tile", window=(1, 1, 1))]
    out = sparse_attention(q, k, v, lay, specs, block_size=16, backend="reference")
    assert out.dtype == torch.bfloat16
    tm = torch.stack([_natural_token_mask(lay, s, 16) for s in specs])[None]
    ref, _ = attention_ref(q, k, v, tm)
    naive, _ = attention_ref(q, k, v, tm, upcast=False)
    assert_close_to_oracle(out, ref, naive, what="bf16 sparse_attention")


@pytest.mark.skipif(
    importlib.util.find_spec("triton") is None
    or importlib.util.find_spec("sparsediff.kernels.block_sparse_attn") is None,
    reason="Triton or kernels/block_sparse_attn.py not available",
)
def test_triton_backend_matches_reference():
    from sparsediff.ops import triton_reasons

    lay = TokenLayout.video(2, 4, 5, text_len=7, text_position="before")
    q, k, v = _qkv(lay, 3, B=1, D=16)
    specs = [
        HeadSpec.make("radial", decay=0.5),
        HeadSpec.make("tile", window=(1, 1, 1)),
        HeadSpec.make("reordered", order="frame", band=8),
    ]
    from sparsediff.mask import BlockSparseMask

    reasons = triton_reasons(q, BlockSparseMask.full(1, 3, 16, (lay.num_tokens, lay.num_tokens)))
    if reasons:
        pytest.skip("; ".join(reasons))
    out_t = sparse_attention(q, k, v, lay, specs, block_size=16, backend="triton")
    out_r = sparse_attention(q, k, v, lay, specs, block_size=16, backend="reference")
    assert_close_to_oracle(out_t, out_r, what="triton vs reference sparse_attention")


def test_cluster_static_band_matches_token_mask_oracle():
    """order="cluster", select="static": the cached band mask applied on data-dependent q/k orders."""
    from sparsediff.patterns import band_mask, cluster_permutations

    lay = TokenLayout.video(2, 6, 6, text_len=5, text_position="before")
    q, k, v = _qkv(lay, 2, B=2)
    spec = HeadSpec.make("reordered", order="cluster", select="static", band=10, clusters=6, kmeans_iters=3)
    out = sparse_attention(q, k, v, lay, [spec, spec], block_size=16, backend="reference")
    pq, pk, _, _ = cluster_permutations(q, k, lay, 6, 3)
    m = band_mask(lay, 16, band=10).to_token_mask()[0, 0]
    tm = torch.zeros(2, 2, lay.num_tokens, lay.num_tokens, dtype=torch.bool)
    for b in range(2):
        for h in range(2):
            a, c = pq.perm[b, h], pk.perm[b, h]
            tm[b, h, a[:, None], c[None, :]] = m
    ref, _ = attention_ref(q, k, v, tm)
    assert_close_to_oracle(out, ref, what="cluster-ordered static band")


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
