"""``accelerate launch -m sparsediff.compare --cp ring=2``: 2 CPU processes (gloo) generate every sample
together under ring context parallelism, with sparse attention on each rank's share; the main process
writes one report whose numbers equal one process's (same masks: identical densities; same videos:
PSNR vs dense equal), and records the context-parallel degrees.

The ``--pipeline`` factory is the tiny Wan pipeline of ``tiny_pipelines.py`` with the test-only native
LSE patch of ``test_ring_context_parallel.py`` (diffusers 0.42.1 has no CPU backend that returns the LSE
its dense ring attention needs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsediff import compare as cmp
from sparsediff.cli_args import context_parallel_degrees

_TESTS = Path(__file__).parent
PROMPT = "a red circle moving left"
# dynamic top-p (masks from the all-gathered q/k under ring); strict: a dense fallback fails the run
VARIANT = "topp,topp.top_p=0.5,topp.min_frac=0,min_tokens=0,dense_steps=0,strict=True"
SIZE = {"num_frames": 9, "height": 64, "width": 96, "num_inference_steps": 2}


def cp_wan_pipeline():
    """``--pipeline test_ring_cli:cp_wan_pipeline`` (the subprocesses put tests/ on sys.path)."""
    import tiny_pipelines as tp
    from test_ring_context_parallel import _patch_native_lse

    _patch_native_lse()
    return tp.tiny_wan().pipe


def test_cp_flag_parses_and_rejects():
    assert context_parallel_degrees("ulysses=2,ring=2") == (2, 2)
    assert context_parallel_degrees("ring=4") == (1, 4)
    for bad in ("ring=1", "ulysses=2,rings=2", "2", "ring=0"):
        with pytest.raises(argparse.ArgumentTypeError):
            context_parallel_degrees(bad)


def test_compare_under_ring_matches_one_process(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    out = tmp_path / "cp"
    env = {**os.environ, "PYTHONPATH": str(_TESTS), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv = launch + [
        "-m", "sparsediff.compare", "--pipeline", "test_ring_cli:cp_wan_pipeline", "--cp", "ring=2",
        "--prompt", PROMPT, "--seeds", "0", "--plans", VARIANT, "--out", str(out), "--frames", "9",
        "--height", "64", "--width", "96", "--steps", "2", "--block-size", "10", "--backend", "reference",
        "--warmup", "0", "--no-progress", "--format", "gif", "--lpips", "off", "--threads", "1",
    ]  # fmt: skip
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("report:") == 1  # only the main process reports
    res = json.loads((out / "results.json").read_text())
    assert res["settings"]["processes"] == 2
    assert res["settings"]["context_parallel"] == {"ulysses": 1, "ring": 2}
    assert "context parallel: Ulysses 1 x ring 2" in (out / "report.md").read_text()

    sys.path.insert(0, str(_TESTS))
    import tiny_pipelines as tp

    torch.set_num_threads(1)
    single = cmp.compare(
        tp.tiny_wan().pipe, [PROMPT], seeds=[0], plans=[VARIANT], block_size=10, backend="reference",
        warmup=0, progress=False, lpips=False, **SIZE,
    )  # fmt: skip
    multi_v, one_v = res["variants"][1], single["variants"][1]
    assert one_v["mean_density"] < 1.0, "the variant did not run sparse in one process"
    assert multi_v["density_per_layer"] == one_v["density_per_layer"], "ring chose other masks"
    m, o = multi_v["samples"][0]["metrics"]["psnr"], one_v["samples"][0]["metrics"]["psnr"]
    assert o is not None and o < 100, "the sparse video equals the dense one: the test proves nothing"
    print(f"PSNR vs dense: ring {m}, one process {o}; densities {multi_v['density_per_layer']}")
    assert m == pytest.approx(o, rel=1e-5), f"PSNR vs dense under ring {m} != one process {o}"


SEARCH = [
    "--pipeline",
    "test_search_cli:tiny_wan",
    "--density",
    "0.5",
    "--block-size",
    "8",
    "--num-rows",
    "32",
]
SEARCH += ["--keep-slow-layers", "--prompt", PROMPT, "--no-progress"]


def test_search_under_ulysses_measures_every_head_as_one_process(tmp_path):
    """``accelerate launch -m sparsediff.search --cp ulysses=2``: each process measures its head of every
    prompt; the joined statistics (and so the plan) are one process's."""
    from sparsediff.cli import main as sd_main
    from sparsediff.search.profile import SearchStats

    env = {**os.environ, "PYTHONPATH": str(_TESTS), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    mp_plan, mp_stats = tmp_path / "mp.json", tmp_path / "mp_stats.json"
    argv = launch + ["-m", "sparsediff.search", "--cp", "ulysses=2", "--out", str(mp_plan)]
    argv += ["--stats", str(mp_stats), *SEARCH]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("wrote ") == 1, proc.stdout

    one_plan, one_stats = tmp_path / "one.json", tmp_path / "one_stats.json"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert sd_main(["search", "--out", str(one_plan), "--stats", str(one_stats), *SEARCH]) == 0
    finally:
        torch.set_num_threads(n)
    multi, single = SearchStats.load(mp_stats), SearchStats.load(one_stats)
    assert set(multi.layers) == set(single.layers)
    for i, s in single.layers.items():
        m = multi.layers[i]
        assert m.num_heads == s.num_heads == 2 and torch.equal(m.count, s.count)
        for name in ("err", "recall", "density"):
            assert torch.allclose(getattr(m, name), getattr(s, name), rtol=1e-4, atol=1e-6), (i, name)
    layers = lambda p: json.loads(p.read_text())["layers"]  # noqa: E731
    assert layers(mp_plan) == layers(one_plan)


def test_search_refuses_ring(tmp_path, capsys):
    from sparsediff.cli import main as sd_main

    rc = sd_main(["search", "--cp", "ring=2", "--out", str(tmp_path / "p.json"), *SEARCH])
    assert rc == 2 and "use --cp ulysses=U" in capsys.readouterr().err
