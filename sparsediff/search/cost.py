"""Predicted time of a head's attention under a candidate pattern.

``cost = computed blocks x block_time + overheads``, per head and call. Each pattern family declares its
own cost terms (``cost=`` of its registration, in ``sparsediff/patterns/<name>.py``) from the units this
module defines on :class:`CostModel`; a family without cost terms is priced by its computed blocks:

* :meth:`CostModel.block_cost` -- computed blocks = ``density x Qb x Kb`` at ``block_time``;
* :meth:`CostModel.dense_cost` -- ``Qb x Kb x dense_block_time`` (the dense kernel, not the sparse op at
  density 1; ``dense``);
* :meth:`CostModel.permute_cost` -- gather of q, k, v and scatter of the output, ``4 x N x D`` elements
  at ``elem_time`` (permuted heads: ``tile``, ``reordered``);
* :meth:`CostModel.pooled_selection_cost` -- pooling (``2 x N x D`` elements) plus the pooled score matrix
  (``Qb x Kb x D`` multiply-adds at ``flop_time``, and the sort) (``topp``, reordered ``select="topp"``);
* :meth:`CostModel.kmeans_cost` -- k-means on q and k, ``2 x iters x N x clusters x D`` multiply-adds
  (reordered ``order="cluster"``, with the final assignment and the init as two more iterations);
* :meth:`CostModel.block_mass_cost` -- one QK^T pass over all blocks (``mass_factor`` of a block each)
  every ``refresh`` steps, amortised (``lse_cache``);
* :meth:`CostModel.copy_cost` -- one copy of a head's output, ``N x D`` elements (``skip``);
* :meth:`CostModel.pooled_remainder_cost` -- added by :meth:`CostModel.cost` itself for every
  ``remainder="pooled"`` head (``2 x N x Kb x D`` multiply-adds and :data:`POOLED_PASSES` passes over ``N x Kb``);
* :meth:`CostModel.cached_remainder_cost` -- added likewise for every ``remainder="cached"`` head (a dense
  pass every ``remainder_refresh`` steps, amortised, and the merge on every call).

Constants come from a :class:`CostModel`. :meth:`CostModel.default` returns documented constants for
a device kind (CPU: the PyTorch reference path of a few-core machine; CUDA: an H100-class GPU with the
Triton kernel), :meth:`CostModel.calibrate` times the real op at the layer's shape on the current
device (the Triton kernel on a GPU, the reference path on CPU) and fits ``block_time``. Calibrations
are kept in a :class:`CostCache` -- an explicit object, optionally backed by a JSON file -- keyed by
``(device name, dtype, head dim, block size)``; nothing is cached process-wide.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..layout import TokenLayout
from ..patterns.common import cdiv
from ..patterns.registry import REMAINDER_REFRESH_PARAM, get_family
from ..specs import HeadSpec

__all__ = ["CostModel", "CostCache", "device_name"]


def device_name(device: torch.device | str) -> str:
    """A stable name of the device kind for cache keys (``"cpu"``, ``"cuda:NVIDIA H100 80GB HBM3"``)."""
    d = torch.device(device)
    if d.type == "cuda":
        return "cuda:" + torch.cuda.get_device_name(d)
    return d.type


#: Element passes over the ``N x Kb`` pooled scores of a ``remainder="pooled"`` head (bias, log-sum-exp,
#: exponent, mask). Checked against the CPU (2-core machine, one thread, N = 4096, Kb = 64, D = 32,
#: 2026-12-05): six pooled tile heads add 12 ms to a 24 ms sparse call, 2.0 ms per head; the CPU constants
#: with 4 passes predict 2.3 ms.
POOLED_PASSES = 4
#: Element passes over ``N x D`` of a ``remainder="cached"`` head's merge on every call (read the stored
#: remainder and the kept part, weight, add, write).
CACHED_MERGE_PASSES = 5


@dataclass(frozen=True)
class CostModel:
    """Per-unit times (seconds) the predicted cost of a head is made of (see the module docstring).

    Attributes:
        block_time: one computed ``block x block`` tile of the sparse op (QK^T, softmax, PV) at ``head_dim``.
        dense_block_time: one tile of dense attention (the baseline kernel; SDPA / flash on GPU).
        elem_time: moving one element (gather / scatter / pooling).
        flop_time: one multiply-add of small dense matmuls (pooled scores, k-means).
        mass_factor: cost of a block in the LSE block-mass pass relative to ``block_time`` (QK^T only).
        block_size, head_dim, dtype, device: what the constants are for.
        source: ``"constants"`` or ``"calibrated"``.
    """

    block_time: float
    dense_block_time: float
    elem_time: float
    flop_time: float
    mass_factor: float = 0.5
    block_size: int = 64
    head_dim: int = 128
    dtype: str = "float32"
    device: str = "cpu"
    source: str = "constants"

    # ------------------------------------------------------------------ constructors
    @classmethod
    def default(
        cls,
        device: torch.device | str = "cpu",
        *,
        head_dim: int = 128,
        block_size: int = 64,
        dtype: Any = None,
    ) -> CostModel:
        """Documented constants (no timing).

        CPU (PyTorch reference path, fp32): 2e10 multiply-adds/s for the attention tiles
        (``4 x bs^2 x D`` flops per tile -> ``block_time``), the same for dense SDPA, 2e9 elements/s for
        gathers, 1e10 multiply-adds/s for small matmuls. CUDA (Triton kernel, bf16, H100-class): 4e14
        flop/s for the sparse op (~70 % of cuDNN's ~576 TFLOP/s), 5.5e14 for dense, 1e12 elements/s
        (HBM bandwidth / element size), 1e13 multiply-adds/s for small matmuls. Ratios matter more than
        absolute values: the search compares candidates and reports speedups.
        """
        d = torch.device(device)
        flops = 4.0 * block_size * block_size * head_dim
        dt = (
            str(dtype).replace("torch.", "")
            if dtype is not None
            else ("bfloat16" if d.type == "cuda" else "float32")
        )
        if d.type == "cuda":
            return cls(
                flops / 4e14, flops / 5.5e14, 1e-12, 1e-13, 0.5, block_size, head_dim, dt, device_name(d)
            )
        return cls(flops / 2e10, flops / 2e10, 5e-10, 1e-10, 0.5, block_size, head_dim, dt, device_name(d))

    @classmethod
    def calibrate(
        cls,
        device: torch.device | str,
        *,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        num_tokens: int = 4096,
        heads: int = 2,
        backend: str = "auto",
        repeats: int = 3,
    ) -> CostModel:
        """Time the block-sparse op on random q/k/v ``[1, heads, num_tokens, head_dim]`` at two densities
        (all blocks, and the diagonal band of 1/8 of the blocks), fit ``block_time`` (slope per block)
        and time dense SDPA for ``dense_block_time``; element/flop times from a gather and a matmul."""
        from ..mask import BlockSparseMask
        from ..ops import block_sparse_attention

        d = torch.device(device)
        g = torch.Generator(device="cpu").manual_seed(0)
        shape = (1, heads, num_tokens, head_dim)
        q, k, v = (torch.randn(shape, generator=g).to(device=d, dtype=dtype) for _ in range(3))
        nb = cdiv(num_tokens, block_size)
        full = BlockSparseMask.full(1, heads, block_size, (num_tokens, num_tokens)).to(d)
        band = max(1, nb // 8)
        idx = torch.arange(nb)
        bb = ((idx.view(-1, 1) - idx.view(1, -1)).abs() < (band + 1) // 2 + 1).expand(1, heads, nb, nb)
        sparse = BlockSparseMask.from_dense(bb.contiguous(), block_size, (num_tokens, num_tokens)).to(d)

        def timed(fn) -> float:
            fn()
            _sync(d)
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                _sync(d)
                best = min(best, time.perf_counter() - t0)
            return best

        t_full = timed(lambda: block_sparse_attention(q, k, v, full, backend=backend))
        t_sparse = timed(lambda: block_sparse_attention(q, k, v, sparse, backend=backend))
        n_full = heads * nb * nb
        n_sparse = float(bb.sum())
        slope = (t_full - t_sparse) / max(1.0, n_full - n_sparse)
        if slope <= 0:
            slope = t_full / n_full
        t_dense = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        perm = torch.randperm(num_tokens, generator=g).to(d)
        t_gather = timed(lambda: q.index_select(2, perm))
        a = torch.randn(256, head_dim, generator=g).to(device=d, dtype=dtype)
        t_mm = timed(lambda: a @ a.T)
        return cls(
            block_time=slope,
            dense_block_time=t_dense / n_full,
            elem_time=t_gather / q.numel(),
            flop_time=t_mm / (256 * 256 * head_dim),
            block_size=block_size,
            head_dim=head_dim,
            dtype=str(dtype).replace("torch.", ""),
            device=device_name(d),
            source="calibrated",
        )

    # ------------------------------------------------------------------ prediction
    def dense_cost(self, layout: TokenLayout) -> float:
        """Predicted time of one head's dense attention at ``layout``."""
        nb = cdiv(layout.num_tokens, self.block_size)
        return nb * nb * self.dense_block_time

    def block_cost(self, density: float, layout: TokenLayout) -> float:
        """The sparse op computing a ``density`` fraction of the ``Qb x Kb`` blocks of one head."""
        nb = cdiv(layout.num_tokens, self.block_size)
        return float(density) * nb * nb * self.block_time

    def permute_cost(self, layout: TokenLayout) -> float:
        """Gathering q, k, v into a head's token order and scattering its output back."""
        return 4 * layout.num_tokens * self.head_dim * self.elem_time

    def pooled_selection_cost(self, layout: TokenLayout) -> float:
        """A dynamic block selection on mean-pooled q/k: pooling, the pooled scores and their sort."""
        N, D = layout.num_tokens, self.head_dim
        nb = cdiv(N, self.block_size)
        return 2 * N * D * self.elem_time + nb * nb * (D * self.flop_time + 4 * self.elem_time)

    def kmeans_cost(self, layout: TokenLayout, clusters: int, iters: int) -> float:
        """``iters`` k-means passes with ``clusters`` centroids over the queries and over the keys."""
        return 2 * iters * layout.num_tokens * clusters * self.head_dim * self.flop_time

    def block_mass_cost(self, layout: TokenLayout, refresh: int) -> float:
        """One QK^T block-mass pass over every block, once per ``refresh`` steps."""
        nb = cdiv(layout.num_tokens, self.block_size)
        return nb * nb * self.block_time * self.mass_factor / max(1, int(refresh))

    def pooled_remainder_cost(self, layout: TokenLayout) -> float:
        """The pooled remainder of a head (``remainder="pooled"``, :mod:`sparsediff.patterns.remainder`):
        pooling k and v (``2 x N x D`` elements), the ``N x Kb`` pooled scores and their product with the
        mean values (``2 x N x Kb x D`` multiply-adds), masking, softmax and the merge (:data:`POOLED_PASSES` x ``N x Kb``
        elements)."""
        N, D = layout.num_tokens, self.head_dim
        nb = cdiv(N, self.block_size)
        return 2 * N * D * self.elem_time + N * nb * (2 * D * self.flop_time + POOLED_PASSES * self.elem_time)

    def cached_remainder_cost(self, layout: TokenLayout, refresh: int) -> float:
        """The stored remainder of a head (``remainder="cached"``, :mod:`sparsediff.patterns.remainder`):
        one dense pass and the split every ``refresh`` steps (amortised), and on every call the
        log-sum-exp merge (:data:`CACHED_MERGE_PASSES` passes over ``N x D`` elements)."""
        N, D = layout.num_tokens, self.head_dim
        merge = CACHED_MERGE_PASSES * N * D * self.elem_time
        return self.dense_cost(layout) / max(1, int(refresh)) + merge

    def copy_cost(self, layout: TokenLayout) -> float:
        """Copying one head's stored output ``[N, D]``."""
        return layout.num_tokens * self.head_dim * self.elem_time

    def cost(self, spec: HeadSpec, density: float, layout: TokenLayout) -> float:
        """Predicted time of one head under ``spec`` computing a ``density`` fraction of its blocks: the
        cost terms its family registered (``cost(model, spec, density, layout)``), else the blocks; plus
        :meth:`pooled_remainder_cost` for ``remainder="pooled"`` heads, :meth:`cached_remainder_cost` for
        ``remainder="cached"`` ones (the family is asked about the spec without it)."""
        fam = get_family(spec.pattern)
        extra = 0.0
        if spec.remainder == "pooled":
            extra = self.pooled_remainder_cost(layout)
        elif spec.remainder == "cached":
            extra = self.cached_remainder_cost(layout, int(spec.get(REMAINDER_REFRESH_PARAM)))
        base = spec.without_remainder()
        if fam.cost is None:
            return self.block_cost(density, layout) + extra
        return float(fam.cost(self, base, density, layout)) + extra

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CostModel:
        return cls(**d)

    def key(self) -> str:
        return cost_key(self.device, self.dtype, self.head_dim, self.block_size)


def cost_key(device: str, dtype: Any, head_dim: int, block_size: int) -> str:
    return f"{device}|{str(dtype).replace('torch.', '')}|d{int(head_dim)}|b{int(block_size)}"


def _sync(d: torch.device) -> None:
    if d.type == "cuda":
        torch.cuda.synchronize(d)


class CostCache:
    """Calibrated :class:`CostModel` s keyed by device / dtype / head dim / block size.

    An explicit object (one per search); ``path`` makes it persistent (JSON, written atomically).
    :meth:`get` returns the cached model, else calibrates (``calibrate=True``) or falls back to
    :meth:`CostModel.default` -- uncalibrated defaults are not stored.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._d: dict[str, CostModel] = {}
        if self.path is not None and self.path.exists():
            try:
                raw = json.loads(self.path.read_text(encoding="utf-8"))
                self._d = {k: CostModel.from_dict(v) for k, v in raw.items()}
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(
                    f"cost cache {self.path} is unreadable ({e}); delete it to recalibrate"
                ) from e

    def get(
        self,
        device: torch.device | str,
        *,
        head_dim: int,
        block_size: int,
        dtype: torch.dtype = torch.float32,
        calibrate: bool = False,
        **calib_kwargs: Any,
    ) -> CostModel:
        key = cost_key(device_name(device), dtype, head_dim, block_size)
        m = self._d.get(key)
        if m is not None:
            return m
        if not calibrate:
            return replace(CostModel.default(device, head_dim=head_dim, block_size=block_size, dtype=dtype))
        m = CostModel.calibrate(device, head_dim=head_dim, block_size=block_size, dtype=dtype, **calib_kwargs)
        self._d[key] = m
        self._save()
        return m

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({k: m.to_dict() for k, m in self._d.items()}, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)

    def __len__(self) -> int:
        return len(self._d)
