"""The ``"sparsediff"`` attention backend of diffusers' dispatcher, and the dense backends behind it.

A ``Sparse<Processor>`` (:mod:`.install`) publishes its layer in :data:`current` for the duration of its
``__call__`` and answers ``_attention_backend = "sparsediff"``; diffusers' ``dispatch_attention_fn`` then
calls :func:`_sparsediff_backend`, which hands the call to that layer's
:meth:`~.layer.LayerContext.attention` -- or, under ``torch.compile``, to the opaque op of
:mod:`.compiled`. Dense fallbacks call a registered dense backend exactly as the dispatcher would
(:func:`call_backend`), so they are bit-identical.

Imports only :mod:`.compiled` among the hook modules; the layer is known through :class:`BackendLayer`.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

import torch
from diffusers.models import attention_dispatch as _ad

from .compiled import dispatch_kwargs, set_dense_call

__all__ = [
    "BACKEND_NAME",
    "BackendLayer",
    "ensure_backend_registered",
    "backend_member",
    "call_backend",
    "current",
    "dispatch_kwargs",
]

BACKEND_NAME = "sparsediff"


class BackendLayer(Protocol):
    """What the backend needs of the running layer (:class:`~.layer.LayerContext`)."""

    #: int64 tensor that identifies the layer inside compiled graphs
    key: torch.Tensor
    #: the layer's transformer state; ``root.call_token`` is the whole-model compiled call's token
    root: Any

    def attention(self, kwargs: dict[str, Any]) -> torch.Tensor: ...


# The layer whose processor is running *in this thread* (``current.layer``, set for the duration of the
# processor's ``__call__``): the one piece of per-call state that has to cross diffusers'
# ``dispatch_attention_fn`` into the backend. Thread-local, so two pipelines generating in two threads
# never see each other's layer (a ``contextvars.ContextVar`` would do too, but Dynamo cannot trace
# ``ContextVar.set``; a ``threading.local`` attribute it traces like any object attribute).
class _ThreadLocal(threading.local):
    def __init__(self) -> None:  # runs once in every thread: compiled code always finds the attribute
        self.layer: BackendLayer | None = None


current = _ThreadLocal()
_LOCK = threading.Lock()
_BACKEND_MEMBER: Any = None


def _add_enum_member(enum_cls: type, name: str, value: str) -> Any:
    """Add ``name = value`` to a ``str`` Enum (diffusers' AttentionBackendName) in place."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def ensure_backend_registered() -> Any:
    """Register the ``"sparsediff"`` attention backend with diffusers (idempotent); returns its enum member.

    (The ops the backend calls under ``torch.compile`` are registered when :mod:`.compiled` is imported.)
    """
    global _BACKEND_MEMBER
    with _LOCK:
        if _BACKEND_MEMBER is None:
            member = _add_enum_member(_ad.AttentionBackendName, "SPARSEDIFF", BACKEND_NAME)
            _ad._AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=True)(
                _sparsediff_backend
            )
            _BACKEND_MEMBER = member
    return _BACKEND_MEMBER


def backend_member() -> Any:
    """The registered enum member (None before :func:`ensure_backend_registered`)."""
    return _BACKEND_MEMBER


def _dense_backend(name: Any) -> tuple[Any, Any]:
    """(enum member, function) of the dense backend ``name`` (None: the global active one; never us)."""
    reg = _ad._AttentionBackendRegistry
    if name is None:
        name = reg._active_backend
    member = name if isinstance(name, _ad.AttentionBackendName) else _ad.AttentionBackendName(name)
    if member.value == BACKEND_NAME:
        member = _ad.AttentionBackendName.NATIVE
    return member, reg._backends[member]


def call_backend(name: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a registered dense backend exactly like ``dispatch_attention_fn`` would."""
    member, fn = _dense_backend(name)
    allowed = _ad._AttentionBackendRegistry._supported_arg_names[member]
    return fn(**{k: v for k, v in kwargs.items() if k in allowed})


def _global_dense(kwargs: dict[str, Any]) -> torch.Tensor:
    """Dense attention through the global active backend (a layer the compiled op does not know)."""
    return call_backend(None, kwargs)


set_dense_call(_global_dense)


def _sparsediff_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """The function diffusers dispatches to. q/k/v ``[B, N, H, D]``; returns ``[B, N, H, D]``."""
    ctx = current.layer
    kwargs = dispatch_kwargs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config
    )
    if ctx is None:  # not one of our processors (e.g. the global backend was set to "sparsediff")
        return call_backend(None, kwargs)
    if torch.compiler.is_compiling() and _parallel_config is None:
        # call_token: the whole-model compiled call's begin_call op (None under regional compile,
        # where the root hook ran eagerly): orders this op after it
        return torch.ops.sparsediff_hooks.layer_attention(
            query,
            key,
            value,
            attn_mask,
            dropout_p,
            is_causal,
            scale,
            enable_gqa,
            ctx.key,
            ctx.root.call_token,
        )
    return ctx.attention(kwargs)
