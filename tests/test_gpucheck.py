"""``python -m sparsediff.gpucheck``: the dry run end to end (so the prepared GPU run cannot rot), a
failing check reported as such with exit status 1, and the budget listing what it skips."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsediff import gpucheck

ROOT = Path(__file__).resolve().parent.parent
EXPECTED_KEYS = {
    "command", "dry_run", "budget_s", "environment", "settings", "correctness", "kernel", "fwd_bwd", "e2e",
    "skipped", "errors", "elapsed_s", "finished", "all_correct",
}  # fmt: skip


def _load(out: Path) -> tuple[str, dict]:
    md = (out / "gpucheck.md").read_text()
    data = json.loads((out / "gpucheck.json").read_text())
    return md, data


def test_dry_run_end_to_end(tmp_path):
    out = tmp_path / "out"
    # as a user runs it: without a GPU the command turns Triton's interpreter on itself (re-executes)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "sparsediff.gpucheck", "--dry-run", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    md, data = _load(out)
    assert proc.stdout.strip() == md.strip()  # the Markdown is printed
    assert EXPECTED_KEYS <= set(data)
    assert data["dry_run"] and data["finished"] and data["all_correct"]
    assert data["environment"]["triton_interpreter"] == (not torch.cuda.is_available())
    assert all(
        c["name"].endswith("[triton]") for c in data["correctness"] if not c["name"].startswith("pytest")
    )
    assert data["command"] == f"python -m sparsediff.gpucheck --dry-run --out {out}"
    assert data["skipped"] == [] and data["errors"] == []
    for key in ("torch", "triton", "diffusers", "date_utc"):
        assert data["environment"][key]

    sizes = gpucheck.sizes_for(dry_run=True)
    checks = data["correctness"]
    names = [c["name"] for c in checks]
    assert sum(n.startswith("forward ") for n in names) == len(sizes.fwd_cases) * len(sizes.dtypes)
    assert sum(n.startswith("backward ") for n in names) == len(sizes.bwd_cases) * len(sizes.dtypes)
    assert [n for n in names if n.startswith("pytest ")] == [
        f"pytest {f} (first 3 tests)" for f in gpucheck.PYTEST_FILES
    ]
    assert all(c["detail"].startswith("3 passed") for c in checks if c["name"].startswith("pytest "))
    assert all(c["status"] == "pass" for c in checks), [c for c in checks if c["status"] != "pass"]
    assert (out / "pytest.log").is_file()

    n_kernel = len(sizes.kernel_shapes) * len(sizes.blocks) * len(sizes.densities)
    assert len(data["kernel"]) == n_kernel
    assert all(r["ms_sparse"] and r["ms_sdpa_sdpa"] for r in data["kernel"])
    assert len(data["fwd_bwd"]) == len(sizes.fwd_bwd_shapes) * len(sizes.fwd_bwd_densities)
    assert all(r["ms_fwdbwd_sparse"] and r["ms_fwdbwd_sdpa"] for r in data["fwd_bwd"])
    e2e = data["e2e"]
    assert len(e2e) == len(sizes.models) * (2 + len(sizes.e2e_densities))
    assert all(r["ms"] > 0 and r["finite"] for r in e2e)
    sparse_rows = [r for r in e2e if r["variant"] != "dense"]
    assert all(r["sparse_calls"] > 0 and "fallback" not in json.dumps(r["dense_calls"]) for r in sparse_rows)

    for heading in (
        "## Correctness",
        f"**{len(checks)} of {len(checks)} checks passed**",
        "## Kernel: block-sparse forward vs dense SDPA and FlexAttention",
        "### block 128",
        "### block 64",
        "| model | N | H×D | block | density | ms sparse | ms SDPA |",  # sparsediff.bench.format_table
        "## Kernel: forward + backward vs dense SDPA",
        "| model | N | H×D | block | density | ms fwd sparse |",
        "## End to end: one transformer forward, random weights",
        "| model | tokens | variant | plan | density | ms / forward |",
        "## Skipped or failed items",
        "nothing skipped, no errors",
    ):
        assert heading in md, heading


def test_failing_check_is_reported_and_exit_status_is_1(tmp_path, monkeypatch):
    """A wrong kernel output (D = 96 cases) fails those checks by the tolerance rule; a crash of the
    pytest run fails its entries; every other check still runs and passes; exit status 1."""
    real = gpucheck.block_sparse_attention

    def wrong_for_d96(q, k, v, mask, **kw):
        res = real(q, k, v, mask, **kw)
        if q.shape[-1] != 96:
            return res
        return (res[0] * 1.05, res[1]) if isinstance(res, tuple) else res * 1.05

    def crashing_pytest(*args, **kwargs):
        raise RuntimeError("pytest crashed")

    monkeypatch.setattr(gpucheck, "block_sparse_attention", wrong_for_d96)
    monkeypatch.setattr(gpucheck, "run_pytest", crashing_pytest)
    out = tmp_path / "out"
    rc = gpucheck.main(["--dry-run", "--out", str(out), "--sections", "correctness"])
    assert rc == 1
    md, data = _load(out)
    assert not data["all_correct"]
    by_status: dict[str, list[str]] = {}
    for c in data["correctness"]:
        by_status.setdefault(c["status"], []).append(c["name"])
    failed = by_status["fail"]
    assert sorted(n for n in failed if not n.startswith("pytest")) == sorted(
        n for n in (c["name"] for c in data["correctness"]) if "D=96" in n
    )
    assert len([n for n in failed if "D=96" in n]) == 4  # forward and backward, bf16 and fp16
    pytest_names = [n for n in failed if n.startswith("pytest")]
    assert pytest_names == [f"pytest {f} (first 3 tests)" for f in gpucheck.PYTEST_FILES]
    n_checks = len(data["correctness"])
    assert len(by_status["pass"]) == n_checks - 4 - len(pytest_names) and "skip" not in by_status
    d96 = next(c for c in data["correctness"] if "D=96" in c["name"])
    assert "max abs error vs fp32 oracle" in d96["detail"]
    assert "RuntimeError: pytest crashed" in next(
        c["detail"] for c in data["correctness"] if c["name"].startswith("pytest")
    )
    assert f"**{len(by_status['pass'])} of {n_checks} checks passed** -- not passed:" in md
    assert "| fail |" in md
    assert {(x["section"], x["reason"]) for x in data["skipped"]} == {
        (s, "not selected by --sections") for s in ("kernel", "fwd_bwd", "e2e")
    }


def test_budget_lists_every_item_it_skips(tmp_path):
    out = tmp_path / "out"
    rc = gpucheck.main(["--dry-run", "--out", str(out), "--budget-s", "0"])
    assert rc == 1  # no correctness check ran
    md, data = _load(out)
    assert data["finished"] and not data["all_correct"]
    assert data["correctness"] and all(c["status"] == "skip" for c in data["correctness"])
    assert data["kernel"] == [] and data["fwd_bwd"] == [] and data["e2e"] == []
    sizes = gpucheck.sizes_for(dry_run=True)
    per_section: dict[str, int] = {}
    for x in data["skipped"]:
        assert ("budget" in x["reason"] and "needs ~" in x["reason"]) or "no time left" in x["reason"], x
        per_section[x["section"]] = per_section.get(x["section"], 0) + 1
    assert per_section == {
        "correctness": (len(sizes.fwd_cases) + len(sizes.bwd_cases)) * len(sizes.dtypes)
        + len(gpucheck.PYTEST_FILES),
        "kernel": len(sizes.kernel_shapes) * len(sizes.blocks),
        "fwd_bwd": len(sizes.fwd_bwd_shapes),
        "e2e": len(sizes.models) * (2 + len(sizes.e2e_densities)),
    }
    assert md.count("| skipped: ") == len(data["skipped"])


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dry-run", "--out", "x", "--sections", "kernel,nope"], "unknown section"),
        (["--dry-run", "--out", "x", "--shapes", "wan2.1-1.3b,nope"], "unknown shape"),
        pytest.param(
            ["--out", "x"], "no CUDA device",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal"),
        ),
    ],
)  # fmt: skip
def test_usage_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert gpucheck.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
