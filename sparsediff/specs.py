"""Head specs (what one attention head computes) and the dense warm-up schedule.

A :class:`HeadSpec` is a pattern name plus its parameters, frozen and hashable: it is the identity of
the head's pattern and part of every mask-cache key. Parameters are stored sorted by name, with lists
turned into tuples, so equal specs compare and hash equal however they were written.

Patterns and their parameters (defaults in :data:`PATTERN_PARAMS`; unknown names are rejected, and
every value is checked at construction against :data:`PARAM_CHECKS` -- type and range -- so a bad value
fails where the spec is written, not deep inside a pattern builder):

``dense``      exact attention.
``skip``       the head's output is replaced by the output cached at the last dense pass of this
               layer (``force_dense`` step); before any cache exists the head is computed densely.
``radial``     static energy-decay mask. ``decay`` (spatial window factor), ``sink`` (key frame 0 always
               kept), ``dense_dist`` (frame distance computed in full; 1 = neighbouring frames),
               ``block_rule`` (``"any"``: a block is kept when any token pair is in the pattern;
               ``"reference"``: the radial-attention authors' column-density rule, fewer blocks).
``tile``       static 3D sliding-tile window. ``window=(wt, wh, ww)`` in tiles with STA's meaning
               (``2 * (w // 2) + 1`` tiles around a centre clamped inside the grid: an even ``w`` keeps
               ``w + 1`` tiles), ``tile=(tf, th, tw)`` in tokens (``None`` = chosen from the block size).
``reordered``  per-head permutation + block selection. ``order``: ``"frame"`` (position-major, temporal
               heads), one of the six axis orders ``"fhw" "fwh" "hfw" "hwf" "wfh" "whf"``, ``"hilbert"``
               or ``"cluster"``; ``select``: ``"static"`` (token band ``|i - j| <= band`` on the
               reordered order) or ``"topp"`` (dynamic, ``top_p`` / ``min_frac``); ``clusters`` (k-means
               clusters for ``order="cluster"``, 0 = one per block, at most 512), ``kmeans_iters``.
               The static band is ``band`` tokens, or ``band_frames`` frames' worth of tokens
               (``ceil(band_frames * H * W)``; give at most one of the two), default one frame
               (``H * W`` tokens); ``sink`` (static only) also keeps the first ``H * W`` keys of the
               reordered order for every query (Sparse-VideoGen's attention sink).
``topp``       dynamic mean-pooled block scores on the natural order, softmax, keep key blocks up to a
               cumulative ``top_p`` with at least ``min_frac`` of the key blocks.
``lse_cache``  cached-LSE block selection. ``recall`` target, ``refresh`` (recompute the kept blocks
               every ``refresh`` steps), ``min_frac``.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HeadSpec",
    "PATTERNS",
    "PATTERN_PARAMS",
    "AXIS_ORDERS",
    "REORDER_ORDERS",
    "REORDER_SELECTS",
    "MAX_CLUSTERS",
    "PARAM_CHECKS",
    "DenseSchedule",
]

AXIS_ORDERS = ("fhw", "fwh", "hfw", "hwf", "wfh", "whf")
#: Orders of ``reordered`` heads.
REORDER_ORDERS = ("frame", *AXIS_ORDERS, "hilbert", "cluster")
#: Block selections of ``reordered`` heads.
REORDER_SELECTS = ("static", "topp")
#: Most k-means clusters a ``reordered(order="cluster")`` head may ask for.
MAX_CLUSTERS = 512

#: Default parameters of every pattern. ``HeadSpec.make`` rejects names not listed here. Families
#: added with :func:`sparsediff.register_pattern` are added here (and to :data:`PARAM_CHECKS`);
#: :data:`PATTERNS` lists the built-in ones.
PATTERN_PARAMS: dict[str, dict[str, Any]] = {
    "dense": {},
    "skip": {},
    "radial": {"decay": 1.0, "sink": False, "dense_dist": 1, "block_rule": "any"},
    "tile": {"window": (3, 3, 3), "tile": None},
    "reordered": {
        "order": "frame",
        "select": "static",
        "band": None,
        "band_frames": None,
        "sink": False,
        "top_p": 0.9,
        "min_frac": 0.05,
        "clusters": 0,
        "kmeans_iters": 4,
    },
    "topp": {"top_p": 0.9, "min_frac": 0.05},
    "lse_cache": {"recall": 0.95, "refresh": 5, "min_frac": 0.0},
}
PATTERNS = tuple(PATTERN_PARAMS)


# ---------------------------------------------------------------------- parameter value checks
# Each check returns True when the value is allowed; the text says what is allowed (error messages).
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _int_ge(lo: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= lo), f"an int >= {lo}"


def _frac(lo_open: bool) -> tuple[Callable[[Any], bool], str]:
    if lo_open:
        return (lambda v: _is_real(v) and 0 < v <= 1), "a number in (0, 1]"
    return (lambda v: _is_real(v) and 0 <= v <= 1), "a number in [0, 1]"


def _int3(v: Any) -> bool:
    return isinstance(v, tuple) and len(v) == 3 and all(_is_int(x) and x >= 1 for x in v)


#: ``PARAM_CHECKS[pattern][name] = (predicate, description of the allowed values)``.
PARAM_CHECKS: dict[str, dict[str, tuple[Callable[[Any], bool], str]]] = {
    "dense": {},
    "skip": {},
    "radial": {
        "decay": ((lambda v: _is_real(v) and v > 0), "a finite number > 0"),
        "sink": ((lambda v: isinstance(v, bool)), "a bool"),
        "dense_dist": _int_ge(0),
        "block_rule": ((lambda v: v in ("any", "reference")), "'any' or 'reference'"),
    },
    "tile": {
        "window": (_int3, "three positive ints (wt, wh, ww), in tiles"),
        "tile": ((lambda v: v is None or _int3(v)), "None or three positive ints (tf, th, tw), in tokens"),
    },
    "reordered": {
        "order": ((lambda v: v in REORDER_ORDERS), f"one of {REORDER_ORDERS}"),
        "select": ((lambda v: v in REORDER_SELECTS), f"one of {REORDER_SELECTS}"),
        "band": ((lambda v: v is None or (_is_int(v) and v >= 0)), "None or an int >= 0 (tokens)"),
        "band_frames": (
            (lambda v: v is None or (_is_real(v) and v >= 0)),
            "None or a finite number >= 0 (frames of H*W tokens)",
        ),
        "sink": ((lambda v: isinstance(v, bool)), "a bool"),
        "top_p": _frac(True),
        "min_frac": _frac(False),
        "clusters": (
            (lambda v: _is_int(v) and 0 <= v <= MAX_CLUSTERS),
            f"an int in [0, {MAX_CLUSTERS}] (0 = one cluster per block)",
        ),
        "kmeans_iters": _int_ge(1),
    },
    "topp": {"top_p": _frac(True), "min_frac": _frac(False)},
    "lse_cache": {"recall": _frac(True), "refresh": _int_ge(1), "min_frac": _frac(False)},
}
assert all(set(PARAM_CHECKS[p]) == set(PATTERN_PARAMS[p]) for p in PATTERN_PARAMS)


def _check_reordered(spec: HeadSpec) -> None:
    if spec.get("band") is not None and spec.get("band_frames") is not None:
        raise ValueError(
            f"{spec!r}: give the band either in tokens (band) or in frames (band_frames), not both"
        )
    if spec.get("sink") and spec.get("select") != "static":
        raise ValueError(f"{spec!r}: sink=True applies to select='static' bands only")


#: Checks across parameters, run after the per-value checks (``SPEC_CHECKS[pattern](spec)`` raises).
SPEC_CHECKS: dict[str, Callable[[HeadSpec], None]] = {"reordered": _check_reordered}


def _check_value(pattern: str, name: str, value: Any) -> None:
    ok, allowed = PARAM_CHECKS[pattern][name]
    try:
        good = bool(ok(value))
    except TypeError:  # e.g. an unhashable / incomparable value
        good = False
    if not good:
        raise ValueError(
            f"pattern {pattern!r}: parameter {name!r} = {value!r} ({type(value).__name__}) is invalid; "
            f"it must be {allowed}"
        )


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
        names = [k for k, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate parameter names in {names}")
        allowed = PATTERN_PARAMS[self.pattern]
        unknown = [k for k in names if k not in allowed]
        if unknown:
            raise ValueError(
                f"pattern {self.pattern!r} has no parameter(s) {unknown}; its parameters are {sorted(allowed)}"
            )
        items_t = tuple(items)
        try:
            hash(items_t)
        except TypeError as e:
            raise TypeError(f"HeadSpec parameters must be hashable: {e}") from e
        for k, v in items_t:
            _check_value(self.pattern, k, v)
        object.__setattr__(self, "params", items_t)
        check = SPEC_CHECKS.get(self.pattern)
        if check is not None:
            check(self)

    @classmethod
    def make(cls, pattern: str, **params: Any) -> HeadSpec:
        return cls(pattern, tuple(params.items()))

    def get(self, name: str, default: Any = None) -> Any:
        """The parameter ``name``: its given value, else the pattern default, else ``default``."""
        for k, v in self.params:
            if k == name:
                return v
        return PATTERN_PARAMS[self.pattern].get(name, default)

    def normalized(self) -> HeadSpec:
        """The same spec with every default written out (canonical cache key)."""
        full = dict(PATTERN_PARAMS[self.pattern])
        full.update(dict(self.params))
        return HeadSpec(self.pattern, tuple(full.items()))

    @property
    def is_static(self) -> bool:
        """True when the mask depends on the layout and params only (cacheable)."""
        if self.pattern in ("radial", "tile", "dense"):
            return True
        if self.pattern == "reordered":
            return self.get("select") == "static" and self.get("order") != "cluster"
        if self.pattern in ("skip", "topp", "lse_cache"):
            return False
        from .patterns.registry import get_family  # a user-registered family

        return get_family(self.pattern).is_static

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
