"""``sparsediff demo``: the main job, on the shipped embedded model (sparse for real: density < 1, output
differs from dense, PSNR above a measured floor) and on the random-init Wan option; never overwrites without
--overwrite."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsediff import demo
from sparsediff.embedded import has_trained_weights


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_demo_on_the_shipped_embedded_model_runs_sparse(tmp_path, capsys):
    # The weights ship in the package; their absence is a packaging bug, not a reason to skip.
    assert has_trained_weights(), "sparsediff/embedded/weights/ is missing from the package"
    from sparsediff.embedded import load_embedded_pipeline, shipped_plan_path
    from sparsediff.plan import Plan

    # The default size is the model's (the demo's 4096 tokens); the test runs a smaller video for time.
    cfg = load_embedded_pipeline().config
    assert (cfg.sample_num_frames, cfg.sample_height, cfg.sample_width) == (16, 64, 64)
    shipped = shipped_plan_path()
    assert shipped is not None, "the searched plan must ship next to the weights"
    searched = Plan.load(shipped)
    assert searched.layout is not None and searched.layout.num_tokens == 4096
    assert searched.meta["search"]["predicted_step_speedup"] > 1.0

    out = tmp_path / "demo"
    # the reference twin: conftest turns on Triton's interpreter, which `auto` would pick on CPU (slow)
    args = ["--out", str(out), "--steps", "6", "--format", "gif", "--no-progress", "--backend", "reference"]
    args += ["--frames", "8", "--height", "48", "--width", "48"]
    assert demo.main(args) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    assert s["video"]["num_frames"] == 8 and s["video"]["height"] == s["video"]["width"] == 48
    assert s["video"]["tokens"] == 8 * 12 * 12
    assert s["model"].startswith("embedded trained")
    assert s["plan_source"] == "searched plan shipped with the model"
    # every layer the plan makes sparse ran sparse (density < 1)
    dens = {int(k): v for k, v in s["density_per_layer"].items()}
    sparse_layers = {i for i, row in enumerate(searched.layers) if any(h.pattern != "dense" for h in row)}
    sparse_layers -= set(searched.schedule.dense_layers)
    assert set(dens) == sparse_layers and all(0 < d < 1.0 for d in dens.values()), dens
    for r in s["prompts"]:
        assert (out / r["files"]["dense"]).stat().st_size > 0 and (
            out / r["files"]["sparse"]
        ).stat().st_size > 0
        # differs from dense (sparse really ran), but stays close; zeros or wrong heads give < 10 dB
        assert math.isfinite(r["psnr_db"]) and r["psnr_db"] > 16.0, r
        assert 0.5 < r["ssim"] < 1.0
        assert r["attention_ms"]["dense"] > 0 and r["attention_ms"]["sparse"] > 0
        assert set(r["checks"]) == {"dense", "sparse"}
    for key in ("speedup_per_step", "speedup_per_generation", "attention_share_of_dense_step"):
        assert s[key] > 0, key
    assert (out / "strip.png").stat().st_size > 0
    text = (out / "summary.txt").read_text()
    assert "PSNR" in text and "faster" in text and "of a dense step" in text

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert demo.main(args) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def _never_generate(*a, **k):
    raise AssertionError("generation started despite bad input")


def test_demo_rejects_bad_input_before_generating(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "_generate", _never_generate)
    out = tmp_path / "d"
    assert demo.main(["--out", str(out), "--plan", str(tmp_path / "missing.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, checked before the model is even loaded
    assert err.startswith("sparsediff demo: error: --plan") and "missing.json" in err
    assert not out.exists()  # nothing written
    with pytest.raises(SystemExit) as e:  # argparse: --steps >= 1
        demo.main(["--out", str(out), "--steps", "0"])
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err and not out.exists()
    assert demo.main(["--out", str(out), "--prompts", str(tmp_path / "none.txt")]) == 2
    assert "prompts file not found" in capsys.readouterr().err and not out.exists()
    # an existing demo is not touched by a bad --overwrite run
    out.mkdir()
    (out / "summary.txt").write_text("mine")
    assert demo.main(["--out", str(out), "--overwrite", "--plan", "no-such-pattern", "--no-progress"]) == 2
    assert (out / "summary.txt").read_text() == "mine"
    assert demo.main(["--out", str(out), "--no-progress"]) == 2  # existing outputs need --overwrite
    assert "--overwrite" in capsys.readouterr().err and (out / "summary.txt").read_text() == "mine"


def test_demo_deprecated_aliases_warn(capsys):
    args = demo.build_parser().parse_args(
        ["--num-frames", "5", "--guidance", "2.0", "--seed", "3", "--force"]
    )
    assert (args.frames, args.guidance_scale, args.seeds, args.overwrite) == (5, 2.0, [3], True)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "sparsediff demo: warning: --num-frames is deprecated and will be removed; use --frames",
        "sparsediff demo: warning: --guidance is deprecated and will be removed; use --guidance-scale",
        "sparsediff demo: warning: --seed is deprecated and will be removed; use --seeds",
        "sparsediff demo: warning: --force is deprecated and will be removed; use --overwrite",
    ]


def test_demo_random_wan_option_and_overwrite(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--out", str(out), "--model", "random-wan", "--steps", "2", "--frames", "5", "--height", "32"]
    args += [
        "--width",
        "48",
        "--format",
        "gif",
        "--no-progress",
        "--prompt",
        "anything",
        "--backend",
        "reference",
    ]
    assert demo.main([*args, "--plan", "tile"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["model"].startswith("tiny random-init Wan")
    assert (out / s["prompts"][0]["files"]["dense"]).stat().st_size > 0
    assert set(s["seconds_per_step"]) == {"dense", "sparse"}
    assert demo.main(args) == 2
    assert demo.main([*args, "--overwrite"]) == 0


def test_demo_rejects_an_unknown_model(tmp_path, capsys):
    assert demo.main(["--out", str(tmp_path / "d"), "--model", str(tmp_path / "nope")]) == 2
    assert "neither" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_attention_timer_counts_attention_ops_only_and_splits_self_from_cross():
    from sparsediff import BlockSparseMask, block_sparse_attention
    from sparsediff.timing import AttentionTimer

    q = torch.randn(1, 2, 64, 16)
    kv = torch.randn(1, 2, 8, 16)
    mask = BlockSparseMask.full(1, 2, 16, (64, 64))
    with AttentionTimer() as t:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)  # self
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv)  # cross (text)
        block_sparse_attention(q, q, q, mask, backend="reference")  # the sparse op
        (q @ q.transpose(-1, -2)).softmax(-1)  # not attention ops: not counted
    assert t.calls == 3 and t.seconds > 0
    assert 0 < t.self_seconds < t.seconds  # the cross-attention call is not self-attention
    with AttentionTimer() as t2:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
    assert t2.calls == 1 and t2.self_seconds == 0.0
