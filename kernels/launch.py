"""Launch entry points of sparsediff's Triton kernels (``sparsediff.kernels.launch``).

The ``kernels/`` folder installs as ``sparsediff.kernels`` and has no ``__init__.py`` on purpose: a
top-level ``kernels/__init__.py`` would shadow Hugging Face's ``kernels`` distribution (which
transformers installs and diffusers imports) whenever Python runs from the repo root. Only
``@triton.jit`` code and these thin launch wrappers live in ``kernels/``; torch glue, the custom op and
the reference twins live in ``sparsediff/``. Importing this module never fails without Triton:
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
    "block_sparse_attention_bwd",
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
    from .block_attn_mass import block_mass as _f

    with _device_guard(q):
        return _f(q, k, lse, block_q=block_q, block_kv=block_kv, scale=scale)


def block_sparse_attention_bwd(
    q, k, v, out, lse, dout, dlse, kv_indices, kv_counts, q_indices, q_counts, *, block_q, block_kv, scale
):
    from .block_sparse_attn_bwd import block_sparse_attention_bwd as _f

    with _device_guard(q):
        return _f(
            q, k, v, out, lse, dout, dlse, kv_indices, kv_counts, q_indices, q_counts,
            block_q=block_q, block_kv=block_kv, scale=scale,
        )  # fmt: skip
