"""samples/pooled_remainder.py: the pooled remainder of unselected key blocks, measured on planted heads."""

import torch
from _samples import load_sample


def _heads(n: int = 256, d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n, d, generator=g)
    k = torch.randn(2, n, d, generator=g)
    v = torch.randn(2, n, d, generator=g) + torch.linspace(-2, 2, n)[:, None]  # values vary with position
    q[0] *= 0.01  # head 0: near-uniform attention over the whole sequence
    pos = torch.arange(n, dtype=torch.float32)
    k[1] = torch.zeros(n, d)  # head 1: strictly local (keys = position code, query = its own code)
    k[1, :, 0], k[1, :, 1] = torch.cos(pos / n * 6.28) * 30, torch.sin(pos / n * 6.28) * 30
    q[1] = k[1]
    return q, k, v


def test_pooled_remainder_fixes_a_uniform_head_not_a_local_one():
    pr = load_sample("pooled_remainder")
    q, k, v = _heads()
    sparse, pooled = pr.pooled_remainder_errors(q, k, v, density=0.25, block=16)
    assert sparse[0] > 0.3 and pooled[0] < 0.1 * sparse[0], (sparse, pooled)  # uniform: the remainder matters
    assert sparse[1] < 0.05 and pooled[1] < 0.05, (sparse, pooled)  # local: the kept blocks hold it all
    # every block kept: nothing is pooled and both are dense attention (fails if kept blocks are pooled too)
    s1, p1 = pr.pooled_remainder_errors(q, k, v, density=1.0, block=16)
    assert float(s1.max()) < 1e-12 and float(p1.max()) < 1e-12
