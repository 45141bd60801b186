"""LTX-Video (0.9.x): self-attention over packed video tokens; text only in cross-attention.

* Self-attention modules: ``transformer_blocks.{i}.attn1`` (``LTXAttention``, ``LTXVideoAttnProcessor``,
  already calls ``dispatch_attention_fn`` -- no drop-in processor needed). ``attn2`` is cross-attention.
* Layout: the pipeline packs the latents itself (``hidden_states [B, N, C]``, frame-major) and passes the
  token grid as ``num_frames`` / ``height`` / ``width`` (the same numbers the RoPE uses: one position per
  token) -> grid ``(num_frames, height, width)``; their product must equal ``N``.
* Timestep: scheduler units (0..1000), ``[B]`` (condition pipelines: ``[B, N]``). CFG: batched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import TokenLayout

from .base import Adapter, register_adapter

__all__ = ["LTX_ADAPTER", "ltx_layout"]


def ltx_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x = inputs["hidden_states"]
    f, h, w = inputs.get("num_frames"), inputs.get("height"), inputs.get("width")
    if x.dim() != 3:
        raise ValueError(f"LTX: expected packed hidden_states [B, N, C], got shape {tuple(x.shape)}")
    if f is None or h is None or w is None:
        raise ValueError("LTX: num_frames / height / width missing from the transformer call")
    f, h, w = int(f), int(h), int(w)
    if f * h * w != x.shape[1]:
        raise ValueError(f"LTX: grid {f}x{h}x{w} = {f * h * w} tokens != {x.shape[1]} packed tokens")
    return TokenLayout.video(f, h, w)


LTX_ADAPTER = register_adapter(
    Adapter(
        name="ltx",
        family="video",
        transformer_classes=("LTXVideoTransformer3DModel",),
        self_attention=(r"transformer_blocks\.\d+\.attn1",),
        layout_fn=ltx_layout,
        timestep_arg="timestep",
        timestep_units="steps",
        cfg="batch",
        notes="LTX-Video 0.9.x (LTXPipeline, image-to-video); LTX-2 is a different model",
    )
)
