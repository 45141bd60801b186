"""Radial block rules, accuracy vs compute (issue 9), checked small with samples/radial_rules.py's helpers.

* The measurement itself -- error and recall from block partial sums of the dense softmax -- equals
  sparsediff's block-sparse attention with the same mask (independent oracle: the reference op, and the
  token mask applied to the exact softmax).
* On a grid whose frames straddle the 64-token blocks (140 tokens per frame, text after), the authors'
  rule ``"reference"`` keeps fewer blocks than ``"any"`` and pays for it: on energy-decay heads ``"any"``
  has the lower error and the higher recall; both rules beat a random mask with the same number of blocks
  in every row by far.
* When frames are whole blocks and every band half-width is a multiple of the block, the two rules are
  the same mask (why they tie on the embedded model and at 8x16x16).
"""

import pytest
import torch
from _samples import load_sample

from sparsediff.layout import TokenLayout
from sparsediff.mask import BlockSparseMask
from sparsediff.patterns import static_mask
from sparsediff.reference import attention_ref, block_sparse_attention
from sparsediff.specs import HeadSpec
from sparsediff.testing import planted_qkv

LAYOUT = TokenLayout.video(12, 10, 14, text_len=8, text_position="after")  # N = 1688, 140 tokens per frame
BLOCK = 64
RULES = ("any", "reference")


@pytest.fixture(scope="module")
def rr():
    return load_sample("radial_rules")


@pytest.fixture(scope="module")
def masks(rr):
    torch.set_num_threads(1)
    return rr.rule_masks(LAYOUT, BLOCK, decays=(1.0,), coverage=())


def test_measurement_equals_block_sparse_attention(rr, masks):
    p = planted_qkv(LAYOUT, ["local", "temporal"], head_dim=32, seed=3)
    n, scale = LAYOUT.num_tokens, 32**-0.5
    dense, _ = attention_ref(p.q, p.k, p.v)
    largest = 0.0
    for rule in RULES:
        m = masks[rule, 1.0]
        mask = BlockSparseMask.from_dense(m[None, None].expand(1, 2, -1, -1), BLOCK, (n, n))
        out = block_sparse_attention(p.q, p.k, p.v, mask)
        probs = torch.softmax(p.q[0] @ p.k[0].transpose(-1, -2) * scale, dim=-1)
        recall = (probs * mask.to_token_mask()[0]).sum(-1).mean(-1)  # [H]
        for h in range(2):
            bp = rr.BlockPartials(p.q[0, h] @ p.k[0, h].T * scale, p.v[0, h], BLOCK)
            err, rec = bp.evaluate(m)
            expect = float((out[0, h] - dense[0, h]).norm() / dense[0, h].norm())
            # errors below 1e-5 are fp32 rounding of an exact mask; the large ones must agree to 0.1 %
            assert err == pytest.approx(expect, rel=1e-3, abs=1e-5), (
                f"{rule} head {h}: error {err} vs op {expect}"
            )
            assert rec == pytest.approx(float(recall[h]), rel=1e-5), f"{rule} head {h}: recall"
            largest = max(largest, expect)
    assert largest > 0.01, "no mask lost any mass: the comparison above checked nothing"


def test_reference_cheaper_any_more_accurate_both_beat_random(rr, masks):
    decay = 1.0  # measured: any 0.859 / reference 0.750 of the pairs (0.2 gives the same masks here)
    n = LAYOUT.num_tokens
    m_any, m_ref = masks["any", decay], masks["reference", decay]
    d_any, d_ref = rr.density(m_any, n, BLOCK), rr.density(m_ref, n, BLOCK)
    assert d_ref < d_any - 0.05, f"decay {decay}: reference density {d_ref:.3f} vs any {d_any:.3f}"
    gen = torch.Generator().manual_seed(0)
    for a_t, a_s in [(0.5, 0.5), (1.0, 0.15)]:
        bp = rr.BlockPartials(
            rr.energy_logits(LAYOUT, a_t, a_s, gen), torch.randn(n, 32, generator=gen), BLOCK
        )
        (e_any, r_any), (e_ref, r_ref) = bp.evaluate(m_any), bp.evaluate(m_ref)
        what = f"decay {decay}, energy head ({a_t}, {a_s})"
        assert e_any < e_ref and r_any > r_ref, (
            f"{what}: any {e_any:.4f}/{r_any:.4f} vs ref {e_ref:.4f}/{r_ref:.4f}"
        )
        for rule, m, e in (("any", m_any, e_any), ("reference", m_ref, e_ref)):
            e_rand = bp.evaluate(rr.random_like(m, gen))[0]
            assert 2 * e < e_rand, (
                f"{what}: {rule} error {e:.4f} vs random mask of equal row counts {e_rand:.4f}"
            )


def test_rules_coincide_when_frames_and_windows_are_whole_blocks():
    layout = TokenLayout.video(6, 16, 16)  # 256 tokens per frame = 4 blocks of 64
    for decay in (0.2, 0.5, 1.0):
        a, r = (
            static_mask(layout, HeadSpec.make("radial", decay=decay, block_rule=rule), BLOCK).to_dense()
            for rule in RULES
        )
        assert torch.equal(a, r), f"decay {decay}: {int((a != r).sum())} blocks differ"
    # they differ once a band half-width is not a block multiple (decay 0.75 at d = 2, 3: 96 tokens)
    a, r = (
        static_mask(layout, HeadSpec.make("radial", decay=0.75, block_rule=rule), BLOCK).to_dense()
        for rule in RULES
    )
    assert not torch.equal(a, r)
