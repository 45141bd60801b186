"""Regional compile with sparse attention enabled: one graph per repeated-block class, no recompiles."""

from __future__ import annotations

import pytest
import torch
from _compiled import assert_one_graph_like_eager, eager_then_compiled
from _integration import SPARSE_KW
from tiny_pipelines import _wan_transformer

import sparsediff.api as api
from sparsediff.plan import Plan
from sparsediff.specs import HeadSpec


@pytest.fixture
def fresh_dynamo():
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def _per_layer_plan(t):
    # different patterns per layer and per head: layer identity must not be a compile-time constant
    return Plan.per_head(
        t,
        [
            [HeadSpec("dense"), HeadSpec.make("tile", window=(1, 1, 1))],
            [HeadSpec.make("radial", decay=0.05)] * 2,
        ],
    )


@pytest.mark.parametrize("plan_kind", ["dense", "sparse"])
def test_wan_compile_repeated_blocks_no_recompiles(fresh_dynamo, plan_kind):
    counters = fresh_dynamo
    t = _wan_transformer().eval()
    x, enc = torch.randn(1, 16, 3, 8, 12), torch.randn(1, 4, 32)
    plan = Plan.dense() if plan_kind == "dense" else _per_layer_plan(t)
    with torch.no_grad():
        base = t(x, torch.tensor([900.0]), enc, return_dict=False)[0]
        api.enable_sparse_attention(t, plan, **SPARSE_KW)
        eager, compiled = eager_then_compiled(t, x, enc)
    api.disable_sparse_attention(t)
    assert_one_graph_like_eager(counters, eager, compiled)
    if plan_kind == "dense":
        torch.testing.assert_close(compiled[0], base, rtol=1e-5, atol=1e-5)
    else:
        assert not torch.allclose(compiled[0], base, atol=1e-4)


def test_flux_compile_repeated_blocks_one_graph_per_block_class(fresh_dynamo):
    from tiny_pipelines import build

    counters = fresh_dynamo
    tiny = build("flux")
    pipe = tiny.pipe
    with torch.no_grad():
        eager = tiny()
        api.enable_sparse_attention(pipe, Plan.uniform("tile", window=(1, 1, 1)), **SPARSE_KW)
        sparse_eager = tiny()
        pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = tiny()
    pipe.disable_sparse_attention()
    classes = len(pipe.transformer._repeated_blocks)
    assert counters["stats"]["unique_graphs"] <= classes, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(out, sparse_eager, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, eager)


def _flip_batch(call):
    """The same transformer call with its batch reversed (Mochi: the two prompt lengths swap samples)."""
    b = call["hidden_states"].shape[0]
    return {
        k: v.flip(0) if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b else v for k, v in call.items()
    }


@pytest.mark.parametrize("name", ["sd3", "mochi"])
def test_compiled_refit_layouts_run_sparse(fresh_dynamo, monkeypatch, name):
    """Adapters with ``refit_text`` under ``torch.compile``: SD3.5's image-only ``attn2`` (no text) and
    Mochi's per-sample attention calls (batched CFG with two prompts of different valid lengths) re-fit
    the layout at run time inside the opaque layer op, so with ``strict=True`` every self-attention
    call of the compiled blocks runs sparse (no dense fallback) and matches eager sparse."""
    from _integration import SPARSE_PLAN
    from sparsediff.pipelines.base import get_adapter
    from tiny_pipelines import build, capture_transformer_call

    import sparsediff.attention as sa
    from sparsediff.layout import TokenLayout

    counters = fresh_dynamo
    tiny = build(name)
    t = tiny.pipe.transformer
    n_layers = len(get_adapter(t).attention_modules(t))
    grid = tiny.layout.grid
    if name == "sd3":  # joint attn: [image, 93 text]; dual-attention attn2: image only
        expected = {tiny.layout, TokenLayout.image(*grid[1:])}
        calls_per_forward = n_layers  # CFG batched in one attention call per layer
    else:  # one call per sample, each with its own valid prompt tokens
        lens = {tiny.layout.text_len, tiny.extra["negative_text_len"]}
        assert len(lens) == 2
        expected = {TokenLayout.video(*grid, text_len=n, text_position="after") for n in lens}
        calls_per_forward = 2 * n_layers
    call = capture_transformer_call(tiny)  # the batched CFG call (batch 2)
    call["return_dict"] = False
    assert call["hidden_states"].shape[0] == 2
    flipped = _flip_batch(call)

    seen: list[tuple[TokenLayout, bool, float]] = []
    orig = sa.sparse_attention

    def spy(q, k, v, layout, head_specs, state=None, **kw):
        out = orig(q, k, v, layout, head_specs, state, **kw)
        seen.append((layout, kw.get("force_dense", False), float(state.last_mask.density())))
        return out

    monkeypatch.setattr(sa, "sparse_attention", spy)

    def run(inputs):
        seen.clear()
        out = t(**inputs)[0]
        assert len(seen) == calls_per_forward, (
            f"{name}: {len(seen)} sparse calls, expected {calls_per_forward}"
        )
        assert {lay for lay, *_ in seen} == expected, seen
        assert all(not fd and 0 < d < 1 for _, fd, d in seen), seen
        return out, list(seen)

    with torch.no_grad():
        base = t(**call)[0]
        api.enable_sparse_attention(t, SPARSE_PLAN, **SPARSE_KW, strict=True)
        try:
            eager = [run(c) for c in (call, flipped)]
            if t._repeated_blocks:
                t.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
            else:
                for block in t.transformer_blocks:
                    block.compile(fullgraph=True, backend="aot_eager")
            # first call compiles every block (the last block is another graph: context_pre_only);
            # the second, with the prompt lengths swapped between samples, must reuse those graphs
            compiled = [run(call)]
            with torch._dynamo.config.patch(error_on_recompile=True):
                compiled.append(run(flipped))
        finally:
            api.disable_sparse_attention(t)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == len(t.transformer_blocks), dict(counters["stats"])
    for (out_c, seen_c), (out_e, seen_e) in zip(compiled, eager):
        assert [x[0] for x in seen_c] == [x[0] for x in seen_e]  # same layouts, same call order
        torch.testing.assert_close(out_c, out_e, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(eager[0][0], base, atol=1e-4)  # the sparse plan really changed the output


# ------------------------------------------------------------------ whole-model compile / export
def _wan_calls():
    x, enc = torch.randn(1, 16, 3, 8, 12), torch.randn(1, 4, 32)
    return [(x, torch.tensor([tv]), enc) for tv in (900.0, 500.0)]  # step 0 (warm-up, dense), step 1


@pytest.mark.parametrize("mode", ["compile", "export"])
def test_whole_model_compile_and_export_run_static_plans_sparse(fresh_dynamo, mode):
    """Static patterns (tile / radial per head, dense heads between) run sparse under a whole-model
    ``torch.compile(fullgraph=True)`` and in a ``torch.export`` program: the root hook's per-call work
    (step, layout) runs at run time in the ``begin_call`` op. Each compiled call equals the eager
    sparse call -- the warm-up step dense, the next step sparse (so the step is tracked at run time),
    not dense -- with ``strict=True`` (any dense fallback raises), no graph break, no recompile."""
    counters = fresh_dynamo
    t = _wan_transformer().eval()
    calls = _wan_calls()
    plan = _per_layer_plan(t)
    kw = {**SPARSE_KW, "dense_steps": 1}
    with torch.no_grad():
        base = [t(*c, return_dict=False)[0] for c in calls]
        h = api.enable_sparse_attention(t, plan, **kw, strict=True)
        eager = [t(*c, return_dict=False)[0] for c in calls]
        eager_report = h.report()["transformer"]
        if mode == "compile":
            run = torch.compile(t, fullgraph=True, backend="aot_eager")
        else:
            run = torch.export.export(t, calls[0], {"return_dict": False}).module()
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [run(*c, return_dict=False)[0] for c in calls]
        report = h.report()["transformer"]
    h.disable()
    if mode == "compile":
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
        assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(eager[0], base[0], rtol=0, atol=0)  # warm-up step: dense
    assert not torch.allclose(eager[1], base[1], atol=1e-4)  # the plan really is sparse
    for g, e in zip(got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[1], base[1], atol=1e-4), "compiled call ran dense"
    # the compiled calls are a generation of their own (timestep went up), counted like eager ones
    assert report["generations"] == eager_report["generations"] + 1, report
    for k in ("transformer_calls", "sparse_calls", "densities"):
        assert report[k] == eager_report[k], (k, report, eager_report)


def test_whole_model_compile_dynamic_patterns_fall_back_dense(fresh_dynamo, caplog):
    """Dynamic patterns (here ``topp``) are not served under a whole-model compile: those layers run the
    model's own dense attention with a WARNING naming the remedy; a static head in the same plan still
    runs sparse (so the compiled call is neither the eager sparse call nor the dense one)."""
    import logging

    t = _wan_transformer().eval()
    x, ts, enc = _wan_calls()[1]
    plan = Plan.per_head(t, [[HeadSpec.make("topp")] * 2, [HeadSpec.make("tile", window=(1, 1, 1))] * 2])
    with torch.no_grad():
        base = t(x, ts, enc, return_dict=False)[0]
        h = api.enable_sparse_attention(t, plan, **SPARSE_KW)
        eager = t(x, ts, enc, return_dict=False)[0]
        before = h.report()["transformer"]["sparse_calls"]
        compiled = torch.compile(t, fullgraph=True, backend="aot_eager")
        with caplog.at_level(logging.WARNING, logger="sparsediff"):
            got = compiled(x, ts, enc, return_dict=False)[0]
        after = h.report()["transformer"]["sparse_calls"]
    h.disable()
    msgs = [r.getMessage() for r in caplog.records if "dynamic pattern" in r.getMessage()]
    assert len(msgs) == 1 and "layer 0" in msgs[0] and "compile_repeated_blocks" in msgs[0], caplog.text
    assert before == 2 and after == before + 1, (before, after)  # compiled: layer 1 only
    assert not torch.allclose(got, base, atol=1e-4)
    assert not torch.allclose(got, eager, atol=1e-4)


def test_whole_model_compile_in_pipeline_family_default_matches_eager(fresh_dynamo):
    """The tiny WanPipeline with its family default (radial, 25 % dense warm-up steps, dense first
    layer) and the transformer compiled whole (``fullgraph=True``): steps come from the pipeline's
    ``cache_context`` at run time, so every call does what the eager call did -- same output, same
    report (sparse calls, warm-up calls, densities), one graph, no graph break."""
    from tiny_pipelines import build

    counters = fresh_dynamo
    tiny = build("wan")
    pipe = tiny.pipe
    with torch.no_grad():
        base = tiny(num_inference_steps=4)
        h = pipe.enable_sparse_attention(backend="reference", block_size=8, min_tokens=0, strict=True)
        eager = tiny(num_inference_steps=4)
        rep_eager = h.report()["transformer"]
        pipe.transformer.compile(fullgraph=True, backend="aot_eager")
        compiled = tiny(num_inference_steps=4)
        rep = h.report()["transformer"]
    h.disable()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert not torch.allclose(eager, base, atol=1e-4)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert rep["sparse_calls"] > 0 and rep["dense_calls"], rep
    for k in ("transformer_calls", "sparse_calls", "dense_calls", "densities"):
        assert rep[k] == rep_eager[k], (k, rep, rep_eager)


def _qwen_call(h: int, w: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden_states": torch.randn(1, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "encoder_hidden_states_mask": torch.ones(1, 5, dtype=torch.long),
        "timestep": torch.tensor([1.0]),
        "img_shapes": [(1, h, w)],
        "return_dict": False,
    }


def test_whole_model_compile_dynamic_shapes_reads_int_inputs_at_run_time(fresh_dynamo):
    """``torch.compile(fullgraph=True, dynamic=True)`` of a transformer whose layout comes from int
    inputs (QwenImage's ``img_shapes``: symbolic under dynamic shapes) at two image sizes: no trace error,
    no recompile, and each call runs the tile plan on *its own* grid -- equal to the eager sparse call,
    not dense. (Regression: the ints went to a constant-folded function and Dynamo refused them.)"""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    t = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()  # fmt: skip
    calls = [_qwen_call(8, 8), _qwen_call(12, 8, seed=1)]
    plan = Plan.uniform("tile", window=(1, 1, 1))
    with torch.no_grad():
        base = [t(**c)[0] for c in calls]
        h = api.enable_sparse_attention(t, plan, **SPARSE_KW, strict=True)
        eager = [t(**c)[0] for c in calls]
        before = h.report()["transformer"]["sparse_calls"]
        run = torch.compile(t, fullgraph=True, dynamic=True, backend="aot_eager")
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = [run(**c)[0] for c in calls]
        after = h.report()["transformer"]["sparse_calls"]
    h.disable()
    assert not fresh_dynamo["graph_break"], dict(fresh_dynamo["graph_break"])
    assert after - before == before > 0, (before, after)  # every compiled call ran sparse, as eager
    for g, e, b in zip(got, eager, base):
        assert not torch.allclose(e, b, atol=1e-4)  # the plan really is sparse at both sizes
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
