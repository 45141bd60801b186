"""Profiling a pipeline for the search, and turning the statistics into a plan.

:func:`profile_pipeline` enables an all-dense plan with an ``observer``
(:attr:`sparsediff.SparseAttentionConfig.observer`): generation is exactly dense, and at the chosen steps
every self-attention call of the ``transformer`` component feeds a
:class:`~sparsediff.search.LayerAccumulator` per (layer, CFG branch, call within the forward).
Consecutive profiled steps of one prompt feed the cross-step families. After each prompt the
accumulators' statistics are summed per layer into a :class:`SearchStats` -- averaged over prompts,
steps, CFG branches and batch -- which can be saved, loaded and merged (``--stats``), so a long search
resumes and processes can be combined.

:func:`plan_from_stats` selects per head (global budget, :func:`~sparsediff.search.select_global`) and
writes a :class:`~sparsediff.Plan` with the measured error / density per head in ``stats``.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..layout import TokenLayout
from ..patterns.registry import get_family
from ..plan import Plan, layout_from_dict, layout_to_dict
from ..specs import DenseSchedule, HeadSpec
from .candidates import default_candidates, family
from .core import LayerSearch, layer_search
from .cost import CostModel
from .evaluate import LayerAccumulator, LayerStats
from .select import GlobalChoice, select_global

logger = logging.getLogger(__name__)

__all__ = ["SearchStats", "profile_pipeline", "default_profile_steps", "plan_from_stats", "SearchReport"]

STATS_FORMAT = "sparsediff-search-stats"
STATS_VERSION = 1


# ---------------------------------------------------------------------- statistics container
@dataclass
class SearchStats:
    """Per-layer :class:`LayerStats` of one transformer plus run metadata.

    Attributes:
        layers: ``{self-attention layer index: LayerStats}``.
        meta: ``num_steps``, ``profile_steps``, ``prompts`` (count), ``block_size``, ``num_rows``, ``seed``,
            ``pipeline_seconds`` / ``observer_seconds`` / ``transformer_calls`` (for the whole-step
            speedup), ``transformer_class``, ``batch`` (samples per transformer call).
    """

    layers: dict[int, LayerStats] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    _SUMMED = ("prompts", "pipeline_seconds", "observer_seconds", "transformer_calls")
    _SAME = ("num_steps", "profile_steps", "block_size", "num_rows", "seed", "transformer_class", "batch")

    def merge(self, other: SearchStats) -> SearchStats:
        """Statistics of both runs (same model, settings and candidates); a new object."""
        for k in self._SAME:
            a, b = self.meta.get(k), other.meta.get(k)
            if a is not None and b is not None and a != b:
                raise ValueError(f"cannot merge search statistics with different {k}: {a!r} vs {b!r}")
        layers = dict(self.layers)
        for i, s in other.layers.items():
            layers[i] = layers[i].merge(s) if i in layers else s
        meta = {**other.meta, **self.meta}
        for k in self._SUMMED:
            meta[k] = self.meta.get(k, 0) + other.meta.get(k, 0)
        return SearchStats(layers, meta)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        def layer(s: LayerStats) -> dict[str, Any]:
            return {
                "candidates": [c.to_dict() for c in s.candidates],
                "layout": layout_to_dict(s.layout),
                "head_dim": s.head_dim,
                "err": s.err.tolist(),
                "recall": s.recall.tolist(),
                "density": s.density.tolist(),
                "count": s.count.tolist(),
                "calls": s.calls,
                "dense_seconds": s.dense_seconds,
                "timed_calls": s.timed_calls,
                "lse_exact": s.lse_exact,
            }

        return {
            "format": STATS_FORMAT,
            "version": STATS_VERSION,
            "meta": self.meta,
            "layers": {str(i): layer(s) for i, s in sorted(self.layers.items())},
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON atomically (replacing an existing file: statistics files are meant to be updated)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict()), encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchStats:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"statistics file not found: {p}") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not a statistics file (invalid JSON: {e.msg})") from None
        return cls.from_dict(d, source=str(p))

    @classmethod
    def from_dict(cls, d: Any, source: str = "statistics") -> SearchStats:
        """The inverse of :meth:`to_dict` (exact: float64 sums round-trip through Python floats)."""
        if not isinstance(d, Mapping) or d.get("format") != STATS_FORMAT:
            raise ValueError(f"{source}: not a sparsediff search statistics file")
        if d.get("version") != STATS_VERSION:
            raise ValueError(
                f"{source}: statistics version {d.get('version')!r}, this sparsediff reads {STATS_VERSION}"
            )
        layers = {}
        for i, s in d["layers"].items():
            t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
            layers[int(i)] = LayerStats(
                tuple(HeadSpec.from_dict(c) for c in s["candidates"]),
                layout_from_dict(s["layout"]),
                int(s["head_dim"]),
                t(s["err"]),
                t(s["recall"]),
                t(s["density"]),
                t(s["count"]),
                int(s["calls"]),
                float(s["dense_seconds"]),
                int(s["timed_calls"]),
                s.get("lse_exact"),
            )
        return cls(layers, dict(d.get("meta") or {}))


# ---------------------------------------------------------------------- profiling
def default_profile_steps(num_steps: int, warmup: int | float = 0.25, count: int = 4) -> tuple[int, ...]:
    """``count`` steps spread evenly over ``[warm-up end, num_steps)`` (at least two, when there are two
    steps at all: the cross-step families need a pair). ``warmup``: int steps or a fraction."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    w = int(math.ceil(warmup * num_steps)) if isinstance(warmup, float) else int(warmup)
    w = min(w, max(0, num_steps - 2))
    avail = list(range(w, num_steps))
    if len(avail) <= count:
        return tuple(avail)
    idx = sorted({round(i * (len(avail) - 1) / (count - 1)) for i in range(count)})
    return tuple(avail[i] for i in idx)


def _gap(steps: Sequence[int]) -> int:
    d = [b - a for a, b in zip(steps, steps[1:])]
    return max(1, min(d)) if d else 1


def _with_refresh(spec: HeadSpec, gap: int) -> HeadSpec:
    """``spec`` with its family's refresh parameter (if it names one) set to ``gap`` steps."""
    name = get_family(spec.pattern).refresh_param
    if name is None:
        return spec
    return HeadSpec.make(spec.pattern, **{**dict(spec.params), name: gap})


def profile_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    *,
    call_kwargs: Mapping[str, Any] | None = None,
    num_steps: int | None = None,
    profile_steps: Sequence[int] | None = None,
    candidates: Sequence[HeadSpec] | None = None,
    families: Sequence[str] | None = None,
    remainder: bool = False,
    block_size: int = 64,
    num_rows: int = 512,
    seed: int = 0,
    stats: SearchStats | None = None,
    progress: Callable[[int], None] | None = None,
    time_attention: bool = True,
) -> SearchStats:
    """Run ``pipe`` densely on every prompt and measure the candidates at ``profile_steps``.

    Args:
        pipe: a diffusers pipeline with a ``transformer`` component supported by sparsediff.
        prompts: one generation per prompt (same seed for each).
        call_kwargs: extra pipeline call arguments (height, width, num_frames, guidance_scale...);
            ``num_inference_steps`` is set from ``num_steps``.
        num_steps: denoising steps (default: ``call_kwargs["num_inference_steps"]``, else 50).
        profile_steps: step indices to measure (default :func:`default_profile_steps`).
        candidates / families: candidate specs (default grid per layout; cross-step heads whose family
            names a ``refresh_param`` -- ``lse_cache``'s ``refresh`` -- get it set to the profiled step gap),
            optionally restricted to these families.
        remainder: with the default grid, also measure every family's ``remainder="pooled"`` variant
            (:func:`~sparsediff.search.default_candidates`).
        block_size, num_rows, seed: the measurement (:class:`LayerAccumulator`).
        stats: statistics to add to (``--stats`` resume).
        progress: called with 1 after every measured attention call (tqdm's ``update``).
        time_attention: time dense SDPA once per layer and prompt (for the whole-step speedup).

    Returns the merged :class:`SearchStats` (a new object).
    """
    from ..api import enable_sparse_attention
    from ..pipelines.base import get_adapter

    if not prompts:
        raise ValueError("no prompts to profile")
    comps = getattr(pipe, "components", {}) or {}
    transformer = comps.get("transformer")
    if not isinstance(transformer, torch.nn.Module):
        raise TypeError(f"{type(pipe).__name__} has no 'transformer' component to profile")
    get_adapter(transformer)  # UnsupportedModelError with the supported classes
    kw = dict(call_kwargs or {})
    steps = int(num_steps or kw.get("num_inference_steps") or 50)
    kw["num_inference_steps"] = steps
    psteps = tuple(sorted(set(profile_steps))) if profile_steps else default_profile_steps(steps)
    bad = [s for s in psteps if not 0 <= s < steps]
    if bad:
        raise ValueError(f"profile steps {bad} are outside 0..{steps - 1}")
    gap = _gap(psteps)
    pset = set(psteps)
    accs: dict[tuple[int, int, int], LayerAccumulator] = {}
    cand_cache: dict[TokenLayout, tuple[HeadSpec, ...]] = {}
    timed: set[int] = set()
    dense_time: dict[int, list[float]] = {}
    seen_calls: set[tuple[int, int]] = set()
    obs_time = [0.0]
    batch: list[int] = []  # samples per transformer call (2 when CFG runs its branches in one batch)

    def cands_for(layout: TokenLayout) -> tuple[HeadSpec, ...]:
        c = cand_cache.get(layout)
        if c is None:
            base = (
                list(candidates)
                if candidates is not None
                else default_candidates(layout, block_size, remainder=remainder)
            )
            if candidates is None:  # cross-step heads refresh at the profiled step gap (as measured)
                base = [_with_refresh(s, gap) for s in base]
            if families:
                base = [s for s in base if family(s) in families or s.pattern == "dense"]
            c = cand_cache[layout] = tuple(dict.fromkeys(base))
        return c

    def observer(call) -> None:
        if call.step not in pset:
            return
        t0 = time.perf_counter()
        key = (call.layer, call.branch, call.call_index)
        acc = accs.get(key)
        if acc is None:
            acc = accs[key] = LayerAccumulator(
                cands_for(call.layout), block_size=block_size, num_rows=num_rows, seed=seed
            )
        acc.add(call.query, call.key, call.value, call.layout, scale=call.scale)
        if not batch:
            batch.append(int(call.query.shape[0]))
        if call.layer == 0:
            seen_calls.add((call.step, call.branch))
        if time_attention and call.layer not in timed:
            timed.add(call.layer)
            with torch.no_grad():
                sdpa = torch.nn.functional.scaled_dot_product_attention
                q, k, v = call.query, call.key, call.value
                sdpa(q, k, v, scale=call.scale)
                _sync(q.device)
                t1 = time.perf_counter()
                sdpa(q, k, v, scale=call.scale)
                _sync(q.device)
                dense_time.setdefault(call.layer, []).append(time.perf_counter() - t1)
        if progress is not None:
            progress(1)
        obs_time[0] += time.perf_counter() - t0

    result = stats if stats is not None else SearchStats()
    for prompt in prompts:
        for a in accs.values():
            a.new_sequence()
        timed.clear()
        seen_calls.clear()
        obs_time[0] = 0.0
        handle = enable_sparse_attention(pipe, Plan.dense(), observer=observer)
        try:
            gen = torch.Generator(device="cpu").manual_seed(seed)
            t0 = time.perf_counter()
            with torch.no_grad():
                pipe(prompt=prompt, generator=gen, **_accepted(pipe, kw))
            wall = time.perf_counter() - t0
        finally:
            handle.disable()
        per_layer: dict[int, LayerStats] = {}
        for (layer, _b, _c), acc in accs.items():
            if acc.stats is None:
                continue
            per_layer[layer] = per_layer[layer].merge(acc.stats) if layer in per_layer else acc.stats
            acc.stats = None  # streaming: this prompt's sums move into the result
        for layer, ts in dense_time.items():
            if layer in per_layer:
                per_layer[layer].dense_seconds += sum(ts)
                per_layer[layer].timed_calls += len(ts)
        dense_time.clear()
        run = SearchStats(
            per_layer,
            {
                "num_steps": steps,
                "profile_steps": list(psteps),
                "block_size": block_size,
                "num_rows": num_rows,
                "seed": seed,
                "transformer_class": type(transformer).__name__,
                "prompts": 1,
                "pipeline_seconds": wall,
                "observer_seconds": obs_time[0],
                "transformer_calls": _transformer_calls(seen_calls, steps, len(psteps)),
                "batch": batch[0] if batch else None,
            },
        )
        result = result.merge(run)
    if not result.layers:
        raise RuntimeError(
            "no self-attention call was observed at the profile steps: the pipeline did not run the "
            "transformer's attention through sparsediff (check the adapter / layout)"
        )
    return result


def _transformer_calls(seen: set[tuple[int, int]], steps: int, profiled: int) -> int:
    """Transformer calls of one generation: branches per step (from the profiled steps) x steps."""
    if not seen or not profiled:
        return steps
    branches = max(1, round(len(seen) / profiled))
    return branches * steps


def _sync(d: torch.device) -> None:
    if d.type == "cuda":
        torch.cuda.synchronize(d)


def _accepted(pipe: Any, kw: Mapping[str, Any]) -> dict[str, Any]:
    """The call kwargs the pipeline's ``__call__`` accepts (None values dropped; others refused loudly)."""
    params = inspect.signature(pipe.__call__).parameters
    has_var = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    out = {}
    for k, v in kw.items():
        if v is None:
            continue
        if k not in params and not has_var:
            raise TypeError(f"{type(pipe).__name__}.__call__ has no argument {k!r}")
        out[k] = v
    return out


# ---------------------------------------------------------------------- plan
@dataclass
class SearchReport:
    """What :func:`plan_from_stats` decided: per layer :class:`LayerSearch` (dense layers: None), the
    global choice, predicted speedups."""

    layers: dict[int, LayerSearch | None]
    choice: GlobalChoice
    attention_speedup: float
    step_speedup: float | None
    attention_fraction: float | None

    def format(self) -> str:
        lines = [f"{'layer':>5}  {'density':>7}  {'error':>7}  {'speedup':>7}  patterns"]
        for i, ls in sorted(self.layers.items()):
            if ls is None:
                lines.append(f"{i:>5}  {1.0:7.3f}  {0.0:7.4f}  {1.0:7.2f}  dense (schedule)")
                continue
            counts = ", ".join(
                f"{k} {v}" for k, v in sorted(ls.family_counts().items(), key=lambda kv: -kv[1])
            )
            pooled = sum(1 for sp in ls.specs if sp.remainder == "pooled")
            if pooled:
                counts += f" ({pooled} with pooled remainder)"
            lines.append(
                f"{i:>5}  {float(ls.density.mean()):7.3f}  {float(ls.error.mean()):7.4f}  "
                f"{ls.attention_speedup:7.2f}  {counts}"
            )
        lines.append(self.choice.message)
        step = (
            f"{self.step_speedup:.2f}x (attention {self.attention_fraction:.0%} of a dense step, measured)"
            if self.step_speedup is not None
            else "n/a (attention not timed)"
        )
        lines.append(
            f"predicted attention speedup {self.attention_speedup:.2f}x; whole-step speedup {step} "
            "(cost model, the sparse steps' masks alone; the replay below prices the plan as written)"
        )
        return "\n".join(lines)


def _budget_density(ls: LayerSearch, cm: CostModel) -> torch.Tensor:
    """The densities a ``--density`` budget counts: a ``remainder="pooled"`` candidate computes no extra
    blocks but is not free, so its pooled part counts as the density of the same predicted time
    (:meth:`CostModel.pooled_remainder_cost` / :meth:`CostModel.dense_cost`)."""
    dens = ls.table["density"]
    pooled = [c for c, s in enumerate(ls.candidates) if s.remainder == "pooled"]
    if not pooled:
        return dens
    extra = cm.pooled_remainder_cost(ls.layout) / max(cm.dense_cost(ls.layout), 1e-30)
    dens = dens.clone()
    dens[:, pooled] += extra
    return dens


def plan_from_stats(
    stats: SearchStats,
    transformer: torch.nn.Module,
    *,
    target_error: float | None = None,
    density: float | None = None,
    cost_model: CostModel | None = None,
    schedule: DenseSchedule | None = None,
    min_tokens: int = 0,
) -> tuple[Plan, SearchReport]:
    """Global-budget selection over all measured layers -> a per-head :class:`Plan` and a report.

    Layers the ``schedule`` keeps dense (``dense_layers``) get dense heads and are left out of the budget.
    Layers never measured (no call at the profile steps) are dense. ``refresh_steps`` of the plan: every
    profiled-step gap after the warm-up, when a cross-step head is chosen.
    """
    from ..plan import ModelIdentity

    ident = ModelIdentity.of(transformer)
    schedule = schedule or DenseSchedule()
    sel = {i: s for i, s in stats.layers.items() if i not in schedule.dense_layers}
    if not sel:
        raise ValueError("no measured layer to select patterns for")
    order = sorted(sel)
    any_stats = next(iter(sel.values()))
    cm = cost_model or CostModel.default(
        "cpu", head_dim=any_stats.head_dim, block_size=int(stats.meta.get("block_size", 64))
    )
    searches = {}
    for i in order:
        cmi = cm if cm.head_dim == sel[i].head_dim else replace(cm, head_dim=sel[i].head_dim)
        searches[i] = layer_search(
            sel[i], target_error=target_error if target_error is not None else 1.0, cost_model=cmi
        )
    g = select_global(
        [searches[i].table["error"] for i in order],
        [_budget_density(searches[i], replace(cm, head_dim=sel[i].head_dim)) for i in order],
        [searches[i].table["cost"] for i in order],
        target_error=target_error,
        density=density,
    )
    layers: dict[int, LayerSearch | None] = {}
    specs_all: list[tuple[HeadSpec, ...]] = []
    stats_all: list[tuple[dict[str, Any], ...]] = []
    for li, h in enumerate(ident.num_heads):
        if li in searches:
            ch = g.choices[order.index(li)]
            cmi = cm if cm.head_dim == sel[li].head_dim else replace(cm, head_dim=sel[li].head_dim)
            ls = layer_search(
                sel[li],
                target_error=target_error if target_error is not None else 1.0,
                cost_model=cmi,
                choice=ch,
            )
            layers[li] = ls
            specs_all.append(ls.specs)
            stats_all.append(
                tuple(
                    {"error": round(float(e), 6), "density": round(float(d), 6), "recall": round(float(r), 6)}
                    for e, d, r in zip(ls.error, ls.density, ls.recall)
                )
            )
        else:
            layers[li] = None
            specs_all.append((HeadSpec("dense"),) * h)
            stats_all.append(tuple({"error": 0.0, "density": 1.0, "recall": 1.0} for _ in range(h)))
    dense_total = sum(ls.dense_cost * ls.num_heads for ls in layers.values() if ls is not None)
    chosen_total = sum(float(ls.cost.sum()) for ls in layers.values() if ls is not None)
    n_dense_layers = sum(1 for ls in layers.values() if ls is None)
    per_layer_dense = dense_total / max(1, len(searches))
    attn_speedup = (dense_total + n_dense_layers * per_layer_dense) / max(
        chosen_total + n_dense_layers * per_layer_dense, 1e-30
    )
    frac = attention_fraction(stats, len(ident.num_heads))
    step_speedup = None if frac is None else 1.0 / ((1.0 - frac) + frac / attn_speedup)
    steps = int(stats.meta.get("num_steps") or 0)
    psteps = list(stats.meta.get("profile_steps") or [])
    cross = any(s.is_cross_step for row in specs_all for s in row)
    refresh: tuple[int, ...] = ()
    if cross and steps and psteps:
        gap = _gap(psteps)
        warm = schedule.num_dense_steps(steps)
        refresh = tuple(range(warm + gap, steps, gap))
    layout = any_stats.layout
    if layout is not None:
        # the family's token threshold is for training-free defaults; a searched plan measured its heads at
        # this size and must engage there
        min_tokens = min(min_tokens, layout.num_tokens)
    plan = Plan(
        layers=tuple(specs_all),
        model=ident,
        schedule=schedule,
        refresh_steps=refresh,
        min_tokens=min_tokens,
        layout=layout,
        stats=tuple(stats_all),
        meta={
            "search": {
                "target_error": target_error,
                "density": density,
                "budget_met": g.met,
                "message": g.message,
                "mean_error": g.mean_error,
                "mean_density": g.mean_density,
                "predicted_attention_speedup": attn_speedup,
                "predicted_step_speedup": step_speedup,
                "cost_model": cm.to_dict(),
                "lse_cache_measurement": "exact"
                if all(s.lse_exact is not False for s in sel.values())
                else "per-row approximation",
                **{
                    k: stats.meta.get(k)
                    for k in ("num_steps", "profile_steps", "prompts", "num_rows", "seed")
                },
            }
        },
    )
    return plan, SearchReport(layers, g, attn_speedup, step_speedup, frac)


def attention_fraction(stats: SearchStats, num_layers: int) -> float | None:
    """Measured share of dense self-attention in a transformer call: (mean timed SDPA per layer x layers)
    / (generation time without the observer / transformer calls). Upper-bounded by 0.99."""
    timed = [s for s in stats.layers.values() if s.timed_calls]
    calls = stats.meta.get("transformer_calls") or 0
    wall = (stats.meta.get("pipeline_seconds") or 0.0) - (stats.meta.get("observer_seconds") or 0.0)
    if not timed or calls <= 0 or wall <= 0:
        return None
    per_layer = sum(s.dense_seconds / s.timed_calls for s in timed) / len(timed)
    per_call = wall / calls
    return min(0.99, per_layer * num_layers / per_call)
