"""Shared machinery of the pattern builders: block reduction, dense tokens, cumulative selection.

Block-reduction rule (all static patterns): a pattern is defined at token level on the grid
coordinates; a ``(query block, key block)`` pair of the (possibly permuted) order is kept when **any**
of its token pairs is in the token-level pattern (no fraction threshold). Rows and columns of every
token outside the primary grid (text, extra image segments) are dense, so a block that contains such a
token is kept in full along its row (query side) or column (key side). Ragged last blocks are blocks
like the others.

Fast builders never touch token pairs: each block is cut into *segments* -- maximal runs of positions
inside one block that share a group (a frame for radial, a tile for tile) -- and the token-level rule
is evaluated in closed form on pairs of segments, then OR-reduced to blocks. Cost O((N/B + groups)^2).
"""

from __future__ import annotations

import math

import torch

from ..mask import BlockSparseMask
from ..support import cdiv

__all__ = [
    "cdiv",
    "Segments",
    "segments",
    "reduce_segment_pairs",
    "dense_token_blocks",
    "block_token_counts",
    "select_cumulative",
    "pooled_block_scores",
    "mask_from_bool",
]


class Segments:
    """Runs of consecutive positions inside one block with one group id (``-1`` = dense token)."""

    __slots__ = ("blk", "grp", "lo", "hi")

    def __init__(self, blk, grp, lo, hi):
        self.blk, self.grp, self.lo, self.hi = blk, grp, lo, hi

    def __len__(self) -> int:
        return self.blk.numel()


def segments(groups: torch.Tensor, block: int) -> Segments:
    """Cut positions ``0..N-1`` (with group id ``groups[N]``) into segments (see module docstring)."""
    n = groups.numel()
    pos = torch.arange(n, device=groups.device)
    start = pos % block == 0
    if n > 1:
        start[1:] |= groups[1:] != groups[:-1]
    lo = pos[start]
    hi = torch.cat([lo[1:], lo.new_tensor([n])]) - 1
    return Segments(lo // block, groups[lo], lo, hi)


def reduce_segment_pairs(
    qs: Segments, ks: Segments, keep: torch.Tensor, num_q_blocks: int, num_k_blocks: int
) -> torch.Tensor:
    """OR-reduce a segment-pair predicate ``keep [Sq, Sk]`` to a block bool ``[Qb, Kb]``.

    Pairs where either segment is a dense token run (group -1) are always kept.
    """
    keep = keep | (qs.grp < 0).unsqueeze(1) | (ks.grp < 0).unsqueeze(0)
    out = torch.zeros(num_q_blocks * num_k_blocks, dtype=torch.bool, device=keep.device)
    flat = (qs.blk.unsqueeze(1) * num_k_blocks + ks.blk.unsqueeze(0))[keep]
    out[flat] = True
    return out.view(num_q_blocks, num_k_blocks)


def dense_token_blocks(dense_tokens: torch.Tensor, block: int) -> torch.Tensor:
    """Bool ``[ceil(N/block)]``: blocks containing at least one dense (non-grid) token."""
    n = dense_tokens.numel()
    nb = cdiv(n, block)
    pad = torch.zeros(nb * block, dtype=torch.bool, device=dense_tokens.device)
    pad[:n] = dense_tokens
    return pad.view(nb, block).any(-1)


def block_token_counts(n: int, block: int, device=None) -> torch.Tensor:
    """float32 ``[ceil(n/block)]``: tokens in each block (the last may be ragged)."""
    nb = cdiv(n, block)
    c = torch.full((nb,), float(block), device=device)
    if nb:
        c[-1] = n - block * (nb - 1)
    return c


def select_cumulative(p: torch.Tensor, target: float, min_count: int = 1) -> torch.Tensor:
    """Per row of ``p [..., K]`` (non-negative, rows normalised to 1): keep the largest entries until
    their sum reaches ``target`` (the entry that crosses it included), and at least ``min_count``.

    Returns bool ``[..., K]``. Rows of zeros keep ``min_count`` entries (ties broken by index).
    """
    K = p.shape[-1]
    if K == 0:
        return torch.zeros_like(p, dtype=torch.bool)
    sp, order = torch.sort(p, dim=-1, descending=True, stable=True)
    before = torch.cumsum(sp, -1) - sp  # mass of strictly larger-ranked entries
    keep_sorted = before < target
    rank = torch.arange(K, device=p.device)
    keep_sorted |= rank < max(1, min(min_count, K))
    keep = torch.zeros_like(keep_sorted)
    keep.scatter_(-1, order, keep_sorted)
    return keep


def pooled_block_scores(
    q: torch.Tensor, k: torch.Tensor, block_q: int, block_k: int, scale: float
) -> torch.Tensor:
    """Softmax over key blocks of mean-pooled block scores, ``[B, H, Qb, Kb]`` float32.

    ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``. Blocks are mean-pooled over their valid tokens (ragged
    last blocks included); logits ``= scale * q̄ · k̄ + log(tokens in key block)`` so that a small ragged
    block is not over-weighted (the pooled estimate of the summed exp-scores of the block).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Qb, Kb = cdiv(Nq, block_q), cdiv(Nk, block_k)
    qp = torch.nn.functional.pad(q.float(), (0, 0, 0, Qb * block_q - Nq)).view(B, H, Qb, block_q, D).sum(3)
    kp = torch.nn.functional.pad(k.float(), (0, 0, 0, Kb * block_k - Nk)).view(B, H, Kb, block_k, D).sum(3)
    cq = block_token_counts(Nq, block_q, q.device)
    ck = block_token_counts(Nk, block_k, q.device)
    qp = qp / cq.view(1, 1, Qb, 1)
    kp = kp / ck.view(1, 1, Kb, 1)
    logits = (qp @ kp.transpose(-1, -2)) * scale + torch.log(ck).view(1, 1, 1, Kb)
    return torch.softmax(logits, -1)


def mask_from_bool(block_bool: torch.Tensor, block: int, seq_len: int) -> BlockSparseMask:
    """:class:`BlockSparseMask` from ``[Qb, Kb]`` / ``[Bm, H, Qb, Kb]`` block bools (square self-attention)."""
    while block_bool.dim() < 4:
        block_bool = block_bool.unsqueeze(0)
    return BlockSparseMask.from_dense(block_bool, block, (seq_len, seq_len))


def apply_dense_tokens(block_bool: torch.Tensor, dense_blocks: torch.Tensor) -> torch.Tensor:
    """OR the dense rows/cols of ``dense_blocks [Qb]`` into ``block_bool [..., Qb, Kb]`` (square)."""
    return block_bool | dense_blocks.view(-1, 1) | dense_blocks.view(1, -1)


def min_count(frac: float, k: int) -> int:
    return max(1, int(math.ceil(frac * k - 1e-9)))
