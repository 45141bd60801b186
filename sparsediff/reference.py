"""Pure-PyTorch twin of the block-sparse attention kernel: the reference oracle and the CPU fallback.

It processes query blocks in chunks and gathers only the listed key/value blocks, so it never
materialises an ``Nq x Nk`` score matrix and its cost scales with the mask density. All arithmetic is
done in float32 (``upcast``); the output is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mask import BlockSparseMask

__all__ = ["block_sparse_attention", "attention_ref"]

# Upper bound on the elements of one gathered K (or V) chunk, fp32: 2**24 elements = 64 MiB.
_CHUNK_ELEMS = 1 << 24


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference block-sparse attention with the same contract as :func:`sparsediff.block_sparse_attention`.

    Args:
        q: ``[B, H, Nq, D]`` (any strides). k: ``[B, H, Nk, D]``. v: ``[B, H, Nk, Dv]``.
        mask: :class:`BlockSparseMask` with ``seq_lens == (Nq, Nk)``, ``heads == H``, batch 1 or B.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp ``[B, H, Nq]`` (float32).

    Rows that attend to no key give out = 0 and lse = -inf.
    """
    from .ops import check_inputs  # local import: ops imports this module

    check_inputs(q, k, v, mask)
    out, lse = _forward(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5)
    return (out, lse) if return_lse else out


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    bq, bk = mask.block_size
    Qb, Kb = mask.num_q_blocks, mask.num_kv_blocks
    dev = q.device
    out = torch.zeros(B, H, Nq, Dv, dtype=torch.float32, device=dev)
    lse = torch.full((B, H, Nq), -math.inf, dtype=torch.float32, device=dev)
    if Nq == 0 or Nk == 0 or Qb == 0:
        return _finish(out, lse, q)

    idx = mask.kv_indices.to(dev).expand(B, H, -1, -1)
    cnt = mask.kv_counts.to(dev).expand(B, H, -1)
    # Blocked, padded, fp32 copies of K/V: [B, H, Kb, bk, D]
    kp = F.pad(k.float(), (0, 0, 0, Kb * bk - Nk)).view(B, H, Kb, bk, D)
    vp = F.pad(v.float(), (0, 0, 0, Kb * bk - Nk)).view(B, H, Kb, bk, Dv)
    qp = F.pad(q.float(), (0, 0, 0, Qb * bq - Nq)).view(B, H, Qb, bq, D)
    key_in_range = (torch.arange(Kb * bk, device=dev) < Nk).view(Kb, bk)
    b_ar = torch.arange(B, device=dev).view(B, 1, 1, 1)
    h_ar = torch.arange(H, device=dev).view(1, H, 1, 1)
    out_b = out.new_zeros(B, H, Qb * bq, Dv).view(B, H, Qb, bq, Dv)
    lse_b = lse.new_full((B, H, Qb * bq), -math.inf).view(B, H, Qb, bq)

    q0 = 0
    while q0 < Qb:
        # choose a chunk of query blocks whose gathered K/V fit the element budget
        m_all = int(cnt[:, :, q0:].amax()) if q0 < Qb else 0
        per_block = max(B * H * max(m_all, 1) * bk * max(D, Dv, bq), 1)
        c = max(1, min(Qb - q0, _CHUNK_ELEMS // per_block))
        q1 = q0 + c
        m = int(cnt[:, :, q0:q1].amax())
        if m > 0:
            ids = idx[:, :, q0:q1, :m].long()  # [B, H, C, M]
            valid_slot = torch.arange(m, device=dev) < cnt[:, :, q0:q1].unsqueeze(-1)  # [B, H, C, M]
            ids = torch.where(valid_slot, ids, torch.zeros_like(ids))
            kg = kp[b_ar, h_ar, ids]  # [B, H, C, M, bk, D]
            vg = vp[b_ar, h_ar, ids]
            col_ok = valid_slot.unsqueeze(-1) & key_in_range[ids]  # [B, H, C, M, bk]
            s = torch.einsum("bhcqd,bhcmkd->bhcqmk", qp[:, :, q0:q1], kg) * scale
            s = s.reshape(B, H, c, bq, m * bk)
            s = s.masked_fill(~col_ok.reshape(B, H, c, 1, m * bk), -math.inf)
            mx = s.amax(-1, keepdim=True)
            mx = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
            p = torch.exp(s - mx)
            denom = p.sum(-1, keepdim=True)
            o = torch.einsum("bhcqn,bhcnd->bhcqd", p, vg.reshape(B, H, c, m * bk, Dv))
            nonempty = denom > 0
            out_b[:, :, q0:q1] = torch.where(nonempty, o / denom.clamp_min(1e-30), torch.zeros_like(o))
            lse_b[:, :, q0:q1] = torch.where(
                nonempty.squeeze(-1), (mx + torch.log(denom.clamp_min(1e-30))).squeeze(-1), -math.inf
            )
        q0 = q1
    out = out_b.view(B, H, Qb * bq, Dv)[:, :, :Nq]
    lse = lse_b.view(B, H, Qb * bq)[:, :, :Nq]
    return _finish(out, lse, q)


def _finish(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Output has q's dtype and q's memory layout (e.g. a [B, N, H, D] buffer seen as [B, H, N, D]).
    res = torch.empty_like(q) if out.shape[-1] == q.shape[-1] else q.new_empty(out.shape)
    res.copy_(out)
    return res, lse.contiguous()


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive dense attention with an optional boolean token mask ``[B or 1, H, Nq, Nk]``: (out, lse).

    The independent oracle used by tests (no blocks involved). ``upcast`` computes in float32; with
    ``upcast=False`` it computes in the input dtype (the "naive same-dtype" baseline for tolerances).
    Fully masked rows give zeros and lse -inf.
    """
    dt = torch.float32 if upcast else q.dtype
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    if token_mask is not None:
        s = s.masked_fill(~token_mask, -math.inf)
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.exp(s.float() - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1)).to(dt)
    out = torch.matmul(p, v.to(dt))
    return out.to(q.dtype), lse
