"""``sparsediff compare --cache``: dense, dense + cache, plan, plan + cache in one run; bad specs stopped early.

The 2-layer embedded-architecture pipeline of ``test_compare`` at 4 x 32 x 32 px (256 tokens, 16-token
blocks: radial keeps fewer than all blocks), 3 steps. FirstBlockCache with a threshold far above any
change of the first block's residual: the tail block runs at step 0 only, so the cache visibly changes
the video.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_compare import FAST, SIZE, _never_generate, small_pipeline

from sparsediff import compare as cmp
from sparsediff import is_sparse_attention_enabled
from sparsediff.compare import cache as cmp_cache
from sparsediff.compare import cli as cmp_cli
from sparsediff.compare import run as cmp_run

CACHE = "first_block:threshold=10.0"
PLAN = "radial,dense_steps=0,dense_layers=[],min_tokens=0"
CALL = dict(num_frames=4, height=32, width=32, num_inference_steps=3)


def _hooks(module: torch.nn.Module) -> dict[str, list[str]]:
    """Names of the diffusers hooks registered on ``module`` and its submodules (empty ones left out)."""
    out = {}
    for name, m in module.named_modules():
        reg = getattr(m, "_diffusers_hook", None)
        if reg is not None and reg.hooks:
            out[name] = list(reg.hooks)
    return out


def _frames(pipe, seed: int) -> np.ndarray:
    out = pipe(
        "a red circle moving left",
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **CALL,
    )
    return np.asarray(out.frames[0], dtype=np.float32)


def test_cache_rows_against_plain_dense_clean_state_and_cleanup(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    pipe = small_pipeline()
    # a pipeline that does not reset diffusers' stateful hooks after its call: compare must reset the
    # cache before each generation itself (else the warm-up's cached residual leaks into sample 1)
    monkeypatch.setattr(pipe, "maybe_free_model_hooks", lambda: None)
    processors = dict(pipe.transformer.attn_processors)
    hooks_before = _hooks(pipe.transformer)
    calls: list[np.ndarray] = []
    real = cmp_run._generate

    def record(*a, **k):
        g = real(*a, **k)
        calls.append(g["frames"])
        return g

    monkeypatch.setattr(cmp_run, "_generate", record)
    out = tmp_path / "cmp"
    res = cmp.compare(
        pipe, ["a red circle moving left"], seeds=[0, 1], plans=[PLAN], out=out, block_size=16,
        backend="reference", warmup=1, video_format="gif", progress=False, cache=CACHE, **CALL,
    )  # fmt: skip
    label = "first_block(threshold=10.0)"
    rows = {r["label"]: r for r in res["variants"]}
    sparse = "radial+dense_steps=0,dense_layers=[],min_tokens=0"
    assert list(rows) == ["dense", f"dense + {label}", sparse, f"{sparse} + {label}"]

    dense_cache, plan, plan_cache = rows[f"dense + {label}"], rows[sparse], rows[f"{sparse} + {label}"]
    # the cache changed the output (PSNR vs plain dense finite) and skipped work: dense makes 3 steps x 2
    # CFG branches x 2 blocks x 2 attention calls (self, cross) = 24; the cache runs the tail block at step 0
    # only (once per branch): 24 - 2 steps x 2 branches x 2 calls = 16
    assert math.isfinite(dense_cache["psnr"]) and dense_cache["ssim"] < 1.0
    assert dense_cache["attention_calls_vs_dense"] == pytest.approx(16 / 24)
    assert dense_cache["mean_density"] == 1.0 and dense_cache["density_per_layer"] == {}
    # the plan alone: every attention call made; the plan with the cache: sparse and skipping
    assert plan["attention_calls_vs_dense"] == 1.0 and plan["cache"] is None
    assert 0.0 < plan_cache["mean_density"] < 1.0, plan_cache["density_per_layer"]
    assert set(plan_cache["density_per_layer"]["transformer"]) == {"0", "1"}
    assert plan_cache["attention_calls_vs_dense"] == dense_cache["attention_calls_vs_dense"]
    assert math.isfinite(plan_cache["psnr"]) and plan_cache["predicted_speedup"] is None
    for r in rows.values():  # every speedup against plain dense, measured in this run
        assert r["speedup"] > 0 and len(r["samples"]) == 2
    assert rows["dense"]["speedup"] == pytest.approx(1.0)

    # each generation starts clean: 4 rows x (1 warm-up + 2 samples), the warm-up is sample (p0, s0)
    assert len(calls) == 12
    for r in range(4):
        warm, s0, s1 = calls[3 * r : 3 * r + 3]
        assert np.array_equal(warm, s0), list(rows)[r]
        assert not np.array_equal(s0, s1)
    # ... and equals the cache freshly enabled on a plain pipeline, up to float rounding (compare's
    # generations run under its attention timer); a stale cache would differ by far more (cf. dense)
    from diffusers.hooks import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=10.0))
    try:
        fresh = _frames(pipe, 1)
    finally:
        pipe.transformer.disable_cache()
    np.testing.assert_allclose(calls[5], fresh, rtol=0, atol=1e-5)
    assert np.abs(calls[2] - fresh).max() > 1e-2  # plain dense, seed 1

    # compare's own cleanup: no cache, no sparse attention, the model's processors, no hooks left
    assert not pipe.transformer.is_cache_enabled and not is_sparse_attention_enabled(pipe)
    assert dict(pipe.transformer.attn_processors) == processors
    assert _hooks(pipe.transformer) == hooks_before

    data = json.loads((out / "results.json").read_text())
    assert data["cache"]["spec"] == CACHE and data["cache"]["config_class"] == "FirstBlockCacheConfig"
    assert data["cache"]["config"] == {"transformer": {"threshold": 10.0}}
    assert data["settings"]["cache"] == CACHE
    assert [r["cache"] for r in data["variants"]] == [None, label, None, label]
    assert [r["plan_label"] for r in data["variants"]] == ["dense", "dense", sparse, sparse]
    md = (out / "report.md").read_text()
    assert f"| dense + {label} |" in md and "attention calls vs dense" in md
    assert len(list((out / "videos").glob("*.gif"))) == 4 * 2


def test_cli_cache_flag(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "--pipeline",
        "test_compare:small_pipeline",
        "--prompt",
        "a red circle moving left",
        "--out",
        str(out),
    ]
    argv += ["--plans", "radial", "--cache", "fbc:threshold=10"] + SIZE + FAST
    assert cmp.main(argv) == 0, capsys.readouterr().err
    data = json.loads((out / "results.json").read_text())
    assert [r["label"] for r in data["variants"]] == [
        "dense",
        "dense + first_block(threshold=10.0)",
        "radial",
        "radial + first_block(threshold=10.0)",
    ]
    assert "dense + first_block(threshold=10.0)" in capsys.readouterr().out  # the printed table


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("nocache", "unknown cache 'nocache' (one of: first_block, pab, faster, taylorseer, mag)"),
        ("first_block:treshold=0.1,thresh=2", "FirstBlockCacheConfig has no field treshold, thresh"),
        ("first_block:threshold=abc", "threshold='abc' is not a number"),
        ("first_block:threshold=(1", "threshold='(1' is not a number"),
        ("first_block:threshold", "'threshold' is not field=value"),
        (
            "pab:spatial_attention_timestep_skip_range=5",
            "spatial_attention_timestep_skip_range='5' is not a tuple",
        ),
        ("pab:current_timestep_callback=1", "is set by compare"),
        (
            "taylorseer:taylor_factors_dtype=float33",
            "is not a torch dtype name (float32, bfloat16, ...) or None",
        ),
        ("mag:threshold=0.1", "MagCacheConfig needs mag_ratios=[...]"),
        ("mag:mag_ratios=[1.0,0.9],calibrate=True", "calibrate=True skips nothing"),
        ("mag:mag_ratios=[1.0,0.9],num_inference_steps=5", "num_inference_steps=5 differs from --steps 2"),
    ],
)
def test_bad_cache_spec_is_one_line_before_loading(spec, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cmp_run, "_generate", _never_generate)
    monkeypatch.setattr(cmp_cli, "load_pipeline", _never_generate)  # checked before the model loads
    argv = [
        "--pipeline",
        "test_compare:small_pipeline",
        "--prompt",
        "a red circle",
        "--out",
        str(tmp_path / "o"),
    ]
    assert cmp.main(argv + ["--plans", "radial", "--cache", spec] + SIZE + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sparsediff compare: error: --cache {spec!r}: ") and err.count("\n") == 1, err
    assert expected in err, err
    assert not (tmp_path / "o").exists()


def test_library_refuses_a_pipeline_that_already_has_a_cache(monkeypatch):
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = small_pipeline()
    pipe.transformer.enable_cache(FirstBlockCacheConfig())
    monkeypatch.setattr(cmp_run, "_generate", _never_generate)
    with pytest.raises(cmp.CompareError, match="transformer already has a cache enabled"):
        cmp.compare(pipe, ["a red circle"], plans=["radial"], progress=False, cache=CACHE, **CALL)
    assert not is_sparse_attention_enabled(pipe) and pipe.transformer.is_cache_enabled  # left as it came


def test_parse_cache_grammar():
    t = cmp.parse_cache(r"taylorseer_cache:cache_interval=3,cache_identifiers=[r'blocks\.\d+\.attn1'],"
                        "taylor_factors_dtype=float32,disable_cache_after_step=None")  # fmt: skip
    assert t.name == "taylorseer" and t.fields == {
        "cache_interval": 3,
        "cache_identifiers": [r"blocks\.\d+\.attn1"],
        "taylor_factors_dtype": torch.float32,
        "disable_cache_after_step": None,
    }
    p = cmp.parse_cache(
        "pab:spatial_attention_block_skip_range=2,spatial_attention_timestep_skip_range=[-1, 1001]"
    )
    assert p.fields["spatial_attention_timestep_skip_range"] == (-1, 1001)

    class Pipe:
        current_timestep = 981

    cfg = cmp_cache.build_config(p, 3, lambda: Pipe.current_timestep)
    assert cfg.current_timestep_callback() == 981 and cfg.spatial_attention_block_skip_range == 2
    f = cmp.parse_cache("faster:attention_weight_callback=0.5,tensor_format=BFCHW")
    fcfg = cmp_cache.build_config(f, 3, lambda: 0)
    assert fcfg.attention_weight_callback(torch.nn.Linear(1, 1)) == 0.5 and fcfg.tensor_format == "BFCHW"
    m = cmp.parse_cache("mag:mag_ratios=[1.0, 0.99, 0.98, 0.97, 0.96, 0.95],threshold=0.1")
    assert m.label == "mag(mag_ratios=..., threshold=0.1)"
    mcfg = cmp_cache.build_config(m, 12, lambda: 0)
    assert mcfg.num_inference_steps == 12 and len(mcfg.mag_ratios) == 12  # the run's steps, interpolated
    assert (
        cmp.parse_cache("first_block").label == "first_block" and cmp.parse_cache("FBC").name == "first_block"
    )
