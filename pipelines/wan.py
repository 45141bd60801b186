"""Wan 2.1 / 2.2 (+ VACE, SkyReels-V2): self-attention over the video grid, text only in cross-attention.

* Self-attention modules: ``blocks.{i}.attn1`` (VACE also ``vace_blocks.{i}.attn1``, the control stream
  over the same grid; layers are numbered main blocks first, then VACE blocks, in ``named_modules()``
  order). ``attn2`` (text / I2V image cross-attention) never matches.
* Layout: ``hidden_states [B, C, F, H, W]`` -> grid ``(F / p_t, H / p_h, W / p_w)`` with
  ``config.patch_size``; the Conv3d patch embedding flattens frame-major. No text in the sequence.
* Timestep: scheduler units (0..1000), ``[B]`` (Wan 2.2 TI2V passes ``[B, N]``; SkyReels-V2 DF ``[B, F]``).
* CFG: two transformer calls per step (cond, then uncond).
* Wan 2.2 A14B: ``transformer`` and ``transformer_2`` are enabled independently (same adapter, own state).
* SkyReels-V2 with ``causal_block_size`` passes a block-causal ``attention_mask``: those calls run dense.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import TokenLayout

from .base import Adapter, grid_from_patch, register_adapter

__all__ = ["WAN_ADAPTER", "wan_layout"]


def wan_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x = inputs["hidden_states"]
    if x.dim() != 5:
        raise ValueError(f"Wan: expected hidden_states [B, C, F, H, W], got shape {tuple(x.shape)}")
    pt, ph, pw = transformer.config.patch_size
    _, _, f, h, w = x.shape
    return TokenLayout.video(
        grid_from_patch(f, pt, "Wan frames"),
        grid_from_patch(h, ph, "Wan height"),
        grid_from_patch(w, pw, "Wan width"),
    )


WAN_ADAPTER = register_adapter(
    Adapter(
        name="wan",
        family="video",
        transformer_classes=(
            "WanTransformer3DModel",
            "WanVACETransformer3DModel",
            "SkyReelsV2Transformer3DModel",
        ),
        self_attention=(r"blocks\.\d+\.attn1", r"vace_blocks\.\d+\.attn1"),
        layout_fn=wan_layout,
        timestep_arg="timestep",
        timestep_units="steps",
        cfg="calls",
        notes="Wan 2.1/2.2 (T2V, I2V, TI2V, A14B dual transformer), VACE, SkyReels-V2",
    )
)
