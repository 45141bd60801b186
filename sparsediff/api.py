"""Public API: enable / disable sparse attention on a diffusers pipeline or transformer.

::

    import sparsediff

    pipe.enable_sparse_attention()                      # family default (video: radial, image: top-p)
    pipe.enable_sparse_attention("tile")                # one pattern on every head, family schedule
    pipe.enable_sparse_attention("plans/wan14b.json", dense_steps=0.2)   # a searched plan + overrides
    pipe.disable_sparse_attention()                     # original processors back, bit-identical

    with sparsediff.enable_sparse_attention(pipe, plan):   # the handle is a context manager
        video = pipe(prompt).frames

Every transformer component of a pipeline is handled (Wan 2.2 A14B: ``transformer`` and
``transformer_2``); ``plan`` may be a dict ``{component name: plan}`` to give each its own.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .config import SparseAttentionConfig
from .defaults import default_plan
from .hooks import TransformerState, apply_sparse_attention, get_state, remove_sparse_attention
from .plan import ADAPTER_NAME, Plan, folder_base_differences, plan_folder_files
from .specs import PATTERN_PARAMS, HeadSpec

logger = logging.getLogger(__name__)

__all__ = [
    "enable_sparse_attention",
    "disable_sparse_attention",
    "is_sparse_attention_enabled",
    "sparse_attention_enabled",
    "SparseAttentionHandle",
    "resolve_plan",
    "install_pipeline_methods",
]


def resolve_plan(plan: Any, adapter: Any) -> Plan:
    """``None`` -> family default; a pattern name (or a :class:`HeadSpec`) -> that pattern on every head
    with the family's schedule (warm-up steps, dense first layer, the token threshold ``min_tokens``) and,
    for the family's own pattern, its parameters -- override with ``dense_steps=0, dense_layers=(), min_tokens=0``); a path ->
    :meth:`Plan.load`; a plan folder (``sparsediff finetune`` output) -> its ``sparse_plan.json``; a
    :class:`Plan` -> itself (its own schedule)."""
    if plan is None:
        return default_plan(adapter)
    if isinstance(plan, Plan):
        return plan
    if isinstance(plan, HeadSpec):
        return default_plan(adapter, plan.pattern, **dict(plan.params))
    if isinstance(plan, str) and plan in PATTERN_PARAMS:
        return default_plan(adapter, plan)
    if isinstance(plan, (str, os.PathLike)) and os.path.isdir(plan):
        return Plan.load(plan_folder_files(plan)[0])
    if isinstance(plan, (str, os.PathLike)):
        if isinstance(plan, str) and not plan.endswith(".json") and not os.path.exists(plan):
            raise ValueError(
                f"plan {plan!r} is neither a pattern name {tuple(PATTERN_PARAMS)} nor an existing plan file"
            )
        return Plan.load(plan)
    raise TypeError(
        f"plan must be None, a pattern name, a path to a plan JSON, a HeadSpec or a sparsediff.Plan; "
        f"got {type(plan).__name__}"
    )


def _transformers(obj: Any) -> tuple[list[tuple[str, torch.nn.Module]], Any]:
    """[(component name, transformer), ...] and the pipeline (None for a bare transformer)."""
    if isinstance(obj, torch.nn.Module):
        return [("transformer", obj)], None
    comps = getattr(obj, "components", None)
    if not isinstance(comps, Mapping):
        raise TypeError(f"expected a diffusers pipeline or a transformer model, got {type(obj).__name__}")
    found = [
        (n, m) for n, m in comps.items() if n.startswith("transformer") and isinstance(m, torch.nn.Module)
    ]
    if not found:
        from .pipelines.base import UnsupportedModelError, supported_classes

        raise UnsupportedModelError(
            f"{type(obj).__name__} has no transformer component (components: {sorted(comps)}); sparsediff "
            f"supports DiT pipelines with these transformer classes: {', '.join(supported_classes())}"
        )
    return found, obj


def _folder_adapter(name: str, transformer: torch.nn.Module, plan: Any) -> Path | None:
    """The LoRA weights to load with a plan folder (only into the ``transformer`` component: what
    ``sparsediff finetune`` trains), else None. Refuses a transformer that already has an adapter by that
    name (before anything is modified)."""
    if not (isinstance(plan, (str, os.PathLike)) and os.path.isdir(plan)):
        return None
    weights = plan_folder_files(plan)[1]
    if weights is None or name != "transformer":
        return None
    if ADAPTER_NAME in (getattr(transformer, "peft_config", None) or {}):
        raise RuntimeError(
            f"{name} already has an adapter named {ADAPTER_NAME!r}; delete it before enabling the plan folder {plan}"
        )
    if not hasattr(transformer, "load_lora_adapter"):
        raise TypeError(
            f"{type(transformer).__name__} cannot load LoRA adapters (no diffusers PeftAdapterMixin)"
        )
    _warn_other_base(transformer, Path(plan))
    return weights


def _warn_other_base(transformer: torch.nn.Module, folder: Path) -> None:
    """Warn when the folder's adapter was trained on other weights of this architecture (the plan's config
    hash cannot tell): it still loads -- a fine-tuned base may be on purpose -- but its card's numbers do
    not apply."""
    found = folder_base_differences(folder, transformer)
    if found is None:
        return  # no card, or one written before base weights were recorded
    diffs, n = found
    if diffs:
        logger.warning(
            "sparsediff: the adapter in %s was trained on other base weights than this %s's (%d of %d adapted "
            "layers differ, e.g. %s); it loads, but the quality it was trained for does not apply -- retrain "
            "it with `sparsediff finetune` for these weights",
            folder,
            type(transformer).__name__,
            len(diffs),
            n,
            diffs[0],
        )


def _load_folder_adapter(transformer: torch.nn.Module, weights: Path) -> None:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{weights.parent} holds a LoRA adapter: loading it needs peft (pip install peft)"
        ) from e
    transformer.load_lora_adapter(
        str(weights.parent), weight_name=weights.name, adapter_name=ADAPTER_NAME, prefix="transformer"
    )


class SparseAttentionHandle:
    """What :func:`enable_sparse_attention` returns; ``with handle:`` disables on exit."""

    def __init__(self, target: Any, states: dict[str, TransformerState]) -> None:
        self.target = target
        self.states = states

    @property
    def plans(self) -> dict[str, Plan]:
        return {n: s.plan for n, s in self.states.items()}

    def densities(self) -> dict[str, dict[int, float]]:
        """Per component, the density of every sparse layer measured on its first sparse call."""
        return {n: s.densities() for n, s in self.states.items()}

    def report(self) -> dict[str, dict[str, Any]]:
        """Per component, what sparse attention did in the current generation (between generations: the
        last one): transformer calls, layer calls that ran sparse, dense layer calls by reason (plan,
        warm-up, ``min_tokens``, fallbacks), the density of every sparse layer and their mean."""
        return {n: s.report() for n, s in self.states.items()}

    def report_text(self) -> str:
        """:meth:`report` as readable lines (one per component)."""
        lines = []
        for n, r in self.report().items():
            mean = r["mean_density"]
            dense = ", ".join(f"{k} x{v}" for k, v in sorted(r["dense_calls"].items())) or "none"
            lines.append(
                f"{n} ({r['transformer_class']}): {r['transformer_calls']} transformer calls, "
                f"{r['sparse_calls']} sparse layer calls, "
                + (
                    f"mean density {mean:.3f} over {len(r['densities'])} layers"
                    if mean is not None
                    else "no density"
                )
                + f"; dense layer calls: {dense}"
            )
        return "\n".join(lines)

    def disable(self) -> None:
        if any(s.active for s in self.states.values()):
            disable_sparse_attention(self.target)

    def __enter__(self) -> SparseAttentionHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disable()

    def __repr__(self) -> str:
        return (
            f"SparseAttentionHandle({', '.join(f'{n}: {s.plan.summary()}' for n, s in self.states.items())})"
        )


def enable_sparse_attention(
    pipe_or_transformer: Any,
    plan: Any = None,
    *,
    config: SparseAttentionConfig | None = None,
    **overrides: Any,
) -> SparseAttentionHandle:
    """Replace the self-attention of every supported transformer of a pipeline by sparse attention.

    Args:
        pipe_or_transformer: a diffusers ``DiffusionPipeline`` (all ``transformer*`` components) or a
            transformer model. The step index comes from diffusers' ``cache_context`` when the pipeline
            gives one, else from the timestep of each call (a new generation starts when it goes up);
            see :class:`sparsediff.hooks.TransformerState`. The scheduler is never touched.
        plan: ``None`` (the family's training-free default), a pattern name applied to every head
            (``"radial"``, ``"tile"``, ``"topp"``, ...; keeps the family's warm-up schedule), a path to a
            plan JSON, a plan folder (``sparsediff finetune --out DIR``: its plan, and its LoRA adapter
            is loaded into the ``transformer`` component through diffusers' ``load_lora_adapter`` as
            ``"sparsediff"`` and deleted again on disable), a :class:`~sparsediff.Plan`, or a dict
            ``{component name: any of these}``.
        config: a :class:`~sparsediff.SparseAttentionConfig`; ``overrides`` set its fields
            (``dense_steps=0.2``, ``strict=True``, ``backend="reference"``...).

    Raises:
        RuntimeError: already enabled (disable first). UnsupportedModelError: no adapter for the
        transformer (the message lists the supported classes). PlanMismatchError / PlanError: the plan
        does not fit the model / is malformed. Nothing is modified when it raises.
    """
    config = config or SparseAttentionConfig()
    if overrides:
        config = config.updated(**overrides)
    found, pipeline = _transformers(pipe_or_transformer)
    for n, t in found:
        if get_state(t) is not None:
            raise RuntimeError(
                f"sparse attention is already enabled on {n} ({type(t).__name__}); call disable_sparse_attention() first"
            )
    from .pipelines.base import get_adapter

    prepared = []
    for n, t in found:
        adapter = get_adapter(t)
        p = plan.get(n) if isinstance(plan, Mapping) else plan
        resolved = resolve_plan(p, adapter).with_overrides(
            dense_steps=config.dense_steps,
            dense_layers=config.dense_layers,
            min_tokens=config.min_tokens,
            pattern_params=config.pattern_params,
        )
        resolved.validate_for(t, check_config=config.check_config)
        prepared.append((n, t, adapter, resolved, _folder_adapter(n, t, p)))
    if isinstance(plan, Mapping):
        unknown = set(plan) - {n for n, *_ in prepared}
        if unknown:
            raise ValueError(
                f"plan names unknown component(s) {sorted(unknown)}; transformers: {[n for n, _ in found]}"
            )

    states: dict[str, TransformerState] = {}
    loaded: list[torch.nn.Module] = []
    try:
        for n, t, adapter, resolved, weights in prepared:
            if weights is not None:
                _load_folder_adapter(t, weights)
                loaded.append(t)
            states[n] = apply_sparse_attention(t, resolved, config, adapter=adapter, pipeline=pipeline)
            if weights is not None:
                states[n].loaded_adapters.append(ADAPTER_NAME)
    except BaseException:
        for n, t, *_ in prepared:
            if n in states:
                remove_sparse_attention(t)
        for t in loaded:
            t.delete_adapters(ADAPTER_NAME)
        raise
    for n, s in states.items():
        logger.info(
            "sparsediff: sparse attention enabled on %s (%s, adapter %r, %d self-attention layers): %s",
            n,
            s.transformer_class,
            s.adapter.name,
            len(s.layers),
            s.plan.summary(),
        )
    return SparseAttentionHandle(pipe_or_transformer, states)


def disable_sparse_attention(pipe_or_transformer: Any) -> None:
    """Restore the original attention processors and hooks (bit-identical outputs).

    Raises ``RuntimeError`` when sparse attention is not enabled.
    """
    found, _ = _transformers(pipe_or_transformer)
    enabled = [(n, t) for n, t in found if get_state(t) is not None]
    if not enabled:
        raise RuntimeError(f"sparse attention is not enabled on {type(pipe_or_transformer).__name__}")
    for n, t in enabled:
        adapters = list(get_state(t).loaded_adapters)
        remove_sparse_attention(t)
        if adapters:
            t.delete_adapters(adapters)
        logger.info("sparsediff: sparse attention disabled on %s", n)


def is_sparse_attention_enabled(pipe_or_transformer: Any) -> bool:
    try:
        found, _ = _transformers(pipe_or_transformer)
    except (TypeError, ValueError):
        return False
    return any(get_state(t) is not None for _, t in found)


@contextlib.contextmanager
def sparse_attention_enabled(
    pipe_or_transformer: Any, plan: Any = None, **overrides: Any
) -> Iterator[SparseAttentionHandle]:
    """``with sparse_attention_enabled(pipe, plan): ...`` -- enabled inside, disabled after (even on error)."""
    handle = enable_sparse_attention(pipe_or_transformer, plan, **overrides)
    try:
        yield handle
    finally:
        handle.disable()


# ---------------------------------------------------------------------- DiffusionPipeline methods
def _pipe_enable(self, plan: Any = None, *, config: SparseAttentionConfig | None = None, **overrides: Any):
    """Enable sparsediff sparse attention on this pipeline (see :func:`sparsediff.enable_sparse_attention`)."""
    return enable_sparse_attention(self, plan, config=config, **overrides)


def _pipe_disable(self) -> None:
    """Disable sparsediff sparse attention (see :func:`sparsediff.disable_sparse_attention`)."""
    disable_sparse_attention(self)


def install_pipeline_methods() -> None:
    """Add ``enable_sparse_attention`` / ``disable_sparse_attention`` to ``diffusers.DiffusionPipeline``
    (idempotent; an existing attribute of another origin is left alone, with a warning)."""
    from diffusers import DiffusionPipeline

    for name, fn in (("enable_sparse_attention", _pipe_enable), ("disable_sparse_attention", _pipe_disable)):
        cur = DiffusionPipeline.__dict__.get(name)
        if cur is None:
            setattr(DiffusionPipeline, name, fn)
        elif cur is not fn:
            logger.warning("sparsediff: DiffusionPipeline.%s already exists; not replacing it", name)


install_pipeline_methods()
