"""Density of our patterns vs the published systems' own definitions, at real model shapes.

For radial attention, Sliding Tile Attention (STA) and Sparse-VideoGen's temporal heads, this script
writes out each system's mask definition (from the papers and the authors' descriptions -- our own code,
no code copied) and compares it with sparsediff's mask at the same shape and settings: the fraction of
blocks / token pairs each keeps, and how many blocks differ.

    python samples/pattern_density.py            # the full table (a few minutes on one CPU thread)
    python samples/pattern_density.py --quick    # Wan 480p only

Densities are fractions of the ``N x N`` query-key pairs computed on real tokens (ragged last blocks
counted by their real size), except where a column says "blocks" (fraction of ``B x B`` blocks, the
unit the radial authors report).

Definitions written out here:

* **radial (authors)** -- per frame pair ``(i, j)`` (``S`` tokens per frame, ``d = |i - j|``): the whole
  pair is kept for ``d <= 1`` and, on Wan, for key frame 0; otherwise ``L = 2^bitlen(S) / 2^bitlen(d)``,
  the band ``|r - c| <= max(L * decay, B)`` in frame-local token indices, and when ``L < B`` only
  frame pairs with ``d % floor(B / L) == 0``. Each frame pair's ``S x S`` token mask is placed on a
  canvas of ``ceil(S / B)`` blocks per side starting at the block holding the frame's first token (at
  its offset in that block; tokens past the canvas dropped), reduced to blocks -- a block is kept when
  more than 60 % of its non-empty key columns have more than ``B / 3`` kept query rows (counts over
  ``B``) -- and OR-ed into the full block mask; blocks from ``floor(N_video / B)`` on (text, padding)
  are dense. The sequence is padded to a multiple of ``B``.
* **STA** -- tokens re-tiled into ``(6, 8, 8)`` tiles (one tile = 384 tokens, contiguous); a query tile
  at tile coordinates ``a`` keeps key tile ``k`` when on every axis ``|clamp(a, w//2, n-1-w//2) - k| <=
  w//2`` (``n`` tiles on the axis, window ``w`` tiles); text rows and columns dense. Defined on
  canvases that divide into tiles; on other grids we pad the grid to whole tiles (the padded tokens
  are computed, so the compute is measured over the padded canvas, relative to the real ``N^2``).
* **Sparse-VideoGen temporal head** -- the grid permuted position-major (each spatial position's frames
  adjacent), then key ``j`` kept for query ``i`` when ``|i - j| <= roundup(m * S, 128)`` or ``j < S``
  (the first ``S`` keys of the permuted order: a sink), ``m`` the band in frames from their sparsity
  setting: ``m = F * (1 - sqrt(1 - s))`` with ``s`` = 0.3 (Wan) / 0.25 (HunyuanVideo), no text.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from sparsediff.layout import TokenLayout
from sparsediff.patterns import static_mask
from sparsediff.patterns.common import block_token_counts, cdiv
from sparsediff.specs import HeadSpec

SHAPES = {  # name: (grid F, H, W, text tokens after the video, radial model variant)
    "Wan2.1 480p 81f": ((21, 30, 52), 0, "wan"),
    "Wan2.1 480p 41f": ((11, 30, 52), 0, "wan"),
    "Wan2.1 720p 81f": ((21, 45, 80), 0, "wan"),
    "HunyuanVideo 720p 129f": ((33, 45, 80), 256, "hunyuan"),
    "FastVideo 18x48x80": ((18, 48, 80), 0, "wan"),
    "FastVideo 30x48x80 +256": ((30, 48, 80), 256, "hunyuan"),
}
STA_TILE = (6, 8, 8)
#: Published STA windows (in tiles): FastVideo's HunyuanVideo mask strategy uses (5,6,10) (full),
#: (5,3,3), (1,6,10), (3,3,5), (5,1,10), (5,6,1); their Wan full window is (3,6,10); even windows as
#: in the issue's examples.
STA_WINDOWS = [(3, 3, 5), (5, 3, 3), (1, 6, 10), (3, 6, 10), (2, 2, 2), (3, 4, 4)]


def _pairs_density(bb: torch.Tensor, n: int, block: int) -> float:
    c = block_token_counts(n, block).double()
    return float(torch.einsum("qk,q,k->", bb.double(), c, c)) / float(n * n)


# ------------------------------------------------------------------------------------------ radial
def radial_authors(grid, text, block, decay, model) -> torch.Tensor:
    """Block bool of the authors' radial definition (see the module docstring), padded to blocks."""
    F, H, W = grid
    S = H * W
    nv = F * S
    nb = cdiv(nv + text, block)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    border = nv // block
    out[border:] = True
    out[:, border:] = True
    k = cdiv(S, block)
    idx = torch.arange(S)
    diff = (idx.view(1, -1) - idx.view(-1, 1)).abs()
    prefix: dict = {}  # rule -> [S + 1, S] kept rows above each row, per column (frame-local)
    cache: dict = {}

    def frame_pair(i, j):
        d = abs(i - j)
        if (model == "wan" and j == 0) or d <= 1:
            rule = ("full",)
        else:
            L = 2 ** S.bit_length() / 2 ** d.bit_length()
            if L < block and d % int(block / L) != 0:
                return None
            rule = ("band", max(L * decay, block))
        rr, rc = (i * S) % block, (j * S) % block
        key = (rule, rr, rc)
        if key not in cache:
            if rule not in prefix:
                local = torch.ones(S, S, dtype=torch.bool) if rule == ("full",) else diff <= rule[1]
                prefix[rule] = torch.cat(
                    [torch.zeros(1, S, dtype=torch.int32), local.int().cumsum(0, dtype=torch.int32)]
                )
            pre = prefix[rule]
            # the canvas holds the pair's S x S mask at offset (rr, rc), cut to k x k blocks
            starts = (torch.arange(k) * block - rr).clamp(0, S)
            ends = (torch.arange(1, k + 1) * block - rr).clamp(0, S)
            counts = pre[ends] - pre[starts]  # [k, S] kept rows per (row block, column)
            col = torch.arange(S) + rc
            inside = col < k * block
            qb = col[inside] // block
            counts = counts[:, inside]
            nonempty = torch.zeros(k, k).index_add_(1, qb, (counts > 0).float())
            dense = torch.zeros(k, k).index_add_(1, qb, (counts * 3 > block).float())
            cache[key] = dense / (nonempty + 1e-9) > 0.6
        return cache[key]

    for i in range(F):
        for j in range(F):
            m = frame_pair(i, j)
            if m is None:
                continue
            r0, c0 = (i * S) // block, (j * S) // block
            r1, c1 = min(nb, r0 + k), min(nb, c0 + k)
            out[r0:r1, c0:c1] |= m[: r1 - r0, : c1 - c0]
    return out


def radial_rows(name, grid, text, model, block=128) -> list[str]:
    lay = TokenLayout.video(*grid, text_len=text, text_position="after") if text else TokenLayout.video(*grid)
    n = lay.num_tokens
    rows = []
    for decay in (1.0, 0.2) if model == "wan" else (1.0, 0.95):
        ref = radial_authors(grid, text, block, decay, model)
        sink = model == "wan"
        ours = {}
        for rule in ("any", "reference"):
            spec = HeadSpec.make("radial", decay=decay, sink=sink, block_rule=rule)
            ours[rule] = static_mask(lay, spec, block).to_dense()[0, 0]
        diff = int((ours["reference"] != ref).sum())
        rows.append(
            f"| {name} | radial decay {decay:g}{' sink' if sink else ''}, B={block} "
            f"| {ours['any'].float().mean():.3f} / {_pairs_density(ours['any'], n, block):.3f} "
            f"| {ours['reference'].float().mean():.3f} / {_pairs_density(ours['reference'], n, block):.3f} "
            f"| {ref.float().mean():.3f} | {diff} |"
        )
    return rows


# ------------------------------------------------------------------------------------------ tile (STA)
def sta_tiles(ntiles, window) -> torch.Tensor:
    """Tile-pair bool ``[T, T]`` of STA's window rule (frame-major tile order)."""
    nt = ntiles
    coords = torch.stack(torch.meshgrid(*[torch.arange(x) for x in nt], indexing="ij"), -1).reshape(
        -1, 3
    )  # [T, 3]
    keep = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool)
    for ax in range(3):
        h = window[ax] // 2
        centre = coords[:, ax].clamp(h, nt[ax] - 1 - h) if 2 * h + 1 <= nt[ax] else None
        if centre is None:  # window wider than the axis: torch's clamp(min > max) gives max
            centre = torch.full_like(coords[:, ax], nt[ax] - 1 - h)
        keep &= (centre.view(-1, 1) - coords[:, ax].view(1, -1)).abs() <= h
    return keep


def tile_rows(name, grid, text, block=128) -> list[str]:
    lay = TokenLayout.video(*grid, text_len=text, text_position="after") if text else TokenLayout.video(*grid)
    n, nv = lay.num_tokens, lay.grid_len
    tsize = math.prod(STA_TILE)
    ntiles = tuple(cdiv(grid[a], STA_TILE[a]) for a in range(3))
    exact = all(grid[a] % STA_TILE[a] == 0 for a in range(3))
    rows = []
    for w in STA_WINDOWS:
        if any(w[a] > ntiles[a] for a in range(3)) and w != (3, 6, 10):
            continue
        keep = sta_tiles(ntiles, w)
        kept = float(keep.sum()) * tsize * tsize  # padded grid x padded grid
        nvp = math.prod(ntiles) * tsize
        kept += 2.0 * nvp * text + text * text  # text rows / columns dense
        sta = kept / (n * n)
        m = static_mask(lay, HeadSpec.make("tile", window=w, tile=STA_TILE), block)
        ours = m.density()
        same = "n/a (grid pads to tiles)"
        if exact:
            # at block = tile size, every block is one tile: compare tile pairs exactly
            mt = static_mask(lay, HeadSpec.make("tile", window=w, tile=STA_TILE), tsize).to_dense()[0, 0]
            tpairs = mt[: nv // tsize, : nv // tsize]
            same = str(int((tpairs != keep).sum()) * tsize * tsize)
        old = "-"  # on a canvas (grid divides into tiles) our mask is the tile-pair mask itself
        if exact:
            old_kept = float(_old_tiles(ntiles, w).sum()) * tsize * tsize + 2.0 * nvp * text + text * text
            old = f"{old_kept / (n * n):.3f}"
        rows.append(
            f"| {name} | tile {w}, tile {STA_TILE}, B={block} | {ours:.3f} | {old} | {sta:.3f} | {same} |"
        )
    return rows


def _old_tiles(ntiles, window) -> torch.Tensor:
    """Tile-pair bool of our window rule before issue 9: exactly ``w`` tiles per axis (clipped to the
    axis) starting at ``clamp(a - w // 2, 0, n - w)`` -- differs from STA for even ``w`` only."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(x) for x in ntiles], indexing="ij"), -1).reshape(-1, 3)
    keep = torch.ones(coords.shape[0], coords.shape[0], dtype=torch.bool)
    for ax in range(3):
        n, w = ntiles[ax], max(1, min(window[ax], ntiles[ax]))
        s0 = (coords[:, ax] - w // 2).clamp(0, n - w).view(-1, 1)
        k = coords[:, ax].view(1, -1)
        keep &= (k >= s0) & (k < s0 + w)
    return keep


# ------------------------------------------------------------------------------------------ reordered
def svg_band_frames(sparsity: float, frames: int) -> float:
    """Sparse-VideoGen's band width in frames for a target density (no text): ``F (1 - sqrt(1 - s))``."""
    return frames * (1 - math.sqrt(1 - sparsity))


def svg_temporal(lay: TokenLayout, band_frames: float, block: int) -> torch.Tensor:
    """Block bool ("any pair") of SVG's temporal mask on the position-major order, text dense."""
    F, H, W = lay.grid
    S = H * W
    n, ng = lay.num_tokens, lay.grid_len
    band = cdiv(int(math.ceil(band_frames * S)), 128) * 128
    nb = cdiv(n, block)
    lo = torch.arange(nb) * block
    hi = torch.clamp(lo + block - 1, max=n - 1)
    keep = (lo.view(1, -1) <= hi.view(-1, 1) + band) & (hi.view(1, -1) >= lo.view(-1, 1) - band)
    keep |= (lo < S).view(1, -1)  # sink keys
    dense = hi >= ng
    return keep | dense.view(-1, 1) | dense.view(1, -1)


def reordered_rows(name, grid, text, model, block=128) -> list[str]:
    lay = TokenLayout.video(*grid, text_len=text, text_position="after") if text else TokenLayout.video(*grid)
    n = lay.num_tokens
    s = 0.3 if model == "wan" else 0.25
    m = svg_band_frames(s, grid[0])
    svg = svg_temporal(lay, m, block)
    rows = []
    for label, spec in [
        ("default", HeadSpec.make("reordered", order="frame")),
        (f"band_frames={m:.2f}, sink", HeadSpec.make("reordered", order="frame", band_frames=m, sink=True)),
        ("band=64 (old default)", HeadSpec.make("reordered", order="frame", band=64)),
    ]:
        ours = static_mask(lay, spec, block).to_dense()[0, 0]
        rows.append(
            f"| {name} | reordered frame {label}, B={block} | {_pairs_density(ours, n, block):.3f} "
            f"| {_pairs_density(svg, n, block):.3f} (s={s}) | {int((ours != svg).sum())} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Wan 480p only")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {k: v for k, v in SHAPES.items() if not args.quick or k.startswith("Wan2.1 480p 81")}
    t0 = time.time()
    print("### radial: ours (block_rule any / reference) vs the authors' definition\n")
    print(
        "| shape | setting | any: blocks / pairs | reference: blocks / pairs | authors: blocks | blocks differing (reference vs authors) |"
    )
    print("|---|---|---|---|---|---|")
    for name, (grid, text, model) in shapes.items():
        for r in radial_rows(name, grid, text, model):
            print(r, flush=True)
    print("\n### tile: ours (STA window semantics) vs STA (compute on real tokens, fraction of N^2)\n")
    print(
        "| shape | setting | ours | ours before issue 9 (exactly w tiles; canvases only) | STA (padded canvas) | token pairs differing |"
    )
    print("|---|---|---|---|---|---|")
    for name, (grid, text, _) in shapes.items():
        for r in tile_rows(name, grid, text):
            print(r, flush=True)
    print("\n### reordered (position-major 'frame' order) vs Sparse-VideoGen's temporal head\n")
    print("| shape | setting | ours | SVG | blocks differing |")
    print("|---|---|---|---|---|")
    for name, (grid, text, model) in shapes.items():
        for r in reordered_rows(name, grid, text, model):
            print(r, flush=True)
    print(f"\n({time.time() - t0:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} thread(s))")


if __name__ == "__main__":
    main()
