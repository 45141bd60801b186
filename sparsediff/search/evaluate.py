"""Measuring candidates on one self-attention call: sampled rows, exact vs candidate outputs, chunked.

For every head the evaluator samples query rows (:func:`sample_rows`), computes their exact attention
output against **all** keys, and every candidate's output on the same rows, never materialising more
than ``chunk_rows x N`` scores (``N x N`` never exists).

How a candidate's output is obtained without re-running attention per candidate: with the exact
probabilities ``P[r, j] = exp(s_rj - lse_r)`` of a sampled row, a block-sparse pattern keeps, for that
row, a set of key blocks ``K(r)`` (in the candidate's key order), and its output is

    out_c(r) = sum_{b in K(r)} PV[r, b] / sum_{b in K(r)} P[r, b]

with the per-block partial sums ``P[r, b] = sum_{j in block b} P[r, j]`` and ``PV[r, b] = sum_j P[r, j]
v_j``. The partial sums depend only on the key order, so all candidates that share one (every
natural-order pattern, every band of one reordered order...) share one ``R x N x D`` pass; a candidate
then costs ``R x Kb x D``. ``sum_{b in K(r)} P[r, b]`` is the row's attention recall (mass kept).

A ``remainder="pooled"`` candidate (:mod:`sparsediff.patterns.remainder`) also adds every key block
``b`` not in ``K(r)`` as one pooled key: weight ``E[r, b] = exp(scale q_r . kbar_b + log n_b - lse_r)``
(``lse_r`` the row's exact log-sum-exp) carrying the block's mean value ``vbar_b``, so
``out_c(r) = (sum_{K(r)} PV[r, b] + sum_{not K(r)} E[r, b] vbar_b) / (sum_{K(r)} P[r, b] + sum_{not K(r)}
E[r, b])`` -- another ``R x Kb x D``; its recall is that of the kept blocks.

Cross-step families, through :class:`LayerAccumulator` (consecutive profiled steps of one layer), by the
measurement their registration names (``cross_step_measure``; built-ins: ``skip`` -> ``"reuse_output"``,
``lse_cache`` -> ``"block_mass"``, which reads the spec's ``recall`` and ``min_frac``):

* ``"reuse_output"`` (``skip``): the head's exact output on the sampled rows at the previous profiled step, used as this
  step's output (density 0).
* ``"block_mass"`` (``lse_cache``), exact (when ``B x H x N^2 x D`` is within ``lse_exact_macs``): at each profiled step
  the exact block mass (softmax of every row, summed per block pair, chunked) is computed and the op's
  per-query-block selection (:func:`~sparsediff.patterns.lse_cache_select`'s rule) made; the mask chosen at the previous profiled step is
  applied at this one -- a mask one profiled-step gap old, as the op reuses its mask between refreshes
  (the profile driver sets ``refresh`` to that gap).
* ``"block_mass"``, approximate (larger calls, e.g. 32K tokens on CPU): per sampled row, the key blocks
  (natural order) reaching ``recall`` of the row's mass at the previous profiled step, applied to this
  step's rows (same sampled rows every step). The op selects per query block (the union of its rows' needs), so this density is a lower
  bound and the error optimistic; :attr:`LayerStats.lse_exact` records which was used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..layout import TokenLayout
from ..patterns.common import (
    apply_dense_tokens,
    block_token_counts,
    cdiv,
    dense_token_blocks,
    min_count,
    select_cumulative,
)
from ..patterns.registry import get_family
from ..patterns.remainder import block_means
from ..specs import HeadSpec
from .candidates import Structure, build_structures, check_candidates, default_candidates

__all__ = ["sample_rows", "LayerStats", "LayerAccumulator", "evaluate_call", "CHUNK_ELEMS"]

#: bound on the elements of one ``[rows, N]`` score chunk (float32: 64 MiB)
CHUNK_ELEMS = 1 << 24


def sample_rows(layout: TokenLayout, num_rows: int, seed: int = 0, device=None) -> torch.Tensor:
    """Stratified query rows: int64 ``[R]`` sorted token indices, ``R = min(num_rows, N)``.

    Strata: every frame of the primary grid split into spatial quadrants (top/bottom x left/right), and
    every token outside the grid (text, extra image segments) as one stratum. Rows are allotted to strata
    in proportion to their size (largest remainders, at least one per stratum while rows last), then
    drawn without replacement inside each stratum with a generator seeded by ``seed`` -- the same layout,
    ``num_rows`` and ``seed`` always give the same rows (the cross-step families rely on it).
    """
    N = layout.num_tokens
    if num_rows < 1:
        raise ValueError(f"num_rows must be >= 1, got {num_rows}")
    if num_rows >= N:
        return torch.arange(N, device=device)
    coords = layout.grid_coords()
    strata = torch.full((N,), -1, dtype=torch.int64)
    if layout.grid is not None:
        F, H, W = layout.grid
        on = coords[:, 0] >= 0
        c = coords[on]
        strata[on] = c[:, 0] * 4 + (c[:, 1] >= (H + 1) // 2).long() * 2 + (c[:, 2] >= (W + 1) // 2).long()
    # off-grid tokens: one stratum after the grid's
    strata[strata < 0] = int(strata.max()) + 1 if bool((strata >= 0).any()) else 0
    ids, counts = torch.unique(strata, return_counts=True)
    share = counts.double() * num_rows / N
    alloc = share.floor().long()
    alloc = torch.maximum(alloc, torch.ones_like(alloc)).clamp(max=counts)
    while int(alloc.sum()) > num_rows:  # more strata than rows: drop from the largest allocations
        alloc[int(torch.argmax(alloc))] -= 1
    rem = num_rows - int(alloc.sum())
    if rem > 0:
        frac = share - share.floor()
        frac[alloc >= counts] = -1.0
        for i in torch.argsort(frac, descending=True).tolist():
            if rem == 0:
                break
            if alloc[i] < counts[i]:
                alloc[i] += 1
                rem -= 1
    gen = torch.Generator().manual_seed(int(seed))
    rows = []
    for sid, a in zip(ids.tolist(), alloc.tolist()):
        if a == 0:
            continue
        members = (strata == sid).nonzero().flatten()
        rows.append(members[torch.randperm(members.numel(), generator=gen)[:a]])
    return torch.sort(torch.cat(rows)).values.to(device)


@dataclass
class LayerStats:
    """Per-(head, candidate) sums of one layer, mergeable across calls, steps, prompts and processes.

    Attributes:
        candidates: the candidate specs (columns).
        layout: the token layout measured.
        head_dim: D of the layer.
        err, recall, density: float64 ``[H, C]`` sums over samples (one sample = one (call, batch
            element) of a head) of the relative L2 error of the sampled rows' output, mean recall, density.
        count: float64 ``[H, C]`` number of samples (cross-step candidates start one step later).
        calls: attention calls measured; ``dense_seconds``: measured dense attention time summed over them
            (0 when not timed).
        lse_exact: whether lse_cache candidates were measured with the op's per-block selection (True) or
            the per-row approximation (False); None without lse_cache candidates.
    """

    candidates: tuple[HeadSpec, ...]
    layout: TokenLayout
    head_dim: int
    err: torch.Tensor
    recall: torch.Tensor
    density: torch.Tensor
    count: torch.Tensor
    calls: int = 0
    dense_seconds: float = 0.0
    timed_calls: int = 0
    lse_exact: bool | None = None

    @classmethod
    def empty(
        cls, candidates: Sequence[HeadSpec], layout: TokenLayout, heads: int, head_dim: int
    ) -> LayerStats:
        z = torch.zeros(heads, len(candidates), dtype=torch.float64)
        return cls(tuple(candidates), layout, int(head_dim), z.clone(), z.clone(), z.clone(), z.clone())

    @property
    def num_heads(self) -> int:
        return int(self.err.shape[0])

    def means(self) -> dict[str, torch.Tensor]:
        """``{"error", "recall", "density"}`` -> float64 ``[H, C]`` means (NaN where never measured)."""
        c = self.count
        return {
            n: torch.where(c > 0, getattr(self, n) / c.clamp_min(1), torch.nan)
            for n in ("err", "recall", "density")
        }

    def merge(self, other: LayerStats) -> LayerStats:
        """Sum of two stats of the same layer (same candidates, layout and heads); a new object."""
        if self.candidates != other.candidates:
            raise ValueError("cannot merge search statistics measured with different candidate lists")
        if (
            self.layout != other.layout
            or self.err.shape != other.err.shape
            or self.head_dim != other.head_dim
        ):
            raise ValueError(
                f"cannot merge statistics of different shapes: {self.layout} H={self.num_heads} D={self.head_dim} "
                f"vs {other.layout} H={other.num_heads} D={other.head_dim}"
            )
        return LayerStats(
            self.candidates,
            self.layout,
            self.head_dim,
            self.err + other.err,
            self.recall + other.recall,
            self.density + other.density,
            self.count + other.count,
            self.calls + other.calls,
            self.dense_seconds + other.dense_seconds,
            self.timed_calls + other.timed_calls,
            self.lse_exact if other.lse_exact is None else (other.lse_exact and self.lse_exact is not False),
        )


def _partials(
    P: torch.Tensor, v: torch.Tensor, k_perm: torch.Tensor | None, bs: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``P [r, N]`` probabilities, ``v [N, D]`` -> (``Pb [r, Kb]``, ``PVb [Kb, r, D]``) in the key order."""
    r, N = P.shape
    kb = cdiv(N, bs)
    if k_perm is not None:
        P = P.index_select(1, k_perm)
        v = v.index_select(0, k_perm)
    pad = kb * bs - N
    if pad:
        P = torch.nn.functional.pad(P, (0, pad))
        v = torch.nn.functional.pad(v, (0, 0, 0, pad))
    Pv = P.view(r, kb, bs)
    Pb = Pv.sum(-1)
    PVb = torch.bmm(Pv.transpose(0, 1), v.view(kb, bs, -1))  # [Kb, r, D]
    return Pb, PVb


def _masked_out(M: torch.Tensor, Pb: torch.Tensor, PVb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' output and recall of the kept blocks ``M [r, Kb]`` (empty rows: output 0, recall 0)."""
    Mf = M.to(Pb.dtype)
    rec = (Pb * Mf).sum(-1)
    num = torch.einsum("rk,krd->rd", Mf, PVb)
    out = num / rec.clamp_min(1e-30).unsqueeze(-1)
    return torch.where(rec.unsqueeze(-1) > 0, out, torch.zeros_like(out)), rec


def _pooled_out(
    M: torch.Tensor,
    Pb: torch.Tensor,
    PVb: torch.Tensor,
    pooled_logits: torch.Tensor,
    lse: torch.Tensor,
    vmean: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows' output and recall of the kept blocks ``M [r, Kb]`` plus the pooled remainder
    (:mod:`sparsediff.patterns.remainder`): every block not kept as one key with logit
    ``pooled_logits [r, Kb]`` carrying ``vmean [Kb, D]``. With the exact probabilities the kept part is
    ``sum_kept PV`` over ``sum_kept P`` and a pooled key weighs ``exp(logit - lse)`` (``lse [r]`` the row's
    exact log-sum-exp), so ``out = (sum_kept PV + E vmean) / (sum_kept P + sum E)``."""
    Mf = M.to(Pb.dtype)
    rec = (Pb * Mf).sum(-1)
    num = torch.einsum("rk,krd->rd", Mf, PVb)
    E = torch.exp(pooled_logits - lse.unsqueeze(-1)) * (1.0 - Mf)  # <= 1: a pooled logit <= its block's lse
    den = rec + E.sum(-1)
    out = (num + E @ vmean) / den.clamp_min(1e-30).unsqueeze(-1)
    return torch.where(den.unsqueeze(-1) > 0, out, torch.zeros_like(out)), rec


def _sum_of_squares(x: torch.Tensor) -> float:
    return float(x.double().pow(2).sum())


@dataclass
class _Previous:
    """What the next profiled step of the same layer call needs (sampled rows only)."""

    key: tuple
    out: torch.Tensor  # [B, H, R, D] exact outputs of the sampled rows
    sel: dict[float, torch.Tensor] = field(default_factory=dict)  # recall -> bool [B, H, R, Kb]
    masks: dict[HeadSpec, torch.Tensor] = field(default_factory=dict)  # lse_cache spec -> [B, H, Qb, Kb]


def evaluate_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    candidates: Sequence[HeadSpec],
    stats: LayerStats,
    *,
    block_size: int = 64,
    num_rows: int = 512,
    seed: int = 0,
    scale: float | None = None,
    previous: _Previous | None = None,
    lse_exact_macs: float | None = None,
) -> _Previous:
    """Measure ``candidates`` on one call (q/k/v ``[B, H, N, D]``) and add the results to ``stats``.

    ``previous`` is what the last call of the same layer returned (cross-step families); returns what
    the next call needs. Cross-step candidates without a usable ``previous`` are not counted.
    ``lse_exact_macs``: largest ``B*H*N*N*D`` for the exact lse_cache path (``None``: 2**33 on CPU,
    2**44 on CUDA).
    """
    if q.dim() != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"q, k, v must be [B, H, N, D] of one self-attention call, got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    B, H, N, D = q.shape
    if N != layout.num_tokens:
        raise ValueError(f"q has N={N} tokens but {layout} has {layout.num_tokens}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    bs = int(block_size)
    scale = float(D**-0.5 if scale is None else scale)
    dev = q.device
    cands = list(candidates)
    col = {c: i for i, c in enumerate(cands)}
    structs = build_structures(cands, q, k, layout, bs, scale)
    dens = [s.density(N, bs) for s in structs]
    rows = sample_rows(layout, num_rows, seed, dev)
    R = rows.numel()
    kb = cdiv(N, bs)
    dense_blk = dense_token_blocks(layout.dense_mask(dev), bs)  # [Kb] natural order
    col_tokens = block_token_counts(N, bs, dev)  # [Kb] tokens per key block
    text_rows = layout.dense_mask(dev)[rows]  # dense rows: every pattern keeps them in full
    key = (layout, B, H, R, bs)
    prev = previous if previous is not None and previous.key == key else None
    lse_specs = [c for c in cands if _measure(c) == "block_mass"]
    skip_specs = [c for c in cands if _measure(c) == "reuse_output"]
    if lse_exact_macs is None:
        lse_exact_macs = 2.0**44 if dev.type == "cuda" else 2.0**33
    lse_exact = bool(lse_specs) and float(B) * H * N * N * D <= lse_exact_macs
    stats.lse_exact = lse_exact if lse_specs else stats.lse_exact
    lse_masks: dict[HeadSpec, torch.Tensor] = {}
    if lse_exact:
        # the op's per-query-block rule (lse_cache_select) on this step's exact block mass, one pass for all recalls
        mass = _block_mass_exact(q, k, scale, bs)
        p = mass / mass.sum(-1, keepdim=True).clamp_min(1e-30)
        dblk = dense_token_blocks(layout.dense_mask(dev), bs)
        for spec in lse_specs:
            mf = float(spec.get("min_frac"))
            keep = select_cumulative(p, float(spec.get("recall")), min_count(mf, kb) if mf > 0 else 1)
            lse_masks[spec] = apply_dense_tokens(keep, dblk)
        del mass, p
        if prev is not None:
            for spec in lse_specs:
                if spec in prev.masks:
                    st = Structure(spec, ("natural",), None, None, prev.masks[spec])
                    structs.append(st)
                    dens.append(st.density(N, bs))
    row_lse_specs = [] if lse_exact else lse_specs
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(structs):
        groups.setdefault(s.group, []).append(i)
    if row_lse_specs:
        groups.setdefault(("natural",), [])
    chunk = max(1, min(R, CHUNK_ELEMS // max(1, N)))
    out_rows = torch.empty(B, H, R, D, dtype=torch.float32, device=dev)
    new_sel = {
        float(c.get("recall")): torch.zeros(B, H, R, kb, dtype=torch.bool, device=dev) for c in lse_specs
    }
    stats.calls += 1
    any_pooled = any(st.spec.remainder == "pooled" for st in structs)
    log_n = col_tokens.float().log()  # [Kb] log tokens per key block (any key order: blocks are positions)
    for b in range(B):
        for h in range(H):
            qh, kh, vh = q[b, h].float(), k[b, h].float(), v[b, h].float()
            e2 = torch.zeros(len(cands), dtype=torch.float64)
            rec = torch.zeros(len(cands), dtype=torch.float64)
            ref2 = 0.0
            means: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # key order -> block-mean k, v
            for r0 in range(0, R, chunk):
                rr = rows[r0 : r0 + chunk]
                qr = qh.index_select(0, rr)
                s = (qr @ kh.T) * scale  # [r, N]
                lse_rows = torch.logsumexp(s, -1) if any_pooled else None
                P = torch.softmax(s, -1)
                del s
                exact = P @ vh
                out_rows[b, h, r0 : r0 + rr.numel()] = exact
                ref2 += _sum_of_squares(exact)
                for gkey, members in groups.items():
                    k_perm = None
                    if members:
                        _, k_perm, _ = structs[members[0]].head(b, h)
                    Pb, PVb = _partials(P, vh, k_perm, bs)
                    pooled_logits = vmean = None
                    if any(structs[i].spec.remainder == "pooled" for i in members):
                        if gkey not in means:
                            kp = kh if k_perm is None else kh.index_select(0, k_perm)
                            vp = vh if k_perm is None else vh.index_select(0, k_perm)
                            km, vm = (block_means(x.view(1, 1, N, D), bs)[0, 0] for x in (kp, vp))
                            means[gkey] = (km, vm)
                        km, vmean = means[gkey]
                        pooled_logits = (qr @ km.T) * scale + log_n  # [r, Kb]
                    for i in members:
                        st = structs[i]
                        q_pos, _, bb = st.head(b, h)
                        qb = (rr if q_pos is None else q_pos.index_select(0, rr)) // bs
                        if st.spec.remainder == "pooled":
                            o, rc = _pooled_out(
                                bb.index_select(0, qb), Pb, PVb, pooled_logits, lse_rows, vmean
                            )
                        else:
                            o, rc = _masked_out(bb.index_select(0, qb), Pb, PVb)
                        c = col[st.spec]
                        e2[c] += _sum_of_squares(o - exact)
                        rec[c] += float(rc.double().sum())
                    if gkey == ("natural",) and row_lse_specs:
                        tr = text_rows[r0 : r0 + rr.numel()]
                        pn = Pb / Pb.sum(-1, keepdim=True).clamp_min(1e-30)
                        for spec in row_lse_specs:
                            rcl = float(spec.get("recall"))
                            sel = select_cumulative(pn, rcl, 1) | dense_blk.view(1, -1) | tr.view(-1, 1)
                            new_sel[rcl][b, h, r0 : r0 + rr.numel()] = sel
                            if prev is not None and rcl in prev.sel:
                                M = prev.sel[rcl][b, h, r0 : r0 + rr.numel()]
                                o, rc = _masked_out(M, Pb, PVb)
                                c = col[spec]
                                e2[c] += _sum_of_squares(o - exact)
                                rec[c] += float(rc.double().sum())
                del P
            denom = math.sqrt(max(ref2, 1e-300))
            for i, st in enumerate(structs):
                c = col[st.spec]
                d = dens[i]
                stats.err[h, c] += math.sqrt(float(e2[c])) / denom
                stats.recall[h, c] += float(rec[c]) / R
                stats.density[h, c] += float(d[b if d.shape[0] > 1 else 0, h if d.shape[1] > 1 else 0])
                stats.count[h, c] += 1
            if prev is not None:
                for spec in row_lse_specs:
                    rcl = float(spec.get("recall"))
                    if rcl not in prev.sel:
                        continue
                    c = col[spec]
                    stats.err[h, c] += math.sqrt(float(e2[c])) / denom
                    stats.recall[h, c] += float(rec[c]) / R
                    stats.density[h, c] += float((prev.sel[rcl][b, h].float() @ col_tokens).mean()) / N
                    stats.count[h, c] += 1
                for spec in skip_specs:
                    c = col[spec]
                    stats.err[h, c] += math.sqrt(_sum_of_squares(prev.out[b, h] - out_rows[b, h])) / denom
                    stats.recall[h, c] += 0.0
                    stats.count[h, c] += 1
    return _Previous(key, out_rows, new_sel, lse_masks)


def _block_mass_exact(q: torch.Tensor, k: torch.Tensor, scale: float, bs: int) -> torch.Tensor:
    """float32 ``[B, H, Qb, Kb]``: ``sum over rows of q block, cols of k block of softmax(q k^T)`` -- the
    block mass with this call's exact LSE (what :func:`~sparsediff.block_mass.block_mass` computes with a
    cached one), in chunks of whole query blocks (no ``N x N`` buffer)."""
    B, H, N, _ = q.shape
    qb, kb = cdiv(N, bs), cdiv(N, bs)
    out = torch.empty(B, H, qb, kb, dtype=torch.float32, device=q.device)
    rows = max(bs, (CHUNK_ELEMS // max(1, N)) // bs * bs)
    pad = kb * bs - N
    for b in range(B):
        for h in range(H):
            kh = k[b, h].float()
            for r0 in range(0, N, rows):
                P = torch.softmax((q[b, h, r0 : r0 + rows].float() @ kh.T) * scale, -1)
                r = P.shape[0]
                rpad = cdiv(r, bs) * bs - r
                P = torch.nn.functional.pad(P, (0, pad, 0, rpad))
                out[b, h, r0 // bs : r0 // bs + cdiv(r, bs)] = P.view(cdiv(r, bs), bs, kb, bs).sum((1, 3))
    return out


class LayerAccumulator:
    """Statistics of one layer over consecutive profiled calls (steps, prompts), streaming.

    ``add(q, k, v, layout)`` measures one call; consecutive ``add`` calls are consecutive profiled steps
    of the same layer (and CFG branch): the cross-step families (``lse_cache``, ``skip``) are measured
    from the second call on, against the previous one. Only the sampled rows' outputs and block choices
    of the last call are kept between calls. Call :meth:`new_sequence` between pipeline runs (prompts)
    so that a prompt's first step is not compared with the previous prompt's last.

    Args:
        candidates: specs to measure (``None``: :func:`default_candidates` of the first call's layout,
            cross-step families included).
        block_size, num_rows, seed: as :func:`sparsediff.search.search_attention`.
        lse_exact_macs: size bound of the exact lse_cache measurement (see :func:`evaluate_call`).
    """

    def __init__(
        self,
        candidates: Sequence[HeadSpec] | None = None,
        *,
        block_size: int = 64,
        num_rows: int = 512,
        seed: int = 0,
        lse_exact_macs: float | None = None,
    ) -> None:
        if num_rows < 1:
            raise ValueError(f"num_rows must be >= 1, got {num_rows}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.candidates = None if candidates is None else tuple(candidates)
        self.block_size = int(block_size)
        self.num_rows = int(num_rows)
        self.seed = int(seed)
        self.lse_exact_macs = lse_exact_macs
        self.stats: LayerStats | None = None
        self._prev: _Previous | None = None

    def new_sequence(self) -> None:
        """Forget the previous call (next call starts a new run of steps)."""
        self._prev = None

    def add(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        *,
        scale: float | None = None,
    ) -> None:
        """Measure one call (q/k/v ``[B, H, N, D]``); see the class docstring."""
        if self.candidates is None:
            self.candidates = tuple(default_candidates(layout, self.block_size, cross_step=True))
        cands = check_candidates(self.candidates, layout)
        if self.stats is None:
            self.stats = LayerStats.empty(cands, layout, q.shape[1], q.shape[3])
        elif self.stats.layout != layout or self.stats.num_heads != q.shape[1]:
            raise ValueError(
                f"this accumulator measured {self.stats.layout} with {self.stats.num_heads} heads; got "
                f"{layout} with {q.shape[1]} heads (use one accumulator per layer and resolution)"
            )
        with torch.no_grad():
            self._prev = evaluate_call(
                q,
                k,
                v,
                layout,
                cands,
                self.stats,
                block_size=self.block_size,
                num_rows=self.num_rows,
                seed=self.seed,
                scale=scale,
                previous=self._prev,
                lse_exact_macs=self.lse_exact_macs,
            )


def cross_step(spec: HeadSpec) -> bool:
    """Whether ``spec`` keeps state across steps (measured over two profiled steps)."""
    return spec.is_cross_step


def _measure(spec: HeadSpec) -> str | None:
    """How a cross-step candidate is measured (its family's ``cross_step_measure``), None otherwise."""
    return get_family(spec.pattern).cross_step_measure if spec.is_cross_step else None
