"""Compile glue: under ``torch.compile`` a layer's whole attention is one opaque ``torch.library`` op.

Nothing per layer may be a Python constant the compiler specialises on (``compile_repeated_blocks``
traces one graph for all blocks): the layer travels as a small int64 tensor (:attr:`LayerContext.key`)
and the op finds it again in this module's registry (weak references, so a dropped transformer is not
kept alive). Mask building etc. runs eagerly inside the op.
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING

import torch

from .hooks_backend import call_backend, dispatch_kwargs

if TYPE_CHECKING:
    from .hooks_dispatch import LayerContext

__all__ = ["register_layer", "release_layer"]

_LAYERS: dict[int, weakref.ReferenceType[LayerContext]] = {}
_NEXT_ID = [0]
_LOCK = threading.Lock()


def register_layer(ctx: LayerContext) -> int:
    """A new id for ``ctx`` (looked up by the op from the layer's key tensor)."""
    with _LOCK:
        i = _NEXT_ID[0]
        _NEXT_ID[0] += 1
        _LAYERS[i] = weakref.ref(ctx)
    return i


def release_layer(layer_id: int) -> None:
    with _LOCK:
        _LAYERS.pop(layer_id, None)


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
) -> torch.Tensor:
    ref = _LAYERS.get(int(layer_key.reshape(-1)[0]))
    ctx = ref() if ref is not None else None
    kwargs = dispatch_kwargs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, None)
    out = call_backend(None, kwargs) if ctx is None else ctx.attention(kwargs)
    res = torch.empty_like(query)  # the fake's strides; never alias an input
    res.copy_(out)
    return res


@_layer_attention_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layer_key):
    return torch.empty_like(query)
