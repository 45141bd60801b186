"""Token-reordered block-sparse attention: a per-head permutation, then block selection.

Orders (``order=``): ``"frame"`` (position-major: a spatial position's frames adjacent -- temporal
heads), the six axis orders ``"fhw" ... "whf"`` (PARO), ``"hilbert"`` (3D Hilbert curve), all static;
and ``"cluster"`` (data dependent: k-means on the grid keys and, separately, on the grid queries, tokens
sorted by cluster -- SVG2-style; centroids warm-started from the previous call when a state is given).
Every order is grid-first (:func:`sparsediff.permute.lift` with ``grid_first=True``): grid tokens at
positions ``[0, F*H*W)``, text after them.

Selection (``select=``):
* ``"static"``: token-level band ``|i - j| <= band`` on reordered *positions* of grid tokens
  (non-grid tokens dense), reduced to blocks with the "any pair" rule. The band is given in tokens
  (``band``) or relative to the layout in frames (``band_frames``: ``ceil(band_frames * H * W)`` tokens),
  default one frame, ``H * W`` tokens (:func:`reordered_band`). On the ``"frame"`` (position-major) order
  a band of ``m`` frames lets a query see every frame of the ``~2 m H W / F`` nearest spatial positions
  (density ``~2 m / F``), as Sparse-VideoGen's temporal heads. ``sink=True`` also keeps the first
  ``H * W`` keys of the reordered order for every query, as Sparse-VideoGen does. Independent of the data, so it is
  cached even for ``order="cluster"`` (only the permutation changes per call).
* ``"topp"``: dynamic. For the static orders: mean-pooled block scores on the reordered q/k
  (:func:`sparsediff.patterns.topp.topp_block_bool`). For ``order="cluster"`` the selection is made
  on *clusters* (SVG2): ``p = softmax_j(scale * c_q[i] · c_k[j] + log |key cluster j|)`` per query
  cluster ``i``, key clusters kept up to cumulative ``top_p`` (at least ``ceil(min_frac * Kc)``), then a
  block pair is kept when any (query cluster in the query block, key cluster in the key block) pair is
  kept -- block pooling would mix clusters that share a block and lose mass.
"""

from __future__ import annotations

import math

import torch

from ..layout import TokenLayout
from ..mask import BlockSparseMask
from ..permute import AXIS_ORDERS, Permutation, cluster_order, gather_tokens, layout_order, lift
from . import params
from .common import (
    apply_dense_tokens,
    cdiv,
    dense_token_blocks,
    mask_from_bool,
    min_count,
    reduce_segment_pairs,
    segments,
    select_cumulative,
)
from .registry import GroupWork, builtin_family, static_group
from .specs import HeadSpec
from .topp import topp_block_bool

__all__ = [
    "REORDER_ORDERS",
    "REORDER_SELECTS",
    "MAX_CLUSTERS",
    "cluster_count",
    "reordered_permutation",
    "reordered_band",
    "band_mask",
    "cluster_permutations",
    "cluster_topp_block_bool",
]

#: Orders of ``reordered`` heads.
REORDER_ORDERS = ("frame", *AXIS_ORDERS, "hilbert", "cluster")
#: Block selections of ``reordered`` heads.
REORDER_SELECTS = ("static", "topp")
#: Most k-means clusters a ``reordered(order="cluster")`` head may ask for (and the most the default gives).
MAX_CLUSTERS = 512
#: Orders that put a spatial position's frames next to each other (temporal heads).
POSITION_MAJOR_ORDERS = ("frame", "hwf", "whf")


def cluster_count(clusters: int, grid_len: int, block_size: int) -> int:
    """k-means clusters of an ``order="cluster"`` head: ``clusters`` when given (> 0), else one per block of
    the grid (``ceil(grid_len / block_size)``), at least 1 and at most :data:`MAX_CLUSTERS`. The one rule
    the op, the search and the cost model use."""
    return int(clusters) or min(MAX_CLUSTERS, max(1, cdiv(grid_len, block_size)))


def reordered_band(layout: TokenLayout, band: int | None = None, band_frames: float | None = None) -> int:
    """Band half-width in tokens: ``band`` when given, else ``ceil(band_frames * H * W)``, else one frame
    (``H * W`` tokens of the primary grid)."""
    if band is not None and band_frames is not None:
        raise ValueError("give the band either in tokens (band) or in frames (band_frames), not both")
    if band is not None:
        return int(band)
    if layout.grid is None:
        raise ValueError(f"a band in frames needs a layout with a video/image grid, got {layout}")
    _, h, w = layout.grid
    return int(math.ceil((1.0 if band_frames is None else float(band_frames)) * h * w - 1e-9))


def reordered_permutation(layout: TokenLayout, order: str, device=None) -> Permutation:
    """Static grid-first permutation for ``order`` in ``"frame"``, axis orders, ``"hilbert"``."""
    if order == "cluster":
        raise ValueError("order='cluster' is data dependent: use cluster_permutations(q, k, ...)")
    if order not in ("frame", *AXIS_ORDERS, "hilbert"):
        raise ValueError(
            f"unknown reordered order {order!r}; the orders are 'frame', the axis orders {AXIS_ORDERS}, "
            "'hilbert' and 'cluster' (data dependent: cluster_permutations)"
        )
    return layout_order(layout, order, device, grid_first=True)


def band_mask(
    layout: TokenLayout, block_size: int = 64, *, band: int = 64, sink: bool = False, device=None
) -> BlockSparseMask:
    """``[1, 1, Qb, Kb]`` band ``|i - j| <= band`` on grid-first reordered positions (non-grid dense);
    ``sink``: keys at positions ``< H * W`` (the first frame's worth of the reordered grid) kept too."""
    n = layout.num_tokens
    nb = cdiv(n, block_size)
    ng = layout.grid_len
    pos = torch.arange(n, device=device)
    groups = torch.where(pos < ng, torch.zeros_like(pos), torch.full_like(pos, -1))
    seg = segments(groups, block_size)
    lo, hi = seg.lo, seg.hi
    keep = (lo.unsqueeze(0) <= hi.unsqueeze(1) + band) & (hi.unsqueeze(0) >= lo.unsqueeze(1) - band)
    if sink and layout.grid is not None:
        keep = keep | (lo < layout.grid[1] * layout.grid[2]).unsqueeze(0)
    return mask_from_bool(reduce_segment_pairs(seg, seg, keep, nb, nb), block_size, n)


def cluster_permutations(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    num_clusters: int,
    iters: int = 4,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Permutation, Permutation, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """k-means orders for queries and keys ``[B, H, N, D]`` (grid tokens only, grid-first).

    Returns ``(perm_q, perm_k, (centroids_q, centroids_k), (labels_q, labels_k))``; permutations are
    ``[B, H, N]``; labels ``[B, H, F*H*W]`` give the cluster at each reordered grid position.
    """
    off, ng = layout.grid_offset, layout.grid_len
    gq = q[:, :, off : off + ng]
    gk = k[:, :, off : off + ng]
    oq, cq, lq = cluster_order(gq, num_clusters, iters, None if init is None else init[0])
    ok, ck, lk = cluster_order(gk, num_clusters, iters, None if init is None else init[1])
    return lift(layout, oq, grid_first=True), lift(layout, ok, grid_first=True), (cq, ck), (lq, lk)


def _cluster_hist(labels: torch.Tensor, num_clusters: int, n: int, block: int) -> torch.Tensor:
    """``[B, H, Nb, K]`` float: does reordered block ``b`` hold a token of cluster ``c`` (grid-first)."""
    B, H, ng = labels.shape
    nb = cdiv(n, block)
    blk = torch.arange(ng, device=labels.device) // block
    hist = torch.zeros(B, H, nb * num_clusters, device=labels.device)
    hist.scatter_add_(-1, blk * num_clusters + labels, torch.ones_like(labels, dtype=torch.float32))
    return (hist.view(B, H, nb, num_clusters) > 0).float()


def cluster_topp_block_bool(
    centroids: tuple[torch.Tensor, torch.Tensor],
    labels: tuple[torch.Tensor, torch.Tensor],
    layout: TokenLayout,
    block_size: int,
    *,
    top_p: float = 0.9,
    min_frac: float = 0.05,
    scale: float,
) -> torch.Tensor:
    """Cluster-level top-p selection reduced to ``[B, H, Nb, Nb]`` block bools (see module docstring)."""
    cq, ck = centroids
    lq, lk = labels
    n, ng = layout.num_tokens, layout.grid_len
    kq, kk = cq.shape[-2], ck.shape[-2]
    size_k = torch.zeros(*lk.shape[:2], kk, device=lk.device)
    size_k.scatter_add_(-1, lk, torch.ones_like(lk, dtype=torch.float32))
    logits = (cq.float() @ ck.float().transpose(-1, -2)) * scale + torch.log(
        size_k.clamp_min(1e-30)
    ).unsqueeze(-2)
    p = torch.softmax(logits, -1)
    keepc = select_cumulative(p, top_p, min_count(min_frac, kk)).float()  # [B, H, Kq, Kk]
    hq = _cluster_hist(lq, kq, n, block_size)
    hk = _cluster_hist(lk, kk, n, block_size)
    bb = (hq @ keepc @ hk.transpose(-1, -2)) > 0
    dense_tok = torch.arange(n, device=bb.device) >= ng
    return apply_dense_tokens(bb, dense_token_blocks(dense_tok, block_size))


# ---------------------------------------------------------------------- the family (see registry.py)
def _check(spec) -> None:
    if spec.get("band") is not None and spec.get("band_frames") is not None:
        raise ValueError(
            f"{spec!r}: give the band either in tokens (band) or in frames (band_frames), not both"
        )
    if spec.get("sink") and spec.get("select") != "static":
        raise ValueError(f"{spec!r}: sink=True applies to select='static' bands only")


def _kind(spec) -> str:
    return "static" if spec.get("select") == "static" and spec.get("order") != "cluster" else "dynamic"


def _static(layout: TokenLayout, spec, block_size: int, device=None) -> BlockSparseMask:
    if spec.get("select") != "static":
        raise ValueError(f"{spec} has no static mask (select={spec.get('select')!r})")
    band = reordered_band(layout, spec.get("band"), spec.get("band_frames"))
    return band_mask(layout, block_size, band=band, sink=bool(spec.get("sink")), device=device)


def _cluster_orders(call, spec, heads):
    """k-means orders of the group (warm-started from the family's slot of the layer state when there is
    one; without a state, shared by the call's groups with the same clusters / iterations / heads)."""
    layout, hl = call.layout, list(heads)
    ncl = cluster_count(spec.get("clusters"), layout.grid_len, call.block_size)
    iters = int(spec.get("kmeans_iters"))
    state = call.state
    if state is None:
        return call.memoized(
            ("reordered.cluster", ncl, iters, tuple(heads)),
            lambda: cluster_permutations(call.q[:, hl], call.k[:, hl], layout, ncl, iters, None),
        )
    centroids = state.family_state("reordered")  # {(spec, heads): (centroids_q, centroids_k)}
    ckey = (spec, tuple(heads))
    res = cluster_permutations(call.q[:, hl], call.k[:, hl], layout, ncl, iters, centroids.get(ckey))
    centroids[ckey] = res[2]
    return res


def _build_group(call, spec, heads):
    layout, bs, dev, n = call.layout, call.block_size, call.device, call.num_tokens
    order, select = spec.get("order"), spec.get("select")
    if layout.grid is None:
        raise ValueError(f"{spec} needs a layout with a video/image grid, got {layout}")
    hl = list(heads)
    if order == "cluster":
        pq, pk, cents, labels = _cluster_orders(call, spec, heads)
    else:
        pq = pk = call.cached(
            ("perm", layout, order, str(dev)), lambda: reordered_permutation(layout, order, dev)
        )
    if select == "static":
        work = static_group(call, spec, heads, lambda: _static(layout, spec, bs, dev), pq)
        work.perm_k = pk
        return work
    top_p, min_frac = float(spec.get("top_p")), float(spec.get("min_frac"))
    if order == "cluster":
        bb = cluster_topp_block_bool(
            cents, labels, layout, bs, top_p=top_p, min_frac=min_frac, scale=call.scale
        )
    else:
        qp = gather_tokens(call.q[:, hl], pq.perm)
        kp = gather_tokens(call.k[:, hl], pk.perm)
        bb = topp_block_bool(
            qp, kp, call.dense_tokens_grid_first(), bs, top_p=top_p, min_frac=min_frac, scale=call.scale
        )
    return GroupWork(mask=BlockSparseMask.from_dense(bb, bs, (n, n)), perm_q=pq, perm_k=pk)


# ---------------------------------------------------------------------- search (see registry.py)
def _order_bands(layout: TokenLayout, order: str, block_size: int) -> list[int]:
    """Bands for a static reordered order: multiples of the token period of the order's inner axes
    (``"fhw"``: one row ``W`` and one frame ``H*W`` = tokens per frame; ``"frame"`` = ``hwf``: ``F`` frames
    of one position, ``W*F``...), plus block multiples for the Hilbert curve."""
    F, H, W = layout.grid
    n = layout.grid_len
    size = {"f": F, "h": H, "w": W}
    ax = "hwf" if order == "frame" else order
    if order == "hilbert":
        bands = [block_size, 2 * block_size, 4 * block_size, 8 * block_size]
    else:
        inner, inner2 = size[ax[2]], size[ax[1]] * size[ax[2]]
        bands = [inner, 2 * inner, inner2 // 2, inner2]
    return sorted({int(b) for b in bands if 1 <= b < n})


def _candidates(layout: TokenLayout, block_size: int) -> list[HeadSpec]:
    """Static: ``"frame"`` (position-major), the axis orders that differ from the natural and frame orders,
    ``"hilbert"``; bands in multiples of each order's inner period (tokens per frame, rows, frames per
    position) -- orders whose permutation equals an earlier one are dropped; the ``"frame"`` order also with
    Sparse-VideoGen's sink (first ``H*W`` reordered keys kept). Top-p on the frame and Hilbert orders;
    ``order="cluster"`` top-p 0.9 / 0.95 / 0.98 (grids of at least two blocks)."""
    grid = layout.grid
    if grid is None:
        return []
    out = []
    seen: list[torch.Tensor] = [reordered_permutation(layout, "fhw").perm]  # natural (grid first)
    orders = []
    for order in ("frame", *AXIS_ORDERS, "hilbert"):
        p = reordered_permutation(layout, order).perm
        if any(torch.equal(p, s) for s in seen):
            continue
        seen.append(p)
        orders.append(order)
    for order in orders:
        for band in _order_bands(layout, order, block_size):
            out.append(HeadSpec.make("reordered", order=order, band=band))
            if order == "frame" and grid[0] > 2:
                out.append(HeadSpec.make("reordered", order=order, band=band, sink=True))
    for order in [o for o in ("frame", "hilbert") if o in orders]:
        for tp in (0.9, 0.95):
            out.append(HeadSpec.make("reordered", order=order, select="topp", top_p=tp, min_frac=0.0))
    if layout.grid_len >= 2 * block_size:
        for tp in (0.9, 0.95, 0.98):
            out.append(HeadSpec.make("reordered", order="cluster", select="topp", top_p=tp, min_frac=0.0))
    return out


def _cost(model, spec, density: float, layout: TokenLayout) -> float:
    """The blocks and the gathers/scatters of the order; top-p: the pooled selection; clusters: k-means on
    q and k (its iterations, the final assignment and the init)."""
    t = model.block_cost(density, layout) + model.permute_cost(layout)
    if spec.get("select") == "topp":
        t += model.pooled_selection_cost(layout)
    if spec.get("order") == "cluster":
        ncl = cluster_count(spec.get("clusters"), layout.grid_len, model.block_size)
        t += model.kmeans_cost(layout, ncl, int(spec.get("kmeans_iters")) + 2)
    return t


def _label(spec) -> str:
    """``"cluster"`` for ``order="cluster"`` heads, else ``"reordered"``."""
    return "cluster" if spec.get("order") == "cluster" else "reordered"


def _planted(kind: str, spec, layout: TokenLayout, block_size: int) -> bool:
    """``local``: a static band on a grid order (consecutive positions of any axis order are
    spatio-temporal neighbours); ``temporal``: a position-major order; ``cluster`` and ``stripe``
    (k-means puts the sinks in one key cluster): ``order="cluster"``."""
    order = spec.get("order")
    if kind == "local":
        return order != "cluster" and spec.get("select") == "static"
    if kind == "temporal":
        return order in POSITION_MAJOR_ORDERS
    if kind in ("cluster", "stripe"):
        return order == "cluster"
    return False


FAMILY = builtin_family(
    "reordered",
    params={
        "order": "frame",
        "select": "static",
        "band": None,
        "band_frames": None,
        "sink": False,
        "top_p": 0.9,
        "min_frac": 0.05,
        "clusters": 0,
        "kmeans_iters": 4,
    },
    checks={
        "order": params.one_of(REORDER_ORDERS),
        "select": params.one_of(REORDER_SELECTS),
        "band": ((lambda v: v is None or (params.is_int(v) and v >= 0)), "None or an int >= 0 (tokens)"),
        "band_frames": (
            (lambda v: v is None or (params.is_real(v) and v >= 0)),
            "None or a finite number >= 0 (frames of H*W tokens)",
        ),
        "sink": params.boolean(),
        "top_p": params.frac(True),
        "min_frac": params.frac(False),
        "clusters": (
            (lambda v: params.is_int(v) and 0 <= v <= MAX_CLUSTERS),
            f"an int in [0, {MAX_CLUSTERS}] (0 = one cluster per block)",
        ),
        "kmeans_iters": params.int_ge(1),
    },
    kind=_kind,
    check=_check,
    doc="per-head token permutation (order) + block selection (select: static band / dynamic top-p)",
    static_mask=_static,
    build_group=_build_group,
    candidates=_candidates,
    cost=_cost,
    label=_label,
    planted=_planted,
    needs_grid=True,
    remainder=True,
)
