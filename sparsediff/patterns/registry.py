"""User pattern families: :func:`register_pattern` adds a family that every part of sparsediff accepts.

A family declares, in one place, its parameters (defaults, value checks, a check across parameters),
whether its mask is static (a function of the layout and parameters, cached) or dynamic (chosen from
``q``/``k`` on every call), an optional token permutation, and the mask builder. Once registered, the
name works everywhere a built-in pattern name does -- :class:`~sparsediff.HeadSpec`, plans (JSON),
``enable_sparse_attention(pipe, "name")``, ``SparseAttentionConfig(pattern_params=...)``,
:func:`~sparsediff.sparse_attention` (one kernel launch with every other head) and the search
(:func:`~sparsediff.search.build_structures`, as a candidate).

Example -- key blocks on a stride, plus the diagonal::

    def strided(layout, spec, block_size, device):
        nb = -(-layout.num_tokens // block_size)
        i = torch.arange(nb, device=device)
        keep = (i.view(-1, 1) - i.view(1, -1)) % spec.get("stride") == 0
        return sparsediff.BlockSparseMask.from_dense(keep[None, None], block_size, (layout.num_tokens,) * 2)

    sparsediff.register_pattern("strided", params={"stride": 2}, static_mask=strided)
    pipe.enable_sparse_attention(sparsediff.Plan.uniform("strided", stride=3))

Builders (``device`` may be None = CPU):

* ``static_mask(layout, spec, block_size, device) -> BlockSparseMask`` ``[1, 1, Qb, Kb]`` in the order
  of ``permutation`` -- cached per (layout, spec, block size, device);
* ``select(q, k, layout, spec, block_size, scale) -> bool [B|1, H|1, Qb, Kb]`` for ``q``/``k``
  ``[B, Hg, N, D]`` (the family's heads, already in the order of ``permutation``) -- every call;
* ``permutation(layout, spec, device) -> Permutation | None`` -- cached; ``None`` = natural order.

Rows and columns of non-grid tokens (text) are not made dense for you: a family decides (the helpers
of :mod:`sparsediff.patterns.common` do it for the built-in families). Built-in families
(:data:`sparsediff.specs.PATTERN_PARAMS` at import) cannot be replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import specs

__all__ = ["PatternFamily", "register_pattern", "unregister_pattern", "get_family", "registered_patterns"]

#: Names of the built-in families (cannot be registered over).
BUILTIN_PATTERNS = frozenset(specs.PATTERN_PARAMS)

_FAMILIES: dict[str, PatternFamily] = {}


def _any_value(v: Any) -> bool:
    return True


@dataclass(frozen=True)
class PatternFamily:
    """A registered pattern family (see the module docstring)."""

    name: str
    params: Mapping[str, Any]
    checks: Mapping[str, tuple[Callable[[Any], bool], str]]
    static_mask: Callable[..., Any] | None = None
    select: Callable[..., Any] | None = None
    permutation: Callable[..., Any] | None = None
    check: Callable[[Any], None] | None = None
    doc: str = field(default="", compare=False)

    @property
    def is_static(self) -> bool:
        return self.static_mask is not None


def register_pattern(
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    checks: Mapping[str, tuple[Callable[[Any], bool], str]] | None = None,
    static_mask: Callable[..., Any] | None = None,
    select: Callable[..., Any] | None = None,
    permutation: Callable[..., Any] | None = None,
    check: Callable[[Any], None] | None = None,
    doc: str = "",
    replace: bool = False,
) -> PatternFamily:
    """Register a pattern family ``name`` (see the module docstring); returns its :class:`PatternFamily`.

    Args:
        params: parameter names and defaults (hashable values: scalars, strings, tuples).
        checks: ``{param: (predicate, "what is allowed")}`` for some or all parameters; unchecked
            parameters accept any hashable value.
        static_mask / select: exactly one -- a static mask builder or a dynamic block selection.
        permutation: optional token order of the family's heads.
        check: ``check(spec)`` raising ``ValueError`` for parameter combinations that are not allowed.
        doc: one line shown in error messages and listings.
        replace: allow registering ``name`` again (e.g. in a notebook); built-in names never.

    Raises:
        ValueError: a built-in or already registered name (without ``replace``), not exactly one of
            ``static_mask`` / ``select``, checks for unknown parameters, or defaults that fail them.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a pattern name must be an identifier string, got {name!r}")
    if name in BUILTIN_PATTERNS:
        raise ValueError(f"{name!r} is a built-in pattern and cannot be registered over")
    if name in _FAMILIES and not replace:
        raise ValueError(f"pattern {name!r} is already registered (pass replace=True to replace it)")
    if (static_mask is None) == (select is None):
        raise ValueError(f"pattern {name!r}: give exactly one of static_mask= (static) or select= (dynamic)")
    for what, fn in (("static_mask", static_mask), ("select", select), ("permutation", permutation)):
        if fn is not None and not callable(fn):
            raise TypeError(f"pattern {name!r}: {what} must be callable, got {type(fn).__name__}")
    params = dict(params or {})
    checks = dict(checks or {})
    unknown = set(checks) - set(params)
    if unknown:
        raise ValueError(f"pattern {name!r}: checks for unknown parameters {sorted(unknown)}")
    full_checks = {p: checks.get(p, (_any_value, "any hashable value")) for p in params}
    fam = PatternFamily(name, params, full_checks, static_mask, select, permutation, check, doc)
    specs.PATTERN_PARAMS[name] = params
    specs.PARAM_CHECKS[name] = full_checks
    if check is not None:
        specs.SPEC_CHECKS[name] = check
    else:
        specs.SPEC_CHECKS.pop(name, None)
    _FAMILIES[name] = fam
    try:
        specs.HeadSpec.make(name)  # the defaults must pass the checks
    except Exception:
        unregister_pattern(name)
        raise
    return fam


def unregister_pattern(name: str) -> None:
    """Remove a registered family (built-in families cannot be removed)."""
    if name in BUILTIN_PATTERNS:
        raise ValueError(f"{name!r} is a built-in pattern")
    if name not in _FAMILIES:
        raise KeyError(f"pattern {name!r} is not registered")
    del _FAMILIES[name]
    for table in (specs.PATTERN_PARAMS, specs.PARAM_CHECKS, specs.SPEC_CHECKS):
        table.pop(name, None)


def get_family(name: str) -> PatternFamily:
    """The registered family ``name``; ``ValueError`` naming the known patterns otherwise."""
    fam = _FAMILIES.get(name)
    if fam is None:
        raise ValueError(
            f"unknown pattern {name!r}; built-in patterns: {sorted(BUILTIN_PATTERNS)}, "
            f"registered: {sorted(_FAMILIES)}"
        )
    return fam


def registered_patterns() -> dict[str, PatternFamily]:
    """The user-registered families by name (a copy)."""
    return dict(_FAMILIES)
