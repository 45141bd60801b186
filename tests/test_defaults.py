"""The training-free family defaults (``sparsediff/defaults.py``): the video default gets sparser as the token
count grows, runs dense below ``VIDEO_MIN_TOKENS`` (visibly), and adapters' published settings apply.

Quality of the defaults on the embedded trained model at both demo sizes is in README ("Family defaults");
``tests/test_embedded_trained.py`` checks the default on that model at the demo size."""

from __future__ import annotations

from sparsediff.pipelines.base import get_adapter

from sparsediff import HeadSpec, TokenLayout
from sparsediff.defaults import IMAGE_MIN_TOKENS, VIDEO_MIN_TOKENS, default_plan
from sparsediff.patterns import static_mask
from sparsediff.specs import DenseSchedule

#: (grid, tokens): the embedded model's two sizes, a 16k call, Wan2.1 480p and 720p.
GRIDS = [(8, 8, 8), (16, 16, 16), (16, 32, 32), (21, 30, 52), (21, 45, 80)]


def _density(plan, grid) -> float:
    layout = TokenLayout.video(*grid)
    if layout.num_tokens < plan.min_tokens:
        return 1.0  # the call runs dense
    return static_mask(layout, plan.default, 64).density()


def test_video_default_is_the_authors_wan_setting_and_keeps_its_schedule():
    v = default_plan("video")
    assert v.default == HeadSpec.make("radial", decay=0.2, sink=True)
    assert v.schedule == DenseSchedule(0.25, (0,)) and v.min_tokens == VIDEO_MIN_TOKENS
    assert default_plan("video", "radial").default == v.default  # the family's own pattern keeps its params
    assert default_plan("video", "radial", decay=0.5).default == HeadSpec.make("radial", decay=0.5, sink=True)
    tile = default_plan("video", "tile")
    assert tile.default == HeadSpec("tile") and tile.schedule == v.schedule  # no radial params on tile
    i = default_plan("image")
    assert i.default == HeadSpec("topp") and i.min_tokens == IMAGE_MIN_TOKENS


def test_adapter_overrides_hunyuan_takes_its_published_decay():
    import diffusers

    hy = default_plan(get_adapter(diffusers.HunyuanVideoTransformer3DModel))
    assert hy.default == HeadSpec.make("radial", decay=0.95, sink=False)
    wan = default_plan(get_adapter(diffusers.WanTransformer3DModel))
    assert wan.default == default_plan("video").default
    assert hy.min_tokens == wan.min_tokens == VIDEO_MIN_TOKENS


def test_video_default_gets_sparser_as_tokens_grow():
    v = default_plan("video")
    dens = [_density(v, g) for g in GRIDS]
    assert dens[0] == 1.0, dens  # 512 tokens: below VIDEO_MIN_TOKENS
    assert all(a > b for a, b in zip(dens, dens[1:])), dens  # strictly sparser with every larger call
    assert dens[1] < 0.66 and dens[3] < 0.35 and dens[4] < 0.27, dens  # Wan 480p / 720p
    # the previous default (decay 1, no sink, sparse at every size) kept more at every real shape and was
    # denser at 4096 tokens than at 512: the property above is what changed
    old = default_plan("video", "radial", decay=1.0, sink=False).with_overrides(min_tokens=0)
    olds = [_density(old, g) for g in GRIDS]
    assert olds[1] > olds[0] and all(o > d for o, d in zip(olds[2:], dens[2:])), (olds, dens)
