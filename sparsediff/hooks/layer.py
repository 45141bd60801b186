"""Per-layer dispatch: one self-attention call of one layer, sparse or the model's own dense call.

:meth:`LayerContext.attention` is what the backend (:mod:`.backend`; under ``torch.compile`` the op of
:mod:`.compiled`, through :meth:`LayerContext.compiled_attention`) calls with diffusers' ``[B, N, H, D]``
tensors. It decides per call: dense plan,
token threshold, warm-up, unsupported arguments (fallbacks: :meth:`TransformerState.note_fallback`),
key-padding masks (:meth:`LayerContext._masked_run`: padded text dropped, sparse path on the kept
tokens), Ulysses context parallelism (:meth:`LayerContext._context_parallel`: the plan sliced by global
head index), ring and Ulysses x ring (:meth:`LayerContext._ring`: each visiting K/V chunk against the
layer's whole-sequence mask, :mod:`.ring`) -- then :func:`sparsediff.attention.sparse_attention`. The search's observer tap
(:attr:`SparseAttentionConfig.observer`, :class:`AttentionCall`) is called before attention is computed.

Every path is differentiable (training): one process and key-padding masks through the op's autograd;
Ulysses through the graph its forward op keeps for diffusers' backward op (:meth:`LayerContext._context_parallel`);
ring and Ulysses x ring through :func:`.ring.chunk_backward`.

Imports :mod:`.state`, :mod:`.backend`, :mod:`.compiled` and :mod:`.ring` among the hook modules (all
below it).
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
    """One self-attention layer while sparse attention is enabled (owned by its processor).

    Its calls are differentiable on every path -- one process, key-padding masks, Ulysses, ring and
    Ulysses x ring context parallelism -- with the gradients of what the forward computed (the same
    masks, dense fallbacks and token orders)."""

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
        self.states: dict[tuple[Any, int, int], Any] = {}  # (branch, call index, batch)
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

    def state(self, key: tuple) -> Any:
        st = self.states.get(key)
        if st is None:
            from ..attention import LayerState

            st = self.states[key] = LayerState()
        return st

    def _refresh_due(self, key: tuple, step: int | None) -> bool:
        """Whether this call must be the exact pass that refreshes cross-step state (LSE, skip outputs): a
        step listed in ``refresh_steps``, or the first call of this (branch, call, batch) stream after a
        listed step it did not run -- a cache (FirstBlockCache, MagCache, ...) skipped the layer there, and
        the state must not stay as old as the refresh before."""
        if step is None:
            return False
        refresh = self.root.plan.refresh_steps
        if step in refresh:
            return True
        st = self.states.get(key)
        last = None if st is None else st.last_step
        return last is not None and last < step and any(last < r < step for r in refresh)

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
        if force_dense and not cross_step and not self._seeds_remainder(specs, step, num_steps):
            root.note_dense("warm-up (dense_steps / dense_layers)")
            return self.dense(kwargs)
        state_key = (root.branch_key, call_index, q.shape[0])
        if cross_step and self._refresh_due(state_key, step):
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
        state = self.state(state_key)
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

    def _seeds_remainder(self, specs, step: int | None, num_steps: int | None) -> bool:
        """A warm-up call that runs through :func:`sparse_attention` to seed ``remainder="cached"`` heads:
        the last dense step before this layer runs sparse (:func:`~sparsediff.attention.seeds_remainder`)."""
        from ..attention import seeds_remainder

        return (
            step is not None
            and self.index not in self.root.plan.schedule.dense_layers
            and seeds_remainder(specs)
            and not self._force_dense(step + 1, num_steps)
        )

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
        """Ulysses context parallelism (ring and Ulysses x ring: :meth:`_ring`).

        diffusers' ``TemplatedUlyssesAttention`` all-to-alls the ``[B, N / U, H, D]`` inputs into the whole
        sequence for ``H / U`` heads (``[B, N, H / U, D]``, this rank's heads ``rank * H / U ...``) and
        calls our forward op, which runs :meth:`_run` on them -- the plan sliced by global head index,
        tokens put into the layout's order first where the adapter splits by segment
        (``cp_permutation``; the output goes back into the template's order) -- or a dense fallback.

        Backward (training): when the call needs gradients (grad mode on and q, k or v requiring grad),
        the forward op runs that same computation with autograd on, on detached leaves of the gathered
        q/k/v, and keeps its graph in ``ctx.save_for_backward`` (so the graph lives exactly as long as the
        template's saved state: freed after a backward, kept by ``retain_graph=True``). The backward op
        back-propagates the template's all-to-all'ed ``grad_out [B, N, H / U, D]`` through it -- the
        op's own backward for the sparse heads, the model's dense backend for dense and fallback
        layers, the token permutation's inverse -- and returns ``(dq, dk, dv)`` in the template's
        order, which all-to-alls them back to ``[B, N / U, H, D]``. Nothing runs twice: the layer's
        decisions, masks, cross-step state (lse_cache, skip) and reports are those of the forward.
        Memory: what one process's training of the layer keeps (the op saves q, k, v, out, LSE).
        """
        cp = pc.context_parallel_config
        if getattr(cp, "ring_degree", 1) > 1:
            return self._ring(kwargs, pc, cp)
        layer = self
        # diffusers runs the forward op inside its autograd.Function (grad mode off there): decide here
        train = torch.is_grad_enabled() and any(kwargs[n].requires_grad for n in ("query", "key", "value"))

        def attend(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
            """The layer's attention of the gathered ``[B, N, H / U, D]`` tensors (template order)."""
            world, rank = cp.ulysses_degree, cp._ulysses_local_rank
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
            query, key, value = (_wait(x) for x in (query, key, value))
            args = (attn_mask, dropout_p, is_causal, scale, enable_gqa)
            if not (train and _save_ctx):
                return attend(query, key, value, *args)
            with torch.enable_grad():
                leaves = tuple(x.detach().requires_grad_(True) for x in (query, key, value))
                out = attend(*leaves, *args)
            ctx.save_for_backward(out, *leaves)
            return out.detach()

        def backward_op(ctx, grad_out, *args, **kwargs):
            out, *leaves = ctx.saved_tensors
            if not out.requires_grad:  # the output does not depend on q, k, v
                return tuple(torch.zeros_like(x) for x in leaves)
            # retain_graph: the outer backward may be retained; the graph goes with the saved tensors
            grads = torch.autograd.grad(out, leaves, grad_out, retain_graph=True, allow_unused=True)
            return tuple(torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads))

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

    def _ring(self, kwargs: dict[str, Any], pc: Any, cp: Any) -> torch.Tensor:
        """Ring / Ulysses x ring context parallelism (:mod:`.ring`): diffusers' ring template calls our
        forward op once per visiting K/V chunk; each call attends this rank's queries over the chunk's
        listed key blocks of the layer's whole-sequence mask and returns ``(out, lse)`` for diffusers'
        LSE merge. The same decisions as :meth:`_run` (dense plan, token threshold, warm-up), taken
        before the template: a dense layer runs the model's own backend under the same ring."""
        from ..attention import DEFAULT_BLOCK_SIZE, group_heads
        from ..mask import BlockSparseMask
        from .ring import (
            RingGeometry,
            chunk_attention,
            chunk_backward,
            chunk_pieces,
            gather_chunks,
            merge_partials,
            ring_block_mask,
            ring_dense_hooks,
            ring_unsupported,
            to_natural,
        )

        root = self.root
        q = kwargs["query"]
        call_index = self._next_call_index()
        hint = "use Ulysses (ContextParallelConfig(ulysses_degree=...)) for these heads"
        if getattr(cp, "ring_anything", False):
            return self._fallback(kwargs, "ring attention with ring_anything (uneven chunks)", hint)
        R = int(cp.ring_degree)
        U = int(getattr(cp, "ulysses_degree", 1) or 1)
        world = R * U
        B, n_local, H, D = q.shape
        layout = root.fit_layout(n_local * world)
        perm = None if layout is None else root.cp_permutation(world, layout, q.device)
        if perm is None:
            return self._fallback(
                kwargs,
                f"the context-parallel sequence ({n_local} x {world} tokens) does not match the layout "
                f"{root.layout} -- enable context parallelism *before* sparse attention, so that the sparsediff "
                "root hook sees the unsplit inputs",
            )
        if H % U:
            return self._fallback(kwargs, f"{H} heads do not split over ulysses_degree={U}")
        h_local = H // U
        head_offset = (cp._ulysses_local_rank if U > 1 else 0) * h_local
        if root.config.observer is not None:
            return self._fallback(
                kwargs,
                "the search's observer under ring attention (it needs every query of the layer)",
                "profile on one process or under Ulysses",
            )
        specs = self.specs(h_local, head_offset)
        if all(s.pattern == "dense" for s in specs):
            root.note_dense("dense plan")
            return self.dense(kwargs)
        root.note_tokens(layout.num_tokens)
        if layout.num_tokens < root.plan.min_tokens:
            root.note_dense("below min_tokens")
            return self.dense(kwargs)
        if kwargs.get("dropout_p") or kwargs.get("is_causal") or kwargs.get("enable_gqa"):
            return self._fallback(
                kwargs,
                "dropout / causal / GQA attention",
                "sparse attention serves plain self-attention only",
            )
        mask = kwargs.get("attn_mask")
        if mask is not None and root.nontrivial_mask(mask) is not None:
            return self._fallback(kwargs, "an attention mask under ring attention", hint)
        cfg = root.config
        bs = int(cfg.block_size or DEFAULT_BLOCK_SIZE)
        cache = root.mask_cache()
        reason = ring_unsupported(layout, specs, q, block_size=bs, cache=cache)
        if reason is not None:
            return self._fallback(kwargs, reason, hint)
        step, num_steps = root.step_info()
        cross_step = any(s.is_cross_step for s in specs)  # lse_cache (the one served under ring)
        force_dense = self._force_dense(step, num_steps)
        if force_dense and not cross_step:
            root.note_dense("warm-up (dense_steps / dense_layers)")
            return self.dense(kwargs)
        state_key = (root.branch_key, call_index, q.shape[0])
        if cross_step and self._refresh_due(state_key, step):
            force_dense = True  # refresh step: exact pass that refreshes the LSE cache

        groups = tuple(group_heads(specs).items())
        static = all(s.is_static for s in specs) and not force_dense
        # lse_cache's selection need not keep a query block's own chunk: a row could see no key in the
        # first chunk of the ring, which diffusers' LSE merge cannot represent (-inf - -inf). Such layers
        # ("eager") gather the whole K/V and compute every chunk at the first call; later calls add nothing.
        eager = cross_step  # (also the only layers with hooks fed the whole LSE: lse_cache's)
        natural = None if perm is False else perm  # position of every natural token in the chunk order
        geom = cache.get_or_build(
            ("ring_geometry", layout, R, world, str(q.device)),
            lambda: RingGeometry.of(
                layout.num_tokens, R, None if natural is None else torch.argsort(natural)
            ),
        )
        rank = int(cp._ring_local_rank)
        group = cp._ring_mesh.get_group()
        scale = kwargs.get("scale")
        scale_f = float(D**-0.5 if scale is None else scale)
        state = self.state(state_key)
        state.bind((layout, B, h_local, q.device), step)
        run: dict[str, Any] = {"i": -1, "bi": -1, "pieces": {}}

        def pieces(j: int):
            p = run["pieces"].get(j)
            if p is None:

                def build():
                    if "bool" not in run:
                        run["bool"] = run["mask"].to_dense()
                    return chunk_pieces(run["bool"], geom, rank, j, bs)

                if static:  # the pieces of a static layer are built once (per layout, plan, ring geometry)
                    p = cache.get_or_build(
                        ("ring_pieces", layout, groups, bs, R, world, rank, j, str(q.device)), build
                    )
                else:
                    p = build()
                run["pieces"][j] = p
            return p

        def first_call(query, key, value):
            """The layer's mask (and, for eager layers, the whole attention of this rank's queries)."""
            qf = kf = kv = None
            if not static and not force_dense:  # chosen from the whole sequence: the same mask on every rank
                qf = to_natural(gather_chunks(query, group, R), natural)
                kparts = gather_chunks(key, group, R)
                kf = to_natural(kparts, natural)
            if eager:
                kparts = kparts if kf is not None else gather_chunks(key, group, R)
                kv = (kparts, gather_chunks(value, group, R))
            if force_dense:
                m = BlockSparseMask.full(1, h_local, bs, (layout.num_tokens,) * 2, query.device)
                hooks = [(h, True) for h in ring_dense_hooks(specs, layout, query, state=state, step=step)]
            else:
                m, afters = ring_block_mask(
                    qf, kf, layout, specs, query,
                    batch=query.shape[0], scale=scale_f, block_size=bs, cache=cache, step=step,
                    backend=cfg.backend, state=state,
                )  # fmt: skip
                hooks = [(a, False) for a in afters]
            run["mask"] = state.last_mask = m
            run["hooks"] = hooks
            if kv is None:
                return None
            acc = None
            for jj in range(R):
                o, lse = chunk_attention(
                    query, kv[0][jj], kv[1][jj], geom, rank, pieces(jj), scale=scale_f, backend=cfg.backend
                )
                acc = merge_partials(acc, o, lse)
            run["lse"] = acc[1]
            return acc

        def finish(lse_local):
            """Every pass of the layer done: the hooks (lse_cache's LSE) get the whole sequence's LSE."""
            if not run["hooks"]:
                return
            lse_full = to_natural(gather_chunks(lse_local.unsqueeze(-1), group, R), natural)[..., 0]
            for hook, dense_hook in run["hooks"]:
                if dense_hook:  # a family's on_dense
                    hook(lse_full)
                else:  # a group's after(out, lse): lse_cache reads the LSE only
                    hook(None, lse_full)

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
            query, key, value = (_wait(x) for x in (query, key, value))
            run["i"] = 0 if _save_ctx else run["i"] + 1
            if _save_ctx:  # the rank's own chunk comes first
                ctx.save_for_backward(query, key, value)
                whole = first_call(query, key, value)
                if whole is not None:  # eager: everything now, the later calls add nothing
                    finish(whole[1])
                    return whole if return_lse else whole[0]
            if eager:
                B_, n_, H_, D_ = query.shape
                out = query.new_zeros(B_, n_, H_, D_, dtype=torch.float32)
                lse = torch.full((B_, n_, H_), -torch.inf, dtype=torch.float32, device=query.device)
                return (out, lse) if return_lse else out
            j = (rank + run["i"]) % R
            out, lse = chunk_attention(
                query, key, value, geom, rank, pieces(j), scale=scale_f, backend=cfg.backend
            )
            return (out, lse) if return_lse else out

        def backward_op(ctx, grad_out, *args, query=None, key=None, value=None, out=None, lse=None, **kwargs):
            if query is None:
                raise NotImplementedError("sparsediff ring attention: backward without the ring's inputs")
            run["bi"] += 1
            j = (rank + run["bi"] % R) % R
            return chunk_backward(
                query,
                key,
                value,
                out,
                run.get("lse", lse),  # our own merge where we keep it (eager layers: exact, never NaN)
                grad_out,
                geom,
                rank,
                pieces(j),
                scale=scale_f,
                backend=cfg.backend,
            )

        # no fallback from here on: the ranks are inside the template's collectives together
        out = _ad._templated_context_parallel_attention(
            kwargs["query"],
            kwargs["key"],
            kwargs["value"],
            None,
            0.0,
            False,
            scale,
            False,
            False,
            forward_op=forward_op,
            backward_op=backward_op,
            _parallel_config=pc,
        )
        if force_dense:
            root.note_dense("warm-up (dense_steps / dense_layers)")
        else:
            root.record_density(self.index, state)
        return out


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
