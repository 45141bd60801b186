"""The public block-sparse attention op: input checks, backend dispatch and the ``torch.library`` op.

Dispatch (``backend="auto"``): the Triton kernel for CUDA tensors, and for CPU tensors when the Triton
interpreter is on (``TRITON_INTERPRET=1`` at import time, the way CI runs kernels); otherwise the
pure-PyTorch twin :func:`sparsediff.reference.block_sparse_attention`. ``backend="triton"`` or
``"reference"`` forces one (a readable error says why Triton cannot run, if it cannot). On a GPU,
``"auto"`` falling back to the twin (a block size the kernel does not take, too little shared memory...)
is logged once per reason at WARNING: it runs, correctly, but far slower than the kernel.

Gradients: the op is differentiable. The forward saves its output and LSE; the backward
(``sparsediff::block_sparse_attn_bwd``, block-sparse FlashAttention-2) runs the Triton kernels on CUDA
(``backend="auto"`` when the kernel takes the inputs, or ``"triton"``) and the PyTorch twin
:func:`sparsediff.reference.backward_blocks` otherwise (CPU, ``"reference"``): both visit only the listed blocks
and never form an ``Nq x Nk`` matrix.
"""

from __future__ import annotations

import functools
import logging

import torch

from . import reference
from .mask import BlockSparseMask
from .op_checks import check_inputs
from .support import BACKENDS as _BACKENDS
from .support import MAX_HEAD_DIM, SUPPORTED_DTYPES

logger = logging.getLogger(__name__)

__all__ = ["block_sparse_attention", "check_inputs", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "triton_reasons"]


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
    return reference.forward_blocks(q, k, v, mask, scale)


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


def _use_triton_backward(q: torch.Tensor, mask: BlockSparseMask, backend: str) -> bool:
    """The Triton backward runs for ``backend="triton"`` and for ``"auto"`` on CUDA when the kernel takes
    the inputs; otherwise (CPU, ``"reference"``, ``"auto"`` under the interpreter) the PyTorch twin."""
    if backend == "reference" or (backend == "auto" and not _is_gpu(q)):
        return False
    reasons = triton_reasons(q, mask)
    if reasons and backend == "triton":
        raise RuntimeError("the Triton backward cannot run these inputs: " + "; ".join(reasons))
    return not reasons


@torch.library.custom_op("sparsediff::block_sparse_attn_bwd", mutates_args=())
def _block_sparse_attn_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor | None,
    grad_lse: torch.Tensor | None,
    kv_indices: torch.Tensor,
    kv_counts: torch.Tensor,
    block_q: int,
    block_kv: int,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of the forward op from its saved ``out`` and ``lse`` (see :func:`~sparsediff.reference.backward_blocks`)."""
    Nq, Nk = q.shape[2], k.shape[2]
    mask = BlockSparseMask(kv_indices, kv_counts, (block_q, block_kv), (Nq, Nk), validate=False)
    if _use_triton_backward(q, mask, backend):
        q_idx, q_cnt = reference.transposed_block_lists(kv_indices, kv_counts, mask.num_kv_blocks)
        return _kernels().block_sparse_attention_bwd(
            q, k, v, out, lse, grad_out, grad_lse, kv_indices, kv_counts, q_idx, q_cnt,
            block_q=block_q, block_kv=block_kv, scale=scale,
        )  # fmt: skip
    return reference.backward_blocks(q, k, v, out, lse, grad_out, grad_lse, mask, scale)


@_block_sparse_attn_bwd_op.register_fake
def _(q, k, v, out, lse, grad_out, grad_lse, kv_indices, kv_counts, block_q, block_kv, scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, kv_indices, kv_counts, block_q, block_kv, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_indices, kv_counts)
    ctx.blocks, ctx.scale, ctx.backend = (block_q, block_kv), scale, backend


def _backward(ctx, grad_out, grad_lse):
    """Gradients of q, k, v from the forward's saved ``out`` and ``lse`` (FlashAttention-2's backward on
    the listed blocks): the Triton kernels where the forward would run them on CUDA (or
    ``backend="triton"``), else the PyTorch twin :func:`sparsediff.reference.backward_blocks` -- chunks of query
    blocks over their gathered key blocks, no ``Nq x Nk`` matrix, O(N * D) memory beyond a few bounded
    chunk buffers. Both go through the ``sparsediff::block_sparse_attn_bwd`` op, so compiled training
    graphs see one opaque op with a fake impl."""
    q, k, v, out, lse, kv_indices, kv_counts = ctx.saved_tensors
    (bq, bk), scale = ctx.blocks, ctx.scale
    dq, dk, dv = _block_sparse_attn_bwd_op(
        q, k, v, out, lse, grad_out, grad_lse, kv_indices, kv_counts, bq, bk, scale, ctx.backend
    )
    return dq, dk, dv, None, None, None, None, None, None


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
