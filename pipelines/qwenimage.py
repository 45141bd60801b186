"""QwenImage (+ Edit): joint ``[text, image]`` self-attention (text before) in every block.

* Self-attention modules: ``transformer_blocks.{i}.attn`` (the double-stream processor concatenates
  ``[text, image]``).
* Layout: ``encoder_hidden_states.shape[1]`` text tokens, then the image grids of ``img_shapes[0]``
  (``(frames, H / 2, W / 2)`` per image; Edit pipelines append reference-image grids, kept dense).
* A mask (``encoder_hidden_states_mask``) appears only when text is padded; it is a key-padding mask on
  text tokens, handled by dropping them (see :mod:`sparsediff.hooks`).
* Timestep: ``t / 1000`` (sigma units). CFG: "true CFG" as separate calls (different text lengths).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import Segment, TokenLayout

from .base import Adapter, register_adapter

__all__ = ["QWENIMAGE_ADAPTER", "qwenimage_layout"]


def _shapes(img_shapes: Any) -> list[tuple[int, int, int]]:
    if img_shapes is None:
        raise ValueError("QwenImage: img_shapes missing from the transformer call")
    first = img_shapes[0]
    if isinstance(first, tuple) and len(first) == 3 and all(isinstance(x, int) for x in first):
        first = [first]  # a single (F, H, W) per sample
    return [tuple(int(x) for x in s) for s in first]


def qwenimage_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x, enc = inputs["hidden_states"], inputs["encoder_hidden_states"]
    segs = [Segment.text(int(enc.shape[1]))] if enc is not None and enc.shape[1] else []
    for f, h, w in _shapes(inputs.get("img_shapes")):
        segs.append(Segment.image_grid(h, w) if f == 1 else Segment.video_grid(f, h, w))
    layout = TokenLayout(tuple(segs))
    n_img = layout.num_tokens - layout.text_len
    if n_img != x.shape[1]:
        raise ValueError(f"QwenImage: img_shapes give {n_img} image tokens, hidden_states has {x.shape[1]}")
    return layout


QWENIMAGE_ADAPTER = register_adapter(
    Adapter(
        name="qwenimage",
        family="image",
        transformer_classes=("QwenImageTransformer2DModel",),
        self_attention=(r"transformer_blocks\.\d+\.attn",),
        layout_fn=qwenimage_layout,
        timestep_arg="timestep",
        timestep_units="sigma",
        cfg="calls",
        cp_split="segments",
        notes="QwenImage / QwenImage-Edit (reference images as extra dense segments)",
    )
)
