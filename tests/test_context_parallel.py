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
"""

from __future__ import annotations

import os
import sys
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
    return {
        m: [torch.load(tmp / f"{m}_rank{r}.pt", weights_only=False) for r in range(WORLD)] for m in MODELS
    }


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
