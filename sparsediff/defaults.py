"""Training-free default plans per model family (what ``enable_sparse_attention(pipe)`` uses with no plan).

* **video** (Wan, HunyuanVideo, CogVideoX, LTX, Mochi): ``radial`` on every head, with the first 25 % of
  the denoising steps and the first self-attention layer dense. Radial attention's static
  energy-decay mask is the published training-free choice for video DiTs; early steps set the layout
  of the scene and are the most sensitive to sparsification, as is the first layer (ALGORITHMS.md).
* **image** (Flux, QwenImage, SD3): dynamic ``topp`` (mean-pooled block scores, keep blocks up to a
  cumulative probability) but only on calls with at least :data:`IMAGE_MIN_TOKENS` tokens (4096: the
  native 1024^2 resolutions of Flux and SD3 engage); below that they run dense. Same warm-up as video.

An adapter may override parts with ``Adapter.default_plan`` (keyword arguments of :func:`default_plan`).
"""

from __future__ import annotations

from typing import Any

from .plan import Plan
from .specs import PATTERN_PARAMS

__all__ = ["default_plan", "family_schedule", "VIDEO_DEFAULT", "IMAGE_DEFAULT", "IMAGE_MIN_TOKENS"]

#: Token count from which the image default runs sparse. Chosen from the block-count model (no GPU was
#: available to measure it): at the default block of 64 tokens a call of N tokens has (N/64)^2 block
#: pairs per head, the kernel runs each computed pair at about the dense kernel's throughput, and top-p
#: selection adds one pooled score per pair (D flops, 1/64^2 of the pair's attention) plus a sort per
#: row of blocks -- so the time is about density + a few % of the dense time. From 64 blocks per row
#: (4096 tokens) the text rows/columns that stay dense are a small share (Flux 1024^2: 8 of 72 blocks)
#: and the selection overhead under 5 %; below it image models are fast anyway and per-call fixed costs
#: (mask building, launches) dominate. The native resolutions engage: SD3 1024^2 (4096 + 333 tokens),
#: Flux 1024^2 (4096 + 512), QwenImage 1328^2 (6889 + text). Re-measure with ``sparsediff bench`` on a GPU.
IMAGE_MIN_TOKENS = 4096

VIDEO_DEFAULT: dict[str, Any] = {
    "pattern": "radial",
    "dense_steps": 0.25,
    "dense_layers": (0,),
    "min_tokens": 0,
}
IMAGE_DEFAULT: dict[str, Any] = {
    "pattern": "topp",
    "dense_steps": 0.25,
    "dense_layers": (0,),
    "min_tokens": IMAGE_MIN_TOKENS,
}


def _family(adapter_or_family: Any) -> tuple[str, dict[str, Any]]:
    if isinstance(adapter_or_family, str):
        return adapter_or_family, {}
    return adapter_or_family.family, dict(getattr(adapter_or_family, "default_plan", {}) or {})


def family_schedule(adapter_or_family: Any) -> dict[str, Any]:
    """``dense_steps`` / ``dense_layers`` / ``min_tokens`` of the family default (adapter overrides applied)."""
    family, over = _family(adapter_or_family)
    base = dict(VIDEO_DEFAULT if family == "video" else IMAGE_DEFAULT)
    base.update(over)
    return {k: base[k] for k in ("dense_steps", "dense_layers", "min_tokens")}


def default_plan(adapter_or_family: Any, pattern: str | None = None, **params: Any) -> Plan:
    """The training-free default plan for an adapter (or a family name ``"video"`` / ``"image"``).

    ``pattern`` replaces the family's pattern (its schedule is kept): ``default_plan(adapter, "tile")``.
    """
    family, over = _family(adapter_or_family)
    if family not in ("video", "image"):
        raise ValueError(f"unknown model family {family!r}; expected 'video' or 'image'")
    base = dict(VIDEO_DEFAULT if family == "video" else IMAGE_DEFAULT)
    base.update(over)
    name = pattern or base.pop("pattern")
    base.pop("pattern", None)
    if name not in PATTERN_PARAMS:
        raise ValueError(f"unknown pattern {name!r}; known patterns: {tuple(PATTERN_PARAMS)}")
    pattern_params = dict(base.pop("params", {}) or {}) if pattern is None else {}
    pattern_params.update(params)
    return Plan.uniform(
        name,
        dense_steps=base["dense_steps"],
        dense_layers=tuple(base["dense_layers"]),
        min_tokens=int(base["min_tokens"]),
        **pattern_params,
    )
