"""Radial attention: a static O(n log n) spatio-temporal energy-decay mask (natural frame-major order).

Token-level definition (query token at frame ``i``, frame-local index ``r = h*W + w``; key token at frame
``j``, frame-local index ``c``; ``d = |i - j|``; ``S = H*W`` tokens per frame; ``B`` = the key block size):

* kept in full when ``d <= dense_dist``, or when ``sink`` and ``j == 0`` (first frame as attention sink);
* otherwise let ``L = 2**bit_length(S) / 2**bit_length(d)``:
  - if ``L >= B``: kept when ``|r - c| <= max(L * decay, B)`` (a diagonal band that halves each time
    the frame distance doubles);
  - if ``L < B``: the band ``|r - c| <= B`` is kept only for frame pairs with ``d % floor(B / L) == 0``.

Tokens outside the grid are dense. Reduced to blocks with the "any pair" rule of
:mod:`sparsediff.patterns.common`. Each query keeps ~``S`` keys per octave of frame distance (the
window halves as the number of frames at that distance doubles), so kept pairs ~ ``N * S * log F``:
O(n log n) in the number of frames, density ~ ``log F / F``.
"""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from .common import cdiv, mask_from_bool, reduce_segment_pairs, segments

__all__ = ["radial_mask", "radial_frame_rule"]


def radial_frame_rule(
    d: torch.Tensor,
    j: torch.Tensor,
    tokens_per_frame: int,
    block: int,
    decay: float,
    sink: bool,
    dense_dist: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For frame distances ``d`` and key frames ``j`` (int64 tensors): ``(full, allowed, window)``.

    ``full``: whole frame pair kept; ``allowed``: the band applies; ``window``: band half-width (int64).
    """
    full = d <= dense_dist
    if sink:
        full = full | (j == 0)
    top = float(2 ** int(tokens_per_frame).bit_length())
    # bit_length(d) for d >= 1 (d = 0 is always full)
    dl = torch.where(
        d > 0, torch.floor(torch.log2(d.clamp_min(1).double())) + 1, torch.zeros_like(d, dtype=torch.float64)
    )
    L = top / torch.pow(2.0, dl)
    small = L < block
    split = torch.floor(block / L.clamp_min(1e-9)).clamp_min(1).to(torch.int64)
    allowed = torch.where(small, (d % split) == 0, torch.ones_like(full))
    window = torch.where(small, torch.full_like(L, float(block)), torch.clamp(L * decay, min=float(block)))
    return full, allowed, torch.floor(window).to(torch.int64)


def radial_mask(
    layout: TokenLayout,
    block_size: int = 64,
    *,
    decay: float = 1.0,
    sink: bool = False,
    dense_dist: int = 1,
    device: torch.device | str | None = None,
) -> BlockSparseMask:
    """Radial mask ``[1, 1, Qb, Kb]`` on the natural order of ``layout`` (see module docstring)."""
    n = layout.num_tokens
    nb = cdiv(n, block_size)
    if layout.grid is None:
        return mask_from_bool(torch.ones(nb, nb, dtype=torch.bool, device=device), block_size, n)
    F, H, W = layout.grid
    S = H * W
    off = layout.grid_offset
    pos = torch.arange(n, device=device)
    ingrid = (pos >= off) & (pos < off + F * S)
    groups = torch.where(ingrid, (pos - off) // S, torch.full_like(pos, -1))
    seg = segments(groups, block_size)
    a = seg.lo - off - seg.grp * S  # frame-local start
    b = seg.hi - off - seg.grp * S
    i, j = seg.grp.unsqueeze(1), seg.grp.unsqueeze(0)
    d = (i - j).abs()
    full, allowed, w = radial_frame_rule(d, j.expand_as(d), S, block_size, decay, sink, dense_dist)
    band = (a.unsqueeze(0) <= b.unsqueeze(1) + w) & (b.unsqueeze(0) >= a.unsqueeze(1) - w)
    keep = full | (allowed & band)
    return mask_from_bool(reduce_segment_pairs(seg, seg, keep, nb, nb), block_size, n)
