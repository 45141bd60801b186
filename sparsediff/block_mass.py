"""Block attention mass from a cached log-sum-exp: PyTorch twin of ``sparsediff.kernels.launch.block_mass``.

``mass[b, h, i, j] = sum_{r in q-block i, c in k-block j} exp(q_r . k_c * scale - lse[b, h, r])`` --
the softmax probability that query block ``i`` puts on key block ``j`` when ``lse`` is the row's
log-sum-exp (e.g. cached from a dense step with ``block_sparse_attention(..., return_lse=True)``).
Rows past ``Nq``, columns past ``Nk`` and rows with ``lse = -inf`` contribute 0.
"""

from __future__ import annotations

import math

import torch

from .support import BACKENDS, cdiv

__all__ = ["block_mass_reference", "block_mass"]

# Elements of one fp32 score tile (2**20 = 4 MiB): one query-row chunk of one head, small enough that the
# matmul, the in-place exp and the two block sums run on data that stays in the CPU's cache.
_TILE_ELEMS = 1 << 20


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

    q ``[B, H, Nq, D]``, k ``[B, H, Nk, D]`` (any strides), lse ``[B, H, Nq]`` natural log. fp32, one head
    and one chunk of whole query blocks at a time (~``2**20`` scores): ``addmm`` folds the scale and the
    ``- lse`` into the score matmul, ``exp_`` runs in place, and the key-block and query-block sums read
    the tile as views; a ragged last key block is summed on its own (no padding copies). Rows with
    ``lse = -inf`` get ``+inf`` subtracted, so their probabilities are exactly 0.
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    scale = scale if scale is not None else D**-0.5
    Qb, Kb = cdiv(Nq, block_q), cdiv(Nk, block_kv)
    out = torch.zeros(B, H, Qb, Kb, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out
    k_full = Nk // block_kv  # whole key blocks; a ragged last one (Kb > k_full) is summed separately
    rows = max(block_q, (_TILE_ELEMS // max(Nk, 1)) // block_q * block_q)
    neg = lse.float()
    neg = -torch.where(torch.isinf(neg) & (neg < 0), torch.full_like(neg, math.inf), neg)
    for b in range(B):
        for h in range(H):
            qf = q[b, h].float()
            kt = k[b, h].float().t()
            for r0 in range(0, Nq, rows):
                r1 = min(Nq, r0 + rows)
                p = torch.addmm(neg[b, h, r0:r1, None], qf[r0:r1], kt, alpha=scale).exp_()  # [rows, Nk]
                cols = torch.empty(r1 - r0, Kb, dtype=torch.float32, device=q.device)
                if k_full:
                    cols[:, :k_full] = p[:, : k_full * block_kv].view(r1 - r0, k_full, block_kv).sum(-1)
                if Kb > k_full:
                    cols[:, k_full:] = p[:, k_full * block_kv :].sum(-1, keepdim=True)
                i0, nb = r0 // block_q, (r1 - r0) // block_q
                if nb:
                    out[b, h, i0 : i0 + nb] = cols[: nb * block_q].view(nb, block_q, Kb).sum(1)
                if (r1 - r0) % block_q:  # ragged last query block
                    out[b, h, i0 + nb] = cols[nb * block_q :].sum(0)
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
