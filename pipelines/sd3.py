"""Stable Diffusion 3 / 3.5: joint ``[image, text]`` self-attention through a direct SDPA call.

* Self-attention modules: ``transformer_blocks.{i}.attn`` (joint image + text) and, in SD3.5 models
  with ``dual_attention_layers``, ``transformer_blocks.{i}.attn2`` (image-only self-attention). Layers
  are numbered in ``named_modules()`` order (``attn`` then ``attn2`` within a block).
* Processor: ``JointAttnProcessor2_0`` (``diffusers.models.attention_processor``) calls
  ``F.scaled_dot_product_attention`` itself; :func:`~sparsediff.pipelines.sdpa.dispatch_processor`
  routes that call through ``dispatch_attention_fn``; ``refit_text=True`` lets the image-only
  ``attn2`` calls run with the layout without the text segment (re-fitted by :mod:`sparsediff.hooks`
  at run time, eager and ``torch.compile``).
* Layout: ``hidden_states [B, C, H, W]`` -> grid ``(1, H / p, W / p)`` (``PatchEmbed``, row-major);
  text (``encoder_hidden_states.shape[1]`` = 77 CLIP + T5 ``max_sequence_length`` tokens) **after** the
  image (the processor concatenates ``[image, text]``).
* Timestep: scheduler units (0..1000). CFG: batched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import TokenLayout

from .base import Adapter, grid_from_patch, register_adapter
from .sdpa import dispatch_processor

__all__ = ["SD3_ADAPTER", "sd3_layout"]


def sd3_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x, enc = inputs["hidden_states"], inputs.get("encoder_hidden_states")
    if x.dim() != 4:
        raise ValueError(f"SD3: expected hidden_states [B, C, H, W], got shape {tuple(x.shape)}")
    p = transformer.config.patch_size
    _, _, h, w = x.shape
    text = int(enc.shape[1]) if enc is not None else 0
    return TokenLayout.image(
        grid_from_patch(h, p, "SD3 height"),
        grid_from_patch(w, p, "SD3 width"),
        text_len=text,
        text_position="after",
    )


def _processors() -> dict[str, type]:
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return {"JointAttnProcessor2_0": dispatch_processor(JointAttnProcessor2_0)}


SD3_ADAPTER = register_adapter(
    Adapter(
        name="sd3",
        family="image",
        transformer_classes=("SD3Transformer2DModel",),
        self_attention=(r"transformer_blocks\.\d+\.attn", r"transformer_blocks\.\d+\.attn2"),
        layout_fn=sd3_layout,
        timestep_arg="timestep",
        timestep_units="steps",
        cfg="batch",
        dispatch_processors=_processors(),
        refit_text=True,
        notes="SD3 medium, SD3.5 large/medium (joint attn + dual-attention attn2 layers)",
    )
)
