"""Per-layer dispatch: one self-attention call of one layer, sparse or the model's own dense call.

:meth:`LayerContext.attention` is what the backend (:mod:`.backend`; under ``torch.compile`` the op of
:mod:`.compiled`, through :meth:`LayerContext.compiled_attention`) calls with diffusers' ``[B, N, H, D]``
tensors. It decides per call: dense plan,
token threshold, warm-up, unsupported arguments (fallbacks: :meth:`TransformerState.note_fallback`),
key-padding masks (:meth:`LayerContext._masked_run`: padded text dropped, sparse path on the kept
tokens), Ulysses context parallelism (:meth:`LayerContext._context_parallel`: the plan sliced by global
head index) -- then :func:`sparsediff.attention.sparse_attention`. The search's observer tap
(:attr:`SparseAttentionConfig.observer`, :class:`AttentionCall`) is called before attention is computed.

Imports :mod:`.state`, :mod:`.backend` and :mod:`.compiled` among the hook modules (all below it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models import attention_dispatch as _ad

from ..layout import TokenLayout
from ..specs import HeadSpec
from .backend import call_backend
from .compiled import register_layer, release_layer
from .state import TransformerState

__all__ = ["AttentionCall", "LayerContext"]


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
        self.id = register_layer(self)
        #: identifies the layer inside compiled graphs without specialising on it
        self.key = torch.tensor([self.id], dtype=torch.int64)
        self.own_backend: Any = None  # the processor's own backend (None: the global active backend)
        #: LayerState per (CFG branch = transformer call within a step, attention call of this layer
        #: within that transformer call). Mochi attends per sample and key-padding masks split a batch,
        #: so one layer can run several calls per forward; each keeps its own caches across steps.
        self.states: dict[tuple[int, int], Any] = {}
        self._serial = -1  # root.call_serial of the transformer call the counter below belongs to
        self._ncalls = 0
        self._specs: dict[tuple[int, int], tuple[HeadSpec, ...]] = {}

    def close(self) -> None:
        release_layer(self.id)

    def specs(self, num_heads: int, head_offset: int = 0) -> tuple[HeadSpec, ...]:
        k = (num_heads, head_offset)
        s = self._specs.get(k)
        if s is None:
            s = self._specs[k] = self.root.plan.head_specs(self.index, num_heads, head_offset)
        return s

    def state(self, key: tuple[int, int]) -> Any:
        st = self.states.get(key)
        if st is None:
            from ..attention import LayerState

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
        return call_backend(self.own_backend, kwargs)

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
                "the adapter could not read it (see above; under a whole-model torch.compile / "
                "torch.export the adapter sees only the call's tensors and int/float/bool/str/tuple "
                "inputs -- compile the blocks with transformer.compile_repeated_blocks() instead)",
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

    def compiled_attention(self, kwargs: dict[str, Any]) -> torch.Tensor:
        """:meth:`attention` inside the ``sparsediff_hooks::layer_attention`` op (:mod:`.compiled`).

        Under a whole-model ``torch.compile`` / ``torch.export`` (the call's ``begin_call`` ran in its op),
        heads with a dynamic pattern are not served: the layer falls back to dense with a warning.
        """
        root = self.root
        if root.compiled_call and root.layout is not None and self._dynamic_heads(kwargs["query"].shape[2]):
            return self._fallback(
                kwargs,
                "a dynamic pattern (topp, lse_cache, skip, reordered cluster/topp) under a whole-model "
                "torch.compile / torch.export",
                "use static patterns (radial, tile, reordered static) there, or compile the blocks with "
                "transformer.compile_repeated_blocks()",
            )
        return self.attention(kwargs)

    def _dynamic_heads(self, num_heads: int) -> bool:
        """Whether the plan gives any head of this layer a pattern whose mask is not static."""
        return any(not s.is_static for s in self.specs(num_heads))

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
        root.note_tokens(layout.num_tokens)
        if layout.num_tokens < root.plan.min_tokens:
            root.note_dense("below min_tokens")
            return self.dense(kwargs)
        step, num_steps = root.step_info()
        cross_step = any(s.is_cross_step for s in specs)  # state across steps (skip, lse_cache)
        force_dense = self._force_dense(step, num_steps)
        if force_dense and not cross_step:
            root.note_dense("warm-up (dense_steps / dense_layers)")
            return self.dense(kwargs)
        if cross_step and step is not None and step in root.plan.refresh_steps:
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
        # looked up on the module at call time (tests/_integration.py checks every call through it)
        from ..attention import sparse_attention

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
