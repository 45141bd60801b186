"""Sparse attention under diffusers ring and Ulysses x ring context parallelism, CPU processes on gloo.

Two configurations: ring 2 (2 processes) and Ulysses 2 x ring 2 (4 processes). Per model (Wan: one
video sequence; Flux: text and image split separately, ``cp_split="segments"``) every rank builds the
same tiny transformer (same seed) and inputs, computes the single-process outputs of per-head plans
whose heads differ, then enables ``ContextParallelConfig(ring_degree=2[, ulysses_degree=2])`` and the
same plans (``strict=True``: a dense fallback raises) and compares:

* ``static``: head 0 radial (``dense_dist=0``; Flux, one image frame: a user static family registered
  with ``register_pattern``, a block band plus dense text), head 1 dense;
* ``dynamic``: head 0 top-p (its mask chosen from the all-gathered q/k), head 1 the static head above;
* ``cached``: head 0 lse_cache (second call: blocks selected from the LSE the first call cached, the
  whole sequence's, all-gathered), head 1 dense;
* ``tile`` (not strict): tile permutes tokens -- the layer must fall back to dense with a warning;
* backward (Wan; ``static`` under ring 2, ``dynamic`` under Ulysses x ring): the gradient of a fixed projection of the output with respect to
  the input, summed over ranks (each rank back-propagates its own tokens), equals one process's.

Block size 10: every ring chunk edge (Wan 72 tokens -> chunks of 36; Flux 16 text + 96 image tokens split
per segment) falls inside a block, so the ragged-edge pieces of :mod:`sparsediff.hooks.ring` run; a wrong
chunk offset changes the output. The CPU workaround for diffusers' ``_resolve_parallel_config`` (division
by ``torch.accelerator.device_count() == 0``) is the one of ``test_context_parallel.py``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

_TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _TESTS)

from test_context_parallel import _inputs, _model  # noqa: E402

CONFIGS = {"ring2": (2, 1), "ulysses2_ring2": (2, 2)}  # name -> (ring_degree, ulysses_degree)
MODELS = ("wan", "flux")
PLANS = ("static", "dynamic", "cached", "tile")
BLOCK = 10
_TIMEOUT_S = 240


def _band_mask(layout, spec, block_size, device):
    """A user static family in the natural order: query block i attends key blocks i-1..i+1, and
    blocks holding text tokens attend / are attended in full."""
    from sparsediff.mask import BlockSparseMask

    n = layout.num_tokens
    nb = -(-n // block_size)
    i = torch.arange(nb, device=device)
    keep = (i.view(-1, 1) - i.view(1, -1)).abs() <= 1
    text = layout.dense_mask(device)
    tb = torch.zeros(nb, dtype=torch.bool, device=device)
    tb.index_fill_(0, torch.nonzero(text).flatten() // block_size, True)
    keep = keep | tb.view(-1, 1) | tb.view(1, -1)
    return BlockSparseMask.from_dense(keep[None, None], block_size, (n, n))


def _register_band() -> None:
    import sparsediff

    if "ring_band" not in sparsediff.patterns.registry.registered_patterns():
        sparsediff.register_pattern("ring_band", params={}, static_mask=_band_mask)


def _plan(model: torch.nn.Module, name: str, model_name: str):
    from sparsediff.pipelines.base import get_adapter

    from sparsediff.plan import Plan
    from sparsediff.specs import HeadSpec

    layers = len(get_adapter(model).attention_modules(model))
    # Wan: radial (static, built in); Flux (one image frame: radial keeps everything): a user static family
    static = HeadSpec.make("radial", dense_dist=0) if model_name == "wan" else HeadSpec("ring_band")
    heads = {
        "static": [static, HeadSpec("dense")],
        "dynamic": [HeadSpec.make("topp", top_p=0.5, min_frac=0.0), static],
        "cached": [HeadSpec.make("lse_cache", recall=0.5, refresh=1), HeadSpec("dense")],
        "tile": [HeadSpec.make("tile", window=(1, 1, 1)), HeadSpec("dense")],
    }[name]
    # cached: Wan's step 0 is a refresh step (a forced exact pass whose LSE seeds the cache: on_dense);
    # Flux's has no LSE yet (the family's own full-mask pass seeds it)
    refresh = (0,) if name == "cached" and model_name == "wan" else ()
    return Plan.per_head(model, [heads] * layers, min_tokens=0, refresh_steps=refresh)


def _enable_parallelism(model: torch.nn.Module, ring: int, ulysses: int) -> None:
    from diffusers import ContextParallelConfig

    cfg = ContextParallelConfig(ring_degree=ring, ulysses_degree=ulysses if ulysses > 1 else None)
    try:
        model.enable_parallelism(config=cfg)
        return
    except ZeroDivisionError:
        if torch.accelerator.device_count() != 0:
            raise
    from unittest import mock

    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=cfg)


def _patch_native_lse() -> None:
    """diffusers 0.42.1: no attention backend returns the LSE on CPU, and ring attention needs it (dense
    ring raises "Native attention does not support return_lse=True"). Test workers only: the native
    forward op computes ``(out, lse)`` by explicit math when the ring asks for the LSE (the dense CP
    baseline, and the model's own backend for dense and fallback layers)."""
    from diffusers.models import attention_dispatch as ad

    native = ad._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):  # fmt: skip
        if not return_lse:
            return native(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                          False, _save_ctx, _parallel_config)  # fmt: skip
        if _save_ctx:
            ctx.save_for_backward(query, key, value)
        q, k, v = (x.transpose(1, 2).double() for x in (query, key, value))
        s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
        lse = torch.logsumexp(s, -1)
        out = torch.softmax(s, -1) @ v
        return out.transpose(1, 2).to(query.dtype), lse.transpose(1, 2).float()

    ad._native_attention_forward_op = forward_op


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _worker(rank: int, world: int, ring: int, ulysses: int, init_file: str, out_dir: str, inputs: dict):
    sys.path.insert(0, _TESTS)
    torch.set_num_threads(1)
    _patch_native_lse()
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        for model_name, model_inputs in inputs.items():
            _run_model(rank, ring, ulysses, model_name, out_dir, model_inputs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _masks(handle) -> dict:
    """``{(layer, state key): block bool [Bm, H, Qb, Kb]}`` of the last mask of every layer state."""
    st = handle.states["transformer"]
    return {
        (ly.index, k): v.last_mask.to_dense()
        for ly in st.layers
        for k, v in ly.states.items()
        if v.last_mask is not None
    }


def _call(model, inputs, plan):
    """The model's output; for ``cached`` (lse_cache) the second step's: the first call (step 0, no LSE
    yet) runs a dense pass that seeds the cached LSE, the second (another timestep: step 1) selects its
    blocks from it."""
    if plan == "cached":
        model(**inputs, return_dict=False)
        inputs = {**inputs, "timestep": inputs["timestep"] * 0.8}
    return model(**inputs, return_dict=False)[0]


def _grad(model, inputs, weight):
    x = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": x}, return_dict=False)[0]
    (out * weight).sum().backward()
    return x.grad.detach().clone()


def _run_model(rank: int, ring: int, ulysses: int, model_name: str, out_dir: str, inputs: dict) -> None:
    result: dict = {"rank": rank}
    t0 = time.perf_counter()
    try:
        import sparsediff.api as api

        model = _model(model_name)
        kw = {"backend": "reference", "block_size": BLOCK}
        _register_band()
        plans = {p: _plan(model, p, model_name) for p in PLANS}
        backward = model_name == "wan"
        grad_plan = "static" if ulysses == 1 else "dynamic"  # every Ulysses rank holds a sparse head
        ref = {}
        with torch.no_grad():
            ref["dense"] = model(**inputs, return_dict=False)[0]
            for name, plan in plans.items():
                h = api.enable_sparse_attention(model, plan, strict=name != "tile", **kw)
                ref[name] = _call(model, inputs, name)
                ref[name, "masks"] = _masks(h)
                h.disable()
        if backward:
            weight = torch.randn(ref["dense"].shape, generator=torch.Generator().manual_seed(1))
            h = api.enable_sparse_attention(model, plans[grad_plan], strict=True, **kw)
            ref["grad"] = _grad(model, inputs, weight)
            h.disable()
            ref["grad_dense"] = _grad(model, inputs, weight)
        _enable_parallelism(model, ring, ulysses)
        with torch.no_grad():
            dense_cp = model(**inputs, return_dict=False)[0]
        result["dense_cp_err"] = float((dense_cp - ref["dense"]).abs().max())
        handler = _Warnings()
        logging.getLogger("sparsediff").addHandler(handler)
        for name, plan in plans.items():
            handler.messages.clear()
            h = api.enable_sparse_attention(model, plan, strict=name != "tile", **kw)
            with torch.no_grad():
                out = _call(model, inputs, name)
            result[name] = {
                "err": float((out - ref[name]).abs().max()),
                "dense_err": float((out - ref["dense"]).abs().max()),
                "effect": float((ref[name] - ref["dense"]).abs().max()),
                "finite": bool(torch.isfinite(out).all()),
                "densities": h.densities()["transformer"],
                "warnings": list(handler.messages),
                "masks": _masks(h),
                "masks_one_process": ref[name, "masks"],
            }
            h.disable()
        if backward:
            h = api.enable_sparse_attention(model, plans[grad_plan], strict=True, **kw)
            g = _grad(model, inputs, weight)
            h.disable()
            dist.all_reduce(g)
            result["grad_err"] = float((g - ref["grad"]).abs().max())
            result["grad_scale"] = float(ref["grad"].abs().max())
            result["grad_effect"] = float((ref["grad"] - ref["grad_dense"]).abs().max())
        with torch.no_grad():
            after = model(**inputs, return_dict=False)[0]
        result["after_err"] = float((after - dense_cp).abs().max())
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        result["seconds"] = time.perf_counter() - t0
        torch.save(result, os.path.join(out_dir, f"{model_name}_rank{rank}.pt"))


def _spawn(world: int, args: tuple) -> None:
    ctx = mp.start_processes(_worker, args=(world, *args), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + _TIMEOUT_S
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"the {world} ranks did not finish within {_TIMEOUT_S} s (a collective hung?)")


@pytest.fixture(scope="module", params=list(CONFIGS))
def ring_results(request, tmp_path_factory):
    """Spawn the ranks of one configuration once for all models; (config, {model: [result per rank]})."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    if not hasattr(pytest.importorskip("diffusers"), "ContextParallelConfig"):
        pytest.skip("this diffusers has no ContextParallelConfig")
    ring, ulysses = CONFIGS[request.param]
    world = ring * ulysses
    tmp = tmp_path_factory.mktemp(request.param)
    inputs = {m: _inputs(m) for m in MODELS}
    _spawn(world, (ring, ulysses, str(tmp / "init"), str(tmp), inputs))
    res = {m: [torch.load(tmp / f"{m}_rank{r}.pt", weights_only=False) for r in range(world)] for m in MODELS}
    for m, ranks in res.items():  # the measured numbers (pytest -s shows them)
        for r in ranks:
            errs = {p: r[p]["err"] for p in PLANS if p in r}
            print(f"{request.param} {m} rank {r['rank']}: max |ring - one process| {errs} "
                  f"grad {r.get('grad_err')} of {r.get('grad_scale')} ({r['seconds']:.1f} s)")  # fmt: skip
    return request.param, res


def _ranks(ring_results, model_name):
    config, res = ring_results
    results = res[model_name]
    for r in results:
        assert "error" not in r, f"{config} rank {r['rank']} ({model_name}) failed:\n{r['error']}"
        assert r["dense_cp_err"] <= 1e-5, f"{config}: dense CP != single process ({r['dense_cp_err']:.3g})"
    return config, results


@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("plan", ["static", "dynamic", "cached"])
def test_ring_sparse_matches_single_process(ring_results, model_name, plan):
    config, results = _ranks(ring_results, model_name)
    ulysses = CONFIGS[config][1]
    for r in results:
        res = r[plan]
        assert res["effect"] > 1e-3, f"the {plan} plan does not change the single-process output"
        assert res["finite"], f"{config} rank {r['rank']}: non-finite sparse output"
        assert res["err"] <= 1e-5, (
            f"{config} rank {r['rank']} ({model_name}, {plan}): sparse ring output differs from one process "
            f"by {res['err']:.3g} (the plan changes the output by {res['effect']:.3g})"
        )
        assert not res["warnings"], f"unexpected warnings: {res['warnings']}"
        assert r["after_err"] == 0.0, "disable under ring did not restore the dense output"
        d = res["densities"]
        # the mask of every layer is the one process's mask of this rank's heads (the same on every rank)
        # ring 2: both heads local; Ulysses x ring: ulysses rank 0 holds head 0, rank 1 head 1 (dense but
        # in the dynamic plan)
        u, hl = r["rank"] % ulysses, 2 // ulysses
        sparse_here = plan == "dynamic" or ulysses == 1 or u == 0
        assert bool(res["masks"]) == sparse_here, f"rank {r['rank']}: masks recorded {list(res['masks'])}"
        for key, m in res["masks"].items():
            one = res["masks_one_process"][key][:, u * hl : (u + 1) * hl]
            assert m.shape == one.shape and torch.equal(m, one), f"rank {r['rank']} {key}: another mask"
        if plan == "cached":  # the densities are the first call's: the dense pass that seeds the LSE
            continue
        if sparse_here:
            assert d and all(0 < x < 1 for x in d.values()), f"rank {r['rank']}: densities {d} (sparse ran?)"
        else:
            assert not d, f"rank {r['rank']} only holds the dense head but measured densities {d}"


@pytest.mark.parametrize("model_name", MODELS)
def test_ring_permuting_family_falls_back_loudly(ring_results, model_name):
    config, results = _ranks(ring_results, model_name)
    ulysses = CONFIGS[config][1]
    for r in results:
        res = r["tile"]
        # the tile head falls back to dense attention: the whole output is the dense one
        assert res["dense_err"] <= 1e-5 and res["finite"], f"rank {r['rank']}: tile fallback output is wrong"
        if ulysses == 1 or r["rank"] % ulysses == 0:  # the ranks that hold the tile head warn
            assert res["warnings"] and all("permuted token order" in w for w in res["warnings"]), res[
                "warnings"
            ]
            assert not res["densities"], "tile ran sparse under ring?"
        else:
            assert not res["warnings"], res["warnings"]


def test_ring_backward_matches_single_process(ring_results):
    config, results = _ranks(ring_results, "wan")
    for r in results:
        assert r["grad_effect"] > 1e-4 * r["grad_scale"], "the sparse plan does not change the gradient"
        assert r["grad_err"] <= 1e-5 * max(1.0, r["grad_scale"]), (
            f"rank {r['rank']}: ring gradient differs from one process by {r['grad_err']:.3g} "
            f"(scale {r['grad_scale']:.3g}, sparse effect {r['grad_effect']:.3g})"
        )
