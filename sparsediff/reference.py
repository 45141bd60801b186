"""Pure-PyTorch twin of the block-sparse attention kernel: the reference oracle and the CPU fallback.

It processes query blocks in chunks and gathers only the listed key/value blocks, so it never
materialises an ``Nq x Nk`` score matrix and its cost scales with the mask density. All arithmetic is
done in float32 (``upcast``); the output is cast back to the input dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .mask import BlockSparseMask

__all__ = ["block_sparse_attention", "attention_ref"]

# Upper bound on the elements of one gathered K (or V) chunk and of its scores, fp32: 2**22 = 16 MiB
# (measured on CPU: 20 % faster than 64 MiB chunks at N = 4096, cache-friendlier, same op count).
_CHUNK_ELEMS = 1 << 22


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
    from .ops import check_inputs  # local import: ops imports this module

    check_inputs(q, k, v, mask)
    out, lse = _forward(q, k, v, mask, scale if scale is not None else q.shape[-1] ** -0.5)
    return (out, lse) if return_lse else out


def _cpu_flash_available() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if (
        q.device.type == "cpu"
        and q.shape[-1] == v.shape[-1]
        and min(q.numel(), k.numel()) > 0
        and mask.num_q_blocks > 0
        and _cpu_flash_available()
    ):
        plan = _run_plan(mask, q.shape[0], q.shape[-1])
        if plan is not None:
            return _forward_runs(q, k, v, mask, scale, plan)
        return _forward_grouped(q, k, v, mask, scale)
    return _forward_chunked(q, k, v, mask, scale)


#: The run path (K/V views, one fused call per run) pays off once the grouped path's gathers leave the
#: cache: measured on the 2-core CI machine (2026-11-29, one thread, banded masks, block 64), grouped was as
#: fast or faster up to N = 1024 (<= 12 MiB gathered) and runs were 1.9x faster at N = 2048 (64-128 MiB).
_GATHER_CACHE_BYTES = 16 << 20
#: ... as long as each call replaces at least this much gathering (many tiny runs: scattered masks).
_MIN_BYTES_PER_CALL = 64 << 10


def _run_plan(
    mask: BlockSparseMask, batch: int, head_dim: int, *, force: bool = False
) -> list[tuple[int, int, list[int], list[tuple[int, int]]]] | None:
    """Decompose every (mask batch, query block) row into heads sharing the same contiguous key-block runs.

    Returns ``[(mask_batch, q_block, heads, [(first_kv_block, n_blocks), ...]), ...]`` (rows with no key
    block left out), or ``None`` when the grouped path is expected to be faster (gathers that stay in cache,
    or too many small runs; see ``_GATHER_CACHE_BYTES``; ``force`` returns the plan anyway).
    """
    idx = mask.kv_indices.cpu()
    cnt = mask.kv_counts.cpu()
    Bm, H, Qb, M = idx.shape
    if M == 0:
        return []
    valid = torch.arange(M) < cnt.unsqueeze(-1)  # [Bm, H, Qb, M]
    # a run starts at slot 0 and wherever an index is not its predecessor + 1 (indices strictly increase)
    start = valid.clone()
    start[..., 1:] &= idx[..., 1:] != idx[..., :-1] + 1
    n_runs = int(start.sum())
    if n_runs == 0:
        return []
    bk = mask.block_size[1]
    gathered = int(cnt.sum()) * bk * head_dim * 4 * 2 * (batch if Bm == 1 else 1)  # grouped path: K and V
    if not force and (gathered < _GATHER_CACHE_BYTES or (n_runs / H) * _MIN_BYTES_PER_CALL > gathered):
        return None  # gathers stay in cache, or even with every head sharing its runs the calls are too many
    groups: dict[tuple[int, int, tuple], list[int]] = {}
    idx_l, cnt_l, start_l = idx.tolist(), cnt.tolist(), start.tolist()
    for b in range(Bm):
        for h in range(H):
            for i in range(Qb):
                c = cnt_l[b][h][i]
                if c == 0:
                    continue
                row, st = idx_l[b][h][i], start_l[b][h][i]
                runs, first = [], 0
                for j in range(1, c + 1):
                    if j == c or st[j]:
                        runs.append((row[first], j - first))
                        first = j
                groups.setdefault((b, i, tuple(runs)), []).append(h)
    calls = sum(len(key[2]) for key in groups)
    if not force and calls * _MIN_BYTES_PER_CALL > gathered:
        return None
    return [(b, i, heads, list(runs)) for (b, i, runs), heads in groups.items()]


class _HeadSelect:
    """``x[batch slice, heads, lo:hi]`` of a ``[B, H, N, D]`` tensor: a view when the heads are all heads or
    a contiguous range, else an ``index_select`` copy of just the ``lo:hi`` slice."""

    def __init__(self, bsl: slice, heads: list[int], num_heads: int) -> None:
        self.bsl = bsl
        self.all = len(heads) == num_heads
        self.contiguous = heads == list(range(heads[0], heads[-1] + 1))
        self.hsl = slice(heads[0], heads[-1] + 1) if self.contiguous else torch.tensor(heads)

    def __call__(self, x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        x = x[self.bsl, :, lo:hi]
        if self.all:
            return x
        return x[:, self.hsl] if self.contiguous else x.index_select(1, self.hsl)


def _forward_runs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: BlockSparseMask,
    scale: float,
    plan: list[tuple[int, int, list[int], list[tuple[int, int]]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path for structured masks: for each query block, the heads that list the same contiguous runs
    of key blocks attend to *views* of K/V (no gather, no mask: a run's last block simply ends at ``Nk``),
    one fused CPU flash call per run; several runs are merged exactly through their LSEs."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    bq, bk = mask.block_size
    Bm = mask.kv_indices.shape[0]
    qf, kf, vf = q.float(), k.float(), v.float()
    out = torch.zeros(B, H, Nq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, H, Nq), -math.inf, dtype=torch.float32, device=q.device)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for b, i, heads, runs in plan:
        bsl = slice(None) if Bm == 1 else slice(b, b + 1)
        q0, q1 = i * bq, min((i + 1) * bq, Nq)
        sel = _HeadSelect(bsl, heads, H)
        qi = sel(qf, q0, q1)
        parts = []
        for a, n in runs:
            o, l_ = flash(qi, sel(kf, a * bk, min((a + n) * bk, Nk)), sel(vf, a * bk, min((a + n) * bk, Nk)),
                          0.0, False, scale=scale)  # fmt: skip
            parts.append((o, l_))
        if len(parts) == 1:
            o, l_ = parts[0]
        else:
            ls = torch.stack([p[1] for p in parts])  # [R, b, h, n]
            l_ = torch.logsumexp(ls, 0)
            w = torch.exp(ls - l_)
            o = sum(w[r].unsqueeze(-1) * parts[r][0] for r in range(len(parts)))
        if sel.all:
            out[bsl, :, q0:q1] = o
            lse[bsl, :, q0:q1] = l_
        else:
            hidx = torch.tensor(heads)
            out_v = out[bsl, :, q0:q1]
            lse_v = lse[bsl, :, q0:q1]
            out_v.index_copy_(1, hidx, o)
            lse_v.index_copy_(1, hidx, l_)
    return _finish(out, lse, q)


def _forward_grouped(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU path: query blocks grouped by their number of listed key blocks, one fused attention call
    (PyTorch's CPU flash kernel, which also returns the LSE) per group on exactly the gathered key blocks.

    No padding slots and no score buffer: each (batch, head, query block) of a group attends to the
    concatenation of its ``c`` listed key blocks, so the work is the mask's density times dense work, in
    the same fused, cache-blocked kernel dense SDPA uses. A ragged last key block is the only masked case
    (an additive ``-inf`` bias on its padded keys, only for groups that list it).
    """
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    bq, bk = mask.block_size
    Qb, Kb = mask.num_q_blocks, mask.num_kv_blocks
    dev = q.device

    def blocked(x: torch.Tensor, nb: int, bs: int) -> torch.Tensor:
        x = x.float()
        if nb * bs != x.shape[2]:
            x = F.pad(x, (0, 0, 0, nb * bs - x.shape[2]))
        return x.reshape(B * H * nb, bs, x.shape[-1])

    qp = blocked(q, Qb, bq)  # [B*H*Qb, bq, D]
    kp = blocked(k, Kb, bk)  # [B*H*Kb, bk, D]
    vp = blocked(v, Kb, bk)
    cnt = mask.kv_counts.expand(B, H, Qb).reshape(-1).long()  # [B*H*Qb]
    idx = mask.kv_indices.expand(B, H, Qb, -1).reshape(B * H * Qb, -1).long()
    kv_base = (torch.arange(B * H, device=dev) * Kb).repeat_interleave(Qb)  # [B*H*Qb]
    out = torch.zeros(B * H * Qb, bq, D, dtype=torch.float32, device=dev)
    lse = torch.full((B * H * Qb, bq), -math.inf, dtype=torch.float32, device=dev)
    ragged = Kb * bk != Nk
    counts, order = torch.sort(cnt, stable=True)
    uniq, sizes = torch.unique_consecutive(counts, return_counts=True)
    start = 0
    for c, n in zip(uniq.tolist(), sizes.tolist()):
        rows = order[start : start + n]
        start += n
        if c == 0:
            continue
        blocks = idx[rows, :c] + kv_base[rows, None]  # [n, c]
        kg = kp.index_select(0, blocks.reshape(-1)).view(n, 1, c * bk, D)
        vg = vp.index_select(0, blocks.reshape(-1)).view(n, 1, c * bk, D)
        bias = None
        if ragged:
            last = idx[rows, :c] == Kb - 1  # [n, c]
            if bool(last.any()):
                pad_key = torch.arange(bk, device=dev) >= Nk - (Kb - 1) * bk  # [bk]
                bad = last[:, :, None] & pad_key  # [n, c, bk]
                bias = torch.zeros(n, 1, 1, c * bk, dtype=torch.float32, device=dev)
                bias.masked_fill_(bad.view(n, 1, 1, c * bk), -math.inf)
        o, l_ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qp.index_select(0, rows).view(n, 1, bq, D), kg, vg, 0.0, False, attn_mask=bias, scale=scale
        )
        out.index_copy_(0, rows, o.view(n, bq, D))
        lse.index_copy_(0, rows, l_.view(n, bq))
    out = out.view(B, H, Qb * bq, D)[:, :, :Nq]
    lse = lse.view(B, H, Qb * bq)[:, :, :Nq]
    return _finish(out, lse, q)


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

    def blocked(x: torch.Tensor, nb: int, bs: int) -> torch.Tensor:
        # [B, H, N, d] (any strides) -> zero-padded fp32 blocks [B * H * nb, bs, d]; no copy when x is
        # already contiguous fp32 with N a multiple of bs.
        x = x.float()
        if nb * bs != x.shape[2]:
            x = F.pad(x, (0, 0, 0, nb * bs - x.shape[2]))
        return x.reshape(B * H * nb, bs, x.shape[-1])

    qp = blocked(q, Qb, bq).view(B, H, Qb, bq, D)
    # [B*H*Kb + 1, bk, D]: the extra all-zero block is what padding slots gather, so a NaN/inf in a block
    # a row does not list can never reach it through 0 * NaN (the kernel never reads those blocks)
    kp = torch.cat([blocked(k, Kb, bk), k.new_zeros(1, bk, D, dtype=torch.float32)])
    vp = torch.cat([blocked(v, Kb, bk), v.new_zeros(1, bk, Dv, dtype=torch.float32)])
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
    # Output has q's dtype and q's memory layout (e.g. a [B, N, H, D] buffer seen as [B, H, N, D]).
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
