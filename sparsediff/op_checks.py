"""Input checks of the block-sparse attention op and of its PyTorch twin.

Below both: :mod:`sparsediff.ops` (the op) imports :mod:`sparsediff.reference` (the twin), and both import
:func:`check_inputs` from here -- never from each other.
"""

from __future__ import annotations

import torch

from .mask import BlockSparseMask
from .support import MAX_HEAD_DIM, SUPPORTED_DTYPES

__all__ = ["check_inputs"]


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
