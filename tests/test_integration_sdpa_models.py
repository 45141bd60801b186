"""Sparse attention on the models whose processors call SDPA directly (CogVideoX, Mochi, SD3) and on LTX.

Per model, on a tiny random-init pipeline (``tests/tiny_pipelines.py``, 2 denoising steps, CFG on):

* **three-run test** (:func:`_integration.three_run`) -- baseline; enabled with an all-dense plan ==
  baseline bit-identically (the drop-in processor's redirected SDPA call is the same call); enabled
  with a sparse plan (3D tile window 1, small blocks, no warm-up, ``strict=True`` so any dense fallback
  raises) changes the output, stays finite and computes < 100 % of the blocks on *every* self-attention
  layer (pure-PyTorch reference backend: the Triton kernel is tested on its own, under the interpreter it
  would dominate the runtime); disabled == baseline bit-identically, original processors back.
* **layout test** -- the layout the adapter reads from a real transformer call equals the declared
  layout of the tiny pipeline, which a planted per-patch signal proves to be the actual token order
  (:func:`tiny_pipelines.probe_token_order`).
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from _integration import three_run
from sparsediff.pipelines.base import bind_forward_inputs, get_adapter
from sparsediff.pipelines.sdpa import SDPA_F, dispatch_processor
from tiny_pipelines import (
    build,
    capture_transformer_call,
    corner_positions,
    expected_token,
    last_sample,
    probe_token_order,
)

from sparsediff.layout import TokenLayout
from sparsediff.plan import Plan

MODELS = ("cogvideox", "mochi", "sd3", "ltx")
ADAPTER_OF = {"cogvideox": "cogvideox", "mochi": "mochi", "sd3": "sd3", "ltx": "ltx"}


@pytest.fixture(scope="module", params=MODELS)
def tiny(request):
    return build(request.param)


def _processors(tiny):
    adapter = get_adapter(tiny.pipe.transformer)
    return [(n, m, m.processor) for n, m in adapter.attention_modules(tiny.pipe.transformer)]


def test_three_runs(tiny):
    """Shared three-run test (tests/_integration.py) with ``strict=True``: any dense fallback raises."""
    n_layers = len(_processors(tiny))
    densities = three_run(tiny, strict=True)["transformer"]
    # every self-attention layer ran sparse (SD3.5 attn2: image-only calls re-fit the layout)
    assert len(densities) == n_layers, f"{tiny.name}: sparse layers {sorted(densities)} of {n_layers}"


def test_pipeline_method_and_disable_restore(tiny):
    """``pipe.enable_sparse_attention`` installs the drop-in processors (SDPA models) and disable puts
    the original processor objects back."""
    before = _processors(tiny)
    handle = tiny.pipe.enable_sparse_attention(Plan.dense(), backend="reference")
    try:
        during = _processors(tiny)
        for (n, _, p0), (_, _, p1) in zip(before, during):
            assert p1 is not p0 and isinstance(p1, type(p0)), n
            assert type(p1).__name__.startswith("Sparse"), type(p1).__name__
    finally:
        handle.disable()
    after = _processors(tiny)
    assert all(p0 is p1 for (_, _, p0), (_, _, p1) in zip(before, after)), (
        f"{tiny.name}: processors not restored"
    )


def test_adapter_layout_is_token_order(tiny):
    name = tiny.name
    transformer = tiny.pipe.transformer
    adapter = get_adapter(transformer)
    assert adapter.name == ADAPTER_OF[name]
    call = capture_transformer_call(tiny)
    # the layout the adapter reports for one (conditional) sample == the declared layout ...
    reported = adapter.layout(transformer, bind_forward_inputs(transformer, (), last_sample(call)))
    assert reported == tiny.layout, f"{name}: adapter layout {reported} != declared {tiny.layout}"
    # ... which is the actual token order of the first self-attention layer (planted signal)
    positions = corner_positions(reported)
    n, changed = probe_token_order(tiny, positions, inputs=call)
    assert n == reported.num_tokens
    assert changed == [[expected_token(reported, *p)] for p in positions], f"{name}: {changed}"


def test_adapter_layout_batched_call():
    """Mochi: the batched CFG call reports the longest valid prompt; each per-sample SDPA call re-fits it
    (``Adapter.refit_text``, done by the hooks at run time)."""
    tiny = build("mochi")
    transformer = tiny.pipe.transformer
    call = capture_transformer_call(tiny)
    layout = get_adapter(transformer).layout(transformer, bind_forward_inputs(transformer, (), call))
    cond, neg = tiny.layout.segments[-1].length, tiny.extra["negative_text_len"]
    assert cond != neg  # the two CFG samples really have different prompt lengths
    assert layout == TokenLayout.video(*tiny.layout.grid, text_len=max(cond, neg), text_position="after")
    assert get_adapter(transformer).refit_text
    assert layout.refit_text(tiny.layout.grid_len + neg) == TokenLayout.video(
        *tiny.layout.grid, text_len=neg, text_position="after"
    )


def test_refit_text_is_opt_in():
    """Without ``Adapter.refit_text`` a call whose length differs from the layout (SD3.5 image-only
    ``attn2``) is not re-fitted: it falls back to dense, which ``strict=True`` turns into an error."""
    import dataclasses

    from _integration import SPARSE_KW, SPARSE_PLAN

    import sparsediff.api as api
    from sparsediff.hooks import apply_sparse_attention, remove_sparse_attention

    tiny = build("sd3")
    t = tiny.pipe.transformer
    call = last_sample(capture_transformer_call(tiny))
    call["return_dict"] = False
    adapter = dataclasses.replace(get_adapter(t), refit_text=False)
    cfg = api.SparseAttentionConfig().updated(**SPARSE_KW, strict=True)
    plan = api.resolve_plan(SPARSE_PLAN, adapter).with_overrides(dense_steps=0, dense_layers=(), min_tokens=0)
    apply_sparse_attention(t, plan, cfg, adapter=adapter)
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match=r"sequence length 96 != layout"):
            t(**call)
    finally:
        remove_sparse_attention(t)


def test_redirect_is_local_to_the_drop_in():
    """Only the drop-in's own function object sees the rerouted ``F``: the diffusers module's ``F``, torch
    and the original processor class are untouched, and ``SDPA_F`` is ``torch.nn.functional`` otherwise."""
    import diffusers.models.attention_processor as ap

    cls = dispatch_processor(ap.JointAttnProcessor2_0)
    assert ap.F is F and F.scaled_dot_product_attention is torch._C._nn.scaled_dot_product_attention
    assert ap.JointAttnProcessor2_0.__call__.__globals__["F"] is F
    assert cls.__call__ is not ap.JointAttnProcessor2_0.__call__
    assert SDPA_F.scaled_dot_product_attention is not F.scaled_dot_product_attention
    assert SDPA_F.pad is F.pad and SDPA_F.gelu is F.gelu
    q = torch.randn(1, 2, 5, 16)
    # outside a drop-in call, SDPA_F's SDPA is the real one
    assert torch.equal(SDPA_F.scaled_dot_product_attention(q, q, q), F.scaled_dot_product_attention(q, q, q))


def test_drop_in_is_bit_identical_without_sparsediff():
    """A drop-in processor (no sparsediff hooks, native backend) == the original processor, bit for bit."""
    tiny = build("sd3")
    transformer = tiny.pipe.transformer
    call = last_sample(capture_transformer_call(tiny))
    call["return_dict"] = False
    with torch.no_grad():
        base = transformer(**call)[0]
        procs = {n: m.processor for n, m in transformer.named_modules() if hasattr(m, "processor")}
        try:
            for m in transformer.modules():
                if hasattr(m, "processor"):
                    new = object.__new__(dispatch_processor(type(m.processor)))
                    vars(new).update(vars(m.processor))
                    m.processor = new
            out = transformer(**call)[0]
        finally:
            for n, m in transformer.named_modules():
                if n in procs:
                    m.processor = procs[n]
    assert torch.equal(out, base)


def test_drop_in_keeps_signature_and_math():
    from diffusers.models.attention_processor import (
        CogVideoXAttnProcessor2_0,
        JointAttnProcessor2_0,
        MochiAttnProcessor2_0,
    )

    for base in (CogVideoXAttnProcessor2_0, MochiAttnProcessor2_0, JointAttnProcessor2_0):
        cls = dispatch_processor(base)
        assert issubclass(cls, base) and cls is dispatch_processor(base)
        assert inspect.signature(cls.__call__) == inspect.signature(base.__call__)
        assert cls._attention_backend is None and cls._parallel_config is None


def test_drop_in_compiles_without_graph_breaks():
    """The drop-in processor is traceable: CogVideoX blocks compile with ``fullgraph=True`` (sparse plan),
    one graph per block, output == eager."""
    import torch._dynamo
    from _integration import SPARSE_KW, SPARSE_PLAN

    import sparsediff.api as api

    tiny = build("cogvideox")
    t = tiny.pipe.transformer
    call = last_sample(capture_transformer_call(tiny))
    call["return_dict"] = False
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    try:
        with torch.no_grad():
            api.enable_sparse_attention(t, SPARSE_PLAN, **SPARSE_KW, strict=True)
            eager = t(**call)[0]
            for block in t.transformer_blocks:
                block.compile(fullgraph=True, backend="aot_eager")
            compiled = t(**call)[0]
        api.disable_sparse_attention(t)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == len(t.transformer_blocks), dict(counters["stats"])
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_mochi_per_sample_calls_keep_their_own_layer_state(monkeypatch):
    """Mochi attends once per CFG sample, and the two prompts have different valid lengths: each of a
    layer's attention calls must keep its own LayerState across steps (a shared one would be reset on
    every call, and lse_cache heads would never reuse their cached block selection)."""
    from sparsediff.attention import LayerState

    tiny = build("mochi")
    rebinds, used = [], {}
    orig_bind = LayerState._bind

    def spy(self, layout, q, step):
        if self.key is not None and self.key[0] != layout:
            rebinds.append((self.key[0], layout))
        used.setdefault(id(self), set()).add(layout)
        return orig_bind(self, layout, q, step)

    monkeypatch.setattr(LayerState, "_bind", spy)
    n_layers = len(_processors(tiny))
    plan = Plan.uniform("lse_cache", recall=0.9, refresh=2, dense_steps=1, dense_layers=())
    with tiny.pipe.enable_sparse_attention(plan, backend="reference", block_size=16, strict=True):
        out = tiny(num_inference_steps=4)
    assert torch.isfinite(out).all()
    assert not rebinds, f"LayerState re-bound to another layout {len(rebinds)}x: {rebinds[:2]}"
    # two states per layer (one per CFG sample), each bound to one layout; the two layouts differ
    assert len(used) == 2 * n_layers, (len(used), n_layers)
    assert all(len(layouts) == 1 for layouts in used.values())
    assert len({next(iter(v)) for v in used.values()}) == 2
