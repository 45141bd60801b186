"""Pattern rules as the papers define them (issue 9), each checked against a slow definition written
here with python loops, independent of the fast builders' segment machinery:

* radial ``block_rule="reference"`` -- the radial-attention authors' column-density block rule;
* tile ``window`` -- Sliding Tile Attention's window: ``2 * (w // 2) + 1`` tiles around a centre
  clamped ``w // 2`` tiles from the edges;
* reordered ``sink`` / ``band_frames`` -- Sparse-VideoGen's first-frame sink and bands in frames.
"""

import math

import pytest
import torch

from sparsediff.layout import TokenLayout
from sparsediff.patterns import radial_mask
from sparsediff.specs import HeadSpec


def _grid_tokens(layout):
    """{token index: (f, h, w)} for the primary grid."""
    F, H, W = layout.grid
    off = layout.grid_offset
    return {off + (f * H + h) * W + w: (f, h, w) for f in range(F) for h in range(H) for w in range(W)}


# ---------------------------------------------------------------------------------------------- radial
def _radial_token_pattern(layout, block, decay, sink, dense_dist):
    """Token-level radial pattern of grid token pairs: {(q, k): bool} (the definition in radial.py)."""
    g = _grid_tokens(layout)
    F, H, W = layout.grid
    S_ = H * W
    out = {}
    for qi, (i, hq, wq) in g.items():
        for ki, (j, hk, wk) in g.items():
            d = abs(i - j)
            if d <= dense_dist or (sink and j == 0):
                out[qi, ki] = True
                continue
            L = 2 ** S_.bit_length() / 2 ** d.bit_length()
            r, c = hq * W + wq, hk * W + wk
            if L < block:
                out[qi, ki] = d % int(block / L) == 0 and abs(r - c) <= block
            else:
                out[qi, ki] = abs(r - c) <= max(L * decay, block)
    return out


def _radial_reference_rule(layout, block, decay=1.0, sink=False, dense_dist=1):
    """The authors' block rule, written from its description: for every block pair and every frame
    pair (i, j), take the frame-i query rows and frame-j key columns inside the block pair (only the
    ceil(S/B) blocks from each frame's first block count for the pair); a column is non-empty with >= 1
    kept row, dense with > B/3 kept rows; the frame pair keeps the block when > 60 % of its non-empty
    columns are dense. Non-grid tokens are dense, and so is the block holding the grid's last token
    when the grid does not end on a block boundary."""
    n = layout.num_tokens
    nb = -(-n // block)
    g = _grid_tokens(layout)
    F, H, W = layout.grid
    S_ = H * W
    off = layout.grid_offset
    tok = _radial_token_pattern(layout, block, decay, sink, dense_dist)
    frame = {t: f for t, (f, _, _) in g.items()}
    span = -(-S_ // block)

    def counted(t):  # the token takes part in its frame's pairs
        return t // block - (off + frame[t] * S_) // block < span

    out = [[False] * nb for _ in range(nb)]
    for P in range(nb):
        for Q in range(nb):
            rows = [t for t in range(P * block, min(n, (P + 1) * block)) if t in g and counted(t)]
            cols = [t for t in range(Q * block, min(n, (Q + 1) * block)) if t in g and counted(t)]
            for i in {frame[t] for t in rows}:
                ri = [t for t in rows if frame[t] == i]
                for j in {frame[t] for t in cols}:
                    counts = [sum(tok[r, c] for r in ri) for c in cols if frame[c] == j]
                    nonempty = sum(x >= 1 for x in counts)
                    dense = sum(3 * x > block for x in counts)
                    if nonempty and dense / nonempty > 0.6:
                        out[P][Q] = True
    dense_blocks = {t // block for t in range(n) if t not in g}
    end = off + F * S_
    if end % block:
        dense_blocks.add(end // block)
    for b in dense_blocks:
        for x in range(nb):
            out[b][x] = out[x][b] = True
    return torch.tensor(out, dtype=torch.bool)


RADIAL_LAYOUTS = [
    TokenLayout.video(4, 5, 7, text_len=14, text_position="before"),  # frames spill past ceil(S/B) blocks
    TokenLayout.video(3, 8, 9, text_len=10, text_position="after"),
    TokenLayout.video(9, 4, 4),  # many tiny frames: the frame-skip rule; ragged last block
    TokenLayout.video(6, 4, 8),  # S == 2 B at block 16, nothing ragged
]
RADIAL_CASES = [
    (16, dict(decay=1.0, sink=False, dense_dist=1)),
    (16, dict(decay=0.2, sink=True, dense_dist=1)),
    (32, dict(decay=0.5, sink=False, dense_dist=0)),
]


@pytest.mark.parametrize("layout", RADIAL_LAYOUTS, ids=repr)
@pytest.mark.parametrize("block,params", RADIAL_CASES)
def test_radial_reference_rule_equals_definition(layout, block, params):
    ref = radial_mask(layout, block, block_rule="reference", **params).to_dense()[0, 0]
    assert torch.equal(ref, _radial_reference_rule(layout, block, **params))
    anyr = radial_mask(layout, block, **params).to_dense()[0, 0]
    # the reference rule only drops blocks, except the dense block at a ragged grid end
    F, H, W = layout.grid
    end = layout.grid_offset + F * H * W
    extra = ref & ~anyr
    if end % block:
        extra[end // block, :] = False
        extra[:, end // block] = False
    assert not extra.any()


def test_radial_reference_rule_is_sparser_and_a_spec_parameter():
    lay = TokenLayout.video(11, 30, 52)  # Wan2.1 480p, 41 frames; the authors' mask keeps 0.619 of pairs
    a = radial_mask(lay, 128, sink=True).density()
    r = radial_mask(lay, 128, sink=True, block_rule="reference").density()
    assert a == pytest.approx(0.699, abs=1e-3) and r == pytest.approx(0.619, abs=1e-3)
    spec = HeadSpec.make("radial", sink=True, block_rule="reference")
    from sparsediff.patterns import static_mask

    assert static_mask(lay, spec, 128).density() == pytest.approx(r)
    assert spec.normalized() != HeadSpec.make("radial", sink=True).normalized()  # distinct cache keys
    with pytest.raises(ValueError, match="block_rule"):
        HeadSpec.make("radial", block_rule="majority")
    with pytest.raises(ValueError, match="block_rule"):
        radial_mask(lay, 128, block_rule="majority")


def test_search_candidates_include_the_reference_rule():
    from sparsediff.search.candidates import default_candidates

    cands = default_candidates(TokenLayout.video(4, 8, 8), 64)
    rules = {c.get("block_rule") for c in cands if c.pattern == "radial"}
    assert rules == {"any", "reference"}
    assert math.isfinite(len(cands))


# ---------------------------------------------------------------------------------------------- tile
def _sta_token_mask(grid, tile, window, text_after):
    """STA's mask at token level on the tiled order, written from its definition: token ``t`` (grid
    first, tiles of ``prod(tile)`` tokens in frame-major tile order) is in tile ``t // prod(tile)``; the
    window centre on each axis is the query tile clamped to ``[w//2, n-1-w//2]`` and key tiles within
    ``w//2`` of it are kept (a window wider than the axis keeps it all); text rows / columns dense."""
    nt = [grid[x] // tile[x] for x in range(3)]
    ts = tile[0] * tile[1] * tile[2]
    nv = grid[0] * grid[1] * grid[2]
    n = nv + text_after

    def coords(t):
        i = t // ts
        return (i // (nt[1] * nt[2]), (i // nt[2]) % nt[1], i % nt[2])

    out = torch.zeros(n, n, dtype=torch.bool)
    for q in range(n):
        for k in range(n):
            if q >= nv or k >= nv:
                out[q, k] = True
                continue
            a, b = coords(q), coords(k)
            ok = True
            for x in range(3):
                h = window[x] // 2
                centre = min(max(a[x], h), nt[x] - 1 - h) if 2 * h + 1 <= nt[x] else nt[x] - 1 - h
                ok = ok and abs(centre - b[x]) <= h
            out[q, k] = ok
    return out


@pytest.mark.parametrize(
    "grid,tile,window,text,block",
    [
        ((4, 6, 8), (2, 2, 2), (2, 2, 2), 0, 8),  # even windows: 3 tiles per axis, as STA
        ((4, 6, 8), (2, 2, 2), (1, 3, 4), 5, 8),
        ((4, 6, 8), (2, 3, 2), (3, 2, 5), 7, 4),  # block smaller than a tile; odd windows > axis
        ((6, 4, 4), (2, 2, 2), (2, 4, 1), 0, 16),  # block of two tiles
    ],
)
def test_tile_window_is_sta_window(grid, tile, window, text, block):
    from sparsediff.patterns import tile_mask

    lay = TokenLayout.video(*grid, text_len=text, text_position="after") if text else TokenLayout.video(*grid)
    ours = tile_mask(lay, block, window=window, tile=tile).to_token_mask()[0, 0]
    sta = _sta_token_mask(grid, tile, window, text)
    if (tile[0] * tile[1] * tile[2]) % block == 0:
        assert torch.equal(ours, sta)  # every block inside one tile: 0 token pairs different
    else:
        assert (ours | ~sta).all() and not torch.equal(ours, sta)  # blocks of two tiles: "any" superset


def test_even_tile_window_keeps_odd_count():
    from sparsediff.patterns import tile_mask

    lay = TokenLayout.video(8, 8, 8)
    tile = (2, 2, 2)  # 4 x 4 x 4 tiles, block = tile
    d2 = tile_mask(lay, 8, window=(2, 2, 2), tile=tile).density()
    d3 = tile_mask(lay, 8, window=(3, 3, 3), tile=tile).density()
    d1 = tile_mask(lay, 8, window=(1, 1, 1), tile=tile).density()
    assert d2 == pytest.approx(d3) and d1 == pytest.approx(1 / 64)
    assert tile_mask(lay, 8, window=(4, 4, 4), tile=tile).density() == pytest.approx(1.0)  # 5 > 4 tiles


# ---------------------------------------------------------------------------------------------- reordered
def _svg_temporal_ref(layout, block, band, sink):
    """Sparse-VideoGen's temporal head written from its description: on the position-major order
    (grid first), key ``j`` kept for query ``i`` when ``|i - j| <= band`` or ``j < H*W`` (sink);
    text rows / columns dense; blocks kept when any token pair is."""
    n, ng = layout.num_tokens, layout.grid_len
    _, H, W = layout.grid
    nb = -(-n // block)
    out = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            if i >= ng or j >= ng or abs(i - j) <= band or (sink and j < H * W):
                out[i // block, j // block] = True
    return out


@pytest.mark.parametrize(
    "layout",
    [TokenLayout.video(5, 3, 4, text_len=7, text_position="before"), TokenLayout.video(6, 4, 5)],
    ids=repr,
)
@pytest.mark.parametrize("params", [dict(sink=True), dict(band_frames=1.5, sink=True), dict(band=7)])
def test_reordered_sink_and_band_frames(layout, params):
    from sparsediff.patterns import static_mask

    spec = HeadSpec.make("reordered", order="frame", **params)
    _, H, W = layout.grid
    band = params.get("band", math.ceil(params.get("band_frames", 1.0) * H * W))
    got = static_mask(layout, spec, 8).to_dense()[0, 0]
    assert torch.equal(got, _svg_temporal_ref(layout, 8, band, params.get("sink", False)))


def test_reordered_band_parameters_checked_and_default_is_one_frame():
    from sparsediff.patterns import static_mask

    lay = TokenLayout.video(8, 6, 8)
    one = static_mask(lay, HeadSpec.make("reordered", order="frame"), 16).density()
    assert one == pytest.approx(
        static_mask(lay, HeadSpec.make("reordered", order="frame", band=48), 16).density()
    )
    assert one == pytest.approx(
        static_mask(lay, HeadSpec.make("reordered", order="frame", band_frames=1.0), 16).density()
    )
    assert static_mask(lay, HeadSpec.make("reordered", order="frame", sink=True), 16).density() > one
    with pytest.raises(ValueError, match="not both"):
        HeadSpec.make("reordered", band=10, band_frames=1.0)
    with pytest.raises(ValueError, match="static"):
        HeadSpec.make("reordered", select="topp", sink=True)
    with pytest.raises(ValueError, match="band_frames"):
        HeadSpec.make("reordered", band_frames=-1.0)
