"""Pure-PyTorch twin of the block-sparse attention kernel: the reference oracle and the CPU fallback.

It gathers only the listed key/value blocks of each query block, so it never materialises an
``Nq x Nk`` score matrix and its cost scales with the mask density: on CPU through PyTorch's fused CPU
flash kernel (:func:`_forward_grouped`), elsewhere in chunks of query blocks (:func:`_forward_chunked`).
All arithmetic is done in float32 (``upcast``); the output is cast back to the input dtype.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .mask import BlockSparseMask
from .op_checks import check_inputs

__all__ = ["block_sparse_attention", "attention_ref", "transposed_block_lists"]

# Upper bound on the elements of one gathered K (or V) chunk and of its scores, fp32: 2**22 = 16 MiB
# (measured on CPU: 20 % faster than 64 MiB chunks at N = 4096, cache-friendlier, same op count).
_CHUNK_ELEMS = 1 << 22
#: Elements of each of the grouped path's two gather buffers (K and V) per torch thread, fp32: 2**20 =
#: 4 MiB, from a per-thread workspace kept between calls (:func:`_work_buffers`). The budget bounds the
#: query blocks per fused call (``budget // (count * block * D)``): at 4096 tokens (D = 32, rows listing
#: ~40 blocks) 2**17 allowed one query block per call -- 372 calls per layer for a radial mask, ~60 us of
#: dispatch each. Measured (2026-12-04, 1 thread, shared 2-core AMD EPYC, speed-up over dense SDPA at
#: 16x16x16 tokens, H = 6, D = 32, for 2**17 / 2**20): radial 0.93 / 1.05x, tile (3,3,3) 1.55 / 1.70x,
#: top-p .9 0.68 / 0.79x; at 8x16x16, D = 64: tile (1,3,3) 1.61 / 1.67x. (The earlier finding that 4 MiB
#: buffers were slower at N = 512 came from allocating them fresh -- page faults -- on every call.)
_GATHER_ELEMS = 1 << 20
#: Largest work buffer (elements, fp32) a thread keeps between calls (:func:`_work_buffers`): 64 MiB.
_WORKSPACE_MAX_ELEMS = 1 << 24


class _Workspace(threading.local):
    """Per-thread CPU work memory of the grouped path, kept between calls (a workspace, not state: its
    contents never outlive the call that fills them). Fresh large allocations come from ``mmap`` and are
    page-faulted in on every call -- measured to cost more than the attention they serve at small N."""

    def __init__(self) -> None:
        self.buf: torch.Tensor | None = None


_WS = _Workspace()


def _work_buffers(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 buffers of ``n`` elements (gathered K and V) from this thread's workspace (CPU)."""
    if device.type != "cpu" or 2 * n > _WORKSPACE_MAX_ELEMS:
        buf = torch.empty(2 * n, dtype=torch.float32, device=device)
    else:
        buf = _WS.buf
        if buf is None or buf.numel() < 2 * n:
            buf = _WS.buf = torch.empty(2 * n, dtype=torch.float32)
    return buf[:n], buf[n : 2 * n]


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    *,
    scale: float | None = None,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference block-sparse attention with the same contract as :func:`sparsediff.block_sparse_attention`.

    Args:
        q: ``[B, H, Nq, D]`` (any strides). k, v: ``[B, H, Nk, D]``.
        mask: :class:`BlockSparseMask` with ``seq_lens == (Nq, Nk)``, ``heads == H``, batch 1 or B.
        scale: softmax scale, default ``D ** -0.5``.
        return_lse: also return the natural-log log-sum-exp ``[B, H, Nq]`` (float32).

    Rows that attend to no key give out = 0 and lse = -inf.
    """
    check_inputs(q, k, v, mask)
    out, lse = forward_blocks(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5)
    return (out, lse) if return_lse else out


def _cpu_flash_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def forward_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and min(q.numel(), k.numel()) > 0
        and mask.num_q_blocks > 0
        and _cpu_flash_available()
    ):
        return _forward_grouped(q, k, v, mask, scale)
    return _forward_chunked(q, k, v, mask, scale)


def _blocked(x: torch.Tensor, nb: int, bs: int) -> torch.Tensor:
    """``[B, H, N, d]`` (any strides) -> zero-padded fp32 blocks ``[B * H * nb, bs, d]``; no copy when ``x``
    is already contiguous fp32 with ``N == nb * bs``."""
    x = x.float()
    if nb * bs != x.shape[2]:
        x = F.pad(x, (0, 0, 0, nb * bs - x.shape[2]))
    return x.reshape(-1, bs, x.shape[-1])


def _forward_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path: fused attention calls (PyTorch's CPU flash kernel, which also returns the LSE) on exactly
    the gathered key blocks of the query blocks they serve.

    No padding slots and no score buffer: each query block attends to the concatenation of its ``c``
    listed key blocks, so the work is the mask's density times dense work, in the same fused,
    cache-blocked kernel dense SDPA uses. Query blocks go to the kernel together when they list as many
    blocks: whole heads whose rows all list ``c`` blocks (uniform masks, the usual case) as
    ``[heads, Qb, bq, D]`` views of ``q`` and of the result in the caller's layout (no copy of either
    when the query blocks tile ``Nq``), the rows of other heads grouped by their count across heads
    through index ops. The gathered K/V go through two small work buffers (``_GATHER_ELEMS`` per thread),
    allocated once per call and refilled call by call, so the kernel reads them from cache (gathering a
    whole group at once, 64 MiB at N = 2048 and 50 %, made the path slower than dense SDPA); fresh
    memory is what costs most at small N. A ragged last key block is the only masked case (an additive
    ``-inf`` bias on its padded keys, only for calls that list it).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    bq, bk = mask.block_size
    Qb, Kb = mask.num_q_blocks, mask.num_kv_blocks
    dev, f32 = q.device, torch.float32
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

    if bool((mask.kv_counts == Kb).all()):
        # Every row lists every key block (a window covering the whole grid, a dense warm-up pass): dense
        # attention, without gathers (a row lists each block once, so all of them means all keys).
        o, l_ = flash(q.float(), k.float(), v.float(), 0.0, False, scale=scale)
        return _finish(o, l_, q)

    kp = _blocked(k, Kb, bk)  # [B*H*Kb, bk, D]: index_select gathers whole blocks from it
    vp = _blocked(v, Kb, bk)
    whole_q = Qb * bq == Nq
    if whole_q:
        q5 = q.float().unflatten(2, (Qb, bq))  # [B, H, Qb, bq, D] views, any strides
        res = torch.empty_like(q)
        out5 = res.unflatten(2, (Qb, bq))
    else:
        q5 = F.pad(q.float(), (0, 0, 0, Qb * bq - Nq)).unflatten(2, (Qb, bq))
        res = torch.empty(B, H, Qb * bq, D, dtype=f32, device=dev)
        out5 = res.unflatten(2, (Qb, bq))
    lse = torch.empty(B, H, Qb * bq, dtype=f32, device=dev)
    lse4 = lse.view(B, H, Qb, bq)
    cnt3 = mask.kv_counts.expand(B, H, Qb)
    cnt = cnt3.reshape(-1).long()  # rows (b, h, i) in that order
    idx = mask.kv_indices.expand(B, H, Qb, -1).reshape(B * H * Qb, -1).long()
    block_elems = bk * D
    # elements per gather buffer: _GATHER_ELEMS per thread, so one call holds work for every thread
    budget = _GATHER_ELEMS * max(1, torch.get_num_threads())
    ragged = Kb * bk != Nk
    pad_key = torch.arange(bk, device=dev) >= Nk - (Kb - 1) * bk  # [bk]: padded keys of the last block

    # Heads whose query blocks all list c blocks (uniform masks, the usual case): runs of such heads go
    # through the kernel as [heads, Qb, bq, D] views, as many whole heads per call as the budget allows
    # (a head over the budget alone: in slices of consecutive query blocks). The rows of the other heads
    # are grouped by their count across heads (few calls), read and written through index ops.
    head_c = cnt3[..., 0].reshape(-1).tolist()
    uniform = (cnt3 == cnt3[..., :1]).all(-1).reshape(-1)
    runs: list[list[int]] = []  # [first (batch * H + head), c, heads]
    for bh in torch.nonzero(uniform).view(-1).tolist():
        c, r = head_c[bh], runs[-1] if runs else None
        if (
            r is not None and r[0] + r[2] == bh and r[1] == c and bh // H == r[0] // H
            and (r[2] + 1) * Qb * max(c, 1) * block_elems <= budget
        ):  # fmt: skip
            r[2] += 1
        else:
            runs.append([bh, c, 1])
    groups: list[tuple[int, torch.Tensor]] = []  # (c, rows of idx) of the non-uniform heads
    if not bool(uniform.all()):
        rest = torch.nonzero(~uniform.repeat_interleave(Qb)).view(-1)
        counts, order = torch.sort(cnt[rest], stable=True)
        uniq, sizes = torch.unique_consecutive(counts, return_counts=True)
        groups = list(zip(uniq.tolist(), torch.split(rest[order], sizes.tolist())))

    def per_call(c: int) -> int:  # query blocks per call: as many as fit the budget, at least one
        return max(1, budget // (max(c, 1) * block_elems))

    cap = max(
        [r[2] * Qb * r[1] if r[2] > 1 else min(Qb, per_call(r[1])) * r[1] for r in runs]
        + [min(rows.numel(), per_call(c)) * c for c, rows in groups],
        default=0,
    )
    kbuf, vbuf = _work_buffers(cap * block_elems, dev)

    def attend(qs: torch.Tensor, lists: torch.Tensor, bh: torch.Tensor | int) -> tuple[torch.Tensor, ...]:
        """``qs`` [g, m, bq, D] against the key blocks ``lists`` [g, m, c] of (batch * H + head) ``bh``
        (an int, or [g, m, 1])."""
        g, m, c = lists.shape
        blocks = (lists + bh * Kb).reshape(-1)
        gathered = (g * m * c, bk, D)
        kg = torch.index_select(kp, 0, blocks, out=kbuf[: blocks.numel() * block_elems].view(gathered))
        vg = torch.index_select(vp, 0, blocks, out=vbuf[: blocks.numel() * block_elems].view(gathered))
        bias = None
        if ragged:
            last = lists == Kb - 1
            if bool(last.any()):
                bias = torch.zeros(g, m, 1, c * bk, dtype=f32, device=dev)
                bias.masked_fill_((last[..., None] & pad_key).view(g, m, 1, c * bk), -math.inf)
        o, l_ = flash(qs, kg.view(g, m, c * bk, D), vg.view(g, m, c * bk, D), 0.0, False,
                      attn_mask=bias, scale=scale)  # fmt: skip
        return o, l_

    for bh, c, nh in runs:
        b, h = divmod(bh, H)
        if c == 0:
            out5[b, h : h + nh] = 0.0
            lse4[b, h : h + nh] = -math.inf
        elif nh > 1:
            bhs = torch.arange(bh, bh + nh, device=dev).view(nh, 1, 1)
            rows = slice(bh * Qb, (bh + nh) * Qb)
            o, l_ = attend(q5[b, h : h + nh], idx[rows, :c].view(nh, Qb, c), bhs)
            out5[b, h : h + nh] = o
            lse4[b, h : h + nh] = l_
        else:
            step = per_call(c)
            for i0 in range(0, Qb, step):
                i1 = min(Qb, i0 + step)
                lists = idx[bh * Qb + i0 : bh * Qb + i1, :c]
                o, l_ = attend(q5[b, h, i0:i1].unsqueeze(0), lists.unsqueeze(0), bh)
                out5[b, h, i0:i1] = o[0]
                lse4[b, h, i0:i1] = l_[0]
    if groups:  # rows of the non-uniform heads: blocked copies of q / the output, index ops on rows
        qp = q5.reshape(B * H * Qb, bq, D)  # a view when q is [B, H, N, D]-contiguous fp32
        flat_out = res.is_contiguous() and res.dtype == f32
        of = (
            out5.view(B * H * Qb, bq, D)
            if flat_out
            else torch.empty(B * H * Qb, bq, D, dtype=f32, device=dev)
        )
        lf = lse.view(B * H * Qb, bq)
        for c, rows in groups:
            step = per_call(c)
            for s0 in range(0, rows.numel(), step):
                r = rows[s0 : s0 + step]
                if c == 0:
                    of.index_fill_(0, r, 0.0)
                    lf.index_fill_(0, r, -math.inf)
                    continue
                o, l_ = attend(
                    qp.index_select(0, r).unsqueeze(0), idx[r, :c].unsqueeze(0), (r // Qb).view(1, -1, 1)
                )
                of.index_copy_(0, r, o[0])
                lf.index_copy_(0, r, l_[0])
        if not flat_out:
            for bh in torch.nonzero(~uniform).view(-1).tolist():
                out5[bh // H, bh % H] = of[bh * Qb : (bh + 1) * Qb]
    if whole_q:
        return res, lse
    return _finish(res[:, :, :Nq], lse[:, :, :Nq], q)


def _forward_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    bq, bk = mask.block_size
    Qb, Kb = mask.num_q_blocks, mask.num_kv_blocks
    dev = q.device
    if Nq == 0 or Nk == 0 or Qb == 0 or B * H == 0:
        out = torch.zeros(B, H, Nq, Dv, dtype=torch.float32, device=dev)
        return _finish(out, torch.full((B, H, Nq), -math.inf, dtype=torch.float32, device=dev), q)

    qp = _blocked(q, Qb, bq).view(B, H, Qb, bq, D)
    # [B*H*Kb + 1, bk, D]: the extra all-zero block is what padding slots gather, so a NaN/inf in a block
    # a row does not list can never reach it through 0 * NaN (the kernel never reads those blocks)
    kp = torch.cat([_blocked(k, Kb, bk), k.new_zeros(1, bk, D, dtype=torch.float32)])
    vp = torch.cat([_blocked(v, Kb, bk), v.new_zeros(1, bk, Dv, dtype=torch.float32)])
    zero_block = B * H * Kb
    idx = mask.kv_indices.to(dev).expand(B, H, -1, -1)
    cnt = mask.kv_counts.to(dev).expand(B, H, -1)
    key_in_range = (torch.arange(Kb * bk, device=dev) < Nk).view(Kb, bk)
    bh_offset = (torch.arange(B * H, device=dev) * Kb).view(B, H, 1, 1)
    out_b = torch.zeros(B, H, Qb, bq, Dv, dtype=torch.float32, device=dev)
    lse_b = torch.full((B, H, Qb, bq), -math.inf, dtype=torch.float32, device=dev)

    # Plan the chunks of query blocks first (gathered K/V and scores within the element budget), so the
    # three large work buffers are allocated once per call: per-chunk allocations of this size make the
    # allocator return memory to the OS and page-fault it back every chunk (measured 5x slower on CPU).
    chunks = []
    q0 = 0
    while q0 < Qb:
        m_all = int(cnt[:, :, q0:].amax())
        per_block = max(B * H * max(m_all, 1) * bk * max(D, Dv, bq), 1)
        c = max(1, min(Qb - q0, _CHUNK_ELEMS // per_block))
        chunks.append((q0, q0 + c, int(cnt[:, :, q0 : q0 + c].amax())))
        q0 += c
    rows = max((B * H * (q1 - q0) * m for q0, q1, m in chunks), default=0)  # gathered kv blocks
    kbuf = torch.empty(rows * bk * D, dtype=torch.float32, device=dev)
    vbuf = torch.empty(rows * bk * Dv, dtype=torch.float32, device=dev)
    sbuf = torch.empty(rows * bk * bq, dtype=torch.float32, device=dev)

    for q0, q1, m in chunks:
        if m == 0:
            continue
        c, n = q1 - q0, B * H * (q1 - q0) * m
        valid_slot = torch.arange(m, device=dev) < cnt[:, :, q0:q1].unsqueeze(-1)  # [B, H, C, M]
        ids = torch.where(valid_slot, idx[:, :, q0:q1, :m].long(), 0)
        flat = torch.where(valid_slot, ids + bh_offset, zero_block).reshape(-1)
        kg = torch.index_select(kp, 0, flat, out=kbuf[: n * bk * D].view(n, bk, D)).view(B * H * c, m * bk, D)
        vg = torch.index_select(vp, 0, flat, out=vbuf[: n * bk * Dv].view(n, bk, Dv)).view(
            B * H * c, m * bk, Dv
        )
        col_ok = (valid_slot.unsqueeze(-1) & key_in_range[ids]).view(B * H * c, 1, m * bk)
        bias = torch.zeros(col_ok.shape, dtype=torch.float32, device=dev).masked_fill_(~col_ok, -math.inf)
        qc = qp[:, :, q0:q1].reshape(B * H * c, bq, D)
        s = sbuf[: n * bk * bq].view(B * H * c, bq, m * bk)
        torch.baddbmm(bias, qc, kg.transpose(1, 2), alpha=scale, out=s)  # scaled, masked scores
        mx = s.amax(-1, keepdim=True)
        mx = torch.where(torch.isinf(mx), 0.0, mx)  # empty rows: avoid -inf - -inf
        p = s.sub_(mx).exp_()
        denom = p.sum(-1, keepdim=True)
        o = torch.bmm(p, vg)
        nonempty = denom != 0  # NaN inputs give a NaN denominator: propagate, as dense attention does
        o = torch.where(nonempty, o / denom.clamp_min(1e-30), 0.0)
        lse_c = torch.where(nonempty, mx + torch.log(denom.clamp_min(1e-30)), -math.inf)
        out_b[:, :, q0:q1] = o.view(B, H, c, bq, Dv)
        lse_b[:, :, q0:q1] = lse_c.view(B, H, c, bq)
    out = out_b.view(B, H, Qb * bq, Dv)[:, :, :Nq]
    lse = lse_b.view(B, H, Qb * bq)[:, :, :Nq]
    return _finish(out, lse, q)


def _finish(out: torch.Tensor, lse: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Output has q's dtype and q's memory layout (e.g. a [B, N, H, D] buffer seen as [B, H, N, D]); an
    # fp32 work buffer that already has both is returned as it is (it is fresh: it never aliases q).
    if out.dtype == q.dtype and out.shape == q.shape and out.stride() == q.stride():
        return out, lse.contiguous()
    res = torch.empty_like(q) if out.shape[-1] == q.shape[-1] else q.new_empty(out.shape)
    res.copy_(out)
    return res, lse.contiguous()


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    token_mask: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Naive dense attention with an optional boolean token mask ``[B or 1, H, Nq, Nk]``: (out, lse).

    The independent oracle used by tests (no blocks involved). ``upcast`` computes in float32; with
    ``upcast=False`` it computes in the input dtype (the "naive same-dtype" baseline for tolerances).
    Fully masked rows give zeros and lse -inf.
    """
    dt = torch.float32 if upcast else q.dtype
    scale = scale if scale is not None else q.shape[-1] ** -0.5
    s = torch.matmul(q.to(dt), k.to(dt).transpose(-1, -2)) * scale
    if token_mask is not None:
        s = s.masked_fill(~token_mask, -math.inf)
    lse = torch.logsumexp(s.float(), dim=-1)
    p = torch.exp(s.float() - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1)).to(dt)
    out = torch.matmul(p, v.to(dt))
    return out.to(q.dtype), lse


# ---------------------------------------------------------------------------------------------- backward
def transposed_block_lists(
    kv_indices: torch.Tensor, kv_counts: torch.Tensor, num_kv_blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every (batch, head, key block): the query blocks whose lists name it -- what a dK/dV pass needs.

    Args:
        kv_indices: ``[Bm, H, Qb, Kmax]`` (a :class:`BlockSparseMask`'s ``kv_indices``; entries past the
            row's count are ignored). kv_counts: ``[Bm, H, Qb]``. num_kv_blocks: ``Kb = ceil(Nk / bk)``.

    Returns:
        ``(q_indices, q_counts)``: ``q_indices [Bm, H, Kb, Qmax]`` int32 (``Qmax = max(q_counts, 1)``),
        strictly increasing in the first ``q_counts[b, h, kb]`` entries, zero past them; ``q_counts
        [Bm, H, Kb]`` int32. One stable sort of the mask's listed (row, block) pairs, on the mask's
        device; memory O(listed blocks) (no ``[Qb, Kb]`` table).
    """
    bm, h, qb, kmax = kv_indices.shape
    dev = kv_indices.device
    kb = int(num_kv_blocks)
    rows = bm * h * kb
    if kv_indices.numel() == 0 or kb == 0:
        return (
            torch.zeros(bm, h, kb, 1, dtype=torch.int32, device=dev),
            torch.zeros(bm, h, kb, dtype=torch.int32, device=dev),
        )
    valid = torch.arange(kmax, device=dev) < kv_counts.unsqueeze(-1)  # [Bm, H, Qb, Kmax]
    pos = torch.nonzero(valid.reshape(bm * h, qb, kmax))  # (bh, q block, slot), in (bh, qb) order
    kbs = kv_indices.reshape(bm * h, qb, kmax)[pos[:, 0], pos[:, 1], pos[:, 2]].long()
    key = pos[:, 0] * kb + kbs  # the (bh, key block) row each listed pair goes to
    key, order = torch.sort(key, stable=True)  # stable: query blocks stay increasing within a row
    qblk = pos[order, 1]
    counts = torch.bincount(key, minlength=rows)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(key.numel(), device=dev) - starts[key]
    qmax = max(int(counts.max()) if counts.numel() else 0, 1)
    out = torch.zeros(rows, qmax, dtype=torch.int32, device=dev)
    out[key, slot] = qblk.to(torch.int32)
    return out.view(bm, h, kb, qmax), counts.to(torch.int32).view(bm, h, kb)


#: Elements of each of the backward twin's four chunk buffers (gathered K and V -- reused for their
#: gradients -- P and dP/dS), fp32: 2**21 = 8 MiB each, 32 MiB in all.
_BWD_CHUNK_ELEMS = 1 << 21


def _like(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` (``ref``'s shape, fp32) in ``ref``'s dtype and memory layout (no copy when it already is)."""
    if x.dtype == ref.dtype and x.stride() == ref.stride():
        return x
    res = torch.empty_like(ref)
    res.copy_(x)
    return res


def backward_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    dout: torch.Tensor | None,
    dlse: torch.Tensor | None,
    mask: BlockSparseMask,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of block-sparse attention from the forward's ``out`` and ``lse`` -- the
    PyTorch twin of the Triton backward (FlashAttention-2's backward restricted to the listed blocks).

    q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]`` (any strides); out ``[B, H, Nq, D]``, lse ``[B, H, Nq]``
    float32 (natural log, -inf for empty rows) as the forward returned them; ``dout`` / ``dlse`` the
    incoming gradients of out and lse (None = zero). Returns gradients in q/k/v's dtype and layout.

    With ``delta_i = sum_d dout_id * out_id - dlse_i`` and ``p_ij = exp(scale * q_i.k_j - lse_i)`` on the
    listed keys: ``ds = p * (dout . v_j - delta_i)``, ``dq = scale * ds @ k``, ``dk = scale * ds^T @ q``,
    ``dv = p^T @ dout``. Query blocks go in chunks over their gathered key blocks (as
    :func:`_forward_chunked`): dq is written per chunk and dk/dv accumulate with ``index_add_`` into
    blocked fp32 buffers; no ``Nq x Nk`` matrix is formed. Memory beyond inputs and outputs: fp32 blocked
    copies of q/k/v/dout and the dk/dv accumulators (O(N * D)), plus four chunk buffers of
    ``_BWD_CHUNK_ELEMS`` (32 MiB). Arithmetic in fp32. Empty rows (lse = -inf) give zero gradients; a
    block a row does not list is never read (padding slots gather an all-zero block).
    """
    B, H, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[3]
    bq, bk = mask.block_size
    Qb, Kb = mask.num_q_blocks, mask.num_kv_blocks
    dev, f32 = q.device, torch.float32
    if dout is None and dlse is None or B * H * Nq == 0 or Nk == 0 or Qb == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    # delta = rowsum(dO * O) - dlse ; lse of empty (and padding) rows -> +inf so that p = exp(s - lse) = 0
    delta = torch.zeros(B, H, Qb * bq, dtype=f32, device=dev)
    if dout is not None:
        delta[:, :, :Nq] = torch.einsum("bhnd,bhnd->bhn", dout.float(), out.float())
    if dlse is not None:
        delta[:, :, :Nq] -= torch.where(torch.isfinite(lse), dlse.float(), 0.0)
    lse_p = torch.full((B, H, Qb * bq), math.inf, dtype=f32, device=dev)
    lse_p[:, :, :Nq] = torch.where(lse == -math.inf, math.inf, lse.float())
    delta, lse_p = delta.view(B, H, Qb, bq), lse_p.view(B, H, Qb, bq)

    qp = _blocked(q, Qb, bq).view(B, H, Qb, bq, D)
    if dout is not None:
        dop = _blocked(dout, Qb, bq).view(B, H, Qb, bq, Dv)
    else:
        dop = torch.zeros(B, H, Qb, bq, Dv, dtype=f32, device=dev)
    zero_block = B * H * Kb  # padding slots gather (and scatter their zero gradients into) this block
    kp = torch.cat([_blocked(k, Kb, bk), k.new_zeros(1, bk, D, dtype=f32)])
    vp = torch.cat([_blocked(v, Kb, bk), v.new_zeros(1, bk, Dv, dtype=f32)])
    dk_acc = torch.zeros(B * H * Kb + 1, bk, D, dtype=f32, device=dev)
    dv_acc = torch.zeros(B * H * Kb + 1, bk, Dv, dtype=f32, device=dev)
    dq_b = torch.zeros(B, H, Qb, bq, D, dtype=f32, device=dev)
    idx = mask.kv_indices.to(dev).expand(B, H, -1, -1)
    cnt = mask.kv_counts.to(dev).expand(B, H, -1)
    key_in_range = (torch.arange(Kb * bk, device=dev) < Nk).view(Kb, bk)
    bh_offset = (torch.arange(B * H, device=dev) * Kb).view(B, H, 1, 1)

    chunks = []
    q0 = 0
    while q0 < Qb:
        m_all = int(cnt[:, :, q0:].amax())
        per_block = max(B * H * max(m_all, 1) * bk * max(D, Dv, bq), 1)
        c = max(1, min(Qb - q0, _BWD_CHUNK_ELEMS // per_block))
        chunks.append((q0, q0 + c, int(cnt[:, :, q0 : q0 + c].amax())))
        q0 += c
    rows = max((B * H * (q1 - q0) * m for q0, q1, m in chunks), default=0)  # gathered kv blocks
    kbuf = torch.empty(rows * bk * D, dtype=f32, device=dev)
    vbuf = torch.empty(rows * bk * Dv, dtype=f32, device=dev)
    pbuf = torch.empty(rows * bk * bq, dtype=f32, device=dev)
    dsbuf = torch.empty(rows * bk * bq, dtype=f32, device=dev)

    for q0, q1, m in chunks:
        if m == 0:
            continue
        c, n = q1 - q0, B * H * (q1 - q0) * m
        g = B * H * c
        valid_slot = torch.arange(m, device=dev) < cnt[:, :, q0:q1].unsqueeze(-1)  # [B, H, C, M]
        ids = torch.where(valid_slot, idx[:, :, q0:q1, :m].long(), 0)
        flat = torch.where(valid_slot, ids + bh_offset, zero_block).reshape(-1)
        kg = torch.index_select(kp, 0, flat, out=kbuf[: n * bk * D].view(n, bk, D)).view(g, m * bk, D)
        vg = torch.index_select(vp, 0, flat, out=vbuf[: n * bk * Dv].view(n, bk, Dv)).view(g, m * bk, Dv)
        col_ok = (valid_slot.unsqueeze(-1) & key_in_range[ids]).view(g, 1, m * bk)
        bias = torch.zeros(col_ok.shape, dtype=f32, device=dev).masked_fill_(~col_ok, -math.inf)
        qc = qp[:, :, q0:q1].reshape(g, bq, D)
        doc = dop[:, :, q0:q1].reshape(g, bq, Dv)
        p = pbuf[: n * bk * bq].view(g, bq, m * bk)
        torch.baddbmm(bias, qc, kg.transpose(1, 2), alpha=scale, out=p)
        p.sub_(lse_p[:, :, q0:q1].reshape(g, bq, 1)).exp_()  # exact probabilities; 0 off the list
        ds = dsbuf[: n * bk * bq].view(g, bq, m * bk)
        torch.bmm(doc, vg.transpose(1, 2), out=ds)  # dP
        dvg = torch.bmm(p.transpose(1, 2), doc, out=vg)  # V is no longer needed: its buffer takes dV
        ds.sub_(delta[:, :, q0:q1].reshape(g, bq, 1)).mul_(p).mul_(scale)  # dS (scaled)
        dq_b[:, :, q0:q1] = torch.bmm(ds, kg).view(B, H, c, bq, D)
        dkg = torch.bmm(ds.transpose(1, 2), qc, out=kg)  # K is no longer needed: its buffer takes dK
        dk_acc.index_add_(0, flat, dkg.view(n, bk, D))
        dv_acc.index_add_(0, flat, dvg.view(n, bk, Dv))

    dq = dq_b.view(B, H, Qb * bq, D)[:, :, :Nq]
    dk = dk_acc[:-1].view(B, H, Kb * bk, D)[:, :, :Nk]
    dv = dv_acc[:-1].view(B, H, Kb * bk, Dv)[:, :, :Nk]
    return _like(dq, q), _like(dk, k), _like(dv, v)
