"""The shipped embedded model (``sparsediff/embedded/weights/``): loaded, never trained, in these tests.

What the model must do (colour and direction on held-out seeds), what its attention looks like (the probe),
and that sparse attention on it is sparse for real and close to dense -- with negative controls showing that
the PSNR floor catches broken attention (zeros, heads swapped).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparsediff import enable_sparse_attention, reference
from sparsediff.embedded import WEIGHTS_DIR, checks, data, has_trained_weights, load_embedded_pipeline, probe
from sparsediff.metrics import video_metrics

STEPS = 10
#: The tests generate at the model's first training size (8 x 32 x 32 px = 512 tokens) for CI time; the
#: demo size (16 x 64 x 64) is checked by the trainer's held-out checks (model card, every training size).
SIZE = {"num_frames": 8, "height": 32, "width": 32}
#: The demo's size (4096 tokens), for the family default's one check there.
DEMO_SIZE = {"num_frames": 16, "height": 64, "width": 64}
#: PSNR (dB) of the default sparse plan vs dense at STEPS steps must stay above this floor. Measured on the
#: shipped model (README): ~20-25 dB; attention returning zeros or the wrong heads measures < 12 dB (the
#: negative controls below).
PSNR_FLOOR = 15.0


@pytest.fixture(scope="module")
def pipe():
    # The weights are part of the package: their absence is a packaging bug, never a skip.
    assert has_trained_weights(), f"no shipped embedded weights in {WEIGHTS_DIR}"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_embedded_pipeline()
    torch.set_num_threads(n)


def _generate(pipe, prompt: str, seed: int, steps: int = STEPS, size=None) -> np.ndarray:
    with torch.no_grad():
        return pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=4.0,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **(size or SIZE),
        ).frames[0]


def test_shipped_model_is_small_fp16_and_documented():
    files = [os.path.join(r, f) for r, _, fs in os.walk(WEIGHTS_DIR) for f in fs]
    size = sum(os.path.getsize(f) for f in files if f.endswith(".safetensors"))
    assert 0 < size <= 10e6
    card = open(os.path.join(WEIGHTS_DIR, "MODEL_CARD.md")).read()
    assert "Held-out check" in card and "probe" in card.lower()
    assert os.path.isfile(os.path.join(WEIGHTS_DIR, "samples.png"))


def test_colour_and_direction_on_held_out_seeds(pipe):
    prompts = data.heldout_prompts(8)  # every direction twice, other seeds than training and its checks
    videos = [_generate(pipe, p, data.HELDOUT_SEED + 100 + i) for i, p in enumerate(prompts)]
    res = checks.check_videos(videos, prompts)
    assert res.colour_rate >= 0.875, res
    # The bar is 70 %: measured 8/8 here (and 16/16 held-out in the model card); the model before
    # the product coordinates (see sparsediff/embedded/README.md, "CPU training history") measured 5/8.
    assert res.direction_rate >= 0.75, res


def test_direction_word_changes_the_video(pipe):
    # The first CPU run's model ignored the direction word (mean |diff| 1.6e-4 between "left" and "right"),
    # the next one mostly (0.0037-0.0045, only the axis learned); the shipped one measures 0.029-0.074 on
    # seeds 3-5.
    a = _generate(pipe, "a red square moving left", 3)
    b = _generate(pipe, "a red square moving right", 3)
    assert float(np.abs(a - b).mean()) > 0.015


def test_probe_finds_local_and_diffuse_heads(pipe):
    res = probe.probe_pipeline(
        pipe, ["a green circle moving down"], num_inference_steps=STEPS, max_queries=128, **SIZE
    )
    ratios = sorted((h.local_ratio for h in res.heads), reverse=True)
    assert sum(r >= 5 for r in ratios) >= 3, ratios
    kinds = res.counts()
    assert kinds.get("diffuse", 0) + kinds.get("temporal", 0) >= 1, kinds


def _sparse_vs_dense(pipe, prompt: str, seed: int, steps: int = STEPS, size=None, **sparse_kw):
    size = size or SIZE
    dense = _generate(pipe, prompt, seed, steps, size)
    with enable_sparse_attention(pipe, backend="reference", **sparse_kw) as handle:
        sparse = _generate(pipe, prompt, seed, steps, size)
        dens = handle.densities()["transformer"]
        report = handle.report()["transformer"]
    return dense, sparse, dens, report


def test_default_plan_is_sparse_and_close_to_dense(pipe):
    """The family default's pattern on this model at the test size; min_tokens=0 because 512 tokens is below
    VIDEO_MIN_TOKENS (the test below)."""
    dense, sparse, dens, _ = _sparse_vs_dense(pipe, "a yellow diamond moving left", 11, min_tokens=0)
    assert set(dens) == {1, 2, 3}, dens  # layer 0 is dense in the default plan
    assert all(0 < d < 0.9 for d in dens.values()), dens
    m = video_metrics(sparse, dense)
    assert np.abs(sparse - dense).max() > 1e-3  # sparse really changed the computation
    assert m.psnr > PSNR_FLOOR, m.psnr


def test_default_plan_runs_dense_below_min_tokens_and_says_so(pipe, caplog):
    """512 tokens: the default runs every call dense (the radial mask cannot be sparse at 8 blocks per row;
    README "Family defaults") -- bit-identical to dense, with a WARNING naming min_tokens."""
    import logging

    with caplog.at_level(logging.WARNING, logger="sparsediff"):
        dense, sparse, dens, report = _sparse_vs_dense(pipe, "a red circle moving right", 3, steps=2)
    assert report["sparse_calls"] == 0 and not dens, report
    assert np.array_equal(sparse, dense)
    assert any(r.levelno == logging.WARNING and "min_tokens" in r.getMessage() for r in caplog.records)


def test_default_plan_at_the_demo_size_runs_sparse_and_close_to_dense(pipe):
    """16 x 64 x 64 px = 4096 tokens (the demo's size): the default engages as shipped, at density < 0.7
    (0.645: the radial mask gets sparser with the token count), and stays close to dense."""
    dense, sparse, dens, report = _sparse_vs_dense(
        pipe, "a yellow diamond moving left", 11, steps=4, size=DEMO_SIZE
    )
    assert report["sparse_calls"] > 0 and set(dens) == {1, 2, 3}, (report, dens)
    assert all(0.5 < d < 0.7 for d in dens.values()), dens
    assert np.abs(sparse - dense).max() > 1e-3
    assert video_metrics(sparse, dense).psnr > PSNR_FLOOR


@pytest.mark.parametrize("broken", ["zeros", "heads_swapped"])
def test_psnr_floor_catches_broken_attention(pipe, monkeypatch, broken):
    real = reference.forward_blocks

    def bad(q, k, v, mask, scale):
        out, lse = real(q, k, v, mask, scale)
        if broken == "zeros":
            return torch.zeros_like(out), lse
        return out.roll(1, dims=1), lse  # [B, H, N, D]: every head gets its neighbour's output

    monkeypatch.setattr(reference, "forward_blocks", bad)
    dense, sparse, _, _ = _sparse_vs_dense(pipe, "a yellow diamond moving left", 11, min_tokens=0)
    assert video_metrics(sparse, dense).psnr < PSNR_FLOOR


def test_shipped_cached_plan_is_the_searched_plan_plus_a_stored_remainder_in_layers_0_and_1(pipe):
    """``weights/sparse_plan_cached.json``: the shipped searched plan's masks with the cached remainder
    (exact every 5 steps) in layers 0 and 1 only, priced by the search. At the demo size it runs sparse,
    and it is closer to dense than the same masks without the remainder."""
    from sparsediff.embedded import shipped_plan_path
    from sparsediff.plan import Plan

    plain = Plan.load(shipped_plan_path())
    cached = Plan.load(os.path.join(WEIGHTS_DIR, "sparse_plan_cached.json"))
    cached.validate_for(pipe.transformer)
    assert cached.with_remainder("none").layers == plain.layers
    assert cached.schedule == plain.schedule
    assert [{(s.remainder, s.get("remainder_refresh")) for s in row} for row in cached.layers] == [
        {("cached", 5)},
        {("cached", 5)},
        {("none", 5)},
        {("none", 5)},
    ]
    predicted = cached.meta["search"]["predicted_step_speedup"]
    assert 1.0 < predicted < plain.meta["search"]["predicted_step_speedup"]  # the exact passes cost

    prompt, seed, steps = "a cyan square moving up quickly", 5, 6  # 3 dense warm-up steps, 3 sparse
    dense = _generate(pipe, prompt, seed, steps, DEMO_SIZE)
    out = {}
    for name, plan in (("plain", plain), ("cached", cached)):
        with enable_sparse_attention(pipe, plan, backend="reference") as handle:
            out[name] = _generate(pipe, prompt, seed, steps, DEMO_SIZE)
            dens = handle.densities()["transformer"]
        assert set(dens) == {0, 1, 2, 3} and all(0 < d < 0.5 for d in dens.values()), dens
    assert np.abs(out["cached"] - dense).max() > 1e-3 and np.abs(out["cached"] - out["plain"]).max() > 1e-3
    assert video_metrics(out["cached"], dense).psnr > video_metrics(out["plain"], dense).psnr
