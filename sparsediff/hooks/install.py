"""Install / remove: processors replaced by ``Sparse<Processor>`` subclasses, root hook registered.

:func:`apply_sparse_attention` (called per transformer by :func:`sparsediff.api.enable_sparse_attention`)
lists the adapter's self-attention modules, gives each a :class:`~.layer.LayerContext` and a
``Sparse<Processor>`` -- a subclass of the model's own processor class with the same ``__call__`` that
publishes its layer (:data:`.backend.current`) and answers ``_attention_backend = "sparsediff"`` -- and
registers the root hook (:class:`~.state.SparseRootHook`, with :func:`adopt_processors` as its ``adopt``).
:func:`remove_sparse_attention` puts the original processor objects back and removes the hook.

The top of :mod:`sparsediff.hooks`: imports :mod:`.layer`, :mod:`.state`, :mod:`.backend` and
:mod:`.compiled`; nothing in the package imports it.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import weakref
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from ..config import SparseAttentionConfig
from ..plan import Plan
from .backend import backend_member, current, ensure_backend_registered
from .compiled import release_state
from .layer import LayerContext
from .state import SparseRootHook, TransformerState

__all__ = [
    "ROOT_HOOK_NAME",
    "apply_sparse_attention",
    "remove_sparse_attention",
    "get_state",
    "adopt_processors",
]

logger = logging.getLogger(__name__)

ROOT_HOOK_NAME = "sparsediff_root"
_STATE_ATTR = "_sparsediff_state"
_LOCK = threading.Lock()
#: attention module -> its LayerContext while enabled (processors rebuilt with ``proc.__class__()``
#: find their layer through the ``attn`` module they are called with)
_MODULE_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, LayerContext] = weakref.WeakKeyDictionary()
_SUBCLASSES: dict[type, type] = {}


def _sparse_processor_class(base: type) -> type:
    """``Sparse<base>``: same ``__call__`` signature, publishes its layer, reports the sparsediff backend.

    An instance made by sparsediff carries its layer (``_sd_ctx``). One made by other code with
    ``proc.__class__()`` -- diffusers rebuilds processors that way when it loads IP-adapters -- has
    ``_sd_ctx = None`` and finds its layer through the attention module it is called with; on a module
    sparsediff does not manage it behaves exactly like ``base`` (its own ``_attention_backend``).
    """
    with _LOCK:
        sub = _SUBCLASSES.get(base)
        if sub is not None:
            return sub
        orig_call = base.__call__

        @functools.wraps(orig_call)
        def __call__(self, *args, **kwargs):
            ctx = self._sd_ctx
            if ctx is None:
                attn = args[0] if args else kwargs.get("attn")
                ctx = _MODULE_LAYERS.get(attn) if isinstance(attn, torch.nn.Module) else None
            prev = current.layer
            current.layer = ctx
            try:
                return orig_call(self, *args, **kwargs)
            finally:
                current.layer = prev

        __call__.__signature__ = inspect.signature(orig_call)

        def _get_backend(self):
            if self._sd_ctx is not None or current.layer is not None:
                return backend_member()
            return self.__dict__.get("_sd_backend")

        def _set_backend(self, value):
            # set_attention_backend / reset_attention_backend land here: the new dense fallback
            if self._sd_ctx is not None:
                self._sd_ctx.own_backend = value
            else:
                self.__dict__["_sd_backend"] = value

        sub = type(
            f"Sparse{base.__name__}",
            (base,),
            {
                "__call__": __call__,
                "_attention_backend": property(_get_backend, _set_backend),
                "_sd_ctx": None,
                "__module__": __name__,
                "_sparsediff_base": base,
            },
        )
        _SUBCLASSES[base] = sub
        return sub


def _is_sparse_processor(proc: Any) -> bool:
    return hasattr(type(proc), "_sparsediff_base")


def _wrap_processor(orig: Any, base: type, ctx: LayerContext) -> Any:
    """A ``Sparse<base>`` instance with ``orig``'s attributes, owning ``ctx``.

    Processors that are ``nn.Module`` s (IP-adapter processors hold the image projections) are wrapped the
    same way: the new object shares ``orig``'s parameter and submodule dicts, so it holds the same weights
    (``state_dict`` keys unchanged).
    """
    ctx.own_backend = getattr(orig, "_attention_backend", None)
    new = object.__new__(_sparse_processor_class(base))
    d = dict(vars(orig))
    d.pop("_attention_backend", None)
    vars(new).update(d)
    new._sd_ctx = ctx
    return new


def _set_processor(mod: torch.nn.Module, proc: Any) -> None:
    """``mod.processor = proc``, also between module and plain processors (diffusers' ``set_processor``)."""
    setter = getattr(mod, "set_processor", None)
    if callable(setter):
        setter(proc)
    else:
        mod.processor = proc


def adopt_processors(state: TransformerState) -> None:
    """Take over processors installed by other code while enabled (the root hook calls it before each
    eager transformer call).

    Loading an IP-adapter (``pipe.load_ip_adapter`` / ``transformer._load_ip_adapter_weights``) or any
    ``set_attn_processor`` replaces the processors of the managed attention modules. A replacement built
    with ``proc.__class__()`` is a ``Sparse<Processor>`` already (it finds its layer through the module);
    another class (Flux: ``FluxIPAdapterAttnProcessor``, an ``nn.Module`` with the IP projections) is
    wrapped like the processors at enable time, so the layer stays sparse. On disable the adopted
    processor -- not the one from before enable -- is put back: the model keeps its IP-adapter. A
    replacement that does not call ``dispatch_attention_fn`` cannot be served: that layer runs the
    replacement's own dense attention, with a warning.
    """
    for i, (mod, _, ours) in enumerate(state.processors):
        proc = mod.processor
        if proc is ours or _is_sparse_processor(proc):
            continue
        ctx = ours._sd_ctx
        base = state.adapter.dispatch_processors.get(type(proc).__name__, type(proc))
        if not hasattr(base, "_attention_backend"):
            state.note_fallback(
                f"its processor was replaced by {type(proc).__name__}, which does not call dispatch_attention_fn",
                ctx,
                "the adapter needs a dispatch_processors entry for that processor class",
            )
            continue
        new = _wrap_processor(proc, base, ctx)
        _set_processor(mod, new)
        state.processors[i] = (mod, proc, new)
        logger.info(
            "sparsediff: %s: took over the processor %s set while enabled", ctx.name, type(proc).__name__
        )


def get_state(transformer: torch.nn.Module) -> TransformerState | None:
    return getattr(transformer, _STATE_ATTR, None)


def apply_sparse_attention(
    transformer: torch.nn.Module,
    plan: Plan,
    config: SparseAttentionConfig,
    adapter: Any = None,
    pipeline: Any = None,
) -> TransformerState:
    """Install sparse attention on ``transformer`` (see the module docstring). Raises if already enabled.

    ``pipeline``: the pipeline ``transformer`` belongs to, if any (its ``num_timesteps`` gives the number
    of steps when the cache context does not); it is only read, never modified.
    """
    from ..pipelines.base import get_adapter

    if get_state(transformer) is not None:
        raise RuntimeError(
            f"sparse attention is already enabled on this {type(transformer).__name__}; "
            "call disable_sparse_attention() first"
        )
    adapter = adapter or get_adapter(transformer)
    ensure_backend_registered()
    mods = adapter.attention_modules(transformer)
    state = TransformerState(transformer, adapter, plan, config)

    # resolve every processor class first, so a failure leaves the model untouched
    bases = []
    for name, mod in mods:
        proc = mod.processor
        if _is_sparse_processor(proc):
            raise RuntimeError(f"{name} already has a sparsediff processor")
        base = adapter.dispatch_processors.get(type(proc).__name__, type(proc))
        if not hasattr(base, "_attention_backend"):
            raise TypeError(
                f"adapter {adapter.name!r}: processor {type(proc).__name__} of {name} does not call "
                "dispatch_attention_fn; the adapter needs a dispatch_processors entry for it"
            )
        bases.append(base)

    for i, ((name, mod), base) in enumerate(zip(mods, bases)):
        orig = mod.processor
        ctx = LayerContext(state, i, name, int(mod.heads))
        new = _wrap_processor(orig, base, ctx)
        _set_processor(mod, new)
        with _LOCK:
            _MODULE_LAYERS[mod] = ctx
        state.layers.append(ctx)
        state.processors.append((mod, orig, new))

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(SparseRootHook(state, adopt=adopt_processors), ROOT_HOOK_NAME)
    if pipeline is not None:
        state.pipeline_ref = weakref.ref(pipeline)
    setattr(transformer, _STATE_ATTR, state)
    return state


def remove_sparse_attention(transformer: torch.nn.Module) -> bool:
    """Undo :func:`apply_sparse_attention`; returns False when it was not enabled."""
    state = get_state(transformer)
    if state is None:
        return False
    state.flush_generation_log()
    state.restore_adapter()
    for mod, orig, ours in state.processors:
        # keep what happened to the processor while enabled (set_attention_backend, enable_parallelism)
        for k, v in vars(ours).items():
            if not k.startswith("_sd_"):
                setattr(orig, k, v)
        fb = ours._sd_ctx.own_backend
        if fb is not None or "_attention_backend" in vars(orig):
            orig._attention_backend = fb
        if mod.processor is ours or _is_sparse_processor(mod.processor):
            # ours, or one rebuilt from it with ``__class__()`` (IP-adapter loading): the original back
            # (for a processor adopted while enabled: that one, see adopt_processors)
            _set_processor(mod, orig)
        with _LOCK:
            if _MODULE_LAYERS.get(mod) is ours._sd_ctx:
                del _MODULE_LAYERS[mod]
    for ctx in state.layers:
        ctx.close()
    release_state(state)
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(ROOT_HOOK_NAME, recurse=False)
    state.active = False
    delattr(transformer, _STATE_ATTR)
    return True
