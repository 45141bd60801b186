"""Eager vs regional compile of a tiny transformer with sparse attention on (shared by the compile tests)."""

from __future__ import annotations

import torch

TIMESTEPS = (900.0, 500.0)


def eager_then_compiled(t, x, enc, timesteps=TIMESTEPS):
    """Outputs of ``t(x, timestep, enc)`` at each timestep eagerly, then again after
    ``compile_repeated_blocks(fullgraph=True, backend="aot_eager")`` with recompiles made an error.
    Call under ``torch.no_grad()`` with sparse attention already enabled on ``t``."""
    eager = [t(x, torch.tensor([tv]), enc, return_dict=False)[0] for tv in timesteps]
    t.compile_repeated_blocks(fullgraph=True, backend="aot_eager")
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = [t(x, torch.tensor([tv]), enc, return_dict=False)[0] for tv in timesteps]
    return eager, compiled


def assert_one_graph_like_eager(counters, eager, compiled) -> None:
    """One compiled graph, no graph break, and the compiled outputs equal the eager ones."""
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
