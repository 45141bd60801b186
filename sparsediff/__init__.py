"""sparsediff: per-head sparse attention for diffusers Diffusion Transformers."""

from __future__ import annotations

from .mask import BlockSparseMask
from .ops import block_sparse_attention

__version__ = "0.1.0"

__all__ = ["BlockSparseMask", "block_sparse_attention", "__version__"]
