"""The ``observer`` tap of the per-layer attention dispatch (what ``sparsediff search`` profiles through)."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import build

import sparsediff.api as api
from sparsediff.config import SparseAttentionConfig
from sparsediff.hooks import AttentionCall
from sparsediff.plan import Plan


def test_observer_sees_every_self_attention_call_and_leaves_output_unchanged():
    tiny = build("wan")
    base = tiny()
    calls: list[AttentionCall] = []
    h = api.enable_sparse_attention(tiny.pipe, Plan.dense(), backend="reference", observer=calls.append)
    out = tiny()
    h.disable()
    assert torch.equal(out, base)
    n_layers = len(tiny.pipe.transformer.blocks)
    steps = tiny.kwargs["num_inference_steps"]
    # CFG as two transformer calls per step (Wan): branches 0 and 1
    branches = 2 if tiny.kwargs.get("guidance_scale", 1.0) > 1.0 else 1
    assert len(calls) == n_layers * steps * branches
    seen = {(c.layer, c.step, c.branch) for c in calls}
    assert seen == {(li, s, b) for li in range(n_layers) for s in range(steps) for b in range(branches)}
    c = calls[0]
    assert c.query.dim() == 4 and c.query.shape[2] == tiny.layout.num_tokens
    assert c.query.shape[1] == tiny.pipe.transformer.config.num_attention_heads
    assert c.layout == tiny.layout and c.num_steps == steps and c.head_offset == 0


def test_observer_must_be_callable():
    with pytest.raises(TypeError, match="observer must be callable"):
        SparseAttentionConfig(observer=3)
