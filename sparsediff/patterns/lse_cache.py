"""Cached-LSE block selection (AdaSpa-style): exact block importance from a cached log-sum-exp.

At a refresh step, with ``lse`` cached from the layer's previous pass (dense warm-up, a dense seeding
call, or the LSE returned by the last sparse pass of these heads):
``mass = block_mass(q, k, lse)`` -- ``Σ exp(scale q·k − lse_q)`` per (query block, key block), one QKᵀ
pass and no PV (:func:`sparsediff.block_mass.block_mass`: the Triton kernel on CUDA / under the
interpreter, else the PyTorch twin). Per query block the masses are normalised to a distribution over
key blocks and the smallest set of key blocks reaching ``recall`` is kept (at least
``ceil(min_frac * Kb)``, at least 1). The indices are reused until the next refresh. Rows/cols of dense
(non-grid) tokens are kept in full.

Normalising per query block by its computed total (instead of by its token count) makes the selection
insensitive to a uniform drift of the cached LSE; :func:`sparsediff.sparse_attention` refreshes the
cached LSE of lse_cache heads from the LSE the attention op returns on every call, so it is at most one
step old (with a sparse pass it is ``lse_true + log(recall of the row)``, i.e. within a few percent).
"""

from __future__ import annotations

import torch

from ..mask import BlockSparseMask
from .common import apply_dense_tokens, dense_token_blocks, min_count, select_cumulative

__all__ = ["lse_cache_select"]


def lse_cache_select(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    dense_tokens: torch.Tensor,
    block_size: int,
    *,
    recall: float = 0.95,
    min_frac: float = 0.0,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[BlockSparseMask, torch.Tensor]:
    """``q, k [B, H, N, D]``, ``lse [B, H, N]``, ``dense_tokens [N]`` ->
    ``(mask [B, H, Qb, Kb], achieved_recall [B, H, Qb])``.

    ``achieved_recall`` is the kept fraction of each query block's (cached-LSE) mass, >= ``recall``.
    """
    from ..block_mass import block_mass

    mass = block_mass(q, k, lse, block_q=block_size, block_kv=block_size, scale=scale, backend=backend)
    tot = mass.sum(-1, keepdim=True)
    p = torch.where(tot > 0, mass / tot.clamp_min(1e-30), torch.zeros_like(mass))
    kb = mass.shape[-1]
    keep = select_cumulative(p, recall, min_count(min_frac, kb) if min_frac > 0 else 1)
    achieved = (p * keep).sum(-1)
    keep = apply_dense_tokens(keep, dense_token_blocks(dense_tokens.to(keep.device), block_size))
    mask = BlockSparseMask.from_dense(keep, block_size, (q.shape[2], k.shape[2]))
    return mask, achieved
