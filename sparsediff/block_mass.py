"""Block attention mass from a cached log-sum-exp: PyTorch twin of ``sparsediff.kernels.launch.block_mass``.

``mass[b, h, i, j] = sum_{r in q-block i, c in k-block j} exp(q_r . k_c * scale - lse[b, h, r])`` --
the softmax probability that query block ``i`` puts on key block ``j`` when ``lse`` is the row's
log-sum-exp (e.g. cached from a dense step with ``block_sparse_attention(..., return_lse=True)``).
Rows past ``Nq``, columns past ``Nk`` and rows with ``lse = -inf`` contribute 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .support import BACKENDS, cdiv

__all__ = ["block_mass_reference", "block_mass"]

# Upper bound on the elements of one fp32 score chunk (2**24 = 64 MiB).
_CHUNK_ELEMS = 1 << 24


def block_mass_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Per-block attention mass ``[B, H, ceil(Nq/block_q), ceil(Nk/block_kv)]`` float32.

    q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]`` (any strides), lse ``[B, H, Nq]`` natural log. Computed in
    fp32 in chunks of query blocks; never holds more than ~``2**24`` scores at once.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = scale if scale is not None else D**-0.5
    Qb, Kb = cdiv(Nq, block_q), cdiv(Nk, block_kv)
    out = torch.zeros(B, H, Qb, Kb, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    kf = F.pad(k.float(), (0, 0, 0, Kb * block_kv - Nk))  # zero keys past Nk, masked below
    col_ok = torch.arange(Kb * block_kv, device=q.device) < Nk
    rows_per_chunk = max(block_q, (_CHUNK_ELEMS // max(B * H * Kb * block_kv, 1)) // block_q * block_q)
    for r0 in range(0, Nq, rows_per_chunk):
        r1 = min(Nq, r0 + rows_per_chunk)
        ls = lse[:, :, r0:r1].float().unsqueeze(-1)
        s = torch.matmul(q[:, :, r0:r1].float(), kf.transpose(-1, -2)) * scale
        p = torch.exp(s - torch.where(torch.isinf(ls), 0.0, ls))
        p = torch.where(torch.isinf(ls) | ~col_ok, 0.0, p)
        nb = cdiv(r1 - r0, block_q)
        p = F.pad(p, (0, 0, 0, nb * block_q - (r1 - r0)))  # rows past Nq contribute 0
        out[:, :, r0 // block_q : r0 // block_q + nb] = p.view(B, H, nb, block_q, Kb, block_kv).sum((3, 5))
    return out


def block_mass(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    *,
    block_q: int,
    block_kv: int,
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Dispatch: the Triton kernel (CUDA, or CPU under the interpreter) or the twin (``backend="reference"``)."""
    from .ops import triton_reasons

    if scale is None:
        scale = q.shape[-1] ** -0.5
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "reference":
        reasons = triton_reasons(q)
        if not reasons:
            from .kernels import launch as kernels

            reasons = kernels.not_supported_reasons(q, (block_q, block_kv))
        if not reasons:
            from .kernels import launch as kernels

            return kernels.block_mass(q, k, lse, block_q=block_q, block_kv=block_kv, scale=scale)
        if backend == "triton":
            raise RuntimeError("the Triton block_mass kernel cannot run: " + "; ".join(reasons))
    return block_mass_reference(q, k, lse, block_q=block_q, block_kv=block_kv, scale=scale)
