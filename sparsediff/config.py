"""User-facing knobs of :func:`sparsediff.enable_sparse_attention`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .specs import PATTERN_PARAMS, HeadSpec
from .support import BACKENDS as _BACKENDS

__all__ = ["SparseAttentionConfig"]


@dataclass(frozen=True)
class SparseAttentionConfig:
    """How sparse attention runs (the *plan* says what every head does; this says how and when).

    Every field left at ``None`` keeps the plan's value. Keyword overrides passed to
    ``enable_sparse_attention(pipe, plan, **overrides)`` set fields of this dataclass.

    Attributes:
        dense_steps: dense warm-up: the first ``dense_steps`` denoising steps run exact dense attention.
            ``int`` = number of steps, ``float`` in ``[0, 1]`` = fraction of the pipeline's steps
            (rounded up). ``None``: the plan's schedule. Published training-free methods keep 20-25 %.
        dense_layers: self-attention layer indices that always run dense (``None``: the plan's).
        min_tokens: calls with fewer tokens run dense (``None``: the plan's; images default to a
            threshold below which sparsity does not pay).
        pattern_params: per-pattern parameter overrides applied to every head of that pattern, e.g.
            ``{"radial": {"decay": 0.5}, "topp": {"top_p": 0.95}}``.
        strict: raise instead of falling back to dense attention when a call cannot run sparse
            (attention mask the sparse path cannot honour, unknown layout, unsupported dtype...).
            Default ``False``: fall back to the dense backend and log the reason once.
        log_density: log (once per enable, at INFO) the density of every layer after the first call that
            ran sparse.
        backend: the sparsediff op backend: ``"auto"`` (Triton on CUDA, else the PyTorch twin),
            ``"triton"`` or ``"reference"`` (the PyTorch twin; what the CPU tests use).
        block_size: tokens per query/key block of the block mask (``None``: the op's default, 64).
        mask_cache_size: entries of the per-transformer static-mask cache.
        num_steps: number of denoising steps when the transformer is enabled without a pipeline
            (needed to resolve a fractional ``dense_steps``; with a pipeline it comes from diffusers'
            cache context or the pipeline's ``num_timesteps``).
        check_config: compare the plan's config fingerprint with the model's (layer/head counts are
            always checked).
        adapter_steps: where the LoRA adapter named ``"sparsediff"`` (the one ``sparsediff finetune`` trains
            and a plan folder loads) runs: ``"sparse"`` (default) only in transformer calls where some layer
            runs sparse -- off in the dense warm-up steps and calls below ``min_tokens``, where the model is
            its own dense teacher and the adapter has nothing to correct; ``"all"``: every call (peft's
            behaviour). Other adapters are never touched. (Measured on the embedded model: the shipped
            adapter active in the 3 dense warm-up steps cost 2 dB of PSNR vs dense; README "finetune".)
        observer: optional callable, called with one :class:`sparsediff.hooks.AttentionCall` (layer index,
            q/k/v ``[B, H, N, D]``, layout, step/branch context) by every self-attention call that reaches
            the per-layer dispatch, *before* the attention is computed; its return value is ignored and the
            call's result is unchanged. ``sparsediff search`` profiles a dense pipeline through it. It must
            not modify the tensors. ``None`` (default): no observer.
    """

    dense_steps: int | float | None = None
    dense_layers: tuple[int, ...] | None = None
    min_tokens: int | None = None
    pattern_params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    strict: bool = False
    log_density: bool = True
    backend: str = "auto"
    block_size: int | None = None
    mask_cache_size: int = 64
    num_steps: int | None = None
    check_config: bool = True
    adapter_steps: str = "sparse"
    observer: Callable[[Any], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        ds = self.dense_steps
        if ds is not None:
            if isinstance(ds, bool) or not isinstance(ds, (int, float)):
                raise TypeError(f"dense_steps must be an int count or a float fraction, got {ds!r}")
            if isinstance(ds, float) and not 0.0 <= ds <= 1.0:
                raise ValueError(f"a float dense_steps is a fraction in [0, 1], got {ds}")
            if isinstance(ds, int) and ds < 0:
                raise ValueError(f"dense_steps must be >= 0, got {ds}")
        if self.dense_layers is not None:
            object.__setattr__(self, "dense_layers", tuple(int(x) for x in self.dense_layers))
        if self.min_tokens is not None and (not isinstance(self.min_tokens, int) or self.min_tokens < 0):
            raise ValueError(f"min_tokens must be a non-negative int, got {self.min_tokens!r}")
        for name, params in dict(self.pattern_params).items():
            if name not in PATTERN_PARAMS:
                raise ValueError(f"pattern_params: unknown pattern {name!r}; known: {tuple(PATTERN_PARAMS)}")
            unknown = set(params) - set(PATTERN_PARAMS[name])
            if unknown:
                raise ValueError(
                    f"pattern_params[{name!r}]: unknown parameter(s) {sorted(unknown)}; "
                    f"{name} takes {sorted(PATTERN_PARAMS[name])}"
                )
            try:  # values are checked now, not at the first attention call
                HeadSpec.make(name, **params)
            except (TypeError, ValueError) as e:
                raise ValueError(f"pattern_params[{name!r}]: {e}") from None
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.block_size is not None and (
            isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1
        ):
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")
        if self.mask_cache_size < 1:
            raise ValueError(f"mask_cache_size must be >= 1, got {self.mask_cache_size}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {self.num_steps}")
        if self.adapter_steps not in ("sparse", "all"):
            raise ValueError(f"adapter_steps must be 'sparse' or 'all', got {self.adapter_steps!r}")
        if self.observer is not None and not callable(self.observer):
            raise TypeError(f"observer must be callable, got {type(self.observer).__name__}")

    def updated(self, **overrides: Any) -> SparseAttentionConfig:
        """A copy with ``overrides`` applied; unknown names raise with the list of known ones."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(
                f"unknown sparse-attention option(s) {unknown}; SparseAttentionConfig fields are {sorted(known)}"
            )
        return replace(self, **overrides)
