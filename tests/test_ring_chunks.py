"""The chunk arithmetic of ring attention (:mod:`sparsediff.hooks.ring`), in one process.

A sequence in natural order is cut into ring chunks (one contiguous split, or Flux-like text and image
split separately); for every rank, its queries against every chunk's keys (:func:`chunk_pieces` +
:func:`chunk_attention`), merged with the LSE, must equal the op on the whole sequence for those rows --
and the chunk gradients (:func:`chunk_backward`) summed over chunks must equal the op's autograd. Chunk
edges fall inside blocks on purpose (ragged query starts, partial first key blocks, chunks shorter than a
block). Both op backends: the PyTorch twin, and the Triton kernel under the interpreter (conftest).
"""

from __future__ import annotations

import pytest
import torch

from sparsediff.hooks.ring import RingGeometry, chunk_attention, chunk_backward, chunk_pieces, merge_partials
from sparsediff.mask import BlockSparseMask
from sparsediff.ops import block_sparse_attention, triton_reasons


def _natural_of(text: int, image: int, world: int) -> torch.Tensor:
    """Natural position of every position of the concatenated chunks when text and image are split
    separately (chunk r = ``[text_r, image_r]``)."""
    ct, ci = text // world, image // world
    pos = []
    for r in range(world):
        pos += list(range(r * ct, (r + 1) * ct)) + list(range(text + r * ci, text + (r + 1) * ci))
    return torch.tensor(pos)


CASES = {  # name: (tokens, ring degree, block size, natural_of or None)
    "sequence_3_chunks": (81, 3, 16, None),
    "chunk_shorter_than_block": (30, 3, 16, None),
    "text_image_segments": (9 + 72, 3, 16, _natural_of(9, 72, 3)),
}


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("case", list(CASES))
def test_chunks_merge_to_the_whole_sequence(case, backend):
    n, world, bs, natural_of = CASES[case]
    B, H, D = 2, 2, 16
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, H, D, generator=g) for _ in range(3))  # natural order, [B, N, H, D]
    nb = -(-n // bs)
    keep = torch.rand(1, H, nb, nb, generator=g) < 0.4
    keep |= torch.eye(nb, dtype=torch.bool)
    mask = BlockSparseMask.from_dense(keep, bs, (n, n))
    if backend == "triton" and triton_reasons(q.transpose(1, 2), mask):
        pytest.skip("; ".join(triton_reasons(q.transpose(1, 2), mask)))
    qn, kn, vn = (x.transpose(1, 2).detach().requires_grad_(True) for x in (q, k, v))
    ref, ref_lse = block_sparse_attention(qn, kn, vn, mask, return_lse=True, backend=backend)
    gout = torch.randn(ref.shape, generator=g)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(ref, (qn, kn, vn), gout)

    geom = RingGeometry.of(n, world, natural_of)
    order = torch.arange(n) if natural_of is None else natural_of
    chunk = [order[j * geom.chunk_len : (j + 1) * geom.chunk_len] for j in range(world)]
    qc, kc, vc = ([x[:, c] for c in chunk] for x in (q, k, v))  # every rank's chunk, [B, n, H, D]
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for r in range(world):
        acc, parts = None, []
        for j in range(world):
            pieces = chunk_pieces(keep, geom, r, j, bs)
            o, lse = chunk_attention(qc[r], kc[j], vc[j], geom, r, pieces, scale=D**-0.5, backend=backend)
            acc = merge_partials(acc, o, lse)
            parts.append(pieces)
        rows = chunk[r]
        want = ref.transpose(1, 2)[:, rows]
        assert (acc[0] - want).abs().max() <= 1e-5, f"rank {r}: merged chunks != the whole sequence"
        assert torch.allclose(acc[1], ref_lse.transpose(1, 2)[:, rows], atol=1e-5)
        g_r = gout.transpose(1, 2)[:, rows]
        dq = torch.zeros_like(qc[r])
        for j in range(world):
            a, b, c = chunk_backward(
                qc[r], kc[j], vc[j], acc[0], acc[1], g_r, geom, r, parts[j], scale=D**-0.5, backend=backend
            )
            dq += a
            dk[:, chunk[j]] += b
            dv[:, chunk[j]] += c
        assert (dq - dq_ref.transpose(1, 2)[:, rows]).abs().max() <= 1e-5, f"rank {r}: dq"
    assert (dk - dk_ref.transpose(1, 2)).abs().max() <= 1e-5, "dk summed over ranks"
    assert (dv - dv_ref.transpose(1, 2)).abs().max() <= 1e-5, "dv summed over ranks"


def test_geometry_runs():
    g = RingGeometry.of(9 + 72, 3, _natural_of(9, 72, 3))
    assert g.chunk_len == 27
    assert g.runs[1] == ((0, 3, 3), (3, 9 + 24, 24))
    assert RingGeometry.of(10, 2, None).runs == (((0, 0, 5),), ((0, 5, 5),))
    with pytest.raises(ValueError):
        RingGeometry.of(10, 3, None)
