"""TokenLayout / Segment / HeadSpec / DenseSchedule: construction, validation, hashing, JSON round trips."""

import json

import pytest
import torch

from sparsediff.layout import Segment, TokenLayout
from sparsediff.specs import PATTERNS, DenseSchedule, HeadSpec


def test_video_layout_text_before_and_after():
    a = TokenLayout.video(5, 7, 11, text_len=13, text_position="before")
    assert a.num_tokens == 5 * 7 * 11 + 13
    assert a.grid == (5, 7, 11) and a.grid_offset == 13 and a.grid_len == 385 and a.text_len == 13
    tm = a.text_mask()
    assert tm.dtype == torch.bool and tm.shape == (398,)
    assert tm[:13].all() and not tm[13:].any()
    b = TokenLayout.video(3, 16, 9, text_len=7, text_position="after")
    assert b.grid_offset == 0 and b.text_mask()[-7:].all() and not b.text_mask()[:-7].any()
    assert "video[3x16x9]" in repr(b) and "text[7]" in repr(b)


def test_layout_no_text_and_image():
    a = TokenLayout.video(2, 3, 4)
    assert a.segments == (Segment.video_grid(2, 3, 4),) and not a.text_mask().any()
    im = TokenLayout.image(8, 6, text_len=5)
    assert im.grid == (1, 8, 6) and im.grid_offset == 5 and im.segments[0].kind == "text"


def test_layout_hash_eq_and_resolution_in_key():
    a = TokenLayout.video(5, 7, 11, text_len=13, text_position="before")
    b = TokenLayout.video(5, 7, 11, text_len=13, text_position="before")
    c = TokenLayout.video(5, 7, 12, text_len=13, text_position="before")
    d = TokenLayout.video(5, 7, 11, text_len=13, text_position="after")
    assert a == b and hash(a) == hash(b)
    assert len({a, b, c, d}) == 3


def test_extra_image_segments_are_dense_not_text():
    base = TokenLayout.video(2, 4, 4, text_len=3, text_position="before")
    lay = base.append(Segment.image_grid(4, 4))
    assert lay.num_tokens == 3 + 32 + 16
    assert lay.grid == (2, 4, 4) and lay.grid_offset == 3
    assert int(lay.text_mask().sum()) == 3
    dm = lay.dense_mask()
    assert int(dm.sum()) == 3 + 16 and not dm[3:35].any()
    co = lay.grid_coords()
    assert co[3].tolist() == [0, 0, 0] and co[3 + 31].tolist() == [1, 3, 3] and (co[:3] == -1).all()


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Segment("audio", 3),
        lambda: Segment("video", 10, (2, 2, 2)),
        lambda: Segment("text", 3, (1, 1, 3)),
        lambda: Segment("image", 8, (2, 2, 2)),
        lambda: Segment("video", 8, None),
        lambda: Segment("video", 0, (0, 2, 2)),
        lambda: TokenLayout(()),
        lambda: TokenLayout.video(2, 2, 2, text_len=3, text_position="middle"),
        lambda: TokenLayout.video(2, 2, 2, text_len=-1),
    ],
)
def test_layout_validation(bad):
    with pytest.raises((ValueError, TypeError)):
        bad()


def test_segment_grid_list_normalised_to_tuple():
    s = Segment("video", 8, [2, 2, 2])
    assert s.grid == (2, 2, 2) and hash(s) == hash(Segment.video_grid(2, 2, 2))


def test_headspec_make_get_json_roundtrip():
    s = HeadSpec.make("tile", window=[1, 2, 3])
    assert s.get("window") == (1, 2, 3) and s.get("tile") is None
    assert HeadSpec.make("radial", decay=0.2) == HeadSpec("radial", (("decay", 0.2),))
    assert HeadSpec.make("reordered", select="topp", order="hilbert") == HeadSpec.make(
        "reordered", order="hilbert", select="topp"
    )
    for p in PATTERNS:
        x = HeadSpec.make(p)
        assert HeadSpec.from_dict(json.loads(json.dumps(x.to_dict()))) == x
    t = HeadSpec.from_dict(json.loads(s.to_json()))
    assert t == s and hash(t) == hash(s)
    n = HeadSpec.make("radial").normalized()
    assert n.get("decay") == 1.0 and dict(n.params)["sink"] is False
    assert HeadSpec.make("radial").is_static and not HeadSpec.make("topp").is_static
    assert "decay=0.2" in repr(HeadSpec.make("radial", decay=0.2))


def test_headspec_validation():
    with pytest.raises(ValueError, match="unknown pattern"):
        HeadSpec.make("flash")
    with pytest.raises(ValueError, match="has no parameter"):
        HeadSpec.make("radial", window=3)
    with pytest.raises(ValueError, match="unexpected keys"):
        HeadSpec.from_dict({"pattern": "dense", "extra": 1})


def test_dense_schedule():
    s = DenseSchedule(dense_steps=3, dense_layers=(0,))
    assert s.is_dense(0, 50, 5) and s.is_dense(2, 50, 5) and not s.is_dense(3, 50, 5)
    assert s.is_dense(40, 50, 0) and not s.is_dense(None, None, 1)
    f = DenseSchedule(dense_steps=0.25)
    assert f.num_dense_steps(50) == 13 and f.is_dense(12, 50) and not f.is_dense(13, 50)
    assert DenseSchedule(dense_steps=1.0).is_dense(49, 50)
    with pytest.raises(ValueError):
        DenseSchedule(dense_steps=1.5)
    with pytest.raises(ValueError):
        f.is_dense(1, None)


def test_refit_text():
    """Per-attention-call layouts (SD3.5 image-only ``attn2``, Mochi per-sample prompt lengths)."""
    lay = TokenLayout.image(8, 12, text_len=93, text_position="after")
    assert lay.refit_text(96 + 93) is lay
    assert lay.refit_text(96) == TokenLayout.image(8, 12)  # image only: text dropped
    assert lay.refit_text(96 + 5) == TokenLayout.image(8, 12, text_len=5, text_position="after")
    assert lay.refit_text(96 + 200) == TokenLayout.image(8, 12, text_len=200, text_position="after")
    before = TokenLayout.video(2, 3, 4, text_len=7, text_position="before")
    assert before.refit_text(24 + 2) == TokenLayout.video(2, 3, 4, text_len=2, text_position="before")
    assert lay.refit_text(95) is None  # fewer tokens than the grid
    two = TokenLayout.video(2, 3, 4, text_len=3, text_position="before").append(lay.segments[1])
    assert two.refit_text(24 + 3 + 93 + 1) is None  # ambiguous: two text segments
    assert two.refit_text(24) == TokenLayout.video(2, 3, 4)  # ... but dropping both is not
    assert TokenLayout((Segment.text(5),)).refit_text(3) is None  # no grid
    # no text at all: only the exact length fits; an extra image segment is kept as is
    assert TokenLayout.video(2, 3, 4).refit_text(25) is None
    edit = TokenLayout.image(4, 4, text_len=6).append(Segment.image_grid(4, 4))
    assert edit.refit_text(32) == TokenLayout((Segment.image_grid(4, 4), Segment.image_grid(4, 4)))
    assert hash(lay.refit_text(96)) == hash(TokenLayout.image(8, 12))  # usable as a cache key
