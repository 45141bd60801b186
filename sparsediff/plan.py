"""Plans: which sparse pattern every (layer, head) of one transformer runs, and when.

A :class:`Plan` is a versioned JSON document (never a pickle)::

    {
      "format": "sparsediff-plan", "version": 1,
      "model": {                                  # null: a generic plan that fits any model
        "transformer_class": "WanTransformer3DModel", "adapter": "wan",
        "num_layers": 30, "num_heads": [12, ...], "head_dim": [128, ...],
        "config_hash": "sha256:...", "config": {...}
      },
      "schedule": {"dense_steps": 0.25, "dense_layers": [0], "refresh_steps": []},   # 0.25: a fraction;
                                                  # an int (3) counts steps; 1.0 = every step dense
      "min_tokens": 0,                            # calls with fewer tokens run dense
      "default": {"pattern": "radial", "params": {}},   # every head not listed in "layers"
      "layers": [[{"pattern": ..., "params": {...}}, ...], ...] | null,   # per layer, per global head
      "stats": [[{"error": 0.01, "density": 0.2}, ...], ...] | null,      # search measurements (optional)
      "layout": {"segments": [...]} | null,       # the token layout the plan was searched for
      "meta": {...}                               # free-form (search settings, date, versions)
    }

Unknown keys anywhere except the free-form ``meta``, ``model.config`` and ``stats`` entries are rejected
(:class:`PlanError` naming the key and the allowed ones), as are head-spec parameter values outside their
range (the error names the head: ``layers[3][7]: pattern 'topp': parameter 'top_p' = 1.5 ...``).

Heads are indexed **globally** (``0 .. num_heads-1`` of the unsharded model); under context parallelism
each rank asks :meth:`Plan.head_specs` for its contiguous slice. Patterns are functions of the token
layout, so a plan searched at one resolution is re-derived at any other; a warning is logged when the
grid is far outside the searched one (more than :data:`RANGE_FACTOR` times larger or smaller).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .layout import Segment, TokenLayout
from .specs import PATTERN_PARAMS, DenseSchedule, HeadSpec

logger = logging.getLogger(__name__)

__all__ = ["Plan", "ModelIdentity", "PlanError", "PlanMismatchError", "PLAN_FORMAT", "PLAN_VERSION"]

PLAN_FORMAT = "sparsediff-plan"
PLAN_VERSION = 1
#: A plan used on a grid more than this factor larger/smaller (in tokens) than the searched one warns.
RANGE_FACTOR = 4.0
_CONFIG_SKIP = ("_name_or_path", "_diffusers_version", "_class_name", "_use_default_values")


class PlanError(ValueError):
    """A plan document is malformed (bad JSON, wrong format/version, bad field)."""


class PlanMismatchError(ValueError):
    """A plan does not fit the model it is applied to; the message lists every mismatch."""


# ---------------------------------------------------------------------- model identity
def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def _model_config(transformer: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(transformer, "config", None)
    if cfg is None:
        return {}
    return {k: _jsonable(v) for k, v in dict(cfg).items() if k not in _CONFIG_SKIP}


def _config_hash(cfg: Mapping[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ModelIdentity:
    """What a per-head plan was made for.

    Attributes:
        transformer_class: ``type(transformer).__name__``.
        adapter: adapter name (``"wan"``, ``"flux"``...).
        num_heads: heads of every self-attention layer, in layer order (``len`` = number of layers).
        head_dim: head dim of every layer.
        config_hash: hash of the transformer's config (private keys dropped).
        config: the config itself, so a mismatch can name the keys that differ.
    """

    transformer_class: str
    adapter: str
    num_heads: tuple[int, ...]
    head_dim: tuple[int, ...]
    config_hash: str = ""
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)

    @classmethod
    def of(cls, transformer: torch.nn.Module, adapter=None) -> ModelIdentity:
        """Read the identity of ``transformer`` (its adapter is looked up when not given)."""
        from .pipelines.base import get_adapter

        adapter = adapter or get_adapter(transformer)
        mods = adapter.attention_modules(transformer)
        heads = tuple(int(m.heads) for _, m in mods)
        dims = tuple(_head_dim(m) for _, m in mods)
        cfg = _model_config(transformer)
        return cls(type(transformer).__name__, adapter.name, heads, dims, _config_hash(cfg), cfg)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transformer_class": self.transformer_class,
            "adapter": self.adapter,
            "num_layers": self.num_layers,
            "num_heads": list(self.num_heads),
            "head_dim": list(self.head_dim),
            "config_hash": self.config_hash,
            "config": dict(self.config),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelIdentity:
        _require(d, ("transformer_class", "adapter", "num_heads", "head_dim"), "model")
        _reject_unknown(d, _MODEL_KEYS, "model")
        heads, dims = d["num_heads"], d["head_dim"]
        if isinstance(heads, int):
            heads = [heads] * int(d.get("num_layers", 0))
        if isinstance(dims, int):
            dims = [dims] * len(heads)
        if "num_layers" in d and int(d["num_layers"]) != len(heads):
            raise PlanError(
                f"model.num_layers={d['num_layers']} but model.num_heads lists {len(heads)} layers"
            )
        if len(dims) != len(heads):
            raise PlanError(f"model.head_dim lists {len(dims)} layers but model.num_heads lists {len(heads)}")
        return cls(
            str(d["transformer_class"]),
            str(d["adapter"]),
            tuple(int(h) for h in heads),
            tuple(int(x) for x in dims),
            str(d.get("config_hash", "")),
            dict(d.get("config") or {}),
        )


#: a plan folder (``sparsediff finetune --out DIR``): the plan, and maybe the LoRA adapter trained for it
PLAN_FILE = "sparse_plan.json"
#: diffusers' file name for pipeline-level LoRA weights (``LORA_WEIGHT_NAME_SAFE``)
ADAPTER_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
#: the name the folder's adapter gets inside the transformer (diffusers / peft adapter name)
ADAPTER_NAME = "sparsediff"


#: the card of a plan folder's adapter (``sparsediff finetune``): base model, base weights, metrics
ADAPTER_META_FILE = "finetune.json"


def _linear_weight(model: torch.nn.Module, name: str) -> torch.Tensor:
    module = model.get_submodule(name)
    module = getattr(module, "base_layer", module)  # peft-wrapped: the base weight, never the adapter's
    return module.weight.detach()


def _weight_summary(w: torch.Tensor, name: str) -> list[float]:
    """``[mean, std, probe]`` of a weight; ``probe`` is a signed sum over up to 4096 positions drawn from the
    layer's name (normalised to the weights' scale): any change of a few % of the weights moves it."""
    w = w.float().flatten()
    n = w.numel()
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    pos = torch.randint(n, (min(n, 4096),), generator=g)
    sign = torch.randint(2, (pos.numel(),), generator=g).float() * 2 - 1
    probe = float((w[pos.to(w.device)].cpu() * sign).sum()) / pos.numel() ** 0.5
    return [float(w.mean()), float(w.std()), probe]


def base_weights_fingerprint(model: torch.nn.Module, module_names: Sequence[str]) -> dict[str, list[float]]:
    """``{name: [mean, std, probe]}`` of the weights of the named linear layers (the ones an adapter adapts):
    enough to tell the base weights an adapter was trained on from other weights of the same architecture
    (a config hash cannot) -- a change of ~5 % of the weights' spread shows -- while the storage dtype
    (fp16/bf16/fp32) does not."""
    return {name: _weight_summary(_linear_weight(model, name), name) for name in module_names}


def base_weights_differences(
    recorded: Mapping[str, Sequence[float]], model: torch.nn.Module, rtol: float = 1e-2
) -> list[str]:
    """Layers whose weights differ from a :func:`base_weights_fingerprint` (mean, std or probe off by more
    than ``rtol`` times the weights' RMS), as readable lines; empty when they match."""
    diffs = []
    for name, rec in recorded.items():
        try:
            have = _weight_summary(_linear_weight(model, name), name)
        except AttributeError:  # get_submodule: no such module (or no weight)
            diffs.append(f"{name}: missing")
            continue
        mean, std = float(rec[0]), float(rec[1])
        tol = rtol * max((mean * mean + std * std) ** 0.5, 1e-12)
        if any(abs(a - float(b)) > tol for a, b in zip(have, rec)):
            diffs.append(
                f"{name}: std {have[1]:.6g} (trained on {std:.6g}), mean {have[0]:.3g} (trained on {mean:.3g})"
            )
    return diffs


def folder_base_differences(
    folder: str | os.PathLike, model: torch.nn.Module
) -> tuple[list[str], int] | None:
    """(differing layers, adapted layers) between the base weights a plan folder's adapter card
    (:data:`ADAPTER_META_FILE`) records and ``model``'s; None without a card that records them."""
    try:
        recorded = json.loads((Path(folder) / ADAPTER_META_FILE).read_text())["model"]["base_weights"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return base_weights_differences(recorded, model), len(recorded)


def adapter_layers(transformer: Any) -> list[Any]:
    """The peft LoRA layers of ``transformer`` that hold the :data:`ADAPTER_NAME` adapter (their ``scaling``
    dict has its entry); empty without it."""
    return [
        m
        for m in transformer.modules()
        if isinstance(getattr(m, "scaling", None), dict) and ADAPTER_NAME in m.scaling
    ]


def plan_folder_files(folder: str | os.PathLike) -> tuple[Path, Path | None]:
    """(plan file, adapter weights or None) of a plan folder; raises :class:`PlanError` without a plan."""
    folder = Path(folder)
    plan = folder / PLAN_FILE
    if not plan.is_file():
        raise PlanError(f"{folder}: a plan folder needs {PLAN_FILE} (it has no plan)")
    weights = folder / ADAPTER_WEIGHTS_FILE
    return plan, (weights if weights.is_file() else None)


def _head_dim(attn: torch.nn.Module) -> int:
    for name in ("head_dim", "dim_head"):
        v = getattr(attn, name, None)
        if isinstance(v, int):
            return v
    inner = getattr(attn, "inner_dim", None)
    if isinstance(inner, int) and attn.heads:
        return inner // int(attn.heads)
    q = getattr(attn, "to_q", None)
    if q is not None and hasattr(q, "out_features"):
        return q.out_features // int(attn.heads)
    return -1


def _require(d: Mapping[str, Any], keys: Sequence[str], where: str) -> None:
    if not isinstance(d, Mapping):
        raise PlanError(f"{where} must be a JSON object, got {type(d).__name__}")
    missing = [k for k in keys if k not in d]
    if missing:
        raise PlanError(f"{where} is missing key(s) {missing}")


#: Keys a plan document may hold (top level and nested objects); anything else is a :class:`PlanError`.
_PLAN_KEYS = (
    "format",
    "version",
    "model",
    "schedule",
    "min_tokens",
    "default",
    "layers",
    "stats",
    "layout",
    "meta",
)
_SCHEDULE_KEYS = ("dense_steps", "dense_layers", "refresh_steps")
_MODEL_KEYS = ("transformer_class", "adapter", "num_layers", "num_heads", "head_dim", "config_hash", "config")
_LAYOUT_KEYS = ("segments",)
_SEGMENT_KEYS = ("kind", "length", "grid")
_SPEC_KEYS = ("pattern", "params")


def _reject_unknown(d: Any, allowed: Sequence[str], where: str) -> None:
    """:class:`PlanError` when ``d`` is not an object or has keys outside ``allowed`` (typos)."""
    if not isinstance(d, Mapping):
        raise PlanError(f"{where} must be a JSON object, got {type(d).__name__}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise PlanError(f"{where}: unknown key(s) {unknown}; allowed keys are {list(allowed)}")


def _spec_from_dict(s: Any, where: str) -> HeadSpec:
    """A head spec of the plan document; errors name its place (``default``, ``layers[l][h]``)."""
    _reject_unknown(s, _SPEC_KEYS, where)
    params = s.get("params")
    if params is not None and not isinstance(params, Mapping):
        raise PlanError(f"{where}: params must be a JSON object, got {type(params).__name__}")
    try:
        return HeadSpec.from_dict(s)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: {e}") from e


def _layer_selection(layers: Iterable[int], plan_layers: Sequence[Any] | None) -> frozenset[int]:
    """``layers`` checked against a per-head plan's ``plan_layers``: the set of block indices to edit."""
    if plan_layers is None:
        raise ValueError(
            "layers= needs a per-head plan (Plan.layers); a uniform plan has one spec for every layer"
        )
    if isinstance(layers, (str, bytes)):
        raise ValueError(f"layers must be layer indices, got {layers!r}")
    chosen = list(layers)
    if not chosen:
        raise ValueError("layers is empty: name at least one layer (or pass layers=None for every layer)")
    n = len(plan_layers)
    bad = [i for i in chosen if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise ValueError(f"layers {bad}: not layer indices of this plan (0..{n - 1})")
    return frozenset(chosen)


# ---------------------------------------------------------------------- layout (de)serialisation
def layout_to_dict(layout: TokenLayout) -> dict[str, Any]:
    return {
        "segments": [
            {"kind": s.kind, "length": s.length, "grid": list(s.grid) if s.grid else None}
            for s in layout.segments
        ]
    }


def layout_from_dict(d: Mapping[str, Any]) -> TokenLayout:
    _require(d, ("segments",), "layout")
    _reject_unknown(d, _LAYOUT_KEYS, "layout")
    for i, s in enumerate(d["segments"] if isinstance(d["segments"], Sequence) else ()):
        _reject_unknown(s, _SEGMENT_KEYS, f"layout.segments[{i}]")
    try:
        segs = tuple(
            Segment(s["kind"], int(s["length"]), tuple(s["grid"]) if s.get("grid") else None)
            for s in d["segments"]
        )
        return TokenLayout(segs)
    except (KeyError, TypeError, ValueError) as e:
        raise PlanError(f"bad layout in plan: {e}") from e


# ---------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Plan:
    """Per-(layer, head) patterns plus the step schedule (see the module docstring for the JSON form).

    Attributes:
        default: spec of every head that ``layers`` does not list (the whole model for uniform plans).
        layers: ``layers[l][h]`` = spec of global head ``h`` of self-attention layer ``l``; ``None`` for a
            uniform plan. A per-head plan needs ``model`` (it is only valid for that model).
        schedule: dense warm-up (:class:`~sparsediff.specs.DenseSchedule`). ``dense_steps`` keeps its JSON
            type: an **int** counts steps (``3`` = the first 3 steps dense) and a **float** is a fraction
            of the run's steps in ``[0, 1]``, rounded up (``0.25`` of 50 steps = 13). Mind the decimal
            point in a hand-written plan: ``1`` is one dense step but ``1.0`` makes **every** step dense
            (and ``2.0`` is an error). ``from_dict``/``load`` keep ints and floats apart as ``json``
            parses them, and ``to_json`` writes floats with a decimal point, so the round trip is exact.
        refresh_steps: denoising steps at which layers with cache-based heads (``lse_cache``, ``skip``) run
            one exact pass that refreshes their caches (LSE, skipped outputs); other layers ignore them.
        min_tokens: calls whose sequence is shorter run dense (sparsity does not pay on small inputs).
        model: the model a per-head plan was made for, or ``None`` (generic).
        layout: the token layout the plan was searched for (``None``: any).
        stats: optional per-(layer, head) measurements from the search (``{"error": ..., "density": ...}``).
        meta: free-form metadata, kept verbatim.
    """

    default: HeadSpec = HeadSpec("dense")
    layers: tuple[tuple[HeadSpec, ...], ...] | None = None
    schedule: DenseSchedule = DenseSchedule()
    refresh_steps: tuple[int, ...] = ()
    min_tokens: int = 0
    model: ModelIdentity | None = None
    layout: TokenLayout | None = None
    stats: tuple[tuple[Mapping[str, Any], ...], ...] | None = field(default=None, compare=False)
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.default, HeadSpec):
            raise TypeError(f"Plan.default must be a HeadSpec, got {type(self.default).__name__}")
        if not isinstance(self.schedule, DenseSchedule):
            raise TypeError(f"Plan.schedule must be a DenseSchedule, got {type(self.schedule).__name__}")
        if self.layers is not None:
            layers = tuple(tuple(layer) for layer in self.layers)
            for li, layer in enumerate(layers):
                for hi, s in enumerate(layer):
                    if not isinstance(s, HeadSpec):
                        raise TypeError(f"Plan.layers[{li}][{hi}] must be a HeadSpec, got {type(s).__name__}")
            object.__setattr__(self, "layers", layers)
            if self.model is not None:
                problems = []
                if len(layers) != self.model.num_layers:
                    problems.append(f"{len(layers)} layers listed but model has {self.model.num_layers}")
                else:
                    for li, (layer, h) in enumerate(zip(layers, self.model.num_heads)):
                        if len(layer) != h:
                            problems.append(f"layer {li} lists {len(layer)} heads but model has {h}")
                if problems:
                    raise PlanError("inconsistent plan: " + "; ".join(problems[:5]))
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens must be a non-negative int, got {self.min_tokens!r}")
        object.__setattr__(self, "refresh_steps", tuple(int(s) for s in self.refresh_steps))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(
        cls,
        pattern: str | HeadSpec,
        *,
        dense_steps: int | float = 0,
        dense_layers: Sequence[int] = (),
        refresh_steps: Sequence[int] = (),
        min_tokens: int = 0,
        **params: Any,
    ) -> Plan:
        """The same pattern on every head of every layer: ``Plan.uniform("radial", decay=0.5, dense_steps=0.25)``."""
        spec = pattern if isinstance(pattern, HeadSpec) else HeadSpec.make(pattern, **params)
        if isinstance(pattern, HeadSpec) and params:
            raise TypeError("pass params either in the HeadSpec or as keyword arguments, not both")
        return cls(
            default=spec,
            schedule=DenseSchedule(dense_steps, tuple(dense_layers)),
            refresh_steps=tuple(refresh_steps),
            min_tokens=min_tokens,
        )

    @classmethod
    def dense(cls) -> Plan:
        """Every head dense: enabling it must leave the model's output bit-identical."""
        return cls(default=HeadSpec("dense"))

    @classmethod
    def per_head(
        cls,
        model: torch.nn.Module | ModelIdentity,
        specs: Sequence[Sequence[HeadSpec]],
        **kwargs: Any,
    ) -> Plan:
        """A per-(layer, head) plan for ``model`` (a transformer or its :class:`ModelIdentity`)."""
        ident = model if isinstance(model, ModelIdentity) else ModelIdentity.of(model)
        return cls(layers=tuple(tuple(layer) for layer in specs), model=ident, **kwargs)

    # ------------------------------------------------------------------ queries
    @property
    def is_uniform(self) -> bool:
        return self.layers is None

    @property
    def is_all_dense(self) -> bool:
        if self.layers is None:
            return self.default.pattern == "dense"
        return all(s.pattern == "dense" for layer in self.layers for s in layer)

    def patterns(self) -> set[str]:
        if self.layers is None:
            return {self.default.pattern}
        return {s.pattern for layer in self.layers for s in layer}

    def head_specs(self, layer: int, num_heads: int, head_offset: int = 0) -> tuple[HeadSpec, ...]:
        """Specs of global heads ``head_offset .. head_offset + num_heads - 1`` of ``layer``.

        Under context parallelism (Ulysses) a rank holds a contiguous slice of heads: pass its offset.
        """
        if self.layers is None:
            return (self.default,) * num_heads
        if not 0 <= layer < len(self.layers):
            raise IndexError(f"plan has {len(self.layers)} layers, asked for layer {layer}")
        row = self.layers[layer]
        if head_offset < 0 or head_offset + num_heads > len(row):
            raise IndexError(
                f"layer {layer} of the plan has {len(row)} heads; asked for heads "
                f"{head_offset}..{head_offset + num_heads - 1}"
            )
        return row[head_offset : head_offset + num_heads]

    def with_overrides(
        self,
        *,
        dense_steps: int | float | None = None,
        dense_layers: Sequence[int] | None = None,
        min_tokens: int | None = None,
        pattern_params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> Plan:
        """A copy with the schedule / min_tokens replaced and per-pattern parameters overridden
        (``pattern_params={"radial": {"decay": 0.5}}`` changes every radial head)."""
        sched = self.schedule
        if dense_steps is not None or dense_layers is not None:
            sched = DenseSchedule(
                sched.dense_steps if dense_steps is None else dense_steps,
                sched.dense_layers if dense_layers is None else tuple(dense_layers),
            )
        plan = replace(self, schedule=sched, min_tokens=self.min_tokens if min_tokens is None else min_tokens)
        if pattern_params:
            for name, p in pattern_params.items():
                if name not in PATTERN_PARAMS:
                    raise ValueError(
                        f"pattern_params: unknown pattern {name!r}; known: {tuple(PATTERN_PARAMS)}"
                    )
                HeadSpec.make(name, **p)  # validates the parameter names

            def upd(s: HeadSpec) -> HeadSpec:
                extra = pattern_params.get(s.pattern)
                if not extra:
                    return s
                return HeadSpec.make(s.pattern, **{**dict(s.params), **extra})

            layers = (
                None if plan.layers is None else tuple(tuple(upd(s) for s in layer) for layer in plan.layers)
            )
            plan = replace(plan, default=upd(plan.default), layers=layers)
        return self._edited(plan, "with_overrides")

    def _edited(self, plan: Plan, how: str) -> Plan:
        """``plan`` (an edit of ``self``) with the search's speed predictions dropped from its ``meta`` when
        the edit changed what runs: they priced ``self``, not the edit (``sparsediff compare`` would show them
        next to a plan they do not describe). The edit is recorded under ``meta["search"]["edited"]``."""
        search = self.meta.get("search")
        if (
            plan == self
            or not isinstance(search, Mapping)
            or not any(k.startswith("predicted") for k in search)
        ):
            return plan
        stale = ("prediction", "price")  # the replayed price of the unedited plan, and what it was
        kept = {k: v for k, v in search.items() if not k.startswith("predicted") and k not in stale}
        kept["edited"] = [*list(search.get("edited", [])), how]
        return replace(plan, meta={**dict(self.meta), "search": kept})

    def with_remainder(
        self, remainder: str, refresh: int | None = None, *, layers: Iterable[int] | None = None
    ) -> Plan:
        """A copy whose heads of the families with a ``remainder`` parameter (``radial``, ``tile``,
        ``reordered``, ``topp``, user families registered with ``remainder=True``) get ``remainder`` --
        ``"none"``, ``"pooled"`` or ``"cached"`` (:mod:`sparsediff.patterns.remainder`) -- and, with
        ``refresh``, ``remainder_refresh``. ``"cached"`` applies to the static heads among them only (a
        dynamic mask cannot keep a stored remainder); every other head is left as it is.

        ``layers`` (transformer block indices) edits only those layers' heads and leaves the others as they
        are, e.g. ``plan.with_remainder("cached", 5, layers=[0])``: the stored remainder's exact passes then
        cost only those layers (measured on the embedded model: layers 0 and 1 keep ~90 % of the every-layer
        PSNR gain for ~40 % of its extra step time, ``BENCHMARKS.md``). It needs a per-head plan
        (``Plan.layers``); a layer index out of range or an empty list raises :class:`ValueError`."""
        from .patterns.registry import REMAINDER_REFRESH_PARAM, REMAINDERS, get_family

        if remainder not in REMAINDERS:
            raise ValueError(f"remainder must be one of {REMAINDERS}, got {remainder!r}")
        chosen = None if layers is None else _layer_selection(layers, self.layers)

        def upd(s: HeadSpec) -> HeadSpec:
            if not get_family(s.pattern).remainder or (remainder == "cached" and not s.is_static):
                return s
            out = s.with_remainder(remainder)
            if refresh is not None:
                items = tuple((k, v) for k, v in out.params if k != REMAINDER_REFRESH_PARAM)
                out = HeadSpec(out.pattern, items + ((REMAINDER_REFRESH_PARAM, int(refresh)),))
            return out

        layers = None
        if self.layers is not None:
            layers = tuple(
                tuple(upd(s) for s in layer) if chosen is None or i in chosen else layer
                for i, layer in enumerate(self.layers)
            )
        if chosen is None:  # every layer, and the default of a uniform plan
            return self._edited(
                replace(self, default=upd(self.default), layers=layers), f"with_remainder({remainder!r})"
            )
        how = f"with_remainder({remainder!r}, layers={sorted(chosen)})"
        return self._edited(replace(self, layers=layers), how)

    # ------------------------------------------------------------------ validation
    def validate_for(self, model: torch.nn.Module | ModelIdentity, *, check_config: bool = True) -> None:
        """Raise :class:`PlanMismatchError` listing everything about ``model`` that does not match.

        A uniform plan without a model identity fits every model. ``check_config=False`` skips the config
        fingerprint (same architecture, e.g. a fine-tune with an edited config).
        """
        if self.model is None:
            if self.layers is not None:
                raise PlanMismatchError("a per-head plan needs a model identity (Plan.model is None)")
            return
        ident = model if isinstance(model, ModelIdentity) else ModelIdentity.of(model)
        want, have = self.model, ident
        problems = []
        if want.transformer_class != have.transformer_class:
            problems.append(
                f"transformer class: plan is for {want.transformer_class}, model is {have.transformer_class}"
            )
        if want.num_layers != have.num_layers:
            problems.append(f"layer count: plan has {want.num_layers} layers, model has {have.num_layers}")
        else:
            bad = [
                f"layer {i}: {a} vs {b}"
                for i, (a, b) in enumerate(zip(want.num_heads, have.num_heads))
                if a != b
            ]
            if bad:
                problems.append(
                    f"head count (plan vs model): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
                )
            bad = [
                f"layer {i}: {a} vs {b}"
                for i, (a, b) in enumerate(zip(want.head_dim, have.head_dim))
                if a != b
            ]
            if bad:
                problems.append(
                    f"head dim (plan vs model): {', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}"
                )
        if check_config and want.config_hash and have.config_hash and want.config_hash != have.config_hash:
            keys = sorted(
                k
                for k in set(want.config) | set(have.config)
                if want.config.get(k, "<missing>") != have.config.get(k, "<missing>")
            )
            if want.config:
                diffs = ", ".join(
                    f"{k}: {want.config.get(k, '<missing>')!r} vs {have.config.get(k, '<missing>')!r}"
                    for k in keys[:6]
                )
                problems.append(f"config (plan vs model) differs in {diffs or 'hash only'}")
            else:
                problems.append(f"config fingerprint {want.config_hash} != {have.config_hash}")
        if problems:
            raise PlanMismatchError("plan does not match the model:\n  - " + "\n  - ".join(problems))

    def check_layout(self, layout: TokenLayout) -> str | None:
        """A warning text when ``layout`` is far outside the searched one, else None."""
        if self.layout is None or layout.grid is None or self.layout.grid is None:
            return None
        a, b = self.layout.grid_len, layout.grid_len
        if a and (b > RANGE_FACTOR * a or b * RANGE_FACTOR < a):
            return (
                f"plan was searched for grid {self.layout.grid} ({a} tokens), used at {layout.grid} ({b} tokens); "
                "patterns are re-derived for the new grid, but quality was not measured there"
            )
        return None

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model": None if self.model is None else self.model.to_dict(),
            "schedule": {
                "dense_steps": self.schedule.dense_steps,
                "dense_layers": list(self.schedule.dense_layers),
                "refresh_steps": list(self.refresh_steps),
            },
            "min_tokens": self.min_tokens,
            "default": self.default.to_dict(),
            "layers": None
            if self.layers is None
            else [[s.to_dict() for s in layer] for layer in self.layers],
            "stats": None if self.stats is None else [[dict(x) for x in layer] for layer in self.stats],
            "layout": None if self.layout is None else layout_to_dict(self.layout),
            "meta": _jsonable(dict(self.meta)),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "plan") -> Plan:
        """Parse and validate a plan document (see the module docstring).

        Unknown keys -- at the top level, in ``schedule``, ``model``, ``layout`` (and its segments) and in
        every head spec -- are errors, so a typo (``"shedule"``, ``"dense_layer"``) never goes unnoticed.
        ``meta``, ``model.config`` and the ``stats`` entries are free-form. Every error is a
        :class:`PlanError` that starts with ``source`` and names where in the document it is.
        """
        if not isinstance(d, Mapping):
            raise PlanError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(
                f"{source}: not a sparsediff plan (format={d.get('format')!r}, expected {PLAN_FORMAT!r})"
            )
        version = d.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise PlanError(f"{source}: bad version {version!r}")
        if version > PLAN_VERSION:
            raise PlanError(
                f"{source}: plan version {version} is newer than this sparsediff understands ({PLAN_VERSION}); "
                "upgrade sparsediff"
            )
        try:
            _reject_unknown(d, _PLAN_KEYS, "top level")
            sched = d.get("schedule")
            if sched is None:
                sched = {}
            _reject_unknown(sched, _SCHEDULE_KEYS, "schedule")
            ds = sched.get("dense_steps", 0)
            try:
                schedule = DenseSchedule(ds, tuple(sched.get("dense_layers", ())))
            except (TypeError, ValueError) as e:
                raise PlanError(f"schedule: {e}") from e
            default = _spec_from_dict(d.get("default") or {"pattern": "dense"}, "default")
            layers = d.get("layers")
            if layers is not None:
                if not isinstance(layers, Sequence) or isinstance(layers, str):
                    raise PlanError(f"layers must be a list of layers (or null), got {type(layers).__name__}")
                rows = []
                for li, layer in enumerate(layers):
                    if not isinstance(layer, Sequence) or isinstance(layer, str):
                        raise PlanError(
                            f"layers[{li}] must be a list of head specs, got {type(layer).__name__}"
                        )
                    rows.append(
                        tuple(_spec_from_dict(s, f"layers[{li}][{hi}]") for hi, s in enumerate(layer))
                    )
                layers = tuple(rows)
            stats = d.get("stats")
            if stats is not None:
                stats = tuple(tuple(dict(x) for x in layer) for layer in stats)
            model = None if d.get("model") is None else ModelIdentity.from_dict(d["model"])
            layout = None if d.get("layout") is None else layout_from_dict(d["layout"])
            min_tokens = d.get("min_tokens", 0)
            if isinstance(min_tokens, bool) or not isinstance(min_tokens, int):
                raise PlanError(f"min_tokens must be a non-negative int, got {min_tokens!r}")
            return cls(
                default=default,
                layers=layers,
                schedule=schedule,
                refresh_steps=tuple(sched.get("refresh_steps", ())),
                min_tokens=min_tokens,
                model=model,
                layout=layout,
                stats=stats,
                meta=dict(d.get("meta") or {}),
            )
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from e
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise PlanError(f"{source}: invalid plan: {e}") from e

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read and validate a plan JSON file (:class:`PlanError` says what is wrong and where)."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"plan file not found: {p}") from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{p}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from e
        return cls.from_dict(d, source=str(p))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the plan as JSON. An existing file is never replaced unless ``overwrite=True``."""
        p = Path(path)
        text = self.to_json() + "\n"
        if p.exists() and not overwrite:
            raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        if overwrite:
            os.replace(tmp, p)
        else:
            try:  # atomic "create, fail if exists" even when two processes race
                os.link(tmp, p)
            except FileExistsError:
                tmp.unlink(missing_ok=True)
                raise FileExistsError(f"{p} exists; pass overwrite=True to replace it") from None
            except OSError:  # filesystems without hard links
                os.replace(tmp, p)
            tmp.unlink(missing_ok=True)
        return p

    def summary(self) -> str:
        """One line: patterns and how many heads use each, schedule."""
        if self.layers is None:
            pats = f"all heads {self.default!r}"
        else:
            counts: dict[str, int] = {}
            for layer in self.layers:
                for s in layer:
                    counts[s.pattern] = counts.get(s.pattern, 0) + 1
            total = sum(counts.values())
            pats = ", ".join(f"{k} {v}/{total}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            rem: dict[tuple[str, int], int] = {}
            for layer in self.layers:
                for s in layer:
                    if s.remainder != "none":
                        r = int(s.get("remainder_refresh")) if s.remainder == "cached" else 0
                        rem[(s.remainder, r)] = rem.get((s.remainder, r), 0) + 1
            for (mode, r), n in sorted(rem.items()):
                pats += f"; {mode} remainder {n}/{total}" + (f" (exact every {r} steps)" if r else "")
        s = self.schedule
        ds = f"{s.dense_steps:.0%}" if isinstance(s.dense_steps, float) else str(s.dense_steps)
        extra = f", dense below {self.min_tokens} tokens" if self.min_tokens else ""
        return f"{pats}; dense warm-up steps {ds}, dense layers {list(s.dense_layers)}{extra}"
