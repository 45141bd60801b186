"""Pattern families: one registry, one module per built-in family, and :func:`register_pattern` for users.

Every pattern a :class:`~sparsediff.HeadSpec` can name -- the built-in ``dense``, ``radial``, ``tile``,
``reordered``, ``topp``, ``lse_cache``, ``skip`` and any a user registers -- is a :class:`PatternFamily`
declared in one place (the built-ins: ``sparsediff/patterns/<name>.py``, registered in that order when
:mod:`sparsediff.patterns` is imported). A family declares

* its **parameters**: defaults, a value check per parameter, an optional check across parameters, a doc line;
* its **kind** per spec: ``"static"`` (mask and permutation are functions of the layout, the parameters and
  the block size: built once, cached), ``"dynamic"`` (chosen from ``q``/``k`` on every call) or the
  **cross-step** kind :data:`CROSS_STEP` (state carried across denoising steps in the layer's
  :class:`~sparsediff.attention.LayerState`, in the family's own slot ``state.family_state(name)``: a dense
  pass fills it, later steps reuse it). Its value is ``"cross_step"``; the old name ``"cached"`` is
  accepted for one release with a ``FutureWarning``;
* how a group of heads with that spec runs in one call: its mask, its token permutation (if any), and what it
  does after the op -- ``build_group(call, spec, heads)``, which returns a :class:`GroupWork`;
* optionally, what the offline search needs to enumerate and price it (:mod:`sparsediff.search`):
  ``candidates(layout, block_size) -> [HeadSpec]`` (its search grid; a family without one is never searched
  unless a user lists its specs), ``cost(model, spec, density, layout) -> seconds`` (its cost terms, from the
  units of :class:`~sparsediff.search.CostModel`: ``model.block_cost(density, layout)``,
  ``model.dense_cost(layout)``, ``model.permute_cost(layout)``, ``model.pooled_selection_cost(layout)``,
  ``model.kmeans_cost(layout, clusters, iters)``, ``model.block_mass_cost(layout, refresh)``,
  ``model.copy_cost(layout)``; default: the computed blocks only), ``label`` (the name used in reports and
  heatmaps: a string or ``label(spec) -> str``; default: the family name), ``planted(kind, spec, layout,
  block_size) -> bool`` (does the spec have the structure of a planted head kind of
  :mod:`sparsediff.testing`), ``needs_grid`` (only for layouts with a video/image grid), and for cross-step
  families ``cross_step_measure`` (how the search measures it across two profiled steps:
  ``"reuse_output"`` -- the head's output of the previous step -- or ``"block_mass"`` -- key blocks chosen
  from the previous step's exact block mass up to the spec's ``recall``, at least ``min_frac`` of them) and
  ``refresh_param`` (the parameter counting steps between refreshes; the profiler sets it to the gap
  between profiled steps).

:func:`sparsediff.sparse_attention` dispatches every group of heads through the registry (no per-family
branches); ``HeadSpec`` validates against it; :func:`sparsediff.patterns.static_mask` builds any static mask
through it; plans, ``SparseAttentionConfig(pattern_params=...)``, ``enable_sparse_attention(pipe, "name")``
and the search accept, enumerate and price every registered name the same way.

User families -- the simple form declares a mask builder and optionally a permutation::

    def strided(layout, spec, block_size, device):
        nb = -(-layout.num_tokens // block_size)
        i = torch.arange(nb, device=device)
        keep = (i.view(-1, 1) - i.view(1, -1)) % spec.get("stride") == 0
        return sparsediff.BlockSparseMask.from_dense(keep[None, None], block_size, (layout.num_tokens,) * 2)

    sparsediff.register_pattern(
        "strided", params={"stride": 2}, static_mask=strided,
        candidates=lambda layout, block_size: [sparsediff.HeadSpec.make("strided", stride=s) for s in (2, 4)],
    )
    pipe.enable_sparse_attention(sparsediff.Plan.uniform("strided", stride=3))

Builders of the simple form (``device`` may be None = CPU):

* ``static_mask(layout, spec, block_size, device) -> BlockSparseMask`` ``[1, 1, Qb, Kb]`` in the order
  of ``permutation`` -- cached per (layout, spec, block size, device);
* ``select(q, k, layout, spec, block_size, scale) -> bool [B|1, H|1, Qb, Kb]`` for ``q``/``k``
  ``[B, Hg, N, D]`` (the family's heads, already in the order of ``permutation``) -- every call;
* ``permutation(layout, spec, device) -> Permutation | None`` -- cached; ``None`` = natural order.

The full form (``build_group=``, with ``kind=``) receives a :class:`GroupCall` -- the call's q/k/v, layout,
block size, scale, step, the layer's state (``call.state.family_state(name)`` is a dict the family owns,
reset with the state) and the mask cache -- and returns a :class:`GroupWork`; cross-step families may also
give ``on_dense(call, spec, heads, out, lse)``, run on dense (warm-up / refresh) passes to fill their state.
(``plan_group=`` is the deprecated name of ``build_group=``.)

Single-step families (static / dynamic) may be declared with ``remainder=True`` (the built-in ``radial``,
``tile``, ``reordered`` and ``topp`` are): they get the head-level parameter ``remainder`` -- ``"none"``
(default; a spec or plan without it means this) or ``"pooled"``: :func:`sparsediff.sparse_attention` adds
the key blocks a query block does not keep as pooled keys (:mod:`sparsediff.patterns.remainder`), the
search measures and prices the pooled variant of every candidate of such a family.

Rows and columns of non-grid tokens (text) are not made dense for you: a family decides (the helpers of
:mod:`sparsediff.patterns.common` do it for the built-in families). Built-in families cannot be replaced.

This module imports no family module and nothing of :mod:`sparsediff.specs` (which imports it): specs are
duck-typed here (``spec.pattern``, ``spec.get(name)``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..mask import BlockSparseMask
from ..permute import gather_tokens
from . import params as params_mod

__all__ = [
    "PatternFamily",
    "GroupCall",
    "GroupWork",
    "GroupPlan",
    "KINDS",
    "CROSS_STEP",
    "CROSS_STEP_MEASURES",
    "PATTERN_PARAMS",
    "PARAM_CHECKS",
    "register_pattern",
    "unregister_pattern",
    "get_family",
    "families",
    "registered_patterns",
    "builtin_patterns",
    "builtin_family",
    "register_builtin",
    "static_group",
    "check_params",
    "REMAINDER_PARAM",
    "REMAINDERS",
]

#: The cross-step kind: state carried across denoising steps (see the module docstring).
CROSS_STEP = "cross_step"
#: The cross-step kind's name until 0.1 (``register_pattern(kind="cached")``): accepted with a warning.
DEPRECATED_KINDS = {"cached": CROSS_STEP}


def _current_kind(kind: Any, name: str) -> Any:
    """``kind`` with a deprecated name replaced by the current one (and a ``FutureWarning``)."""
    if isinstance(kind, str) and kind in DEPRECATED_KINDS:
        new = DEPRECATED_KINDS[kind]
        warnings.warn(
            f"pattern {name!r}: kind={kind!r} is now kind={new!r}; the old name goes in the next release",
            FutureWarning,
            stacklevel=3,
        )
        return new
    return kind


#: The head-level parameter of the families declared with ``remainder=True`` (see :data:`REMAINDERS`).
REMAINDER_PARAM = "remainder"
#: Its values: ``"none"`` (default: softmax over the kept key blocks only, as before the parameter existed)
#: or ``"pooled"`` (every key block *not* kept for a query block is added as one pooled key -- the block's
#: mean key, logit ``+ log(tokens in the block)`` -- carrying the block's mean value, merged with the
#: sparse part by log-sum-exp; :mod:`sparsediff.patterns.remainder`) or ``"cached"`` (static families only:
#: every :data:`REMAINDER_REFRESH_PARAM` denoising steps the head runs exact -- the op's blocks and one dense
#: pass -- and keeps what its mask leaves out as ``(out, lse)``; the calls in between merge that stored
#: remainder with the fresh blocks by log-sum-exp; :func:`sparsediff.patterns.remainder.split_remainder`).
REMAINDERS = ("none", "pooled", "cached")
#: Steps between the exact passes of a ``remainder="cached"`` head (the stored remainder is at most this
#: many steps old); ignored by the other remainder modes.
REMAINDER_REFRESH_PARAM = "remainder_refresh"

#: The kinds of pattern (see the module docstring).
KINDS = ("static", "dynamic", CROSS_STEP)
#: How the search may measure a cross-step family (see the module docstring).
CROSS_STEP_MEASURES = ("reuse_output", "block_mass")

_FAMILIES: dict[str, PatternFamily] = {}
_BUILTIN: list[str] = []


def _any_value(v: Any) -> bool:
    return True


@dataclass
class GroupCall:
    """What a family sees of one :func:`~sparsediff.sparse_attention` call (shared by all its groups).

    Attributes:
        q, k, v: ``[B, H, N, D]`` in natural token order (all heads of the layer).
        layout, block_size, scale, step, backend: as passed to ``sparse_attention``.
        state: the layer's :class:`~sparsediff.attention.LayerState`, or None.
        cache: the :class:`~sparsediff.attention.MaskCache`, or None (build every call).
        memo: results of this call only (data dependent, e.g. k-means orders), shared by its groups
            (:meth:`memoized`); the search measures several candidates on one call through it.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layout: Any
    block_size: int
    scale: float
    step: int | None
    state: Any
    cache: Any
    backend: str
    memo: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def num_tokens(self) -> int:
        return int(self.q.shape[2])

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per key in the mask cache (every call when there is no cache)."""
        return self.cache.get_or_build(key, build) if self.cache is not None else build()

    def memoized(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per key and call (data-dependent results, never kept across calls)."""
        if key not in self.memo:
            self.memo[key] = build()
        return self.memo[key]

    def dense_tokens(self) -> torch.Tensor:
        """bool ``[N]``: tokens outside the primary grid, natural order (cached)."""
        return self.cached(
            ("dense_tokens", self.layout, str(self.device)), lambda: self.layout.dense_mask(self.device)
        )

    def dense_tokens_grid_first(self) -> torch.Tensor:
        """bool ``[N]``: the same flags for orders that put the grid first (every reorder does)."""
        n, g = self.num_tokens, self.layout.grid_len
        return self.cached(
            ("dense_tokens_grid_first", self.layout, str(self.device)),
            lambda: torch.arange(n, device=self.device) >= g,
        )

    def full_mask(self, heads: int) -> BlockSparseMask:
        """Every block, for ``heads`` heads (:meth:`BlockSparseMask.full`: no sort, no host sync)."""
        n = self.num_tokens
        return BlockSparseMask.full(1, heads, self.block_size, (n, n), self.device)


@dataclass
class GroupWork:
    """How one group of heads runs in this call.

    Attributes:
        mask: ``[1|B, 1|Hg, Qb, Kb]`` in the order of ``perm_q`` / ``perm_k`` (expanded to the group's heads).
        perm_q, perm_k: :class:`~sparsediff.permute.Permutation` of queries / keys and values (``perm_k``
            defaults to ``perm_q``); None = natural order.
        after: ``after(out, lse)`` run after the op with the layer's output ``[B, H, N, D]`` and LSE
            ``[B, H, N]`` (natural order for unpermuted groups), e.g. to store state or fill outputs.
        writes_output: ``after`` writes into ``out`` (it is then a fresh tensor in q's layout).
    """

    mask: BlockSparseMask
    perm_q: Any = None
    perm_k: Any = None
    after: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    writes_output: bool = False


#: Deprecated name of :class:`GroupWork` (kept for one release).
GroupPlan = GroupWork


@dataclass(frozen=True)
class PatternFamily:
    """A pattern family (see the module docstring). ``kind`` is one of :data:`KINDS` or ``kind(spec)``.

    Runtime: ``params``, ``checks``, ``kind``, ``static_mask`` / ``select`` / ``permutation`` (simple form) or
    ``build_group`` (full form), ``on_dense``, ``check``, ``doc``, ``remainder`` (the family has the
    :data:`REMAINDER_PARAM` parameter). Search (all optional): ``candidates``, ``cost``, ``label``,
    ``planted``, ``needs_grid``, ``cross_step_measure``, ``refresh_param``.
    """

    name: str
    params: Mapping[str, Any]
    checks: Mapping[str, tuple[Callable[[Any], bool], str]]
    kind: str | Callable[[Any], str] = "static"
    static_mask: Callable[..., Any] | None = None
    select: Callable[..., Any] | None = None
    permutation: Callable[..., Any] | None = None
    build_group: Callable[..., GroupWork] | None = None
    on_dense: Callable[..., None] | None = None
    check: Callable[[Any], None] | None = None
    doc: str = field(default="", compare=False)
    builtin: bool = False
    candidates: Callable[..., Sequence[Any]] | None = None
    cost: Callable[..., float] | None = None
    label: str | Callable[[Any], str] | None = None
    planted: Callable[..., bool] | None = None
    needs_grid: bool = False
    cross_step_measure: str | None = None
    refresh_param: str | None = None
    remainder: bool = False

    def kind_of(self, spec: Any) -> str:
        k = _current_kind(self.kind(spec) if callable(self.kind) else self.kind, self.name)
        if k not in KINDS:
            raise ValueError(f"pattern {self.name!r}: kind must be one of {KINDS}, got {k!r}")
        return k

    def is_static_spec(self, spec: Any) -> bool:
        return self.kind_of(spec) == "static"

    def is_cross_step_spec(self, spec: Any) -> bool:
        return self.kind_of(spec) == CROSS_STEP

    @property
    def is_static(self) -> bool:
        """True when every spec of the family is static (user families: a ``static_mask`` builder)."""
        return not callable(self.kind) and self.kind == "static"

    def label_of(self, spec: Any) -> str:
        """The name of ``spec``'s family in reports and heatmaps (``label``, default the family name)."""
        if self.label is None:
            return self.name
        return str(self.label(spec)) if callable(self.label) else str(self.label)

    def group_work(self, call: GroupCall, spec: Any, heads: tuple[int, ...]) -> GroupWork:
        """The :class:`GroupWork` of ``heads`` (all with ``spec``) in ``call``."""
        if self.build_group is not None:
            return self.build_group(call, spec, heads)
        return _simple_group(self, call, spec, heads)

    # deprecated names (one release)
    @property
    def plan(self) -> Callable[..., GroupWork] | None:
        """Deprecated name of :attr:`build_group`."""
        return self.build_group

    def plan_group(self, call: GroupCall, spec: Any, heads: tuple[int, ...]) -> GroupWork:
        """Deprecated name of :meth:`group_work`."""
        return self.group_work(call, spec, heads)


# ---------------------------------------------------------------------- the simple form
def static_group(
    call: GroupCall,
    spec: Any,
    heads: Sequence[int],
    build: Callable[[], BlockSparseMask],
    perm: Any = None,
) -> GroupWork:
    """A group with a static mask, cached under ``("mask", layout, spec, block_size, device)``."""
    m = call.cached(("mask", call.layout, spec, call.block_size, str(call.device)), build)
    return GroupWork(mask=m, perm_q=perm)


def _simple_group(fam: PatternFamily, call: GroupCall, spec: Any, heads: tuple[int, ...]) -> GroupWork:
    layout, dev, bs, n = call.layout, call.device, call.block_size, call.num_tokens
    perm = None
    if fam.permutation is not None:
        perm = call.cached(("perm", layout, spec, str(dev)), lambda: fam.permutation(layout, spec, dev))
    if fam.static_mask is not None:
        work = static_group(call, spec, heads, lambda: fam.static_mask(layout, spec, bs, dev), perm)
        m = work.mask
        if (
            not isinstance(m, BlockSparseMask)
            or tuple(m.seq_lens) != (n, n)
            or tuple(m.block_size) != (bs, bs)
        ):
            raise ValueError(
                f"pattern {spec.pattern!r}: static_mask must return a BlockSparseMask with block size {bs} "
                f"for {n} x {n} tokens, got {m!r}"
            )
        return work
    if fam.select is None:
        raise ValueError(f"pattern {fam.name!r} has neither a mask builder nor a selection")
    hl = list(heads)
    qg, kg = call.q[:, hl], call.k[:, hl]
    if perm is not None:
        qg, kg = gather_tokens(qg, perm.perm), gather_tokens(kg, perm.perm)
    bb = torch.as_tensor(fam.select(qg, kg, layout, spec, bs, call.scale)).to(torch.bool)
    return GroupWork(
        mask=BlockSparseMask.from_dense(bb.expand(bb.shape[0], len(hl), -1, -1), bs, (n, n)), perm_q=perm
    )


# ---------------------------------------------------------------------- parameter tables (read-only views)
class _FamilyTable(Mapping):
    """A read-only ``{pattern: value}`` view of the registered families (a fresh dict per item)."""

    def __init__(self, get: Callable[[PatternFamily], Any]) -> None:
        self._get = get

    def __getitem__(self, name: str) -> Any:
        return self._get(_FAMILIES[name])

    def __iter__(self) -> Iterator[str]:
        return iter(list(_FAMILIES))

    def __len__(self) -> int:
        return len(_FAMILIES)

    def __repr__(self) -> str:
        return repr(dict(self))


#: Parameter defaults of every registered pattern family, ``{pattern: {name: default}}`` (a live view).
PATTERN_PARAMS: Mapping[str, dict[str, Any]] = _FamilyTable(lambda f: dict(f.params))
#: ``PARAM_CHECKS[pattern][name] = (predicate, description of the allowed values)`` (a live view).
PARAM_CHECKS: Mapping[str, dict[str, tuple[Callable[[Any], bool], str]]] = _FamilyTable(
    lambda f: dict(f.checks)
)


def _check_value(pattern: str, checks: Mapping[str, Any], name: str, value: Any) -> None:
    ok, allowed = checks[name]
    try:
        good = bool(ok(value))
    except TypeError:  # e.g. an unhashable / incomparable value
        good = False
    if not good:
        raise ValueError(
            f"pattern {pattern!r}: parameter {name!r} = {value!r} ({type(value).__name__}) is invalid; "
            f"it must be {allowed}"
        )


def check_params(pattern: str, items: Sequence[tuple[str, Any]]) -> PatternFamily:
    """Check frozen, sorted ``(name, value)`` pairs of a spec of ``pattern``: known pattern, known names,
    no duplicates, every value allowed. Returns the family (the cross-parameter ``check`` is the caller's)."""
    fam = _FAMILIES.get(pattern)
    if fam is None:
        raise ValueError(
            f"unknown pattern {pattern!r}; known patterns: {tuple(_FAMILIES)} "
            "(add your own with sparsediff.register_pattern)"
        )
    names = [k for k, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate parameter names in {names}")
    unknown = [k for k in names if k not in fam.params]
    if unknown:
        raise ValueError(
            f"pattern {pattern!r} has no parameter(s) {unknown}; its parameters are {sorted(fam.params)}"
        )
    for k, v in items:
        _check_value(pattern, fam.checks, k, v)
    return fam


@dataclass(frozen=True)
class _Defaults:
    """The all-defaults spec of a family being registered, for its cross-parameter ``check`` (duck-typed
    like :class:`~sparsediff.HeadSpec`: ``pattern``, ``params``, ``get``)."""

    pattern: str
    defaults: Mapping[str, Any]
    params: tuple = ()

    def get(self, name: str, default: Any = None) -> Any:
        return self.defaults.get(name, default)

    def __repr__(self) -> str:
        return f"HeadSpec({self.pattern})"


# ---------------------------------------------------------------------- registration
def _full_checks(name: str, params: Mapping[str, Any], checks: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(checks) - set(params)
    if unknown:
        raise ValueError(f"pattern {name!r}: checks for unknown parameters {sorted(unknown)}")
    return {p: checks.get(p, (_any_value, "any hashable value")) for p in params}


def _check_search_fields(name: str, fam: PatternFamily) -> None:
    for what in ("candidates", "cost", "planted"):
        fn = getattr(fam, what)
        if fn is not None and not callable(fn):
            raise TypeError(f"pattern {name!r}: {what} must be callable, got {type(fn).__name__}")
    if fam.label is not None and not (isinstance(fam.label, str) or callable(fam.label)):
        raise TypeError(f"pattern {name!r}: label must be a string or label(spec) -> str")
    if fam.cross_step_measure is not None and fam.cross_step_measure not in CROSS_STEP_MEASURES:
        raise ValueError(
            f"pattern {name!r}: cross_step_measure must be one of {CROSS_STEP_MEASURES}, "
            f"got {fam.cross_step_measure!r}"
        )
    if fam.refresh_param is not None and fam.refresh_param not in fam.params:
        raise ValueError(
            f"pattern {name!r}: refresh_param {fam.refresh_param!r} is not one of its parameters"
        )


def _remainder_params(
    name: str, params: Mapping[str, Any], checks: Mapping[str, Any], kind: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``params`` / ``checks`` with the :data:`REMAINDER_PARAM` (default ``"none"``) and
    :data:`REMAINDER_REFRESH_PARAM` (default 5) parameters added, for a family declared with
    ``remainder=True`` (single-step kinds only: a cross-step family's output is not the op's block-sparse
    output of this call)."""
    for p in (REMAINDER_PARAM, REMAINDER_REFRESH_PARAM):
        if p in params:
            raise ValueError(f"pattern {name!r}: {p!r} is added by remainder=True; do not declare it")
    if not callable(kind) and _current_kind(kind, name) == CROSS_STEP:
        raise ValueError(f"pattern {name!r}: remainder=True is for single-step (static / dynamic) families")
    return (
        {**params, REMAINDER_PARAM: "none", REMAINDER_REFRESH_PARAM: 5},
        {
            **checks,
            REMAINDER_PARAM: (lambda v: v in REMAINDERS, f"one of {REMAINDERS}"),
            REMAINDER_REFRESH_PARAM: params_mod.int_ge(1),
        },
    )


def builtin_family(
    name: str,
    *,
    params: Mapping[str, Any],
    checks: Mapping[str, tuple[Callable[[Any], bool], str]],
    kind: str | Callable[[Any], str],
    doc: str,
    build_group: Callable[..., GroupWork],
    static_mask: Callable[..., Any] | None = None,
    on_dense: Callable[..., None] | None = None,
    check: Callable[[Any], None] | None = None,
    candidates: Callable[..., Sequence[Any]] | None = None,
    cost: Callable[..., float] | None = None,
    label: str | Callable[[Any], str] | None = None,
    planted: Callable[..., bool] | None = None,
    needs_grid: bool = False,
    cross_step_measure: str | None = None,
    refresh_param: str | None = None,
    remainder: bool = False,
) -> PatternFamily:
    """A built-in family, declared in its own module (``FAMILY = builtin_family(...)``) and registered by
    :mod:`sparsediff.patterns` (:func:`register_builtin`). ``remainder=True`` gives it the head-level
    parameter :data:`REMAINDER_PARAM` (values :data:`REMAINDERS`, default ``"none"``)."""
    if set(checks) != set(params):
        raise ValueError(f"built-in pattern {name!r}: every parameter needs a check")
    if remainder:
        params, checks = _remainder_params(name, params, checks, kind)
    fam = PatternFamily(
        name,
        dict(params),
        dict(checks),
        kind,
        static_mask=static_mask,
        build_group=build_group,
        on_dense=on_dense,
        check=check,
        doc=doc,
        builtin=True,
        candidates=candidates,
        cost=cost,
        label=label,
        planted=planted,
        needs_grid=needs_grid,
        cross_step_measure=cross_step_measure,
        refresh_param=refresh_param,
        remainder=bool(remainder),
    )
    _check_search_fields(name, fam)
    return fam


def register_builtin(fam: PatternFamily) -> PatternFamily:
    """Register a built-in family (once, by :mod:`sparsediff.patterns`)."""
    if not fam.builtin:
        raise ValueError(f"{fam.name!r} is not a built-in family (use register_pattern)")
    if fam.name in _FAMILIES:
        raise ValueError(f"built-in pattern {fam.name!r} registered twice")
    _BUILTIN.append(fam.name)
    _FAMILIES[fam.name] = fam
    return fam


def register_pattern(
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    checks: Mapping[str, tuple[Callable[[Any], bool], str]] | None = None,
    static_mask: Callable[..., Any] | None = None,
    select: Callable[..., Any] | None = None,
    permutation: Callable[..., Any] | None = None,
    build_group: Callable[..., GroupWork] | None = None,
    kind: str | None = None,
    on_dense: Callable[..., None] | None = None,
    check: Callable[[Any], None] | None = None,
    doc: str = "",
    candidates: Callable[..., Sequence[Any]] | None = None,
    cost: Callable[..., float] | None = None,
    label: str | Callable[[Any], str] | None = None,
    planted: Callable[..., bool] | None = None,
    needs_grid: bool = False,
    cross_step_measure: str | None = None,
    refresh_param: str | None = None,
    remainder: bool = False,
    replace: bool = False,
    plan_group: Callable[..., GroupWork] | None = None,
) -> PatternFamily:
    """Register a pattern family ``name`` (see the module docstring); returns its :class:`PatternFamily`.

    Args:
        params: parameter names and defaults (hashable values: scalars, strings, tuples).
        checks: ``{param: (predicate, "what is allowed")}`` for some or all parameters; unchecked
            parameters accept any hashable value.
        static_mask / select: the simple form -- exactly one of a static mask builder or a dynamic
            block selection (``kind`` is then ``"static"`` / ``"dynamic"``).
        permutation: optional token order of the family's heads (simple form).
        build_group / kind / on_dense: the full form -- ``build_group(call, spec, heads) -> GroupWork``
            with its ``kind`` (``"static"``, ``"dynamic"`` or ``"cross_step"``); ``on_dense`` for
            cross-step families.
        check: ``check(spec)`` raising ``ValueError`` for parameter combinations that are not allowed.
        doc: one line shown in error messages and listings.
        candidates, cost, label, planted, needs_grid, cross_step_measure, refresh_param: what the search
            needs to enumerate and price the family (all optional; see the module docstring). Without
            ``candidates`` the family is not in the default search grid.
        remainder: give the family the head-level parameter ``remainder`` (:data:`REMAINDERS`, default
            ``"none"``; static / dynamic families only): with ``remainder="pooled"`` the op adds the key
            blocks the mask leaves out as pooled keys (:mod:`sparsediff.patterns.remainder`), and the
            search measures the pooled variant of each of its candidates.
        replace: allow registering ``name`` again (e.g. in a notebook); built-in names never.
        plan_group: deprecated name of ``build_group`` (FutureWarning).

    Raises:
        ValueError: a built-in or already registered name (without ``replace``), not exactly one of
            ``static_mask`` / ``select`` / ``build_group``, a full form without ``kind``, checks for
            unknown parameters, or defaults that fail them.
    """
    if plan_group is not None:
        warnings.warn(
            "register_pattern(plan_group=...) is deprecated; use build_group=...", FutureWarning, stacklevel=2
        )
        if build_group is not None:
            raise ValueError(f"pattern {name!r}: give build_group= or its old name plan_group=, not both")
        build_group = plan_group
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a pattern name must be an identifier string, got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in pattern and cannot be registered over")
    if name in _FAMILIES and not replace:
        raise ValueError(f"pattern {name!r} is already registered (pass replace=True to replace it)")
    given = [
        w for w, fn in (("static_mask", static_mask), ("select", select), ("build_group", build_group)) if fn
    ]
    if len(given) != 1:
        raise ValueError(
            f"pattern {name!r}: give exactly one of static_mask= (static), select= (dynamic) or "
            f"build_group= (with kind=), got {given or 'none'}"
        )
    for what, fn in (
        ("static_mask", static_mask),
        ("select", select),
        ("permutation", permutation),
        ("build_group", build_group),
        ("on_dense", on_dense),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"pattern {name!r}: {what} must be callable, got {type(fn).__name__}")
    if isinstance(kind, str):
        kind = _current_kind(kind, name)
    if build_group is not None:
        if kind not in KINDS:
            raise ValueError(f"pattern {name!r}: build_group= needs kind= one of {KINDS}, got {kind!r}")
        if permutation is not None:
            raise ValueError(f"pattern {name!r}: with build_group= the group's work holds the permutation")
    else:
        if kind is not None and kind != ("static" if static_mask else "dynamic"):
            raise ValueError(f"pattern {name!r}: kind={kind!r} does not match the builder given")
        kind = "static" if static_mask is not None else "dynamic"
    if on_dense is not None and kind != CROSS_STEP:
        raise ValueError(f"pattern {name!r}: on_dense= is for cross-step (kind={CROSS_STEP!r}) families")
    if cross_step_measure is not None and kind != CROSS_STEP:
        raise ValueError(
            f"pattern {name!r}: cross_step_measure= is for cross-step (kind={CROSS_STEP!r}) families"
        )
    params = dict(params or {})
    full_checks = _full_checks(name, params, dict(checks or {}))
    if remainder:
        params, full_checks = _remainder_params(name, params, full_checks, kind)
    fam = PatternFamily(
        name,
        params,
        full_checks,
        kind,
        static_mask=static_mask,
        select=select,
        permutation=permutation,
        build_group=build_group,
        on_dense=on_dense,
        check=check,
        doc=doc,
        candidates=candidates,
        cost=cost,
        label=label,
        planted=planted,
        needs_grid=bool(needs_grid),
        cross_step_measure=cross_step_measure,
        refresh_param=refresh_param,
        remainder=bool(remainder),
    )
    _check_search_fields(name, fam)
    for k, v in params.items():  # the defaults must pass the checks
        _check_value(name, fam.checks, k, v)
    if check is not None:
        check(_Defaults(name, params))
    _FAMILIES[name] = fam
    return fam


def unregister_pattern(name: str) -> None:
    """Remove a registered family (built-in families cannot be removed)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in pattern")
    if name not in _FAMILIES:
        raise KeyError(f"pattern {name!r} is not registered")
    del _FAMILIES[name]


def get_family(name: str) -> PatternFamily:
    """The family ``name`` (built-in or registered); ``ValueError`` naming the known patterns otherwise."""
    fam = _FAMILIES.get(name)
    if fam is None:
        raise ValueError(
            f"unknown pattern {name!r}; built-in patterns: {sorted(_BUILTIN)}, "
            f"registered: {sorted(registered_patterns())}"
        )
    return fam


def families() -> tuple[PatternFamily, ...]:
    """Every registered family (built-in first, then user families), in registration order."""
    return tuple(_FAMILIES.values())


def registered_patterns() -> dict[str, PatternFamily]:
    """The user-registered families by name (a copy)."""
    return {n: f for n, f in _FAMILIES.items() if not f.builtin}


def builtin_patterns() -> tuple[str, ...]:
    """Names of the built-in families, in registration order."""
    return tuple(_BUILTIN)
