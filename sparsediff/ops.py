"""The public block-sparse attention op: input checks, backend dispatch and the ``torch.library`` op.

Dispatch (``backend="auto"``): the Triton kernel for CUDA tensors, and for CPU tensors when the Triton
interpreter is on (``TRITON_INTERPRET=1`` at import time, the way CI runs kernels); otherwise the
pure-PyTorch twin :func:`sparsediff.reference.block_sparse_attention`. ``backend="triton"`` or
``"reference"`` forces one (a readable error says why Triton cannot run, if it cannot). On a GPU,
``"auto"`` falling back to the twin (a block size the kernel does not take, too little shared memory...)
is logged once per reason at WARNING: it runs, correctly, but far slower than the kernel.

Gradients: the op is differentiable. The backward recomputes the forward with the PyTorch twin under
autograd (whatever backend ran the forward) and differentiates that -- correct, memory-hungry
(it materialises the twin's intermediates for the kept blocks), and meant for fine-tuning experiments
and gradient checks, not fast training.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import reference
from .mask import BlockSparseMask
from .support import BACKENDS as _BACKENDS
from .support import MAX_HEAD_DIM, SUPPORTED_DTYPES, cdiv

logger = logging.getLogger(__name__)

__all__ = ["block_sparse_attention", "check_inputs", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "triton_reasons"]


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask) -> None:
    """Raise a readable error when q/k/v/mask do not fit together. Shapes only; no data is read."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, H, N, D], got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported dtypes are float16, bfloat16, float32")
    if not isinstance(mask, BlockSparseMask):
        raise TypeError(f"mask must be a sparsediff.BlockSparseMask, got {type(mask).__name__}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device} but q is on {q.device}; move it with mask.to(q.device)")
    B, H, Nq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or v.shape[0] != B or v.shape[1] != H:
        raise ValueError(
            f"batch/heads differ: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
            "(layout is [B, H, N, D]; pass x.transpose(1, 2) for diffusers' [B, N, H, D])"
        )
    if k.shape[3] != D:
        raise ValueError(f"q and k head dims differ: {D} vs {k.shape[3]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"k and v sequence lengths differ: {k.shape[2]} vs {v.shape[2]}")
    if v.shape[3] != D:
        raise ValueError(f"v head dim {v.shape[3]} != q/k head dim {D} (equal head dims are required)")
    if D < 1 or D > MAX_HEAD_DIM:
        raise ValueError(f"head dim {D} is not supported; supported head dims are 1..{MAX_HEAD_DIM}")
    Nk = k.shape[2]
    if tuple(mask.seq_lens) != (Nq, Nk):
        raise ValueError(
            f"mask was built for seq_lens {tuple(mask.seq_lens)} but q/k have (Nq, Nk)=({Nq}, {Nk})"
        )
    if mask.heads != H:
        raise ValueError(f"mask has {mask.heads} heads but q has {H}")
    if mask.batch not in (1, B):
        raise ValueError(f"mask batch {mask.batch} must be 1 (shared) or the input batch {B}")


@functools.lru_cache(maxsize=1)
def _kernels():
    """Import the Triton kernels lazily; returns the module or the import error."""
    try:
        # the top-level kernels/ folder, installed as sparsediff.kernels
        from .kernels import launch as kernels
    except Exception as e:  # pragma: no cover - depends on platform
        return e
    return kernels


def triton_reasons(q: torch.Tensor, mask: BlockSparseMask | None = None) -> list[str]:
    """Why the Triton kernel cannot run these inputs (empty list = it can)."""
    mod = _kernels()
    if isinstance(mod, Exception):
        return [f"sparsediff.kernels failed to import: {mod}"]
    if not mod.triton_available():
        return ["triton is not installed (pip install triton; Linux only)"]
    reasons = []
    if q.device.type == "cpu" and not mod.interpreter_enabled():
        reasons.append("CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before import)")
    elif q.device.type not in ("cpu", "cuda"):
        reasons.append(f"device {q.device.type} is not supported by the Triton kernel")
    if mask is not None and not reasons:
        reasons += mod.not_supported_reasons(q, mask.block_size)
    return reasons


def _is_gpu(t: torch.Tensor) -> bool:
    return t.device.type == "cuda"


#: reasons already warned about (``"auto"`` running the twin on a GPU); one WARNING each per process
_WARNED: set[str] = set()


def _warn_reference_on_gpu(reasons: list[str]) -> None:
    key = "; ".join(reasons)
    if key in _WARNED:
        return
    _WARNED.add(key)
    logger.warning(
        "sparsediff: the Triton kernel cannot run these inputs on the GPU (%s): running the PyTorch "
        "reference twin instead (correct, much slower). Use a block size that is a power of two >= 16 "
        "(block_size=64 is the default), or backend='reference' to choose this explicitly.",
        key,
    )


def _run(q, k, v, kv_indices, kv_counts, block_q, block_kv, seq_q, seq_k, scale, backend):
    mask = BlockSparseMask(kv_indices, kv_counts, (block_q, block_kv), (seq_q, seq_k), validate=False)
    if backend == "auto":
        reasons = triton_reasons(q, mask)
        if reasons and _is_gpu(q):
            _warn_reference_on_gpu(reasons)
        backend = "triton" if not reasons else "reference"
    if backend == "triton":
        reasons = triton_reasons(q, mask)
        if reasons:
            raise RuntimeError("the Triton kernel cannot run these inputs: " + "; ".join(reasons))
        return _kernels().block_sparse_attention_fwd(
            q, k, v, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv, scale=scale
        )
    return reference._forward(q, k, v, mask, scale)


@torch.library.custom_op("sparsediff::block_sparse_attn", mutates_args=())
def _block_sparse_attn_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _run(q, k, v, kv_indices, kv_counts, block_q, block_kv, q.shape[2], k.shape[2], scale, backend)


@_block_sparse_attn_op.register_fake
def _(q, k, v, kv_indices, kv_counts, block_q, block_kv, scale, backend):
    B, H, Nq, _ = q.shape
    return torch.empty_like(q), q.new_empty((B, H, Nq), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_indices, kv_counts, block_q, block_kv, scale, _backend = inputs
    ctx.save_for_backward(q, k, v, kv_indices, kv_counts)
    ctx.blocks, ctx.scale = (block_q, block_kv), scale


def _backward(ctx, grad_out, grad_lse):
    """Gradients of q, k, v by recomputing the block-sparse forward with differentiable PyTorch ops,
    one chunk of query blocks at a time (each chunk's graph is differentiated and freed before the
    next, so memory stays at one chunk's scores)."""
    q, k, v, kv_indices, kv_counts = ctx.saved_tensors
    (bq, bk), scale = ctx.blocks, ctx.scale
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    Qb = cdiv(Nq, bq)
    idx = kv_indices.to(q.device).long().expand(B, H, Qb, -1)
    cnt = kv_counts.to(q.device).long().expand(B, H, Qb)
    dq = torch.zeros(B, H, Nq, D, dtype=torch.float32, device=q.device)
    kf, vf = (x.detach().float().requires_grad_(True) for x in (k, v))
    dk, dv = torch.zeros_like(kf), torch.zeros_like(vf)
    go = grad_out.float() if grad_out is not None else None
    gl = grad_lse.float() if grad_lse is not None else None
    m_max = max(int(cnt.amax()) if cnt.numel() else 0, 1)
    chunk = max(1, (1 << 24) // max(B * H * bq * m_max * bk, 1))
    for c0 in range(0, Qb, chunk):
        c1 = min(Qb, c0 + chunk)
        r0, r1 = c0 * bq, min(c1 * bq, Nq)
        m = int(cnt[:, :, c0:c1].amax())
        if m == 0:
            continue
        C = c1 - c0
        with torch.enable_grad():
            qc = q[:, :, r0:r1].detach().float().requires_grad_(True)
            qp = torch.nn.functional.pad(qc, (0, 0, 0, C * bq - (r1 - r0))).view(B, H, C, bq, D)
            slot = torch.arange(m, device=q.device) < cnt[:, :, c0:c1, None]  # [B, H, C, m]
            tok = idx[:, :, c0:c1, :m, None] * bk + torch.arange(bk, device=q.device)  # [B, H, C, m, bk]
            valid = (slot[..., None] & (tok < Nk)).reshape(B, H, C, m * bk)
            tok = torch.where(valid, tok.reshape(B, H, C, m * bk), 0).reshape(B, H, C * m * bk, 1)
            kg = kf.gather(2, tok.expand(-1, -1, -1, D)).view(B, H, C, m * bk, D)
            vg = vf.gather(2, tok.expand(-1, -1, -1, Dv)).view(B, H, C, m * bk, Dv)
            sc = torch.einsum("bhcqd,bhckd->bhcqk", qp, kg) * scale
            sc = sc.masked_fill(~valid[:, :, :, None, :], -torch.inf)
            lse = torch.logsumexp(sc, -1)  # [B, H, C, bq]; -inf for empty rows
            finite = torch.isfinite(lse)
            p = torch.where(
                finite[..., None], sc - torch.where(finite, lse, 0.0)[..., None], -torch.inf
            ).exp()
            o = torch.einsum("bhcqk,bhckd->bhcqd", p, vg).reshape(B, H, C * bq, Dv)[:, :, : r1 - r0]
            outs, grads = [], []
            if go is not None:
                outs.append(o)
                grads.append(go[:, :, r0:r1])
            if gl is not None:
                lc = lse.reshape(B, H, C * bq)[:, :, : r1 - r0]
                fin = torch.isfinite(lc)
                outs.append(torch.where(fin, lc, 0.0))
                grads.append(torch.where(fin, gl[:, :, r0:r1], 0.0))
            if not outs:
                break
            gq, gk, gv = torch.autograd.grad(outs, (qc, kf, vf), grads, allow_unused=True)
        if gq is not None:
            dq[:, :, r0:r1] = gq
        if gk is not None:
            dk += gk
        if gv is not None:
            dv += gv
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


_block_sparse_attn_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse scaled-dot-product attention.

    Args:
        q: ``[B, H, Nq, D]`` query, the ``F.scaled_dot_product_attention`` convention. Any strides: a
            ``x.transpose(1, 2)`` view of diffusers' ``[B, N, H, D]`` tensors is read in place, no copy.
        k: ``[B, H, Nk, D]``; v: ``[B, H, Nk, D]``. Same dtype (fp16, bf16, fp32) and device as q.
        mask: :class:`BlockSparseMask` for ``(Nq, Nk)`` with ``H`` heads and batch 1 (shared) or B.
        scale: softmax scale, default ``1 / sqrt(D)``.
        return_lse: also return the log-sum-exp (natural log) ``[B, H, Nq]`` float32.
        backend: ``"auto"`` (Triton on CUDA / under ``TRITON_INTERPRET=1``, else the PyTorch twin),
            ``"triton"`` or ``"reference"``.

    Returns:
        ``out`` -- same shape, dtype and memory layout as ``q`` -- or ``(out, lse)``.
        Query rows whose mask row lists no key block get ``out = 0`` and ``lse = -inf`` (never NaN).
        Any ``Nq``/``Nk``: ragged last blocks are masked inside the kernel.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    check_inputs(q, k, v, mask)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    bq, bk = mask.block_size
    out, lse = _block_sparse_attn_op(q, k, v, mask.kv_indices, mask.kv_counts, bq, bk, float(scale), backend)
    return (out, lse) if return_lse else out
