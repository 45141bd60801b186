"""``sparsediff compare --cache``: one of diffusers' caches, parsed, checked, enabled and removed.

A spec is ``NAME`` or ``NAME:field=value,field=value,...``; ``NAME`` picks the config class of
``diffusers.hooks`` (:data:`CACHE_CONFIGS`), the fields are that dataclass's, the values Python literals
(strings may be left unquoted where the field takes a string)::

    first_block:threshold=0.15
    pab:spatial_attention_block_skip_range=2,spatial_attention_timestep_skip_range=(-1,1001)
    faster:spatial_attention_block_skip_range=2,attention_weight_callback=0.5
    taylorseer:cache_interval=3,cache_identifiers=[r'blocks\\.\\d+\\.attn1'],taylor_factors_dtype=float32
    mag:mag_ratios=[1.0,0.98,...]      (calibrated for this model and scheduler)

Filled in by ``compare``: ``current_timestep_callback`` (PAB, FasterCache: the pipeline's
``current_timestep``) and MagCache's ``num_inference_steps`` (the run's ``--steps``). A ``*_callback``
field that takes a module may be given a number (that constant for every module). Everything is checked
by :func:`parse_cache` and :func:`check_cache` before the model is loaded; :class:`CompareError` (one
line) otherwise.

The cache goes on every pipeline component with diffusers' ``enable_cache`` (``CacheMixin``: the
transformer(s)); its hooks' state is reset before each generation (diffusers'
``HookRegistry.reset_stateful_hooks``, what ``maybe_free_model_hooks`` does at the end of a pipeline
call -- a pipeline that does not call it still starts each generation clean) and the cache is removed
with ``disable_cache()``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .variants import CompareError, literal_value, split_top

#: Short name -> config class name in ``diffusers.hooks`` (diffusers 0.42).
CACHE_CONFIGS = {
    "first_block": "FirstBlockCacheConfig",
    "pab": "PyramidAttentionBroadcastConfig",
    "faster": "FasterCacheConfig",
    "taylorseer": "TaylorSeerCacheConfig",
    "mag": "MagCacheConfig",
}
#: diffusers' own spellings, accepted too.
ALIASES = {
    "first_block_cache": "first_block",
    "fbc": "first_block",
    "pyramid_attention_broadcast": "pab",
    "faster_cache": "faster",
    "taylorseer_cache": "taylorseer",
    "mag_cache": "mag",
}
_AUTO = "current_timestep_callback"  # filled by compare: lambda: pipe.current_timestep
_LABEL_VALUE_CHARS = 24  # longer values (MagCache's ratios) are shown as "..." in labels


@dataclass(frozen=True)
class CacheSpec:
    """A parsed ``--cache`` entry.

    Attributes:
        name: the short name (a key of :data:`CACHE_CONFIGS`).
        fields: the given config fields, values converted to the field types (callbacks: numbers).
        spec: the text it was parsed from.
    """

    name: str
    fields: dict[str, Any] = field(default_factory=dict)
    spec: str = ""

    @property
    def config_class(self) -> str:
        return CACHE_CONFIGS[self.name]

    @property
    def label(self) -> str:
        """``first_block(threshold=0.15)``: the name and the given fields (long values shortened)."""
        if not self.fields:
            return self.name
        parts = []
        for k, v in self.fields.items():
            text = repr(v) if not isinstance(v, str) else v
            parts.append(f"{k}={text if len(text) <= _LABEL_VALUE_CHARS else '...'}")
        return f"{self.name}({', '.join(parts)})"


def _config_class(name: str) -> type:
    import diffusers.hooks

    cls = getattr(diffusers.hooks, CACHE_CONFIGS[name], None)
    if cls is None:  # pragma: no cover - depends on the diffusers version
        import diffusers

        raise CompareError(f"--cache {name}: diffusers {diffusers.__version__} has no {CACHE_CONFIGS[name]}")
    return cls


def _is_callable_hint(hint: Any) -> bool:
    return typing.get_origin(hint) in (Callable, typing.Callable) or hint in (Callable, typing.Callable)


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as the field type ``hint`` says, or :class:`TypeError` (what was expected)."""
    import torch

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arm)
            except TypeError:
                pass
        raise TypeError(" or ".join(_describe(a) for a in args))
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeError("a number")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise TypeError("an integer")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("True or False")
    if hint is str:
        if isinstance(value, str):
            return value
        raise TypeError("a string")
    if hint is torch.dtype:
        dt = getattr(torch, value, None) if isinstance(value, str) else None
        if isinstance(dt, torch.dtype):
            return dt
        raise TypeError(_describe(hint))
    if hint is torch.Tensor:
        if isinstance(value, (list, tuple)) and value and all(_is_number(x) for x in value):
            return [float(x) for x in value]
        raise TypeError("a list of numbers")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError(_describe(hint))
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise TypeError(_describe(hint))
            items = [_coerce(x, a) for x, a in zip(value, args)]
        else:
            items = [_coerce(x, args[0]) for x in value] if args else list(value)
        return tuple(items) if origin is tuple else items
    if _is_callable_hint(hint):
        cargs = typing.get_args(hint)
        if cargs and cargs[0] not in ((), []) and _is_number(value):  # Callable[[Module], float]
            return float(value)
        raise TypeError("a function (not settable from the command line)")
    return value


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _describe(hint: Any) -> str:
    import torch

    names = {float: "a number", int: "an integer", bool: "True or False", str: "a string"}
    if hint in names:
        return names[hint]
    if hint is type(None):
        return "None"
    if hint is torch.Tensor:
        return "a list of numbers"
    if hint is torch.dtype:
        return "a torch dtype name (float32, bfloat16, ...)"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"a tuple of {len(args)} ({', '.join(_describe(a) for a in args)})"
    if origin in (tuple, list):
        return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s" if args else "a list"
    return getattr(hint, "__name__", str(hint))


def _fields(cls: type) -> dict[str, Any]:
    """Settable fields of a config dataclass and their types (private ones left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if not f.name.startswith("_")}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__


def parse_cache(spec: str) -> CacheSpec:
    """Parse ``--cache NAME[:field=value,...]`` (see the module docstring). Checks the name, every field
    name and every value's type against the diffusers config class; raises :class:`CompareError` (one
    line naming the fields) otherwise. Builds nothing: :func:`check_cache` does, with the run's steps."""
    text = spec.strip()
    head, _, rest = text.partition(":")
    name = ALIASES.get(head.strip().lower(), head.strip().lower())
    if name not in CACHE_CONFIGS:
        raise CompareError(
            f"--cache {spec!r}: unknown cache {head.strip()!r} (one of: {', '.join(CACHE_CONFIGS)})"
        )
    cls = _config_class(name)
    known = _fields(cls)
    fields_: dict[str, Any] = {}
    unknown, bad = [], []
    for tok in split_top(rest):
        if "=" not in tok:
            raise CompareError(f"--cache {spec!r}: {tok!r} is not field=value")
        key, val = (s.strip() for s in tok.split("=", 1))
        if key not in known:
            unknown.append(key)
            continue
        if key in fields_:
            raise CompareError(f"--cache {spec!r}: {key} given twice")
        if key == _AUTO:
            raise CompareError(f"--cache {spec!r}: {key} is set by compare (the pipeline's current_timestep)")
        hint = known[key]
        try:
            value = literal_value(val, keep_text=False)
        except (ValueError, SyntaxError):
            value = val  # unquoted text: only where the field takes a string (or a dtype name)
        try:
            fields_[key] = _coerce(value, hint)
        except TypeError as e:
            bad.append(f"{key}={val!r} is not {e}")
    if unknown:
        raise CompareError(
            f"--cache {spec!r}: {cls.__name__} has no field {', '.join(unknown)} (fields: {', '.join(known)})"
        )
    if bad:
        raise CompareError(f"--cache {spec!r}: {'; '.join(bad)}")
    if name == "mag":
        if fields_.get("calibrate"):
            raise CompareError(
                f"--cache {spec!r}: calibrate=True skips nothing (it measures mag_ratios); calibrate with "
                "diffusers first and pass the printed list as mag_ratios=[...]"
            )
        if fields_.get("mag_ratios") is None:
            raise CompareError(
                f"--cache {spec!r}: MagCacheConfig needs mag_ratios=[...] calibrated for this model (run "
                "once with diffusers' MagCacheConfig(calibrate=True) and pass the printed list)"
            )
    return CacheSpec(name=name, fields=fields_, spec=spec)


def _kwargs(cache: CacheSpec, steps: int | None, current_timestep: Callable[[], Any]) -> dict[str, Any]:
    known = _fields(_config_class(cache.name))
    kw: dict[str, Any] = {}
    for key, value in cache.fields.items():
        kw[key] = (lambda _m, c=value: c) if _is_callable_hint(known[key]) else value
    if _AUTO in known:
        kw[_AUTO] = current_timestep
    if cache.name == "mag":
        given = kw.get("num_inference_steps")
        if given is None and steps is None:
            raise CompareError(
                f"--cache {cache.spec!r}: MagCache needs the number of steps: pass --steps or "
                "num_inference_steps=N"
            )
        if given is not None and steps is not None and given != steps:
            raise CompareError(
                f"--cache {cache.spec!r}: num_inference_steps={given} differs from --steps {steps}"
            )
        kw["num_inference_steps"] = given if given is not None else steps
    return kw


def check_cache(cache: CacheSpec, steps: int | None) -> None:
    """Build the config once (diffusers' own checks, e.g. MagCache's) with the run's ``steps``, no pipeline
    needed; raises :class:`CompareError` with diffusers' first message line."""
    build_config(cache, steps, lambda: None)


def build_config(cache: CacheSpec, steps: int | None, current_timestep: Callable[[], Any]) -> Any:
    """A fresh diffusers config object for ``cache`` (one per component: configs hold state in some
    diffusers versions)."""
    cls = _config_class(cache.name)
    try:
        return cls(**_kwargs(cache, steps, current_timestep))
    except (TypeError, ValueError) as e:
        raise CompareError(f"--cache {cache.spec!r}: {cls.__name__}: {_first_line(e)}") from None


def config_dict(config: Any) -> dict[str, Any]:
    """A diffusers config as JSON-friendly values (callbacks by name, tensors as lists) for results.json."""
    import torch

    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name.startswith("_"):
            continue
        v = getattr(config, f.name)
        if callable(v) and not isinstance(v, torch.dtype):
            v = "current_timestep of the pipeline" if f.name == _AUTO else "callback"
        elif isinstance(v, torch.Tensor):
            v = [float(x) for x in v.flatten()]
        elif isinstance(v, torch.dtype):
            v = str(v).removeprefix("torch.")
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def cache_components(pipe: Any) -> dict[str, Any]:
    """The pipeline components that take diffusers' ``enable_cache`` (the transformer(s))."""
    comps = getattr(pipe, "components", None) or {}
    return {
        n: c
        for n, c in comps.items()
        if callable(getattr(c, "enable_cache", None)) and callable(getattr(c, "disable_cache", None))
    }


class CacheRunError(RuntimeError):
    """A ``+ cache`` row failed while generating (the cache and sparse attention are removed again): the
    cache does not run on this pipeline. Not an input error -- found only by running it."""

    def __init__(self, cache: CacheSpec, row: str, pipe: Any, error: BaseException) -> None:
        hint = ""
        if cache.name == "faster":
            hint = (
                " (diffusers' FasterCache expects the conditional and unconditional branches in one batched "
                "transformer call, e.g. CogVideoX; pipelines that call them separately, like Wan and the "
                "embedded model, fail this way)"
            )
        super().__init__(
            f"--cache {cache.spec!r} failed while generating the row {row!r} on {type(pipe).__name__}: "
            f"{type(error).__name__}: {_first_line(error)}{hint}; the cache and sparse attention were removed"
        )


class EnabledCache:
    """``cache`` enabled on every component of :func:`cache_components` (``with`` or :meth:`disable`).

    Raises :class:`CompareError` when the pipeline has no such component or one already has a cache.
    """

    def __init__(self, pipe: Any, cache: CacheSpec, steps: int | None) -> None:
        comps = cache_components(pipe)
        if not comps:
            raise CompareError(
                f"--cache {cache.spec!r}: {type(pipe).__name__} has no component with diffusers' enable_cache"
            )
        busy = [n for n, c in comps.items() if getattr(c, "is_cache_enabled", False)]
        if busy:
            raise CompareError(
                f"--cache {cache.spec!r}: {', '.join(busy)} already has a cache enabled; disable it first"
            )
        if cache.name in ("pab", "faster") and not (
            hasattr(type(pipe), "current_timestep") or hasattr(pipe, "current_timestep")
        ):
            raise CompareError(
                f"--cache {cache.spec!r}: {type(pipe).__name__} has no current_timestep, which "
                f"{cache.config_class} needs"
            )
        self.cache = cache
        self.components: list[Any] = []
        self.configs: dict[str, Any] = {}
        try:
            for n, c in comps.items():
                cfg = build_config(cache, steps, lambda: pipe.current_timestep)
                try:
                    c.enable_cache(cfg)
                except (ValueError, TypeError, AttributeError, RuntimeError) as e:
                    raise CompareError(
                        f"--cache {cache.spec!r} cannot run on {n}: {_first_line(e)}"
                    ) from None
                self.components.append(c)
                self.configs[n] = cfg
        except BaseException:
            self.disable()
            raise

    def reset(self) -> None:
        """Forget every cached tensor and counter (before a generation)."""
        from diffusers.hooks import HookRegistry

        for c in self.components:
            HookRegistry.check_if_exists_or_initialize(c).reset_stateful_hooks(recurse=True)

    def disable(self) -> None:
        while self.components:
            self.components.pop().disable_cache()

    def __enter__(self) -> EnabledCache:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disable()
