"""Flux (FLUX.1 dev / schnell / Kontext): joint ``[text, image]`` self-attention in dual and single blocks.

* Self-attention modules: ``transformer_blocks.{i}.attn`` (dual stream: the processor concatenates
  ``[text, image]``) then ``single_transformer_blocks.{i}.attn`` (the block concatenates
  ``[text, image]`` before attention). Layers: the dual blocks first, then the single blocks.
* Layout: text ``encoder_hidden_states.shape[1]`` tokens **before** the image; image grid read from
  ``img_ids`` (rows ``(0, row, col)``, row-major over the packed 2x2 latent). Kontext appends the reference
  image tokens (``img_ids[:, 0] == 1``): an extra image segment after the primary grid (kept dense).
* Timestep: ``t / 1000`` (sigma units). CFG: none (guidance-distilled) or true CFG as separate calls.
* Context parallelism splits text and image separately across ranks (``cp_split="segments"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import Segment, TokenLayout

from .base import Adapter, register_adapter

__all__ = ["FLUX_ADAPTER", "flux_layout", "grid_segments_from_ids"]


def grid_segments_from_ids(ids: torch.Tensor, n_tokens: int, what: str) -> list[Segment]:
    """Image segments from position ids ``[N, 3]`` rows ``(index, row, col)``, one per distinct index,
    in token order; each must be a full row-major grid."""
    if ids.dim() == 3:
        ids = ids[0]
    if ids.shape[0] != n_tokens:
        raise ValueError(f"{what}: {ids.shape[0]} position ids for {n_tokens} image tokens")
    idx = ids[:, 0].round().long()
    segs = []
    start = 0
    # contiguous runs of the same index (token order)
    change = torch.nonzero(idx[1:] != idx[:-1]).flatten().tolist()
    for end in [c + 1 for c in change] + [n_tokens]:
        part = ids[start:end]
        rows = int(part[:, 1].max().item() - part[:, 1].min().item()) + 1
        cols = int(part[:, 2].max().item() - part[:, 2].min().item()) + 1
        if rows * cols != end - start:
            raise ValueError(
                f"{what}: tokens {start}..{end} do not form a full grid ({rows}x{cols} != {end - start})"
            )
        segs.append(Segment.image_grid(rows, cols))
        start = end
    return segs


def flux_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x, enc, img_ids = inputs["hidden_states"], inputs["encoder_hidden_states"], inputs.get("img_ids")
    if img_ids is None:
        raise ValueError("Flux: img_ids missing from the transformer call")
    segs = [Segment.text(int(enc.shape[1]))] if enc is not None and enc.shape[1] else []
    segs += grid_segments_from_ids(img_ids, int(x.shape[1]), "Flux")
    return TokenLayout(tuple(segs))


FLUX_ADAPTER = register_adapter(
    Adapter(
        name="flux",
        family="image",
        transformer_classes=("FluxTransformer2DModel",),
        self_attention=(r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"),
        layout_fn=flux_layout,
        timestep_arg="timestep",
        timestep_units="sigma",
        cfg="calls",
        cp_split="segments",
        notes="FLUX.1 dev/schnell/Kontext (dual + single stream blocks)",
    )
)
