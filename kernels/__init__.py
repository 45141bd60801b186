"""Triton kernels of sparsediff (installed as ``sparsediff.kernels``).

Only ``@triton.jit`` code and thin launch wrappers live here; torch glue, the custom op and the
reference twins live in ``sparsediff/``. Importing this package never fails without Triton:
:func:`triton_available` says whether the kernels can be used.
"""

from __future__ import annotations

import importlib.util
import os

__all__ = [
    "triton_available",
    "interpreter_enabled",
    "not_supported_reasons",
    "block_sparse_attention_fwd",
    "block_mass",
]


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """Triton's CPU interpreter is decided when kernels are defined (import time) by TRITON_INTERPRET."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def not_supported_reasons(q, block_size) -> list[str]:
    from .block_sparse_attn import not_supported_reasons as _r

    return _r(q, block_size)


def _device_guard(t):
    """Triton launches on the *current* CUDA device: make it the tensor's (multi-GPU, device_map)."""
    import contextlib

    if t.is_cuda:
        import torch

        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def block_sparse_attention_fwd(q, k, v, kv_indices, kv_counts, *, block_q, block_kv, scale):
    from .block_sparse_attn import block_sparse_attention_fwd as _f

    with _device_guard(q):
        return _f(q, k, v, kv_indices, kv_counts, block_q=block_q, block_kv=block_kv, scale=scale)


def block_mass(q, k, lse, *, block_q, block_kv, scale):
    # The kernel module is not called block_mass.py: importing a submodule of that name would replace
    # this function with the module object on the package.
    from .block_attn_mass import block_mass as _f

    with _device_guard(q):
        return _f(q, k, lse, block_q=block_q, block_kv=block_kv, scale=scale)
