"""The diffusers integration: attention backend, processor subclasses, root hook and step context.

How one self-attention call reaches sparsediff (diffusers 0.42)::

    transformer.forward  ── root hook (HookRegistry, "sparsediff_root", stateful) ──────────────────┐
      reads the token layout of this call (adapter), step / branch (diffusers' cache_context)       │
      block L ─ attention module ─ processor = Sparse<ModelProcessor> (subclass of the model's own)  │
          __call__: publishes its LayerContext, then runs the model's own __call__ unchanged          │
          (projections, norms, RoPE) ... dispatch_attention_fn(q, k, v, backend=self._attention_backend)
          ─ ``_attention_backend`` is a property answering "sparsediff" ─► _sparsediff_backend(q, k, v, ...)
              ─ LayerContext.attention: dense fallback (the backend the model would have used), or
                sparsediff.attention.sparse_attention(q, k, v, layout, head_specs, state, ...)   ◄──┘

* **Per-call layouts.** The root hook reads one layout per transformer call. Adapters with
  ``refit_text`` (Mochi: one attention call per sample with its own valid prompt length; SD3.5:
  image-only ``attn2``) see attention calls of other lengths: :meth:`TransformerState.fit_layout`
  re-fits the layout's text to the call's length at run time (also inside the compiled op), before
  any dense fallback.
* **Dense fallback is the model's own call.** Dense heads-only layers, warm-up steps, calls the sparse
  path cannot serve (attention mask, cross-attention through the same processor, layout mismatch)
  call the backend the processor would have used -- its own ``_attention_backend`` (a later
  ``set_attention_backend`` lands there, through the property's setter) or the global active backend
  (never sparsediff itself: that would recurse) -- with the same arguments, so they are bit-identical.
* **Compile.** Nothing per layer is a Python constant the compiler specialises on: the layer is
  identified by a small int64 tensor, and under ``torch.compile`` the whole layer attention is one opaque
  ``torch.library`` op (``sparsediff_hooks::layer_attention``), so ``compile_repeated_blocks`` traces
  one graph for all blocks. Mask building etc. runs eagerly inside the op.
* **Steps.** From diffusers' ``cache_context`` (the root hook holds a ``StateManager`` probe that
  receives it), else from the timestep of each call -- see :class:`TransformerState`. Nothing is
  patched onto the scheduler. Per-layer caches are keyed by the branch (the context's name).
* **Threads.** The only per-call state that crosses diffusers' dispatch (the running layer) is
  thread-local; everything else lives on the per-transformer state.
* **Context parallel (Ulysses).** With a parallel config the backend runs diffusers' templated
  Ulysses attention with a sparsediff forward op: after the all-to-all each rank holds the full
  sequence for heads ``rank*H_local ...``; the plan is sliced by that global head index.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import StateManager
from diffusers.models import attention_dispatch as _ad

from .config import SparseAttentionConfig
from .layout import TokenLayout
from .plan import Plan
from .specs import HeadSpec

logger = logging.getLogger(__name__)

__all__ = [
    "BACKEND_NAME",
    "ROOT_HOOK_NAME",
    "ensure_backend_registered",
    "TransformerState",
    "LayerContext",
    "AttentionCall",
    "apply_sparse_attention",
    "remove_sparse_attention",
    "get_state",
]

BACKEND_NAME = "sparsediff"
ROOT_HOOK_NAME = "sparsediff_root"
_STATE_ATTR = "_sparsediff_state"
#: patterns whose state must be updated during dense (warm-up) passes: run them through sparse_attention
_STATEFUL_PATTERNS = frozenset({"skip", "lse_cache"})


# The layer whose processor is running *in this thread* (``_TLS.layer``, set for the duration of the
# processor's ``__call__``): the one piece of per-call state that has to cross diffusers'
# ``dispatch_attention_fn`` into the backend. Thread-local, so two pipelines generating in two threads
# never see each other's layer (a ``contextvars.ContextVar`` would do too, but Dynamo cannot trace
# ``ContextVar.set``; a ``threading.local`` attribute it traces like any object attribute).
class _ThreadLocal(threading.local):
    def __init__(self) -> None:  # runs once in every thread: compiled code always finds the attribute
        self.layer: LayerContext | None = None


_TLS = _ThreadLocal()
#: attention module -> its LayerContext while enabled (processors rebuilt with ``proc.__class__()``
#: find their layer through the ``attn`` module they are called with)
_MODULE_LAYERS: weakref.WeakKeyDictionary[torch.nn.Module, LayerContext] = weakref.WeakKeyDictionary()
_LAYERS: dict[int, weakref.ReferenceType[LayerContext]] = {}
_NEXT_ID = [0]
_LOCK = threading.Lock()
_BACKEND_MEMBER: Any = None


# ---------------------------------------------------------------------- backend registration
def _add_enum_member(enum_cls: type, name: str, value: str) -> Any:
    """Add ``name = value`` to a ``str`` Enum (diffusers' AttentionBackendName) in place."""
    if value in enum_cls._value2member_map_:
        return enum_cls._value2member_map_[value]
    member = str.__new__(enum_cls, value)
    member._name_ = name
    member._value_ = value
    member.__objclass__ = enum_cls
    if hasattr(member, "_sort_order_"):
        member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def ensure_backend_registered() -> Any:
    """Register the ``"sparsediff"`` attention backend with diffusers (idempotent); returns its enum member."""
    global _BACKEND_MEMBER
    with _LOCK:
        if _BACKEND_MEMBER is None:
            member = _add_enum_member(_ad.AttentionBackendName, "SPARSEDIFF", BACKEND_NAME)
            _ad._AttentionBackendRegistry.register(member, constraints=[], supports_context_parallel=True)(
                _sparsediff_backend
            )
            _BACKEND_MEMBER = member
    return _BACKEND_MEMBER


def _fallback_backend(name: Any) -> tuple[Any, Any]:
    """(enum member, function) of the dense backend ``name`` (None: the global active one; never us)."""
    reg = _ad._AttentionBackendRegistry
    if name is None:
        name = reg._active_backend
    member = name if isinstance(name, _ad.AttentionBackendName) else _ad.AttentionBackendName(name)
    if member.value == BACKEND_NAME:
        member = _ad.AttentionBackendName.NATIVE
    return member, reg._backends[member]


def _call_backend(name: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """Call a registered dense backend exactly like ``dispatch_attention_fn`` would."""
    member, fn = _fallback_backend(name)
    allowed = _ad._AttentionBackendRegistry._supported_arg_names[member]
    return fn(**{k: v for k, v in kwargs.items() if k in allowed})


def _sparsediff_backend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    _parallel_config: Any = None,
) -> torch.Tensor:
    """The function diffusers dispatches to. q/k/v ``[B, N, H, D]``; returns ``[B, N, H, D]``."""
    ctx = _TLS.layer
    kwargs = _dispatch_kwargs(
        query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, _parallel_config
    )
    if ctx is None:  # not one of our processors (e.g. the global backend was set to "sparsediff")
        return _call_backend(None, kwargs)
    if torch.compiler.is_compiling() and _parallel_config is None:
        return torch.ops.sparsediff_hooks.layer_attention(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, ctx.key
        )
    return ctx.attention(kwargs)


def _dispatch_kwargs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, parallel_config):
    """The keyword arguments of diffusers' attention backend functions, as one dict."""
    return {
        "query": query,
        "key": key,
        "value": value,
        "attn_mask": attn_mask,
        "dropout_p": dropout_p,
        "is_causal": is_causal,
        "scale": scale,
        "enable_gqa": enable_gqa,
        "_parallel_config": parallel_config,
    }


@torch.library.custom_op("sparsediff_hooks::layer_attention", mutates_args=())
def _layer_attention_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    layer_key: torch.Tensor,
) -> torch.Tensor:
    ref = _LAYERS.get(int(layer_key.reshape(-1)[0]))
    ctx = ref() if ref is not None else None
    kwargs = _dispatch_kwargs(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, None)
    out = _call_backend(None, kwargs) if ctx is None else ctx.attention(kwargs)
    res = torch.empty_like(query)  # the fake's strides; never alias an input
    res.copy_(out)
    return res


@_layer_attention_op.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, layer_key):
    return torch.empty_like(query)


# ---------------------------------------------------------------------- step / branch context
class _ContextProbe(StateManager):
    """Receives diffusers' cache context for the root hook.

    Pipelines open ``transformer.cache_context(name, ...)`` around each transformer call; diffusers
    forwards it to every :class:`~diffusers.hooks.hooks.StateManager` attribute of a stateful hook:
    a :class:`~diffusers.hooks.hooks.CacheContext` (``name``, ``step_index``, ``num_inference_steps``,
    ... -- diffusers >= 0.42; most pipelines fill only ``name``) or, in older diffusers, the name
    string; ``None`` when the context closes. This probe hands it to :class:`TransformerState`; it
    keeps no states of its own.
    """

    def __init__(self, state: TransformerState) -> None:  # no StateManager.__init__: no state class
        self._state_ref = weakref.ref(state)
        self._state_cache: dict = {}
        self._context = None

    def set_context(self, context: Any) -> None:
        self._context = context
        st = self._state_ref()
        if st is not None:
            st.cache_context = context

    def reset(self, *args, **kwargs) -> None:
        self._context = None


def _context_fields(ctx: Any) -> tuple[str | None, int | None, int | None]:
    """(name, step index, number of steps) of a cache context (a CacheContext, a name or None)."""
    if ctx is None:
        return None, None, None
    if isinstance(ctx, str):
        return ctx, None, None
    return (
        getattr(ctx, "name", None),
        getattr(ctx, "step_index", None),
        getattr(ctx, "num_inference_steps", None),
    )


# ---------------------------------------------------------------------- per-layer context
@dataclass(frozen=True)
class AttentionCall:
    """What :attr:`SparseAttentionConfig.observer` receives for one self-attention call of one layer.

    Attributes:
        layer: self-attention layer index (adapter order, as in the plan).
        query, key, value: ``[B, H, N, D]`` views of the call's tensors (do not modify them).
        layout: the call's token layout (``N == layout.num_tokens``).
        head_offset: global index of head 0 (context parallelism: this rank's slice; else 0).
        step, num_steps: denoising step index / number of steps (None when unknown).
        branch: transformer call within the step (CFG as separate calls: 0 = first branch).
        call_index: attention call of this layer within the transformer call (Mochi per-sample calls).
        scale: softmax scale (None: ``D ** -0.5``).
    """

    layer: int
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    layout: TokenLayout
    head_offset: int
    step: int | None
    num_steps: int | None
    branch: int
    call_index: int
    scale: float | None


class LayerContext:
    """One self-attention layer while sparse attention is enabled (owned by its processor)."""

    def __init__(self, root: TransformerState, index: int, name: str, num_heads: int) -> None:
        self.root = root
        self.index = index
        self.name = name
        self.num_heads = num_heads
        with _LOCK:
            self.id = _NEXT_ID[0]
            _NEXT_ID[0] += 1
            _LAYERS[self.id] = weakref.ref(self)
        #: identifies the layer inside compiled graphs without specialising on it
        self.key = torch.tensor([self.id], dtype=torch.int64)
        self.fallback: Any = None  # the processor's own backend (None: the global active backend)
        #: LayerState per (CFG branch = transformer call within a step, attention call of this layer
        #: within that transformer call). Mochi attends per sample and key-padding masks split a batch,
        #: so one layer can run several calls per forward; each keeps its own caches across steps.
        self.states: dict[tuple[int, int], Any] = {}
        self._serial = -1  # root.call_serial of the transformer call the counter below belongs to
        self._ncalls = 0
        self._specs: dict[tuple[int, int], tuple[HeadSpec, ...]] = {}

    def close(self) -> None:
        with _LOCK:
            _LAYERS.pop(self.id, None)

    def specs(self, num_heads: int, head_offset: int = 0) -> tuple[HeadSpec, ...]:
        k = (num_heads, head_offset)
        s = self._specs.get(k)
        if s is None:
            s = self._specs[k] = self.root.plan.head_specs(self.index, num_heads, head_offset)
        return s

    def state(self, key: tuple[int, int]) -> Any:
        st = self.states.get(key)
        if st is None:
            from .attention import LayerState

            st = self.states[key] = LayerState()
        return st

    def _next_call_index(self) -> int:
        """Index of this attention call within the current transformer call (0, 1, ...)."""
        serial = self.root.call_serial
        if self._serial != serial:
            self._serial, self._ncalls = serial, 0
        self._ncalls += 1
        return self._ncalls - 1

    def dense(self, kwargs: dict[str, Any]) -> torch.Tensor:
        return _call_backend(self.fallback, kwargs)

    # ------------------------------------------------------------------ the attention product
    def attention(self, kwargs: dict[str, Any]) -> torch.Tensor:
        root = self.root
        q, k = kwargs["query"], kwargs["key"]
        pc = kwargs.get("_parallel_config")
        if not root.active:
            return self.dense(kwargs)
        if q.shape[1] != k.shape[1]:  # cross-attention through the same processor: not ours
            return self.dense(kwargs)
        layout = root.layout
        if layout is None:
            if not root.has_sparse_heads():
                return self.dense(kwargs)
            return self._fallback(
                kwargs,
                "the token layout of this call is unknown",
                "a whole-model torch.compile / torch.export cannot read it (compile the blocks with "
                "transformer.compile_repeated_blocks() instead), or the adapter failed (see above)",
            )
        if pc is not None:
            return self._context_parallel(kwargs, pc)
        fitted = root.fit_layout(q.shape[1])
        if fitted is None:
            return self._fallback(
                kwargs,
                f"sequence length {q.shape[1]} != layout {layout} (adapter {root.adapter.name})",
                "the adapter's layout does not describe this model variant; register a fitting Adapter",
            )
        return self._run(kwargs, fitted, head_offset=0)

    def _fallback(self, kwargs: dict[str, Any], reason: str, hint: str = "") -> torch.Tensor:
        self.root.note_fallback(reason, self, hint)
        return self.dense(kwargs)

    def _run(self, kwargs: dict[str, Any], layout: TokenLayout, head_offset: int) -> torch.Tensor:
        root = self.root
        call_index = self._next_call_index()
        q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
        observer = root.config.observer
        if observer is not None:
            step, num_steps = root.step_info()
            observer(
                AttentionCall(
                    self.index,
                    q.transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    layout,
                    head_offset,
                    step,
                    num_steps,
                    root.branch,
                    call_index,
                    kwargs.get("scale"),
                )
            )
        heads = q.shape[2]
        specs = self.specs(heads, head_offset)
        if all(s.pattern == "dense" for s in specs):
            root.note_dense("dense plan")
            return self.dense(kwargs)
        gen = root._gen
        if layout.num_tokens > gen.max_tokens:
            gen.max_tokens = layout.num_tokens
        if layout.num_tokens < root.plan.min_tokens:
            root.note_dense("below min_tokens")
            return self.dense(kwargs)
        step, num_steps = root.step_info()
        stateful = any(s.pattern in _STATEFUL_PATTERNS for s in specs)
        force_dense = self._force_dense(step, num_steps)
        if force_dense and not stateful:
            root.note_dense("warm-up (dense_steps / dense_layers)")
            return self.dense(kwargs)
        if stateful and step is not None and step in root.plan.refresh_steps:
            force_dense = True  # refresh step: exact pass that refreshes LSE / skip caches
        if kwargs.get("dropout_p") or kwargs.get("is_causal") or kwargs.get("enable_gqa"):
            return self._fallback(
                kwargs,
                "dropout / causal / GQA attention",
                "sparse attention serves plain self-attention only",
            )
        mask = kwargs.get("attn_mask")
        if mask is not None:
            mask = root.nontrivial_mask(mask)
            if mask is not None:
                return self._masked_run(kwargs, layout, head_offset, mask)
        from .attention import sparse_attention

        cfg = root.config
        state = self.state((root.branch_key, call_index))
        try:
            out = sparse_attention(
                q.transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                layout,
                specs,
                state,
                step=step,
                force_dense=force_dense,
                scale=kwargs.get("scale"),
                block_size=cfg.block_size,
                cache=root.mask_cache(),
                backend=cfg.backend,
            )
        except (TypeError, ValueError, NotImplementedError) as e:
            if cfg.strict:
                raise
            return self._fallback(kwargs, f"sparse attention rejected the call: {e}")
        if force_dense:
            root.note_dense("warm-up (dense_steps / dense_layers)")
        else:
            root.record_density(self.index, state)
        return out.transpose(1, 2)

    def _force_dense(self, step: int | None, num_steps: int | None) -> bool:
        sched = self.root.plan.schedule
        if self.index in sched.dense_layers:
            return True
        if step is None:
            return False
        if isinstance(sched.dense_steps, float) and num_steps is None:
            self.root.note_fallback(
                "a fractional dense_steps needs the number of steps; the warm-up is skipped",
                hint="pass num_steps= to enable_sparse_attention (a bare transformer), or an int dense_steps",
            )
            return False
        return sched.is_dense(step, num_steps, self.index)

    def _masked_run(self, kwargs: dict[str, Any], layout: TokenLayout, head_offset: int, mask: torch.Tensor):
        """Key-padding masks (HunyuanVideo / QwenImage padded text): drop the masked text tokens, run the
        sparse path on the kept tokens (layout with shortened text segments), and give the masked query
        rows exact dense attention over the kept keys -- what masked dense attention computes."""
        q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
        B, N = q.shape[0], q.shape[1]
        keep = _key_padding(mask, B, N)
        if keep is None:
            return self._fallback(
                kwargs,
                "an attention mask that is not a key-padding mask",
                "sparse attention honours key-padding masks only (e.g. padded text); nothing to change",
            )
        text = layout.text_mask(q.device)
        if bool((~keep & ~text.unsqueeze(0)).any()):
            return self._fallback(
                kwargs,
                "an attention mask that hides non-text tokens",
                "sparse attention honours masks on text tokens only; nothing to change",
            )
        rows, inverse = torch.unique(keep, dim=0, return_inverse=True)
        out = torch.empty_like(q)
        offs, segs = layout.offsets, layout.segments
        for r in range(rows.shape[0]):
            samples = (inverse == r).nonzero().flatten()
            kept = rows[r].nonzero().flatten()
            dropped = (~rows[r]).nonzero().flatten()
            counts = [
                int(rows[r][o : o + s.length].sum()) if s.kind == "text" else s.length
                for o, s in zip(offs, segs)
            ]
            sub_layout = TokenLayout(
                tuple(s if s.kind != "text" else type(s).text(c) for s, c in zip(segs, counts) if c > 0)
            )
            qs, ks, vs = (x.index_select(0, samples) for x in (q, k, v))
            ks, vs = ks.index_select(1, kept), vs.index_select(1, kept)
            sub = {**kwargs, "query": qs.index_select(1, kept), "key": ks, "value": vs, "attn_mask": None}
            o = self._run(sub, sub_layout, head_offset)
            res = torch.empty_like(qs)
            res[:, kept] = o.to(res.dtype)
            if dropped.numel():
                pad = {
                    **kwargs,
                    "query": qs.index_select(1, dropped),
                    "key": ks,
                    "value": vs,
                    "attn_mask": None,
                }
                res[:, dropped] = self.dense(pad).to(res.dtype)
            out[samples] = res
        return out

    # ------------------------------------------------------------------ context parallelism
    def _context_parallel(self, kwargs: dict[str, Any], pc: Any) -> torch.Tensor:
        cp = pc.context_parallel_config
        if getattr(cp, "ring_degree", 1) > 1:
            return self._fallback(
                kwargs,
                "ring attention context parallelism",
                "use Ulysses (ContextParallelConfig(ulysses_degree=...)) for sparse attention",
            )
        layer = self

        def forward_op(
            ctx,
            query,
            key,
            value,
            attn_mask=None,
            dropout_p=0.0,
            is_causal=False,
            scale=None,
            enable_gqa=False,
            return_lse=False,
            _save_ctx=True,
            _parallel_config=None,
        ):
            if return_lse:
                raise ValueError("sparsediff context-parallel attention does not return the LSE")
            world, rank = cp.ulysses_degree, cp._ulysses_local_rank
            query, key, value = (_wait(x) for x in (query, key, value))
            h_local = query.shape[2]
            full = {
                "query": query,
                "key": key,
                "value": value,
                "attn_mask": attn_mask,
                "dropout_p": dropout_p,
                "is_causal": is_causal,
                "scale": scale,
                "enable_gqa": enable_gqa,
                "_parallel_config": None,
            }
            layout = layer.root.fit_layout(query.shape[1])
            perm = None if layout is None else layer.root.cp_permutation(world, layout, query.device)
            if perm is None:
                return layer._fallback(
                    full,
                    f"the gathered context-parallel sequence ({query.shape[1]} tokens) does not match the layout "
                    f"{layer.root.layout} -- enable context parallelism *before* sparse attention, so that the sparsediff "
                    "root hook sees the unsplit inputs",
                )
            if perm is not False:
                inv = torch.argsort(perm)
                for n in ("query", "key", "value"):
                    full[n] = full[n].index_select(1, perm)
                out = layer._run(full, layout, head_offset=rank * h_local)
                return out.index_select(1, inv)
            return layer._run(full, layout, head_offset=rank * h_local)

        def backward_op(*args, **kwargs):
            raise NotImplementedError("sparsediff attention is inference-only (no backward)")

        return _ad._templated_context_parallel_attention(
            kwargs["query"],
            kwargs["key"],
            kwargs["value"],
            kwargs.get("attn_mask"),
            kwargs.get("dropout_p", 0.0),
            kwargs.get("is_causal", False),
            kwargs.get("scale"),
            kwargs.get("enable_gqa", False),
            False,
            forward_op=forward_op,
            backward_op=backward_op,
            _parallel_config=pc,
        )


def _wait(x: torch.Tensor) -> torch.Tensor:
    """Materialise the result of an async functional collective (diffusers' all-to-all) before use."""
    wait = getattr(x, "wait", None)
    return wait() if callable(wait) else x


def _key_padding(mask: torch.Tensor, batch: int, n: int) -> torch.Tensor | None:
    """Bool ``[B, N]`` of attended keys when ``mask`` only masks keys (same for every query row), else None."""
    if mask.dim() == 2 and mask.shape == (batch, n):
        m = mask
    elif mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1 and mask.shape[3] == n:
        m = mask[:, 0, 0]
    else:
        return None
    if m.dtype == torch.bool:
        keep = m
    else:
        keep = m == 0
        if not bool(((m == 0) | (m <= -1e4)).all()):  # soft biases are not padding
            return None
    if keep.shape[0] != batch:
        keep = keep.expand(batch, n)
    return keep


def _drop_trivial_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """None when the mask masks nothing (bool all True, or additive all zero), else the mask."""
    if mask.dtype == torch.bool:
        return None if bool(mask.all()) else mask
    return None if bool((mask == 0).all()) else mask


# ---------------------------------------------------------------------- processor subclasses
_SUBCLASSES: dict[type, type] = {}


def _sparse_processor_class(base: type) -> type:
    """``Sparse<base>``: same ``__call__`` signature, publishes its layer, reports the sparsediff backend.

    An instance made by sparsediff carries its layer (``_sd_ctx``). One made by other code with
    ``proc.__class__()`` -- diffusers rebuilds processors that way when it loads IP-adapters -- has
    ``_sd_ctx = None`` and finds its layer through the attention module it is called with; on a module
    sparsediff does not manage it behaves exactly like ``base`` (its own ``_attention_backend``).
    """
    with _LOCK:
        sub = _SUBCLASSES.get(base)
        if sub is not None:
            return sub
        orig_call = base.__call__

        @functools.wraps(orig_call)
        def __call__(self, *args, **kwargs):
            ctx = self._sd_ctx
            if ctx is None:
                attn = args[0] if args else kwargs.get("attn")
                ctx = _MODULE_LAYERS.get(attn) if isinstance(attn, torch.nn.Module) else None
            prev = _TLS.layer
            _TLS.layer = ctx
            try:
                return orig_call(self, *args, **kwargs)
            finally:
                _TLS.layer = prev

        __call__.__signature__ = inspect.signature(orig_call)

        def _get_backend(self):
            if self._sd_ctx is not None or _TLS.layer is not None:
                return _BACKEND_MEMBER
            return self.__dict__.get("_sd_backend")

        def _set_backend(self, value):
            # set_attention_backend / reset_attention_backend land here: the new dense fallback
            if self._sd_ctx is not None:
                self._sd_ctx.fallback = value
            else:
                self.__dict__["_sd_backend"] = value

        sub = type(
            f"Sparse{base.__name__}",
            (base,),
            {
                "__call__": __call__,
                "_attention_backend": property(_get_backend, _set_backend),
                "_sd_ctx": None,
                "__module__": __name__,
                "_sparsediff_base": base,
            },
        )
        _SUBCLASSES[base] = sub
        return sub


def _is_sparse_processor(proc: Any) -> bool:
    return hasattr(type(proc), "_sparsediff_base")


# ---------------------------------------------------------------------- the transformer-level state
class TransformerState:
    """Everything sparse attention keeps for one enabled transformer (also the root hook's state).

    **Step, branch and generation** of each transformer call (:meth:`begin_call`), from diffusers' own
    ``cache_context`` first, never from the scheduler (nothing is patched onto it):

    1. the context carries ``step_index`` (diffusers >= 0.42, e.g. ``WanPipeline``): that is the step,
       ``num_inference_steps`` the number of steps; a step index lower than the last one starts a new
       generation;
    2. otherwise (most pipelines name the context only: ``"cond"``/``"uncond"``/``"cond_uncond"``; a bare
       transformer in a custom loop has none) the **timestep rule**: the call's timestep tensor (per
       sample, per frame or per token) is compared with the previous call's -- any element higher
       starts a new generation (every sampler starts at its highest noise level), any change starts
       the next step, equal means another branch (CFG as separate calls) of the same step; a context
       name seen twice within one step also starts the next step (schedulers that repeat a timestep);
    3. the number of steps comes from the context, else the pipeline's ``num_timesteps`` (when enabled
       on a pipeline), else :attr:`SparseAttentionConfig.num_steps`.

    The branch is the context's name when there is one (else the call's index within its step); the
    per-layer caches (:class:`~sparsediff.attention.LayerState`) are keyed by it. A generation ends at
    the end of a pipeline call (diffusers resets stateful hooks), when a new one is detected, or on
    disable: per-layer state is cleared and the generation's summary is logged.
    """

    def __init__(self, transformer: torch.nn.Module, adapter: Any, plan: Plan, config: SparseAttentionConfig):
        self.transformer_ref = weakref.ref(transformer)
        self.transformer_class = type(transformer).__name__
        self.adapter = adapter
        self.plan = plan
        self.config = config
        self.layers: list[LayerContext] = []
        self.processors: list[tuple[torch.nn.Module, Any, Any]] = []  # (module, original, ours)
        self.pipeline_ref: Any = None  # weakref to the pipeline when enabled on one (num_timesteps)
        self.active = True
        #: diffusers' cache context of the running transformer call (set by :class:`_ContextProbe`)
        self.cache_context: Any = None
        self.layout: TokenLayout | None = None
        self.step: int | None = None  # step index of the current call (None: no call yet this generation)
        self.num_steps: int | None = None
        self.branch = 0  # index of the current call within its step
        self.branch_key: str | int = 0  # context name, else ``branch``: keys per-layer state
        self.call_serial = 0  # transformer calls so far (keys the per-layer call counters)
        self._names: set[str] = set()  # context names seen in the current step
        self._last_t: torch.Tensor | None = None
        self._mask_cache = None
        self._lock = threading.Lock()
        self._warned: set[tuple[int | None, str]] = set()
        self._layout_warned: set[TokenLayout] = set()
        self._mask_memo: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._density: dict[int, float] = {}  # first sparse call per layer of this enable
        self._has_sparse: bool | None = None
        self.generations = 0
        self._gen = _GenerationStats()
        self._last_gen: _GenerationStats | None = None

    # ------------------------------------------------------------------ per call
    @torch.compiler.disable
    def begin_call(self, inputs: Mapping[str, Any]) -> None:
        """Read the layout, step and branch of one transformer call (eager: under a whole-model
        ``torch.compile`` this is one graph break at the top of the forward)."""
        self._mask_memo = None
        self.call_serial += 1
        self._advance(inputs)
        try:
            self.layout = self.adapter.layout(self.transformer_ref(), inputs)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
            self.layout = None
            self.note_fallback(
                f"adapter {self.adapter.name!r} could not read the token layout of the call: {e}",
                hint="the call's inputs are not what the adapter expects; report it with the pipeline used",
            )
        if self.layout is not None and self.layout not in self._layout_warned:
            self._layout_warned.add(self.layout)
            msg = self.plan.check_layout(self.layout)
            if msg:
                logger.warning("sparsediff: %s", msg)
        self._gen.calls += 1

    def _advance(self, inputs: Mapping[str, Any]) -> None:
        """Step / branch / generation of this call (see the class docstring)."""
        name, index, n_ctx = _context_fields(self.cache_context)
        if index is not None:
            if self.step is not None and index < self.step:
                self.end_generation()
            if index != self.step:
                self._new_step(int(index))
            else:
                self.branch += 1
        else:
            new_gen, changed = self._timestep_change(inputs, in_context=name is not None)
            if new_gen and self.step is not None:
                self.end_generation()
            if self.step is None:
                self._new_step(0)
            elif changed or (name is not None and name in self._names):
                self._new_step(self.step + 1)
            else:
                self.branch += 1
        if name is not None:
            self._names.add(name)
        self.branch_key = name if name is not None else self.branch
        if n_ctx is not None:
            self.num_steps = int(n_ctx)
        elif self.branch == 0 and self.step == 0:
            pipe = self.pipeline_ref() if self.pipeline_ref is not None else None
            n = getattr(pipe, "_num_timesteps", None)
            self.num_steps = int(n) if isinstance(n, int) and n > 0 else self.config.num_steps

    def _new_step(self, step: int) -> None:
        self.step, self.branch = step, 0
        self._names = set()

    def _timestep_change(self, inputs: Mapping[str, Any], in_context: bool) -> tuple[bool, bool]:
        """(new generation, new step) from the call's timestep vs the previous call's (one host sync)."""
        t = self.adapter.timestep(inputs)
        if t is None:  # no timestep: every call is a step, unless context names say otherwise
            return False, not in_context
        t = t.detach() if isinstance(t, torch.Tensor) else torch.tensor(float(t))
        last, self._last_t = self._last_t, t.clone()
        if last is None:
            return True, True
        if t.shape == last.shape and t.device == last.device:
            up, changed = torch.stack([(t > last).any(), (t != last).any()]).tolist()
            return bool(up), bool(changed)
        # another shape: a new batch or resolution; a pipeline window sliding (diffusion forcing) is
        # not a new generation -- the pipeline ends its own generation
        up = (not in_context) and bool(t.float().max() > last.float().max())
        return up, True

    def nontrivial_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """:func:`_drop_trivial_mask`, memoised for the mask object every layer of one call shares
        (one device sync per transformer call instead of one per layer)."""
        memo = self._mask_memo
        if memo is not None and memo[0] is mask:
            return memo[1]
        res = _drop_trivial_mask(mask)
        self._mask_memo = (mask, res)
        return res

    def step_info(self) -> tuple[int | None, int | None]:
        """(step index, number of steps) of the current call -- either may be None when unknown."""
        return self.step, self.num_steps

    def end_generation(self) -> None:
        """End of a generation: log its summary, clear per-layer state (dynamic patterns' caches) and
        the step context."""
        self.flush_generation_log()
        for layer in self.layers:
            for st in layer.states.values():
                st.reset()
            layer.states.clear()
        self.layout = None
        self._mask_memo = None
        self.step = None
        self.num_steps = None
        self.branch = 0
        self.branch_key = 0
        self._names = set()  # the last timestep is kept: the next call compares with it

    reset = end_generation

    def mask_cache(self):
        if self._mask_cache is None:
            from .attention import MaskCache

            self._mask_cache = MaskCache(max_entries=self.config.mask_cache_size)
        return self._mask_cache

    def fit_layout(self, num_tokens: int) -> TokenLayout | None:
        """The layout of one attention call of ``num_tokens`` tokens within the current transformer call.

        The call's layout when the length matches; for adapters with ``refit_text`` (Mochi's per-sample
        prompts, SD3.5's image-only ``attn2``) the layout with its text re-fitted to the length
        (:meth:`TokenLayout.refit_text`); otherwise None (the caller falls back to dense). Runs at run
        time -- eagerly, or inside the opaque ``layer_attention`` op under ``torch.compile`` -- from the
        call's static shapes, so compiled graphs never bake a per-call layout in.
        """
        layout = self.layout
        if layout is None:
            return None
        if num_tokens == layout.num_tokens:
            return layout
        if not getattr(self.adapter, "refit_text", False):
            return None
        return layout.refit_text(int(num_tokens))

    def cp_permutation(self, world: int, layout: TokenLayout, device: torch.device):
        """Index ``perm`` with ``gathered[perm] == canonical`` order for a Ulysses-gathered sequence
        of ``layout`` (the call's layout, :meth:`fit_layout` of the gathered length).

        False when the gathered sequence is already in layout order, None when it does not fit.
        Adapters with ``cp_split == "segments"`` (Flux: text and image split separately across ranks)
        gather ``[text_0, image_0, text_1, image_1, ...]``.
        """
        n = layout.num_tokens
        if getattr(self.adapter, "cp_split", "sequence") != "segments" or len(layout.segments) == 1:
            return False
        lens = [s.length for s in layout.segments]
        if any(x % world for x in lens):
            return None
        offs = layout.offsets
        # position in the gathered sequence of every canonical token
        gathered_of = torch.empty(n, dtype=torch.int64)
        pos = 0
        for r in range(world):
            for off, ln in zip(offs, lens):
                c = ln // world
                gathered_of[off + r * c : off + (r + 1) * c] = torch.arange(pos, pos + c)
                pos += c
        return gathered_of.to(device)

    # ------------------------------------------------------------------ logging and report
    def note_fallback(self, reason: str, layer: LayerContext | None = None, hint: str = "") -> None:
        """A call that should have run sparse runs dense: raise under ``strict``, else a WARNING once
        per (layer, reason) saying what to change."""
        where = f"layer {layer.index} ({layer.name})" if layer is not None else "all self-attention layers"
        if self.config.strict:
            raise RuntimeError(
                f"sparsediff (strict): {self.transformer_class} {where}: cannot run sparse attention: {reason}"
            )
        self._gen.count(f"fallback: {reason}")
        key = (layer.index if layer is not None else None, reason)
        with self._lock:
            if key in self._warned:
                return
            self._warned.add(key)
        logger.warning(
            "sparsediff: %s %s runs dense attention: %s%s (strict=True makes this an error)",
            self.transformer_class,
            where,
            reason,
            f"; {hint}" if hint else "",
        )

    def note_dense(self, why: str) -> None:
        """A call that runs dense by design (plan, warm-up, token threshold): counted for the report."""
        self._gen.count(why)

    def record_density(self, layer: int, state: Any) -> None:
        mask = getattr(state, "last_mask", None)
        if mask is None:
            return
        gen = self._gen
        gen.sparse_calls += 1
        if layer in gen.densities and layer in self._density:
            return
        d = float(mask.density())
        gen.densities.setdefault(layer, d)
        self._density.setdefault(layer, d)

    def has_sparse_heads(self) -> bool:
        """Whether the plan gives any head of any layer a pattern other than ``dense``."""
        if self._has_sparse is None:
            self._has_sparse = any(s.pattern != "dense" for ly in self.layers for s in ly.specs(ly.num_heads))
        return self._has_sparse

    def densities(self) -> dict[int, float]:
        """Density of every layer measured on its first sparse call (of this enable)."""
        return dict(self._density)

    def report(self) -> dict[str, Any]:
        """What sparse attention did in the current (or, between generations, the last) generation."""
        gen = self._gen if self._gen.calls or self._last_gen is None else self._last_gen
        d = gen.densities
        return {
            "transformer_class": self.transformer_class,
            "plan": self.plan.summary(),
            "generations": self.generations,
            "transformer_calls": gen.calls,
            "sparse_calls": gen.sparse_calls,
            "dense_calls": dict(gen.dense),
            "densities": dict(d),
            "mean_density": (sum(d.values()) / len(d)) if d else None,
            "max_tokens": gen.max_tokens,
        }

    def flush_generation_log(self) -> None:
        """End of a generation: its density summary at INFO; a WARNING when a plan with sparse heads
        never ran sparse in it (token threshold, warm-up or fallbacks took every call)."""
        gen = self._gen
        if not gen.calls:
            return
        self.generations += 1
        self._last_gen, self._gen = gen, _GenerationStats()
        if gen.densities and self.config.log_density:
            d = gen.densities
            logger.info(
                "sparsediff: %s attention density (fraction of blocks computed) mean %.3f over %d sparse "
                "layers; per layer %s",
                self.transformer_class,
                sum(d.values()) / len(d),
                len(d),
                ", ".join(f"{k}:{v:.2f}" for k, v in sorted(d.items())),
            )
        if gen.sparse_calls == 0 and self.has_sparse_heads():
            why = ", ".join(f"{k} x{n}" for k, n in sorted(gen.dense.items(), key=lambda kv: -kv[1]))
            hint = ""
            if "below min_tokens" in gen.dense:
                hint = (
                    f" -- the largest call had {gen.max_tokens} tokens < min_tokens={self.plan.min_tokens}; "
                    "pass min_tokens=0 to run sparse anyway"
                )
            logger.warning(
                "sparsediff: %s: no self-attention call ran sparse in this generation (%s)%s",
                self.transformer_class,
                why or "no attention call reached sparsediff",
                hint,
            )


class _GenerationStats:
    """Counters of one generation (what :meth:`TransformerState.report` shows)."""

    def __init__(self) -> None:
        self.calls = 0  # transformer calls
        self.sparse_calls = 0  # layer calls that ran the sparse op with a sparse plan
        self.dense: dict[str, int] = {}  # layer calls that ran dense, by reason
        self.densities: dict[int, float] = {}  # first sparse call's density per layer
        self.max_tokens = 0

    def count(self, why: str) -> None:
        self.dense[why] = self.dense.get(why, 0) + 1


class SparseRootHook(ModelHook):
    """Root hook on the transformer: reads each call's layout, step and branch (diffusers' cache context
    arrives through :attr:`context`); diffusers resets it at the end of a pipeline call."""

    _is_stateful = True

    def __init__(self, state: TransformerState) -> None:
        super().__init__()
        self.state = state
        self.context = _ContextProbe(state)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if torch.compiler.is_compiling():
            # whole-model torch.compile / torch.export: reading the layout and the step takes the
            # call's data (and inspect.signature), which must not enter the traced graph. The call runs
            # without a layout: dense (a dense plan, silently; a sparse plan, with a warning).
            return args, kwargs
        from .pipelines.base import bind_forward_inputs

        self.state.begin_call(bind_forward_inputs(module, args, kwargs))
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        # the layout belongs to this call only: a later call that bypasses pre_forward (compiled
        # whole) must not run with it
        self.state.layout = None
        return output

    def reset_state(self, module: torch.nn.Module):
        self.state.reset()
        return module


# ---------------------------------------------------------------------- apply / remove
def get_state(transformer: torch.nn.Module) -> TransformerState | None:
    return getattr(transformer, _STATE_ATTR, None)


def apply_sparse_attention(
    transformer: torch.nn.Module,
    plan: Plan,
    config: SparseAttentionConfig,
    adapter: Any = None,
    pipeline: Any = None,
) -> TransformerState:
    """Install sparse attention on ``transformer`` (see the module docstring). Raises if already enabled.

    ``pipeline``: the pipeline ``transformer`` belongs to, if any (its ``num_timesteps`` gives the number
    of steps when the cache context does not); it is only read, never modified.
    """
    from .pipelines.base import get_adapter

    if get_state(transformer) is not None:
        raise RuntimeError(
            f"sparse attention is already enabled on this {type(transformer).__name__}; "
            "call disable_sparse_attention() first"
        )
    adapter = adapter or get_adapter(transformer)
    ensure_backend_registered()
    mods = adapter.attention_modules(transformer)
    state = TransformerState(transformer, adapter, plan, config)

    # resolve every processor class first, so a failure leaves the model untouched
    bases = []
    for name, mod in mods:
        proc = mod.processor
        if isinstance(proc, torch.nn.Module):
            raise TypeError(
                f"{name}: processor {type(proc).__name__} is an nn.Module (e.g. IP-adapter weights); "
                "sparse attention does not support module processors"
            )
        if _is_sparse_processor(proc):
            raise RuntimeError(f"{name} already has a sparsediff processor")
        base = adapter.dispatch_processors.get(type(proc).__name__, type(proc))
        if not hasattr(base, "_attention_backend"):
            raise TypeError(
                f"adapter {adapter.name!r}: processor {type(proc).__name__} of {name} does not call "
                "dispatch_attention_fn; the adapter needs a dispatch_processors entry for it"
            )
        bases.append(base)

    for i, ((name, mod), base) in enumerate(zip(mods, bases)):
        orig = mod.processor
        ctx = LayerContext(state, i, name, int(mod.heads))
        ctx.fallback = getattr(orig, "_attention_backend", None)
        new = object.__new__(_sparse_processor_class(base))
        d = dict(vars(orig))
        d.pop("_attention_backend", None)
        vars(new).update(d)
        new._sd_ctx = ctx
        mod.processor = new
        with _LOCK:
            _MODULE_LAYERS[mod] = ctx
        state.layers.append(ctx)
        state.processors.append((mod, orig, new))

    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    registry.register_hook(SparseRootHook(state), ROOT_HOOK_NAME)
    if pipeline is not None:
        state.pipeline_ref = weakref.ref(pipeline)
    setattr(transformer, _STATE_ATTR, state)
    return state


def remove_sparse_attention(transformer: torch.nn.Module) -> bool:
    """Undo :func:`apply_sparse_attention`; returns False when it was not enabled."""
    state = get_state(transformer)
    if state is None:
        return False
    state.flush_generation_log()
    for mod, orig, ours in state.processors:
        # keep what happened to the processor while enabled (set_attention_backend, enable_parallelism)
        for k, v in vars(ours).items():
            if not k.startswith("_sd_"):
                setattr(orig, k, v)
        fb = ours._sd_ctx.fallback
        if fb is not None or "_attention_backend" in vars(orig):
            orig._attention_backend = fb
        if mod.processor is ours or _is_sparse_processor(mod.processor):
            # ours, or one rebuilt from it with ``__class__()`` (IP-adapter loading): the original back
            mod.processor = orig
        with _LOCK:
            if _MODULE_LAYERS.get(mod) is ours._sd_ctx:
                del _MODULE_LAYERS[mod]
    for ctx in state.layers:
        ctx.close()
    registry = getattr(transformer, "_diffusers_hook", None)
    if registry is not None:
        registry.remove_hook(ROOT_HOOK_NAME, recurse=False)
    state.active = False
    delattr(transformer, _STATE_ATTR)
    return True
