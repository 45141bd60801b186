"""HunyuanVideo: joint ``[video, text]`` self-attention (text after the video) in dual and single blocks.

* Self-attention modules: ``transformer_blocks.{i}.attn`` then ``single_transformer_blocks.{i}.attn``.
  The text token refiner (``context_embedder.token_refiner.refiner_blocks.{i}.attn``) never matches.
* Layout: ``hidden_states [B, C, F, H, W]`` -> grid ``(F / patch_size_t, H / patch_size, W / patch_size)``,
  then ``encoder_hidden_states.shape[1]`` text tokens (padded to ``max_sequence_length``).
* The padded text is masked through a key-padding ``attn_mask [B, 1, 1, N]``: the sparse path drops the
  masked text tokens (text segment shortened per sample) and gives masked query rows dense attention
  over the kept keys, as masked dense attention does.
* Timestep: scheduler units. CFG: embedded guidance (one call per step).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import TokenLayout

from .base import Adapter, grid_from_patch, register_adapter

__all__ = ["HUNYUAN_VIDEO_ADAPTER", "hunyuan_video_layout"]


def hunyuan_video_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x, enc = inputs["hidden_states"], inputs["encoder_hidden_states"]
    if x.dim() != 5:
        raise ValueError(f"HunyuanVideo: expected hidden_states [B, C, F, H, W], got shape {tuple(x.shape)}")
    cfg = transformer.config
    p, pt = cfg.patch_size, cfg.patch_size_t
    _, _, f, h, w = x.shape
    grid = (
        grid_from_patch(f, pt, "HunyuanVideo frames"),
        grid_from_patch(h, p, "HunyuanVideo height"),
        grid_from_patch(w, p, "HunyuanVideo width"),
    )
    return TokenLayout.video(*grid, text_len=int(enc.shape[1]), text_position="after")


HUNYUAN_VIDEO_ADAPTER = register_adapter(
    Adapter(
        name="hunyuan_video",
        family="video",
        transformer_classes=("HunyuanVideoTransformer3DModel",),
        self_attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        layout_fn=hunyuan_video_layout,
        timestep_arg="timestep",
        timestep_units="steps",
        cfg="batch",
        # the radial-attention authors' HunyuanVideo setting (their Wan setting, decay 0.2 + frame-0 sink,
        # is the video family default)
        default_plan={"params": {"decay": 0.95, "sink": False}},
        notes="HunyuanVideo T2V / I2V (dual + single stream blocks; padded text via key-padding mask)",
    )
)
