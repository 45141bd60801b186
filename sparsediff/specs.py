"""Head specs (``HeadSpec``: a pattern name and its parameters) and the dense schedule.

They live in :mod:`sparsediff.patterns.specs`, next to the family registry that validates them (a spec is
the patterns' vocabulary); this module is their stable import path.
"""

from __future__ import annotations

from typing import Any

from .patterns.specs import AXIS_ORDERS, PARAM_CHECKS, PATTERN_PARAMS, DenseSchedule, HeadSpec

__all__ = ["HeadSpec", "PATTERN_PARAMS", "AXIS_ORDERS", "PARAM_CHECKS", "DenseSchedule"]


def __getattr__(name: str) -> Any:
    if name == "PATTERNS":  # the built-in family names, from the registry
        from .patterns import specs

        return specs.PATTERNS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
