"""Price a whole plan by running what the op really does, on this device, at the model's shapes.

The per-head :class:`~sparsediff.search.cost.CostModel` ranks candidates inside the search; it cannot see
what one *layer call* of the op costs as a whole: how many fused calls its rows need (one per distinct
key-block count on the CPU twin), gathers, token permutations, top-p scoring, LSE refreshes and the fixed
cost of a call. Those terms depend on the implementation and the device, and they decided the difference
between predicted and measured speed (on the embedded model the old prediction said 1.14x where
``sparsediff compare`` measured 0.89x). :func:`price_plan` measures them instead of modelling them:

* for every self-attention layer it replays the denoising schedule through
  :func:`sparsediff.attention.sparse_attention` -- the function the hooks call -- on random ``q, k, v``
  of the layer's shape (diffusers' ``[B, N, H, D]`` memory layout), with the plan's warm-up steps, dense
  layers and refresh steps, its own :class:`~sparsediff.attention.LayerState` and mask cache, and times
  every call; and it times dense SDPA at the same shape (the baseline the dense pipeline runs);
* heads whose masks depend on the data (``topp``, ``reordered(select="topp")``, ``lse_cache``) select
  nearly uniformly on random inputs, so their threshold is replaced by the density the search measured
  for that head on the real model (on near-uniform scores a top-p / recall target of ``d`` keeps a
  fraction ~``d`` of the blocks): the replayed call then has the real call's density and the same
  selection work;
* static heads (``radial``, ``tile``, ``reordered`` static) build exactly the masks the model will use.

The whole-step prediction combines that with the dense step's measured attention share ``a`` (from the
search's profiling run): ``t_sparse / t_dense = (1 - a) + a * T_sparse / T_dense`` where ``T`` sums the
layers' attention over all steps of a generation (warm-up steps included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..layout import TokenLayout
from ..plan import Plan
from ..specs import HeadSpec
from ..timing import time_call

__all__ = ["PlanPrice", "price_plan", "pricing_spec"]

#: (family, parameter) whose value sets a data-dependent head's density.
_DENSITY_PARAMS = {"topp": "top_p", "lse_cache": "recall"}


def pricing_spec(spec: HeadSpec, density: float | None) -> HeadSpec:
    """The spec to replay ``spec`` with on random inputs: data-dependent heads get their threshold set to
    the measured ``density`` (so random inputs select about that fraction of blocks); others unchanged."""
    if density is None or not math.isfinite(density):
        return spec
    d = float(min(1.0, max(0.0, density)))
    name = _DENSITY_PARAMS.get(spec.pattern)
    if spec.pattern == "reordered" and spec.get("select") == "topp":
        name = "top_p"
    if name is None:
        return spec
    params = {**dict(spec.params), name: d}
    if "min_frac" in dict(spec.normalized().params):
        params["min_frac"] = min(float(spec.get("min_frac")), d)
    return HeadSpec.make(spec.pattern, **params)


@dataclass
class PlanPrice:
    """Measured attention time of one generation's self-attention under a plan and densely.

    Attributes:
        sparse_seconds: ``{layer: seconds}`` of all steps of one transformer call sequence (one CFG
            branch) under the plan (warm-up, refresh and sparse steps as scheduled).
        dense_seconds: ``{layer: seconds}`` of the same steps with dense SDPA.
        num_steps, device, shape: what was replayed (``shape`` = ``(B, N, H, D)``).
    """

    sparse_seconds: dict[int, float]
    dense_seconds: dict[int, float]
    num_steps: int
    device: str
    shape: tuple[int, int, int, int]
    per_step: dict[int, list[float]] = field(default_factory=dict, repr=False)

    @property
    def attention_speedup(self) -> float:
        """Dense over planned self-attention time, all layers and steps."""
        return sum(self.dense_seconds.values()) / max(sum(self.sparse_seconds.values()), 1e-12)

    def step_time_ratio(self, attention_fraction: float) -> float:
        """Predicted ``t_sparse / t_dense`` of a denoising step (averaged over the generation), given the
        measured share of self-attention in a dense step."""
        a = float(min(max(attention_fraction, 0.0), 1.0))
        return (1.0 - a) + a / self.attention_speedup

    def step_speedup(self, attention_fraction: float) -> float:
        return 1.0 / self.step_time_ratio(attention_fraction)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sparse_seconds": {str(k): v for k, v in sorted(self.sparse_seconds.items())},
            "dense_seconds": {str(k): v for k, v in sorted(self.dense_seconds.items())},
            "attention_speedup": self.attention_speedup,
            "num_steps": self.num_steps,
            "device": self.device,
            "shape": list(self.shape),
        }


def _replay_layer(
    qkv: tuple[torch.Tensor, ...],
    layout: TokenLayout,
    specs: tuple[HeadSpec, ...],
    plan: Plan,
    layer: int,
    num_steps: int,
    t_dense: float,
    dev: torch.device,
    block_size: int | None,
    backend: str,
) -> list[float]:
    """Seconds of each step's call of one layer, scheduled as the hooks would (see :func:`price_plan`)."""
    from ..attention import LayerState, MaskCache, seeds_remainder, sparse_attention

    q, k, v = qkv
    cross_step = any(s.is_cross_step for s in specs)
    seeds = seeds_remainder(specs) and layer not in plan.schedule.dense_layers
    cache = MaskCache()

    def call(state: LayerState, step: int, force: bool) -> None:
        sparse_attention(
            q, k, v, layout, specs, state, step=step, force_dense=force,
            block_size=block_size, cache=cache, backend=backend,
        )  # fmt: skip

    call(LayerState(), 0, False)  # untimed: first mask build, allocator, lazy imports
    state = LayerState()
    times = []
    for step in range(num_steps):
        force = plan.schedule.is_dense(step, num_steps, layer)
        seed = seeds and force and not plan.schedule.is_dense(step + 1, num_steps, layer)
        if force and not cross_step and not seed:
            times.append(t_dense)  # the hooks hand warm-up calls to the model's own dense SDPA
            continue  # (but the last one of a layer with remainder="cached" heads, which seeds them)
        force = force or (cross_step and step in plan.refresh_steps)
        times.append(time_call(lambda st=step, f=force: call(state, st, f), dev))
    return times


def price_plan(
    plan: Plan,
    layout: TokenLayout,
    *,
    num_heads: int | Mapping[int, int],
    head_dim: int,
    num_layers: int,
    num_steps: int,
    batch: int = 1,
    densities: Mapping[int, Any] | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    block_size: int | None = None,
    backend: str = "auto",
    seed: int = 0,
) -> PlanPrice:
    """Replay one generation's self-attention under ``plan`` and densely; see the module docstring.

    Args:
        plan: the plan to price (any: searched, uniform family default, dense).
        layout: the token layout of the self-attention calls (the generation's size).
        num_heads: heads per layer (an int, or ``{layer: heads}``); head_dim, num_layers: the model's.
        num_steps: denoising steps of a generation (the schedule's fractions and refresh steps use it).
        batch: samples per transformer call (1 when CFG runs its branches as separate calls).
        densities: ``{layer: [density per head]}`` measured by the search, for data-dependent heads
            (default: the plan's own per-head ``stats``; heads without one keep their threshold).
        device, dtype, block_size, backend: what the op runs with (as the hooks would).

    Returns a :class:`PlanPrice`. Random inputs: the time does not depend on the values, only on the
    masks, which are the plan's (static heads) or of the measured density (data-dependent heads).
    """
    dev = torch.device(device)
    N = layout.num_tokens
    if densities is None and plan.stats is not None:
        densities = {i: [h.get("density") for h in row] for i, row in enumerate(plan.stats)}
    g = torch.Generator().manual_seed(seed)
    sparse_s: dict[int, float] = {}
    dense_s: dict[int, float] = {}
    per_step: dict[int, list[float]] = {}
    tensors: dict[int, tuple[torch.Tensor, ...]] = {}
    dense_call: dict[int, float] = {}

    def qkv(h: int) -> tuple[torch.Tensor, ...]:
        if h not in tensors:
            tensors[h] = tuple(
                torch.randn(batch, N, h, head_dim, generator=g).to(dev, dtype).transpose(1, 2)
                for _ in range(3)
            )
        return tensors[h]

    def sdpa_time(h: int) -> float:
        if h not in dense_call:
            q, k, v = qkv(h)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            with torch.no_grad():
                sdpa(q, k, v)
                dense_call[h] = min(time_call(lambda: sdpa(q, k, v), dev) for _ in range(3))
        return dense_call[h]

    below = N < plan.min_tokens
    with torch.no_grad():
        for layer in range(num_layers):
            h = num_heads[layer] if isinstance(num_heads, Mapping) else int(num_heads)
            t_dense = sdpa_time(h)
            dense_s[layer] = t_dense * num_steps
            specs = plan.head_specs(layer, h)
            if below or layer in plan.schedule.dense_layers or all(s.pattern == "dense" for s in specs):
                sparse_s[layer] = dense_s[layer]
                continue
            dl = (densities or {}).get(layer) or [None] * h
            specs = tuple(pricing_spec(s, d) for s, d in zip(specs, dl))
            # two replays, the faster of each step's two calls (as the dense time is the best of three)
            runs = [
                _replay_layer(
                    qkv(h), layout, specs, plan, layer, num_steps, t_dense, dev, block_size, backend
                )
                for _ in range(2)
            ]
            times = [min(a, b) for a, b in zip(*runs)]
            sparse_s[layer] = sum(times)
            per_step[layer] = times
    heads = max(tensors) if tensors else 0
    return PlanPrice(sparse_s, dense_s, num_steps, str(dev), (batch, N, heads, head_dim), per_step)


def price_searched_plan(
    plan: Plan,
    stats: Any,
    transformer: torch.nn.Module,
    *,
    num_steps: int,
    device: torch.device | str = "cpu",
    block_size: int | None = None,
    backend: str = "auto",
    guard: bool = True,
) -> tuple[Plan, PlanPrice, list[str]]:
    """Price a plan the search just selected (:func:`price_plan` at the profiled layout and shapes), and
    with ``guard``, make dense every layer whose planned attention is not faster than dense SDPA on this
    device -- so the search never writes a layer (or a plan) that is slower than dense. Returns the plan (with the
    prediction in ``meta["search"]``), its price and the report lines."""
    from dataclasses import replace

    from ..plan import ModelIdentity
    from .profile import attention_fraction

    ident = ModelIdentity.of(transformer)
    any_layer = next(iter(stats.layers.values()))
    layout, head_dim = any_layer.layout, any_layer.head_dim
    heads = dict(enumerate(ident.num_heads))
    kw = dict(
        num_heads=heads,
        head_dim=head_dim,
        num_layers=len(heads),
        num_steps=num_steps,
        batch=int(stats.meta.get("batch") or 1),
        device=device,
        dtype=next(transformer.parameters()).dtype,
        block_size=block_size,
        backend=backend,
    )
    lines = []
    pp = price_plan(plan, layout, **kw)
    slow = sorted(
        i
        for i in pp.sparse_seconds
        if guard
        and i not in plan.schedule.dense_layers
        and pp.sparse_seconds[i] >= pp.dense_seconds[i] * 0.98
    )
    if slow:
        lines.append(
            f"layers {slow}: the planned attention is not faster than dense SDPA on {pp.device} "
            f"({', '.join(f'{pp.sparse_seconds[i]:.3f} s vs {pp.dense_seconds[i]:.3f} s' for i in slow)} per "
            "generation); they are made dense"
        )
        plan = plan.with_overrides(dense_layers=tuple(sorted({*plan.schedule.dense_layers, *slow})))
        pp = price_plan(plan, layout, **kw)
    frac = attention_fraction(stats, len(heads))
    step = None if frac is None else pp.step_speedup(frac)
    meta = dict(plan.meta)
    search = dict(meta.get("search") or {})
    search.pop("edited", None)  # priced as it is now
    search.update(
        {
            "predicted_attention_speedup": pp.attention_speedup,
            "predicted_step_speedup": step,
            "attention_fraction": frac,
            "prediction": f"replayed on {pp.device} (sparsediff.search.price)",
            "price": pp.to_dict(),
        }
    )
    meta["search"] = search
    plan = replace(plan, meta=meta)
    lines.append(
        f"replayed on {pp.device}: attention {pp.attention_speedup:.2f}x faster than dense SDPA over the "
        f"generation (warm-up included); predicted denoising-step speedup "
        + (
            "n/a (attention share not measured)"
            if step is None
            else f"{step:.2f}x (attention {frac:.0%} of a dense step)"
        )
    )
    return plan, pp, lines
