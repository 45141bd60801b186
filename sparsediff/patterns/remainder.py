"""The pooled remainder: the key blocks a head's mask leaves out, added back as one pooled key each.

A block-sparse head computes its softmax over the key blocks its mask keeps for the query's block; the
attention mass on the other blocks is lost. For near-uniform ("diffuse") heads that is most of the mass.
With ``remainder="pooled"`` (a head-level parameter of the single-step families declared with
``remainder=True``: ``radial``, ``tile``, ``reordered``, ``topp``) every key block ``b`` *not* kept for
the query's block is added as ONE key: the mean key ``k̄_b`` of the block's real tokens with logit
``scale * q · k̄_b + log(n_b)`` (``n_b`` tokens in the block: the ragged last block counts its real
tokens), carrying the block's mean value ``v̄_b``. It is what the block contributes when its logits are
all equal to the pooled one (exact for a uniform block; first order otherwise). The sparse part
``(out_s, lse_s)`` from the op and this part ``(out_r, lse_r)`` are merged by log-sum-exp
(:func:`merge_lse`).

Cost per head: pooling k and v (``2 N D``), ``N x Kb`` pooled scores and the ``N x Kb x D`` product with
the mean values -- no extra attention blocks. Memory: float32 scores ``[B, Hp, rows, Kb]`` for the ``Hp``
pooled heads only, made for as many query rows at a time as keep them within :data:`CHUNK_ELEMS` (in a
backward pass autograd keeps every chunk's scores: ``[B, Hp, N, Kb]``, e.g. 357 MB per head and batch
element at 75 600 tokens in blocks of 64).

With ``remainder="cached"`` (static families only) the remainder is exact but stale: every
``remainder_refresh`` denoising steps the head's call also runs one dense pass, whose output it returns (the
step is exact), and keeps the part of that softmax its mask leaves out, ``(out_r, lse_r)``
(:func:`split_remainder`: the dense pass minus the op's kept blocks, in log-sum-exp form). The calls in
between merge the stored remainder with the fresh kept blocks by log-sum-exp (:func:`merge_lse`), so the
error is the remainder's *change* since its refresh rather than the remainder itself: across neighbouring
denoising steps q, k and v change little (the premise of every step-caching method). Cost: at a refresh
one dense pass on top of the blocks; in between one merge (``O(N D)``). Memory: ``out_r`` and ``lse_r`` in
float32 per cached head and transformer call (CFG branch), kept in the layer's state until the generation
ends.

Everything here is plain torch (differentiable, backend-agnostic): it runs on the op's outputs in each
head's own (permuted) token order.
"""

from __future__ import annotations

import math

import torch

from .common import block_token_counts, cdiv

__all__ = ["block_means", "pooled_remainder", "merge_lse", "split_remainder", "CHUNK_ELEMS"]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def block_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x [B, H, N, D]`` -> ``[B, H, Kb, D]`` mean over each block's real tokens (``Kb = ceil(N / block)``;
    the ragged last block is averaged over its real tokens), in float32 (float64 for float64 input)."""
    B, H, N, D = x.shape
    kb = cdiv(N, block_size)
    xf = x.to(_work_dtype(x))
    pad = kb * block_size - N
    if pad:
        xf = torch.nn.functional.pad(xf, (0, 0, 0, pad))
    counts = block_token_counts(N, block_size, x.device).to(xf.dtype)
    return xf.reshape(B, H, kb, block_size, D).sum(3) / counts.view(1, 1, kb, 1)


#: bound on the elements of one ``[B, H, rows, Kb]`` chunk of pooled scores (float32: 256 MiB)
CHUNK_ELEMS = 1 << 26


def pooled_remainder(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kept: torch.Tensor,
    block_size: int,
    scale: float,
    *,
    chunk_elems: int = CHUNK_ELEMS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the pooled keys of the key blocks its block does NOT keep.

    Args:
        q, k, v: ``[B, H, N, D]`` in the order the mask is in (each head's permuted order).
        kept: bool ``[B|1, H, Qb, Kb]``: the block mask (``BlockSparseMask.to_dense()``).
        block_size: tokens per block (query and key).
        scale: softmax scale.
        chunk_elems: the scores are made for as many query rows at a time as keep ``B x H x rows x Kb``
            within this bound (the result does not depend on it).

    Returns:
        ``(out_r, lse_r)``: ``[B, H, N, D]`` and ``[B, H, N]`` in float32 (float64 for float64 input).
        Rows whose block keeps every key block (text rows among them) get ``out_r = 0``, ``lse_r = -inf``;
        never NaN, also in the backward.
    """
    B, H, N, D = q.shape
    wd = _work_dtype(q)
    kb = cdiv(N, block_size)
    if kept.dim() != 4 or kept.shape[-2:] != (kb, kb) or kept.shape[1] != H or kept.shape[0] not in (1, B):
        raise ValueError(f"kept must be [B|1, {H}, {kb}, {kb}] for {N} tokens, got {tuple(kept.shape)}")
    km, vm = block_means(k, block_size), block_means(v, block_size)
    # per (query block, key block): log(tokens) where the block is pooled, -inf where it is kept; query blocks
    # keeping every key block (text rows among them) get finite dummy logits (a softmax over all -inf has a
    # NaN backward) and are zeroed after
    kept = kept.to(q.device)
    rest = ~kept.all(-1)  # [B|1, H, Qb]: query blocks with a remainder
    log_n = block_token_counts(N, block_size, q.device).to(wd).log()
    bias = log_n.expand(kept.shape).masked_fill(kept & rest.unsqueeze(-1), -math.inf)
    # whole query blocks per chunk, as many as keep B x H x rows x Kb within chunk_elems
    per = max(1, int(chunk_elems) // max(1, B * H * kb * block_size))
    outs, lses = [], []
    for b0 in range(0, kb, per):
        b1 = min(kb, b0 + per)
        r0, r1 = b0 * block_size, min(N, b1 * block_size)
        o, lse = _pooled_blocks(
            q[:, :, r0:r1], km, vm, bias[:, :, b0:b1], rest[:, :, b0:b1], block_size, scale
        )
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, 2), torch.cat(lses, 2)


def _pooled_blocks(q, km, vm, bias, rest, block_size, scale):
    """:func:`pooled_remainder` of the query rows ``q [B, H, r, D]`` of whole query blocks (the last may be
    ragged) with their ``bias [B|1, H, qb, Kb]`` and ``rest [B|1, H, qb]``: one pass per step, the mask
    applied per block (broadcast over the block's rows), not per row."""
    B, H, r, _ = q.shape
    qb, kb = bias.shape[-2], bias.shape[-1]
    pad = qb * block_size - r
    logits = torch.matmul(q.to(km.dtype) * scale, km.transpose(-1, -2))  # [B, H, r, Kb]
    if pad:
        logits = torch.nn.functional.pad(logits, (0, 0, 0, pad))
    logits = logits.view(B, H, qb, block_size, kb) + bias.unsqueeze(3)
    lse = torch.logsumexp(logits, -1, keepdim=True)  # [B, H, qb, bs, 1]
    p = torch.exp(logits - lse)
    keep = rest.to(logits.dtype).view(rest.shape[0], H, qb, 1, 1)  # 0 for blocks without a remainder
    out = torch.matmul((p * keep).view(B, H, qb * block_size, kb)[:, :, :r], vm)
    lse = lse.masked_fill(keep == 0, -math.inf).view(B, H, qb * block_size)[:, :, :r]
    return out, lse


def merge_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the union of two disjoint key sets from each one's ``(out [..., N, D], lse [..., N])``:
    ``out = out_a e^(lse_a - lse) + out_b e^(lse_b - lse)``, ``lse = logaddexp(lse_a, lse_b)``, in the
    promoted dtype (at least float32). A side with ``lse = -inf`` contributes nothing; both ``-inf`` gives
    ``out = 0``, ``lse = -inf``. No NaN in the forward or the backward."""
    wd = torch.promote_types(_work_dtype(out_a), _work_dtype(out_b))
    la, lb = lse_a.to(wd), lse_b.to(wd)
    m = torch.maximum(la, lb).detach()  # any finite shift gives the same result
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    den = wa + wb
    some = den > 0
    den_safe = torch.where(some, den, torch.ones_like(den))
    out = (out_a.to(wd) * wa.unsqueeze(-1) + out_b.to(wd) * wb.unsqueeze(-1)) / den_safe.unsqueeze(-1)
    lse = torch.where(some, m + torch.log(den_safe), torch.full_like(den, -math.inf))
    return out, lse


def split_remainder(
    out_full: torch.Tensor, lse_full: torch.Tensor, out_s: torch.Tensor, lse_s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of a softmax that a subset of its keys leaves out, from the whole and the subset.

    ``(out_full, lse_full)`` is attention over all keys, ``(out_s, lse_s)`` over a subset of them (the
    kept blocks), both ``[..., N, D]`` / ``[..., N]``. Returns ``(out_r, lse_r)``, attention over the other
    keys, in the promoted dtype (at least float32), such that ``merge_lse(out_s, lse_s, out_r, lse_r)`` is
    ``(out_full, lse_full)``: with ``a = exp(lse_s - lse_full)`` (the subset's share of the mass),
    ``lse_r = lse_full + log(1 - a)`` and ``out_r = (out_full - a out_s) / (1 - a)``. Rows whose subset
    holds all the mass (``1 - a`` at or below float32 rounding) get ``out_r = 0``, ``lse_r = -inf``. The
    division does not amplify the rounding of the inputs in a later merge: ``out_r`` enters it with the
    weight ``1 - a`` it was divided by.
    """
    wd = torch.promote_types(_work_dtype(out_full), _work_dtype(out_s))
    lf, ls = lse_full.to(wd), lse_s.to(wd)
    a = torch.exp(torch.where(torch.isfinite(lf), ls - lf, torch.zeros_like(lf))).clamp(max=1.0)
    a = torch.where(torch.isfinite(ls), a, torch.zeros_like(a))  # a subset without keys holds no mass
    rest = 1.0 - a
    some = rest > torch.finfo(torch.float32).eps * 4
    rest_safe = torch.where(some, rest, torch.ones_like(rest))
    out_r = (out_full.to(wd) - a.unsqueeze(-1) * out_s.to(wd)) / rest_safe.unsqueeze(-1)
    out_r = torch.where(some.unsqueeze(-1), out_r, torch.zeros_like(out_r))
    lse_r = torch.where(some, lf + torch.log(rest_safe), torch.full_like(lf, -math.inf))
    return out_r, lse_r
