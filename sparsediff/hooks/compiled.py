"""Compile glue: under ``torch.compile`` / ``torch.export`` the sparsediff work of a call runs inside opaque
``torch.library`` ops, eagerly, at run time.

This module is the bottom of :mod:`sparsediff.hooks` and imports no other hook module: it finds the
objects it serves in its own registries, by int key, and calls their public methods (the
:class:`CompiledLayer` / :class:`CompiledState` protocols); the dense call for a layer it does not know is
registered from above (:func:`set_dense_call`, by :mod:`.backend`).

* ``sparsediff_hooks::layer_attention`` -- a layer's whole attention. Nothing per layer may be a Python
  constant the compiler specialises on (``compile_repeated_blocks`` traces one graph for all blocks): the
  layer travels as a small int64 tensor (:attr:`~.layer.LayerContext.key`) and the op finds it again in
  this module's registry (weak references, so a dropped transformer is not kept alive), then runs its
  :meth:`~.layer.LayerContext.compiled_attention`. Mask building etc. runs eagerly inside the op.
* ``sparsediff_hooks::begin_call`` -- the root hook's per-call work (step / branch / generation and the
  token layout: :meth:`~.state.TransformerState.begin_call`) when the *whole* transformer is compiled or
  exported. The traced root hook hands it the call's tensor inputs and its ints (possibly symbolic, as
  the op's ``SymInt[]`` argument); the structure of the call's other inputs (None, bools, floats,
  strings, tuples: compile-time constants, guarded by the compiler) is recorded at trace time
  (:func:`_call_signature`, run by Dynamo as a constant function) and found again by an int key. The op
  returns a token tensor that every ``layer_attention`` op of the call takes as an input, so it runs
  first and is never dropped. The layout is therefore read from the *run-time* inputs (Flux's
  ``img_ids`` values included), exactly as in an eager call.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

__all__ = [
    "CompiledLayer",
    "CompiledState",
    "dispatch_kwargs",
    "register_layer",
    "release_layer",
    "release_state",
    "set_dense_call",
    "traced_begin_call",
]


class CompiledLayer(Protocol):
    """What the ``layer_attention`` op needs of a registered layer (:class:`~.layer.LayerContext`)."""

    def compiled_attention(self, kwargs: dict[str, Any]) -> torch.Tensor: ...


class CompiledState(Protocol):
    """What the ``begin_call`` op needs of a transformer's state (:class:`~.state.TransformerState`)."""

    uid: int
    active: bool

    def begin_call(self, inputs: Mapping[str, Any], compiled: bool = False) -> None: ...


_LAYERS: dict[int, weakref.ReferenceType[CompiledLayer]] = {}
_NEXT_ID = [0]
_LOCK = threading.Lock()
#: trace-time signatures of whole-model compiled calls: key -> (state, tensor input names, other inputs'
#: structure: ``(name, split value)`` pairs, see :func:`_split_ints`)
_CALLS: dict[int, tuple[weakref.ReferenceType[CompiledState], tuple[str, ...], tuple]] = {}
_CALL_KEYS: dict[tuple[int, tuple[str, ...], tuple[tuple[str, Any], ...]], int] = {}
_CALL_IDS = itertools.count()
_WARNED_UNKNOWN = [False]
#: the dense attention call for a layer this process does not know (set by :mod:`.backend`: the global
#: active diffusers backend)
_DENSE_CALL: list[Callable[[dict[str, Any]], torch.Tensor] | None] = [None]
logger = logging.getLogger(__name__)


def dispatch_kwargs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config):
    """The keyword arguments of diffusers' attention backend functions, as one dict."""
    return {
        "query": query,
        "key": key,
        "value": value,
        "attn_mask": attn_mask,
        "dropout_p": dropout_p,
        "is_causal": is_causal,
        "scale": scale,
        "enable_gqa": enable_gqa,
        "_parallel_config": parallel_config,
    }


def set_dense_call(fn: Callable[[dict[str, Any]], torch.Tensor]) -> None:
    """Register the dense attention the ``layer_attention`` op runs for a layer it does not know
    (``fn(kwargs)``, kwargs as :func:`dispatch_kwargs` builds them)."""
    _DENSE_CALL[0] = fn


def register_layer(ctx: CompiledLayer) -> int:
    """A new id for ``ctx`` (looked up by the op from the layer's key tensor)."""
    with _LOCK:
        i = _NEXT_ID[0]
        _NEXT_ID[0] += 1
        _LAYERS[i] = weakref.ref(ctx)
    return i


def release_layer(layer_id: int) -> None:
    with _LOCK:
        _LAYERS.pop(layer_id, None)


def release_state(state: CompiledState) -> None:
    """Forget the call signatures recorded for ``state`` (on disable)."""
    with _LOCK:
        for k in [k for k, (ref, _, _) in _CALLS.items() if ref() is None or ref() is state]:
            del _CALLS[k]
        for sk in [sk for sk, k in _CALL_KEYS.items() if k not in _CALLS]:
            del _CALL_KEYS[sk]


# ---------------------------------------------------------------------- the call (whole-model compile)
def _is_int(v: Any) -> bool:
    return isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool)


def _is_constant(v: Any) -> bool:
    """A value the call can pass on (None, bool, int, float, str, nested tuples / lists of them)."""
    if v is None or isinstance(v, (bool, float, str)) or _is_int(v):
        return True
    if isinstance(v, (tuple, list)):
        return all(_is_constant(x) for x in v)
    return False


def _split_ints(v: Any, ints: list) -> tuple:
    """``v`` as a hashable structure whose ints are slots into ``ints`` (which collects them).

    Ints travel to the op as a ``SymInt[]`` argument, not as constants: under ``dynamic=True`` (or
    automatic dynamic shapes) they are symbolic -- e.g. QwenImage's ``img_shapes`` -- and the op must see
    the run-time value without a recompile per size."""
    if _is_int(v):
        ints.append(v)
        return ("i", len(ints) - 1)
    if isinstance(v, (tuple, list)):
        return ("t", tuple(_split_ints(x, ints) for x in v))
    return ("c", v)


def _join_ints(s: tuple, ints: list[int]) -> Any:
    tag, v = s
    if tag == "i":
        return int(ints[v])
    if tag == "t":
        return tuple(_join_ints(x, ints) for x in v)
    return v


@torch.compiler.assume_constant_result
def _call_signature(state: CompiledState, names: tuple[str, ...], consts: tuple) -> int:
    """Key of (state, tensor input names, structure of the other inputs); runs at trace time, its result
    is a constant."""
    sk = (state.uid, tuple(names), consts)
    with _LOCK:
        k = _CALL_KEYS.get(sk)
        if k is None:
            k = _CALL_KEYS[sk] = next(_CALL_IDS)
            _CALLS[k] = (weakref.ref(state), tuple(names), consts)
    return k


def traced_begin_call(state: CompiledState, inputs: Mapping[str, Any]) -> torch.Tensor:
    """The root hook's ``begin_call`` as traced code: the ``begin_call`` op on the call's tensor inputs.

    ``inputs``: the forward's arguments by name. Tensor inputs and every int (possibly symbolic) go to the
    op; the structure of the other inputs (None, bools, floats, strings, tuples) is recorded with
    :func:`_call_signature`; anything else (dicts such as ``attention_kwargs``, objects) is not seen by
    the adapter -- an adapter that needs it reports that it cannot read the layout (dense, with a
    warning). Returns the token every ``layer_attention`` op of the call takes.
    """
    names: list[str] = []
    tensors: list[torch.Tensor] = []
    ints: list = []
    consts: list[tuple[str, Any]] = []
    for n, v in inputs.items():
        if isinstance(v, torch.Tensor):
            names.append(n)
            tensors.append(v)
        elif _is_constant(v):
            consts.append((n, _split_ints(v, ints)))
    key = _call_signature(state, tuple(names), tuple(consts))
    # the key leads the int list: an AOTInductor package hands an *empty* SymInt[] to the op as None
    return torch.ops.sparsediff_hooks.begin_call(tensors, [key, *ints])


@torch.library.custom_op("sparsediff_hooks::begin_call", mutates_args=())
def _begin_call_op(tensors: list[torch.Tensor], key_and_ints: list[int]) -> torch.Tensor:
    entry = _CALLS.get(int(key_and_ints[0]))
    state = entry[0]() if entry is not None else None
    if state is not None and state.active:
        ints = key_and_ints[1:]
        inputs = {n: _join_ints(s, ints) for n, s in entry[2]}
        inputs.update(zip(entry[1], tensors))
        state.begin_call(inputs, compiled=True)
    return torch.zeros(1, dtype=torch.int64)


@_begin_call_op.register_fake
def _(tensors, key_and_ints):
    return torch.empty(1, dtype=torch.int64)


# ---------------------------------------------------------------------- one layer's attention
@torch.library.custom_op("sparsediff_hooks::layer_attention", mutates_args=())
def _layer_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    layer_key: torch.Tensor,
    call_token: torch.Tensor | None = None,
) -> torch.Tensor:
    ref = _LAYERS.get(int(layer_key.reshape(-1)[0]))
    ctx = ref() if ref is not None else None
    kwargs = dispatch_kwargs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, None)
    if ctx is None:
        if not _WARNED_UNKNOWN[0]:
            _WARNED_UNKNOWN[0] = True
            logger.warning(
                "sparsediff: a compiled / exported graph calls the attention of a layer that has no sparse "
                "attention enabled in this process (disabled, or the program was loaded elsewhere): it runs "
                "dense attention"
            )
        dense = _DENSE_CALL[0]
        if dense is None:  # never: importing sparsediff.hooks registers it (.backend)
            raise RuntimeError("sparsediff: no dense attention call is registered (import sparsediff.hooks)")
        out = dense(kwargs)
    else:
        out = ctx.compiled_attention(kwargs)
    res = torch.empty_like(query)  # the fake's strides; never alias an input
    res.copy_(out)
    return res


@_layer_attention_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layer_key, call_token=None):
    return torch.empty_like(query)
