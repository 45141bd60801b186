"""samples/compare_plans.py: the library example runs, writes the report and refuses to overwrite."""

import json

import pytest
import torch
from _samples import load_sample

from sparsediff.embedded import EmbeddedModelConfig, tiny_random_pipeline


@pytest.fixture(scope="module")
def cp():
    return load_sample("compare_plans")


def test_compare_plans_writes_report_and_refuses_overwrite(cp, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    cfg = EmbeddedModelConfig(num_layers=2, num_heads=2, head_dim=16, ffn_dim=32, text_layers=1)
    small = tiny_random_pipeline(config=cfg)  # the sample's own default model is larger; same code path
    monkeypatch.setattr(cp, "load_pipeline", lambda **kw: (small, {"source": "test", "class": "small"}))
    out = tmp_path / "cmp"
    argv = [
        "--out",
        str(out),
        "--plans",
        "radial,dense_layers=[],min_tokens=0",
        "dense",
        "--backend",
        "reference",
    ]
    assert cp.main(argv) == 0
    printed = capsys.readouterr().out
    assert "dense-plan: density 1.000" in printed and "PSNR inf dB" in printed
    res = json.loads((out / "results.json").read_text())
    radial = res["variants"][1]
    assert radial["label"] == "radial+dense_layers=[],min_tokens=0" and 0.0 < radial["mean_density"] < 1.0
    assert len(res["settings"]["prompts"]) == 2 and (out / "report.html").stat().st_size > 0
    before = (out / "report.md").read_bytes()
    assert cp.main(argv) == 2  # existing outputs are not overwritten silently
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.md").read_bytes() == before


def test_demo_prompts_file_is_the_demos_and_held_out_of_the_finetune_prompts():
    """README's and BENCHMARKS' finetune commands hold the demo's prompts out by this file: it must list exactly
    the demo's default prompts, none of which is a training prompt."""
    from pathlib import Path

    from sparsediff.cli_args import read_prompts_file
    from sparsediff.demo import DEFAULT_PROMPTS

    root = Path(__file__).resolve().parents[1] / "samples"
    demo = read_prompts_file(str(root / "prompts_demo.txt"))
    assert demo == list(DEFAULT_PROMPTS)
    train = read_prompts_file(str(root / "prompts_finetune.txt"))
    assert len(train) == 48 and not set(demo) & set(train)
