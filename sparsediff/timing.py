"""Timing helpers shared by the tools (``sparsediff demo``, ``compare``, ``bench``): :func:`sync`,
:func:`time_call`, :class:`AttentionTimer`, :class:`GenerationClock`."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ATTENTION_OPS", "AttentionTimer", "GenerationClock", "sync", "time_call"]

#: Attention operators :class:`AttentionTimer` adds up: dense SDPA (self and cross attention; the sparse run
#: still calls it for cross-attention) and the sparse op (which also runs the dense warm-up layers/steps).
ATTENTION_OPS = ("scaled_dot_product_attention", "sparsediff::block_sparse_attn")


def sync(device: torch.device | str | None = None) -> None:
    """Wait for the GPU work queued on ``device`` (all CUDA work with ``None`` when CUDA is up); a no-op on
    CPU. The one synchronisation helper of the timing code."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return
    d = torch.device(device)
    if d.type == "cuda":
        torch.cuda.synchronize(d)


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
            sync()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if cuda:
            sync()
        dt = time.perf_counter() - t0
        self.seconds += dt
        self.calls += 1
        q, k = (kwargs.get(n, a) for n, a in zip(("query", "key"), (*args[:2], None, None)))
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and q.shape[-2] == k.shape[-2]:
            self.self_seconds += dt
        return out


def time_call(fn: Any, device: torch.device | str) -> float:
    """Seconds of one call of ``fn()`` (CUDA synchronised before and after on a CUDA device)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class GenerationClock:
    """Times one pipeline call: ``with GenerationClock(pipe, cuda) as c: pipe(..., callback_on_step_end=
    c.on_step_end)``.

    Denoising runs from the first call of the pipeline's ``transformer`` (a forward pre-hook, removed on
    exit: after prompt encoding) to the last step's callback (before decoding), so every step is counted --
    a dense warm-up step included. Also times the whole call and, with an :class:`AttentionTimer`, the
    attention operators. Without a transformer component denoising starts with the call.
    """

    def __init__(self, pipe: Any, cuda: bool = False) -> None:
        self.cuda = cuda
        self.stamps: list[float] = []
        self.first: float | None = None
        self.total: float | None = None
        self.attention = AttentionTimer()
        comps = getattr(pipe, "components", None) or {}
        self._transformer = comps.get("transformer") if isinstance(comps, dict) else None
        self._hook = None

    def _sync(self) -> None:
        if self.cuda:
            sync()

    def on_step_end(self, pipe: Any, i: int, t: Any, kwargs: dict) -> dict:
        self._sync()
        self.stamps.append(time.perf_counter())
        return {}

    def _pre(self, module: Any, args: Any) -> None:
        if self.first is None:
            self.first = time.perf_counter()

    def __enter__(self) -> GenerationClock:
        if isinstance(self._transformer, torch.nn.Module):
            self._hook = self._transformer.register_forward_pre_hook(self._pre)
        self._sync()
        self._t0 = time.perf_counter()
        self.attention.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.attention.__exit__(*exc)
        if self._hook is not None:
            self._hook.remove()
        self._sync()
        self.total = time.perf_counter() - self._t0

    @property
    def steps(self) -> int:
        return len(self.stamps)

    @property
    def denoise_seconds(self) -> float | None:
        """From the first transformer call to the last step's end (None when no step was seen)."""
        if not self.stamps:
            return None
        return self.stamps[-1] - (self.first if self.first is not None else self._t0)

    @property
    def seconds_per_step(self) -> float | None:
        d = self.denoise_seconds
        return None if d is None else d / len(self.stamps)
