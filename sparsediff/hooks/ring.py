"""Sparse attention under ring (and Ulysses x ring) context parallelism: one rank's queries against one
visiting K/V chunk, with the layer's global block mask.

diffusers' ring attention (``TemplatedRingAttention``; under Ulysses x ring after the Ulysses all-to-all)
calls the attention forward op once per ring chunk -- first the rank's own K/V chunk, then chunk
``rank + 1``, ``rank + 2``, ... (mod the ring degree) -- and merges the returned ``(out, lse)`` pairs with
their log-sum-exp. Each call here computes, exactly, the attention of this rank's query tokens over the
visiting chunk's key tokens restricted to the blocks the layer's mask (built for the whole sequence in
its natural order, as one process builds it) lists:

* :class:`RingGeometry` -- where every ring chunk's tokens sit in the natural (layout) order: a chunk is
  one contiguous run of tokens (one sequence split), or several (Flux splits text and image separately:
  ``[text_r, image_r]``), from the adapter's context-parallel order (``TransformerState.cp_permutation``).
* :func:`chunk_pieces` -- the op calls of one (query chunk, key chunk) pair: chunk edges need not fall on
  block boundaries. A query run starts ``pad`` tokens into its first block: ``pad`` zero rows are put in
  front (their output is dropped). A key run that starts inside a block is cut into that partial block
  (its own op call of ``< block_size`` keys: a ragged last block, masked inside the kernel) and the
  block-aligned rest. Every piece is an ordinary :class:`~sparsediff.BlockSparseMask` call of the op.
* :func:`chunk_attention` -- runs the pieces and merges them with their LSE into the chunk's
  ``(out [B, Nq, H, D] float32, lse [B, Nq, H] float32)``; :func:`chunk_backward` -- the gradients of
  one chunk from the ring's merged output and LSE (each piece recomputed, its out/LSE weighted by
  ``exp(lse_piece - lse)``: FlashAttention-2's backward against the global normaliser).
* :func:`ring_block_mask` -- the layer's mask for its (local) heads over the whole sequence, from the
  pattern families as :func:`sparsediff.sparse_attention` builds it (dynamic and lse_cache heads from the
  all-gathered q/k: every rank of a ring chooses the same mask); :func:`ring_dense_hooks` -- the families'
  ``on_dense`` for forced-dense (refresh / warm-up) passes; :func:`ring_unsupported` -- why a layer's plan
  cannot run under ring (token-permuting families, cross-step families other than lse_cache, masks
  without the diagonal block), for the per-layer fallback;
* :func:`gather_chunks` / :func:`to_natural` / :func:`gather_sequence` -- all-gather over the ring group
  and put the chunks in natural order.

Memory per rank beyond diffusers' own ring (which all-gathers K and V): layers with dynamic heads
all-gather q and k once per call (for the mask); layers with lse_cache heads also V (they compute every
chunk at the first call, see ``LayerContext._ring``).

Imports no hook module (``layer`` imports it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import group_heads
from ..layout import TokenLayout
from ..mask import BlockSparseMask
from ..ops import block_sparse_attention
from ..patterns.registry import GroupCall, get_family
from ..patterns.remainder import merge_lse
from ..specs import HeadSpec
from ..support import cdiv

__all__ = [
    "RingGeometry",
    "RingPiece",
    "chunk_pieces",
    "chunk_attention",
    "chunk_backward",
    "merge_partials",
    "ring_block_mask",
    "ring_dense_hooks",
    "ring_unsupported",
    "gather_sequence",
    "gather_chunks",
    "to_natural",
]


@dataclass(frozen=True)
class RingGeometry:
    """Where the tokens of every ring chunk sit in the natural (layout) order.

    Attributes:
        chunk_len: tokens per chunk (the ring splits the sequence evenly).
        runs: per chunk, its maximal runs of consecutive natural positions as
            ``(local_start, natural_start, length)`` (``local_start``: index in the chunk's tensor).
    """

    chunk_len: int
    runs: tuple[tuple[tuple[int, int, int], ...], ...]

    @classmethod
    def of(cls, num_tokens: int, ring_degree: int, natural_of: torch.Tensor | None) -> RingGeometry:
        """Geometry of ``num_tokens`` tokens in ``ring_degree`` chunks; ``natural_of[p]`` is the natural
        position of position ``p`` of the concatenated chunks (None: the chunks are in natural order)."""
        if num_tokens % ring_degree:
            raise ValueError(f"{num_tokens} tokens do not split into {ring_degree} equal ring chunks")
        n = num_tokens // ring_degree
        if natural_of is None:
            return cls(n, tuple(((0, j * n, n),) for j in range(ring_degree)))
        pos = natural_of.detach().to("cpu", torch.int64)
        runs = []
        for j in range(ring_degree):
            c = pos[j * n : (j + 1) * n]
            starts = [0] + (torch.nonzero(c[1:] - c[:-1] != 1).flatten() + 1).tolist() + [n]
            runs.append(tuple((a, int(c[a]), b - a) for a, b in zip(starts[:-1], starts[1:]) if b > a))
        return cls(n, tuple(runs))


@dataclass(frozen=True)
class RingPiece:
    """One op call of a (query chunk, key chunk) pair: query run ``q_run`` of the query chunk (with
    ``q_pad`` zero rows in front, so that its first row starts a block) against the key chunk's tokens
    ``[k_start, k_start + k_len)``; ``mask`` is ``[Bm, H, cdiv(q_pad + run length, bs), cdiv(k_len, bs)]``."""

    q_run: int
    q_pad: int
    k_start: int
    k_len: int
    mask: BlockSparseMask


def _key_segments(local: int, natural: int, length: int, bs: int):
    """Split a key run into (its partial first block, if it starts inside one) and the aligned rest."""
    off = natural % bs
    if off:
        m = min(length, bs - off)
        yield local, natural, m
        local, natural, length = local + m, natural + m, length - m
    if length:
        yield local, natural, length


def chunk_pieces(
    block_bool: torch.Tensor, geom: RingGeometry, q_chunk: int, k_chunk: int, block_size: int
) -> tuple[RingPiece, ...]:
    """The op calls of query chunk ``q_chunk`` against key chunk ``k_chunk`` under the natural-order
    block mask ``block_bool [Bm, H, Qb, Kb]``; pairs with no listed block are left out."""
    bs = block_size
    pieces = []
    for qi, (_, qn, ql) in enumerate(geom.runs[q_chunk]):
        a0, pad = qn // bs, qn % bs
        nqb = cdiv(pad + ql, bs)
        for kl, kn, kk in geom.runs[k_chunk]:
            for sl, sn, m in _key_segments(kl, kn, kk, bs):
                kb0 = sn // bs
                sub = block_bool[:, :, a0 : a0 + nqb, kb0 : kb0 + cdiv(m, bs)]
                if not bool(sub.any()):
                    continue
                pieces.append(RingPiece(qi, pad, sl, m, BlockSparseMask.from_dense(sub, bs, (pad + ql, m))))
    return tuple(pieces)


def merge_partials(
    a: tuple[torch.Tensor, torch.Tensor] | None, o: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention partials over disjoint key sets: ``a = (out, lse)`` (None: nothing yet) with
    ``(o, lse)``; out ``[..., N, D]``, lse ``[..., N]`` float32. Rows empty in both stay 0 / -inf."""
    if a is None:
        return o.float(), lse
    return merge_lse(a[0], a[1], o, lse)


def _query_rows(q: torch.Tensor, start: int, length: int, pad: int) -> torch.Tensor:
    """``[B, H, pad + length, D]``: ``pad`` zero rows, then ``q[:, :, start:start + length]``."""
    rows = q[:, :, start : start + length]
    if not pad:
        return rows
    B, H, _, D = q.shape
    return torch.cat([rows.new_zeros(B, H, pad, D), rows], 2)


def chunk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    geom: RingGeometry,
    q_chunk: int,
    pieces: Sequence[RingPiece],
    *,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of this rank's queries (``query [B, Nq, H, D]``, chunk ``q_chunk``) over one visiting
    chunk (``key``/``value [B, Nk, H, D]``) on the listed blocks: ``(out [B, Nq, H, D], lse [B, Nq, H])``,
    both float32; rows that list no key of the chunk get 0 and -inf."""
    B, Nq, H, D = query.shape
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    out = torch.zeros(B, H, Nq, D, dtype=torch.float32, device=query.device)
    lse = torch.full((B, H, Nq), -torch.inf, dtype=torch.float32, device=query.device)
    runs = geom.runs[q_chunk]
    for qi, (ls, _, ql) in enumerate(runs):
        acc = None
        qs = None
        for p in pieces:
            if p.q_run != qi:
                continue
            if qs is None:
                qs = _query_rows(q, ls, ql, p.q_pad)
            ks, vs = (x[:, :, p.k_start : p.k_start + p.k_len] for x in (k, v))
            o, m = block_sparse_attention(qs, ks, vs, p.mask, scale=scale, return_lse=True, backend=backend)
            acc = merge_partials(acc, o, m)
        if acc is not None:
            pad = qs.shape[2] - ql
            out[:, :, ls : ls + ql] = acc[0][:, :, pad:]
            lse[:, :, ls : ls + ql] = acc[1][:, :, pad:]
    return out.transpose(1, 2), lse.transpose(1, 2)


def chunk_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    geom: RingGeometry,
    q_chunk: int,
    pieces: Sequence[RingPiece],
    *,
    scale: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` (float32, ``[B, N, H, D]``) of one ring chunk's share of the merged
    attention, from the merged ``out [B, Nq, H, D]`` and ``lse [B, Nq, H]`` and ``grad_out``.

    Each piece's partial ``(o_p, lse_p)`` is recomputed through the op (its autograd: the Triton backward on
    CUDA, the PyTorch twin on CPU) and back-propagated with ``d o_p = w * grad_out`` and
    ``d lse_p = w * <grad_out, o_p - out>``, ``w = exp(lse_p - lse)`` -- the chain rule of the LSE merge.
    """
    q, k, v = (x.detach().transpose(1, 2) for x in (query, key, value))
    og, lg, gg = (
        out.detach().transpose(1, 2).float(),
        lse.detach().transpose(1, 2).float(),
        grad_out.transpose(1, 2),
    )
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    runs = geom.runs[q_chunk]
    with torch.enable_grad():
        for p in pieces:
            ls, _, ql = runs[p.q_run]
            qs = _query_rows(q, ls, ql, p.q_pad).detach().requires_grad_(True)
            ks = k[:, :, p.k_start : p.k_start + p.k_len].detach().requires_grad_(True)
            vs = v[:, :, p.k_start : p.k_start + p.k_len].detach().requires_grad_(True)
            o, m = block_sparse_attention(qs, ks, vs, p.mask, scale=scale, return_lse=True, backend=backend)
            pad = p.q_pad
            rows = slice(ls, ls + ql)
            lg_r = torch.nn.functional.pad(lg[:, :, rows], (pad, 0), value=torch.inf)
            og_r = torch.nn.functional.pad(og[:, :, rows], (0, 0, pad, 0))
            gg_r = torch.nn.functional.pad(gg[:, :, rows].float(), (0, 0, pad, 0))
            w = torch.where(
                torch.isfinite(m) & torch.isfinite(lg_r), torch.exp(m - lg_r), torch.zeros_like(m)
            )
            g_o = (w.unsqueeze(-1) * gg_r).to(o.dtype)
            g_l = w * (gg_r * (o.detach().float() - og_r)).sum(-1)
            gq, gk, gv = torch.autograd.grad((o, m), (qs, ks, vs), (g_o, g_l))
            dq[:, :, rows] += gq[:, :, pad:].float()
            dk[:, :, p.k_start : p.k_start + p.k_len] += gk.float()
            dv[:, :, p.k_start : p.k_start + p.k_len] += gv.float()
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


# ---------------------------------------------------------------------- the layer's mask
def _placeholder(batch: int, heads: int, n: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """A ``[B, H, N, D]`` zero tensor without storage, for the builders of static masks (shapes only)."""
    return like.new_zeros(()).expand(batch, heads, n, dim)


def _works(call: GroupCall, specs: Sequence[HeadSpec]):
    """``[(spec, heads, GroupWork)]`` of every group of heads, as :func:`sparsediff.sparse_attention`."""
    return [
        (spec, heads, get_family(spec.pattern).group_work(call, spec, heads))
        for spec, heads in group_heads(specs).items()
    ]


def _assemble(works, heads: int) -> BlockSparseMask:
    masks, order = [], []
    for _, hs, w in works:
        m = w.mask
        if m.heads != len(hs):
            m = BlockSparseMask(
                m.kv_indices.expand(m.batch, len(hs), -1, -1),
                m.kv_counts.expand(m.batch, len(hs), -1),
                m.block_size,
                m.seq_lens,
                validate=False,
            )
        masks.append(m)
        order += list(hs)
    mask = BlockSparseMask.cat_heads(masks)
    if order != list(range(heads)):
        inv = [0] * heads
        for i, h in enumerate(order):
            inv[h] = i
        mask = mask[:, inv]
    return mask


def ring_unsupported(
    layout: TokenLayout,
    specs: Sequence[HeadSpec],
    like: torch.Tensor,
    *,
    block_size: int,
    cache: Any,
) -> str | None:
    """Why the heads ``specs`` cannot run sparse under ring attention (None: they can).

    Served: families whose mask is in the natural token order -- static ones (dense, radial, user static
    masks without a permutation) and dynamic selections on the natural order (topp, user ``select``
    families without a permutation: chosen from the all-gathered q/k, so every rank chooses the same
    mask), and lse_cache (its selection from the all-gathered q/k and the cached LSE of the whole sequence,
    all-gathered after each pass). Not served: families that permute tokens (tile's tile order,
    reordered) -- a ring chunk is contiguous in the natural order, a block of the permuted order is not;
    other cross-step families (skip, user ones), whose state (outputs of the whole sequence) no rank
    holds inside one ring chunk's call; ``remainder="pooled"`` / ``"cached"`` heads (their pooled keys /
    dense refresh cover the whole sequence); masks that drop a query block's own (diagonal) block (a row could see no key in its
    own chunk, which diffusers' LSE merge turns into NaN). ``like`` gives dtype and device.
    """
    for spec in group_heads(specs):
        fam = get_family(spec.pattern)
        kind = fam.kind_of(spec)
        if spec.remainder == "pooled":
            return (
                f"the pooled remainder of {spec!r} under ring attention (its pooled keys cover the whole "
                "sequence, not one ring chunk)"
            )
        if spec.remainder == "cached":
            return (
                f"the cached remainder of {spec!r} under ring attention (its dense refresh covers the whole "
                "sequence, not one ring chunk)"
            )
        if kind == "dynamic":
            if spec.pattern != "topp" and (fam.build_group is not None or fam.permutation is not None):
                return f"the dynamic pattern {spec.pattern!r} under ring attention (token order / selection not chunked)"
        elif kind != "static" and spec.pattern != "lse_cache":
            return (
                f"the cross-step pattern {spec.pattern!r} under ring attention (its state covers the whole "
                "sequence, which no rank holds within one ring chunk)"
            )
    key = ("ring_unsupported", layout, tuple(group_heads(specs).items()), block_size, str(like.device))
    return cache.get_or_build(key, lambda: _static_reason(layout, specs, like, block_size, cache))


def _static_reason(layout, specs, like, block_size, cache) -> str | None:
    static = [s for s in specs if get_family(s.pattern).is_static_spec(s)]
    if not static:
        return None
    n = layout.num_tokens
    ph = _placeholder(1, len(static), n, 1, like)
    call = GroupCall(ph, ph, ph, layout, block_size, 1.0, None, None, cache, "reference")
    works = _works(call, static)
    for spec, _, w in works:
        if w.perm_q is not None or w.perm_k is not None:
            return f"the pattern {spec.pattern!r} in its permuted token order under ring attention"
        if w.after is not None:
            return f"the pattern {spec.pattern!r} (it post-processes the whole layer's output) under ring attention"
    d = _assemble(works, len(static)).to_dense()
    diag = torch.diagonal(d, dim1=-2, dim2=-1)
    if not bool(diag.all()):
        return "a mask without the diagonal block under ring attention"
    return None


def ring_block_mask(
    q: torch.Tensor | None,
    k: torch.Tensor | None,
    layout: TokenLayout,
    specs: Sequence[HeadSpec],
    like: torch.Tensor,
    *,
    batch: int,
    scale: float,
    block_size: int,
    cache: Any,
    step: int | None,
    backend: str,
    state: Any = None,
) -> tuple[BlockSparseMask, list]:
    """``(mask, afters)``: the mask ``[Bm, H, Qb, Kb]`` of heads ``specs`` over the whole sequence in its
    natural order (the mask one process builds), and the groups' ``after(out, lse)`` hooks (lse_cache: keep
    the pass's LSE; called by the caller with ``out=None`` and the whole sequence's merged LSE).
    ``q``/``k``: the whole sequence ``[B, H, N, D]`` in natural order, needed by dynamic and cross-step heads
    only (None when every head is static: the mask is then cached). ``state``: the layer's
    :class:`~sparsediff.attention.LayerState` (cross-step heads keep their selection in it)."""
    H, n = len(specs), layout.num_tokens
    if q is None:
        ph = _placeholder(batch, H, n, 1, like)
        call = GroupCall(ph, ph, ph, layout, block_size, scale, step, None, cache, backend)
        key = ("ring_mask", layout, tuple(group_heads(specs).items()), block_size, str(like.device))
        return cache.get_or_build(key, lambda: _assemble(_works(call, specs), H)), []
    call = GroupCall(q, k, k, layout, block_size, scale, step, state, cache, backend)
    works = _works(call, specs)
    return _assemble(works, H), [w.after for _, _, w in works if w.after is not None]


def ring_dense_hooks(
    specs: Sequence[HeadSpec], layout: TokenLayout, like: torch.Tensor, *, state: Any, step: int | None
):
    """The ``on_dense`` hooks of a forced-dense pass (warm-up / refresh step) of heads ``specs``, as
    ``hook(lse)`` callables fed the whole sequence's LSE ``[B, H, N]`` (lse_cache: seed the cached LSE)."""
    ph = _placeholder(1, len(specs), layout.num_tokens, 1, like)
    call = GroupCall(ph, ph, ph, layout, 1, 1.0, step, state, None, "reference")
    hooks = []
    for spec, heads in group_heads(specs).items():
        fam = get_family(spec.pattern)
        if fam.on_dense is not None:
            hooks.append(lambda lse, f=fam, sp=spec, hs=heads: f.on_dense(call, sp, hs, None, lse))
    return hooks


def gather_chunks(x: torch.Tensor, group: Any, world: int) -> list[torch.Tensor]:
    """All-gather ``x [B, n, ...]`` over the ring ``group``: every rank's chunk, in ring-rank order."""
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return parts


def to_natural(parts: Sequence[torch.Tensor], natural: torch.Tensor | None) -> torch.Tensor:
    """The chunks ``[B, n, H, ...]`` of :func:`gather_chunks` as one ``[B, H, N, ...]`` tensor in natural
    order (``natural[c]``: position of natural token ``c`` in the concatenated chunks; None: identity)."""
    full = torch.cat(list(parts), 1)
    if natural is not None:
        full = full.index_select(1, natural)
    return full.transpose(1, 2)


def gather_sequence(x: torch.Tensor, group: Any, world: int, natural: torch.Tensor | None) -> torch.Tensor:
    """All-gather ``x [B, n, H, D]`` over the ring ``group`` -> ``[B, H, N, D]`` in natural order."""
    return to_natural(gather_chunks(x, group, world), natural)
