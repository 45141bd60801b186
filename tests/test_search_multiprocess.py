"""``accelerate launch -m sparsediff.search`` with 2 CPU processes (gloo): the same plan as one process.

Three prompts split 2 + 1 (contiguous shares), per-prompt statistics merged in prompt order on the main
process; only the main process writes the plan and the statistics and prints the table. The single-process
run is ``sparsediff search`` in this process on the same prompts, on the same tiny Wan pipeline
(``test_search_cli:tiny_wan``, 2 steps).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsediff.cli import main as sd_main
from sparsediff.search.profile import SearchStats

ARGS = ["--pipeline", "test_search_cli:tiny_wan", "--density", "0.5", "--block-size", "8", "--num-rows", "32"]
ARGS += ["--keep-slow-layers"]  # the speed guard would make the plan depend on wall-clock timings
# from wall-clock timings (the profiling run, the replayed price): differ run to run
TIMED = ("predicted_step_speedup", "predicted_attention_speedup", "attention_fraction", "price")


def _plan_without_timings(path: Path) -> dict:
    d = json.loads(path.read_text())
    for k in TIMED:
        d["meta"]["search"].pop(k)
    return d


@pytest.mark.slow  # two interpreter start-ups + gloo: ~20 s of CPU
def test_two_processes_write_the_single_process_plan(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat running\na blue dog in the city\na green bird\n", encoding="utf-8")
    mp_plan, mp_stats = tmp_path / "mp.json", tmp_path / "mp_stats.json"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    argv = launch + ["-m", "sparsediff.search", "--prompts", str(prompts), "--out", str(mp_plan)]
    argv += ["--stats", str(mp_stats), "--no-progress", *ARGS]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # only the main process reports and writes
    assert proc.stdout.count("profiled 3 prompts on 2 processes") == 1, proc.stdout
    assert proc.stdout.count("wrote ") == 1 and proc.stdout.count("layer  density") == 1, proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mp.json", "mp_stats.json", "prompts.txt"]

    one_plan, one_stats = tmp_path / "one" / "plan.json", tmp_path / "one" / "stats.json"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = sd_main(
            ["search", "--prompts", str(prompts), "--out", str(one_plan), "--stats", str(one_stats)]
            + ARGS
            + ["--no-progress"]
        )
    finally:
        torch.set_num_threads(n)
    assert rc == 0

    assert _plan_without_timings(mp_plan) == _plan_without_timings(one_plan)
    multi, single = SearchStats.load(mp_stats), SearchStats.load(one_stats)
    assert multi.meta["prompts"] == single.meta["prompts"] == 3
    assert set(multi.layers) == set(single.layers)
    for i, s in single.layers.items():
        m = multi.layers[i]
        assert m.candidates == s.candidates and torch.equal(m.count, s.count) and m.calls == s.calls
        for name in ("err", "recall", "density"):
            assert torch.allclose(getattr(m, name), getattr(s, name), rtol=1e-9, atol=1e-12), (i, name)
