"""sparsediff.metrics against known values (identical inputs, a known noise level, known shifts)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sparsediff.metrics import VideoQuality, as_video, lpips_unavailable_reason, video_metrics


def _video(f=5, h=24, w=20, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(f, h, w, 3, generator=g, dtype=torch.float64)
    return 0.25 + 0.5 * base  # in [0.25, 0.75]: room for noise without clipping


def test_identical_inputs_give_inf_psnr_and_unit_ssim():
    v = _video()
    m = video_metrics(v, v.clone())
    assert m.psnr == math.inf
    assert all(p == math.inf for p in m.psnr_per_frame)
    assert m.temporal_psnr == math.inf
    assert m.ssim == pytest.approx(1.0, abs=1e-9)
    assert all(s == pytest.approx(1.0, abs=1e-9) for s in m.ssim_per_frame)
    assert (m.frames, m.height, m.width) == (5, 24, 20)
    assert "ms_ssim" in m.skipped and m.ms_ssim is None  # 24x20 is too small for 5 scales
    d = m.to_dict()
    assert d["psnr"] == "inf"
    json.dumps(d, allow_nan=False)  # strictly valid JSON


@pytest.mark.parametrize("sigma", [0.01, 0.05])
def test_gaussian_noise_gives_the_expected_psnr(sigma):
    v = _video(f=4, h=64, w=64)
    noise = sigma * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noisy = v + noise
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1  # no clipping: the MSE is the noise's
    m = video_metrics(noisy, v)
    # exact: from the realised noise energy; statistical: 10 log10(1 / sigma^2) within 0.05 dB (n = 49152)
    assert m.psnr == pytest.approx(10 * math.log10(1 / float((noise**2).mean())), abs=1e-9)
    assert m.psnr == pytest.approx(-20 * math.log10(sigma), abs=0.05)
    for p in m.psnr_per_frame:
        assert p == pytest.approx(-20 * math.log10(sigma), abs=0.15)
    # frame differences carry the noise of two frames (variance 2 sigma^2) over a data range of 2
    assert m.temporal_psnr == pytest.approx(10 * math.log10(4 / (2 * sigma**2)), abs=0.1)
    assert 0 < m.ssim < 1


def test_psnr_is_pooled_over_frames_not_a_mean_of_db():
    v = _video(f=2, h=16, w=16)
    w = v.clone()
    w[1] += 0.1  # frame 0 identical (inf dB), frame 1 off by 0.1 everywhere -> 20 dB
    m = video_metrics(w, v)
    assert m.psnr_per_frame[0] == math.inf
    assert m.psnr_per_frame[1] == pytest.approx(20.0, abs=1e-9)
    assert m.psnr == pytest.approx(10 * math.log10(1 / (0.01 / 2)), abs=1e-9)  # MSE halved: ~23.01 dB


def test_temporal_psnr_sees_flicker_that_frame_psnr_barely_sees():
    v = _video(f=6, h=16, w=16)
    steady = v + 0.02  # constant offset: frames differ, motion identical
    flicker = v + 0.02 * torch.tensor([1, -1, 1, -1, 1, -1], dtype=torch.float64).view(-1, 1, 1, 1)
    ms, mf = video_metrics(steady, v), video_metrics(flicker, v)
    assert ms.psnr == pytest.approx(mf.psnr, abs=1e-9)  # same per-frame error energy
    assert ms.temporal_psnr > 200  # identical motion (inf up to float rounding of the offset)
    assert mf.temporal_psnr == pytest.approx(10 * math.log10(4 / 0.04**2), abs=1e-9)


def test_ms_ssim_when_frames_are_large_enough():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(1, 176, 180, 3, generator=g, dtype=torch.float64)
    m = video_metrics(v, v.clone())
    assert "ms_ssim" not in m.skipped
    assert m.ms_ssim == pytest.approx(1.0, abs=1e-6)
    assert m.temporal_psnr is None and "temporal_psnr" in m.skipped
    blurred = torch.nn.functional.avg_pool2d(v.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1)
    assert video_metrics(blurred, v).ms_ssim < 0.99


def test_tiny_frames_shrink_the_ssim_window():
    v = _video(f=2, h=8, w=6)
    m = video_metrics(v * 0.9, v)
    assert m.ssim_kernel == 5 and 0 < m.ssim < 1


def test_input_conventions_and_errors():
    v = _video(f=2, h=8, w=8)
    u8 = (v.numpy() * 255).round().astype(np.uint8)
    assert as_video(u8).shape == (2, 8, 8, 3)
    assert video_metrics(u8, u8).psnr == math.inf
    assert video_metrics(v[0].numpy(), v[0].numpy()).frames == 1  # a single image [H, W, C]
    with pytest.raises(ValueError, match="differ in shape"):
        video_metrics(v, v[:1])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        video_metrics(v * 2, v)
    with pytest.raises(ValueError, match="NaN"):
        video_metrics(v * float("nan"), v)
    with pytest.raises(ValueError, match=r"\[F, H, W, C\]"):
        video_metrics(v.permute(0, 3, 1, 2), v.permute(0, 3, 1, 2))


def test_lpips_is_skipped_with_a_reason_and_never_downloads(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty hub cache
    reason = lpips_unavailable_reason()
    assert reason is not None and ("torchvision" in reason or "not on disk" in reason)
    m = VideoQuality(lpips="auto")(_video(f=2, h=8, w=8), _video(f=2, h=8, w=8))
    assert m.lpips is None and m.skipped["lpips"] == reason
    with pytest.raises(RuntimeError, match="LPIPS requested but unavailable"):
        VideoQuality(lpips=True)
    assert "not requested" in video_metrics(_video(f=1), _video(f=1)).skipped["lpips"]
