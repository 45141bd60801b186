"""Sparse attention under diffusers context parallelism (Ulysses), 2 CPU processes on gloo.

Under Ulysses each rank holds the full sequence for ``H / world`` heads after the all-to-all, so the
plan must be sliced by *global* head index. Per model, every rank builds the same tiny transformer
(same seed) and inputs, computes the single-process output with a per-head plan whose heads differ
(head 0: 1-tile window, head 1: dense -- a wrong head slice changes the result), then enables
``transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`` and the same sparse
plan (``strict=True``: a dense fallback raises) and compares. Wan splits one video sequence; Flux
splits text and image separately (``cp_split="segments"``).

CPU note (diffusers 0.42.1): ``ModelMixin._resolve_parallel_config`` computes the device as
``torch.device(device_type, rank % torch.accelerator.device_count())``, which raises
``ZeroDivisionError: integer modulo by zero`` on a machine without an accelerator -- before any mesh or
communication is set up. Everything after that line works on CPU/gloo (checked: dense Ulysses output ==
single-process output bit for bit). When (and only when) that exact error is raised, the worker retries
with ``torch.accelerator.device_count`` patched to return 1 for the duration of the
``enable_parallelism`` call (worker process only; the device becomes ``cpu:0``). The test is skipped,
with the reason, when torch.distributed/gloo is unavailable or gloo cannot run the all-to-all.

Backward (training under Ulysses; same two processes): per model a 4-head variant of the tiny
transformer -- two heads per rank, so a wrong head order *within* a rank changes the gradient -- with the
per-head plan ``[tile 1-tile window, dense, dense, dense]``: rank 0 runs the sparse path on a mixed group
(tile permutes tokens: its un-permute is back-propagated too; Flux also its segment order), rank 1 the
dense-plan path (the model's own backend inside our forward op). The gradient of a fixed projection of
the output with respect to the input ``hidden_states`` and to every parameter, summed over the ranks
(each rank back-propagates its own tokens), must equal one process's within 1e-5 (relative to the
gradient's scale), and the sparse plan must change that gradient; the training forward must equal the
inference forward bit for bit, and a ``retain_graph=True`` backward must back-propagate again.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
_TESTS = os.path.dirname(os.path.abspath(__file__))


def _inputs(model_name: str) -> dict:
    g = torch.Generator().manual_seed(0)
    if model_name == "wan":
        return {
            "hidden_states": torch.randn(1, 16, 3, 8, 12, generator=g),
            "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, 16, 32, generator=g),
        }
    from diffusers import FluxPipeline

    h, w, text = 8, 12, 16
    return {
        "hidden_states": torch.randn(1, h * w, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, text, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([3.5]),
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, h, w, "cpu", torch.float32),
        "txt_ids": torch.zeros(text, 3),
    }


def _model(model_name: str) -> torch.nn.Module:
    import tiny_pipelines as tp

    return (tp._wan_transformer() if model_name == "wan" else tp._flux_transformer()).eval()


def _plan(model: torch.nn.Module):
    from sparsediff.pipelines.base import get_adapter

    from sparsediff.plan import Plan
    from sparsediff.specs import HeadSpec

    layers = len(get_adapter(model).attention_modules(model))
    heads = [HeadSpec.make("tile", window=(1, 1, 1)), HeadSpec("dense")]
    return Plan.per_head(model, [heads] * layers, min_tokens=0)


GRAD_HEADS = 4  # the backward's models: two heads per Ulysses rank


def _grad_model(model_name: str) -> torch.nn.Module:
    """The tiny transformer of :func:`_model` with :data:`GRAD_HEADS` heads (same seed)."""
    import tiny_pipelines as tp

    if model_name == "wan":
        return tp._wan_transformer(heads=GRAD_HEADS).eval()
    return tp._flux_transformer(heads=GRAD_HEADS).eval()


def _grad_plan(model: torch.nn.Module):
    """Rank 0 (heads 0, 1): a sparse tile head and a dense one; rank 1 (heads 2, 3): dense plan."""
    from sparsediff.pipelines.base import get_adapter

    from sparsediff.plan import Plan
    from sparsediff.specs import HeadSpec

    layers = len(get_adapter(model).attention_modules(model))
    heads = [HeadSpec.make("tile", window=(1, 1, 1))] + [HeadSpec("dense")] * (GRAD_HEADS - 1)
    return Plan.per_head(model, [heads] * layers, min_tokens=0)


def _grads(model: torch.nn.Module, inputs: dict, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d hidden_states, every parameter's gradient flattened)`` of ``sum(output * weight)``."""
    model.zero_grad(set_to_none=True)
    x = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": x}, return_dict=False)[0]
    (out * weight).sum().backward()
    params = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in model.parameters()]
    )
    model.zero_grad(set_to_none=True)
    return x.grad.detach().clone(), params.detach().clone()


def _run_backward(rank: int, model_name: str, out_dir: str, inputs: dict) -> None:
    """Input and parameter gradients under Ulysses (summed over ranks) vs one process."""
    result: dict = {"rank": rank}
    t0 = time.perf_counter()
    try:
        import sparsediff.api as api

        model = _grad_model(model_name)
        plan = _grad_plan(model)
        kw = {"backend": "reference", "block_size": 8, "strict": True}
        with torch.no_grad():
            shape = model(**inputs, return_dict=False)[0].shape
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
        dense_x, dense_p = _grads(model, inputs, weight)
        h = api.enable_sparse_attention(model, plan, **kw)
        ref_x, ref_p = _grads(model, inputs, weight)
        h.disable()
        _enable_parallelism(model)
        h = api.enable_sparse_attention(model, plan, **kw)
        cp_x, cp_p = _grads(model, inputs, weight)
        densities = h.densities()["transformer"]
        # the training forward computes what inference does; a retained graph back-propagates again
        with torch.no_grad():
            infer = model(**inputs, return_dict=False)[0]
        x = inputs["hidden_states"].clone().requires_grad_(True)
        out = model(**{**inputs, "hidden_states": x}, return_dict=False)[0]
        loss = (out * weight).sum()
        loss.backward(retain_graph=True)
        first = x.grad.clone()
        loss.backward()
        result["train_vs_infer"] = float((out.detach() - infer).abs().max())
        result["retained_err"] = float((x.grad - 2 * first).abs().max())
        h.disable()
        for g in (cp_x, cp_p):  # each rank's gradient holds its own tokens' share
            dist.all_reduce(g)
        result.update(
            x_err=float((cp_x - ref_x).abs().max()),
            x_scale=float(ref_x.abs().max()),
            x_effect=float((ref_x - dense_x).abs().max()),
            p_err=float((cp_p - ref_p).abs().max()),
            p_scale=float(ref_p.abs().max()),
            p_effect=float((ref_p - dense_p).abs().max()),
            finite=bool(torch.isfinite(cp_x).all() and torch.isfinite(cp_p).all()),
            densities=densities,
        )
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        result["seconds"] = time.perf_counter() - t0
        torch.save(result, os.path.join(out_dir, f"{model_name}_grad_rank{rank}.pt"))


def _enable_parallelism(model: torch.nn.Module) -> str | None:
    """``model.enable_parallelism(ulysses_degree=WORLD)``; returns the CPU workaround note if used."""
    from diffusers import ContextParallelConfig

    try:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        return None
    except ZeroDivisionError:
        if torch.accelerator.device_count() != 0:
            raise
    from unittest import mock

    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
    return "diffusers' _resolve_parallel_config divides by torch.accelerator.device_count() == 0 on CPU"


def _worker(rank: int, init_file: str, out_dir: str, inputs: dict) -> None:
    """One rank: every model of ``inputs`` in turn (one process start / import for all of them)."""
    sys.path.insert(0, _TESTS)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
        for model_name, model_inputs in inputs.items():
            _run_model(rank, model_name, out_dir, model_inputs)
        for model_name, model_inputs in inputs.items():
            _run_backward(rank, model_name, out_dir, model_inputs)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_model(rank: int, model_name: str, out_dir: str, inputs: dict) -> None:
    result: dict = {"rank": rank}
    try:
        import sparsediff.api as api

        model = _model(model_name)
        plan = _plan(model)
        kw = {"backend": "reference", "block_size": 8, "strict": True}
        with torch.no_grad():
            dense_ref = model(**inputs, return_dict=False)[0]
            h = api.enable_sparse_attention(model, plan, **kw)
            sparse_ref = model(**inputs, return_dict=False)[0]
            h.disable()
        try:
            result["note"] = _enable_parallelism(model)
            with torch.no_grad():
                dense_cp = model(**inputs, return_dict=False)[0]
        except RuntimeError as e:  # gloo without all-to-all support
            if "all_to_all" in str(e) or "alltoall" in str(e).lower():
                result["skip"] = f"gloo cannot run diffusers' Ulysses all-to-all: {e}"
                raise
            raise
        h = api.enable_sparse_attention(model, plan, **kw)
        with torch.no_grad():
            sparse_cp = model(**inputs, return_dict=False)[0]
        densities = h.densities()["transformer"]
        h.disable()
        with torch.no_grad():
            after = model(**inputs, return_dict=False)[0]
        result.update(
            dense_cp_err=float((dense_cp - dense_ref).abs().max()),
            sparse_cp_err=float((sparse_cp - sparse_ref).abs().max()),
            sparse_effect=float((sparse_ref - dense_ref).abs().max()),
            after_err=float((after - dense_cp).abs().max()),
            finite=bool(torch.isfinite(sparse_cp).all()),
            densities=densities,
        )
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        torch.save(result, os.path.join(out_dir, f"{model_name}_rank{rank}.pt"))


MODELS = ("wan", "flux")


@pytest.fixture(scope="module")
def ulysses_results(tmp_path_factory):
    """Spawn the 2 gloo ranks once for all models; {model: [result of rank 0, result of rank 1]}."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    if not hasattr(pytest.importorskip("diffusers"), "ContextParallelConfig"):
        pytest.skip("this diffusers has no ContextParallelConfig")
    tmp = tmp_path_factory.mktemp("ulysses")
    inputs = {m: _inputs(m) for m in MODELS}
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp), inputs), nprocs=WORLD, join=True)
    res = {}
    for m in MODELS:
        for kind in ("", "_grad"):
            res[m + kind] = [
                torch.load(tmp / f"{m}{kind}_rank{r}.pt", weights_only=False) for r in range(WORLD)
            ]
    for m in MODELS:  # the measured numbers (pytest -s shows them)
        for r in res[m + "_grad"]:
            print(f"ulysses{WORLD} {m} backward rank {r['rank']}: max |grad - one process| input "
                  f"{r.get('x_err')} of {r.get('x_scale')}, parameters {r.get('p_err')} of {r.get('p_scale')} "
                  f"({r['seconds']:.1f} s)")  # fmt: skip
    return res


@pytest.mark.parametrize("model_name", MODELS)
def test_ulysses_sparse_matches_single_process(model_name, ulysses_results):
    results = ulysses_results[model_name]
    for r in results:
        if "skip" in r:
            pytest.skip(r["skip"])
    for r in results:
        assert "error" not in r, f"rank {r['rank']} failed:\n{r['error']}"
        assert r["dense_cp_err"] <= 1e-5, (
            f"dense Ulysses != single process ({r['dense_cp_err']:.3g}): harness broken"
        )
        assert r["sparse_effect"] > 1e-3, "the per-head plan does not change the single-process output"
        assert r["finite"], "non-finite sparse Ulysses output"
        assert r["sparse_cp_err"] <= 1e-5, (
            f"rank {r['rank']}: sparse Ulysses output differs from single process by {r['sparse_cp_err']:.3g} "
            f"(the sparse plan changes the output by {r['sparse_effect']:.3g})"
        )
        assert r["after_err"] == 0.0, "disable under Ulysses did not restore the dense output"
    # rank 0 holds global head 0 (1-tile window): sparse; rank 1 holds head 1 (dense): full or unmeasured
    d0, d1 = results[0]["densities"], results[1]["densities"]
    assert d0 and all(0 < d < 1 for d in d0.values()), f"rank 0 (sparse head 0) densities {d0}"
    assert all(d == 1.0 for d in d1.values()), f"rank 1 only holds the dense head 1 but measured {d1}"


@pytest.mark.parametrize("model_name", MODELS)
def test_ulysses_backward_matches_single_process(model_name, ulysses_results):
    results = ulysses_results[model_name + "_grad"]
    for r in results:
        if "skip" in r:
            pytest.skip(r["skip"])
    for r in results:
        assert "error" not in r, f"rank {r['rank']} failed:\n{r['error']}"
        assert r["finite"], f"rank {r['rank']}: non-finite Ulysses gradient"
        for what, name in (("x", "input"), ("p", "parameter")):
            err, scale, effect = r[what + "_err"], r[what + "_scale"], r[what + "_effect"]
            assert effect > 1e-4 * scale, f"the sparse plan does not change the {name} gradient"
            assert err <= 1e-5 * max(1.0, scale), (
                f"rank {r['rank']}: the {name} gradient under Ulysses (summed over ranks) differs from one "
                f"process by {err:.3g} (scale {scale:.3g}, the sparse plan changes it by {effect:.3g})"
            )
        assert r["train_vs_infer"] == 0.0, f"rank {r['rank']}: the training forward differs from inference"
        assert r["retained_err"] <= 1e-6, f"rank {r['rank']}: a retain_graph=True backward does not repeat"
    # rank 0 holds the sparse tile head: sparse ran there; rank 1 holds dense heads only
    d0, d1 = results[0]["densities"], results[1]["densities"]
    assert d0 and all(0 < d < 1 for d in d0.values()), f"rank 0 (sparse head 0) densities {d0}"
    assert all(d == 1.0 for d in d1.values()), f"rank 1 only holds dense heads but measured {d1}"
