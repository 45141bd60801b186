"""Works with: diffusers' caches, offloading, layerwise casting, regional compile and LoRA, with sparse
attention on (the rows of docs/works_with.md; context parallelism: tests/test_context_parallel.py).

Per feature, on a tiny pipeline (tests/tiny_pipelines.py, 2 layers, CPU, the PyTorch twin):

* sparse attention really ran with the feature on (sparse op calls, every density in (0, 1), output
  different from the feature alone), in both enable orders;
* ``disable_sparse_attention`` gives back the feature-only output bit for bit, and removing the feature
  afterwards gives back the plain pipeline bit for bit.

Cross-step state under caches that skip work (FirstBlockCache skips the tail blocks, MagCache every block,
PyramidAttentionBroadcast / FasterCache / TaylorSeer skip attention calls, FasterCache also drops the
unconditional half of a batched-CFG call): every ``sparse_attention`` call is recorded with the *true*
denoising step (counted by the pipeline's ``callback_on_step_end``) and CFG branch (the transformer call's
index within its step), and the lse_cache rule is replayed independently per (layer, branch) stream:
step == true step; the cached LSE is the exact LSE of the stream's own previous call; a mask is
selected exactly when ``refresh`` denoising steps have passed since the stream's last selection (from
that LSE, bit-equal to :func:`lse_cache_select`), else the stream's own last mask is used. skip heads
serve exactly the output of the stream's own last dense call, and a refresh step the cache skipped for a
layer is made up at the layer's next call of that stream (FirstBlockCache). The dense warm-up (``dense_steps``) is checked the
same way: dense exactly at the first denoising steps, however many transformer calls a step makes and
whatever the cache skipped. The tiny pipelines use the default softmax scale (``_exact_lse``).
"""

from __future__ import annotations

import ast
import contextlib
import io
import math
import tempfile
from dataclasses import dataclass
from unittest import mock

import diffusers.hooks as hooks
import pytest
import torch
from _integration import SPARSE_KW, SPARSE_PLAN
from tiny_pipelines import build

import sparsediff.attention as sd_attention
from sparsediff.hooks import get_state
from sparsediff.patterns.lse_cache import lse_cache_select
from sparsediff.plan import Plan

#: lse_cache on every head: small refresh so that a few steps show selections and reuses
LSE_REFRESH = 3
LSE_RECALL = 0.9
LSE_PLAN = Plan.uniform("lse_cache", recall=LSE_RECALL, refresh=LSE_REFRESH)


def _cache_config(name: str, pipe, mag_ratios=None):
    """The cache ``name`` configured so that it skips work on the tiny model within a few steps."""
    cfg = getattr(hooks, _CACHES[name].config_class, None)
    if cfg is None:
        pytest.skip(f"diffusers {_diffusers_version()} has no diffusers.hooks.{_CACHES[name].config_class}")
    ts = lambda: pipe.current_timestep  # noqa: E731 (what diffusers' docs pass)
    if name == "first_block_cache":
        # relative change of the first block's residual on tiny Wan grows from 0.07 (step 1) to 0.26
        # (step 5): 0.1 skips the tail block at steps 1 and 2 and computes it at 0, 3, 4, 5
        return cfg(threshold=0.1)
    if name == "pyramid_attention_broadcast":
        return cfg(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            current_timestep_callback=ts,
        )
    if name == "faster_cache":
        return cfg(
            spatial_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(-1, 1001),
            # the unconditional half is computed at step 0 only: batch 2, then batch 1 (attention at steps
            # 2, 4, 6 of the batch-1 calls, FasterCache's approximation in between)
            unconditional_batch_skip_range=100,
            unconditional_batch_timestep_skip_range=(-1, 1001),
            current_timestep_callback=ts,
            attention_weight_callback=lambda _: 0.5,
            tensor_format="BFCHW",  # CogVideoX latents
        )
    if name == "taylorseer_cache":
        # the default identifiers fullmatch "blocks.0.attn" (Flux naming); Wan's are attn1 / attn2
        return cfg(
            cache_interval=2,
            disable_cache_before_step=1,
            taylor_factors_dtype=torch.float32,
            cache_identifiers=[r"blocks\.\d+\.attn1"],
        )
    if name == "mag_cache":
        # calibrated ratios; threshold high and max_skip_steps=1: compute, skip, compute, ...
        return cfg(
            threshold=1e3,
            max_skip_steps=1,
            retention_ratio=1 / _CACHES[name].steps,
            num_inference_steps=_CACHES[name].steps,
            mag_ratios=mag_ratios,
        )
    raise AssertionError(name)


def _diffusers_version() -> str:
    import diffusers

    return diffusers.__version__


@dataclass(frozen=True)
class _Cache:
    config_class: str
    model: str  # tiny pipeline
    steps: int


_CACHES = {
    "first_block_cache": _Cache("FirstBlockCacheConfig", "wan", 6),
    "pyramid_attention_broadcast": _Cache("PyramidAttentionBroadcastConfig", "cogvideox", 5),
    "faster_cache": _Cache("FasterCacheConfig", "cogvideox", 8),
    "taylorseer_cache": _Cache("TaylorSeerCacheConfig", "wan", 5),
    "mag_cache": _Cache("MagCacheConfig", "wan", 6),
}


@pytest.fixture(scope="module")
def mag_ratios():
    """MagCache's magnitude ratios of tiny Wan, calibrated the documented way (``calibrate=True``, one
    run, the printed list)."""
    cfg = getattr(hooks, "MagCacheConfig", None)
    if cfg is None:
        pytest.skip(f"diffusers {_diffusers_version()} has no diffusers.hooks.MagCacheConfig")
    tiny = build("wan")
    steps = _CACHES["mag_cache"].steps
    tiny.pipe.transformer.enable_cache(cfg(calibrate=True, num_inference_steps=steps))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tiny(num_inference_steps=steps)
    lists = [ln for ln in buf.getvalue().splitlines() if ln.startswith("[") and not ln.startswith("[Mag")]
    assert lists, f"MagCache calibration printed no ratios: {buf.getvalue()!r}"
    ratios = ast.literal_eval(lists[0])
    assert len(ratios) == steps and all(math.isfinite(r) and r > 0 for r in ratios), ratios
    return ratios


def _enable_cache(tiny, name, mag_ratios):
    tiny.pipe.transformer.enable_cache(_cache_config(name, tiny.pipe, mag_ratios))


# ---------------------------------------------------------------------------------------- recording
@dataclass
class _Call:
    """One ``sparse_attention`` call, with the truth counted outside sparsediff."""

    gen: int
    layer: int
    state: object  # the LayerState it used
    true_step: int
    true_branch: int  # transformer call within the true step
    step: int | None  # what sparsediff passed
    force_dense: bool
    batch: int
    q: torch.Tensor
    k: torch.Tensor
    dense_tokens: torch.Tensor
    lse_before: torch.Tensor | None
    mask: object  # the mask the call used
    selected: bool  # lse_cache selected a mask in this call
    out: torch.Tensor  # what the call returned
    full_lse: torch.Tensor | None = None  # exact LSE of this call under its mask (filled later)


class _Truth:
    """True denoising step / branch of each transformer call: ``callback_on_step_end`` counts steps, a
    forward pre-hook counts the transformer's calls within a step."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.gen = -1
        self.step = 0
        self.branch = -1
        self.calls: list[tuple[int, int, int]] = []  # (gen, step, branch) per transformer call
        self._h = transformer.register_forward_pre_hook(self._pre)

    def _pre(self, module, args):
        self.branch += 1
        self.calls.append((self.gen, self.step, self.branch))

    def new_generation(self) -> None:
        self.gen, self.step, self.branch = self.gen + 1, 0, -1

    def callback(self, pipe, i, t, kwargs):
        assert i == self.step, (i, self.step)
        self.step, self.branch = self.step + 1, -1
        return {}

    def close(self) -> None:
        self._h.remove()


@contextlib.contextmanager
def _recording(pipe, truth: _Truth):
    """Record every ``sparse_attention`` call of the per-layer dispatch (looked up on the module at call
    time) with the LayerState it used and what lse_cache did in it."""
    real = sd_attention.sparse_attention
    calls: list[_Call] = []

    def recorded(q, k, v, layout, head_specs, state=None, **kw):
        root = get_state(pipe.transformer)
        layer = next(ly.index for ly in root.layers if any(s is state for s in ly.states.values()))
        slot = state.family_states.get("lse_cache")
        lse_before = None if slot is None or slot.lse is None else slot.lse.clone()
        before = dict(slot.indices) if slot is not None else {}
        out = real(q, k, v, layout, head_specs, state, **kw)
        after_slot = state.family_states.get("lse_cache")
        if slot is not None and after_slot is not slot:
            lse_before, before = None, {}  # the state was reset (new batch / layout / generation)
        after = dict(after_slot.indices) if after_slot is not None else {}
        selected = any(before.get(key) is not val for key, val in after.items())
        gen, true_step, true_branch = truth.calls[-1]
        calls.append(
            _Call(
                gen,
                layer,
                state,
                true_step,
                true_branch,
                kw.get("step"),
                bool(kw.get("force_dense")),
                q.shape[0],
                q.detach().clone(),
                k.detach().clone(),
                layout.dense_mask(q.device),
                lse_before,
                state.last_mask,
                selected,
                out.detach().clone(),
            )
        )
        return out

    with mock.patch.object(sd_attention, "sparse_attention", recorded):
        yield calls


def _exact_lse(q: torch.Tensor, k: torch.Tensor, mask) -> torch.Tensor:
    """``[B, H, N]`` float64 log-sum-exp of ``q k^T * D^-0.5`` over the keys ``mask`` keeps."""
    logits = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = mask.to_token_mask().to(q.device).expand(q.shape[0], q.shape[1], -1, -1)
    return torch.logsumexp(logits.masked_fill(~keep, float("-inf")), -1)


def _same_mask(a, b) -> bool:
    return a is b or (a.shape == b.shape and torch.equal(a.to_dense(), b.to_dense()))


def _run_recorded(tiny, steps: int, generations: int = 2):
    """Run ``generations`` pipeline calls with sparse attention enabled (by the caller), recording."""
    truth = _Truth(tiny.pipe.transformer)
    try:
        with _recording(tiny.pipe, truth) as calls:
            for _ in range(generations):
                truth.new_generation()
                tiny(num_inference_steps=steps, callback_on_step_end=truth.callback)
    finally:
        truth.close()
    return calls, truth


def _check_lse_cache_streams(calls: list[_Call], dense_steps: int, expect_gaps: bool) -> dict:
    """Replay the lse_cache rule per (generation, layer, true branch) stream; returns a summary."""
    assert calls, "no sparse_attention call was recorded"
    streams: dict[tuple, list[_Call]] = {}
    for c in calls:
        assert c.step == c.true_step, (
            f"layer {c.layer}: sparsediff took denoising step {c.step} for a call of step {c.true_step} "
            f"(branch {c.true_branch}, generation {c.gen})"
        )
        streams.setdefault((c.gen, c.layer, c.true_branch, c.batch), []).append(c)
    owners: dict[int, tuple] = {}
    summary = {"selections": 0, "reuses": 0, "seeds": 0, "warmup": 0, "gaps": 0}
    for key, seq in streams.items():
        for c in seq:  # one LayerState per stream, never shared with another branch or generation
            assert owners.setdefault(id(c.state), key) == key, (
                f"layer {key[1]}: one LayerState serves streams {owners[id(c.state)]} and {key}"
            )
        steps = [c.true_step for c in seq]
        summary["gaps"] += sum(b - a > 1 for a, b in zip(steps, steps[1:]))
        prev = last_sel = None
        for c in seq:
            where = f"stream {key} (generation, layer, branch, batch), step {c.true_step}"
            restart = prev is None
            if restart:
                assert c.lse_before is None, f"{where}: cached LSE present at the stream's first call"
                last_sel = None
            else:
                assert c.lse_before is not None, f"{where}: the LSE of the stream's previous call is missing"
                torch.testing.assert_close(
                    c.lse_before.double(),
                    prev.full_lse,
                    atol=1e-4,
                    rtol=1e-5,
                    msg=lambda m, w=where: f"{w}: the cached LSE is not the stream's previous call's: {m}",
                )
            c.full_lse = _exact_lse(c.q, c.k, c.mask)
            if c.true_step < dense_steps:
                assert c.force_dense and not c.selected and c.mask.density() == 1.0, f"{where}: not dense"
                summary["warmup"] += 1
            elif restart:
                assert not c.selected and c.mask.density() == 1.0, f"{where}: no LSE yet, must seed densely"
                summary["seeds"] += 1
            elif last_sel is None or c.true_step - last_sel.true_step >= LSE_REFRESH:
                assert c.selected, f"{where}: a selection was due (last at {last_sel and last_sel.true_step})"
                want, _ = lse_cache_select(
                    c.q, c.k, c.lse_before, c.dense_tokens, SPARSE_KW["block_size"], recall=LSE_RECALL,
                    backend="reference",
                )  # fmt: skip
                assert _same_mask(c.mask, want), f"{where}: the mask is not the selection from its LSE"
                last_sel = c
                summary["selections"] += 1
            else:
                assert not c.selected, (
                    f"{where}: selected again {c.true_step - last_sel.true_step} steps later"
                )
                assert _same_mask(c.mask, last_sel.mask), (
                    f"{where}: reused a mask that is not the stream's own from step {last_sel.true_step}"
                )
                summary["reuses"] += 1
            prev = c
    assert summary["selections"] and summary["reuses"], summary
    if expect_gaps:
        assert summary["gaps"], f"the cache skipped no attention call of any stream: {summary}"
    return summary


# ---------------------------------------------------------------------------------------- the rows
def _outputs_differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape != b.shape or not torch.equal(a, b)


def _assert_ran_sparse(handle, what: str) -> None:
    for name, rep in handle.report().items():
        assert rep["sparse_calls"] > 0, f"{what}: {name} never ran sparse: {rep}"
        d = rep["densities"]
        assert d and all(0 < x < 1 for x in d.values()), f"{what}: {name} densities {d}"


@pytest.mark.parametrize("order", ["cache_then_sparse", "sparse_then_cache"])
@pytest.mark.parametrize("name", list(_CACHES))
def test_cache_composes_with_sparse_attention(name, order, request):
    """cache alone != plain (it does something); cache + sparse: ran sparse, != cache alone; disable
    sparse == cache alone (bit); disable the cache too == plain (bit) -- in either enable order."""
    spec = _CACHES[name]
    ratios = request.getfixturevalue("mag_ratios") if name == "mag_cache" else None
    tiny = build(spec.model)
    pipe, kw = tiny.pipe, dict(num_inference_steps=spec.steps)
    plain = tiny(**kw)
    _enable_cache(tiny, name, ratios)
    cache_only = tiny(**kw)
    assert _outputs_differ(cache_only, plain), f"{name} changed nothing on tiny {spec.model}"
    if order == "sparse_then_cache":
        pipe.transformer.disable_cache()
        h = pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
        _enable_cache(tiny, name, ratios)
    else:
        h = pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    both = tiny(**kw)
    _assert_ran_sparse(h, f"{name} ({order})")
    assert torch.isfinite(both).all()
    assert _outputs_differ(both, cache_only), f"{name} ({order}): sparse attention changed nothing"
    pipe.disable_sparse_attention()
    after = tiny(**kw)
    assert torch.equal(after, cache_only), (
        f"{name} ({order}): after disable_sparse_attention the output differs from {name} alone by "
        f"{(after - cache_only).abs().max():.3g}"
    )
    pipe.transformer.disable_cache()
    assert torch.equal(tiny(**kw), plain), f"{name} ({order}): plain pipeline not restored"


@pytest.mark.parametrize("name", list(_CACHES))
def test_lse_cache_state_under_skipping_caches(name, request):
    """lse_cache heads with a cache that skips blocks, steps or attention calls: the rule replayed per
    (layer, branch) stream holds over two generations (module docstring)."""
    spec = _CACHES[name]
    ratios = request.getfixturevalue("mag_ratios") if name == "mag_cache" else None
    tiny = build(spec.model)
    _enable_cache(tiny, name, ratios)
    h = tiny.pipe.enable_sparse_attention(LSE_PLAN, **SPARSE_KW)
    try:
        calls, truth = _run_recorded(tiny, spec.steps)
    finally:
        h.disable()
    _check_lse_cache_streams(calls, dense_steps=0, expect_gaps=True)
    if name == "faster_cache":  # the unconditional half was dropped in some calls: batch 2 and batch 1
        assert {c.batch for c in calls} == {1, 2}, {c.batch for c in calls}


#: skip on every head: outputs stored at the dense warm-up step 0 and refreshed at step 2
SKIP_REFRESH_STEPS = (2,)
SKIP_PLAN = Plan.uniform("skip", refresh_steps=SKIP_REFRESH_STEPS)


@pytest.mark.parametrize("name", list(_CACHES))
def test_skip_heads_under_skipping_caches(name, request):
    """skip heads with a cache that skips work: per (layer, branch) stream, every call that is not a
    dense call (warm-up, a refresh step -- or the first call after a refresh step the cache skipped --,
    the stream's first call) returns exactly the output of the stream's own last dense call -- never
    another branch's, generation's or batch's."""
    spec = _CACHES[name]
    ratios = request.getfixturevalue("mag_ratios") if name == "mag_cache" else None
    tiny = build(spec.model)
    _enable_cache(tiny, name, ratios)
    h = tiny.pipe.enable_sparse_attention(SKIP_PLAN, **{**SPARSE_KW, "dense_steps": 1})
    try:
        calls, _ = _run_recorded(tiny, spec.steps)
    finally:
        h.disable()
    streams: dict[tuple, list[_Call]] = {}
    for c in calls:
        assert c.step == c.true_step, (c.layer, c.step, c.true_step)
        streams.setdefault((c.gen, c.layer, c.true_branch, c.batch), []).append(c)
    served = refreshed = 0
    for key, seq in streams.items():
        prev = source = None
        for c in seq:
            where = f"stream {key} (generation, layer, branch, batch), step {c.true_step}"
            last = -1 if prev is None else prev.true_step
            due = c.true_step < 1 or any(last < r <= c.true_step for r in SKIP_REFRESH_STEPS)
            assert c.force_dense == due, f"{where}: force_dense={c.force_dense}, expected {due}"
            if due or prev is None:
                source = c  # computed densely, its output stored
                refreshed += bool(due and c.true_step >= 1)
            else:
                assert torch.equal(c.out, source.out), (
                    f"{where}: served an output that is not the stream's own from step {source.true_step}"
                )
                served += 1
            prev = c
    assert served and refreshed, (served, refreshed)


@pytest.mark.parametrize("name", ["first_block_cache", "mag_cache"])
def test_dense_warmup_counts_denoising_steps_not_transformer_calls(name, request):
    """``dense_steps=2`` on tiny Wan (CFG: 2 transformer calls per step) with a cache skipping blocks:
    dense exactly at denoising steps 0 and 1 -- for a static pattern (no sparse op call before step 2,
    every later attention call sparse) and for lse_cache heads (forced dense, then the stream rule)."""
    spec = _CACHES[name]
    ratios = request.getfixturevalue("mag_ratios") if name == "mag_cache" else None
    tiny = build(spec.model)
    _enable_cache(tiny, name, ratios)
    truth = _Truth(tiny.pipe.transformer)
    observed: list[
        tuple[int, int, int | None]
    ] = []  # per attention call: true step, layer, sparsediff's step
    kw = {**SPARSE_KW, "dense_steps": 2}
    kw["observer"] = lambda c: observed.append((truth.calls[-1][1], c.layer, c.step))
    h = tiny.pipe.enable_sparse_attention(SPARSE_PLAN, **kw)
    try:
        with _recording(tiny.pipe, truth) as calls:
            truth.new_generation()
            tiny(num_inference_steps=spec.steps, callback_on_step_end=truth.callback)
    finally:
        truth.close()
        h.disable()
    assert max(b for _, _, b in truth.calls) == 1, "tiny Wan makes two transformer calls per step (CFG)"
    assert all(s == t for t, _, s in observed), observed
    late = [(t, layer) for t, layer, _ in observed if t >= 2]
    assert late and all(c.true_step >= 2 and not c.force_dense for c in calls), [c.true_step for c in calls]
    assert sorted((c.true_step, c.layer) for c in calls) == sorted(late), (
        "an attention call after the warm-up ran dense"
    )

    tiny = build(spec.model)
    _enable_cache(tiny, name, ratios)
    h = tiny.pipe.enable_sparse_attention(LSE_PLAN, **{**SPARSE_KW, "dense_steps": 1})
    try:
        calls, _ = _run_recorded(tiny, spec.steps, generations=1)
    finally:
        h.disable()
    summary = _check_lse_cache_streams(calls, dense_steps=1, expect_gaps=False)
    assert summary["warmup"] and not summary["seeds"], summary


# ------------------------------------------------------------------ offloading, casting, compile, LoRA
def _group_offload(kind: str, stream: bool):
    def apply(pipe):
        extra = {"num_blocks_per_group": 1} if kind == "block_level" else {}
        pipe.transformer.enable_group_offload(
            torch.device("cuda" if stream else "cpu"),
            offload_device=torch.device("cpu"),
            offload_type=kind,
            use_stream=stream,
            **extra,
        )

    return apply


def _layerwise_casting(pipe):
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)


def _compile_blocks(pipe):
    import torch._dynamo

    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks(fullgraph=True, backend="aot_eager")


_FEATURES = {
    "group_offload_block": _group_offload("block_level", False),
    "group_offload_leaf": _group_offload("leaf_level", False),
    "group_offload_block_stream": _group_offload("block_level", True),
    "group_offload_leaf_stream": _group_offload("leaf_level", True),
    "layerwise_casting": _layerwise_casting,
    "compile_repeated_blocks": _compile_blocks,
}


def _with_feature(name: str):
    tiny = build("wan")
    if name.endswith("_stream"):
        tiny.pipe.to("cuda")
    return tiny


@pytest.mark.parametrize("order", ["feature_then_sparse", "sparse_then_feature"])
@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.gpu) if n.endswith("_stream") else n for n in _FEATURES],
)
def test_model_feature_composes_with_sparse_attention(name, order):
    """Group offloading (block / leaf level; with CUDA streams on a GPU), layerwise casting (fp8 storage)
    and regional compile: sparse ran and changed the output; after disable the output equals that of a
    pipeline that only ever had the feature (bit)."""
    ref = _with_feature(name)
    _FEATURES[name](ref.pipe)
    alone = ref()
    tiny = _with_feature(name)
    pipe = tiny.pipe
    if order == "feature_then_sparse":
        _FEATURES[name](pipe)
        h = pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    else:
        h = pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
        _FEATURES[name](pipe)
    try:
        both = tiny()
        _assert_ran_sparse(h, f"{name} ({order})")
    finally:
        pipe.disable_sparse_attention()
    after = tiny()
    assert torch.isfinite(both).all()
    assert _outputs_differ(both, alone), f"{name} ({order}): sparse attention changed nothing"
    assert torch.equal(after, alone), (
        f"{name} ({order}): after disable the output differs from {name} alone by "
        f"{(after - alone).abs().max():.3g}"
    )
    if name == "compile_repeated_blocks":
        torch._dynamo.reset()


@pytest.fixture(scope="module")
def lora_dir():
    """A LoRA of tiny Wan's attention projections (random, non-zero) saved with diffusers' own API."""
    peft = pytest.importorskip("peft")
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    src = build("wan").pipe.transformer
    torch.manual_seed(1)
    cfg = peft.LoraConfig(
        r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False
    )
    src.add_adapter(cfg, adapter_name="ww")
    with tempfile.TemporaryDirectory() as d:
        WanPipeline.save_lora_weights(
            d, transformer_lora_layers=get_peft_model_state_dict(src, adapter_name="ww")
        )
        yield d


@pytest.mark.parametrize("order", ["lora_then_sparse", "sparse_then_lora"])
def test_lora_load_fuse_unfuse_unload_with_sparse_attention(lora_dir, order):
    """``load_lora_weights`` with sparse on (either order): ran sparse, differs from the LoRA alone;
    disable == a pipeline that only ever loaded the LoRA (bit). ``fuse_lora`` / ``unfuse_lora`` /
    ``unload_lora_weights`` with sparse on: each state runs sparse and matches the unfused sparse
    output (fused: float rounding of the merged weights), unloaded ~ sparse without LoRA."""
    ref = build("wan")
    ref.pipe.load_lora_weights(lora_dir, adapter_name="ww")
    lora_only = ref()
    tiny = build("wan")
    pipe = tiny.pipe
    plain = tiny()
    with pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW):
        sparse_plain = tiny()
    if order == "lora_then_sparse":
        pipe.load_lora_weights(lora_dir, adapter_name="ww")
        h = pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    else:
        h = pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
        pipe.load_lora_weights(lora_dir, adapter_name="ww")
    sparse_lora = tiny()
    _assert_ran_sparse(h, f"LoRA ({order})")
    pipe.disable_sparse_attention()
    assert torch.equal(tiny(), lora_only), f"LoRA ({order}): disable did not restore the LoRA-only output"
    assert _outputs_differ(lora_only, plain), "the LoRA changed nothing"
    assert _outputs_differ(sparse_lora, lora_only), "sparse attention changed nothing with the LoRA loaded"
    assert _outputs_differ(sparse_lora, sparse_plain), "the LoRA changed nothing under sparse attention"

    h = pipe.enable_sparse_attention(SPARSE_PLAN, **SPARSE_KW)
    close = dict(rtol=1e-4, atol=1e-5)  # fusing adds the LoRA delta into the weights: float rounding
    pipe.fuse_lora(adapter_names=["ww"])
    torch.testing.assert_close(tiny(), sparse_lora, **close)
    pipe.unfuse_lora()
    torch.testing.assert_close(tiny(), sparse_lora, **close)
    pipe.unload_lora_weights()
    torch.testing.assert_close(tiny(), sparse_plain, **close)
    _assert_ran_sparse(h, "LoRA unloaded")
    pipe.disable_sparse_attention()
    torch.testing.assert_close(tiny(), plain, **close)
