"""Parameter value checks shared by the pattern families.

A check is ``(predicate, text)``: ``predicate(value)`` is True when the value is allowed, ``text`` says what
is allowed (it ends up in the error message of :class:`~sparsediff.HeadSpec`). Families declare one check per
parameter next to its default (see :mod:`sparsediff.patterns.registry`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any

Check = tuple[Callable[[Any], bool], str]

__all__ = [
    "Check",
    "is_int",
    "is_real",
    "int_ge",
    "frac",
    "positive",
    "boolean",
    "one_of",
    "int3",
    "optional",
]


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def int_ge(lo: int) -> Check:
    """An int ``>= lo``."""
    return (lambda v: is_int(v) and v >= lo), f"an int >= {lo}"


def frac(lo_open: bool) -> Check:
    """A number in ``(0, 1]`` (``lo_open``) or ``[0, 1]``."""
    if lo_open:
        return (lambda v: is_real(v) and 0 < v <= 1), "a number in (0, 1]"
    return (lambda v: is_real(v) and 0 <= v <= 1), "a number in [0, 1]"


def positive() -> Check:
    """A finite number ``> 0``."""
    return (lambda v: is_real(v) and v > 0), "a finite number > 0"


def boolean() -> Check:
    return (lambda v: isinstance(v, bool)), "a bool"


def one_of(values: Iterable[Any]) -> Check:
    allowed = tuple(values)
    return (lambda v: v in allowed), f"one of {allowed}"


def int3(v: Any) -> bool:
    """Three positive ints."""
    return isinstance(v, tuple) and len(v) == 3 and all(is_int(x) and x >= 1 for x in v)


def optional(check: Check) -> Check:
    """``None`` or what ``check`` allows."""
    ok, text = check
    return (lambda v: v is None or ok(v)), f"None or {text}"
