"""``sparsediff compare``: outputs, an all-dense plan equal to dense, and bad input stopped before generation.

A 2-layer embedded-architecture pipeline at 4 x 16 x 16 px (64 tokens, 16-token blocks) keeps every call
to a few milliseconds.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from sparsediff import compare as cmp
from sparsediff.compare import report as cmp_report
from sparsediff.compare import run as cmp_run
from sparsediff.embedded import EmbeddedModelConfig, tiny_random_pipeline
from sparsediff.plan import HeadSpec, Plan

SIZE = ["--frames", "4", "--height", "16", "--width", "16", "--steps", "2", "--block-size", "16"]
FAST = ["--warmup", "0", "--no-progress", "--format", "gif", "--backend", "reference"]
#: ``compare()`` keyword arguments of the in-process runs (4 x 32 x 32 px, reference backend, no warm-up).
TINY_RUN = dict(
    num_frames=4,
    height=32,
    width=32,
    block_size=16,
    backend="reference",
    warmup=0,
    video_format="gif",
    progress=False,
    command="test",
)


def _cfg(num_layers: int = 2) -> EmbeddedModelConfig:
    return EmbeddedModelConfig(
        num_layers=num_layers, num_heads=2, head_dim=16, ffn_dim=32, text_layers=1, text_ffn_dim=32
    )


def small_pipeline():
    """``--pipeline test_compare:small_pipeline`` (pytest puts tests/ on sys.path)."""
    return tiny_random_pipeline(config=_cfg())


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return small_pipeline()


def _never_generate(*a, **k):
    raise AssertionError("generation started despite bad input")


def test_all_dense_plan_equals_dense_and_every_output_is_written(pipe, tmp_path):
    out = tmp_path / "cmp"
    res = cmp.compare(
        pipe,
        ["a red circle moving left quickly", "a blue square moving up"],
        seeds=[0, 3],
        plans=[
            "dense",
            "radial,dense_steps=0,dense_layers=[],min_tokens=0",
            "tile,dense_steps=0,dense_layers=[],min_tokens=0,label=tile0",
        ],
        out=out,
        num_inference_steps=2,
        **TINY_RUN,
    )
    rows = {r["label"]: r for r in res["variants"]}
    assert list(rows) == ["dense", "dense-plan", "radial+dense_steps=0,dense_layers=[],min_tokens=0", "tile0"]
    assert rows["dense-plan"]["psnr"] == math.inf and rows["dense-plan"]["ssim"] == pytest.approx(1.0)
    assert rows["dense-plan"]["temporal_psnr"] == math.inf
    for name in ("radial+dense_steps=0,dense_layers=[],min_tokens=0", "tile0"):
        r = rows[name]
        assert 0.0 < r["mean_density"] < 1.0, r  # really ran sparse
        assert set(r["density_per_layer"]["transformer"]) == {"0", "1"}  # dense_layers=[] -> both sparse
        assert r["run_density"] == pytest.approx(r["mean_density"])  # no dense steps or layers
        assert math.isfinite(r["psnr"]) and 0.0 < r["ssim"] <= 1.0
        assert len(r["samples"]) == 4 and all(s["s_per_step"] > 0 for s in r["samples"])
        for s in r["samples"]:
            assert len(s["metrics"]["psnr_per_frame"]) == 4
    # files
    assert len(list((out / "videos").glob("*.gif"))) == 4 * 4
    assert sorted(p.name for p in (out / "strips").iterdir()) == [
        "p0_s0.png",
        "p0_s3.png",
        "p1_s0.png",
        "p1_s3.png",
    ]
    data = json.loads(
        (out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}")
    )
    # strict JSON: the infinite PSNR of the all-dense plan is written as null, and the file says so
    assert data["variants"][1]["psnr"] is None and data["variants"][1]["ssim"] == pytest.approx(1.0)
    assert "null" in data["json_notes"] and data["command"] == "test"
    assert {"sparsediff", "torch", "diffusers", "torchmetrics", "device"} <= set(data["environment"])
    page = (out / "report.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]*)"', page)
    assert len(srcs) == 2 + 4 and all(s.startswith("data:image/png;base64,") for s in srcs)  # self-contained
    assert "tile0" in page and "ms_ssim" in page  # the skipped metric is listed with its reason
    md = (out / "report.md").read_text()
    assert "| dense-plan | 1.000 |" in md and "MS-SSIM" not in md.split("\n\n")[2]  # n/a column dropped
    assert (out / "quality_speed.png").stat().st_size > 0 and (out / "density.png").stat().st_size > 0


def test_existing_outputs_are_kept_without_overwrite(pipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    (out / "videos").mkdir(parents=True)
    (out / "report.html").write_text("keep me")
    monkeypatch.setattr(cmp_run, "_generate", _never_generate)
    argv = ["--pipeline", "test_compare:small_pipeline", "--prompt", "a red circle moving left", "--out"]
    assert cmp.main(argv + [str(out)] + SIZE + FAST) == 2
    assert "already holds report.html" in capsys.readouterr().err
    assert (out / "report.html").read_text() == "keep me"
    with pytest.raises(cmp.CompareError, match="--overwrite"):  # library call too
        cmp.compare(pipe, ["a red circle moving left"], out=out, progress=False)


def test_overwrite_replaces_outputs(pipe, tmp_path):
    out = tmp_path / "cmp"
    kw = dict(
        num_frames=4,
        height=16,
        width=16,
        num_inference_steps=1,
        warmup=0,
        video_format="gif",
        progress=False,
        backend="reference",
    )
    cmp.compare(pipe, ["a red circle moving left"], plans=["radial"], out=out, **kw)
    (out / "videos" / "p0_s0_radial.gif").write_bytes(b"stale")
    cmp.compare(pipe, ["a red circle moving left"], plans=["tile"], out=out, overwrite=True, **kw)
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["p0_s0_dense.gif", "p0_s0_tile.gif"]


def _run_bad(argv, tmp_path, monkeypatch, capsys) -> str:
    monkeypatch.setattr(cmp_run, "_generate", _never_generate)
    base = ["--pipeline", "test_compare:small_pipeline", "--prompt", "a red circle moving left"]
    if "--out" not in argv:
        base += ["--out", str(tmp_path / "out")]
    assert cmp.main(base + argv + SIZE + FAST) == 2
    err = capsys.readouterr().err
    assert err.startswith("sparsediff compare: error:"), err
    assert not list((tmp_path / "out").glob("videos/*")) if (tmp_path / "out").exists() else True
    return err


def test_missing_plan_file(tmp_path, monkeypatch, capsys):
    err = _run_bad(["--plans", "radial", str(tmp_path / "nope.json")], tmp_path, monkeypatch, capsys)
    assert "plan file not found" in err and "nope.json" in err


def test_unknown_pattern_and_bad_override(tmp_path, monkeypatch, capsys):
    assert "neither a pattern name nor a plan file" in _run_bad(
        ["--plans", "radail"], tmp_path, monkeypatch, capsys
    )
    assert "unknown sparse-attention option" in _run_bad(
        ["--plans", "radial,dense_stepz=0"], tmp_path, monkeypatch, capsys
    )
    assert "radial" in _run_bad(["--plans", "radial,radial.decay=-1"], tmp_path, monkeypatch, capsys)


def test_plan_for_another_model(tmp_path, monkeypatch, capsys):
    other = tiny_random_pipeline(config=_cfg(num_layers=3)).transformer
    path = tmp_path / "other.json"
    Plan.per_head(other, [[HeadSpec("radial")] * 2] * 3).save(path)
    err = _run_bad(["--plans", str(path)], tmp_path, monkeypatch, capsys)
    assert "cannot run on this pipeline" in err and "layer count" in err


def test_unwritable_output(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")  # a folder cannot be made under a file (holds even when running as root)
    err = _run_bad(["--out", str(blocker / "sub")], tmp_path, monkeypatch, capsys)
    assert "not writable" in err


def test_empty_prompts(tmp_path, monkeypatch, capsys):
    f = tmp_path / "prompts.txt"
    f.write_text("# only a comment\n\n   \n")
    monkeypatch.setattr(cmp_run, "_generate", _never_generate)
    argv = ["--pipeline", "test_compare:small_pipeline", "--prompts", str(f), "--out", str(tmp_path / "o")]
    assert cmp.main(argv + SIZE + FAST) == 2
    assert "holds no prompts" in capsys.readouterr().err
    assert cmp.main(["--prompts", str(tmp_path / "missing.txt")] + FAST) == 2
    assert "prompts file not found" in capsys.readouterr().err
    with pytest.raises(cmp.CompareError, match="no prompts"):
        cmp.compare(object(), ["  "], out=None)


def test_parse_variant():
    v = cmp.parse_variant("radial,dense_steps=0.25,dense_layers=[0, 1],radial.decay=0.5,block_size=32")
    assert v.plan == "radial"
    assert v.overrides == {
        "dense_steps": 0.25,
        "dense_layers": [0, 1],
        "block_size": 32,
        "pattern_params": {"radial": {"decay": 0.5}},
    }
    assert cmp.parse_variant("default").plan is None
    w = cmp.parse_variant("dense_steps=0,label=fast")
    assert (w.plan, w.label, w.overrides) == (None, "fast", {"dense_steps": 0})
    with pytest.raises(cmp.CompareError, match="share the name"):
        cmp.unique_labels([cmp.parse_variant("radial"), cmp.parse_variant("radial")])
    with pytest.raises(cmp.CompareError, match="not key=value"):
        cmp.parse_variant("radial,tile")


def test_cli_registers_compare(capsys):
    from sparsediff.cli import main

    assert main(["--help"]) == 0
    assert "compare" in capsys.readouterr().out


@pytest.mark.slow  # two interpreter start-ups: ~30 s of CPU
def test_two_processes_split_pairs_and_write_one_report(pipe, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): same per-sample numbers as one process."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "mp"
    prompts = ["a red circle moving left", "a green cross moving down"]
    args = [
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--seeds",
        "0",
        "1",
        "--plans",
        "radial,min_tokens=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
    ]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sparsediff.compare"]
    argv = launch + ["--pipeline", "test_compare:small_pipeline", "--out", str(out)] + args + SIZE + FAST
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("report:") == 1  # only the main process reports
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["processes"] == 2
    assert len(list((out / "strips").glob("*.png"))) == 4 and not (out / ".compare-parts").exists()
    multi = {(s["prompt_index"], s["seed"]): s["metrics"]["psnr"] for s in res["variants"][1]["samples"]}
    single = cmp.compare(
        pipe,
        prompts,
        seeds=[0, 1],
        plans=["radial,min_tokens=0"],
        num_frames=4,
        height=16,
        width=16,
        num_inference_steps=2,
        block_size=16,
        backend="reference",
        warmup=0,
        progress=False,
    )
    one = {(s["prompt_index"], s["seed"]): s["metrics"]["psnr"] for s in single["variants"][1]["samples"]}
    assert multi.keys() == one.keys() == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for k in one:
        assert multi[k] == pytest.approx(one[k], rel=1e-6), k


def test_steps_must_be_positive_and_old_flag_spellings_warn(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cmp_run, "_generate", _never_generate)
    base = [
        "--pipeline",
        "test_compare:small_pipeline",
        "--prompt",
        "a red circle",
        "--out",
        str(tmp_path / "o"),
    ]
    with pytest.raises(SystemExit) as e:
        cmp.main(base + ["--steps", "0"] + FAST)
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    args = cmp.build_parser().parse_args(["--guidance", "3.5", "--num-frames", "4", "--force", "--seed", "7"])
    assert (args.guidance_scale, args.frames, args.overwrite, args.seeds) == (3.5, 4, True, [7])
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 4 and all("deprecated" in ln for ln in err)
    assert "use --guidance-scale" in err[0] and "use --frames" in err[1] and "use --overwrite" in err[2]


def test_bad_pipeline_source_is_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert cmp.main(["--pipeline", "nocolon", "--prompt", "x", "--out", str(out)] + FAST) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "expected MODULE:FUNCTION" in err
    assert cmp.main(["--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(out)] + FAST) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cmp.main(["--pipeline", "no_such_module_xyz:f", "--prompt", "x", "--out", str(out)] + FAST) == 2
    assert "No module named" in capsys.readouterr().err
    assert not out.exists()  # nothing written, not even the folder


def _fake_results(psnrs):
    rows = [{"label": "dense", "psnr": math.inf, "speedup": 1.0, "mean_density": 1.0}]
    for i, p in enumerate(psnrs):
        rows.append({"label": f"v{i}", "psnr": p, "speedup": 1.0 + 0.1 * i, "mean_density": 0.5})
    return {"variants": rows}


def test_results_json_is_strict_and_scatter_clips_off_scale_points(tmp_path):
    res = _fake_results([126.0, math.inf, 22.0, 25.0])
    path = cmp_report.write_json(
        tmp_path / "r.json", {**res, "nested": {"x": [math.inf, -math.inf, math.nan]}}
    )

    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["variants"][1]["psnr"] == 126.0 and data["variants"][2]["psnr"] is None
    assert data["nested"]["x"] == [None, None, None]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    real_savefig = plt.Figure.savefig

    def keep(fig, *a, **k):
        captured["ylim"] = fig.axes[0].get_ylim()
        captured["texts"] = [t.get_text() for t in fig.texts] + [t.get_text() for t in fig.axes[0].texts]
        return real_savefig(fig, *a, **k)

    plt.Figure.savefig, saved = keep, plt.Figure.savefig
    try:
        cmp_report._plot_quality_speed(res, tmp_path / "qs.png")
    finally:
        plt.Figure.savefig = saved
    lo, hi = captured["ylim"]
    assert lo < 22.0 and 25.0 < hi < 40.0  # the 126 dB and inf points do not squash the scale
    assert any("off scale" in t for t in captured["texts"])
    assert (tmp_path / "qs.png").stat().st_size > 0


def test_remainder_keys_edit_a_plan_file_on_chosen_layers(pipe, tmp_path):
    """``PLAN.json,remainder=cached,remainder_refresh=R,remainder_layers=[...]``: the plan file edited by
    ``Plan.with_remainder`` (the file itself untouched); checked before generating."""
    from sparsediff.specs import DenseSchedule

    tile = HeadSpec.make("tile", tile=(1, 4, 4), window=(1, 1, 1))
    path = tmp_path / "tile.json"
    plain = Plan.per_head(pipe.transformer, [[tile] * 2] * 2, schedule=DenseSchedule(1, ()), min_tokens=0)
    plain.save(path)
    on_1 = cmp.parse_variant(f"{path},remainder=cached,remainder_refresh=2,remainder_layers=[1],label=on1")
    assert on_1.remainder == ("cached", 2, (1,)) and on_1.plan == str(path) and on_1.overrides == {}
    edited = on_1.target()
    assert [s.remainder for s in edited.layers[0]] == ["none"] * 2
    assert [(s.remainder, s.get("remainder_refresh")) for s in edited.layers[1]] == [("cached", 2)] * 2
    assert cmp.parse_variant(f"{path},remainder=cached,remainder_layers=0").target().layers[0][
        0
    ].remainder == ("cached")
    for bad, needle in [
        (f"{path},remainder=cached,remainder_layers=[2]", "not layer indices"),
        (f"{path},remainder_layers=[0]", "need remainder="),
        (f"{path},remainder=cached,remainder_layers=x", "list of layer indices"),
        (f"{path},remainder=cached,remainder_refresh=1.5", "must be an int"),
        (f"{path},remainder=cachd", "remainder must be one of"),
        ("tile,remainder=cached", "PATTERN.remainder=cached"),
        ("remainder=cached", "plan file"),
    ]:
        with pytest.raises(cmp.CompareError, match=needle):
            cmp.parse_variant(bad)
    res = cmp.compare(
        pipe,
        ["a red circle moving left quickly"],
        seeds=[0],
        plans=[str(path), on_1.spec, f"{path},remainder=cached,remainder_refresh=2,label=every"],
        out=tmp_path / "cmp",
        num_inference_steps=3,
        **TINY_RUN,
    )
    rows = {r["label"]: r for r in res["variants"]}
    assert list(rows) == ["dense", "tile", "on1", "every"]
    assert "cached remainder 2/4" in rows["on1"]["plan"] and "cached remainder 4/4" in rows["every"]["plan"]
    psnr = {k: rows[k]["psnr"] for k in ("tile", "on1", "every")}
    assert all(math.isfinite(p) for p in psnr.values()) and len(set(psnr.values())) == 3, psnr
    assert 0 < rows["on1"]["mean_density"] < 1
    assert Plan.load(path) == plain  # the file is not edited
