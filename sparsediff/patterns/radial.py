"""Radial attention: a static O(n log n) spatio-temporal energy-decay mask (natural frame-major order).

Token-level definition (query token at frame ``i``, frame-local index ``r = h*W + w``; key token at frame
``j``, frame-local index ``c``; ``d = |i - j|``; ``S = H*W`` tokens per frame; ``B`` = the key block size):

* kept in full when ``d <= dense_dist``, or when ``sink`` and ``j == 0`` (first frame as attention sink);
* otherwise let ``L = 2**bit_length(S) / 2**bit_length(d)``:
  - if ``L >= B``: kept when ``|r - c| <= max(L * decay, B)`` (a diagonal band that halves each time
    the frame distance doubles);
  - if ``L < B``: the band ``|r - c| <= B`` is kept only for frame pairs with ``d % floor(B / L) == 0``.

Tokens outside the grid are dense. Each query keeps ~``S`` keys per octave of frame distance (the
window halves as the number of frames at that distance doubles), so kept pairs ~ ``N * S * log F``:
O(n log n) in the number of frames, density ~ ``log F / F``.

Block rule (``block_rule=``), how the token-level pattern becomes ``B x B`` blocks:

* ``"any"`` (default): a block is kept when **any** of its token pairs is in the pattern (the rule of
  :mod:`sparsediff.patterns.common`) -- a superset of the token pattern, never a loss.
* ``"reference"``: the rule of the radial-attention authors. Each frame pair ``(i, j)`` is judged on
  its own: for a block pair, count -- among the token pairs of frame ``i`` queries x frame ``j`` keys
  that fall in the block pair -- for every key column the kept query rows. A column is *non-empty*
  with >= 1 kept row and *dense* with more than ``B / 3`` kept rows (the count is divided by the full
  block size ``B`` even when the frame covers only part of the block). The frame pair keeps the block
  when more than 60 % of its non-empty columns are dense; a block is kept when any frame pair keeps it.
  Two further details reproduce the authors' masks block for block: a frame pair is only judged on
  the ``ceil(S / B)`` block rows and columns starting at the block that holds the first token of
  query frame ``i`` / key frame ``j`` (tokens of a frame beyond them do not count for that pair), and
  when the grid does not end on a block boundary, the block holding its last token is kept in full
  along its row and column (the authors pad the sequence to a multiple of ``B`` and keep the blocks from
  the video/padding border on dense). Keeps fewer blocks than ``"any"`` -- 13-28 % less compute at
  Wan/HunyuanVideo shapes -- at the price of dropping blocks where the pattern is sparse.
"""

from __future__ import annotations

import torch

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from . import params
from .common import cdiv, mask_from_bool, reduce_segment_pairs, segments
from .registry import builtin_family, static_group
from .specs import HeadSpec

__all__ = ["radial_mask", "radial_frame_rule", "RADIAL_BLOCK_RULES"]

#: Block rules of :func:`radial_mask` (see the module docstring).
RADIAL_BLOCK_RULES = ("any", "reference")


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
    block_rule: str = "any",
    device: torch.device | str | None = None,
) -> BlockSparseMask:
    """Radial mask ``[1, 1, Qb, Kb]`` on the natural order of ``layout`` (see module docstring)."""
    if block_rule not in RADIAL_BLOCK_RULES:
        raise ValueError(f"radial block_rule must be one of {RADIAL_BLOCK_RULES}, got {block_rule!r}")
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
    if block_rule == "reference":
        return _reference_blocks(layout, seg, a, b, full, allowed, w, block_size, device)
    band = (a.unsqueeze(0) <= b.unsqueeze(1) + w) & (b.unsqueeze(0) >= a.unsqueeze(1) - w)
    keep = full | (allowed & band)
    return mask_from_bool(reduce_segment_pairs(seg, seg, keep, nb, nb), block_size, n)


def _columns_with_rows(a, b, c0, c1, w, m):
    """Number of key columns ``c`` in ``[c0, c1]`` with at least ``m`` query rows ``r`` in ``[a, b]`` and
    ``|r - c| <= w`` (all int64, broadcast). The row count ``|[a, b] & [c - w, c + w]|`` is a trapezoid
    in ``c``, so the columns reaching ``m`` rows form the interval ``[a + m - 1 - w, b - m + 1 + w]``
    (empty unless the query run and the window both hold ``m`` rows)."""
    lo = torch.maximum(c0, a + (m - 1) - w)
    hi = torch.minimum(c1, b - (m - 1) + w)
    ok = (b - a + 1 >= m) & (2 * w + 1 >= m)
    return torch.where(ok, (hi - lo + 1).clamp_min(0), torch.zeros_like(lo))


def _reference_blocks(layout, seg, a, b, full, allowed, w, block, device) -> BlockSparseMask:
    """``block_rule="reference"`` on the segments of :func:`radial_mask` (see the module docstring).

    A block holds at most one run (segment) of each frame, so a (query segment, key segment) pair of
    grid segments is exactly one frame pair's share of one block pair; its column counts are closed
    form (:func:`_columns_with_rows`)."""
    n = layout.num_tokens
    nb = cdiv(n, block)
    F, H, W = layout.grid
    S = H * W
    off = layout.grid_offset
    # a whole frame pair is a band wider than the frame; no pair at all is a window of -1
    big = torch.full_like(w, S)
    wq = torch.where(full, big, torch.where(allowed, w, torch.full_like(w, -1)))
    aq, bq = a.unsqueeze(1), b.unsqueeze(1)
    ak, bk = a.unsqueeze(0), b.unsqueeze(0)
    nonempty = _columns_with_rows(aq, bq, ak, bk, wq, 1)
    dense = _columns_with_rows(aq, bq, ak, bk, wq, block // 3 + 1)  # > B/3 rows
    keep = 5 * dense > 3 * nonempty  # > 60 % of the non-empty columns
    # each frame pair is judged on ceil(S / B) blocks from the block of the frame's first token
    first_blk = (off + seg.grp.clamp_min(0) * S) // block
    inside = (seg.blk - first_blk) < cdiv(S, block)
    keep = keep & inside.unsqueeze(1) & inside.unsqueeze(0)
    bb = reduce_segment_pairs(seg, seg, keep, nb, nb)
    end = off + F * S
    if end % block:
        bb[end // block, :] = True
        bb[:, end // block] = True
    return mask_from_bool(bb, block, n)


# ---------------------------------------------------------------------- the family (see registry.py)
def _static(layout: TokenLayout, spec, block_size: int, device=None) -> BlockSparseMask:
    return radial_mask(
        layout,
        block_size,
        decay=float(spec.get("decay")),
        sink=bool(spec.get("sink")),
        dense_dist=int(spec.get("dense_dist")),
        block_rule=str(spec.get("block_rule")),
        device=device,
    )


def _build_group(call, spec, heads):
    return static_group(call, spec, heads, lambda: _static(call.layout, spec, call.block_size, call.device))


def _candidates(layout: TokenLayout, block_size: int) -> list[HeadSpec]:
    """decay 0.25 / 0.5 / 1 / 2, with and without the frame-0 sink (more than two frames), each with the
    block rules ``"any"`` and ``"reference"`` (the authors' sparser column-density rule)."""
    if layout.grid is None:
        return []
    out = []
    for rule in RADIAL_BLOCK_RULES:
        extra = {} if rule == "any" else {"block_rule": rule}
        for decay in (0.25, 0.5, 1.0, 2.0):
            out.append(HeadSpec.make("radial", decay=decay, **extra))
            if layout.grid[0] > 2:
                out.append(HeadSpec.make("radial", decay=decay, sink=True, **extra))
    return out


FAMILY = builtin_family(
    "radial",
    params={"decay": 1.0, "sink": False, "dense_dist": 1, "block_rule": "any"},
    checks={
        "decay": params.positive(),
        "sink": params.boolean(),
        "dense_dist": params.int_ge(0),
        "block_rule": params.one_of(RADIAL_BLOCK_RULES),
    },
    kind="static",
    doc="static energy-decay mask: decay (spatial window factor), sink (key frame 0 always kept), "
    "dense_dist (frame distance computed in full), block_rule ('any' superset / 'reference' authors' rule)",
    static_mask=_static,
    build_group=_build_group,
    candidates=_candidates,
    planted=lambda kind, spec, layout, block_size: kind == "local",
    needs_grid=True,
    remainder=True,
)
