"""Regression tests of issue 11 ("integration you can trust"): step/branch context from diffusers'
``cache_context`` (no scheduler patching), no process-global per-call state, per-generation state of a
bare transformer, loud fallbacks, the ``bench`` CLI exit, processors that survive re-instantiation and
backward through sparse attention. Each test failed on the main branch before the fix it is named after.
"""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from _integration import SPARSE_KW, SPARSE_PLAN
from tiny_pipelines import _wan_transformer, build

import sparsediff.api as api
from sparsediff.plan import Plan

LOGGER = "sparsediff"


def _observe(calls):
    """An observer recording (layer, step, num_steps, branch) of every self-attention call."""
    return lambda c: calls.append((c.layer, c.step, c.num_steps, c.branch))


# ------------------------------------------------------------------ 1. step context, no scheduler patching
def _skyreels_df():
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    tiny = build("skyreels_v2")
    df = SkyReelsV2DiffusionForcingPipeline(**tiny.pipe.components)
    df.set_progress_bar_config(disable=True)
    kw = dict(tiny.kwargs, prompt=None, base_num_frames=9, ar_step=0)

    def run(**over):
        with torch.no_grad():
            return df(generator=torch.Generator().manual_seed(0), return_dict=False, **{**kw, **over})[0]

    return df, run


def test_skyreels_diffusion_forcing_runs_and_dense_plan_is_bit_identical():
    """The DF pipeline deep-copies its scheduler per frame: sparse attention must not depend on it."""
    df, run = _skyreels_df()
    base = run()
    sched_attrs = set(vars(df.scheduler))
    h = api.enable_sparse_attention(df, Plan.dense(), backend="reference")
    assert set(vars(df.scheduler)) == sched_attrs, "enable patched the scheduler"
    dense = run()
    h.disable()
    assert torch.equal(dense, base)
    h = df.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    sparse = run()
    dens = h.densities()["transformer"]
    h.disable()
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, base)
    assert dens and all(0 < d < 1 for d in dens.values()), dens
    assert torch.equal(run(), base)


@pytest.mark.parametrize("name", ["wan", "skyreels_v2", "ltx"])
def test_step_and_branch_from_cache_context(name):
    """Wan passes step_index/num_inference_steps in its cache_context, SkyReels-V2 only "cond"/"uncond",
    LTX one batched "cond_uncond" call: the step index, the number of steps (read from the pipeline,
    not the scheduler) and the branch come out right in all three, and the scheduler is untouched."""
    tiny = build(name)
    calls = []
    sched = dict(vars(tiny.pipe.scheduler))
    h = api.enable_sparse_attention(tiny.pipe, "dense", backend="reference", observer=_observe(calls))
    assert set(vars(tiny.pipe.scheduler)) == set(sched)
    tiny()
    tiny()  # a second generation starts at step 0 again
    h.disable()
    n = tiny.kwargs["num_inference_steps"]
    branches = 1 if name == "ltx" else 2
    per_gen = [(s, n, b) for s in range(n) for b in range(branches)]
    layer0 = [c[1:] for c in calls if c[0] == 0]
    assert layer0 == per_gen * 2, layer0


# ------------------------------------------------------------------ 2. no process-global per-call state
@pytest.mark.parametrize(
    "name, kw_b",
    [
        ("wan", dict(height=32, width=64)),  # another resolution: grid 3x2x4 instead of 3x4x6
        ("sd3", dict(height=64, width=128)),  # SDPA-calling processors (drop-in class), 4x8 vs 8x12
    ],
)
def test_two_pipelines_in_two_threads_equal_their_sequential_outputs(name, kw_b):
    a, b = build(name), build(name)
    ha = a.pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    hb = b.pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    try:
        seq_a, seq_b = a(), b(**kw_b)
        for rep in range(4):
            res, errors = {}, []

            def run(key, fn, res=res, errors=errors):
                try:
                    res[key] = fn()
                except BaseException as e:  # reported below, never swallowed
                    errors.append(e)

            threads = [
                threading.Thread(target=run, args=("a", a)),
                threading.Thread(target=run, args=("b", lambda: b(**kw_b))),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert not errors, errors
            assert torch.equal(res["a"], seq_a), f"repeat {rep}: pipeline a differs from its sequential run"
            assert torch.equal(res["b"], seq_b), f"repeat {rep}: pipeline b differs from its sequential run"
    finally:
        ha.disable()
        hb.disable()


# ------------------------------------------------------------------ 3. bare transformer, custom loop
def _custom_loop(t, seed, per_token=False, steps=(900.0, 600.0, 300.0)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 3, 8, 12, generator=g)
    enc = torch.randn(1, 4, 32, generator=g)
    n = 3 * 4 * 6
    with torch.no_grad():
        for tv in steps:
            if per_token:  # Wan 2.2 TI2V: [B, N], the first frame's tokens at 0 (conditioning frame)
                ts = torch.full((1, n), tv)
                ts[:, :24] = 0.0
            else:
                ts = torch.tensor([tv])
            x = x - 0.1 * t(x, ts, enc, return_dict=False)[0]
    return x


_BARE_KW = dict(backend="reference", block_size=8, dense_steps=1, dense_layers=(), min_tokens=0)


@pytest.mark.parametrize("per_token", [False, True])
def test_bare_transformer_second_generation_equals_fresh_enable(per_token):
    t = _wan_transformer().eval()
    calls = []
    h = api.enable_sparse_attention(t, SPARSE_PLAN, observer=_observe(calls), **_BARE_KW)
    g1 = _custom_loop(t, 1, per_token)
    g2 = _custom_loop(t, 2, per_token)
    h.disable()
    steps = [c[1] for c in calls if c[0] == 0]
    assert steps == [0, 1, 2, 0, 1, 2], steps
    fresh = []
    for seed in (1, 2):
        h = api.enable_sparse_attention(t, SPARSE_PLAN, **_BARE_KW)
        fresh.append(_custom_loop(t, seed, per_token))
        h.disable()
    assert torch.equal(g1, fresh[0])
    assert torch.equal(g2, fresh[1]), "the second generation reused state of the first"


# ------------------------------------------------------------------ 4. loud fallbacks
def test_fallback_warns_once_per_layer_and_reason_and_strict_raises(caplog):
    """SkyReels-V2 DF with causal blocks passes a block-causal mask: every layer falls back to dense
    with a WARNING (once per layer and reason, not per step); strict=True raises instead."""
    df, run = _skyreels_df()
    causal = dict(num_frames=21, base_num_frames=21, causal_block_size=3)  # 6 latent frames, 2 blocks
    h = df.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run(**causal)
        run(**causal)
    h.disable()
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    msgs = [m for m in warned if "runs dense attention" in m and "mask" in m]
    assert len(msgs) == 2, warned  # two self-attention layers, one reason each
    assert {"layer 0", "layer 1"} == {m.split(" (")[0].split("Model ")[-1] for m in msgs}, msgs
    # and each generation says that nothing ran sparse
    assert sum("no self-attention call ran sparse" in m for m in warned) == 2, warned
    h = df.enable_sparse_attention(SPARSE_PLAN, strict=True, **SPARSE_KW)
    try:
        with pytest.raises(RuntimeError, match="strict"):
            run(**causal)
    finally:
        h.disable()


def test_image_default_engages_at_native_resolutions():
    """Flux 1024^2 (64x64 packed + 512 text = 4608 tokens), SD3 1024^2 (4096 + 333) and QwenImage
    1328^2 (83x83 + text) must run the image default sparse, not dense."""
    from sparsediff.pipelines.base import get_adapter

    from sparsediff.defaults import default_plan

    for cls, tokens in (
        ("FluxTransformer2DModel", 64 * 64 + 512),
        ("SD3Transformer2DModel", 64 * 64 + 333),
        ("QwenImageTransformer2DModel", 83 * 83 + 32),
    ):
        import diffusers

        plan = default_plan(get_adapter(getattr(diffusers, cls)))
        assert plan.min_tokens <= tokens, (cls, plan.min_tokens, tokens)


def test_generation_without_any_sparse_call_warns_and_report(caplog):
    """A plan that never engages (every call below min_tokens) says so at WARNING once per generation;
    handle.report() gives densities and fallbacks."""
    tiny = build("flux")
    h = tiny.pipe.enable_sparse_attention("topp", backend="reference", block_size=8, min_tokens=10**6)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tiny()
        tiny()
    rep = h.report()
    h.disable()
    msgs = [r.getMessage() for r in caplog.records if "min_tokens" in r.getMessage()]
    assert len(msgs) == 2 and all(r.levelno == logging.WARNING for r in caplog.records), msgs
    assert "transformer" in rep and rep["transformer"]["sparse_calls"] == 0, rep

    tiny = build("flux")
    h = tiny.pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    tiny()
    rep = h.report()
    h.disable()
    r = rep["transformer"]
    assert r["sparse_calls"] > 0 and 0 < r["mean_density"] < 1 and r["densities"], rep
    assert "mean density" in h.report_text()


def test_no_silent_reference_path_on_gpu(monkeypatch, caplog):
    """backend="auto" on a GPU tensor the Triton kernel cannot take: a WARNING names the reason once."""
    from sparsediff import ops
    from sparsediff.mask import BlockSparseMask

    monkeypatch.setattr(ops, "_is_gpu", lambda t: True)
    monkeypatch.setattr(ops, "triton_reasons", lambda q, mask=None: ["block size 24 is not a power of two"])
    ops._WARNED.clear()
    q = torch.randn(1, 2, 48, 16)
    m = BlockSparseMask.full(1, 2, 24, (48, 48))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        ops.block_sparse_attention(q, q, q, m)
        ops.block_sparse_attention(q, q, q, m)
    msgs = [r.getMessage() for r in caplog.records if "power of two" in r.getMessage()]
    assert len(msgs) == 1 and "reference" in msgs[0], msgs


# ------------------------------------------------------------------ 5. sparsediff bench exits cleanly
def test_cli_bench_returns_exit_status(capsys):
    from sparsediff import cli

    rc = cli.main(
        ["bench", "--shapes", "128:2:16", "--densities", "0.5", "--reps", "1", "--warmup", "0", "--no-flex"]
        + ["--device", "cpu"]
    )
    assert rc == 0
    assert "density" in capsys.readouterr().out


# ------------------------------------------------------------------ processors rebuilt with __class__()
def test_processors_survive_reinstantiation():
    """diffusers (IP-adapter loading) rebuilds processors with ``proc.__class__()``: the new processor
    keeps running sparse for its layer, and disable restores plain processors."""
    tiny = build("flux")
    t = tiny.pipe.transformer
    base = tiny()
    h = tiny.pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    sparse = tiny()
    t.set_attn_processor({n: p.__class__() for n, p in t.attn_processors.items()})
    again = tiny()
    dens = h.densities()["transformer"]
    h.disable()
    assert torch.equal(again, sparse)
    assert dens and all(0 < d < 1 for d in dens.values())
    assert all(not type(p).__name__.startswith("Sparse") for p in t.attn_processors.values())
    assert torch.equal(tiny(), base)


# ------------------------------------------------------------------ training through sparse attention
def test_backward_through_sparse_attention():
    t = _wan_transformer()
    h = api.enable_sparse_attention(t, SPARSE_PLAN, **{**_BARE_KW, "dense_steps": 0})
    x = torch.randn(1, 16, 3, 8, 12)
    out = t(x, torch.tensor([500.0]), torch.randn(1, 4, 32), return_dict=False)[0]
    out.square().mean().backward()
    dens = h.densities()["transformer"]
    h.disable()
    q_grad = t.blocks[0].attn1.to_q.weight.grad
    assert q_grad is not None and torch.isfinite(q_grad).all() and q_grad.abs().sum() > 0
    assert dens and all(0 < d < 1 for d in dens.values())


def test_gradient_checkpointing_recomputes_the_same_sparse_attention():
    """diffusers' gradient checkpointing reruns each block in backward, after the transformer call has
    returned: the recompute must see the call's layout and take the same (sparse) path, so gradients equal
    those without checkpointing (diffusers' test_gradient_checkpointing_equivalence failed with a sparse
    plan: 'A different number of tensors was saved during the original forward and recomputation')."""
    x, e, t = torch.randn(1, 16, 3, 8, 12), torch.randn(1, 4, 32), torch.tensor([500.0])
    grads, dens = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        tr = _wan_transformer().train()
        if ckpt:
            tr.enable_gradient_checkpointing()
        h = api.enable_sparse_attention(tr, SPARSE_PLAN, **{**_BARE_KW, "dense_steps": 0}, strict=True)
        tr(x, t, e, return_dict=False)[0].square().mean().backward()
        dens.append(h.densities()["transformer"])
        h.disable()
        grads.append({n: p.grad.clone() for n, p in tr.named_parameters() if p.grad is not None})
    assert dens[0] == dens[1] and all(0 < d < 1 for d in dens[0].values())
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6, msg=n)


def test_op_gradients_match_masked_dense_attention():
    """The op's backward (block-sparse FA2 twin on CPU) against autograd through dense attention with the
    densified token mask: ragged blocks, an empty row (lse = -inf), gradients of out and lse."""
    from sparsediff import ops
    from sparsediff.mask import BlockSparseMask

    torch.manual_seed(0)
    B, H, N, D = 2, 3, 45, 8
    q, k, v = (torch.randn(B, H, N, D, requires_grad=True) for _ in range(3))
    nb = -(-N // 8)
    bb = torch.rand(1, H, nb, nb) < 0.5
    bb[..., 0] = True
    bb[0, 1, 2] = False  # query block 2 of head 1 attends nothing
    m = BlockSparseMask.from_dense(bb, 8, (N, N))
    tm = m.to_token_mask()

    def finite(x):
        return torch.where(torch.isfinite(x), x, 0.0)

    def dense(q, k, v):
        s = (q @ k.transpose(-1, -2) * D**-0.5).masked_fill(~tm, -torch.inf)
        lse = torch.logsumexp(s, -1)
        p = torch.where(torch.isfinite(lse)[..., None], (s - finite(lse)[..., None]).exp(), 0.0)
        return p @ v, finite(lse)

    go, gl = torch.randn(B, H, N, D), torch.randn(B, H, N)
    out, lse = ops.block_sparse_attention(q, k, v, m, return_lse=True, backend="reference")
    g_sparse = torch.autograd.grad((out * go).sum() + (finite(lse) * gl).sum(), (q, k, v))
    out2, lse2 = dense(q, k, v)
    g_dense = torch.autograd.grad((out2 * go).sum() + (lse2 * gl).sum(), (q, k, v))
    for name, a, b in zip("qkv", g_sparse, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"d{n}: {m}")


# ------------------------------------------------------------------ whole-model compile / export
def test_whole_model_compile_fullgraph_and_export_with_sparse_attention_enabled(caplog):
    """torch.compile(fullgraph=True) of the whole transformer (no graph break, no recompile on the
    second call) and torch.export both work with sparse attention enabled: an all-dense plan is exact;
    a dynamic pattern (topp) runs dense there and says so at WARNING. (Static patterns run sparse:
    tests/test_compile.py::test_whole_model_compile_and_export_run_static_plans_sparse.)"""
    t = _wan_transformer().eval()
    x, ts, enc = torch.randn(1, 16, 3, 8, 12), torch.tensor([500.0]), torch.randn(1, 4, 32)
    with torch.no_grad():
        base = t(x, ts, enc, return_dict=False)[0]
    h = api.enable_sparse_attention(t, Plan.dense(), backend="reference", block_size=8)
    torch._dynamo.reset()
    compiled = torch.compile(t, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        out = compiled(x, ts, enc, return_dict=False)[0]
        out2 = compiled(x, ts, enc, return_dict=False)[0]
    ep = torch.export.export(t, (x, ts, enc), {"return_dict": False})
    with torch.no_grad():
        out3 = ep.module()(x, ts, enc, return_dict=False)[0]
    h.disable()
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    assert torch.equal(out, out2)
    torch.testing.assert_close(out3, base, rtol=1e-5, atol=1e-5)

    h = api.enable_sparse_attention(t, Plan.uniform("topp"), **_BARE_KW)
    torch._dynamo.reset()
    compiled = torch.compile(t, fullgraph=True, backend="aot_eager")
    with caplog.at_level(logging.WARNING, logger=LOGGER), torch.no_grad():
        out = compiled(x, ts, enc, return_dict=False)[0]
    h.disable()
    torch._dynamo.reset()
    torch.testing.assert_close(out, base, rtol=1e-5, atol=1e-5)
    assert any("compile_repeated_blocks" in r.getMessage() for r in caplog.records), caplog.text
