"""Training-free default plans per model family (what ``enable_sparse_attention(pipe)`` uses with no plan).

* **video** (Wan, HunyuanVideo, CogVideoX, LTX, Mochi): ``radial`` on every head with the radial-attention
  authors' Wan setting -- ``decay=0.2`` and the first latent frame kept as an attention sink (``sink``) --
  the first 25 % of the denoising steps and the first self-attention layer dense, and calls of fewer than
  :data:`VIDEO_MIN_TOKENS` tokens dense. HunyuanVideo's adapter takes the authors' HunyuanVideo setting
  (``decay=0.95``, no sink). Radial's static energy-decay mask is the published training-free choice for
  video DiTs; early steps set the layout of the scene and are the most sensitive to sparsification, as is
  the first layer (ALGORITHMS.md).
* **image** (Flux, QwenImage, SD3): dynamic ``topp`` (mean-pooled block scores, keep blocks up to a
  cumulative probability) but only on calls with at least :data:`IMAGE_MIN_TOKENS` tokens (4096: the
  native 1024^2 resolutions of Flux and SD3 engage); below that they run dense. Same warm-up as video.

**The video default gets sparser as the token count grows**, as the paper's mask does: a query keeps its
own and the neighbouring frames, the sink frame, and a spatial band that halves each time the frame
distance doubles, so the kept pairs grow as ``N log F`` (density ~ ``log F / F``) once a frame spans many
blocks. Density of the default's mask (``block_size=64``, ``block_rule="any"``; ``mask.density()``):

=====================  ========  =======
grid (F x H x W)       tokens    density
=====================  ========  =======
8 x 8 x 8              512       dense (below VIDEO_MIN_TOKENS; the mask would keep 0.719)
16 x 16 x 16           4 096     0.645
16 x 32 x 32           16 384    0.394
Wan2.1 480p 21x30x52   32 760    0.321
Wan2.1 720p 21x45x80   75 600    0.256
=====================  ========  =======

(The previous default, ``decay=1.0`` without sink, kept 0.656 / 0.667 / 0.585 / 0.442 / 0.373: denser, and
*denser* at 4 096 tokens than at 512.) Measured on the embedded trained model with ``sparsediff compare``
(20 steps, CFG 4, the demo's two prompts; README "Family defaults"): at 16 x 64 x 64 px (4 096 tokens) the
new default gives 27.94 dB / SSIM 0.969 vs dense at 1.11x per step, the old one 25.49 dB / 0.944 at 1.06x;
at 8 x 32 x 32 px (512 tokens, 8 blocks per row) every radial setting was a loss on both axes -- 18.8-19.2 dB
at 0.92-1.03x -- because the band cannot be narrower than one 64-token block, which is a whole latent frame
there: hence :data:`VIDEO_MIN_TOKENS`. ``block_rule`` stays ``"any"`` (a superset of the token pattern): the
authors' ``"reference"`` rule is sparser on Wan shapes but lost accuracy on ragged frames in our planted
measurement (README "Radial block rules").

An adapter may override parts with ``Adapter.default_plan`` (keyword arguments of :func:`default_plan`;
``params`` holds the pattern's parameters).
"""

from __future__ import annotations

from typing import Any

from .plan import Plan
from .specs import PATTERN_PARAMS

__all__ = [
    "default_plan",
    "family_schedule",
    "VIDEO_DEFAULT",
    "IMAGE_DEFAULT",
    "IMAGE_MIN_TOKENS",
    "VIDEO_MIN_TOKENS",
]

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

#: Token count from which the video default runs sparse (64 blocks per row at the default block of 64).
#: Measured on the embedded model (module docstring): at 512 tokens the radial mask cannot be sparser than
#: ~2/3 (its spatial band is at least one block, a whole frame there) and every setting lost 10+ dB for no
#: speed; at 4 096 tokens the default runs at 0.645 density for 1.11x at 27.9 dB. Small video calls are
#: cheap anyway. A searched plan is not bound by it (the search keeps its plan engaged at the size it
#: measured); ``enable_sparse_attention(pipe, min_tokens=0)`` runs the default sparse at every size.
VIDEO_MIN_TOKENS = 4096

VIDEO_DEFAULT: dict[str, Any] = {
    "pattern": "radial",
    "params": {"decay": 0.2, "sink": True},
    "dense_steps": 0.25,
    "dense_layers": (0,),
    "min_tokens": VIDEO_MIN_TOKENS,
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

    ``pattern`` replaces the family's pattern (its schedule is kept): ``default_plan(adapter, "tile")``;
    naming the family's own pattern keeps its parameters (``default_plan("video", "radial")`` is the video
    default). ``params`` override the pattern's parameters.
    """
    family, over = _family(adapter_or_family)
    if family not in ("video", "image"):
        raise ValueError(f"unknown model family {family!r}; expected 'video' or 'image'")
    base = dict(VIDEO_DEFAULT if family == "video" else IMAGE_DEFAULT)
    base.update(over)
    own = base.pop("pattern")
    name = pattern or own
    if name not in PATTERN_PARAMS:
        raise ValueError(f"unknown pattern {name!r}; known patterns: {tuple(PATTERN_PARAMS)}")
    pattern_params = dict(base.pop("params", None) or {}) if name == own else {}
    pattern_params.update(params)
    return Plan.uniform(
        name,
        dense_steps=base["dense_steps"],
        dense_layers=tuple(base["dense_layers"]),
        min_tokens=int(base["min_tokens"]),
        **pattern_params,
    )
