"""Wan 2.1 / 2.2 (dual transformer) / VACE / SkyReels-V2 wired through the generic hooks."""

from __future__ import annotations

import inspect

import pytest
import torch
from _integration import SPARSE_KW, SPARSE_PLAN, three_run
from sparsediff.pipelines.base import UnsupportedModelError, get_adapter
from tiny_pipelines import _wan_transformer, build

import sparsediff.api as api
import sparsediff.attention as sd_attention
from sparsediff.hooks import get_state
from sparsediff.layout import TokenLayout
from sparsediff.plan import Plan


@pytest.mark.parametrize("name", ["wan", "wan22", "wan_vace", "skyreels_v2"])
def test_three_runs(name):
    three_run(build(name))


def test_adapter_layout_matches_pipeline_layout():
    tiny = build("wan")
    seen = []
    h = api.enable_sparse_attention(tiny.pipe, "dense", backend="reference")
    state = h.states["transformer"]
    orig = state.begin_call

    def spy(inputs):
        orig(inputs)
        seen.append(state.layout)

    state.begin_call = spy
    tiny()
    h.disable()
    assert seen and all(layout == tiny.layout for layout in seen)


def test_layout_frame_major_planted_signal():
    """Plant (frame, row, col) in the latent and read it back from the tokens entering block 0."""
    t = _wan_transformer().eval()
    f, h, w = 3, 8, 12
    x = torch.zeros(1, 16, f, h, w)
    x[0, 0] = torch.arange(f).view(f, 1, 1).float()
    x[0, 1] = torch.arange(h).view(1, h, 1).float()
    x[0, 2] = torch.arange(w).view(1, 1, w).float()
    with torch.no_grad():  # patch embedding = mean of channel c over the patch, into output channel c
        pe = t.patch_embedding
        pe.weight.zero_()
        pe.bias.zero_()
        for c in range(3):
            pe.weight[c, c] = 1.0 / pe.weight[c, c].numel()
    tokens = {}

    def grab(module, args, kwargs):
        tokens.setdefault("x", args[0] if args else kwargs["hidden_states"])

    hk = t.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    layout = get_adapter(t).layout(t, {"hidden_states": x})
    with torch.no_grad():
        t(x, torch.tensor([10.0]), torch.randn(1, 4, 32))
    hk.remove()
    assert layout == TokenLayout.video(3, 4, 6)
    coords = layout.grid_coords().float()
    got = tokens["x"][0, :, :3].clone()
    got[:, 1:] = (got[:, 1:] - 0.5) / 2  # mean over the 2x2 patch of row/col index -> patch index
    torch.testing.assert_close(got, coords, rtol=0, atol=1e-5)


def test_planted_per_head_mask_matches_independent_computation(monkeypatch):
    """Head 0 dense, head 1 radial: the whole transformer equals a run whose attention is an
    independent per-head SDPA with the densified token mask (no sparsediff hooks involved)."""
    import diffusers.models.transformers.transformer_wan as tw

    from sparsediff.patterns import static_mask
    from sparsediff.specs import HeadSpec

    t = _wan_transformer().eval()
    x = torch.randn(1, 16, 6, 8, 12)
    ts, enc = torch.tensor([700.0]), torch.randn(1, 5, 32)
    layout = TokenLayout.video(6, 4, 6)
    radial = HeadSpec.make("radial", decay=0.05, dense_dist=0)
    specs = [HeadSpec("dense"), radial]
    token_mask = static_mask(layout, radial, 8).to_token_mask()[0, 0]  # [N, N]
    assert 0.3 < token_mask.float().mean() < 0.95

    orig = tw.dispatch_attention_fn

    def oracle(query, key, value, attn_mask=None, **kw):
        if query.shape[1] != key.shape[1]:
            return orig(query, key, value, attn_mask=attn_mask, **kw)
        q, k, v = (z.transpose(1, 2).double() for z in (query, key, value))
        outs = [
            torch.nn.functional.scaled_dot_product_attention(q[:, :1], k[:, :1], v[:, :1]),
            torch.nn.functional.scaled_dot_product_attention(
                q[:, 1:], k[:, 1:], v[:, 1:], attn_mask=token_mask
            ),
        ]
        return torch.cat(outs, 1).transpose(1, 2).to(query.dtype)

    monkeypatch.setattr(tw, "dispatch_attention_fn", oracle)
    with torch.no_grad():
        expected = t(x, ts, enc, return_dict=False)[0]
    monkeypatch.setattr(tw, "dispatch_attention_fn", orig)

    plan = Plan.per_head(t, [specs, specs])
    with torch.no_grad():
        baseline = t(x, ts, enc, return_dict=False)[0]
        with api.sparse_attention_enabled(t, plan, **SPARSE_KW):
            got = t(x, ts, enc, return_dict=False)[0]
    assert not torch.allclose(expected, baseline, atol=1e-3), "the planted mask must matter"
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_step_tracking_with_cfg_calls(monkeypatch):
    """Two transformer calls per step (CFG): the step index advances once per denoising step; the
    warm-up step runs dense (never reaches sparse_attention); the scheduler is left alone."""
    tiny = build("wan")
    sched = tiny.pipe.scheduler
    sig_step, sig_set = inspect.signature(sched.step), inspect.signature(sched.set_timesteps)
    calls = []
    real = sd_attention.sparse_attention

    def spy(*a, **kw):
        calls.append(kw["step"])
        return real(*a, **kw)

    monkeypatch.setattr(sd_attention, "sparse_attention", spy)
    h = api.enable_sparse_attention(tiny.pipe, SPARSE_PLAN, **{**SPARSE_KW, "dense_steps": 1})
    assert inspect.signature(sched.step) == sig_step and inspect.signature(sched.set_timesteps) == sig_set
    state = h.states["transformer"]
    seen = []
    orig = state.begin_call

    def rec(inputs):
        orig(inputs)
        seen.append((state.step_info()[0], state.branch))

    state.begin_call = rec
    tiny()
    assert seen == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert calls == [1] * 4  # 2 layers x 2 CFG calls, only in step 1
    assert state.step_info() == (None, None)  # the generation ended: diffusers reset the root hook
    tiny()  # a second pipeline call starts from step 0 again
    assert seen[4:] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    h.disable()


def test_transformer_without_pipeline_counts_timesteps():
    t = _wan_transformer().eval()
    x, enc = torch.randn(1, 16, 3, 8, 12), torch.randn(1, 4, 32)
    h = api.enable_sparse_attention(t, SPARSE_PLAN, **{**SPARSE_KW, "dense_steps": 0.5, "num_steps": 2})
    st = h.states["transformer"]
    with torch.no_grad():
        for tv in (900.0, 900.0, 500.0):
            t(x, torch.tensor([tv]), enc)
    assert st.step_info() == (1, 2) and st.branch == 0
    h.disable()


def test_enable_twice_and_disable_when_off_raise():
    tiny = build("wan")
    tiny.pipe.enable_sparse_attention()
    with pytest.raises(RuntimeError, match="already enabled"):
        tiny.pipe.enable_sparse_attention("tile")
    tiny.pipe.disable_sparse_attention()
    with pytest.raises(RuntimeError, match="not enabled"):
        tiny.pipe.disable_sparse_attention()
    assert not api.is_sparse_attention_enabled(tiny.pipe)


def test_plan_for_other_model_is_rejected_and_nothing_changes():
    tiny = build("wan")
    from sparsediff.plan import ModelIdentity
    from sparsediff.specs import HeadSpec

    ident = ModelIdentity.of(tiny.pipe.transformer)
    bad = Plan.per_head(
        ModelIdentity(
            ident.transformer_class, "wan", (2, 2, 2), (16, 16, 16), ident.config_hash, ident.config
        ),
        [[HeadSpec("radial")] * 2] * 3,
    )
    with pytest.raises(ValueError, match="layer count: plan has 3 layers, model has 2"):
        tiny.pipe.enable_sparse_attention(bad)
    assert get_state(tiny.pipe.transformer) is None
    assert "step" not in vars(tiny.pipe.scheduler)


def test_unsupported_models_give_the_list():
    with pytest.raises(UnsupportedModelError, match="WanTransformer3DModel") as ei:
        api.enable_sparse_attention(torch.nn.Linear(2, 2))
    assert "register_adapter" in str(ei.value)

    class FakePipe:
        components = {"unet": torch.nn.Linear(2, 2), "scheduler": None}

    with pytest.raises(UnsupportedModelError, match="no transformer component"):
        api.enable_sparse_attention(FakePipe())


@pytest.fixture
def restore_global_backend():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


def test_later_set_attention_backend_is_the_dense_fallback(restore_global_backend):
    tiny = build("wan")
    base = tiny()
    h = api.enable_sparse_attention(tiny.pipe, Plan.dense(), backend="reference")
    tiny.pipe.transformer.set_attention_backend("_native_math")
    assert all(ctx.own_backend.value == "_native_math" for ctx in h.states["transformer"].layers)
    out = tiny()
    tiny.pipe.transformer.reset_attention_backend()
    h.disable()
    torch.testing.assert_close(out, base)
    proc = tiny.pipe.transformer.blocks[0].attn1.processor
    assert proc._attention_backend is None


def test_global_backend_set_to_sparsediff_does_not_recurse(restore_global_backend):
    """Falls back to the native backend (the global one is sparsediff itself)."""
    from diffusers.models.attention_dispatch import attention_backend

    tiny = build("wan")
    with attention_backend("native"):
        base = tiny()
    api.enable_sparse_attention(tiny.pipe, Plan.dense(), backend="reference")
    with attention_backend("sparsediff"):
        out = tiny()
    tiny.pipe.disable_sparse_attention()
    assert torch.equal(out, base)


def test_plan_file_and_per_component_plans(tmp_path, caplog):
    import logging

    tiny = build("wan22")
    path = SPARSE_PLAN.save(tmp_path / "tile.json")
    caplog.set_level(logging.INFO, logger="sparsediff")
    h = api.enable_sparse_attention(
        tiny.pipe, {"transformer": str(path), "transformer_2": Plan.dense()}, **SPARSE_KW
    )
    assert h.plans["transformer"] == SPARSE_PLAN and h.plans["transformer_2"].is_all_dense
    tiny()
    dens = h.densities()
    h.disable()
    assert dens["transformer"] and not dens["transformer_2"]
    text = caplog.text
    assert (
        "sparse attention enabled on transformer " in text
        and "sparse attention enabled on transformer_2" in text
    )
    assert text.count("attention density") == 1  # once, for the transformer that ran sparse
    with pytest.raises(ValueError, match="unknown component"):
        api.enable_sparse_attention(tiny.pipe, {"transformer_3": "tile"})
    with pytest.raises(ValueError, match="neither a pattern name"):
        api.enable_sparse_attention(tiny.pipe, "radiall")
    assert not api.is_sparse_attention_enabled(tiny.pipe)


def test_registered_adapter_wins_and_strict_mode():
    """A user adapter (registered for a subclass) is picked over the built-in one; a layout that does not
    fit the sequence falls back to dense (logged) or raises in strict mode."""
    from diffusers import WanTransformer3DModel
    from sparsediff.pipelines.base import Adapter, register_adapter, unregister_adapter
    from sparsediff.pipelines.wan import wan_layout

    class MyWan(WanTransformer3DModel):
        pass

    def wrong_layout(transformer, inputs):
        g = wan_layout(transformer, inputs).grid
        return TokenLayout.video(g[0] + 1, g[1], g[2])

    register_adapter(
        Adapter(
            name="mywan",
            family="video",
            transformer_classes=("MyWan",),
            self_attention=(r"blocks\.\d+\.attn1",),
            layout_fn=wrong_layout,
        )
    )
    try:
        torch.manual_seed(0)
        t = MyWan(**dict(_wan_transformer().config)).eval()
        assert get_adapter(t).name == "mywan"
        x, ts, enc = torch.randn(1, 16, 3, 8, 12), torch.tensor([900.0]), torch.randn(1, 4, 32)
        with torch.no_grad():
            base = t(x, ts, enc, return_dict=False)[0]
            with api.sparse_attention_enabled(t, SPARSE_PLAN, **SPARSE_KW):
                out = t(x, ts, enc, return_dict=False)[0]
            assert torch.equal(out, base)  # dense fallback
            with api.sparse_attention_enabled(t, SPARSE_PLAN, strict=True, **SPARSE_KW):
                with pytest.raises(RuntimeError, match="strict.*sequence length 72"):
                    t(x, ts, enc, return_dict=False)
        assert get_state(t) is None
    finally:
        unregister_adapter("mywan")


def test_refresh_steps_force_a_dense_cache_refresh(monkeypatch):
    """Plan.refresh_steps: layers with cache-based heads (lse_cache, skip) run an exact pass that
    refreshes their caches at those steps; other steps use the caches."""
    from sparsediff.specs import HeadSpec

    tiny = build("wan")
    calls = []
    real = sd_attention.sparse_attention

    def spy(*a, **kw):
        calls.append((kw["step"], kw["force_dense"]))
        return real(*a, **kw)

    monkeypatch.setattr(sd_attention, "sparse_attention", spy)
    plan = Plan(default=HeadSpec.make("lse_cache", refresh=100), refresh_steps=(1,))
    with api.sparse_attention_enabled(tiny.pipe, plan, **SPARSE_KW):
        out = tiny()
    assert torch.isfinite(out).all()
    assert sorted(set(calls)) == [(0, False), (1, True)]
