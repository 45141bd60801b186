"""Candidate head specs of the search and the block structure each one gives a head.

Everything here goes through the pattern registry (:mod:`sparsediff.patterns.registry`), so a family
registered with :func:`sparsediff.register_pattern` is enumerated and measured exactly like a built-in:
:func:`default_candidates` concatenates the families' own candidate grids (``candidates=`` of their
registration, sized from the layout), :func:`family` is their ``label``, and :func:`build_structures`
turns candidates into what the evaluator needs per head -- the query / key token orders and the
``[Qb, Kb]`` block bools -- by running each family's group work (the code the attention op runs) on the
call's q/k, so what is measured is what will run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..layout import TokenLayout
from ..patterns.common import block_token_counts
from ..patterns.registry import CROSS_STEP, GroupCall, families, get_family
from ..specs import HeadSpec

__all__ = [
    "CROSS_STEP_PATTERNS",
    "cross_step_patterns",
    "default_candidates",
    "family",
    "Structure",
    "build_structures",
    "check_candidates",
]


def cross_step_patterns() -> frozenset[str]:
    """Names of the registered families whose heads keep state across denoising steps (the cross-step
    kind) -- the search measures them over two profiled steps (:class:`LayerAccumulator`)."""
    return frozenset(f.name for f in families() if not callable(f.kind) and f.kind == CROSS_STEP)


#: The built-in cross-step families (a snapshot at import; :func:`cross_step_patterns` also lists user
#: families, and ``spec.is_cross_step`` decides per spec).
CROSS_STEP_PATTERNS = cross_step_patterns()


def family(spec: HeadSpec) -> str:
    """Family label used in reports, heatmaps and comparisons: the family's registered ``label`` (default
    its name; the built-in ``reordered`` heads are split into ``"reordered"`` and ``"cluster"``)."""
    return get_family(spec.pattern).label_of(spec)


def default_candidates(
    layout: TokenLayout, block_size: int = 64, *, cross_step: bool = True, remainder: bool = False
) -> list[HeadSpec]:
    """The default candidate grid for ``layout``: every registered family's own grid, in registration order
    (built-ins: dense, radial, tile, reordered, topp, lse_cache, skip; see each family's module), each
    sized from the layout and block size. Families without a grid are not searched; families that need a
    grid give nothing for a layout without one. ``cross_step=False`` leaves out the cross-step families
    (they need two profiled steps, :class:`~sparsediff.search.LayerAccumulator`).

    ``remainder=True`` (opt-in; ``sparsediff search --remainder pooled``): for the families with the
    ``remainder`` parameter (``radial``, ``tile``, ``reordered``, ``topp``; :mod:`sparsediff.patterns.remainder`)
    each grid spec is followed by its ``remainder="pooled"`` variant (same mask, the unselected key blocks
    added as pooled keys): the search measures both and charges the pooled part (its cost, and under a
    density budget its cost as an equivalent density), so it is chosen where it pays. Off by default until
    its end-to-end gain is measured on real models.
    """
    out: list[HeadSpec] = []
    for fam in families():
        if fam.candidates is None or (fam.needs_grid and layout.grid is None):
            continue
        for spec in fam.candidates(layout, block_size):
            if not isinstance(spec, HeadSpec) or spec.pattern != fam.name:
                raise ValueError(
                    f"pattern {fam.name!r}: its candidate grid gave {spec!r}, not a HeadSpec of it"
                )
            if not cross_step and spec.is_cross_step:
                continue
            variants = [spec]
            if remainder and fam.remainder and not spec.is_cross_step and spec.remainder == "none":
                variants.append(spec.with_remainder("pooled"))
            for s in variants:
                if s not in out:
                    out.append(s)
    return out


def check_candidates(candidates: Sequence[HeadSpec], layout: TokenLayout) -> list[HeadSpec]:
    """Validate a candidate list (HeadSpecs, no duplicates, grid patterns only with a grid)."""
    out = []
    for i, c in enumerate(candidates):
        if not isinstance(c, HeadSpec):
            raise TypeError(f"candidates[{i}] must be a HeadSpec, got {type(c).__name__}")
        if c in out:
            raise ValueError(f"candidates[{i}] = {c!r} is listed twice")
        fam = get_family(c.pattern)
        if layout.grid is None and fam.needs_grid:
            raise ValueError(f"candidates[{i}] = {c!r} needs a layout with a video/image grid, got {layout}")
        if c.is_cross_step and fam.cross_step_measure is None:
            raise ValueError(
                f"candidates[{i}] = {c!r} is a cross-step family without a cross_step_measure: the search "
                "cannot measure it (see sparsediff.register_pattern)"
            )
        out.append(c)
    if not out:
        raise ValueError("no candidates to search")
    return out


@dataclass
class Structure:
    """What one candidate computes for the heads of one call.

    Attributes:
        spec: the candidate.
        group: key of its key-token order (candidates sharing it share the per-block partial sums).
        q_pos: int64 ``[N]`` or ``[B, H, N]``: position of every natural-order token in the query order.
        k_perm: int64 ``[N]`` / ``[B, H, N]`` key order (``k_perm[i]`` = natural token at position ``i``),
            or None for the natural order.
        blocks: bool ``[Bm, Hm, Qb, Kb]`` kept (query block, key block) pairs in those orders
            (``Bm`` / ``Hm`` 1 when shared).
    """

    spec: HeadSpec
    group: tuple
    q_pos: torch.Tensor | None
    k_perm: torch.Tensor | None
    blocks: torch.Tensor

    def head(self, b: int, h: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
        """``(q_pos [N] | None, k_perm [N] | None, blocks [Qb, Kb])`` of batch ``b``, head ``h``."""

        def pick(t):
            if t is None or t.dim() == 1:
                return t
            return t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0]

        bb = self.blocks
        return (
            pick(self.q_pos),
            pick(self.k_perm),
            bb[b if bb.shape[0] > 1 else 0, h if bb.shape[1] > 1 else 0],
        )

    def density(self, num_tokens: int, block_size: int) -> torch.Tensor:
        """float64 ``[Bm, Hm]``: fraction of query x key pairs computed (ragged last blocks counted
        exactly, as :meth:`sparsediff.BlockSparseMask.density_per_head`)."""
        c = block_token_counts(num_tokens, block_size, self.blocks.device).double()
        pairs = torch.einsum("bhqk,q,k->bh", self.blocks.double(), c, c)
        return pairs / float(num_tokens * num_tokens)


class _CallCache:
    """The mask cache of one measured call (static masks and orders shared by the candidates)."""

    def __init__(self) -> None:
        self._d: dict = {}

    def get_or_build(self, key, build):
        if key not in self._d:
            self._d[key] = build()
        return self._d[key]


def build_structures(
    candidates: Sequence[HeadSpec],
    q: torch.Tensor,
    k: torch.Tensor,
    layout: TokenLayout,
    block_size: int,
    scale: float,
) -> list[Structure]:
    """Block structures of the single-step candidates for q/k ``[B, H, N, D]`` (cross-step candidates are
    measured by the accumulator and skipped here).

    Each candidate runs its family's group work (:meth:`PatternFamily.group_work`, as the attention op does)
    for all heads of the call, without a layer state; candidates share static masks, token orders and
    per-call data-dependent results (k-means) through one call cache. Candidates whose key order is the
    same object share a ``group`` (and the evaluator's per-block partial sums).
    """
    heads = tuple(range(q.shape[1]))
    call = GroupCall(q, k, k, layout, int(block_size), float(scale), None, None, _CallCache(), "auto")
    out = []
    built: dict[HeadSpec, Structure] = {}  # by the spec without its remainder (the same mask and orders)
    for spec in candidates:
        if spec.is_cross_step:
            continue
        base = spec.without_remainder()
        st = built.get(base)
        if st is None:
            work = get_family(spec.pattern).group_work(call, base, heads)
            perm_k = work.perm_k if work.perm_k is not None else work.perm_q
            q_pos = None if work.perm_q is None else work.perm_q.inv
            k_perm = None if perm_k is None else perm_k.perm
            group = (
                ("natural",) if k_perm is None else ("order", id(k_perm))
            )  # alive as long as the structure
            st = built[base] = Structure(base, group, q_pos, k_perm, work.mask.to_dense())
        out.append(Structure(spec, st.group, st.q_pos, st.k_perm, st.blocks))
    return out
