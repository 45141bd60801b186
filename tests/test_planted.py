"""Planted-structure heads: each family reaches low error on the structure it matches, at low density,
and clearly beats mismatched families at equal or higher density. Also checks the generator itself."""

import pytest
import torch
from tolerance import rel_error

from sparsediff.attention import LayerState, sparse_attention
from sparsediff.layout import TokenLayout
from sparsediff.reference import attention_ref
from sparsediff.specs import HeadSpec
from sparsediff.testing import PLANTED_KINDS, drift, planted_qkv

LAYOUT = TokenLayout.video(8, 16, 16, text_len=16, text_position="after")
BLOCK = 16


@pytest.fixture(scope="module")
def planted():
    p = planted_qkv(LAYOUT, ["local", "temporal", "cluster", "stripe"], head_dim=32, seed=0)
    ref, _ = attention_ref(p.q, p.k, p.v)
    return p, ref


def _run(p, ref, specs):
    """Per head (rel error, density); lse_cache heads are seeded by one dense warm-up call first."""
    st = LayerState()
    if any(s.pattern == "lse_cache" for s in specs):
        sparse_attention(
            p.q, p.k, p.v, LAYOUT, specs, st, step=0, force_dense=True, block_size=BLOCK, backend="reference"
        )
    out = sparse_attention(p.q, p.k, p.v, LAYOUT, specs, st, step=1, block_size=BLOCK, backend="reference")
    dens = st.last_mask.density_per_head().mean(0)
    return [(rel_error(out[:, h], ref[:, h]), float(dens[h])) for h in range(len(specs))]


MATCHED = [
    HeadSpec.make("tile", window=(3, 3, 3)),  # local
    HeadSpec.make("reordered", order="frame", band=16),  # temporal
    HeadSpec.make("reordered", order="cluster", select="topp", top_p=0.98, min_frac=0.0),  # cluster
    HeadSpec.make("lse_cache", recall=0.95),  # stripe
]
# mismatched families, each at a density >= the matched one. Local heads are served by every
# locality-preserving order: position-major with a wide band is the strongest "other" family there.
MISMATCHED = [
    HeadSpec.make("reordered", order="frame", band=240),  # local
    HeadSpec.make("tile", window=(3, 3, 3)),  # temporal
    HeadSpec.make("tile", window=(3, 3, 3)),  # cluster
    HeadSpec.make("tile", window=(3, 3, 3)),  # stripe
]


def test_matching_family_low_error_low_density_and_beats_mismatched(planted):
    p, ref = planted
    good = _run(p, ref, MATCHED)
    bad = _run(p, ref, MISMATCHED)
    report = {kd: (good[h], bad[h]) for h, kd in enumerate(p.kinds)}
    for h, kd in enumerate(p.kinds):
        (eg, dg), (eb, db) = good[h], bad[h]
        assert eg <= 0.05 and dg <= 0.3, (kd, report)
        assert db >= dg - 0.01, (kd, report)  # compared at equal or higher density
        assert eb >= 10 * eg + 0.02, (kd, report)  # clearly worse (>= 10x, and by 0.02 at least)


def test_temporal_reordering_beats_radial_on_long_videos():
    """On 24 frames the radial frame-skip rule drops most distant frames; the temporal head attends them."""
    lay = TokenLayout.video(24, 6, 8)
    p = planted_qkv(lay, ["temporal"], head_dim=32, seed=1)
    ref, _ = attention_ref(p.q, p.k, p.v)
    res = {}
    for name, spec in [
        ("frame", HeadSpec.make("reordered", order="frame", band=24)),
        ("radial", HeadSpec.make("radial", decay=0.5)),
    ]:
        st = LayerState()
        out = sparse_attention(p.q, p.k, p.v, lay, [spec], st, block_size=BLOCK, backend="reference")
        res[name] = (rel_error(out, ref), st.last_mask.density())
    assert res["frame"][0] <= 0.05 and res["frame"][1] <= res["radial"][1], res
    assert res["radial"][0] >= 5 * res["frame"][0] + 0.1, res


def test_planted_generator_is_seeded_and_structured():
    lay = TokenLayout.video(3, 6, 6, text_len=5, text_position="before")
    a = planted_qkv(lay, list(PLANTED_KINDS), head_dim=16, seed=7)
    b = planted_qkv(lay, list(PLANTED_KINDS), head_dim=16, seed=7)
    c = planted_qkv(lay, list(PLANTED_KINDS), head_dim=16, seed=8)
    assert torch.equal(a.q, b.q) and torch.equal(a.k, b.k) and torch.equal(a.v, b.v)
    assert not torch.equal(a.q, c.q)
    probs = torch.softmax((a.q @ a.k.transpose(-1, -2)) * 16**-0.5, -1)[0]  # [H, N, N]
    off, ng = lay.grid_offset, lay.grid_len
    g = probs[:, off : off + ng, off : off + ng]
    co = lay.grid_coords()[off : off + ng]
    # local: mass in the 3x3x3 neighbourhood ; temporal: same (h, w) ; cluster: same group ; stripe: the sinks
    near = (co[:, None] - co[None]).abs().amax(-1) <= 1  # the 3x3x3 neighbourhood
    assert (g[0] * near).sum(-1).mean() > 0.8
    same_pos = (co[:, None, 1:] == co[None, :, 1:]).all(-1)
    assert (g[1] * same_pos).sum(-1).mean() > 0.9
    lab = a.info["cluster_labels"][2]
    assert (g[2] * (lab[:, None] == lab[None])).sum(-1).mean() > 0.9
    sinks = a.info["sinks"][3] - off
    assert g[3][:, sinks].sum(-1).mean() > 0.9
    assert g[4].amax(-1).mean() < 0.15  # global: diffuse rows
    with pytest.raises(ValueError):
        planted_qkv(lay, ["nope"])
    d = drift(a.q, 2, 0.01)
    assert 0 < rel_error(d, a.q) < 0.05 and torch.equal(drift(a.q, 0), a.q)


@pytest.mark.slow
def test_print_planted_error_density_table():
    """The full family x head-kind table (rel error @ density), for the report. Run with -m slow -s."""
    kinds = list(PLANTED_KINDS)
    p = planted_qkv(LAYOUT, kinds, head_dim=32, seed=0)
    ref, _ = attention_ref(p.q, p.k, p.v)
    fams = {
        "tile(3,3,3)": HeadSpec.make("tile", window=(3, 3, 3)),
        "radial": HeadSpec.make("radial"),
        "radial(.1,dd0)": HeadSpec.make("radial", decay=0.1, dense_dist=0),
        "ro-frame b16": HeadSpec.make("reordered", order="frame", band=16),
        "ro-hilbert b64": HeadSpec.make("reordered", order="hilbert", band=64),
        "ro-cluster p.98": HeadSpec.make(
            "reordered", order="cluster", select="topp", top_p=0.98, min_frac=0.0
        ),
        "topp p.9": HeadSpec.make("topp", top_p=0.9, min_frac=0.0),
        "lse_cache r.95": HeadSpec.make("lse_cache", recall=0.95),
    }
    res = {name: _run(p, ref, [spec] * len(kinds)) for name, spec in fams.items()}
    lines = ["| head kind | " + " | ".join(fams) + " |", "|---" * (len(fams) + 1) + "|"]
    for h, kd in enumerate(kinds):
        lines.append(
            f"| {kd} | " + " | ".join(f"{res[n][h][0]:.3f} @ {res[n][h][1]:.2f}" for n in fams) + " |"
        )
    print("\n".join(lines))
    for h, kd in enumerate(kinds):
        if kd == "global":  # diffuse heads have no sparse family by construction
            continue
        best = min(res[n][h][0] for n in fams if res[n][h][1] <= 0.3)
        assert best <= 0.05, f"{kd}: no family reaches rel error <= 0.05 at density <= 0.3 (best {best:.3f})"
