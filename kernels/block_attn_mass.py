"""Block attention mass from a cached log-sum-exp (Triton): one QK^T pass, no P.V.

``mass[b, h, i, j] = sum_{rows r in q-block i, cols c in k-block j} exp(q_r . k_c * scale - lse[b, h, r])``

i.e. the softmax probability each (query block, key block) pair carries when ``lse`` is the row's
log-sum-exp over the keys it attends (dense attention: each row of ``mass`` over j sums to the number
of valid rows in the query block). Rows past ``Nq``, columns past ``Nk`` and rows with ``lse = -inf``
contribute 0. Grid ``(Qb, B * H)``; each program loops over all ``Kb`` key blocks, each in key tiles of
:func:`~.block_sparse_attn.launch_config`'s ``tile_kv``, and writes one float per block.
Twin: :func:`sparsediff.block_mass.block_mass_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_attn import (
    _LOG2E,
    _SMEM_BUDGET,
    _dot,
    _dot_mode,
    _smem_limit,
    launch_config,
    not_supported_reasons,
)

__all__ = ["block_mass"]


@triton.jit
def _block_mass_kernel(
    Q, K, Lse, Out,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_lb, stride_lh, stride_ln,
    stride_ob, stride_oh, stride_oq, stride_ok,
    H, Nq, Nk, Kb,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_KV: tl.constexpr,  # keys per step (divides BLOCK_KV): a key block is summed in BLOCK_KV // TILE_KV steps
    DOT_MODE: tl.constexpr,
):  # fmt: skip
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, TILE_KV)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    lse = tl.load(
        Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln, mask=offs_m < Nq, other=float("-inf")
    )
    row_ok = lse > float("-inf")  # also False past Nq
    lse2 = tl.where(row_ok, lse * 1.4426950408889634, 0.0)  # log2 domain, finite everywhere
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    k_base = K + b * stride_kb + h * stride_kh
    o_base = Out + b * stride_ob + h * stride_oh + qb * stride_oq
    # One flat loop over (key block, key tile inside it), as in the forward kernel; a block's mass is
    # stored after its last key tile.
    SPLIT: tl.constexpr = BLOCK_KV // TILE_KV
    mass = tl.zeros([BLOCK_Q], dtype=tl.float32)
    for t in tl.range(0, Kb * SPLIT):
        offs_k = t * TILE_KV + offs_n  # key block t // SPLIT, key tile t % SPLIT
        col_ok = offs_k < Nk
        kt = tl.load(
            k_base + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, TILE_KV]
        s = _dot(q, kt, DOT_MODE) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        mass += tl.sum(tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0), 1)
        if t % SPLIT == SPLIT - 1:
            tl.store(o_base + (t // SPLIT) * stride_ok, tl.sum(mass, 0))
            mass = tl.zeros([BLOCK_Q], dtype=tl.float32)


def _mass_launch(
    q, k, lse, out, *, block_q, block_kv, scale, dot_mode, smem_limit
) -> tuple[tuple[int, int], tuple, dict]:  # fmt: skip
    """``(grid, args, meta)`` of one block-mass launch (the one place it is built; see ``_fwd_launch``).

    One program per query block (its output is one float per key block, so the query tile is the
    block); warps, stages and the key tile come from :func:`launch_config` for the same block.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Qb, Kb = -(-Nq // block_q), -(-Nk // block_kv)
    block_d = max(16, triton.next_power_of_2(D))
    cfg = launch_config(block_q, block_kv, block_d, q.element_size(), min(smem_limit, _SMEM_BUDGET))
    args = (
        q, k, lse, out,
        *q.stride(), *k.stride(), *lse.stride(), *out.stride(),
        H, Nq, Nk, Kb,
        float(scale) * _LOG2E,
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=D, BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, TILE_KV=cfg.tile_kv,
        DOT_MODE=dot_mode, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return (Qb, B * H), args, meta


def block_mass(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, block_q: int, block_kv: int, scale: float
) -> torch.Tensor:
    """Per-block attention mass ``[B, H, Qb, Kb]`` float32 from q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]``
    (any strides, one dtype) and a cached lse ``[B, H, Nq]`` (natural log, e.g. from
    ``block_sparse_attention(..., return_lse=True)``). ``Qb = ceil(Nq / block_q)``, ``Kb = ceil(Nk / block_kv)``.
    """
    reasons = not_supported_reasons(q, (block_q, block_kv))
    if reasons:
        raise ValueError("block_mass: " + "; ".join(reasons))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if k.shape[:2] != (B, H) or k.shape[3] != D or k.dtype != q.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} and k {tuple(k.shape)} {k.dtype} do not match")
    if tuple(lse.shape) != (B, H, Nq):
        raise ValueError(f"lse must be [B, H, Nq]={(B, H, Nq)}, got {tuple(lse.shape)}")
    Qb, Kb = -(-Nq // block_q), -(-Nk // block_kv)
    out = torch.zeros((B, H, Qb, Kb), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    lse = lse.float()
    grid, args, meta = _mass_launch(
        q, k, lse, out, block_q=block_q, block_kv=block_kv, scale=scale, dot_mode=_dot_mode(q),
        smem_limit=_smem_limit(q.device) if q.is_cuda else _SMEM_BUDGET,
    )  # fmt: skip
    _block_mass_kernel[grid](*args, **meta)
    return out
