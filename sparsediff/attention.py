"""``sparse_attention``: per-head sparse attention for one attention layer call.

This is the function the diffusers integration calls. For every distinct :class:`HeadSpec` among the
layer's heads (heads with identical specs share all work) it builds or fetches that group's token
permutation and block mask, then gathers q/k/v into the per-head orders, runs
:func:`sparsediff.block_sparse_attention` **once** for all heads, and scatters the output back.

State lives in explicit objects, never in globals:

* :class:`MaskCache` -- bounded LRU of static masks/permutations keyed by
  ``(layout, spec, block size, device)``; one per enabled transformer.
* :class:`LayerState` -- one per (transformer, layer, and CFG branch if the pipeline runs branches in
  separate calls): the layout it was filled for, the last mask, and one public slot per cross-step family
  (:meth:`LayerState.family_state`: the lse_cache family's LSE and block indices, the skip family's
  outputs, the reordered family's k-means warm starts, a user family's own state).
"""

from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch

from .layout import TokenLayout
from .mask import BlockSparseMask
from .ops import block_sparse_attention
from .patterns.registry import REMAINDER_REFRESH_PARAM, GroupCall, get_family
from .patterns.remainder import merge_lse, pooled_remainder, split_remainder
from .permute import Permutation
from .specs import DenseSchedule, HeadSpec

logger = logging.getLogger(__name__)

__all__ = [
    "sparse_attention",
    "LayerState",
    "MaskCache",
    "DenseSchedule",
    "DEFAULT_BLOCK_SIZE",
    "group_heads",
    "plan_heads",
    "seeds_remainder",
]

#: Default block size (tokens per query/key block) on every device.
DEFAULT_BLOCK_SIZE = 64


class MaskCache:
    """Bounded LRU cache of static masks and permutations.

    Keys always include the :class:`TokenLayout` (hence the resolution and text length), the
    normalised :class:`HeadSpec`, the block size and the device -- a mask is never reused for another
    resolution. One cache per enabled transformer; never a global.
    """

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._d: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get_or_build(self, key: Hashable, build: Callable[[], Any]) -> Any:
        if key in self._d:
            self._d.move_to_end(key)
            self.hits += 1
            return self._d[key]
        self.misses += 1
        val = build()
        self._d[key] = val
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)
        return val

    def get(self, key: Hashable) -> Any:
        """The cached value or None (counts a hit/miss like :meth:`get_or_build`)."""
        if key in self._d:
            self._d.move_to_end(key)
            self.hits += 1
            return self._d[key]
        self.misses += 1
        return None

    def put(self, key: Hashable, value: Any) -> None:
        self._d[key] = value
        self._d.move_to_end(key)
        while len(self._d) > self.max_entries:
            self._d.popitem(last=False)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._d

    def clear(self) -> None:
        self._d.clear()

    def __repr__(self) -> str:
        return f"MaskCache(entries={len(self)}/{self.max_entries}, hits={self.hits}, misses={self.misses})"


class LayerState:
    """Mutable per-layer state across denoising steps (explicit; see module docstring).

    Attributes:
        key: ``(layout, B, H, device)`` the state was filled for; a call with another key resets it.
        last_step: the step of the last call (a call with an earlier step resets the state: a new generation).
        last_mask: the mask of the last call, each head in its own (permuted) order -- diagnostics
            (``last_mask.density_per_head()``); skip heads served from their stored output show density 0.
        family_states: ``{family: state}`` -- each cross-step family's own slot (:meth:`family_state`).

    Read-only views of the built-in families' slots (kept for compatibility): ``lse``, ``lse_valid``,
    ``indices``, ``last_recall`` (lse_cache), ``skip_out`` (skip), ``centroids`` (reordered k-means).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything (every family's slot included)."""
        self.key: tuple | None = None
        self.last_step: int | None = None
        self.last_mask: BlockSparseMask | None = None
        self.family_states: dict[str, Any] = {}

    def family_state(self, family: str, factory: Callable[[], Any] = dict) -> Any:
        """The state owned by the pattern family ``family`` -- ``factory()`` (a dict by default) made on first
        use -- kept across calls and steps until the state is reset (new layout, batch or generation)."""
        st = self.family_states.get(family)
        if st is None:
            st = self.family_states[family] = factory()
        return st

    def slot(self, family: str) -> dict[Hashable, Any]:
        """Deprecated name of :meth:`family_state` (a dict slot)."""
        return self.family_state(family)

    @property
    def slots(self) -> dict[str, Any]:
        """Deprecated name of :attr:`family_states`."""
        return self.family_states

    def bind(self, key: tuple, step: int | None) -> None:
        """Before a call with state key ``key`` (``(layout, B, H, device)``) at ``step``: another key (resolution,
        batch, heads, device) or an earlier step (a new pipeline call that did not reset) starts over."""
        if self.key != key or (step is not None and self.last_step is not None and step < self.last_step):
            self.reset()
            self.key = key
        self.last_step = step

    def _bind(self, layout: TokenLayout, q: torch.Tensor, step: int | None) -> None:
        self.bind((layout, q.shape[0], q.shape[1], q.device), step)

    # ------------------------------------------------------------------ compatibility views (read-only)
    def _view(self, family: str, attr: str | None, empty: Any) -> Any:
        st = self.family_states.get(family)
        if st is None:
            return empty
        return st if attr is None else getattr(st, attr)

    @property
    def lse(self) -> torch.Tensor | None:
        """``[B, H, N]`` LSE kept by the lse_cache family (its slot's ``lse``), or None."""
        return self._view("lse_cache", "lse", None)

    @property
    def lse_valid(self) -> torch.Tensor | None:
        return self._view("lse_cache", "lse_valid", None)

    @property
    def indices(self) -> dict:
        """``{(spec, heads): (mask, refresh_step)}`` of the lse_cache family."""
        return self._view("lse_cache", "indices", {})

    @property
    def last_recall(self) -> dict:
        return self._view("lse_cache", "last_recall", {})

    @property
    def skip_out(self) -> dict:
        """``{head: [B, N, D]}`` outputs stored by the skip family."""
        return self._view("skip", None, {})

    @property
    def centroids(self) -> dict:
        """``{(spec, heads): (cq, ck)}`` k-means warm starts of cluster-reordered heads."""
        return self._view("reordered", None, {})

    def __repr__(self) -> str:
        return (
            f"LayerState(layout={self.key[0] if self.key else None}, families={sorted(self.family_states)}, "
            f"step={self.last_step})"
        )


def group_heads(head_specs: Sequence[HeadSpec]) -> OrderedDict[HeadSpec, tuple[int, ...]]:
    """Group head indices by (normalised) spec, in order of first appearance.

    Memoised on the ``head_specs`` tuple (a layer's specs are the same on every call); the returned
    dict is a fresh copy the caller may modify.
    """
    return OrderedDict(_head_groups(tuple(head_specs)))


#: Deprecated name of :func:`group_heads` (kept for one release).
plan_heads = group_heads


def _head_groups(head_specs: tuple) -> tuple[tuple[HeadSpec, tuple[int, ...]], ...]:
    """:func:`group_heads` as an immutable tuple of ``(spec, heads)``, memoised (LRU) on ``head_specs``."""
    try:
        return _head_groups_cached(head_specs)
    except TypeError:  # an unhashable entry (so not a HeadSpec): the uncached path names it
        return _group_specs(head_specs)


def _group_specs(head_specs: tuple) -> tuple[tuple[HeadSpec, tuple[int, ...]], ...]:
    groups: OrderedDict[HeadSpec, list[int]] = OrderedDict()
    for h, s in enumerate(head_specs):
        if not isinstance(s, HeadSpec):
            raise TypeError(f"head_specs[{h}] must be a HeadSpec, got {type(s).__name__}")
        groups.setdefault(s.normalized(), []).append(h)
    return tuple((s, tuple(hs)) for s, hs in groups.items())


_head_groups_cached = functools.lru_cache(maxsize=1024)(_group_specs)


def _expand_heads(m: BlockSparseMask, hg: int) -> BlockSparseMask:
    if m.heads == hg:
        return m
    return BlockSparseMask(
        m.kv_indices.expand(m.batch, hg, -1, -1),
        m.kv_counts.expand(m.batch, hg, -1),
        m.block_size,
        m.seq_lens,
        validate=False,
    )


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    head_specs: Sequence[HeadSpec],
    state: LayerState | None = None,
    *,
    step: int | None = None,
    force_dense: bool = False,
    scale: float | None = None,
    block_size: int | None = None,
    cache: MaskCache | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Per-head sparse self-attention of one layer call.

    Args:
        q, k, v: ``[B, H, N, D]``, any strides (diffusers' ``[B, N, H, D]`` ``.transpose(1, 2)`` views are
            fine), ``N == layout.num_tokens``.
        layout: the :class:`TokenLayout` of the sequence.
        head_specs: one :class:`HeadSpec` per head (``len == H``).
        state: the layer's :class:`LayerState`. Required by ``lse_cache`` and ``skip`` heads and by the
            k-means warm start of ``reordered(order="cluster")``; without it ``lse_cache`` heads run
            dense and ``skip`` heads are computed densely (logged at debug level).
        step: denoising step index (0-based) for the lse_cache refresh schedule; ``None`` = refresh every call.
        force_dense: exact dense attention for all heads (warm-up steps/layers), while updating the caches
            that sparse heads need (LSE for lse_cache heads, outputs for skip heads).
        scale: softmax scale (default ``D ** -0.5``).
        block_size: tokens per block (default :data:`DEFAULT_BLOCK_SIZE` = 64).
        cache: :class:`MaskCache` for static masks/permutations; ``None`` = build every call.
        backend: passed to :func:`sparsediff.block_sparse_attention`.

    Returns:
        ``out`` with q's shape, dtype and memory layout.

    Semantics per pattern: see :mod:`sparsediff.specs`. Rows/cols of non-grid tokens (text) are dense in
    every sparse pattern. One op launch serves all heads; permuted heads are gathered into their order
    before and scattered back after.

    Heads with ``remainder="pooled"`` (``radial``, ``tile``, ``reordered``, ``topp`` and user families
    registered with ``remainder=True``): after the op, in each such head's own order, every key block its
    query block does not keep is added as one pooled key (mean key, logit ``+ log(tokens in the block)``,
    mean value) and merged with the op's output by log-sum-exp (:mod:`sparsediff.patterns.remainder`;
    plain torch, differentiable, any backend; ``[B, Hp, N, Kb]`` float32 scores for the ``Hp`` pooled heads).
    Other heads are untouched (bit-identical); ``after`` callbacks get the op's LSE of the kept blocks.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, H, N, D], got shape {tuple(q.shape)}")
    B, H, N, D = q.shape
    if N != layout.num_tokens:
        raise ValueError(f"q has N={N} tokens but {layout} has {layout.num_tokens}")
    if k.shape[2] != N:
        raise ValueError(f"sparse_attention is self-attention: k has {k.shape[2]} tokens, q has {N}")
    if len(head_specs) != H:
        raise ValueError(f"got {len(head_specs)} head specs for {H} heads")
    bs = int(block_size or DEFAULT_BLOCK_SIZE)
    if bs < 1:
        raise ValueError(f"block_size must be >= 1, got {bs}")
    scale = float(D**-0.5 if scale is None else scale)
    dev = q.device
    group_items = _head_groups(tuple(head_specs))
    groups = dict(group_items)
    if state is not None:
        state._bind(layout, q, step)

    call = GroupCall(q, k, v, layout, bs, scale, step, state, cache, backend)

    # ------------------------------------------------------------------ warm-up / forced dense
    if force_dense and state is not None and _seeds(group_items):
        return _dense_seeding_remainder(call, group_items)
    if force_dense or all(s.pattern == "dense" for s in groups):
        full = call.cached(("full", layout, bs, str(dev), H), lambda: call.full_mask(H))
        out, lse = block_sparse_attention(q, k, v, full, scale=scale, return_lse=True, backend=backend)
        if state is not None:
            state.last_mask = full
            for spec, heads in group_items:  # cross-step families fill their state from the exact pass
                fam = get_family(spec.pattern)
                if fam.on_dense is not None:
                    fam.on_dense(call, spec, heads, out, lse)
        return out

    mask, qi, ki, afters, writes = _assemble(call, group_items)

    # ------------------------------------------------------------------ permute, run once, un-permute
    qq = q if qi is None else qi.apply(q)
    kk = k if ki is None else ki.apply(k)
    vv = v if ki is None else ki.apply(v)
    out_p, lse_p = block_sparse_attention(qq, kk, vv, mask, scale=scale, return_lse=True, backend=backend)
    pooled = _pooled_heads(group_items)
    if pooled:
        out_p = _add_pooled_remainder(qq, kk, vv, out_p, lse_p, mask, pooled, bs, scale)
    cached = _cached_heads(group_items)
    if cached:
        out_p = _add_cached_remainder(call, qq, kk, vv, out_p, lse_p, cached)
    if qi is None and not writes:
        out = out_p
    elif qi is None:
        out = torch.empty_like(q)
        out.copy_(out_p)
    else:
        out = qi.apply(out_p, inverse=True)  # a fresh tensor, in out_p's (= q's) memory layout
        if out.stride() != q.stride():
            out = torch.empty_like(q).copy_(out)
    if state is not None:
        state.last_mask = mask
    for after in afters:
        after(out, lse_p)
    return out


def _assemble(call: GroupCall, group_items: tuple) -> tuple[BlockSparseMask, Any, Any, list, bool]:
    """One call's work for all heads: ``(mask, qi, ki, afters, writes)`` -- the assembled mask (each head
    in its own order), the query / key token orders (:class:`_TokenIndex` or None), the groups' ``after``
    callbacks and whether one of them writes the output. Static layers come from the mask cache."""
    q, layout, bs, cache = call.q, call.layout, call.block_size, call.cache
    H, N = q.shape[1], q.shape[2]
    dev = q.device
    static_key = None
    if cache is not None and all(s.is_static for s, _ in group_items):
        static_key = ("assembled", layout, group_items, bs, str(dev))
    prebuilt = cache.get(static_key) if static_key is not None else None
    afters: list = []
    writes = False
    if prebuilt is not None:
        mask, qi, ki = prebuilt
    else:
        group_masks: list[tuple[tuple[int, ...], BlockSparseMask]] = []
        perms_q: list[tuple[tuple[int, ...], Permutation]] = []
        perms_k: list[tuple[tuple[int, ...], Permutation]] = []
        for spec, heads in group_items:  # each group's work, from the spec's family
            # the remainder does not change the mask or the order: a group's work is its spec's without it
            base = spec.without_remainder() if spec.remainder != "none" else spec
            work = get_family(spec.pattern).group_work(call, base, heads)
            group_masks.append((heads, _expand_heads(work.mask, len(heads))))
            if work.perm_q is not None:
                perms_q.append((heads, work.perm_q))
                perms_k.append((heads, work.perm_q if work.perm_k is None else work.perm_k))
            if work.after is not None:
                afters.append(work.after)
                writes = writes or work.writes_output

        # -------------------------------------------------------------- assemble one mask for all heads
        order = [h for heads, _ in group_masks for h in heads]
        mask = BlockSparseMask.cat_heads([m for _, m in group_masks])
        if order != list(range(H)):
            inv = [0] * H
            for i, h in enumerate(order):
                inv[h] = i
            mask = mask[:, inv]

        qi = _TokenIndex.of(perms_q, H, N)
        same = len(perms_q) == len(perms_k) and all(
            a[0] == b[0] and a[1] is b[1] for a, b in zip(perms_q, perms_k)
        )
        ki = qi if same else _TokenIndex.of(perms_k, H, N)
        if static_key is not None:
            cache.put(static_key, (mask, qi, ki))
    return mask, qi, ki, afters, writes


@functools.lru_cache(maxsize=1024)
def _pooled_heads(group_items: tuple) -> tuple[int, ...]:
    """Sorted heads whose spec has ``remainder="pooled"`` (memoised on the layer's groups)."""
    return tuple(sorted(h for spec, heads in group_items if spec.remainder == "pooled" for h in heads))


#: The :meth:`LayerState.family_state` slot of the ``remainder="cached"`` heads:
#: ``{heads: (out_r, lse_r, step of the refresh)}`` in the op's (permuted) order.
CACHED_REMAINDER_SLOT = "remainder.cached"


@functools.lru_cache(maxsize=1024)
def _cached_heads(group_items: tuple) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """``((refresh, heads), ...)``: the ``remainder="cached"`` heads by their ``remainder_refresh``
    (memoised on the layer's groups). ``ValueError`` for a cached head whose mask is not static (the
    stored remainder is the complement of the mask it was split from)."""
    by_refresh: dict[int, list[int]] = {}
    for spec, heads in group_items:
        if spec.remainder != "cached":
            continue
        if not spec.is_static:
            raise ValueError(
                f'remainder="cached" needs a static mask (the stored remainder is what that mask leaves '
                f"out); {spec!r} is {spec.kind}"
            )
        by_refresh.setdefault(int(spec.get(REMAINDER_REFRESH_PARAM)), []).extend(heads)
    return tuple((r, tuple(sorted(h))) for r, h in sorted(by_refresh.items()))


def seeds_remainder(head_specs: Sequence[HeadSpec]) -> bool:
    """Whether a forced-dense (warm-up) call of a layer with these heads can seed its ``remainder="cached"``
    heads: it has such heads and every head's mask is static (built without side effects). The hooks
    send the *last* warm-up step's call of such a layer through :func:`sparse_attention` (instead of the
    model's own SDPA), so the first sparse step finds a remainder one step old instead of refreshing."""
    return _seeds(_head_groups(tuple(head_specs)))


def _seeds(group_items: tuple) -> bool:
    return bool(_cached_heads(group_items)) and all(s.is_static for s, _ in group_items)


@torch.compiler.disable
def _dense_seeding_remainder(call: GroupCall, group_items: tuple) -> torch.Tensor:
    """A forced-dense call that also stores the remainder of its ``remainder="cached"`` heads: the dense
    pass in the heads' own orders (its output is the exact one), the op on the cached heads' kept blocks,
    :func:`~sparsediff.patterns.remainder.split_remainder`. Static layers only (:func:`seeds_remainder`)."""
    q, k, v, state = call.q, call.k, call.v, call.state
    H = q.shape[1]
    mask, qi, ki, _, _ = _assemble(call, group_items)
    qq = q if qi is None else qi.apply(q)
    kk = k if ki is None else ki.apply(k)
    vv = v if ki is None else ki.apply(v)
    full = call.cached(("full", call.layout, call.block_size, str(q.device), H), lambda: call.full_mask(H))
    kw = dict(scale=call.scale, return_lse=True, backend=call.backend)
    out_f, lse_f = block_sparse_attention(qq, kk, vv, full, **kw)
    slot = state.family_state(CACHED_REMAINDER_SLOT, dict)
    for _, heads in _cached_heads(group_items):
        h = list(heads)
        o_s, l_s = block_sparse_attention(qq[:, h], kk[:, h], vv[:, h], mask[:, h], **kw)
        o_r, l_r = split_remainder(out_f[:, h], lse_f[:, h], o_s, l_s)
        slot[heads] = (o_r.detach(), l_r.detach(), call.step)
    state.last_mask = full
    if qi is None:
        return out_f
    out = qi.apply(out_f, inverse=True)
    return out if out.stride() == q.stride() else torch.empty_like(q).copy_(out)


@torch.compiler.disable
def _add_cached_remainder(
    call: GroupCall,
    qq: torch.Tensor,
    kk: torch.Tensor,
    vv: torch.Tensor,
    out_p: torch.Tensor,
    lse_p: torch.Tensor,
    groups: tuple[tuple[int, tuple[int, ...]], ...],
) -> torch.Tensor:
    """``out_p`` with the stored remainder of the ``remainder="cached"`` heads merged in, all in the op's
    (permuted) order (:mod:`sparsediff.patterns.remainder`). A group whose remainder is missing or
    ``refresh`` steps old (or a call without a step or a state) runs one dense pass, returns it (exact) and
    stores the part its mask leaves out (:func:`~sparsediff.patterns.remainder.split_remainder`)."""
    state, step = call.state, call.step
    slot = state.family_state(CACHED_REMAINDER_SLOT, dict) if state is not None else None
    out = out_p.clone()  # keeps out_p's memory layout
    for refresh, heads in groups:
        h = list(heads)
        entry = slot.get(heads) if slot is not None else None
        due = entry is None or step is None or entry[2] is None or step - entry[2] >= refresh
        o_s, l_s = out_p[:, h], lse_p[:, h]
        if due:
            full = call.full_mask(len(h))
            o_f, l_f = block_sparse_attention(
                qq[:, h], kk[:, h], vv[:, h], full, scale=call.scale, return_lse=True, backend=call.backend
            )
            if slot is not None:
                o_r, l_r = split_remainder(o_f, l_f, o_s, l_s)
                slot[heads] = (o_r.detach(), l_r.detach(), step)
            merged = o_f
        else:
            merged, _ = merge_lse(o_s, l_s, entry[0], entry[1])
        out[:, h] = merged.to(out.dtype)
    return out


def _add_pooled_remainder(
    qq: torch.Tensor,
    kk: torch.Tensor,
    vv: torch.Tensor,
    out_p: torch.Tensor,
    lse_p: torch.Tensor,
    mask: BlockSparseMask,
    heads: tuple[int, ...],
    bs: int,
    scale: float,
) -> torch.Tensor:
    """``out_p`` with the pooled remainder (:mod:`sparsediff.patterns.remainder`) merged into ``heads``, all in
    the op's (permuted) order; the other heads are copied bit for bit. Plain torch ops: differentiable
    through the op's ``out`` and ``lse``. ``lse_p`` is left as the op returned it."""
    if len(heads) == out_p.shape[1]:  # every head pooled: no head selection, no scatter
        out_r, lse_r = pooled_remainder(qq, kk, vv, mask.to_dense(), bs, scale)
        merged, _ = merge_lse(out_p, lse_p, out_r, lse_r)
        return torch.empty_like(out_p).copy_(merged)  # out_p's dtype and memory layout
    idx = torch.tensor(heads, device=qq.device)
    kept = mask[:, list(heads)].to_dense()  # [B|1, Hp, Qb, Kb]
    out_r, lse_r = pooled_remainder(
        qq.index_select(1, idx), kk.index_select(1, idx), vv.index_select(1, idx), kept, bs, scale
    )
    merged, _ = merge_lse(out_p.index_select(1, idx), lse_p.index_select(1, idx), out_r, lse_r)
    out = out_p.clone()  # keeps out_p's memory layout
    out[:, list(heads)] = merged.to(out_p.dtype)
    return out


class _TokenIndex:
    """The per-head token orders of one call (each group's :class:`Permutation` on its heads, identity
    on the others), applied to a ``[B, H, N, D]`` tensor as ONE row ``index_select`` over the tensor's
    memory order.

    Unpermuted heads cost a row copy, not a ``torch.gather`` with a ``[B, H, N, D]`` index (on CPU
    ``gather`` is ~10x slower than a memcpy). The flat row indices are built once per memory layout
    (heads outer ``[B, H, N, D]`` / heads inner ``[B, N, H, D]``, diffusers' layout) and batch, and kept
    here -- the all-static assembled entry of the :class:`MaskCache` holds this object, so a cached call
    builds no index. Indices are int32 when they fit.
    """

    __slots__ = ("groups", "heads", "tokens", "batch", "_flat")

    def __init__(self, groups, heads: int, tokens: int) -> None:
        self.groups = tuple(groups)  # ((heads, Permutation), ...)
        self.heads, self.tokens = heads, tokens
        #: batch of the per-batch orders (``[B, Hg, N]`` cluster orders), 1 when every order is shared
        self.batch = max((p.perm.shape[0] if p.perm.dim() == 3 else 1) for _, p in self.groups)
        self._flat: dict[tuple, torch.Tensor] = {}

    @classmethod
    def of(cls, perms, heads: int, tokens: int) -> _TokenIndex | None:
        return cls(perms, heads, tokens) if perms else None

    def per_head(self, inverse: bool = False) -> torch.Tensor:
        """int64 ``[Bi, H, N]``: source token of every (head, position) (``inverse``: the way back)."""
        bi, H, N = self.batch, self.heads, self.tokens
        dev = self.groups[0][1].perm.device
        idx = torch.arange(N, device=dev).expand(bi, H, N).clone()
        for heads, p in self.groups:
            t = p.inv if inverse else p.perm
            t = t if t.dim() == 3 else t.expand(bi, len(heads), N)
            idx[:, list(heads)] = t.expand(bi, -1, -1)
        return idx

    def _flat_index(self, inverse: bool, heads_inner: bool, batch: int) -> torch.Tensor:
        key = (inverse, heads_inner, batch if self.batch > 1 else 1)
        f = self._flat.get(key)
        if f is None:
            idx = self.per_head(inverse)  # [Bi, H, N]
            bi, H, N = idx.shape
            h = torch.arange(H, device=idx.device).view(1, H, 1)
            # row of (head h, token t): heads inner -> t * H + h ([B, N, H] order), else h * N + t
            f = (idx * H + h).transpose(1, 2) if heads_inner else idx + h * N
            if bi > 1:
                if bi != batch:
                    raise ValueError(f"per-batch token orders for batch {bi}, tensor has batch {batch}")
                f = f + torch.arange(bi, device=idx.device).view(bi, 1, 1) * (H * N)
            f = f.reshape(-1)
            if bi * H * N < 2**31:
                f = f.to(torch.int32)
            self._flat[key] = f
        return f

    def apply(self, x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """``x [B, H, N, D]`` natural order -> every head in its order (``inverse``: back). A new tensor
        in x's memory layout (heads inner or outer), whatever x's strides."""
        B, H, N, D = x.shape
        heads_inner = x.stride(1) < x.stride(2)
        f = self._flat_index(inverse, heads_inner, B)
        xm = x.transpose(1, 2) if heads_inner else x  # memory order [B, N, H, D] / [B, H, N, D]
        if self.batch > 1:
            y = xm.reshape(B * H * N, D).index_select(0, f)
        else:
            y = xm.reshape(B, H * N, D).index_select(1, f)
        y = y.view(xm.shape)
        return y.transpose(1, 2) if heads_inner else y
