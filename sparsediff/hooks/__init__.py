"""The diffusers integration. The code lives in one module per responsibility; this package re-exports
the names other modules use. Imports go one way only (top to bottom, never back, not even lazily or
for type checking -- a lower module knows the objects above it through small ``Protocol`` s):

1. :mod:`.install` -- :func:`apply_sparse_attention` / :func:`remove_sparse_attention`: ``Sparse<Processor>``
   subclasses in place of the model's processors, the root hook on the transformer.
2. :mod:`.layer` -- :class:`LayerContext`: one layer call, sparse (:func:`sparsediff.attention.sparse_attention`)
   or the model's own dense call; key padding, context parallelism, the observer tap (:class:`AttentionCall`).
3. :mod:`.state` -- :class:`TransformerState` (one per enabled transformer) and :class:`SparseRootHook`,
   which feeds it the layout and step context of each transformer call; :mod:`.steps` -- the step /
   branch / generation rule (diffusers' ``cache_context``, else the timestep rule).
4. :mod:`.backend` -- the ``"sparsediff"`` attention backend diffusers dispatches to, and the dense
   backends behind it.
5. :mod:`.compiled` -- the opaque ``torch.library`` ops (``sparsediff_hooks::begin_call``,
   ``sparsediff_hooks::layer_attention``) that stand for the root hook's per-call work and a layer's
   attention under ``torch.compile`` / ``torch.export``; imports no other hook module.

``install`` → ``layer`` → ``state`` → ``steps``; ``layer`` → ``backend`` → ``compiled``; ``state`` →
``compiled``. See docs/CALL_FLOW.md.

How one self-attention call reaches sparsediff (diffusers 0.42)::

    transformer.forward  ── root hook (HookRegistry, "sparsediff_root", stateful) ──────────────────┐
      reads the token layout of this call (adapter), step / branch (diffusers' cache_context)       │
      block L ─ attention module ─ processor = Sparse<ModelProcessor> (subclass of the model's own)  │
          __call__: publishes its LayerContext, then runs the model's own __call__ unchanged          │
          (projections, norms, RoPE) ... dispatch_attention_fn(q, k, v, backend=self._attention_backend)
          ─ ``_attention_backend`` is a property answering "sparsediff" ─► backend._sparsediff_backend(q, k, v, ...)
              ─ LayerContext.attention: dense fallback (the backend the model would have used), or
                sparsediff.attention.sparse_attention(q, k, v, layout, head_specs, state, ...)   ◄──┘

* **Per-call layouts.** The root hook reads one layout per transformer call. Adapters with
  ``refit_text`` (Mochi: one attention call per sample with its own valid prompt length; SD3.5:
  image-only ``attn2``) see attention calls of other lengths: :meth:`TransformerState.fit_layout`
  re-fits the layout's text to the call's length at run time (also inside the compiled op), before
  any dense fallback.
* **Dense fallback is the model's own call.** Dense heads-only layers, warm-up steps, calls the sparse
  path cannot serve (attention mask, cross-attention through the same processor, layout mismatch)
  call the backend the processor would have used -- its own ``_attention_backend`` (a later
  ``set_attention_backend`` lands there, through the property's setter) or the global active backend
  (never sparsediff itself: that would recurse) -- with the same arguments, so they are bit-identical.
* **Compile.** Nothing per layer is a Python constant the compiler specialises on: the layer is
  identified by a small int64 tensor, and under ``torch.compile`` the whole layer attention is one opaque
  ``torch.library`` op (``sparsediff_hooks::layer_attention``), so ``compile_repeated_blocks`` traces
  one graph for all blocks. Mask building etc. runs eagerly inside the op. A whole-model compile /
  ``torch.export`` also gets the root hook's per-call work (step, layout) as an opaque op
  (``sparsediff_hooks::begin_call``) that runs at run time: static patterns run sparse there, dynamic
  ones fall back to dense with a warning.
* **Steps.** From diffusers' ``cache_context`` (the root hook holds a ``StateManager`` probe that
  receives it), else from the timestep of each call -- see :class:`.steps.StepTracking`. Nothing is
  patched onto the scheduler. Per-layer caches are keyed by the branch (the context's name).
* **Threads.** The only per-call state that crosses diffusers' dispatch (the running layer) is
  thread-local; everything else lives on the per-transformer state.
* **Context parallel (Ulysses).** With a parallel config the backend runs diffusers' templated
  Ulysses attention with a sparsediff forward op: after the all-to-all each rank holds the full
  sequence for heads ``rank*H_local ...``; the plan is sliced by that global head index.
"""

from __future__ import annotations

from .backend import BACKEND_NAME, ensure_backend_registered
from .install import ROOT_HOOK_NAME, apply_sparse_attention, get_state, remove_sparse_attention
from .layer import AttentionCall, LayerContext
from .state import SparseRootHook, TransformerState

__all__ = [
    "BACKEND_NAME",
    "ROOT_HOOK_NAME",
    "ensure_backend_registered",
    "TransformerState",
    "SparseRootHook",
    "LayerContext",
    "AttentionCall",
    "apply_sparse_attention",
    "remove_sparse_attention",
    "get_state",
]
