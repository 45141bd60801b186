"""Token permutations: reorder the primary grid so a head's pattern becomes contiguous blocks.

Convention: a permutation is an int64 index tensor ``perm[..., N]`` with its inverse ``inv``;
``x_perm[..., i, :] = x[..., perm[i], :]`` (a gather) and ``x == x_perm[..., inv, :]``. Leading dims of
``perm`` (none, ``[H]`` or ``[B, H]``) broadcast against the ``[B, H]`` of ``[B, H, N, D]`` tensors, so
every head (and, for data-dependent clusters, every sample) can have its own order.

Grid-level orders (over the ``F*H*W`` tokens of a grid, natural order frame-major ``f*H*W + h*W + w``):

* :func:`axis_order` -- one of the six axis orders ``"fhw" "fwh" "hfw" "hwf" "wfh" "whf"`` (slowest axis
  first; ``"fhw"`` is the identity) and ``"frame"`` = ``"hwf"``: position-major, every spatial position's
  frames adjacent (temporal heads).
* :func:`tile_order` -- 3D tiles ``(tf, th, tw)`` in frame-major tile order, tokens inside a tile
  frame-major; edge tiles may be ragged (smaller) -- there is no padding.
* :func:`hilbert_order` -- 3D Hilbert curve for any sizes: points are sorted by their Hilbert index
  in the enclosing power-of-two cube (Skilling's transform). Neighbours stay close in 1D; for
  non-cube grids consecutive points are not always unit steps (the curve leaves and re-enters the grid).
* :func:`cluster_order` -- data dependent: k-means on per-head features (keys or queries), tokens sorted
  by cluster id (stable, so tokens of one cluster keep their natural order).

:func:`lift` turns a grid-level order into one over the whole :class:`TokenLayout`: tokens outside the
primary grid (text, extra image segments) stay in place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .layout import TokenLayout

__all__ = [
    "AXIS_ORDERS",
    "Permutation",
    "axis_order",
    "tile_order",
    "tile_ids",
    "hilbert_order",
    "hilbert_index",
    "cluster_order",
    "kmeans",
    "lift",
    "layout_order",
    "gather_tokens",
]

#: The six axis orders of a ``(F, H, W)`` grid, slowest axis first (``"fhw"`` is the natural order).
AXIS_ORDERS = ("fhw", "fwh", "hfw", "hwf", "wfh", "whf")


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    ar = torch.arange(perm.shape[-1], device=perm.device).expand_as(perm)
    inv.scatter_(-1, perm, ar)
    return inv


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``out[b, h, i] = x[b, h, index[.., i]]`` for ``x [B, H, N, D]`` and ``index [N] | [H, N] | [B|1, H, N]``.

    A single ``index_select`` when the index is shared by all heads, else one ``torch.gather``
    (vectorised, memory-bound; the result is a new contiguous tensor).
    """
    if index.dim() == 1:
        return x.index_select(2, index)
    B, H, N, D = x.shape
    idx = index.reshape((1,) * (3 - index.dim()) + tuple(index.shape)).expand(B, H, index.shape[-1])
    return torch.gather(x, 2, idx.unsqueeze(-1).expand(-1, -1, -1, D))


@dataclass(frozen=True, eq=False)
class Permutation:
    """An index tensor ``perm [..., N]`` (int64) and its inverse. ``apply`` gathers, ``undo`` restores."""

    perm: torch.Tensor
    inv: torch.Tensor

    @classmethod
    def from_perm(cls, perm: torch.Tensor) -> Permutation:
        perm = perm.to(torch.int64)
        return cls(perm, _inverse(perm))

    @classmethod
    def identity(cls, n: int, device: torch.device | str | None = None) -> Permutation:
        p = torch.arange(n, device=device)
        return cls(p, p)

    @property
    def num_tokens(self) -> int:
        return self.perm.shape[-1]

    def is_identity(self) -> bool:
        return bool(
            torch.equal(
                self.perm, torch.arange(self.num_tokens, device=self.perm.device).expand_as(self.perm)
            )
        )

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` natural order -> permuted order."""
        return gather_tokens(x, self.perm)

    def undo(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, H, N, D]`` permuted order -> natural order."""
        return gather_tokens(x, self.inv)

    def to(self, device) -> Permutation:
        return Permutation(self.perm.to(device), self.inv.to(device))


# ---------------------------------------------------------------------------- grid orders
def axis_order(grid: tuple[int, int, int], order: str, device=None) -> torch.Tensor:
    """Grid-level order for an axis order string (slowest axis first) or ``"frame"`` (= ``"hwf"``)."""
    if order == "frame":
        order = "hwf"
    if order not in AXIS_ORDERS:
        raise ValueError(
            f"unknown order {order!r}: axis_order takes 'frame' or one of {AXIS_ORDERS}; the other token "
            "orders are 'hilbert' (hilbert_order), 'tile' (tile_order), 'natural' (layout_order) and "
            "'cluster' (cluster_order, data dependent)"
        )
    F, H, W = grid
    nat = torch.arange(F * H * W, device=device).view(F, H, W)
    dims = ["fhw".index(c) for c in order]
    return nat.permute(*dims).reshape(-1)


def tile_ids(grid: tuple[int, int, int], tile: tuple[int, int, int], device=None) -> torch.Tensor:
    """int64 ``[F*H*W]`` (natural order): the linear tile index (frame-major over the tile grid) of each token."""
    F, H, W = grid
    tf, th, tw = tile
    nth, ntw = -(-H // th), -(-W // tw)
    f = torch.arange(F, device=device).view(F, 1, 1) // tf
    h = torch.arange(H, device=device).view(1, H, 1) // th
    w = torch.arange(W, device=device).view(1, 1, W) // tw
    return ((f * nth + h) * ntw + w).reshape(-1)


def tile_order(grid: tuple[int, int, int], tile: tuple[int, int, int], device=None) -> torch.Tensor:
    """Grid-level order with each ``(tf, th, tw)`` tile contiguous (ragged edge tiles are smaller)."""
    if len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"tile must be three positive ints, got {tile!r}")
    ids = tile_ids(grid, tile, device)
    return torch.sort(ids, stable=True).indices


def hilbert_index(coords: torch.Tensor, bits: int) -> torch.Tensor:
    """Hilbert index (int64) of integer points ``coords [M, n]`` in the cube ``[0, 2**bits)^n``.

    Skilling's "axes to transpose" transform (vectorised over points), then bit interleaving.
    """
    x = [coords[:, i].clone() for i in range(coords.shape[1])]
    n = len(x)
    if bits == 0:
        return torch.zeros(coords.shape[0], dtype=torch.int64, device=coords.device)
    q = 1 << (bits - 1)
    while q > 1:
        p = q - 1
        for i in range(n):
            hit = (x[i] & q) != 0
            t = (x[0] ^ x[i]) & p
            x0_new = torch.where(hit, x[0] ^ p, x[0] ^ t)
            xi_new = torch.where(hit, x[i], x[i] ^ t)
            x[0] = x0_new
            if i != 0:
                x[i] = xi_new
        q >>= 1
    for i in range(1, n):
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = 1 << (bits - 1)
    while q > 1:
        t = torch.where((x[n - 1] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    x = [xi ^ t for xi in x]
    h = torch.zeros_like(x[0])
    for b in range(bits - 1, -1, -1):
        for i in range(n):
            h = (h << 1) | ((x[i] >> b) & 1)
    return h


def hilbert_order(grid: tuple[int, int, int], device=None) -> torch.Tensor:
    """Grid-level order along a 3D Hilbert curve (any F, H, W; see module docstring)."""
    F, H, W = grid
    f, h, w = torch.meshgrid(
        torch.arange(F, device=device),
        torch.arange(H, device=device),
        torch.arange(W, device=device),
        indexing="ij",
    )
    coords = torch.stack([f.reshape(-1), h.reshape(-1), w.reshape(-1)], -1)
    bits = max(1, math.ceil(math.log2(max(F, H, W))))
    return torch.sort(hilbert_index(coords, bits), stable=True).indices


def kmeans(
    x: torch.Tensor, k: int, iters: int = 4, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched k-means (squared L2) on ``x [..., M, D]``: returns ``(labels [..., M] int64, centroids [..., k, D])``.

    Deterministic init: farthest-point traversal over an evenly spaced subsample of at most ``8 k``
    points, starting from the first (or ``init``, e.g. last step's centroids -- the SVG2 warm start).
    Empty clusters keep their previous centroid. Computed in float32.
    """
    xf = x.float()
    M = x.shape[-2]
    k = max(1, min(k, M))
    if init is not None and init.shape[-2] == k and init.shape[:-2] == x.shape[:-2]:
        c = init.float().clone()
    else:
        c = _farthest_point_init(xf, k)
    lead = xf.shape[:-2]
    labels = None
    for _ in range(max(1, iters)):
        labels = _assign(xf, c)
        sums = torch.zeros(*lead, k, x.shape[-1], device=x.device)
        sums.scatter_add_(-2, labels.unsqueeze(-1).expand_as(xf), xf)
        cnt = torch.zeros(*lead, k, device=x.device)
        cnt.scatter_add_(-1, labels, torch.ones_like(labels, dtype=torch.float32))
        c = torch.where(cnt.unsqueeze(-1) > 0, sums / cnt.clamp_min(1).unsqueeze(-1), c)
    return _assign(xf, c), c


_ASSIGN_ELEMS = 1 << 25  # bound on the [..., rows, k] distance chunk (128 MiB fp32)


def _assign(xf: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of every point, in row chunks so the distance matrix stays bounded."""
    M, k = xf.shape[-2], c.shape[-2]
    lead = max(1, xf[..., 0, 0].numel())
    rows = max(1, _ASSIGN_ELEMS // max(1, lead * k))
    c2 = (c * c).sum(-1).unsqueeze(-2)
    out = []
    for r0 in range(0, M, rows):
        d = c2 - 2.0 * (xf[..., r0 : r0 + rows, :] @ c.transpose(-1, -2))
        out.append(d.argmin(-1))
    return torch.cat(out, -1)


def _farthest_point_init(xf: torch.Tensor, k: int) -> torch.Tensor:
    M = xf.shape[-2]
    m = min(M, 8 * k)
    cand = xf.index_select(-2, torch.linspace(0, M - 1, m, device=xf.device).round().long())  # [..., m, D]
    c2 = (cand * cand).sum(-1)  # [..., m]
    chosen = torch.zeros(*xf.shape[:-2], k, dtype=torch.long, device=xf.device)

    def dist_to(i: torch.Tensor) -> torch.Tensor:  # squared distance of every candidate to candidate i
        pt = torch.gather(cand, -2, i[..., None, None].expand(*i.shape, 1, cand.shape[-1]))
        return c2 - 2.0 * (cand @ pt.transpose(-1, -2)).squeeze(-1) + torch.gather(c2, -1, i[..., None])

    dmin = dist_to(chosen[..., 0])
    for i in range(1, k):
        nxt = dmin.argmax(-1)
        chosen[..., i] = nxt
        dmin = torch.minimum(dmin, dist_to(nxt))
    return torch.gather(cand, -2, chosen.unsqueeze(-1).expand(*chosen.shape, cand.shape[-1]))


def cluster_order(
    x: torch.Tensor, num_clusters: int, iters: int = 4, init: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-dependent order: k-means on ``x [B, H, M, D]``, tokens sorted by cluster (stable).

    Returns ``(order [B, H, M] int64, centroids [B, H, k, D], sorted_labels [B, H, M])`` --
    ``sorted_labels[..., i]`` is the cluster of the token at reordered position ``i``.
    """
    labels, c = kmeans(x, num_clusters, iters, init)
    s = torch.sort(labels, dim=-1, stable=True)
    return s.indices, c, s.values


# ---------------------------------------------------------------------------- layout level
def lift(layout: TokenLayout, grid_perm: torch.Tensor, *, grid_first: bool = False) -> Permutation:
    """A :class:`Permutation` over all ``layout.num_tokens`` tokens from a primary-grid order ``[..., F*H*W]``.

    Tokens outside the primary grid stay in place (default). ``grid_first=True`` instead puts the grid
    tokens first and every other token after them in their original order, so that the grid starts on
    a block boundary (the tile and reordered patterns use it: tiles then coincide with blocks even when
    text comes before the video).
    """
    if layout.grid is None:
        raise ValueError(f"{layout} has no video/image grid to permute")
    ng, off, n = layout.grid_len, layout.grid_offset, layout.num_tokens
    if grid_perm.shape[-1] != ng:
        raise ValueError(f"grid order has {grid_perm.shape[-1]} entries but the grid has {ng} tokens")
    lead = grid_perm.shape[:-1]
    dev = grid_perm.device
    if grid_first:
        rest = torch.cat([torch.arange(off, device=dev), torch.arange(off + ng, n, device=dev)])
        full = torch.cat([grid_perm.to(torch.int64) + off, rest.expand(*lead, n - ng)], -1)
    else:
        full = torch.arange(n, device=dev).expand(*lead, n).clone()
        full[..., off : off + ng] = grid_perm.to(torch.int64) + off
    return Permutation.from_perm(full)


def layout_order(
    layout: TokenLayout,
    order: str,
    device=None,
    tile: tuple[int, int, int] | None = None,
    *,
    grid_first: bool = False,
) -> Permutation:
    """Static layout permutation by name: ``"natural"``, ``"frame"``, an axis order, ``"hilbert"`` or ``"tile"``."""
    if layout.grid is None or (order == "natural" and not grid_first):
        return Permutation.identity(layout.num_tokens, device)
    if order == "natural":
        return lift(layout, torch.arange(layout.grid_len, device=device), grid_first=True)
    g = layout.grid
    if order == "hilbert":
        gp = hilbert_order(g, device)
    elif order == "tile":
        if tile is None:
            raise ValueError("order='tile' needs tile=(tf, th, tw)")
        gp = tile_order(g, tile, device)
    else:
        gp = axis_order(g, order, device)
    return lift(layout, gp, grid_first=grid_first)
