"""Block-sparse FlashAttention-2 backward (Triton): three kernels, from the forward's output and LSE.

With ``p_ij = exp(scale * q_i.k_j - lse_i)`` on the listed keys and ``delta_i = sum_d dO_id O_id -
dlse_i``: ``dS = P * (dO V^T - delta)``, ``dQ = scale * dS K``, ``dK = scale * dS^T Q``, ``dV = P^T dO``.

1. ``_bwd_preprocess_kernel`` -- ``delta`` ``[B, H, Nq]`` fp32 (grid ``(ceil(Nq / TILE), B * H)``).
2. ``_bwd_dq_kernel`` -- one program per (query tile, batch x head), exactly the forward's walk: the
   ``kv_counts[b, h, qb]`` key blocks of ``kv_indices`` in ``BLOCK_KV // TILE_KV`` key tiles; P is
   recomputed from the LSE (no online softmax), dQ accumulates in fp32 and is written once (no atomics).
3. ``_bwd_dkdv_kernel`` -- one program per (key tile, batch x head): the key tile of mask key block ``kb``
   walks the transposed lists ``q_indices[b, h, kb, :q_counts]`` (the query blocks that list ``kb``,
   built by ``sparsediff.reference.transposed_block_lists``) in ``BLOCK_Q // TILE_Q`` query tiles, with
   ``S^T = K Q^T`` so no transpose of the accumulators is needed; dK and dV accumulate in fp32 and are
   written once.

Scores are pre-multiplied by ``scale * log2(e)`` (``exp2``), as in the forward; P and dS enter their dots
in the input dtype (fp32 for fp32 inputs, IEEE dot, no TF32), bf16 is upcast under the interpreter.
Edges: ragged query / key blocks are load-masked and their scores set to -inf; rows with lse = -inf
(empty rows) and query rows past ``Nq`` take lse = +inf so P = 0 there (zero gradients, never NaN);
the head dim is padded to ``BLOCK_D`` with masked loads. Every tensor is addressed through its strides,
so ``[B, N, H, D]`` transpose views are read in place; dq / dk / dv are ``empty_like`` q / k / v.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .block_sparse_attn import (
    _LOG2E,
    _SMEM_BUDGET,
    LaunchConfig,
    _dot,
    _dot_mode,
    _is_pow2_ge16,
    _smem_limit,
    not_supported_reasons,
)

__all__ = ["BwdLaunchConfig", "block_sparse_attention_bwd", "bwd_launch_config"]


@triton.jit
def _bwd_preprocess_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_lb, stride_lh, stride_ln,
    H, Nq,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid * TILE + tl.arange(0, TILE)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < Nq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
        mask=ok, other=0.0,
    ).to(tl.float32)  # fmt: skip
    do = tl.load(
        DOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd,
        mask=ok, other=0.0,
    ).to(tl.float32)  # fmt: skip
    delta = tl.sum(o * do, 1)
    row = b * stride_lb + h * stride_lh + offs_m * stride_ln  # DLse and Delta share [B, H, Nq] strides
    if HAS_DLSE:
        dl = tl.load(DLse + row, mask=offs_m < Nq, other=0.0)
        delta -= dl
    tl.store(Delta + row, delta, mask=offs_m < Nq)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, KvIdx, KvCnt,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_xb, stride_xh, stride_xn, stride_xd,  # dQ
    stride_lb, stride_lh, stride_ln,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    H, Nq, Nk,
    qk_scale,  # softmax scale * log2(e)
    scale,  # softmax scale
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_Q: tl.constexpr,  # query rows per program (divides BLOCK_Q)
    TILE_KV: tl.constexpr,  # keys per inner step (divides BLOCK_KV)
    DOT_MODE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    qb = pid // (BLOCK_Q // TILE_Q)

    offs_m = pid * TILE_Q + tl.arange(0, TILE_Q)
    offs_n = tl.arange(0, TILE_KV)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM
    qmask = row_ok[:, None] & d_ok[None, :]

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
        mask=qmask, other=0.0,
    )  # fmt: skip
    do = tl.load(
        DOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gn + offs_d[None, :] * stride_gd,
        mask=qmask, other=0.0,
    )  # fmt: skip
    row = b * stride_lb + h * stride_lh + offs_m * stride_ln
    lse = tl.load(Lse + row, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # log2 domain; empty -> P=0
    delta = tl.load(Delta + row, mask=row_ok, other=0.0)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    idx_base = KvIdx + b * stride_ib + h * stride_ih + qb * stride_iq
    count = tl.load(KvCnt + b * stride_cb + h * stride_ch + qb * stride_cq)
    dq = tl.zeros([TILE_Q, BLOCK_D], dtype=tl.float32)

    SPLIT: tl.constexpr = BLOCK_KV // TILE_KV
    for t in tl.range(0, count * SPLIT):
        kb = tl.load(idx_base + (t // SPLIT) * stride_ik)
        offs_k = kb * BLOCK_KV + (t % SPLIT) * TILE_KV + offs_n
        col_ok = offs_k < Nk
        kt = tl.load(
            k_base + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, TILE_KV]  # fmt: skip
        vt = tl.load(
            v_base + offs_k[None, :] * stride_vn + offs_d[:, None] * stride_vd,
            mask=col_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, TILE_KV]  # fmt: skip
        s = _dot(q, kt, DOT_MODE)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, vt, DOT_MODE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), DOT_MODE)

    dq = dq * scale
    tl.store(
        DQ + b * stride_xb + h * stride_xh + offs_m[:, None] * stride_xn + offs_d[None, :] * stride_xd,
        dq.to(DQ.dtype.element_ty), mask=qmask,
    )  # fmt: skip


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV, QIdx, QCnt,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_gb, stride_gh, stride_gn, stride_gd,
    stride_xb, stride_xh, stride_xn, stride_xd,  # dK
    stride_yb, stride_yh, stride_yn, stride_yd,  # dV
    stride_lb, stride_lh, stride_ln,
    stride_ib, stride_ih, stride_ik, stride_iq,
    stride_cb, stride_ch, stride_ck,
    H, Nq, Nk,
    qk_scale,
    scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TILE_Q: tl.constexpr,  # query rows per inner step (divides BLOCK_Q)
    TILE_KV: tl.constexpr,  # key rows per program (divides BLOCK_KV)
    DOT_MODE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    kb = pid // (BLOCK_KV // TILE_KV)  # the mask's key block this tile lies in

    offs_n = pid * TILE_KV + tl.arange(0, TILE_KV)
    offs_m = tl.arange(0, TILE_Q)
    offs_d = tl.arange(0, BLOCK_D)
    key_ok = offs_n < Nk
    d_ok = offs_d < HEAD_DIM
    kmask = key_ok[:, None] & d_ok[None, :]

    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
        mask=kmask, other=0.0,
    )  # fmt: skip
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
        mask=kmask, other=0.0,
    )  # fmt: skip
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + b * stride_gb + h * stride_gh
    l_base = Lse + b * stride_lb + h * stride_lh
    dl_base = Delta + b * stride_lb + h * stride_lh
    idx_base = QIdx + b * stride_ib + h * stride_ih + kb * stride_ik
    count = tl.load(QCnt + b * stride_cb + h * stride_ch + kb * stride_ck)
    dk = tl.zeros([TILE_KV, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TILE_KV, BLOCK_D], dtype=tl.float32)

    SPLIT: tl.constexpr = BLOCK_Q // TILE_Q
    for t in tl.range(0, count * SPLIT):
        qblk = tl.load(idx_base + (t // SPLIT) * stride_iq)
        offs_q = qblk * BLOCK_Q + (t % SPLIT) * TILE_Q + offs_m
        q_ok = offs_q < Nq
        qt = tl.load(
            q_base + offs_q[None, :] * stride_qn + offs_d[:, None] * stride_qd,
            mask=q_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, TILE_Q]  # fmt: skip
        dot_ = tl.load(
            do_base + offs_q[None, :] * stride_gn + offs_d[:, None] * stride_gd,
            mask=q_ok[None, :] & d_ok[:, None], other=0.0,
        )  # [BLOCK_D, TILE_Q]  # fmt: skip
        lse = tl.load(l_base + offs_q * stride_ln, mask=q_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(dl_base + offs_q * stride_ln, mask=q_ok, other=0.0)
        st = _dot(k, qt, DOT_MODE)  # [TILE_KV, TILE_Q]
        st = tl.where(key_ok[:, None], st * qk_scale, float("-inf"))
        pt = tl.exp2(st - lse[None, :])
        dv += _dot(pt.to(dot_.dtype), tl.trans(dot_), DOT_MODE)
        dpt = _dot(v, dot_, DOT_MODE)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt), DOT_MODE)

    dk = dk * scale
    tl.store(
        DK + b * stride_xb + h * stride_xh + offs_n[:, None] * stride_xn + offs_d[None, :] * stride_xd,
        dk.to(DK.dtype.element_ty), mask=kmask,
    )  # fmt: skip
    tl.store(
        DV + b * stride_yb + h * stride_yh + offs_n[:, None] * stride_yn + offs_d[None, :] * stride_yd,
        dv.to(DV.dtype.element_ty), mask=kmask,
    )  # fmt: skip


class BwdLaunchConfig(NamedTuple):
    """Launch configs of the backward's two main kernels (the preprocess kernel takes ``dq``'s warps)."""

    dq: LaunchConfig  # tile_q: query rows per program; tile_kv: keys per inner step
    dkdv: LaunchConfig  # tile_kv: key rows per program; tile_q: query rows per inner step


def _bwd_smem_bytes(rows: int, step: int, block_d: int, elem_bytes: int, num_stages: int) -> int:
    """Conservative shared memory of one backward program: two resident ``rows x block_d`` tiles (q, dO /
    k, v) plus ``num_stages`` pairs of streamed ``step x block_d`` tiles and of their fp32 lse / delta
    vectors (checked against Triton 3.9 at every shipped configuration by tests/test_kernel_inspect.py)."""
    return (2 * rows + 2 * step * num_stages) * block_d * elem_bytes + 2 * step * 4 * num_stages


def bwd_launch_config(
    block_q: int, block_kv: int, block_d: int, elem_bytes: int = 2, smem_budget: int = _SMEM_BUDGET
) -> BwdLaunchConfig:
    """Default backward launch for a ``block_q x block_kv`` mask block at padded head dim ``block_d``.

    The backward keeps more live tiles than the forward (dQ: q, dO and the fp32 dQ accumulator plus
    the P / dP score tiles; dK/dV: k, v and two fp32 accumulators plus the transposed score tiles), so
    its tiles are smaller:

    - dQ: ``min(block_q, 64)`` query rows per program (32 at ``block_d >= 256``), key steps of
      ``min(block_kv, 32)``, 4 warps;
    - dK/dV: ``min(block_kv, 64)`` key rows per program; query steps of ``min(block_q, 16)`` with 4 warps
      at ``block_d <= 64``, of ``min(block_q, 32)`` with 8 warps above (16 at ``block_d >= 256``);
    - 2 pipeline stages (1 at ``block_d >= 256``), fewer while :func:`_bwd_smem_bytes` exceeds the budget.

    Measured with Triton 3.9 (``python -m sparsediff.kernels.inspect``): at bf16 / fp16, head dims 64 /
    96 / 128 and blocks 64 / 128 these compile without a spill for sm_80 and sm_90, at most ~200
    registers on sm_80 (a 64 x 64 dQ step or a 32-query dK/dV step at head dim 64 reached the 255
    ceiling or spilled there). Not tuned on a GPU.
    """
    narrow = block_d <= 64
    wide = block_d >= 256
    stages = 1 if wide else 2
    dq_rows, dq_step = min(block_q, 32 if wide else 64), min(block_kv, 32)
    kv_rows, kv_step = min(block_kv, 64), min(block_q, 16 if narrow or wide else 32)

    def fit(rows, step, s):
        while s > 1 and _bwd_smem_bytes(rows, step, block_d, elem_bytes, s) > smem_budget:
            s -= 1
        return s

    return BwdLaunchConfig(
        LaunchConfig(4, fit(dq_rows, dq_step, stages), dq_rows, dq_step),
        LaunchConfig(4 if narrow else 8, fit(kv_rows, kv_step, stages), kv_step, kv_rows),
    )


def _strides(t: torch.Tensor, shared_batch: bool) -> tuple:
    return ((0 if shared_batch else t.stride(0)),) + tuple(t.stride()[1:])


def _bwd_launches(
    q, k, v, out, dout, lse, delta, dlse, dq, dk, dv, kv_indices, kv_counts, q_indices, q_counts, *,
    block_q, block_kv, scale, dot_mode, smem_limit, cfg: BwdLaunchConfig | None = None,
) -> dict[str, tuple[tuple[int, int], tuple, dict]]:  # fmt: skip
    """``{"preprocess" | "dq" | "dkdv": (grid, args, meta)}`` of one backward, each launched as
    ``kernel[grid](*args, **meta)`` in that order: the one place the launches are built (the runtime
    and ``sparsediff.kernels.inspect``). ``lse`` / ``delta`` / ``dlse`` (None = no LSE gradient) are
    ``[B, H, Nq]`` float32 with one set of strides."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    if cfg is None:
        cfg = bwd_launch_config(block_q, block_kv, block_d, q.element_size(), min(smem_limit, _SMEM_BUDGET))
    for name, tile, block in (
        ("dq tile_q", cfg.dq.tile_q, block_q), ("dq tile_kv", cfg.dq.tile_kv, block_kv),
        ("dkdv tile_q", cfg.dkdv.tile_q, block_q), ("dkdv tile_kv", cfg.dkdv.tile_kv, block_kv),
    ):  # fmt: skip
        if not (_is_pow2_ge16(tile) and tile <= block):
            raise ValueError(f"{name}={tile} must be a power of two >= 16 and <= the block ({block})")
    if lse.stride() != delta.stride() or (dlse is not None and dlse.stride() != lse.stride()):
        raise ValueError("lse, delta and dlse must share strides")
    pre_tile = 64
    preprocess = (
        (triton.cdiv(Nq, pre_tile), B * H),
        (out, dout, dlse if dlse is not None else delta, delta, *out.stride(), *dout.stride(),
         *lse.stride(), H, Nq),
        dict(HEAD_DIM=D, BLOCK_D=block_d, TILE=pre_tile, HAS_DLSE=dlse is not None, num_warps=4,
             num_stages=1),
    )  # fmt: skip
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    kw = dict(HEAD_DIM=D, BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, DOT_MODE=dot_mode)
    shared = kv_indices.shape[0] == 1  # the mask is shared by the batch: batch stride 0
    dq_launch = (
        (triton.cdiv(Nq, cfg.dq.tile_q), B * H),
        (
            q, k, v, dout, lse, delta, dq, kv_indices, kv_counts, *common, *dq.stride(), *lse.stride(),
            *_strides(kv_indices, shared), *_strides(kv_counts, shared), H, Nq, Nk,
            float(scale) * _LOG2E, float(scale),
        ),
        dict(kw, TILE_Q=cfg.dq.tile_q, TILE_KV=cfg.dq.tile_kv, num_warps=cfg.dq.num_warps,
             num_stages=cfg.dq.num_stages),
    )  # fmt: skip
    dkdv_launch = (
        (triton.cdiv(Nk, cfg.dkdv.tile_kv), B * H),
        (
            q, k, v, dout, lse, delta, dk, dv, q_indices, q_counts, *common, *dk.stride(), *dv.stride(),
            *lse.stride(), *_strides(q_indices, shared), *_strides(q_counts, shared), H, Nq, Nk,
            float(scale) * _LOG2E, float(scale),
        ),
        dict(kw, TILE_Q=cfg.dkdv.tile_q, TILE_KV=cfg.dkdv.tile_kv, num_warps=cfg.dkdv.num_warps,
             num_stages=cfg.dkdv.num_stages),
    )  # fmt: skip
    return {"preprocess": preprocess, "dq": dq_launch, "dkdv": dkdv_launch}


#: kernel of each launch of :func:`_bwd_launches`, in launch order
KERNELS = {"preprocess": _bwd_preprocess_kernel, "dq": _bwd_dq_kernel, "dkdv": _bwd_dkdv_kernel}


def block_sparse_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    q_indices: torch.Tensor,
    q_counts: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float,
    cfg: BwdLaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the backward. Shapes: q/out/dout ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]`` (any strides, one
    dtype), lse / dlse ``[B, H, Nq]`` float32 (the forward's; dlse None = zero), kv_indices ``[Bm, H, Qb,
    Kmax]`` / kv_counts ``[Bm, H, Qb]`` as in the forward, q_indices ``[Bm, H, Kb, Qmax]`` / q_counts
    ``[Bm, H, Kb]`` their transposed lists (``sparsediff.reference.transposed_block_lists``), ``Bm in
    {1, B}``. Returns ``(dq, dk, dv)``, ``empty_like`` q / k / v. Empty rows get zero gradients.
    ``cfg`` overrides :func:`bwd_launch_config`."""
    reasons = not_supported_reasons(q, (block_q, block_kv))
    if reasons:
        raise ValueError("block_sparse_attention_bwd: " + "; ".join(reasons))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if B * H == 0 or Nq == 0 or Nk == 0 or (dout is None and dlse is None):
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout is None:
        dout = torch.zeros_like(out)
    lse = lse.float().contiguous()
    delta = torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    kv_indices, kv_counts = kv_indices.to(torch.int32), kv_counts.to(torch.int32)
    q_indices, q_counts = q_indices.to(torch.int32), q_counts.to(torch.int32)
    launches = _bwd_launches(
        q, k, v, out, dout, lse, delta, dlse, dq, dk, dv, kv_indices, kv_counts, q_indices, q_counts,
        block_q=block_q, block_kv=block_kv, scale=scale, dot_mode=_dot_mode(q),
        smem_limit=_smem_limit(q.device) if q.is_cuda else _SMEM_BUDGET, cfg=cfg,
    )  # fmt: skip
    for name, (grid, args, meta) in launches.items():
        KERNELS[name][grid](*args, **meta)
    return dq, dk, dv
