"""The public op with the PyTorch twin: vs the dense oracle with the densified token mask, vs SDPA at
100 % density, ugly shapes, edge semantics, layouts, dtypes, input errors and torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerance import assert_close_to_oracle

import sparsediff
from sparsediff import BlockSparseMask, block_sparse_attention
from sparsediff.block_mass import block_mass, block_mass_reference
from sparsediff.ops import triton_reasons
from sparsediff.reference import attention_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_ids = lambda d: str(d).split(".")[-1]  # noqa: E731


def _cdiv(a, b):
    return -(-a // b)


def _qkv(B, H, Nq, Nk, D, dtype=torch.float32, *, bnhd=False):
    if bnhd:  # transpose views of diffusers' [B, N, H, D] buffers
        return (
            torch.randn(B, Nq, H, D, dtype=dtype).transpose(1, 2),
            torch.randn(B, Nk, H, D, dtype=dtype).transpose(1, 2),
            torch.randn(B, Nk, H, D, dtype=dtype).transpose(1, 2),
        )
    return (
        torch.randn(B, H, Nq, D, dtype=dtype),
        torch.randn(B, H, Nk, D, dtype=dtype),
        torch.randn(B, H, Nk, D, dtype=dtype),
    )


def _mask(Bm, H, Nq, Nk, bs=16, p=0.5):
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    bb = torch.rand(Bm, H, _cdiv(Nq, bq), _cdiv(Nk, bk)) < p
    return BlockSparseMask.from_dense(bb, (bq, bk), (Nq, Nk))


def _check_ref(q, k, v, mask, scale=None):
    out, lse = block_sparse_attention(q, k, v, mask, scale=scale, return_lse=True, backend="reference")
    assert out.shape == q.shape and out.dtype == q.dtype and out.stride() == q.stride()
    assert lse.shape == q.shape[:3] and lse.dtype == torch.float32
    tok = mask.to_token_mask()
    o_ref, lse_ref = attention_ref(q, k, v, tok, scale=scale)
    naive = None if q.dtype == torch.float32 else attention_ref(q, k, v, tok, scale=scale, upcast=False)[0]
    assert_close_to_oracle(out, o_ref, naive, what="twin out vs dense oracle")
    assert_close_to_oracle(lse, lse_ref, what="twin lse vs dense oracle")
    return out, lse


# ---------------------------------------------------------------- twin vs independent oracles
@pytest.mark.parametrize("N", [1, 97, 113, 200, 1023])
def test_twin_ugly_lengths(N):
    H, D = (1, 16) if N == 1023 else (2, 32)
    q, k, v = _qkv(1, H, N, N, D, bnhd=True)
    _check_ref(q, k, v, _mask(1, H, N, N, 64 if N == 1023 else 16, p=0.4))


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_twin_dtypes_nq_ne_nk_batch(dtype):
    q, k, v = _qkv(2, 3, 97, 150, 40, dtype)
    _check_ref(q, k, v, _mask(1, 3, 97, 150, (32, 16)))


def test_twin_per_batch_masks_and_head_densities():
    q, k, v = _qkv(2, 3, 64, 64, 16)
    bb = torch.rand(2, 3, 4, 4) < 0.4
    bb[:, 0] = True  # head 0 dense
    bb[:, 2] = torch.eye(4, dtype=torch.bool)  # head 2 block-diagonal
    m = BlockSparseMask.from_dense(bb, 16, (64, 64))
    d = m.density_per_head()
    assert d[0, 0] == 1.0 and d[0, 2] == 0.25
    out, _ = _check_ref(q, k, v, m)
    # per-batch masks really differ per sample: sample 1 run alone with its own mask gives the same rows
    out1 = block_sparse_attention(q[1:], k[1:], v[1:], m[1], backend="reference")
    torch.testing.assert_close(out[1:], out1, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=_ids)
def test_full_density_equals_sdpa(dtype):
    q, k, v = _qkv(2, 2, 113, 97, 64, dtype, bnhd=True)
    m = BlockSparseMask.full(1, 2, 32, (113, 97))
    out = block_sparse_attention(q, k, v, m, backend="reference")
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    naive = F.scaled_dot_product_attention(q, k, v) if dtype != torch.float32 else None
    assert_close_to_oracle(out, ref, naive, what="full-density twin vs SDPA")


def test_custom_scale():
    q, k, v = _qkv(1, 2, 50, 70, 16)
    _check_ref(q, k, v, _mask(1, 2, 50, 70), scale=0.05)
    m = BlockSparseMask.full(1, 2, 16, (50, 70))
    out = block_sparse_attention(q, k, v, m, scale=2.0, backend="reference")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=2.0), atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- edge semantics
def test_empty_rows_give_zero_and_neg_inf():
    bb = torch.ones(1, 2, 4, 3, dtype=torch.bool)
    bb[0, 0, 2] = False
    m = BlockSparseMask.from_dense(bb, 16, (60, 40))
    q, k, v = _qkv(1, 2, 60, 40, 16, torch.float16)
    out, lse = _check_ref(q, k, v, m)
    assert torch.equal(out[0, 0, 32:48], torch.zeros_like(out[0, 0, 32:48]))
    assert torch.isneginf(lse[0, 0, 32:48]).all()
    assert torch.isfinite(lse[0, 0, :32]).all() and torch.isfinite(lse[0, 1]).all()


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fully_empty_mask(backend):
    m = BlockSparseMask.from_dense(torch.zeros(2, 2, 3, 3, dtype=torch.bool), 16, (40, 40))
    q, k, v = _qkv(2, 2, 40, 40, 16)
    out, lse = block_sparse_attention(q, k, v, m, return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


def test_zero_length_sequences_do_not_crash():
    q, k, v = _qkv(1, 2, 0, 5, 16)
    m = BlockSparseMask.from_dense(torch.zeros(1, 2, 0, 1, dtype=torch.bool), 16, (0, 5))
    out, lse = block_sparse_attention(q, k, v, m, return_lse=True, backend="reference")
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_large_logits_no_overflow():
    q, k, v = _qkv(1, 1, 48, 48, 16)
    q, k = q * 30, k * 30  # scores ~ 1e3: exp overflows without the max subtraction
    m = _mask(1, 1, 48, 48, p=0.7)
    out, lse = block_sparse_attention(q, k, v, m, return_lse=True, backend="reference")
    o_ref, lse_ref = attention_ref(q, k, v, m.to_token_mask())
    assert not torch.isnan(out).any() and torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    # fp32 rounding of scores ~1e3 is ~1e-4 absolute: compare relative to the logit magnitude
    torch.testing.assert_close(out, o_ref, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(lse, lse_ref, atol=1e-3, rtol=1e-5)


# ---------------------------------------------------------------- layouts
def test_out_layout_follows_q_and_accepts_mixed_layouts():
    B, H, N, D = 2, 3, 40, 16
    q = torch.randn(B, N, H, D).transpose(1, 2)
    k = torch.randn(B, H, N, D)
    v = torch.randn(B, N, H, D).transpose(1, 2)
    m = _mask(1, H, N, N)
    out, _ = _check_ref(q, k, v, m)
    assert out.transpose(1, 2).is_contiguous()
    out_c, _ = _check_ref(q.contiguous(), k, v, m)
    assert out_c.is_contiguous()
    torch.testing.assert_close(out, out_c, atol=0, rtol=0)


def test_reference_public_function_matches_op():
    q, k, v = _qkv(1, 2, 64, 64, 16)
    m = _mask(1, 2, 64, 64)
    a = sparsediff.reference.block_sparse_attention(q, k, v, m)
    b = block_sparse_attention(q, k, v, m, backend="reference")
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    a2, lse = sparsediff.reference.block_sparse_attention(q, k, v, m, return_lse=True)
    assert lse.shape == (1, 2, 64)


# ---------------------------------------------------------------- bad inputs
def _good():
    q, k, v = _qkv(1, 2, 32, 48, 16)
    return q, k, v, _mask(1, 2, 32, 48)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda q, k, v, m: (q[0], k, v, m), ValueError, r"q must be 4-D \[B, H, N, D\]"),
        (lambda q, k, v, m: (q, k[:, :1], v, m), ValueError, "batch/heads differ"),
        (lambda q, k, v, m: (q, k, v[:, :, :40], m), ValueError, "k and v sequence lengths differ"),
        (lambda q, k, v, m: (q, k[..., :8], v, m), ValueError, "q and k head dims differ"),
        (lambda q, k, v, m: (q, k, v[..., :8], m), ValueError, "v head dim 8"),
        (lambda q, k, v, m: (q[:, :, :16], k, v, m), ValueError, r"mask was built for seq_lens \(32, 48\)"),
        (lambda q, k, v, m: (q, k, v, m[:, :1]), ValueError, "mask has 1 heads but q has 2"),
        (lambda q, k, v, m: (q, k, v, m.expand_batch(3)), ValueError, "mask batch 3 must be 1"),
        (lambda q, k, v, m: (q.int(), k.int(), v.int(), m), TypeError, "supported dtypes are"),
        (lambda q, k, v, m: (q.double(), k.double(), v.double(), m), TypeError, "float64"),
        (lambda q, k, v, m: (q, k.half(), v, m), TypeError, "must share one dtype"),
        (lambda q, k, v, m: (q, k, v, m.to_dense()), TypeError, "must be a sparsediff.BlockSparseMask"),
        (lambda q, k, v, m: (q.numpy(), k, v, m), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v, m: (q, k, v, m.to("meta")), ValueError, "mask is on meta"),
    ],
    ids=[
        "q-3d",
        "heads",
        "kv-len",
        "qk-dim",
        "v-dim",
        "mask-seq-len",
        "mask-heads",
        "mask-batch",
        "int",
        "float64",
        "mixed-dtype",
        "dense-tensor",
        "numpy",
        "mask-device",
    ],
)
def test_bad_inputs_clear_errors(mutate, exc, match):
    q, k, v, m = mutate(*_good())
    with pytest.raises(exc, match=match):
        block_sparse_attention(q, k, v, m, backend="reference")


def test_head_dim_300_rejected():
    q, k, v = _qkv(1, 1, 16, 16, 300)
    with pytest.raises(ValueError, match="head dim 300 is not supported; supported head dims are 1..256"):
        block_sparse_attention(q, k, v, BlockSparseMask.full(1, 1, 16, (16, 16)))


def test_bad_backend_name():
    q, k, v, m = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        block_sparse_attention(q, k, v, m, backend="cuda")


# ---------------------------------------------------------------- torch.compile
def test_torch_compile_fullgraph_no_graph_breaks():
    q, k, v = _qkv(1, 2, 64, 64, 16, bnhd=True)
    m = _mask(1, 2, 64, 64, p=0.6)

    def f(q, k, v, idx, cnt):
        mask = BlockSparseMask(idx, cnt, 16, (64, 64), validate=False)
        out, lse = block_sparse_attention(q * 1.0, k, v, mask, return_lse=True, backend="reference")
        return out + 1.0, lse

    eager = f(q, k, v, m.kv_indices, m.kv_counts)
    explanation = torch._dynamo.explain(f)(q, k, v, m.kv_indices, m.kv_counts)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = compiled(q, k, v, m.kv_indices, m.kv_counts)
    torch.testing.assert_close(got[0], eager[0], atol=0, rtol=0)
    torch.testing.assert_close(got[1], eager[1], atol=0, rtol=0)


def test_inductor_compiles_the_op_on_the_reference_path():
    """The default compile backend (inductor) around the op: the op stays opaque (reference path inside),
    the surrounding ops are generated code, and the result equals eager."""
    q, k, v = _qkv(1, 2, 40, 40, 16)
    m = _mask(1, 2, 40, 40, p=0.5)

    def f(q, k, v, idx, cnt):
        mask = BlockSparseMask(idx, cnt, 16, (40, 40), validate=False)
        out, lse = block_sparse_attention(q * 2.0, k, v, mask, return_lse=True, backend="reference")
        return out.relu() + 1.0, lse

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(q, k, v, m.kv_indices, m.kv_counts)
    want = f(q, k, v, m.kv_indices, m.kv_counts)
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)


def test_torch_compile_with_mask_object_closure():
    q, k, v = _qkv(1, 2, 48, 48, 16)
    m = _mask(1, 2, 48, 48, p=0.6)
    fn = torch.compile(lambda q, k, v: block_sparse_attention(q, k, v, m, backend="reference"), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    torch.testing.assert_close(
        fn(q, k, v), block_sparse_attention(q, k, v, m, backend="reference"), atol=0, rtol=0
    )


# ---------------------------------------------------------------- benchmark entry point (smoke, no timing asserts)
def test_bench_cli_runs_on_cpu_and_writes_markdown(tmp_path, capsys):
    from sparsediff import bench

    out = tmp_path / "bench.md"
    argv = [
        "--shapes",
        "200:2:16",
        "--densities",
        "0.1,0.5",
        "--reps",
        "1",
        "--warmup",
        "0",
        "--device",
        "cpu",
    ]
    table = bench.main([*argv, "--block", "32", "--out", str(out)])
    lines = table.splitlines()
    assert lines[0].startswith("| model | N | H×D | block | density | ms sparse | ms SDPA |")
    assert len(lines) == 2 + 2 and "200" in lines[2] and "2x16" in lines[2]
    text = out.read_text()
    assert "torch " in text and "triton " in text and "date " in text and table in text
    assert "CPU:" in capsys.readouterr().out


def test_bench_random_mask_balanced_rows():
    from sparsediff.bench import random_block_mask

    m = random_block_mask(3, 1000, 64, 0.25)
    assert m.shape == (1, 3, 1000, 1000)
    assert (m.kv_counts == 4).all()  # round(0.25 * 16) blocks in every row
    assert random_block_mask(1, 100, 64, 0.0).kv_counts.min() == 1  # never empty rows


def test_bench_plan_times_each_layer_of_a_real_plan(tmp_path, monkeypatch):
    """``sparsediff bench --plan``: every layer's whole sparse-attention call with the plan's own masks (a
    dense layer is listed, not timed); data-dependent heads run at the density measured by the search."""
    from sparsediff import attention as attention_mod
    from sparsediff import bench
    from sparsediff.embedded import tiny_random_pipeline
    from sparsediff.plan import Plan
    from sparsediff.specs import DenseSchedule, HeadSpec

    t = tiny_random_pipeline().transformer
    L, H = len(t.blocks), t.config.num_attention_heads
    rows_specs = [[HeadSpec.make("tile", window=(1, 3, 3))] * H, [HeadSpec.make("topp", top_p=0.99)] * H]
    rows_specs += [[HeadSpec("dense")] * H] * (L - 2)
    stats = [[{"density": 0.3}] * H for _ in range(L)]
    plan = Plan.per_head(t, rows_specs, schedule=DenseSchedule(0, ()), stats=stats)
    path = tmp_path / "plan.json"
    plan.save(path)
    seen = []
    real = attention_mod.sparse_attention
    monkeypatch.setattr(attention_mod, "sparse_attention", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    out = tmp_path / "b.md"
    table = bench.main(["--plan", str(path), "--grid", "4,8,8", "--head-dim", "16", "--block", "16",
                        "--reps", "1", "--warmup", "0", "--device", "cpu", "--out", str(out)])  # fmt: skip
    lines = table.splitlines()
    assert lines[0] == "| layer | heads | density | ms sparse | ms SDPA | speedup |"
    assert (
        len(lines) == 2 + L + 1
        and "(dense layer)" in lines[2 + 2]
        and lines[-1].startswith("| sparse layers")
    )
    assert {s[0] for s in seen} == {
        HeadSpec.make("tile", window=(1, 3, 3)),
        HeadSpec.make("topp", top_p=0.3, min_frac=0.05),
    }
    dens = [float(r.split("|")[3].strip(" %")) for r in lines[2:4]]
    assert 0 < dens[0] < 100 and abs(dens[1] - 30) < 15, dens
    assert "4x8x8" in out.read_text() or "video[4x8x8]" in out.read_text()
    with pytest.raises(SystemExit, match="--head-dim"):
        bench.main(["--plan", str(path), "--grid", "4,8,8"])


def test_bench_times_the_family_default_at_a_grid(monkeypatch):
    """``--plan default``: the video family's default pattern at --grid (its token threshold and dense first
    layer ignored), with the density of that mask; without --grid a clear error."""
    from sparsediff import attention as attention_mod
    from sparsediff import bench
    from sparsediff.defaults import default_plan

    seen = []
    real = attention_mod.sparse_attention
    monkeypatch.setattr(attention_mod, "sparse_attention", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    table = bench.main(["--plan", "default", "--grid", "8,8,8", "--heads", "2", "--head-dim", "16", "--block",
                        "16", "--reps", "1", "--warmup", "0", "--device", "cpu"])  # fmt: skip
    row = table.splitlines()[2]
    assert {s for call in seen for s in call} == {default_plan("video").default} and "radial 2" in row, row
    assert 0 < float(row.split("|")[3].strip(" %")) < 100, row
    with pytest.raises(SystemExit, match="needs --grid"):
        bench.main(["--plan", "default", "--head-dim", "16"])


def test_block_mass_auto_falls_back_for_unsupported_block_size():
    q, k = torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 16)
    if triton_reasons(q):
        pytest.skip("Triton cannot run here at all; auto goes to the twin anyway")
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 0.25, -1)
    got = block_mass(q, k, lse, block_q=24, block_kv=24, scale=0.25)
    torch.testing.assert_close(got, block_mass_reference(q, k, lse, block_q=24, block_kv=24, scale=0.25))
