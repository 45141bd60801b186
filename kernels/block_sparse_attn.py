"""Block-sparse FlashAttention forward (Triton): each query block visits only its listed key blocks.

Launch: one program per (query tile, batch x head) -- grid ``(ceil(Nq / TILE_Q), B * H)`` -- so all
heads run in one launch even when their masks (and kv-block counts) differ. The kernel's tiles are
decoupled from the mask's blocks (:func:`launch_config`): a program owns ``TILE_Q`` query rows of mask
query block ``qb`` (``TILE_Q`` divides ``BLOCK_Q``), loads that ``TILE_Q x D`` query tile once, then runs
one loop over the ``kv_counts[b, h, qb]`` key blocks listed in ``kv_indices[b, h, qb, :]``, each in
``BLOCK_KV // TILE_KV`` key tiles (a 128-token mask block is two 64-key steps), keeping an online
softmax in fp32 (scores pre-multiplied by ``scale * log2(e)`` so the exponentials are ``exp2``). P.V runs
in the input dtype (fp32 for fp32 inputs, no TF32) with fp32 accumulation. Loads go through pointer
tensors (no TMA descriptors), so the same code runs on sm_80, sm_90 and under the interpreter; Triton
pipelines the loop with ``num_stages`` (``cp.async`` multi-buffering).

Edge handling, all inside the kernel (callers never pad):
- ragged last query / key block: loads masked with ``< Nq`` / ``< Nk``, out-of-range scores -> -inf;
- head dim D: padded to ``BLOCK_D = max(16, next_pow2(D))`` with masked loads (``tl.dot`` needs >= 16);
- empty rows (count 0): out = 0 and lse = -inf; the running max is guarded so -inf - -inf never occurs.

Strides are passed for every tensor, so ``x.transpose(1, 2)`` views of diffusers' ``[B, N, H, D]``
buffers are read in place; the output is ``torch.empty_like(q)`` (same layout as q).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..support import MAX_HEAD_DIM
from ..support import SUPPORTED_DTYPES as _DTYPES

__all__ = [
    "LaunchConfig",
    "block_sparse_attention_fwd",
    "launch_config",
    "not_supported_reasons",
    "tune_launch_config",
]

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2); constexpr so @triton.jit code may read it


# DOT_MODE: how tl.dot runs (fp32 accumulation in every mode).
_DOT_NATIVE = 0  # fp16 / bf16 tensor-core dot
_DOT_IEEE = 1  # fp32 inputs: full-precision fp32 dot (no TF32), so fp32 results match the fp32 oracle
_DOT_UPCAST = 2  # bf16 under the Triton interpreter, whose dot multiplies bf16 bit patterns as uint16
#                 (triton 3.x numpy matmul on the raw storage); bf16 x bf16 products are exact in fp32,
#                 so upcasting the operands gives the same result as a bf16 dot with fp32 accumulation.


@triton.jit
def _dot(a, b, DOT_MODE: tl.constexpr):
    if DOT_MODE == 1:
        return tl.dot(a, b, input_precision="ieee")
    elif DOT_MODE == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _block_sparse_attn_fwd_kernel(
    Q, K, V, Out, Lse, KvIdx, KvCnt,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_lb, stride_lh, stride_ln,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_cq,
    H, Nq, Nk,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: tl.constexpr,  # true head dim; constexpr so the d-mask folds away when HEAD_DIM == BLOCK_D
    BLOCK_Q: tl.constexpr,  # query tokens per mask block
    BLOCK_KV: tl.constexpr,  # key tokens per mask block
    BLOCK_D: tl.constexpr,
    TILE_Q: tl.constexpr,  # query rows per program (divides BLOCK_Q)
    TILE_KV: tl.constexpr,  # keys per inner step (divides BLOCK_KV)
    DOT_MODE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    qb = pid // (BLOCK_Q // TILE_Q)  # the mask's query block this tile lies in

    offs_m = pid * TILE_Q + tl.arange(0, TILE_Q)
    offs_n = tl.arange(0, TILE_KV)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Nq
    d_ok = offs_d < HEAD_DIM

    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    # kv_indices / kv_counts have batch stride 0 when the mask is shared by the batch.
    idx_base = KvIdx + b * stride_ib + h * stride_ih + qb * stride_iq
    count = tl.load(KvCnt + b * stride_cb + h * stride_ch + qb * stride_cq)

    m_i = tl.full([TILE_Q], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([TILE_Q], dtype=tl.float32)
    acc = tl.zeros([TILE_Q, BLOCK_D], dtype=tl.float32)

    # One flat loop over (listed key block, key tile inside it), so that the software pipeliner sees a
    # single loop whatever the mask block / key tile ratio.
    SPLIT: tl.constexpr = BLOCK_KV // TILE_KV
    for t in tl.range(0, count * SPLIT):
        kb = tl.load(idx_base + (t // SPLIT) * stride_ik)
        offs_k = kb * BLOCK_KV + (t % SPLIT) * TILE_KV + offs_n
        col_ok = offs_k < Nk
        kt = tl.load(
            k_base + offs_k[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )  # [BLOCK_D, TILE_KV]
        vv = tl.load(
            v_base + offs_k[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=col_ok[:, None] & d_ok[None, :],
            other=0.0,
        )  # [TILE_KV, BLOCK_D]
        s = _dot(q, kt, DOT_MODE)
        s = tl.where(col_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose max is still -inf has seen no valid key: use 0 so that -inf - -inf is never formed.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(vv.dtype), vv, DOT_MODE)
        m_i = m_new

    nonempty = l_i > 0.0
    l_safe = tl.where(nonempty, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(nonempty, m_i * _LN2 + tl.log(l_safe), float("-inf"))

    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m * stride_ln, lse, mask=row_ok)


def _dot_mode(q: torch.Tensor) -> int:
    if q.dtype == torch.float32:
        return _DOT_IEEE
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":  # CPU tensors only run under the interpreter
        return _DOT_UPCAST
    return _DOT_NATIVE


def _is_pow2_ge16(x: int) -> bool:
    return isinstance(x, int) and x >= 16 and (x & (x - 1)) == 0


def not_supported_reasons(q: torch.Tensor, block_size) -> list[str]:
    """Readable reasons why the kernel cannot run ``q`` with ``block_size=(block_q, block_kv)`` ([] = it can)."""
    reasons = []
    bq, bk = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    for name, v in (("block_q", bq), ("block_kv", bk)):
        if not _is_pow2_ge16(v):
            reasons.append(f"{name}={v} is not a power of two >= 16")
    if q.dtype not in _DTYPES:
        reasons.append(f"dtype {q.dtype} is not supported (float16, bfloat16, float32)")
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        reasons.append(f"head dim {d} > {MAX_HEAD_DIM}")
    elif d < 1:
        reasons.append(f"head dim {d} < 1")
    if q.device.type not in ("cuda", "cpu"):
        reasons.append(f"device {q.device.type} is not supported by the Triton kernel")
    if q.device.type == "cuda" and not reasons:
        block_d = max(16, triton.next_power_of_2(d))
        tq, tk = launch_config(bq, bk, block_d, q.element_size())[2:]
        need = _smem_bytes(tq, tk, block_d, q.element_size(), 1)
        if need > _smem_limit(q.device):
            reasons.append(
                f"{str(q.dtype).split('.')[-1]} tiles {tq}x{tk} at head dim {d} need {need // 1024} KiB of shared "
                f"memory (> {_smem_limit(q.device) // 1024} KiB on this GPU); use bf16/fp16 or smaller blocks"
            )
    return reasons


#: Default shared-memory budget (bytes) for choosing pipeline stages: fits A100 (163 KiB) and H100.
_SMEM_BUDGET = 160 * 1024


def _smem_bytes(tile_q: int, tile_kv: int, block_d: int, elem_bytes: int, num_stages: int) -> int:
    """Conservative shared-memory estimate of one program: a ``tile_q x block_d`` Q tile plus
    ``num_stages`` K and V tiles of ``tile_kv x block_d``. Exact for sm_90 compiles and an upper bound
    for sm_80 ones, which keep one stage fewer in flight (checked against Triton 3.9 for every shipped
    configuration by ``tests/test_kernel_inspect.py``)."""
    return (tile_q + 2 * tile_kv * num_stages) * block_d * elem_bytes


@functools.lru_cache(maxsize=16)
def _smem_limit(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or _SMEM_BUDGET)


class LaunchConfig(NamedTuple):
    """How the kernels are launched for one (mask block, head dim, dtype) configuration."""

    num_warps: int
    num_stages: int
    tile_q: int  # query rows per program; divides block_q
    tile_kv: int  # keys per inner-loop step; divides block_kv


def launch_config(
    block_q: int, block_kv: int, block_d: int, elem_bytes: int = 2, smem_budget: int = _SMEM_BUDGET
) -> LaunchConfig:
    """Default launch for a ``block_q x block_kv`` mask block at padded head dim ``block_d``.

    The kernel's tiles are decoupled from the mask's blocks, so that the fp32 score tile and the
    accumulator fit in registers whatever the block size:

    - query tile ``min(block_q, 128)`` rows (``min(block_q, 64)`` at ``block_d = 256``); a larger
      mask block runs as several programs that read the same key list;
    - key tile ``min(block_kv, 64)`` (``min(block_kv, 32)`` at ``block_d = 256``): a 128-token mask block
      is processed as two 64-key steps of one loop, so the score tile is at most 128 x 64;
    - 8 warps for a 128-row query tile (16 rows per warp: two warp groups on sm_90), else 4;
    - 3 pipeline stages, 2 for a 64-row tile at ``block_d >= 128`` (a third stage takes sm_80 to the
      255-register ceiling), then fewer while :func:`_smem_bytes` exceeds ``smem_budget``; at least 1.

    With bf16 / fp16 at head dims 64, 96 and 128 and blocks of 64 and 128 this compiles without a
    register spill for sm_80 and sm_90 (``python -m sparsediff.kernels.inspect``, checked in CI by
    ``tests/test_kernel_inspect.py``). fp32 (IEEE dot, no tensor cores) is a correctness path, not tuned.
    """
    wide = block_d >= 256
    tile_q = min(block_q, 64 if wide else 128)
    tile_kv = min(block_kv, 32 if wide else 64)
    num_warps = 8 if tile_q >= 128 else 4
    num_stages = 2 if tile_q < 128 and block_d >= 128 else 3
    while num_stages > 1 and _smem_bytes(tile_q, tile_kv, block_d, elem_bytes, num_stages) > smem_budget:
        num_stages -= 1
    return LaunchConfig(num_warps, num_stages, tile_q, tile_kv)


#: (device, dtype, padded head dim, block_q, block_kv) -> LaunchConfig, filled only by
#: :func:`tune_launch_config` (autotuning is off unless that is called explicitly).
_TUNED: dict[tuple, LaunchConfig] = {}


@functools.lru_cache(maxsize=16)
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _config_key(q: torch.Tensor, block_q: int, block_kv: int) -> tuple:
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    return (_device_name(q.device), q.dtype, block_d, block_q, block_kv)


def tune_launch_config(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float,
    candidates: tuple[tuple[int, int], ...] = ((4, 1), (4, 2), (4, 3), (8, 1), (8, 2), (8, 3)),
) -> LaunchConfig:
    """Time ``(num_warps, num_stages)`` candidates on these CUDA inputs and cache the fastest.

    The tiles stay those of :func:`launch_config`. The result is cached per (GPU name, dtype, padded
    head dim, block sizes) for this process, and every later :func:`block_sparse_attention_fwd` call with
    that key uses it. Nothing tunes unless this is called (e.g. once at start-up with a representative
    mask). Returns the chosen config.
    """
    if q.device.type != "cuda":
        raise RuntimeError("tune_launch_config needs CUDA tensors (the interpreter has no timings)")
    key = _config_key(q, block_q, block_kv)
    if key in _TUNED:
        return _TUNED[key]
    from triton.testing import do_bench

    best = None
    for num_warps, num_stages in candidates:

        def run(w=num_warps, s=num_stages):
            return block_sparse_attention_fwd(
                q, k, v, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv, scale=scale,
                num_warps=w, num_stages=s,
            )  # fmt: skip

        try:
            ms = do_bench(run, warmup=10, rep=50)
        except Exception:  # e.g. out of shared memory for this tile: skip the candidate
            continue
        if best is None or ms < best[0]:
            best = (ms, (num_warps, num_stages))
    if best is None:
        raise RuntimeError(f"no launch config in {candidates} ran for {key}")
    block_d = max(16, triton.next_power_of_2(q.shape[-1]))
    tiles = launch_config(block_q, block_kv, block_d, q.element_size())[2:]
    _TUNED[key] = LaunchConfig(*best[1], *tiles)
    return _TUNED[key]


def _fwd_launch(
    q, k, v, out, lse, kv_indices, kv_counts, *, block_q, block_kv, scale, dot_mode, smem_limit,
    num_warps=None, num_stages=None, tile_q=None, tile_kv=None,
) -> tuple[tuple[int, int], tuple, dict]:  # fmt: skip
    """``(grid, args, meta)`` of one forward launch, ``kernel[grid](*args, **meta)``: the one place the
    launch is built. :func:`block_sparse_attention_fwd` launches it; ``sparsediff.kernels.inspect``
    compiles it for a GPU target (with ``smem_limit`` of that target) to report registers and spills.

    The config is the one :func:`tune_launch_config` cached for these inputs, else :func:`launch_config`
    with ``min(smem_limit, _SMEM_BUDGET)``; each non-None override replaces its field.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    block_d = max(16, triton.next_power_of_2(D))
    cfg = _TUNED.get(_config_key(q, block_q, block_kv)) or launch_config(
        block_q, block_kv, block_d, q.element_size(), min(smem_limit, _SMEM_BUDGET)
    )
    overrides = dict(num_warps=num_warps, num_stages=num_stages, tile_q=tile_q, tile_kv=tile_kv)
    cfg = cfg._replace(**{f: x for f, x in overrides.items() if x is not None})
    for name, tile, block in (("tile_q", cfg.tile_q, block_q), ("tile_kv", cfg.tile_kv, block_kv)):
        if not (_is_pow2_ge16(tile) and tile <= block):
            raise ValueError(f"{name}={tile} must be a power of two >= 16 and <= the block ({block})")
    shared = kv_indices.shape[0] == 1  # the mask is shared by the batch: batch stride 0
    si = (0 if shared else kv_indices.stride(0),) + kv_indices.stride()[1:]
    sc = (0 if shared else kv_counts.stride(0),) + kv_counts.stride()[1:]
    grid = (triton.cdiv(Nq, cfg.tile_q), B * H)
    args = (
        q, k, v, out, lse, kv_indices, kv_counts,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(), *si, *sc,
        H, Nq, Nk,
        float(scale) * _LOG2E,
    )  # fmt: skip
    meta = dict(
        HEAD_DIM=D, BLOCK_Q=block_q, BLOCK_KV=block_kv, BLOCK_D=block_d, TILE_Q=cfg.tile_q,
        TILE_KV=cfg.tile_kv, DOT_MODE=dot_mode, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return grid, args, meta


def block_sparse_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float,
    num_warps: int | None = None,
    num_stages: int | None = None,
    tile_q: int | None = None,
    tile_kv: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the kernel. Inputs are assumed checked (``sparsediff.ops.check_inputs``); shapes:

    q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]`` (any strides, one dtype); kv_indices ``[Bm, H, Qb, Kmax]``
    int32 and kv_counts ``[Bm, H, Qb]`` int32 with ``Bm in {1, B}`` and ``Qb = ceil(Nq / block_q)``.

    Returns ``(out, lse)``: out ``torch.empty_like(q)`` (q's layout), lse ``[B, H, Nq]`` float32, natural
    log; empty rows give out 0 and lse -inf. ``num_warps`` / ``num_stages`` / ``tile_q`` / ``tile_kv``
    override the launch config (default: the one cached by :func:`tune_launch_config`, else
    :func:`launch_config`); tiles are powers of two >= 16 that are at most the block sizes.
    """
    reasons = not_supported_reasons(q, (block_q, block_kv))
    if reasons:
        raise ValueError("block_sparse_attention_fwd: " + "; ".join(reasons))
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    Qb = -(-Nq // block_q)
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if B * H * Nq == 0:
        return out, lse
    if kv_indices.shape[0] not in (1, B) or kv_counts.shape[0] != kv_indices.shape[0]:
        raise ValueError(f"mask batch {kv_indices.shape[0]} must be 1 or {B}")
    if tuple(kv_counts.shape[1:]) != (H, Qb) or tuple(kv_indices.shape[1:3]) != (H, Qb):
        raise ValueError(
            f"kv_indices {tuple(kv_indices.shape)} / kv_counts {tuple(kv_counts.shape)} do not match "
            f"H={H}, Qb=ceil({Nq}/{block_q})={Qb}"
        )
    kv_indices = kv_indices.to(torch.int32)
    kv_counts = kv_counts.to(torch.int32)
    if Nk == 0:  # nothing to attend: every row is empty
        out.zero_()
        lse.fill_(-math.inf)
        return out, lse

    grid, args, meta = _fwd_launch(
        q, k, v, out, lse, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv, scale=scale,
        dot_mode=_dot_mode(q), smem_limit=_smem_limit(q.device) if q.is_cuda else _SMEM_BUDGET,
        num_warps=num_warps, num_stages=num_stages, tile_q=tile_q, tile_kv=tile_kv,
    )  # fmt: skip
    _block_sparse_attn_fwd_kernel[grid](*args, **meta)
    return out, lse
