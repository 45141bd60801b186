"""Step, branch and generation of each transformer call, from diffusers' own ``cache_context``.

Pipelines open ``transformer.cache_context(name, ...)`` around each transformer call; the root hook
(:class:`~.state.SparseRootHook`) holds a :class:`ContextProbe` that receives it. Where a pipeline
gives no step index (most do not; a bare transformer in a custom loop has no context at all) the
timestep rule of :class:`StepTracking` applies. Nothing is patched onto the scheduler.

Imports no other hook module: :class:`StepTracking` is a mixin of :class:`~.state.TransformerState`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
from diffusers.hooks.hooks import StateManager

__all__ = ["ContextProbe", "StepTracking"]


class ContextProbe(StateManager):
    """Receives diffusers' cache context for the root hook.

    Pipelines open ``transformer.cache_context(name, ...)`` around each transformer call; diffusers
    forwards it to every :class:`~diffusers.hooks.hooks.StateManager` attribute of a stateful hook:
    a :class:`~diffusers.hooks.hooks.CacheContext` (``name``, ``step_index``, ``num_inference_steps``,
    ... -- diffusers >= 0.42; most pipelines fill only ``name``) or, in older diffusers, the name
    string; ``None`` when the context closes. This probe hands it to :class:`~.state.TransformerState`; it
    keeps no states of its own.
    """

    def __init__(self, state: StepTracking) -> None:  # no StateManager.__init__: no state class
        self._state_ref = weakref.ref(state)
        self._state_cache: dict = {}
        self._context = None

    def set_context(self, context: Any) -> None:
        self._context = context
        st = self._state_ref()
        if st is not None:
            st.cache_context = context

    def reset(self, *args, **kwargs) -> None:
        self._context = None


def _context_fields(ctx: Any) -> tuple[str | None, int | None, int | None]:
    """(name, step index, number of steps) of a cache context (a CacheContext, a name or None)."""
    if ctx is None:
        return None, None, None
    if isinstance(ctx, str):
        return ctx, None, None
    return (
        getattr(ctx, "name", None),
        getattr(ctx, "step_index", None),
        getattr(ctx, "num_inference_steps", None),
    )


class StepTracking:
    """The step / branch / generation part of :class:`~.state.TransformerState` (a mixin: the fields live
    on the state; it needs the state's ``adapter``, ``config``, ``pipeline_ref`` and ``end_generation``).

    **Step, branch and generation** of each transformer call (:meth:`advance`, from ``begin_call``),
    from diffusers' own ``cache_context`` first, never from the scheduler (nothing is patched onto it):

    1. the context carries ``step_index`` (diffusers >= 0.42, e.g. ``WanPipeline``): that is the step,
       ``num_inference_steps`` the number of steps; a step index lower than the last one starts a new
       generation;
    2. otherwise (most pipelines name the context only: ``"cond"``/``"uncond"``/``"cond_uncond"``; a bare
       transformer in a custom loop has none) the **timestep rule**: the call's timestep tensor (per
       sample, per frame or per token) is compared with the previous call's -- any element higher
       starts a new generation (every sampler starts at its highest noise level), any change starts
       the next step, equal means another branch (CFG as separate calls) of the same step; a context
       name seen twice within one step also starts the next step (schedulers that repeat a timestep);
    3. the number of steps comes from the context, else the pipeline's ``num_timesteps`` (when enabled
       on a pipeline), else :attr:`SparseAttentionConfig.num_steps`.

    The branch is the context's name when there is one (else the call's index within its step); the
    per-layer caches (:class:`~sparsediff.attention.LayerState`) are keyed by it.
    """

    def init_steps(self) -> None:
        """No step context yet (called once by the state's ``__init__``)."""
        #: diffusers' cache context of the running transformer call (set by :class:`ContextProbe`)
        self.cache_context: Any = None
        self.step: int | None = None  # step index of the current call (None: no call yet this generation)
        self.num_steps: int | None = None
        self.branch = 0  # index of the current call within its step
        self.branch_key: str | int = 0  # context name, else ``branch``: keys per-layer state
        self._names: set[str] = set()  # context names seen in the current step
        self._last_t: torch.Tensor | None = None

    def clear_steps(self) -> None:
        """End of a generation: no step context (the last timestep is kept: the next call compares with it)."""
        self.step = None
        self.num_steps = None
        self.branch = 0
        self.branch_key = 0
        self._names = set()

    def step_info(self) -> tuple[int | None, int | None]:
        """(step index, number of steps) of the current call -- either may be None when unknown."""
        return self.step, self.num_steps

    def advance(self, inputs: Mapping[str, Any]) -> None:
        """Step / branch / generation of this call (see the class docstring)."""
        name, index, n_ctx = _context_fields(self.cache_context)
        if index is not None:
            if self.step is not None and index < self.step:
                self.end_generation()
            if index != self.step:
                self._new_step(int(index))
            else:
                self.branch += 1
        else:
            new_gen, changed = self._timestep_change(inputs, in_context=name is not None)
            if new_gen and self.step is not None:
                self.end_generation()
            if self.step is None:
                self._new_step(0)
            elif changed or (name is not None and name in self._names):
                self._new_step(self.step + 1)
            else:
                self.branch += 1
        if name is not None:
            self._names.add(name)
        self.branch_key = name if name is not None else self.branch
        if n_ctx is not None:
            self.num_steps = int(n_ctx)
        elif self.branch == 0 and self.step == 0:
            pipe = self.pipeline_ref() if self.pipeline_ref is not None else None
            n = getattr(pipe, "_num_timesteps", None)
            self.num_steps = int(n) if isinstance(n, int) and n > 0 else self.config.num_steps

    def _new_step(self, step: int) -> None:
        self.step, self.branch = step, 0
        self._names = set()

    def _timestep_change(self, inputs: Mapping[str, Any], in_context: bool) -> tuple[bool, bool]:
        """(new generation, new step) from the call's timestep vs the previous call's (one host sync)."""
        t = self.adapter.timestep(inputs)
        if t is None:  # no timestep: every call is a step, unless context names say otherwise
            return False, not in_context
        t = t.detach() if isinstance(t, torch.Tensor) else torch.tensor(float(t))
        last, self._last_t = self._last_t, t.clone()
        if last is None:
            return True, True
        if t.shape == last.shape and t.device == last.device:
            up, changed = torch.stack([(t > last).any(), (t != last).any()]).tolist()
            return bool(up), bool(changed)
        # another shape: a new batch or resolution; a pipeline window sliding (diffusion forcing) is
        # not a new generation -- the pipeline ends its own generation
        up = (not in_context) and bool(t.float().max() > last.float().max())
        return up, True
