"""Model adapters: the declarative description of one diffusers DiT family, and their registry.

An :class:`Adapter` tells the generic machinery in :mod:`sparsediff.hooks` everything model-specific:

* which transformer classes it covers (matched by class name, so importing sparsediff never imports
  a model module it does not need);
* which attention modules are **self-attention** (anchored regular expressions on the names that
  ``transformer.named_modules()`` yields -- cross-attention and text refiners must never match);
* how to read the **token layout** (video/image grid after patchify, text tokens and where they sit)
  from the arguments of one ``transformer.forward`` call;
* where the **timestep** is in that call and in which units (used to count denoising steps when the
  transformer is enabled without a pipeline);
* how classifier-free guidance is batched (``"batch"``: cond+uncond in one call, ``"calls"``: one
  transformer call per branch per step -- the step index never advances twice either way);
* the model **family** (``"video"`` or ``"image"``), which selects the training-free default plan.

Layer numbering: the self-attention modules are numbered ``0 .. L-1`` in ``named_modules()`` order
(e.g. Flux: the 19 dual-stream blocks, then the 38 single-stream blocks). Plans index layers this way.

How attention is intercepted (generic, no adapter code needed for models whose processor calls
``diffusers.models.attention_dispatch.dispatch_attention_fn``): the processor of every matched module is
replaced by an instance of a *subclass of its own class*; the subclass publishes the layer context for
the duration of ``__call__`` (the signature of ``__call__`` is kept, because attention modules filter
keyword arguments by it) and reports ``_attention_backend`` as the sparsediff backend, so the model's
own projections, norms and RoPE run unchanged and only the attention product reaches sparsediff. A
backend chosen later with ``set_attention_backend`` becomes the dense fallback.

**Models whose processors call ``F.scaled_dot_product_attention`` directly** (CogVideoX, Mochi, SD3):
set :attr:`Adapter.dispatch_processors` to map the *name* of the model's processor class to a drop-in
class that does the same math but computes the attention product with ``dispatch_attention_fn``::

    from diffusers.models.attention_dispatch import dispatch_attention_fn

    class CogVideoXDispatchProcessor(CogVideoXAttnProcessor2_0):
        _attention_backend = None
        _parallel_config = None

        def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None,
                     image_rotary_emb=None):
            ...  # same code as the original, except the line
            # hidden_states = F.scaled_dot_product_attention(query, key, value, ...)   # [B, H, N, D]
            hidden_states = dispatch_attention_fn(
                query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),   # [B, N, H, D]
                attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            ).transpose(1, 2)

    register_adapter(Adapter(..., dispatch_processors={"CogVideoXAttnProcessor2_0": CogVideoXDispatchProcessor}))

Rules for a drop-in class: it must produce bit-identical results to the original when dispatch runs the
"native" backend (diffusers' native backend calls SDPA on ``[B, H, N, D]`` views, exactly what the
original did); it is instantiated **without calling ``__init__``** -- the original processor's
``__dict__`` is copied into it -- so it must not need constructor state beyond that; and it must keep
the class attributes ``_attention_backend`` / ``_parallel_config``. The generic machinery then
subclasses the drop-in class exactly as it subclasses a dispatch-calling processor; on disable the
original processor object is put back.

Registering an adapter for a model sparsediff does not know::

    from sparsediff.pipelines.base import Adapter, register_adapter
    from sparsediff.layout import TokenLayout

    def my_layout(transformer, inputs):            # inputs: forward's arguments by name
        b, c, f, h, w = inputs["hidden_states"].shape
        p = transformer.config.patch_size
        return TokenLayout.video(f, h // p, w // p)

    register_adapter(Adapter(
        name="mydit", family="video", transformer_classes=("MyDiTModel",),
        self_attention=(r"blocks\\.\\d+\\.attn1",), layout_fn=my_layout,
    ))
"""

from __future__ import annotations

import importlib
import inspect
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsediff.layout import TokenLayout

logger = logging.getLogger(__name__)

__all__ = [
    "Adapter",
    "UnsupportedModelError",
    "register_adapter",
    "unregister_adapter",
    "get_adapter",
    "list_adapters",
    "supported_classes",
    "bind_forward_inputs",
    "FAMILIES",
    "TIMESTEP_UNITS",
    "CFG_LAYOUTS",
]

FAMILIES = ("video", "image")
#: ``"steps"``: the transformer receives timesteps in scheduler units (0..1000); ``"sigma"``: in [0, 1]
#: (Flux divides by 1000 before the call). Only used to detect a new denoising step without a scheduler.
TIMESTEP_UNITS = ("steps", "sigma")
CFG_LAYOUTS = ("batch", "calls")

#: Adapter modules shipped with sparsediff, imported lazily on first lookup (a missing one is skipped).
_BUILTIN_MODULES = (
    "wan",
    "flux",
    "hunyuan_video",
    "qwenimage",
    "cogvideox",
    "mochi",
    "sd3",
    "ltx",
)

LayoutFn = Callable[[torch.nn.Module, Mapping[str, Any]], TokenLayout]
TimestepFn = Callable[[torch.nn.Module, Mapping[str, Any]], "torch.Tensor | float | None"]


class UnsupportedModelError(ValueError):
    """The transformer's class has no registered adapter."""


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one DiT family (see the module docstring).

    Attributes:
        name: short id, e.g. ``"wan"``; used in plans and logs.
        family: ``"video"`` or ``"image"``; selects the training-free default plan.
        transformer_classes: class *names* this adapter covers (``type(transformer).__name__``; a class
            whose MRO contains one of them matches too).
        self_attention: anchored regular expressions (``re.fullmatch``) on the module names yielded by
            ``transformer.named_modules()`` (relative to the transformer). Every match must be an
            attention module with a ``processor``; nothing else (cross-attention, refiners) may match.
        layout_fn: ``(transformer, inputs) -> TokenLayout`` for one forward call; ``inputs`` are the
            forward's arguments by parameter name, defaults applied (:func:`bind_forward_inputs`). The
            layout describes the sequence the *self-attention* layers see, in token order, for one
            sample (before any context-parallel split).
        timestep_arg: name of the forward parameter holding the timestep (``None``: none).
        timestep_units: one of :data:`TIMESTEP_UNITS`.
        cfg: one of :data:`CFG_LAYOUTS` -- how the model's pipelines batch classifier-free guidance.
        dispatch_processors: for SDPA-calling models, processor class name -> drop-in processor class
            that computes the attention product with ``dispatch_attention_fn`` (see module docstring).
            Empty for models whose processors already dispatch.
        default_plan: keyword overrides of the family default passed to
            :func:`sparsediff.defaults.default_plan` (e.g. ``{"pattern": "tile"}``).
        cp_split: how diffusers context parallelism (Ulysses) splits the self-attention sequence across
            ranks: ``"sequence"`` (the whole sequence is split in contiguous chunks: gathered order ==
            layout order) or ``"segments"`` (every segment -- e.g. Flux's text and image -- is split on
            its own, so the gathered sequence is ``[seg0_rank0, seg1_rank0, seg0_rank1, ...]``).
        refit_text: the self-attention calls of one transformer call may carry *another number of text
            tokens* than :attr:`layout_fn` reports (Mochi: one attention call per sample with only its
            valid prompt tokens; SD3.5: image-only ``attn2`` layers). When True, an attention call whose
            sequence length differs from the layout runs sparse with the layout re-fitted to that length
            (:meth:`~sparsediff.layout.TokenLayout.refit_text`: grids kept, the single text segment takes
            the remaining tokens or is dropped) instead of falling back to dense. It is done at run time
            from the call's static shapes inside :mod:`sparsediff.hooks`, so it holds under
            ``torch.compile`` too.
        notes: free text shown by ``list_adapters()`` (supported variants, caveats).
    """

    name: str
    family: str
    transformer_classes: tuple[str, ...]
    self_attention: tuple[str, ...]
    layout_fn: LayoutFn
    timestep_arg: str | None = "timestep"
    timestep_units: str = "steps"
    cfg: str = "batch"
    dispatch_processors: Mapping[str, type] = field(default_factory=dict)
    default_plan: Mapping[str, Any] = field(default_factory=dict)
    cp_split: str = "sequence"
    refit_text: bool = False
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.name or not isinstance(self.name, str):
            raise ValueError("Adapter.name must be a non-empty string")
        if self.family not in FAMILIES:
            raise ValueError(f"Adapter {self.name!r}: family must be one of {FAMILIES}, got {self.family!r}")
        if self.timestep_units not in TIMESTEP_UNITS:
            raise ValueError(
                f"Adapter {self.name!r}: timestep_units must be one of {TIMESTEP_UNITS}, got {self.timestep_units!r}"
            )
        if self.cfg not in CFG_LAYOUTS:
            raise ValueError(f"Adapter {self.name!r}: cfg must be one of {CFG_LAYOUTS}, got {self.cfg!r}")
        if self.cp_split not in ("sequence", "segments"):
            raise ValueError(
                f"Adapter {self.name!r}: cp_split must be 'sequence' or 'segments', got {self.cp_split!r}"
            )
        object.__setattr__(self, "transformer_classes", tuple(self.transformer_classes))
        object.__setattr__(self, "self_attention", tuple(self.self_attention))
        if not self.transformer_classes:
            raise ValueError(f"Adapter {self.name!r}: transformer_classes is empty")
        if not self.self_attention:
            raise ValueError(f"Adapter {self.name!r}: self_attention is empty")
        for pat in self.self_attention:
            try:
                re.compile(pat)
            except re.error as e:
                raise ValueError(f"Adapter {self.name!r}: bad self_attention pattern {pat!r}: {e}") from e
        if not callable(self.layout_fn):
            raise TypeError(f"Adapter {self.name!r}: layout_fn must be callable")

    # ------------------------------------------------------------------ generic helpers
    def matches(self, transformer: torch.nn.Module) -> bool:
        names = {c.__name__ for c in type(transformer).__mro__}
        return any(n in names for n in self.transformer_classes)

    def attention_modules(self, transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """The self-attention modules ``[(name, module), ...]`` in layer order (``named_modules()`` order).

        Raises ``ValueError`` when nothing matches or a match has no ``processor`` (adapter bug or a model
        variant the adapter does not know).
        """
        regexes = [re.compile(p) for p in self.self_attention]
        out = []
        for name, mod in transformer.named_modules():
            if name and any(r.fullmatch(name) for r in regexes):
                if not hasattr(mod, "processor"):
                    raise ValueError(
                        f"adapter {self.name!r}: module {name!r} ({type(mod).__name__}) matches "
                        f"{self.self_attention} but has no attention processor"
                    )
                out.append((name, mod))
        if not out:
            raise ValueError(
                f"adapter {self.name!r}: no module of {type(transformer).__name__} matches the self-attention "
                f"patterns {self.self_attention}"
            )
        return out

    def layout(self, transformer: torch.nn.Module, inputs: Mapping[str, Any]) -> TokenLayout:
        return self.layout_fn(transformer, inputs)

    def timestep(self, inputs: Mapping[str, Any]) -> torch.Tensor | float | None:
        if self.timestep_arg is None:
            return None
        return inputs.get(self.timestep_arg)


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, Adapter] = {}
_builtins_loaded = False


def register_adapter(adapter: Adapter, *, overwrite: bool = False) -> Adapter:
    """Register ``adapter`` under ``adapter.name``. A second adapter with the same name, or one claiming a
    transformer class another adapter already covers, raises unless ``overwrite=True``."""
    if not isinstance(adapter, Adapter):
        raise TypeError(f"register_adapter expects an Adapter, got {type(adapter).__name__}")
    if not overwrite:
        if adapter.name in _REGISTRY and _REGISTRY[adapter.name] is not adapter:
            raise ValueError(f"an adapter named {adapter.name!r} is already registered (pass overwrite=True)")
        for other in _REGISTRY.values():
            if other.name == adapter.name:
                continue
            clash = set(other.transformer_classes) & set(adapter.transformer_classes)
            if clash:
                raise ValueError(
                    f"adapter {adapter.name!r} claims {sorted(clash)}, already covered by adapter "
                    f"{other.name!r} (pass overwrite=True to replace it)"
                )
    if overwrite:
        for other in list(_REGISTRY.values()):
            if other.name != adapter.name and set(other.transformer_classes) & set(
                adapter.transformer_classes
            ):
                del _REGISTRY[other.name]
    _REGISTRY[adapter.name] = adapter
    return adapter


def unregister_adapter(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"sparsediff.pipelines.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"sparsediff.pipelines.{mod}":
                logger.warning("sparsediff: adapter module %s could not be imported: %s", mod, e)
            else:
                logger.debug("sparsediff: adapter module %s not present", mod)
        except Exception as e:  # one broken adapter must not take the others down
            logger.warning("sparsediff: adapter module %s failed to load: %r", mod, e)


def list_adapters() -> list[Adapter]:
    _load_builtins()
    return list(_REGISTRY.values())


def supported_classes() -> list[str]:
    """Sorted transformer class names that have an adapter."""
    return sorted({c for a in list_adapters() for c in a.transformer_classes})


def get_adapter(transformer: torch.nn.Module | type) -> Adapter:
    """The adapter for ``transformer`` (an instance or a class); raises :class:`UnsupportedModelError`
    naming the class, the supported classes and how to register an adapter."""
    _load_builtins()
    cls = transformer if isinstance(transformer, type) else type(transformer)
    mro = [c.__name__ for c in cls.__mro__]
    for name in mro:  # most specific class first
        for a in _REGISTRY.values():
            if name in a.transformer_classes:
                return a
    raise UnsupportedModelError(
        f"sparsediff has no adapter for {cls.__name__}. Supported transformer classes: "
        f"{', '.join(supported_classes()) or '(none registered)'}. To add a model, describe it with "
        "sparsediff.pipelines.base.Adapter and call sparsediff.pipelines.base.register_adapter(...) "
        "(see the docstring of sparsediff.pipelines.base)."
    )


def bind_forward_inputs(
    transformer: torch.nn.Module, args: tuple, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    """``transformer.forward``'s arguments by parameter name, defaults applied (unknown kwargs kept)."""
    fwd = type(transformer).forward
    sig = _signature(fwd)
    try:
        bound = sig.bind(transformer, *args, **kwargs)
    except TypeError:
        out = dict(kwargs)
        names = [p for p in sig.parameters if p != "self"]
        out.update(dict(zip(names, args)))
        return out
    bound.apply_defaults()
    out = dict(bound.arguments)
    out.pop("self", None)
    extra = out.pop("kwargs", None)
    if isinstance(extra, dict):
        out.update(extra)
    return out


_SIG_CACHE: dict[Any, inspect.Signature] = {}


def _signature(fn) -> inspect.Signature:
    sig = _SIG_CACHE.get(fn)
    if sig is None:
        sig = _SIG_CACHE[fn] = inspect.signature(fn)
    return sig


def grid_from_patch(size: int, patch: int, what: str) -> int:
    """``size // patch`` with a readable error when ``size`` is not a multiple of ``patch``."""
    if size % patch:
        raise ValueError(f"{what}: latent size {size} is not a multiple of the patch size {patch}")
    return size // patch
