"""Drop-in processors for models whose processors call ``F.scaled_dot_product_attention`` directly.

CogVideoX (``CogVideoXAttnProcessor2_0``), Mochi (``MochiAttnProcessor2_0``) and SD3
(``JointAttnProcessor2_0``) compute the attention product with ``F.scaled_dot_product_attention`` on
``[B, H, N, D]`` tensors instead of diffusers' ``dispatch_attention_fn``, so no attention backend (and
so no sparsediff) ever sees it. :func:`dispatch_processor` makes, for such a processor class, the
drop-in class that :attr:`sparsediff.pipelines.base.Adapter.dispatch_processors` asks for -- **without
copying the model's code**: the drop-in's ``__call__`` is the parent's own ``__call__`` *code object*,
re-bound to a copy of its module's globals in which the name ``F`` is :data:`SDPA_F` -- a module that
is ``torch.nn.functional`` except that ``scaled_dot_product_attention`` computes::

    dispatch_attention_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),   # [B, N, H, D]
                          attn_mask, dropout_p, is_causal, scale, enable_gqa,
                          backend=proc._attention_backend, parallel_config=proc._parallel_config
                          ).transpose(1, 2)                                             # [B, H, N, D]

for the processor ``proc`` whose ``__call__`` is running.

Properties:

* **Nothing global is patched.** ``diffusers.models.attention_processor.F`` and
  ``torch.nn.functional`` are untouched; only the drop-in's function object resolves ``F`` differently.
  SDPA calls elsewhere (text encoders, Mochi's attention pooler, the original processor classes) are
  unaffected. Nested functions defined inside ``__call__`` (Mochi's RoPE helper) and its local
  relative imports resolve through the same globals, so they work unchanged.
* **Bit-identical when dense.** With the "native" backend, ``dispatch_attention_fn`` permutes the views
  back to ``[B, H, N, D]`` -- the very tensors (same storage, same strides) the original passed -- and
  calls SDPA with the same arguments.
* **Same signature** (same code object), which ``Attention.forward`` uses to filter keyword arguments.
* **Compile-friendly.** A plain Python function and a module attribute: ``torch.compile`` traces it like
  the original (no torch-function mode, no global mutation).

Per-call layouts are not this module's business: some of these models show the attention op other
sequences than the transformer call's layout (Mochi drops each sample's padded prompt tokens -- one
SDPA call per sample; SD3.5's ``attn2`` layers are image-only). Their adapters set
:attr:`sparsediff.pipelines.base.Adapter.refit_text`, and :mod:`sparsediff.hooks` re-fits the layout
to each attention call's length at run time (also under ``torch.compile``).
"""

from __future__ import annotations

import inspect
import sys
import threading
import types
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SDPA_F", "dispatch_processor"]

_SDPA = F.scaled_dot_product_attention


#: ``_TLS.active``: the drop-in processors whose ``__call__`` is running *in this thread* (innermost
#: last); read by :func:`_sdpa`. Per thread, so pipelines generating in two threads never read each
#: other's processor (Dynamo traces ``threading.local`` attributes; it cannot trace ContextVar.set).
class _ThreadLocal(threading.local):
    def __init__(self) -> None:  # runs once in every thread that uses it
        self.active: list[Any] = []


_TLS = _ThreadLocal()


def _active() -> list[Any]:
    return _TLS.active


def _sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` as seen by drop-in processors (q/k/v ``[B, H, N, D]``)."""
    active = _active()
    if not active:  # called outside a drop-in __call__ (should not happen): the real SDPA
        return _SDPA(
            query,
            key,
            value,
            attn_mask=attn_mask,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    proc = active[-1]
    out = dispatch_attention_fn(
        query.transpose(1, 2),
        key.transpose(1, 2),
        value.transpose(1, 2),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
        backend=proc._attention_backend,
        parallel_config=proc._parallel_config,
    )
    return out.transpose(1, 2)


def _make_sdpa_module() -> types.ModuleType:
    mod = types.ModuleType(f"{__name__}._F", "torch.nn.functional with SDPA routed to dispatch")
    for k, v in vars(F).items():
        if not k.startswith("__"):
            setattr(mod, k, v)
    mod.scaled_dot_product_attention = _sdpa
    sys.modules[mod.__name__] = mod
    return mod


#: ``torch.nn.functional`` with ``scaled_dot_product_attention`` routed through ``dispatch_attention_fn``.
SDPA_F = _make_sdpa_module()


_CLASSES: dict[type, type] = {}
_GLOBALS: dict[str, dict[str, Any]] = {}


def _rebound_globals(orig: dict[str, Any]) -> dict[str, Any]:
    """The globals of a module like ``orig``'s, with ``F`` = :data:`SDPA_F` (one per source module).

    They are the ``__dict__`` of a real module registered in ``sys.modules`` under
    ``sparsediff.pipelines.sdpa.<source module>``: ``torch.compile`` re-imports a function's globals by
    their ``__name__`` when it builds guards. ``__package__`` is kept, so relative imports inside the
    function resolve as in the original module.
    """
    src = orig["__name__"]
    g = _GLOBALS.get(src)
    if g is None:
        mod = types.ModuleType(f"{__name__}.{src}")
        mod.__dict__.update(
            {k: v for k, v in orig.items() if k not in ("__name__", "__spec__", "__loader__")}
        )
        mod.F = SDPA_F
        sys.modules[mod.__name__] = mod
        g = _GLOBALS[src] = mod.__dict__
    return g


def dispatch_processor(base: type) -> type:
    """The drop-in ``Dispatch<base>`` class for an SDPA-calling processor class (cached per class).

    Instances are created by sparsediff without calling ``__init__`` (the original processor's
    ``__dict__`` is copied), so the class only adds ``__call__`` and the class attributes
    ``_attention_backend`` / ``_parallel_config`` (``None``: diffusers' active backend, no parallelism).
    Raises ``TypeError`` when ``base.__call__`` is not a plain function that reads ``F`` from its
    module globals (then this mechanism does not apply).
    """
    cls = _CLASSES.get(base)
    if cls is not None:
        return cls
    orig = base.__call__
    if not isinstance(orig, types.FunctionType) or "F" not in orig.__code__.co_names:
        raise TypeError(f"{base.__name__}.__call__ does not call F.<function> from its module globals")
    if orig.__globals__.get("F") is not F:
        raise TypeError(f"{base.__name__}.__call__: the global F of its module is not torch.nn.functional")
    g = _rebound_globals(orig.__globals__)
    rebound = types.FunctionType(orig.__code__, g, orig.__name__, orig.__defaults__, orig.__closure__)
    rebound.__kwdefaults__ = orig.__kwdefaults__
    rebound.__qualname__ = orig.__qualname__
    rebound.__doc__ = orig.__doc__

    def __call__(self, *args, **kwargs):
        active = _active()
        active.append(self)
        try:
            return rebound(self, *args, **kwargs)
        finally:
            active.pop()

    __call__.__signature__ = inspect.signature(orig)
    __call__.__qualname__ = f"Dispatch{base.__name__}.__call__"
    cls = type(
        f"Dispatch{base.__name__}",
        (base,),
        {
            "__call__": __call__,
            "_attention_backend": None,
            "_parallel_config": None,
            "__module__": __name__,
            "__doc__": f"{base.__name__} with its SDPA call routed through dispatch_attention_fn "
            "(sparsediff.pipelines.sdpa).",
        },
    )
    _CLASSES[base] = cls
    return cls
