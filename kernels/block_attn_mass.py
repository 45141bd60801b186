"""Block attention mass from a cached log-sum-exp (Triton): one QK^T pass, no P.V.

``mass[b, h, i, j] = sum_{rows r in q-block i, cols c in k-block j} exp(q_r . k_c * scale - lse[b, h, r])``

i.e. the softmax probability each (query block, key block) pair carries when ``lse`` is the row's
log-sum-exp over the keys it attends (dense attention: each row of ``mass`` over j sums to the number
of valid rows in the query block). Rows past ``Nq``, columns past ``Nk`` and rows with ``lse = -inf``
contribute 0. Grid ``(Qb, B * H)``; each program loops over all ``Kb`` key blocks and writes one float
per block. Twin: :func:`sparsediff.block_mass.block_mass_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .block_sparse_attn import _LOG2E, _dot, _dot_mode, launch_config, not_supported_reasons

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
    DOT_MODE: tl.constexpr,
):  # fmt: skip
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_n = tl.arange(0, BLOCK_KV)
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
    for j in range(Kb):
        offs_k = j * BLOCK_KV + offs_n
        col_ok = offs_k < Nk
        kt = tl.load(
            k_base + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        s = _dot(q, kt, DOT_MODE) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(row_ok[:, None] & col_ok[None, :], p, 0.0)
        tl.store(o_base + j * stride_ok, tl.sum(tl.sum(p, 1), 0))


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
    block_d = max(16, triton.next_power_of_2(D))
    num_warps, num_stages = launch_config(block_q, block_kv, block_d, q.element_size())
    _block_mass_kernel[(Qb, B * H)](
        q, k, lse, out,
        *q.stride(), *k.stride(), *lse.stride(), *out.stride(),
        H, Nq, Nk, Kb,
        float(scale) * _LOG2E,
        HEAD_DIM=D,
        BLOCK_Q=block_q,
        BLOCK_KV=block_kv,
        BLOCK_D=block_d,
        DOT_MODE=_dot_mode(q),
        num_warps=num_warps,
        num_stages=num_stages,
    )  # fmt: skip
    return out
