"""Head specs (what one attention head computes) and the dense warm-up schedule.

A :class:`HeadSpec` is a pattern name plus its parameters, frozen and hashable: it is the identity of
the head's pattern and part of every mask-cache key. Parameters are stored sorted by name, with lists
turned into tuples, so equal specs compare and hash equal however they were written.

Pattern families are declared in one module each (``sparsediff/patterns/<name>.py``: parameters with
defaults and value checks, kind, mask / permutation, search grid and cost terms) and collected by
:mod:`sparsediff.patterns.registry`, which owns the family table (:data:`PATTERN_PARAMS` /
:data:`PARAM_CHECKS` here are its read-only views). Unknown names are rejected, and every value is checked
at construction -- type and range -- so a bad value fails where the spec is written, not deep inside a
pattern builder. Built-in families: ``dense``, ``radial``, ``tile``, ``reordered``, ``topp``, ``lse_cache``,
``skip`` (:data:`PATTERNS`); users add their own with :func:`sparsediff.register_pattern`.

Module order: :mod:`sparsediff.patterns.registry` (the table) -> this module (specs) -> the family modules.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..permute import AXIS_ORDERS
from .registry import (
    CROSS_STEP,
    PARAM_CHECKS,
    PATTERN_PARAMS,
    REMAINDER_PARAM,
    REMAINDER_REFRESH_PARAM,
    builtin_patterns,
    check_params,
    get_family,
)

__all__ = [
    "HeadSpec",
    "PATTERN_PARAMS",
    "AXIS_ORDERS",
    "PARAM_CHECKS",
    "DenseSchedule",
]


def __getattr__(name: str) -> Any:
    if name == "PATTERNS":  # the built-in family names, from the registry
        return builtin_patterns()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, Mapping):
        raise TypeError("HeadSpec parameter values must be scalars, strings or (nested) tuples, not dicts")
    return v


@dataclass(frozen=True)
class HeadSpec:
    """One head's pattern: ``HeadSpec(pattern, params)`` with ``params`` a sorted tuple of (name, value).

    Build with :meth:`make` (``HeadSpec.make("radial", decay=0.2)``); parameters not given take the
    defaults of :data:`PATTERN_PARAMS` when read with :meth:`get`, so ``make("radial")`` and
    ``make("radial", decay=1.0)`` describe the same head but are distinct keys (use :meth:`normalized`
    to fill defaults in explicitly).
    """

    pattern: str
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.pattern not in PATTERN_PARAMS:
            raise ValueError(
                f"unknown pattern {self.pattern!r}; known patterns: {tuple(PATTERN_PARAMS)} "
                "(add your own with sparsediff.register_pattern)"
            )
        items = []
        for item in self.params:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise TypeError(f"HeadSpec.params must be (name, value) pairs, got {item!r}")
            items.append((item[0], _freeze(item[1])))
        items.sort(key=lambda kv: kv[0])
        items_t = tuple(items)
        try:
            hash(items_t)
        except TypeError as e:
            raise TypeError(f"HeadSpec parameters must be hashable: {e}") from e
        fam = check_params(self.pattern, items_t)
        object.__setattr__(self, "params", items_t)
        if fam.check is not None:
            fam.check(self)
        if fam.remainder and dict(items_t).get(REMAINDER_PARAM) == "cached" and not fam.is_static_spec(self):
            raise ValueError(
                f'{self!r}: remainder="cached" needs a static mask (the stored remainder is what that mask '
                f"leaves out, and a {fam.kind_of(self)} mask changes from call to call)"
            )

    @classmethod
    def make(cls, pattern: str, **params: Any) -> HeadSpec:
        return cls(pattern, tuple(params.items()))

    def get(self, name: str, default: Any = None) -> Any:
        """The parameter ``name``: its given value, else the pattern default, else ``default``."""
        for k, v in self.params:
            if k == name:
                return v
        return get_family(self.pattern).params.get(name, default)

    def normalized(self) -> HeadSpec:
        """The same spec with every default written out (canonical cache key)."""
        full = dict(PATTERN_PARAMS[self.pattern])
        full.update(dict(self.params))
        return HeadSpec(self.pattern, tuple(full.items()))

    @property
    def is_static(self) -> bool:
        """True when the mask depends on the layout and params only (cacheable): the family's kind."""
        return get_family(self.pattern).is_static_spec(self)

    @property
    def kind(self) -> str:
        """``"static"``, ``"dynamic"`` or ``"cross_step"`` (see :mod:`sparsediff.patterns.registry`)."""
        return get_family(self.pattern).kind_of(self)

    @property
    def is_cross_step(self) -> bool:
        """True when the head keeps state across denoising steps (the family's kind for this spec is
        :data:`~sparsediff.patterns.registry.CROSS_STEP`: ``skip``, ``lse_cache``, ...)."""
        return self.kind == CROSS_STEP

    @property
    def remainder(self) -> str:
        """``"pooled"`` when the head adds its unselected key blocks as pooled keys (the ``remainder``
        parameter of the families that have it, :data:`~sparsediff.patterns.registry.REMAINDERS`), else
        ``"none"`` (also for every family without the parameter)."""
        if not get_family(self.pattern).remainder:
            return "none"
        return str(self.get(REMAINDER_PARAM))

    def with_remainder(self, remainder: str) -> HeadSpec:
        """The same spec with ``remainder`` set (``"none"`` removes the parameter, and the
        ``remainder_refresh`` that only a stored remainder uses: the spec a plan written before the
        parameters existed holds, equal to the spec the remainder was added to). ``ValueError`` for a family
        without the parameter."""
        if not get_family(self.pattern).remainder:
            raise ValueError(f"pattern {self.pattern!r} has no {REMAINDER_PARAM!r} parameter")
        drop = (REMAINDER_PARAM, REMAINDER_REFRESH_PARAM) if remainder == "none" else (REMAINDER_PARAM,)
        items = tuple((k, v) for k, v in self.params if k not in drop)
        if remainder != "none":
            items += ((REMAINDER_PARAM, remainder),)
        return HeadSpec(self.pattern, items)

    def without_remainder(self) -> HeadSpec:
        """The spec without its ``remainder`` parameter (its mask, permutation and cache keys)."""
        if not get_family(self.pattern).remainder or not any(k == REMAINDER_PARAM for k, _ in self.params):
            return self
        return HeadSpec(self.pattern, tuple((k, v) for k, v in self.params if k != REMAINDER_PARAM))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict ``{"pattern": ..., "params": {...}}`` (tuples become lists)."""
        return {
            "pattern": self.pattern,
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.params},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> HeadSpec:
        if "pattern" not in d:
            raise ValueError(f"a head spec dict needs a 'pattern' key, got keys {sorted(d)}")
        extra = set(d) - {"pattern", "params"}
        if extra:
            raise ValueError(f"unexpected keys in head spec dict: {sorted(extra)}")
        return cls(d["pattern"], tuple(dict(d.get("params", {})).items()))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v!r}" for k, v in self.params)
        return f"HeadSpec({self.pattern}{', ' + p if p else ''})"


@dataclass(frozen=True)
class DenseSchedule:
    """Dense warm-up: which (step, layer) run exact dense attention regardless of the plan.

    Attributes:
        dense_steps: the first ``dense_steps`` denoising steps are dense. An ``int`` counts steps; a
            ``float`` in ``[0, 1]`` is a fraction of ``num_steps`` (rounded up: 0.25 of 50 -> 13).
        dense_layers: layer indices that are always dense (e.g. ``(0,)``: the first layer).

    ``is_dense(step, num_steps, layer)`` with ``step`` 0-based. ``step=None`` (unknown) is never dense
    by the step rule. Published systems keep 10-25 % of steps dense (see ALGORITHMS.md).
    """

    dense_steps: int | float = 0
    dense_layers: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        ds = self.dense_steps
        if isinstance(ds, bool) or not isinstance(ds, (int, float)):
            raise TypeError(f"dense_steps must be an int or a float fraction, got {ds!r}")
        if isinstance(ds, float) and not 0.0 <= ds <= 1.0:
            raise ValueError(
                f"a float dense_steps is a fraction in [0, 1], got {ds} (write an int such as "
                f"{int(ds) if ds.is_integer() else 3} to count steps)"
            )
        if isinstance(ds, int) and ds < 0:
            raise ValueError(f"dense_steps must be >= 0, got {ds}")
        object.__setattr__(self, "dense_layers", tuple(int(x) for x in self.dense_layers))

    def num_dense_steps(self, num_steps: int) -> int:
        ds = self.dense_steps
        if isinstance(ds, float):
            import math

            return min(num_steps, math.ceil(ds * num_steps - 1e-9))
        return min(ds, num_steps)

    def is_dense(self, step: int | None, num_steps: int | None, layer: int | None = None) -> bool:
        if layer is not None and layer in self.dense_layers:
            return True
        if step is None:
            return False
        if isinstance(self.dense_steps, float):
            if num_steps is None:
                raise ValueError("a fractional dense_steps needs num_steps")
            return step < self.num_dense_steps(num_steps)
        return step < self.dense_steps
