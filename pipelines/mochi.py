"""Mochi 1: joint ``[video, valid text]`` self-attention, one direct SDPA call per sample.

* Self-attention modules: ``transformer_blocks.{i}.attn1`` (``MochiAttention``). The attention pooler
  of the time embedding (``time_embed.pooler``, SDPA in ``embeddings.py``) is not self-attention over
  the video and is never touched.
* Processor: ``MochiAttnProcessor2_0`` (``diffusers.models.attention_processor``) loops over the batch;
  for each sample it keeps only the *valid* prompt tokens (``encoder_attention_mask[b]``), attends
  ``[video, valid text]`` with ``F.scaled_dot_product_attention`` (B = 1) and zero-pads the text part
  back. :func:`~sparsediff.pipelines.sdpa.dispatch_processor` routes each of those calls through
  ``dispatch_attention_fn``. The adapter sets ``refit_text=True``: every call runs with the layout
  "grid + its own text length" (the CFG branches have different prompt lengths), re-fitted by
  :mod:`sparsediff.hooks` at run time (eager and ``torch.compile``).
* Layout: ``hidden_states [B, C, F, H, W]`` -> grid ``(F, H / p, W / p)`` (``p = config.patch_size``,
  no temporal patch); text **after** the video. The layout read from the call uses the longest valid
  prompt of the batch; each attention call re-fits the text length.
* Timestep: the pipeline passes the scheduler's timestep (Mochi's reversed convention,
  ``pipe._current_timestep = 1000 - t``); only its changes are used. CFG: batched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sparsediff.layout import TokenLayout

from .base import Adapter, grid_from_patch, register_adapter
from .sdpa import dispatch_processor

__all__ = ["MOCHI_ADAPTER", "mochi_layout"]


def mochi_layout(transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
    x, enc, mask = (
        inputs["hidden_states"],
        inputs["encoder_hidden_states"],
        inputs.get("encoder_attention_mask"),
    )
    if x.dim() != 5:
        raise ValueError(f"Mochi: expected hidden_states [B, C, F, H, W], got shape {tuple(x.shape)}")
    p = transformer.config.patch_size
    _, _, f, h, w = x.shape
    text = int(mask.sum(dim=1).max()) if mask is not None else int(enc.shape[1])
    return TokenLayout.video(
        f,
        grid_from_patch(h, p, "Mochi height"),
        grid_from_patch(w, p, "Mochi width"),
        text_len=text,
        text_position="after",
    )


def _processors() -> dict[str, type]:
    from diffusers.models.attention_processor import MochiAttnProcessor2_0

    return {"MochiAttnProcessor2_0": dispatch_processor(MochiAttnProcessor2_0)}


MOCHI_ADAPTER = register_adapter(
    Adapter(
        name="mochi",
        family="video",
        transformer_classes=("MochiTransformer3DModel",),
        self_attention=(r"transformer_blocks\.\d+\.attn1",),
        layout_fn=mochi_layout,
        timestep_arg="timestep",
        timestep_units="steps",
        cfg="batch",
        dispatch_processors=_processors(),
        refit_text=True,
        notes="Mochi 1 (preview); per-sample prompt lengths handled per attention call",
    )
)
