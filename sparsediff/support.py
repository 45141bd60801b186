"""What sparse attention supports, in one place: backends, dtypes, head dims; and block arithmetic.

Everything that checks or lists these (``SparseAttentionConfig``, the op's input checks, the Triton
kernel's ``not_supported_reasons``, ``block_mass``, the CLIs) imports them from here.
"""

from __future__ import annotations

import torch

__all__ = ["BACKENDS", "SUPPORTED_DTYPES", "MAX_HEAD_DIM", "cdiv"]

#: ``backend=`` values of the op and of :class:`~sparsediff.SparseAttentionConfig`: ``"auto"`` (Triton on
#: CUDA and under ``TRITON_INTERPRET=1``, else the PyTorch twin), ``"triton"``, ``"reference"`` (the twin).
BACKENDS = ("auto", "triton", "reference")
#: q/k/v dtypes the op (kernel and twin) takes.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Largest head dim the op takes (the kernel pads any head dim up to the next power of two >= 16).
MAX_HEAD_DIM = 256


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for ints (blocks needed for ``a`` tokens of ``b`` per block)."""
    return -(-a // b)
