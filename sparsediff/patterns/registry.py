"""Pattern families: one module per family, one registry, and :func:`register_pattern` for users.

Every pattern a :class:`~sparsediff.HeadSpec` can name -- the built-in ``dense``, ``skip``, ``radial``,
``tile``, ``reordered``, ``topp``, ``lse_cache`` and any a user registers -- is a :class:`PatternFamily`
declared in one place (the built-ins: ``sparsediff/patterns/<name>.py``). A family declares

* its **parameters**: defaults, a value check per parameter, an optional check across parameters, a doc line;
* its **kind** per spec: ``"static"`` (mask and permutation are functions of the layout, the parameters and
  the block size: built once, cached), ``"dynamic"`` (chosen from ``q``/``k`` on every call) or ``"cached"``
  (state carried across denoising steps in the layer's :class:`~sparsediff.attention.LayerState`: a dense
  pass fills it, later steps reuse it);
* how a group of heads with that spec runs in one call: its mask, its token permutation (if any), and what it
  does after the op -- :meth:`PatternFamily.plan_group`, which returns a :class:`GroupPlan`.

:func:`sparsediff.sparse_attention` dispatches every group of heads through the registry (no per-family
branches); ``HeadSpec`` validates against it; :func:`sparsediff.patterns.static_mask` builds any static mask
through it; plans, ``SparseAttentionConfig(pattern_params=...)``, ``enable_sparse_attention(pipe, "name")``
and the search accept every registered name.

User families -- the simple form declares a mask builder and optionally a permutation::

    def strided(layout, spec, block_size, device):
        nb = -(-layout.num_tokens // block_size)
        i = torch.arange(nb, device=device)
        keep = (i.view(-1, 1) - i.view(1, -1)) % spec.get("stride") == 0
        return sparsediff.BlockSparseMask.from_dense(keep[None, None], block_size, (layout.num_tokens,) * 2)

    sparsediff.register_pattern("strided", params={"stride": 2}, static_mask=strided)
    pipe.enable_sparse_attention(sparsediff.Plan.uniform("strided", stride=3))

Builders of the simple form (``device`` may be None = CPU):

* ``static_mask(layout, spec, block_size, device) -> BlockSparseMask`` ``[1, 1, Qb, Kb]`` in the order
  of ``permutation`` -- cached per (layout, spec, block size, device);
* ``select(q, k, layout, spec, block_size, scale) -> bool [B|1, H|1, Qb, Kb]`` for ``q``/``k``
  ``[B, Hg, N, D]`` (the family's heads, already in the order of ``permutation``) -- every call;
* ``permutation(layout, spec, device) -> Permutation | None`` -- cached; ``None`` = natural order.

The full form (``plan_group=``, with ``kind=``) receives a :class:`GroupCall` -- the call's q/k/v, layout,
block size, scale, step, the layer's state (``call.state.slot(name)`` is a dict the family owns, reset with
the state) and the mask cache -- and returns a :class:`GroupPlan`; ``"cached"`` families may also give
``on_dense(call, spec, heads, out, lse)``, run on dense (warm-up / refresh) passes to fill their state.

Rows and columns of non-grid tokens (text) are not made dense for you: a family decides (the helpers of
:mod:`sparsediff.patterns.common` do it for the built-in families). Built-in families cannot be replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import specs
from ..mask import BlockSparseMask

__all__ = [
    "PatternFamily",
    "GroupCall",
    "GroupPlan",
    "KINDS",
    "register_pattern",
    "unregister_pattern",
    "get_family",
    "registered_patterns",
    "builtin_patterns",
    "static_group",
]

#: The kinds of pattern (see the module docstring).
KINDS = ("static", "dynamic", "cached")

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

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def num_tokens(self) -> int:
        return int(self.q.shape[2])

    def cached(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """``build()`` once per key in the mask cache (every call when there is no cache)."""
        return self.cache.get_or_build(key, build) if self.cache is not None else build()

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
class GroupPlan:
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


@dataclass(frozen=True)
class PatternFamily:
    """A pattern family (see the module docstring). ``kind`` is one of :data:`KINDS` or ``kind(spec)``."""

    name: str
    params: Mapping[str, Any]
    checks: Mapping[str, tuple[Callable[[Any], bool], str]]
    kind: str | Callable[[Any], str] = "static"
    static_mask: Callable[..., Any] | None = None
    select: Callable[..., Any] | None = None
    permutation: Callable[..., Any] | None = None
    plan: Callable[..., GroupPlan] | None = None
    on_dense: Callable[..., None] | None = None
    check: Callable[[Any], None] | None = None
    doc: str = field(default="", compare=False)
    builtin: bool = False

    def kind_of(self, spec: Any) -> str:
        k = self.kind(spec) if callable(self.kind) else self.kind
        if k not in KINDS:
            raise ValueError(f"pattern {self.name!r}: kind must be one of {KINDS}, got {k!r}")
        return k

    def is_static_spec(self, spec: Any) -> bool:
        return self.kind_of(spec) == "static"

    @property
    def is_static(self) -> bool:
        """True when every spec of the family is static (user families: a ``static_mask`` builder)."""
        return not callable(self.kind) and self.kind == "static"

    def plan_group(self, call: GroupCall, spec: Any, heads: tuple[int, ...]) -> GroupPlan:
        """The :class:`GroupPlan` of ``heads`` (all with ``spec``) in ``call``."""
        if self.plan is not None:
            return self.plan(call, spec, heads)
        return _simple_plan(self, call, spec, heads)


# ---------------------------------------------------------------------- plans of the simple form
def static_group(
    call: GroupCall,
    spec: Any,
    heads: Sequence[int],
    build: Callable[[], BlockSparseMask],
    perm: Any = None,
) -> GroupPlan:
    """A group with a static mask, cached under ``("mask", layout, spec, block_size, device)``."""
    m = call.cached(("mask", call.layout, spec, call.block_size, str(call.device)), build)
    return GroupPlan(mask=m, perm_q=perm)


def _simple_plan(fam: PatternFamily, call: GroupCall, spec: Any, heads: tuple[int, ...]) -> GroupPlan:
    layout, dev, bs, n = call.layout, call.device, call.block_size, call.num_tokens
    perm = None
    if fam.permutation is not None:
        perm = call.cached(("perm", layout, spec, str(dev)), lambda: fam.permutation(layout, spec, dev))
    if fam.static_mask is not None:
        plan = static_group(call, spec, heads, lambda: fam.static_mask(layout, spec, bs, dev), perm)
        m = plan.mask
        if (
            not isinstance(m, BlockSparseMask)
            or tuple(m.seq_lens) != (n, n)
            or tuple(m.block_size) != (bs, bs)
        ):
            raise ValueError(
                f"pattern {spec.pattern!r}: static_mask must return a BlockSparseMask with block size {bs} "
                f"for {n} x {n} tokens, got {m!r}"
            )
        return plan
    if fam.select is None:
        raise ValueError(f"pattern {fam.name!r} has neither a mask builder nor a selection")
    hl = list(heads)
    qg, kg = call.q[:, hl], call.k[:, hl]
    if perm is not None:
        from ..permute import gather_tokens

        qg, kg = gather_tokens(qg, perm.perm), gather_tokens(kg, perm.perm)
    bb = torch.as_tensor(fam.select(qg, kg, layout, spec, bs, call.scale)).to(torch.bool)
    return GroupPlan(
        mask=BlockSparseMask.from_dense(bb.expand(bb.shape[0], len(hl), -1, -1), bs, (n, n)), perm_q=perm
    )


# ---------------------------------------------------------------------- registration
def _install(fam: PatternFamily) -> PatternFamily:
    specs.PATTERN_PARAMS[fam.name] = dict(fam.params)
    specs.PARAM_CHECKS[fam.name] = dict(fam.checks)
    if fam.check is not None:
        specs.SPEC_CHECKS[fam.name] = fam.check
    else:
        specs.SPEC_CHECKS.pop(fam.name, None)
    _FAMILIES[fam.name] = fam
    return fam


def _full_checks(name: str, params: Mapping[str, Any], checks: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(checks) - set(params)
    if unknown:
        raise ValueError(f"pattern {name!r}: checks for unknown parameters {sorted(unknown)}")
    return {p: checks.get(p, (_any_value, "any hashable value")) for p in params}


def register_builtin(
    name: str,
    *,
    params: Mapping[str, Any],
    checks: Mapping[str, tuple[Callable[[Any], bool], str]],
    kind: str | Callable[[Any], str],
    doc: str,
    static_mask: Callable[..., Any] | None = None,
    plan: Callable[..., GroupPlan] | None = None,
    on_dense: Callable[..., None] | None = None,
    check: Callable[[Any], None] | None = None,
) -> PatternFamily:
    """Register a built-in family (called once, at import, by the family's own module)."""
    if name in _FAMILIES:
        raise ValueError(f"built-in pattern {name!r} registered twice")
    if set(checks) != set(params):
        raise ValueError(f"built-in pattern {name!r}: every parameter needs a check")
    fam = PatternFamily(
        name,
        dict(params),
        dict(checks),
        kind,
        static_mask=static_mask,
        plan=plan,
        on_dense=on_dense,
        check=check,
        doc=doc,
        builtin=True,
    )
    _BUILTIN.append(name)
    return _install(fam)


def register_pattern(
    name: str,
    *,
    params: Mapping[str, Any] | None = None,
    checks: Mapping[str, tuple[Callable[[Any], bool], str]] | None = None,
    static_mask: Callable[..., Any] | None = None,
    select: Callable[..., Any] | None = None,
    permutation: Callable[..., Any] | None = None,
    plan_group: Callable[..., GroupPlan] | None = None,
    kind: str | None = None,
    on_dense: Callable[..., None] | None = None,
    check: Callable[[Any], None] | None = None,
    doc: str = "",
    replace: bool = False,
) -> PatternFamily:
    """Register a pattern family ``name`` (see the module docstring); returns its :class:`PatternFamily`.

    Args:
        params: parameter names and defaults (hashable values: scalars, strings, tuples).
        checks: ``{param: (predicate, "what is allowed")}`` for some or all parameters; unchecked
            parameters accept any hashable value.
        static_mask / select: the simple form -- exactly one of a static mask builder or a dynamic
            block selection (``kind`` is then ``"static"`` / ``"dynamic"``).
        permutation: optional token order of the family's heads (simple form).
        plan_group / kind / on_dense: the full form -- ``plan_group(call, spec, heads) -> GroupPlan``
            with its ``kind`` (``"static"``, ``"dynamic"`` or ``"cached"``); ``on_dense`` for cached families.
        check: ``check(spec)`` raising ``ValueError`` for parameter combinations that are not allowed.
        doc: one line shown in error messages and listings.
        replace: allow registering ``name`` again (e.g. in a notebook); built-in names never.

    Raises:
        ValueError: a built-in or already registered name (without ``replace``), not exactly one of
            ``static_mask`` / ``select`` / ``plan_group``, a full form without ``kind``, checks for
            unknown parameters, or defaults that fail them.
    """
    _ensure_builtins()
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a pattern name must be an identifier string, got {name!r}")
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in pattern and cannot be registered over")
    if name in _FAMILIES and not replace:
        raise ValueError(f"pattern {name!r} is already registered (pass replace=True to replace it)")
    given = [
        w for w, fn in (("static_mask", static_mask), ("select", select), ("plan_group", plan_group)) if fn
    ]
    if len(given) != 1:
        raise ValueError(
            f"pattern {name!r}: give exactly one of static_mask= (static), select= (dynamic) or "
            f"plan_group= (with kind=), got {given or 'none'}"
        )
    for what, fn in (
        ("static_mask", static_mask),
        ("select", select),
        ("permutation", permutation),
        ("plan_group", plan_group),
        ("on_dense", on_dense),
    ):
        if fn is not None and not callable(fn):
            raise TypeError(f"pattern {name!r}: {what} must be callable, got {type(fn).__name__}")
    if plan_group is not None:
        if kind not in KINDS:
            raise ValueError(f"pattern {name!r}: plan_group= needs kind= one of {KINDS}, got {kind!r}")
        if permutation is not None:
            raise ValueError(f"pattern {name!r}: with plan_group= the plan returns the permutation")
    else:
        if kind is not None and kind != ("static" if static_mask else "dynamic"):
            raise ValueError(f"pattern {name!r}: kind={kind!r} does not match the builder given")
        kind = "static" if static_mask is not None else "dynamic"
    if on_dense is not None and kind != "cached":
        raise ValueError(f"pattern {name!r}: on_dense= is for kind='cached' families")
    params = dict(params or {})
    fam = PatternFamily(
        name,
        params,
        _full_checks(name, params, dict(checks or {})),
        kind,
        static_mask=static_mask,
        select=select,
        permutation=permutation,
        plan=plan_group,
        on_dense=on_dense,
        check=check,
        doc=doc,
    )
    old = _FAMILIES.get(name)
    _install(fam)
    try:
        specs.HeadSpec.make(name)  # the defaults must pass the checks
    except Exception:
        unregister_pattern(name)
        if old is not None:
            _install(old)
        raise
    return fam


def unregister_pattern(name: str) -> None:
    """Remove a registered family (built-in families cannot be removed)."""
    if name in _BUILTIN:
        raise ValueError(f"{name!r} is a built-in pattern")
    if name not in _FAMILIES:
        raise KeyError(f"pattern {name!r} is not registered")
    del _FAMILIES[name]
    for table in (specs.PATTERN_PARAMS, specs.PARAM_CHECKS, specs.SPEC_CHECKS):
        table.pop(name, None)


def _ensure_builtins() -> None:
    if not _BUILTIN:
        from .. import patterns  # noqa: F401  (the family modules register themselves)


def get_family(name: str) -> PatternFamily:
    """The family ``name`` (built-in or registered); ``ValueError`` naming the known patterns otherwise."""
    fam = _FAMILIES.get(name)
    if fam is None:
        _ensure_builtins()
        fam = _FAMILIES.get(name)
    if fam is None:
        raise ValueError(
            f"unknown pattern {name!r}; built-in patterns: {sorted(_BUILTIN)}, "
            f"registered: {sorted(registered_patterns())}"
        )
    return fam


def registered_patterns() -> dict[str, PatternFamily]:
    """The user-registered families by name (a copy)."""
    return {n: f for n, f in _FAMILIES.items() if not f.builtin}


def builtin_patterns() -> tuple[str, ...]:
    """Names of the built-in families, in registration order."""
    _ensure_builtins()
    return tuple(_BUILTIN)
