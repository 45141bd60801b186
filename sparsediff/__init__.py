"""sparsediff: per-head sparse attention for diffusers Diffusion Transformers.

``import sparsediff`` adds ``enable_sparse_attention`` / ``disable_sparse_attention`` to every
``diffusers.DiffusionPipeline``::

    import sparsediff
    pipe.enable_sparse_attention()          # the model family's training-free default plan
"""

from __future__ import annotations

from . import (
    _source_tree,  # noqa: F401  (first: makes sparsediff.kernels / .pipelines importable)
    patterns,
    permute,
    testing,
)
from .api import (
    SparseAttentionHandle,
    disable_sparse_attention,
    enable_sparse_attention,
    is_sparse_attention_enabled,
    sparse_attention_enabled,
)
from .attention import LayerState, MaskCache, sparse_attention
from .config import SparseAttentionConfig
from .defaults import default_plan
from .layout import Segment, TokenLayout
from .mask import BlockSparseMask
from .ops import block_sparse_attention
from .patterns.registry import builtin_patterns, register_pattern, unregister_pattern
from .pipelines.base import Adapter, UnsupportedModelError, register_adapter
from .plan import ModelIdentity, Plan, PlanError, PlanMismatchError
from .specs import DenseSchedule, HeadSpec

__version__ = "0.1.0"

#: Names of the built-in pattern families (each declared in ``sparsediff/patterns/<name>.py``).
PATTERNS = builtin_patterns()

__all__ = [
    "PATTERNS",
    "Adapter",
    "BlockSparseMask",
    "DenseSchedule",
    "HeadSpec",
    "LayerState",
    "MaskCache",
    "ModelIdentity",
    "Plan",
    "PlanError",
    "PlanMismatchError",
    "Segment",
    "SparseAttentionConfig",
    "SparseAttentionHandle",
    "TokenLayout",
    "UnsupportedModelError",
    "__version__",
    "block_sparse_attention",
    "default_plan",
    "disable_sparse_attention",
    "enable_sparse_attention",
    "is_sparse_attention_enabled",
    "patterns",
    "permute",
    "register_adapter",
    "register_pattern",
    "sparse_attention",
    "sparse_attention_enabled",
    "testing",
    "unregister_pattern",
]
