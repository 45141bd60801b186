"""Static patterns == slow token-level references of their definitions (exact), on odd grids; dynamic
selection helpers against python loops; mask caching keys.

Each reference builds the token-level N x N mask with python loops straight from the definition in the
pattern's module docstring, moves it to the pattern's (permuted) order, and block-reduces it with the
"any pair" rule -- independent of the segment machinery of the fast builders.
"""

import math

import pytest
import torch

from sparsediff.layout import Segment, TokenLayout
from sparsediff.mask import BlockSparseMask
from sparsediff.patterns import band_mask, default_tile, radial_mask, static_mask, tile_mask, tile_permutation
from sparsediff.patterns.common import select_cumulative
from sparsediff.patterns.reordered import reordered_permutation
from sparsediff.patterns.topp import topp_block_bool
from sparsediff.specs import HeadSpec

LAYOUTS = [
    TokenLayout.video(5, 7, 11, text_len=13, text_position="before"),
    TokenLayout.video(3, 16, 9, text_len=10, text_position="after"),
    TokenLayout.video(9, 4, 4),  # many frames, tiny frames: exercises the radial frame-skip rule
    TokenLayout.image(6, 10, text_len=5),
    TokenLayout.video(2, 5, 6, text_len=4).append(Segment.image_grid(3, 4)),  # extra reference image
]


def _grid_tokens(layout):
    """{token index: (f, h, w)} for the primary grid."""
    F, H, W = layout.grid
    off = layout.grid_offset
    return {off + (f * H + h) * W + w: (f, h, w) for f in range(F) for h in range(H) for w in range(W)}


def _block_reduce(tok, block: int) -> torch.Tensor:
    """``tok``: python list of lists of bools (token level) -> block bool tensor, "any pair" rule."""
    n = len(tok)
    nb = -(-n // block)
    out = [[False] * nb for _ in range(nb)]
    for i in range(n):
        row = out[i // block]
        for j in range(n):
            if tok[i][j]:
                row[j // block] = True
    return torch.tensor(out, dtype=torch.bool)


def _permute(tok, perm):
    p = perm.tolist()
    return [[tok[a][b] for b in p] for a in p]


def _radial_ref(layout, block, decay, sink, dense_dist):
    n = layout.num_tokens
    g = _grid_tokens(layout)
    F, H, W = layout.grid
    S = H * W
    tok = [[False] * n for _ in range(n)]
    for qi in range(n):
        for ki in range(n):
            if qi not in g or ki not in g:
                tok[qi][ki] = True
                continue
            (i, hq, wq), (j, hk, wk) = g[qi], g[ki]
            r, c = hq * W + wq, hk * W + wk
            d = abs(i - j)
            if d <= dense_dist or (sink and j == 0):
                tok[qi][ki] = True
                continue
            L = 2 ** S.bit_length() / 2 ** d.bit_length()
            if L < block:
                keep = d % int(block / L) == 0 and abs(r - c) <= block
            else:
                keep = abs(r - c) <= math.floor(max(L * decay, block))
            tok[qi][ki] = keep
    return _block_reduce(tok, block)


def _tile_ref(layout, block, window, tile):
    n = layout.num_tokens
    g = _grid_tokens(layout)
    F, H, W = layout.grid
    nt = [-(-F // tile[0]), -(-H // tile[1]), -(-W // tile[2])]
    tok = [[False] * n for _ in range(n)]
    tc = {t: [c[x] // tile[x] for x in range(3)] for t, c in g.items()}
    for qi in range(n):
        for ki in range(n):
            if qi not in g or ki not in g:
                tok[qi][ki] = True
                continue
            a, b = tc[qi], tc[ki]
            ok = True
            for x in range(3):  # STA: centre clamped w//2 tiles from the edges, keep |centre - k| <= w//2
                h = window[x] // 2
                if 2 * h + 1 <= nt[x]:
                    ok = ok and abs(min(max(a[x], h), nt[x] - 1 - h) - b[x]) <= h
            tok[qi][ki] = ok
    perm = tile_permutation(layout, tile).perm
    return _block_reduce(_permute(tok, perm), block)


def _band_ref(layout, block, band):
    n, ng = layout.num_tokens, layout.grid_len
    tok = [[False] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            tok[i][j] = i >= ng or j >= ng or abs(i - j) <= band
    return _block_reduce(tok, block)


RADIAL_PARAMS = [dict(decay=1.0, sink=False, dense_dist=1), dict(decay=0.3, sink=True, dense_dist=0)]
RADIAL_QUICK = [(16, RADIAL_PARAMS[0]), (32, RADIAL_PARAMS[1])]
RADIAL_FULL = [(b, p) for b in (16, 32) for p in RADIAL_PARAMS if (b, p) not in RADIAL_QUICK]
TILE_CASES = [
    (16, (3, 3, 3), None),
    (32, (1, 2, 5), (2, 3, 4)),
    (16, (2, 1, 1), (1, 4, 4)),
    (32, (3, 3, 3), None),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@pytest.mark.parametrize(
    "block,params", RADIAL_QUICK + [pytest.param(*c, marks=pytest.mark.slow) for c in RADIAL_FULL]
)
def test_radial_equals_token_reference(layout, block, params):
    fast = radial_mask(layout, block, **params).to_dense()[0, 0]
    assert torch.equal(fast, _radial_ref(layout, block, **params))


@pytest.mark.parametrize("layout", LAYOUTS, ids=repr)
@pytest.mark.parametrize(
    "block,window,tile", TILE_CASES[:2] + [pytest.param(*c, marks=pytest.mark.slow) for c in TILE_CASES[2:]]
)
def test_tile_equals_token_reference(layout, block, window, tile):
    t = tile or default_tile(layout.grid, block)
    fast = tile_mask(layout, block, window=window, tile=t).to_dense()[0, 0]
    assert torch.equal(fast, _tile_ref(layout, block, window, t))


@pytest.mark.parametrize("layout", LAYOUTS[:3], ids=repr)
@pytest.mark.parametrize("block,band", [(16, 0), (16, 20), (32, 7)])
def test_band_equals_token_reference(layout, block, band):
    assert torch.equal(band_mask(layout, block, band=band).to_dense()[0, 0], _band_ref(layout, block, band))


def test_tile_blocks_are_tiles_when_aligned():
    # tile tokens == block size and text before the video: grid-first order keeps tiles == blocks
    layout = TokenLayout.video(4, 8, 8, text_len=10, text_position="before")
    m = tile_mask(layout, 16, window=(1, 1, 1), tile=(1, 4, 4))
    d = m.to_dense()[0, 0]
    ng_blocks = 256 // 16
    assert torch.equal(
        d[:ng_blocks, :ng_blocks], torch.eye(ng_blocks, dtype=torch.bool)
    )  # all-or-nothing tiles
    assert d[ng_blocks:].all() and d[:, ng_blocks:].all()  # text rows/cols dense


def test_default_tile():
    assert default_tile((21, 30, 52), 64) == (4, 4, 4)
    assert default_tile((1, 64, 64), 64) == (1, 8, 8)
    assert math.prod(default_tile((5, 7, 11), 16)) == 16
    assert default_tile((1, 1, 3), 64) == (1, 1, 2)


def test_text_rows_cols_dense_every_pattern():
    layout = TokenLayout.video(3, 8, 8, text_len=20, text_position="before")
    for spec in [
        HeadSpec.make("radial", decay=0.1),
        HeadSpec.make("tile", window=(1, 1, 1)),
        HeadSpec.make("reordered", band=0),
    ]:
        d = static_mask(layout, spec.normalized(), 16).to_dense()[0, 0]
        # text occupies tokens [0, 20) in natural order (radial) or the last 20 positions (grid-first orders)
        rows = [0, 1] if spec.pattern == "radial" else [-2, -1]
        assert d[rows].all() and d[:, rows].all(), spec


@pytest.mark.parametrize("F", [11, 21, 41])
def test_radial_density_nlogn(F):
    """At 30x52 per frame and block 64 the kept pairs grow like N log N: density * F / log2(F) stays ~flat."""
    m = radial_mask(TokenLayout.video(F, 30, 52), 64)
    dens = m.density()
    norm = dens * F / math.log2(F)
    assert 1.6 < norm < 2.6, (F, dens, norm)
    assert dens < {11: 0.62, 21: 0.46, 41: 0.33}[F]


def test_select_cumulative_matches_loop():
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(6, 9, generator=g) * 2, -1)
    keep = select_cumulative(p, 0.8, 2)
    for r in range(6):
        vals, order = torch.sort(p[r], descending=True, stable=True)
        want = torch.zeros(9, dtype=torch.bool)
        acc = 0.0
        for i, (v, o) in enumerate(zip(vals.tolist(), order.tolist())):
            if acc < 0.8 or i < 2:
                want[o] = True
            acc += v
        assert torch.equal(keep[r], want)


def test_topp_dense_text_and_diagonal():
    g = torch.Generator().manual_seed(0)
    n = 70
    q = torch.randn(2, 3, n, 16, generator=g)
    k = torch.randn(2, 3, n, 16, generator=g)
    dense = torch.zeros(n, dtype=torch.bool)
    dense[-5:] = True
    bb = topp_block_bool(q, k, dense, 16, top_p=0.5, min_frac=0.0)
    assert bb.shape == (2, 3, 5, 5)
    assert bb[..., -1, :].all() and bb[..., :, -1].all()
    assert bb.diagonal(dim1=-2, dim2=-1).all()
    full = topp_block_bool(q, k, dense, 16, top_p=1.0, min_frac=0.0)
    assert full.all()


def test_static_masks_depend_on_resolution():
    a = static_mask(TokenLayout.video(3, 8, 8), HeadSpec.make("radial").normalized(), 16)
    b = static_mask(TokenLayout.video(3, 8, 9), HeadSpec.make("radial").normalized(), 16)
    assert a.seq_lens != b.seq_lens


def test_reordered_permutation_is_grid_first():
    layout = TokenLayout.video(2, 3, 4, text_len=5, text_position="before")
    p = reordered_permutation(layout, "frame")
    assert p.perm[:24].min() == 5 and p.perm[24:].tolist() == list(range(5))


def test_viz_block_masks_and_attention_map(tmp_path):
    from PIL import Image

    from sparsediff.viz import attention_probs, save_attention_map

    layout = TokenLayout.video(3, 4, 4, text_len=5)
    m = BlockSparseMask.cat_heads(
        [radial_mask(layout, 16), tile_mask(layout, 16, window=(1, 1, 1), tile=(1, 4, 4))]
    )
    p = tmp_path / "m.png"
    m.to_image(p, scale=3)
    im = Image.open(p)
    assert im.size == (2 * 4 * 3 + 2, 4 * 3) and im.mode == "L"
    q = torch.randn(1, 2, layout.num_tokens, 8)
    probs = attention_probs(q, q)
    p2 = save_attention_map(probs, tmp_path / "a.png", block_mask=m, head=1)
    im2 = Image.open(p2)
    assert im2.size == (53, 53) and im2.mode == "RGB"
    px = torch.frombuffer(bytearray(im2.tobytes()), dtype=torch.uint8).view(53, 53, 3)
    assert (px == torch.tensor([255, 0, 0], dtype=torch.uint8)).all(-1).any()  # outline drawn


@pytest.mark.parametrize(
    "pattern,params",
    [
        ("tile", {"window": 5}),
        ("topp", {"top_p": 1.5}),
        ("lse_cache", {"refresh": 0}),
        ("reordered", {"band": -5}),
    ],
)
def test_headspec_rejects_bad_parameter_values(pattern, params):
    with pytest.raises((TypeError, ValueError)):
        HeadSpec.make(pattern, **params)
