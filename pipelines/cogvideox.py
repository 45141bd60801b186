"""CogVideoX (1.0 2B/5B, 1.5): joint ``[text, video]`` self-attention through a direct SDPA call.

* Self-attention modules: ``transformer_blocks.{i}.attn1`` (the only attention in the model).
* Processor: ``CogVideoXAttnProcessor2_0`` (``diffusers.models.attention_processor``) calls
  ``F.scaled_dot_product_attention`` itself; :func:`~sparsediff.pipelines.sdpa.dispatch_processor`
  routes that call through ``dispatch_attention_fn`` without copying the processor's code.
* Layout: ``hidden_states [B, F, C, H, W]`` (frames *before* channels) -> grid
  ``(F / p_t, H / p, W / p)`` (``p_t = config.patch_size_t`` or 1 for CogVideoX 1.0); the patch
  embedding returns ``[text, video]``, so text (``encoder_hidden_states.shape[1]`` tokens, 226 in the
  released models) comes **before** the video.
* Timestep: scheduler units (DDIM / DPM, 0..999). CFG: batched (``[uncond, cond]`` in one call).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import TokenLayout

from .base import Adapter, grid_from_patch, register_adapter
from .sdpa import dispatch_processor

__all__ = ["COGVIDEOX_ADAPTER", "cogvideox_layout"]


def cogvideox_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x, enc = inputs["hidden_states"], inputs["encoder_hidden_states"]
    if x.dim() != 5:
        raise ValueError(f"CogVideoX: expected hidden_states [B, F, C, H, W], got shape {tuple(x.shape)}")
    p = transformer.config.patch_size
    pt = transformer.config.patch_size_t or 1
    _, f, _, h, w = x.shape
    return TokenLayout.video(
        grid_from_patch(f, pt, "CogVideoX frames"),
        grid_from_patch(h, p, "CogVideoX height"),
        grid_from_patch(w, p, "CogVideoX width"),
        text_len=int(enc.shape[1]),
        text_position="before",
    )


def _processors() -> dict[str, type]:
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    return {"CogVideoXAttnProcessor2_0": dispatch_processor(CogVideoXAttnProcessor2_0)}


COGVIDEOX_ADAPTER = register_adapter(
    Adapter(
        name="cogvideox",
        family="video",
        transformer_classes=("CogVideoXTransformer3DModel",),
        self_attention=(r"transformer_blocks\.\d+\.attn1",),
        layout_fn=cogvideox_layout,
        timestep_arg="timestep",
        timestep_units="steps",
        cfg="batch",
        dispatch_processors=_processors(),
        notes="CogVideoX 1.0 (2B/5B) and 1.5 (T2V/I2V); fused QKV processors are not supported",
    )
)
