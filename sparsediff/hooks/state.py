"""The state of one enabled transformer, and the root hook that feeds it each call.

:class:`SparseRootHook` (registered on the transformer's diffusers ``HookRegistry``) calls
:meth:`TransformerState.begin_call` before every transformer forward: step / branch / generation
(:class:`~.steps.StepTracking`) and the call's token layout (the adapter). Layers
(:class:`~.layer.LayerContext`) read it while they run, and report fallbacks and densities to it.

Imports :mod:`.steps` and :mod:`.compiled` only among the hook modules: the layers it keeps are known
through :class:`StateLayer`, and the installer's processor take-over runs through the hook's ``adopt``.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch
from diffusers.hooks import ModelHook

from ..config import SparseAttentionConfig
from ..layout import TokenLayout
from ..plan import ADAPTER_NAME, Plan, adapter_layers
from ..specs import HeadSpec
from .compiled import traced_begin_call
from .steps import ContextProbe, StepTracking

logger = logging.getLogger(__name__)

__all__ = ["StateLayer", "TransformerState", "SparseRootHook"]

_UIDS = itertools.count()


class StateLayer(Protocol):
    """What the state needs of its layers (:class:`~.layer.LayerContext`): names for warnings, plan
    specs for :meth:`TransformerState.has_sparse_heads`, per-call states to clear."""

    index: int
    name: str
    num_heads: int
    states: dict[tuple[Any, int], Any]

    def specs(self, num_heads: int, head_offset: int = 0) -> tuple[HeadSpec, ...]: ...


def _drop_trivial_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """None when the mask masks nothing (bool all True, or additive all zero), else the mask."""
    if mask.dtype == torch.bool:
        return None if bool(mask.all()) else mask
    return None if bool((mask == 0).all()) else mask


def _forward_params(cls: type) -> tuple[tuple[str, ...], dict[str, Any]]:
    """(positional parameter names of ``cls.forward`` after ``self``, defaults of all its parameters)."""
    sig = inspect.signature(cls.forward)
    names, defaults = [], {}
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        if p.default is not p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            defaults[p.name] = p.default
    return tuple(names), defaults


class TransformerState(StepTracking):
    """Everything sparse attention keeps for one enabled transformer (also the root hook's state): the
    plan and config, its layers, the current call's layout and step context (:class:`StepTracking`: the
    rule that finds step, branch and generation), the mask cache, fallback warnings and the per-generation
    report. A generation ends at the end of a pipeline call (diffusers resets stateful hooks), when a new
    one is detected, or on disable: per-layer state is cleared and the generation's summary is logged.
    """

    def __init__(self, transformer: torch.nn.Module, adapter: Any, plan: Plan, config: SparseAttentionConfig):
        self.transformer_ref = weakref.ref(transformer)
        self.transformer_class = type(transformer).__name__
        self.uid = next(_UIDS)  # keys this state's compiled-call signatures (never reused, unlike id())
        #: forward's parameter names in order and their defaults (binds a call's inputs in traced code,
        #: where ``inspect.signature`` cannot run)
        self.forward_params = _forward_params(type(transformer))
        #: whole-model compile / export: the token of the running call's ``begin_call`` op (trace time)
        self.call_token: torch.Tensor | None = None
        #: the running call is a whole-model compiled / exported one (its ``begin_call`` ran in the op)
        self.compiled_call = False
        self.adapter = adapter
        self.plan = plan
        self.config = config
        self.layers: list[StateLayer] = []
        self.processors: list[tuple[torch.nn.Module, Any, Any]] = []  # (module, original, ours)
        self.pipeline_ref: Any = None  # weakref to the pipeline when enabled on one (num_timesteps)
        #: LoRA adapters loaded with the plan (a plan folder's): deleted from the model on disable
        self.loaded_adapters: list[str] = []
        self.active = True
        self.layout: TokenLayout | None = None
        self.call_serial = 0  # transformer calls so far (keys the per-layer call counters)
        self.init_steps()
        self._mask_cache = None
        self._lock = threading.Lock()
        self._warned: set[tuple[int | None, str]] = set()
        self._layout_warned: set[TokenLayout] = set()
        self._mask_memo: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._density: dict[int, float] = {}  # first sparse call per layer of this enable
        self._has_sparse: bool | None = None
        self._adapter_mods: list[torch.nn.Module] = []
        self._adapter_off: dict[torch.nn.Module, float] = {}  # LoRA layers switched off: their scaling
        self.generations = 0
        self._gen = _GenerationStats()
        self._last_gen: _GenerationStats | None = None

    # ------------------------------------------------------------------ per call
    @torch.compiler.disable
    def begin_call(self, inputs: Mapping[str, Any], compiled: bool = False) -> None:
        """Read the layout, step and branch of one transformer call. Eager, from the root hook; under a
        whole-model ``torch.compile`` / ``torch.export`` at run time inside the ``begin_call`` op
        (:mod:`.compiled`, ``compiled=True``: ``inputs`` then holds the call's tensors and its
        compile-time constants only). Processors replaced while enabled were taken over just before an
        eager call (:class:`SparseRootHook`'s ``adopt``)."""
        self.compiled_call = compiled
        self._mask_memo = None
        self.call_serial += 1
        self.advance(inputs)
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

    # ------------------------------------------------------------------ the plan's LoRA adapter
    def runs_sparse(self) -> bool:
        """Whether some self-attention layer of the current call runs sparse (not a dense warm-up step,
        not below ``min_tokens``, not an all-dense plan, not every layer dense)."""
        plan = self.plan
        if self.layout is None or self.layout.num_tokens < plan.min_tokens:
            return False
        if not self.has_sparse_heads():
            return False
        step, n = self.step_info()
        for i in range(len(self.layers)):
            try:
                if not plan.schedule.is_dense(step, n, i):
                    return True
            except ValueError:  # fractional warm-up without a step count: the layers skip it (warned there)
                return True
        return False

    def gate_adapter(self, transformer: torch.nn.Module) -> None:
        """``config.adapter_steps == "sparse"``: switch the ``"sparsediff"`` LoRA off (its peft scaling to 0)
        for this call when it runs no layer sparse; the root hook's ``post_forward`` puts the scaling back
        (:meth:`restore_adapter`), so between calls it is always the user's. Eager calls only (under a
        whole-model ``torch.compile`` the adapter runs in every call); a fused adapter (``fuse_lora``) is
        part of the weights and runs in every call."""
        if self.config.adapter_steps != "sparse":
            return
        self.restore_adapter()
        layers = self._adapter_layers(transformer)
        if not layers or self.runs_sparse():
            return
        for m in layers:
            if not getattr(m, "merged", False):
                self._adapter_off[m] = m.scaling[ADAPTER_NAME]
                m.scaling[ADAPTER_NAME] = 0.0

    def restore_adapter(self) -> None:
        for m, scale in self._adapter_off.items():
            if ADAPTER_NAME in getattr(m, "scaling", {}):
                m.scaling[ADAPTER_NAME] = scale
        self._adapter_off.clear()

    def _adapter_layers(self, transformer: torch.nn.Module) -> list[torch.nn.Module]:
        """The peft LoRA layers holding the ``"sparsediff"`` adapter (looked up again when it changes)."""
        if ADAPTER_NAME not in (getattr(transformer, "peft_config", None) or {}):
            self._adapter_off.clear()
            return []
        cached = self._adapter_mods
        if cached and all(ADAPTER_NAME in m.scaling for m in cached):
            return cached
        self._adapter_mods = adapter_layers(transformer)
        return self._adapter_mods

    def nontrivial_mask(self, mask: torch.Tensor) -> torch.Tensor | None:
        """:func:`_drop_trivial_mask`, memoised for the mask object every layer of one call shares
        (one device sync per transformer call instead of one per layer)."""
        memo = self._mask_memo
        if memo is not None and memo[0] is mask:
            return memo[1]
        res = _drop_trivial_mask(mask)
        self._mask_memo = (mask, res)
        return res

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
        self.clear_steps()

    reset = end_generation

    def mask_cache(self):
        if self._mask_cache is None:
            from ..attention import MaskCache

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
    def note_fallback(self, reason: str, layer: StateLayer | None = None, hint: str = "") -> None:
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

    def note_tokens(self, num_tokens: int) -> None:
        """A layer call of ``num_tokens`` tokens reached the sparse path (the report's ``max_tokens``)."""
        gen = self._gen
        if num_tokens > gen.max_tokens:
            gen.max_tokens = num_tokens

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
    arrives through :attr:`context`); diffusers resets it at the end of a pipeline call.

    ``adopt``: called with the state before each eager call, before :meth:`TransformerState.begin_call`
    -- the installer's :func:`~.install.adopt_processors` (processors replaced while enabled, e.g. by
    IP-adapter loading, are taken over).
    """

    _is_stateful = True

    def __init__(
        self, state: TransformerState, adopt: Callable[[TransformerState], None] | None = None
    ) -> None:
        super().__init__()
        self.state = state
        self.adopt = adopt
        self.context = ContextProbe(state)

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        if torch.compiler.is_compiling():
            # whole-model torch.compile / torch.export: reading the layout and the step takes the
            # call's data, which must not enter the traced graph -- the graph calls the begin_call op,
            # which does it at run time; the layer ops of this call take its token
            names, defaults = self.state.forward_params
            inputs = dict(defaults)
            for name, a in zip(names, args):
                inputs[name] = a
            inputs.update(kwargs)
            self.state.call_token = traced_begin_call(self.state, inputs)
            return args, kwargs
        from ..pipelines.base import bind_forward_inputs

        if self.adopt is not None:
            self.adopt(self.state)
        self.state.begin_call(bind_forward_inputs(module, args, kwargs))
        self.state.gate_adapter(module)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        # The layout belongs to this call only: a later call that bypasses pre_forward (compiled whole)
        # must not run with it. Except under gradient checkpointing: backward reruns the blocks after
        # this call returned, and the rerun must take the same path (else torch's checkpoint fails with
        # "a different number of tensors was saved"); the next call's pre_forward replaces it.
        if not (
            torch.is_grad_enabled() and module.training and getattr(module, "gradient_checkpointing", False)
        ):
            self.state.layout = None
            self.state.call_token = None
            # the adapter's scaling is changed for one call only: between calls (fuse_lora / unfuse_lora /
            # set_adapters) it is what the user set
            self.state.restore_adapter()
        return output

    def reset_state(self, module: torch.nn.Module):
        self.state.reset()
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        """On removal (diffusers' ``HookRegistry.remove_hook`` calls this after relinking the chain): keep
        the hook registered after this one working when it has a ``new_forward``.

        diffusers 0.42 relinks by setting the next hook's ``forward`` to the forward before the removed
        hook; for a hook with a ``new_forward`` (FasterCache's denoiser hook, TextKVCache's transformer
        hook) that replaces its ``new_forward`` itself, so the cache enabled after sparse
        attention stops running once sparse attention is disabled. The forward before this hook belongs
        in the next hook's ``original_forward`` instead (what ``new_forward`` calls); nothing is changed
        when the chain is already intact (a diffusers that relinks correctly).
        """
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            return module
        names = [n for n in registry._hook_order if registry.hooks.get(n) is self]
        if not names:
            return module
        i = registry._hook_order.index(names[0])
        if i + 1 >= len(registry._fn_refs):
            return module
        nxt_hook = registry.hooks[registry._hook_order[i + 1]]
        nxt_ref = registry._fn_refs[i + 1]
        new_forward = getattr(nxt_hook, "new_forward", None)
        if new_forward is None or nxt_ref.original_forward is None:
            return module
        current = nxt_ref.forward
        if isinstance(current, functools.partial) and current.func == new_forward:
            return module  # intact
        nxt_ref.original_forward = current  # the forward before this hook
        nxt_ref.forward = functools.update_wrapper(functools.partial(new_forward, module), new_forward)
        return module
