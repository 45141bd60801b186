"""Timing helpers shared by the tools (``sparsediff demo``, ``sparsediff compare``)."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ATTENTION_OPS", "AttentionTimer"]

#: Attention operators :class:`AttentionTimer` adds up: dense SDPA (self and cross attention; the sparse run
#: still calls it for cross-attention) and the sparse op (which also runs the dense warm-up layers/steps).
ATTENTION_OPS = ("scaled_dot_product_attention", "sparsediff::block_sparse_attn")


class AttentionTimer(TorchFunctionMode):
    """Wall time spent in attention operators while the mode is active (``with AttentionTimer() as t:``).

    Counts ``F.scaled_dot_product_attention`` and the ``sparsediff::block_sparse_attn`` op, each call timed
    around the operator only (CUDA synchronised before and after). A torch function mode is per thread,
    so two pipelines timed in two threads do not mix; the cost is one Python call per torch function
    (microseconds per operator, well under 1 % of a denoising step here), so the timed generation is the
    one whose wall time is reported -- no second, profiled run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds = 0.0
        self.calls = 0
        #: the part of ``seconds`` spent in self-attention (query and key sequences of the same length)
        self.self_seconds = 0.0

    @staticmethod
    def _is_attention(func: Any) -> bool:
        if func is torch.nn.functional.scaled_dot_product_attention:
            return True
        name = getattr(func, "name", None)
        return isinstance(func, torch._ops.OpOverload) and callable(name) and name() == ATTENTION_OPS[1]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._is_attention(func):
            return func(*args, **kwargs)
        cuda = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args[:3])
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.calls += 1
        q, k = (kwargs.get(n, a) for n, a in zip(("query", "key"), (*args[:2], None, None)))
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.shape[-2] == k.shape[-2]:
            self.self_seconds += dt
        return out
