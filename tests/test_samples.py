"""samples/compare_plans.py: metrics, outputs, and no silent overwrite (tiny sizes, CPU)."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "samples" / "compare_plans.py"


@pytest.fixture(scope="module")
def cp():
    spec = importlib.util.spec_from_file_location("compare_plans", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_psnr_and_ssim_metrics(cp):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 16, 16, 3, generator=g)
    assert cp.psnr(x, x) == math.inf
    assert cp.ssim(x, x) == pytest.approx(1.0)
    y = (x + 0.1).clamp(0, 1)
    # MSE of a constant offset of 0.1 (clamping only lowers it) -> PSNR >= 20 dB
    assert cp.psnr(x, y) >= 20.0 - 1e-9
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    very_noisy = (x + 0.5 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert 1.0 > cp.ssim(x, noisy) > cp.ssim(x, very_noisy)
    assert cp.psnr(x, noisy) > cp.psnr(x, very_noisy)


def test_compare_plans_writes_report_and_refuses_overwrite(cp, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = [
        "--out",
        str(out),
        "--plans",
        "radial",
        "tile",
        "--steps",
        "2",
        "--frames",
        "33",
        "--height",
        "64",
    ]
    argv += ["--width", "64", "--block-size", "16", "--backend", "reference", "--strip-frames", "3"]
    assert cp.main(argv) == 0
    report = (out / "report.md").read_text()
    for name in ("dense", "radial", "tile"):
        assert f"| {name} |" in report
    res = json.loads((out / "results.json").read_text())
    assert res["dense"]["density"] == 1.0
    for name in ("radial", "tile"):
        assert 0.0 < res[name]["density"] < 1.0, res[name]  # really ran sparse
        assert math.isfinite(res[name]["psnr"]) and 0.0 < res[name]["ssim"] <= 1.0
    assert (out / "strip.png").stat().st_size > 0
    assert (out / "radial_s0.gif").exists()
    before = (out / "report.md").read_bytes()
    assert cp.main(argv) == 2  # existing outputs are not overwritten silently
    assert (out / "report.md").read_bytes() == before
