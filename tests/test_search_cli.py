"""``sparsediff search`` / ``sparsediff plan show`` end to end on a tiny Wan pipeline, statistics
save/merge, and every bad input the command promises to reject."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tiny_pipelines import build

from sparsediff.cli import main as sd_main
from sparsediff.defaults import VIDEO_MIN_TOKENS
from sparsediff.plan import Plan
from sparsediff.search.profile import SearchStats, profile_pipeline

# --keep-slow-layers: at these tiny sizes no sparse layer is faster than dense SDPA on a CPU, so the default
# speed guard would make every layer dense (tests/test_search_price.py tests the guard)
RUN = ["--block-size", "8", "--num-rows", "32", "--no-progress", "--keep-slow-layers"]


def tiny_wan():
    """--pipeline target: the tiny Wan pipeline and its small call kwargs."""
    t = build("wan")
    kw = {k: v for k, v in t.kwargs.items() if k != "prompt"}
    return t.pipe, kw


class _NotADiT:
    components = {"transformer": torch.nn.Linear(4, 4)}


def not_a_dit():
    return _NotADiT()


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("a red cat running\n\n# comment\na blue dog in the city\n", encoding="utf-8")
    return str(p)


def _search(*args: str) -> int:
    return sd_main(["search", "--pipeline", "test_search_cli:tiny_wan", *args, *RUN])


def test_search_writes_a_plan_that_loads_validates_and_generates(tmp_path, prompts, capsys):
    out = tmp_path / "plan.json"
    rc = _search("--prompts", prompts, "--density", "0.5", "--out", str(out))
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "layer" in text and "predicted attention speedup" in text and f"wrote {out}" in text
    plan = Plan.load(out)
    assert Plan.from_dict(json.loads(plan.to_json())) == plan  # round trip
    pipe, kw = tiny_wan()
    plan.validate_for(pipe.transformer)
    assert plan.stats is not None and plan.meta["search"]["budget_met"] is True
    # the video family's token threshold (VIDEO_MIN_TOKENS) is for the training-free default: a searched plan
    # engages at the size it was measured at
    assert 0 < plan.min_tokens <= plan.layout.num_tokens < VIDEO_MIN_TOKENS, plan.min_tokens
    sparse_heads = [s for row in plan.layers for s in row if s.pattern != "dense"]
    assert sparse_heads, plan.summary()
    # the searched plan runs: output differs from dense, sparse layers compute < 100 % of the blocks
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = pipe(prompt="a red cat running", generator=gen(), **kw)[0]
    h = pipe.enable_sparse_attention(str(out), backend="reference", block_size=8)
    sparse = pipe(prompt="a red cat running", generator=gen(), **kw)[0]
    dens = h.densities()["transformer"]
    pipe.disable_sparse_attention()
    assert torch.isfinite(sparse).all() and not torch.equal(sparse, base)
    assert dens and all(d < 1.0 for d in dens.values()), dens
    # plan show: summary + heatmap
    png = tmp_path / "plan.png"
    assert sd_main(["plan", "show", str(out), "--png", str(png)]) == 0
    shown = capsys.readouterr().out
    assert "WanTransformer3DModel" in shown and "density" in shown
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_stats_merge_equals_one_run_and_resumes(tmp_path, prompts, capsys):
    pipe, kw = tiny_wan()
    common = dict(call_kwargs=kw, block_size=8, num_rows=32)
    both = profile_pipeline(pipe, ["a red cat running", "a blue dog"], **common)
    a = profile_pipeline(pipe, ["a red cat running"], **common)
    b = profile_pipeline(pipe, ["a blue dog"], **common)
    path = tmp_path / "s.json"
    a.save(path)
    merged = SearchStats.load(path).merge(b)
    assert merged.meta["prompts"] == 2 and set(merged.layers) == set(both.layers)
    for i, s in both.layers.items():
        m = merged.layers[i]
        assert m.candidates == s.candidates and torch.equal(m.count, s.count)
        for name in ("err", "recall", "density"):
            assert torch.allclose(getattr(m, name), getattr(s, name), rtol=1e-9, atol=1e-12), name
    # --stats: the second run adds to the saved statistics
    st, out = tmp_path / "cli_stats.json", tmp_path / "p.json"
    assert _search("--prompts", prompts, "--target-error", "0.1", "--out", str(out), "--stats", str(st)) == 0
    assert SearchStats.load(st).meta["prompts"] == 2
    assert (
        _search(
            "--prompts",
            prompts,
            "--target-error",
            "0.1",
            "--out",
            str(out),
            "--stats",
            str(st),
            "--overwrite",
        )
        == 0
    )
    assert SearchStats.load(st).meta["prompts"] == 4
    capsys.readouterr()
    # the deprecated spelling still works, with a one-line warning naming the new flag
    rc = _search(
        "--prompts", prompts, "--target-error", "0.1", "--out", str(out), "--stats", str(st), "--force"
    )
    assert rc == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "deprecated" in ln]
    assert warnings == [
        "sparsediff search: warning: --force is deprecated and will be removed; use --overwrite"
    ]


def _error(capsys, rc: int, *needles: str) -> None:
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, err


def test_missing_prompts_file(tmp_path, capsys):
    _error(
        capsys,
        _search(
            "--prompts",
            str(tmp_path / "nope.txt"),
            "--target-error",
            "0.1",
            "--out",
            str(tmp_path / "p.json"),
        ),
        "prompts file not found",
    )


def test_empty_prompts_file(tmp_path, capsys):
    p = tmp_path / "empty.txt"
    p.write_text("\n  \n# only a comment\n", encoding="utf-8")
    _error(
        capsys,
        _search("--prompts", str(p), "--target-error", "0.1", "--out", str(tmp_path / "p.json")),
        "has no prompts",
    )


def test_not_a_supported_dit(tmp_path, prompts, capsys):
    rc = sd_main(
        [
            "search",
            "--pipeline",
            "test_search_cli:not_a_dit",
            "--prompts",
            prompts,
            "--target-error",
            "0.1",
            "--out",
            str(tmp_path / "p.json"),
            *RUN,
        ]
    )
    _error(capsys, rc, "Linear", "Supported transformer classes")
    assert not (tmp_path / "p.json").exists()


def test_existing_output_without_overwrite(tmp_path, prompts, capsys):
    out = tmp_path / "p.json"
    out.write_text("{}", encoding="utf-8")
    _error(
        capsys,
        _search("--prompts", prompts, "--target-error", "0.1", "--out", str(out)),
        "exists",
        "--overwrite",
    )
    assert out.read_text(encoding="utf-8") == "{}"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_nonroot(tmp_path, prompts, capsys):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        _error(
            capsys,
            _search("--prompts", prompts, "--target-error", "0.1", "--out", str(d / "p.json")),
            "not writable",
        )
    finally:
        d.chmod(0o700)


def test_unwritable_output_under_a_file(tmp_path, prompts, capsys):
    f = tmp_path / "afile"
    f.write_text("x", encoding="utf-8")
    _error(
        capsys,
        _search("--prompts", prompts, "--target-error", "0.1", "--out", str(f / "sub" / "p.json")),
        "not writable",
    )


def test_unwritable_output_is_a_directory(tmp_path, prompts, capsys):
    _error(
        capsys,
        _search("--prompts", prompts, "--target-error", "0.1", "--out", str(tmp_path)),
        "is a directory",
    )


def test_budget_that_cannot_be_met_writes_a_flagged_best_effort_plan(tmp_path, prompts, capsys):
    out = tmp_path / "p.json"
    rc = _search("--prompts", prompts, "--density", "0.001", "--out", str(out), "--candidates", "radial,tile")
    cap = capsys.readouterr()
    assert rc == 0
    assert "budget NOT met" in cap.out and "best-effort" in cap.err
    plan = Plan.load(out)
    assert plan.meta["search"]["budget_met"] is False and "NOT met" in plan.meta["search"]["message"]
    assert sd_main(["plan", "show", str(out)]) == 0
    assert "best-effort" in capsys.readouterr().out


def test_plan_show_bad_file(tmp_path, capsys):
    _error(capsys, sd_main(["plan", "show", str(tmp_path / "missing.json")]), "not found")


def test_profile_steps_out_of_range(tmp_path, prompts, capsys):
    _error(
        capsys,
        _search(
            "--prompts",
            prompts,
            "--target-error",
            "0.1",
            "--out",
            str(tmp_path / "p.json"),
            "--profile-steps",
            "0,7",
        ),
        "outside",
    )


def test_steps_seeds_and_pipeline_are_checked_before_loading(tmp_path, prompts, capsys):
    out = str(tmp_path / "p.json")
    with pytest.raises(SystemExit) as e:  # argparse: --steps >= 1
        _search("--prompts", prompts, "--target-error", "0.1", "--out", out, "--steps", "0")
    assert e.value.code == 2 and "--steps" in capsys.readouterr().err
    _error(
        capsys,
        _search("--prompts", prompts, "--density", "0.5", "--out", out, "--seeds", "1", "2"),
        "one seed",
    )
    for source, needle in (("nocolon", "MODULE:FUNCTION"), ("no_such_module_xyz:fn", "No module named")):
        rc = sd_main(["search", "--pipeline", source, "--prompts", prompts, "--density", "0.5", "--out", out])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "p.json").exists()


def test_plan_show_png_is_not_overwritten(tmp_path, capsys):
    from sparsediff.embedded import shipped_plan_path

    png = tmp_path / "h.png"
    png.write_bytes(b"mine")
    _error(capsys, sd_main(["plan", "show", str(shipped_plan_path()), "--png", str(png)]), "--overwrite")
    assert png.read_bytes() == b"mine"
    assert sd_main(["plan", "show", str(shipped_plan_path()), "--png", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_remainder_cached_is_given_to_the_chosen_static_heads_and_priced(tmp_path, prompts, capsys):
    out = tmp_path / "plan.json"
    args = ("--prompts", prompts, "--density", "0.5", "--candidates", "tile,topp", "--out", str(out))
    _error(capsys, _search(*args, "--remainder-refresh", "2"), "--remainder cached")
    rc = _search(*args, "--remainder", "cached", "--remainder-refresh", "2")
    text = capsys.readouterr().out
    assert rc == 0, text
    plan = Plan.load(out)
    heads = [s for row in plan.layers for s in row if s.pattern != "dense"]
    assert heads and all(
        (s.remainder, s.get("remainder_refresh")) == (("cached", 2) if s.is_static else ("none", 5))
        for s in heads
    ), plan.summary()
    assert any(s.remainder == "cached" for s in heads)
    assert "predicted" in text and plan.meta["search"]["price"]["num_steps"] > 0


def test_remainder_layers_give_the_cached_remainder_to_those_layers_only(tmp_path, prompts, capsys):
    out = tmp_path / "plan.json"
    args = ("--prompts", prompts, "--density", "0.5", "--candidates", "tile", "--dense-layers", "")
    for bad, needle in [
        (("--remainder-layers", "1"), "--remainder cached only"),
        (("--remainder", "cached", "--remainder-layers", "one"), "comma list of layer indices"),
        (("--remainder", "cached", "--remainder-layers", ","), "comma list of layer indices"),
        (("--remainder", "cached", "--remainder-layers", "0,2"), "the model has 2 self-attention layers"),
    ]:
        _error(capsys, _search(*args, *bad, "--out", str(out)), needle)
    assert not out.exists()
    rc = _search(*args, "--remainder", "cached", "--remainder-layers", "1", "--out", str(out))
    text = capsys.readouterr().out
    assert rc == 0, text
    plan = Plan.load(out)
    assert plan.schedule.dense_layers == () and len(plan.layers) == 2
    assert all(s.pattern == "tile" for row in plan.layers for s in row), plan.summary()
    assert [s.remainder for s in plan.layers[0]] == ["none"] * len(plan.layers[0])
    assert [s.remainder for s in plan.layers[1]] == ["cached"] * len(plan.layers[1])
    # the price is the edited plan's: the refresh passes of layer 1 only
    assert plan.meta["search"]["price"]["num_steps"] > 0 and "predicted" in text
