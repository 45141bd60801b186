"""`BlockSparseMask`: the one mask format every sparsediff pattern compiles to.

File-format style description
-----------------------------
A mask describes, for a query sequence of ``Nq`` tokens and a key sequence of ``Nk`` tokens cut into
blocks of ``(bq, bk)`` tokens, which key blocks each query block attends to:

``kv_indices``  int32 ``[Bm, H, Qb, Kmax]`` -- for every (batch-or-1, head, query block) the indices of the
                key blocks it attends, strictly increasing in the first ``kv_counts[...]`` entries;
                entries past the count are padding (value 0, never read).
``kv_counts``   int32 ``[Bm, H, Qb]`` -- how many entries of ``kv_indices`` are valid (0 <= count <= Kb).
``block_size``  ``(bq, bk)``; ``seq_lens`` ``(Nq, Nk)``; ``Qb = ceil(Nq / bq)``, ``Kb = ceil(Nk / bk)``.

``Bm == 1`` means the mask is shared by the whole batch (static patterns); ``Bm == B`` gives every sample
its own mask (dynamic patterns, classifier-free guidance). The last query/key block may be ragged
(``Nq % bq != 0``): tokens past the sequence end are masked inside the kernels, callers never pad.

A query row whose block lists no key block attends to nothing: its output is 0 and its log-sum-exp -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .support import cdiv as _cdiv

__all__ = ["BlockSparseMask"]


def _as_pair(x: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(x, int):
        return (int(x), int(x))
    t = tuple(int(v) for v in x)
    if len(t) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {x!r}")
    return t  # type: ignore[return-value]


class BlockSparseMask:
    """Per-(batch-or-1, head, query-block) lists of key blocks. See the module docstring for the format.

    Build one with :meth:`from_dense` (a block-level boolean tensor) or :meth:`from_kv_indices`
    (index lists + counts). The constructor validates every invariant and says which one failed.
    """

    __slots__ = ("kv_indices", "kv_counts", "block_size", "seq_lens")

    def __init__(
        self,
        kv_indices: torch.Tensor,
        kv_counts: torch.Tensor,
        block_size: int | Sequence[int],
        seq_lens: Sequence[int],
        *,
        validate: bool = True,
    ) -> None:
        self.block_size = _as_pair(block_size, "block_size")
        self.seq_lens = _as_pair(seq_lens, "seq_lens")
        self.kv_indices = kv_indices
        self.kv_counts = kv_counts
        if validate:
            self._validate()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        block_bool: torch.Tensor,
        block_size: int | Sequence[int],
        seq_lens: Sequence[int],
    ) -> BlockSparseMask:
        """Build from a block-level boolean tensor ``[Bm, H, ceil(Nq/bq), ceil(Nk/bk)]`` (True = compute)."""
        bq, bk = _as_pair(block_size, "block_size")
        nq, nk = _as_pair(seq_lens, "seq_lens")
        if not isinstance(block_bool, torch.Tensor):
            raise TypeError(f"block_bool must be a torch.Tensor, got {type(block_bool).__name__}")
        if block_bool.dim() != 4:
            raise ValueError(
                f"block_bool must be 4-D [B or 1, H, Qb, Kb], got shape {tuple(block_bool.shape)}"
            )
        qb, kb = _cdiv(nq, bq), _cdiv(nk, bk)
        if tuple(block_bool.shape[2:]) != (qb, kb):
            raise ValueError(
                f"block_bool has {tuple(block_bool.shape[2:])} blocks but seq_lens={(nq, nk)} with "
                f"block_size={(bq, bk)} needs (Qb, Kb)=({qb}, {kb})"
            )
        dense = block_bool.to(torch.bool)
        counts = dense.sum(-1, dtype=torch.int32)
        kmax = max(int(counts.max().item()) if counts.numel() else 0, 1)
        # Stable sort puts kept block indices first, in increasing order.
        order = torch.sort((~dense).to(torch.int8), dim=-1, stable=True).indices[..., :kmax]
        valid = torch.arange(kmax, device=dense.device) < counts.unsqueeze(-1)
        indices = torch.where(valid, order, torch.zeros_like(order)).to(torch.int32).contiguous()
        return cls(indices, counts.contiguous(), (bq, bk), (nq, nk), validate=False)

    @classmethod
    def from_kv_indices(
        cls,
        kv_indices: torch.Tensor,
        kv_counts: torch.Tensor,
        block_size: int | Sequence[int],
        seq_lens: Sequence[int],
    ) -> BlockSparseMask:
        """Build from index lists ``[Bm, H, Qb, Kmax]`` and counts ``[Bm, H, Qb]`` (validated)."""
        return cls(
            kv_indices.to(torch.int32).contiguous(),
            kv_counts.to(torch.int32).contiguous(),
            block_size,
            seq_lens,
        )

    @classmethod
    def full(
        cls,
        batch: int,
        heads: int,
        block_size: int | Sequence[int],
        seq_lens: Sequence[int],
        device: torch.device | str | None = None,
    ) -> BlockSparseMask:
        """A mask that attends to every key block (100 % density).

        The one full-mask builder (dense heads, warm-up passes, :func:`sparsediff.patterns.dense_mask`).
        Built directly -- no sort, no host sync -- and the index lists are one ``arange`` broadcast over
        ``[batch, heads, Qb]`` (a view: ``[Qb, Kb]`` int32 per head is never materialised; the mask's
        operations that need their own storage copy it).
        """
        bq, bk = _as_pair(block_size, "block_size")
        nq, nk = _as_pair(seq_lens, "seq_lens")
        qb, kb = _cdiv(nq, bq), _cdiv(nk, bk)
        kmax = max(kb, 1)  # as from_dense: at least one (unused) slot per row
        idx = torch.arange(kmax, dtype=torch.int32, device=device).expand(batch, heads, qb, kmax)
        cnt = torch.full((batch, heads, qb), kb, dtype=torch.int32, device=device)
        return cls(idx, cnt, (bq, bk), (nq, nk), validate=False)

    # ------------------------------------------------------------------ validation
    def _validate(self) -> None:
        idx, cnt = self.kv_indices, self.kv_counts
        bq, bk = self.block_size
        nq, nk = self.seq_lens
        for name, v in (("block_size[0]", bq), ("block_size[1]", bk)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if nq < 0 or nk < 0:
            raise ValueError(f"seq_lens must be non-negative, got {self.seq_lens}")
        if not isinstance(idx, torch.Tensor) or not isinstance(cnt, torch.Tensor):
            raise TypeError("kv_indices and kv_counts must be torch.Tensors")
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise TypeError(f"kv_indices/kv_counts must be int32, got {idx.dtype}/{cnt.dtype}")
        if idx.dim() != 4:
            raise ValueError(f"kv_indices must be 4-D [B or 1, H, Qb, Kmax], got shape {tuple(idx.shape)}")
        if cnt.dim() != 3:
            raise ValueError(f"kv_counts must be 3-D [B or 1, H, Qb], got shape {tuple(cnt.shape)}")
        if tuple(idx.shape[:3]) != tuple(cnt.shape):
            raise ValueError(
                f"kv_indices leading shape {tuple(idx.shape[:3])} != kv_counts shape {tuple(cnt.shape)}"
            )
        if idx.device != cnt.device:
            raise ValueError(f"kv_indices on {idx.device} but kv_counts on {cnt.device}")
        qb, kb = self.num_q_blocks, self.num_kv_blocks
        if idx.shape[2] != qb:
            raise ValueError(
                f"mask has {idx.shape[2]} query blocks but Nq={nq} with bq={bq} needs ceil(Nq/bq)={qb}"
            )
        if cnt.numel() == 0:
            return
        if int(cnt.min()) < 0 or int(cnt.max()) > min(kb, idx.shape[3]):
            raise ValueError(
                f"kv_counts must lie in [0, min(Kb={kb}, Kmax={idx.shape[3]})], got range "
                f"[{int(cnt.min())}, {int(cnt.max())}]"
            )
        valid = torch.arange(idx.shape[3], device=idx.device) < cnt.unsqueeze(-1)
        if valid.any():
            vals = idx[valid]
            if int(vals.min()) < 0 or int(vals.max()) >= kb:
                raise ValueError(
                    f"kv_indices must lie in [0, Kb={kb}) (Nk={nk}, bk={bk}); got range "
                    f"[{int(vals.min())}, {int(vals.max())}]"
                )
            if idx.shape[3] > 1:
                inc = (idx[..., 1:] > idx[..., :-1]) | ~valid[..., 1:]
                if not bool(inc.all()):
                    raise ValueError(
                        "kv_indices must be strictly increasing within each row's first kv_counts entries"
                    )

    # ------------------------------------------------------------------ properties
    @property
    def num_q_blocks(self) -> int:
        return _cdiv(self.seq_lens[0], self.block_size[0])

    @property
    def num_kv_blocks(self) -> int:
        return _cdiv(self.seq_lens[1], self.block_size[1])

    @property
    def batch(self) -> int:
        return self.kv_indices.shape[0]

    @property
    def heads(self) -> int:
        return self.kv_indices.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(Bm, H, Nq, Nk)`` -- the token-level shape the mask stands for."""
        return (self.batch, self.heads, self.seq_lens[0], self.seq_lens[1])

    def to(self, device: torch.device | str) -> BlockSparseMask:
        return BlockSparseMask(
            self.kv_indices.to(device),
            self.kv_counts.to(device),
            self.block_size,
            self.seq_lens,
            validate=False,
        )

    # ------------------------------------------------------------------ conversions
    def to_dense(self) -> torch.Tensor:
        """Block-level boolean tensor ``[Bm, H, Qb, Kb]``."""
        bm, h, qb, kmax = self.kv_indices.shape
        kb = self.num_kv_blocks
        out = torch.zeros(bm, h, qb, kb + 1, dtype=torch.bool, device=self.device)
        valid = torch.arange(kmax, device=self.device) < self.kv_counts.unsqueeze(-1)
        # invalid entries are routed to the scratch column kb, then dropped
        idx = torch.where(
            valid, self.kv_indices.long(), torch.full_like(self.kv_indices, kb, dtype=torch.long)
        )
        out.scatter_(-1, idx, True)
        return out[..., :kb]

    def to_token_mask(self) -> torch.Tensor:
        """Token-level boolean mask ``[Bm, H, Nq, Nk]`` (True = attend). For tests and small inputs only."""
        bq, bk = self.block_size
        nq, nk = self.seq_lens
        d = self.to_dense()
        return d.repeat_interleave(bq, dim=2)[:, :, :nq].repeat_interleave(bk, dim=3)[:, :, :, :nk]

    def _block_token_counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        bq, bk = self.block_size
        nq, nk = self.seq_lens
        rows = torch.full((self.num_q_blocks,), bq, dtype=torch.float64, device=self.device)
        cols = torch.full((self.num_kv_blocks,), bk, dtype=torch.float64, device=self.device)
        if rows.numel():
            rows[-1] = nq - bq * (self.num_q_blocks - 1)
        if cols.numel():
            cols[-1] = nk - bk * (self.num_kv_blocks - 1)
        return rows, cols

    def density_per_head(self) -> torch.Tensor:
        """Fraction of computed query x key pairs per (Bm, H), ragged blocks counted exactly (float64)."""
        nq, nk = self.seq_lens
        if nq == 0 or nk == 0:
            return torch.zeros(self.batch, self.heads, dtype=torch.float64, device=self.device)
        rows, cols = self._block_token_counts()
        d = self.to_dense().to(torch.float64)
        pairs = torch.einsum("bhqk,q,k->bh", d, rows, cols)
        return pairs / float(nq * nk)

    def density(self) -> float:
        """Fraction of computed query x key pairs over the whole mask (all batches and heads)."""
        return float(self.density_per_head().mean()) if self.batch * self.heads else 0.0

    def to_string(self, max_blocks: int = 48) -> str:
        """ASCII picture of each (batch, head) block mask: '#' computed, '.' skipped."""
        d = self.to_dense().cpu()
        lines = [repr(self)]
        for b in range(d.shape[0]):
            for h in range(d.shape[1]):
                lines.append(f"[batch {b}, head {h}] density={float(self.density_per_head()[b, h]):.3f}")
                for row in d[b, h, :max_blocks, :max_blocks]:
                    lines.append("".join("#" if x else "." for x in row.tolist()))
                if d.shape[2] > max_blocks or d.shape[3] > max_blocks:
                    lines.append(f"(showing {max_blocks}x{max_blocks} of {d.shape[2]}x{d.shape[3]} blocks)")
        return "\n".join(lines)

    def __repr__(self) -> str:
        bm, h = self.batch, self.heads
        return (
            f"BlockSparseMask(shape=(B={bm}, H={h}, Nq={self.seq_lens[0]}, Nk={self.seq_lens[1]}), "
            f"block_size={self.block_size}, blocks=({self.num_q_blocks}x{self.num_kv_blocks}), "
            f"density={self.density():.2%}, device={self.device})"
        )

    # ------------------------------------------------------------------ algebra
    def __getitem__(self, key) -> BlockSparseMask:
        """Slice by (batch, head): ``mask[b]``, ``mask[:, h0:h1]``, ``mask[0, [1, 3]]``. Dims are kept."""
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 2:
            raise IndexError("BlockSparseMask can be sliced by (batch, head) only")

        def norm(k, size: int, what: str):
            if isinstance(k, bool) or not isinstance(k, int):
                return k
            if not -size <= k < size:
                raise IndexError(f"{what} index {k} out of range for a mask with {what} size {size}")
            k %= size
            return slice(k, k + 1)

        bk = norm(key[0], self.batch, "batch")
        hk = norm(key[1], self.heads, "head") if len(key) == 2 else slice(None)
        idx = self.kv_indices[bk][:, hk]
        cnt = self.kv_counts[bk][:, hk]
        return BlockSparseMask(
            idx.contiguous(), cnt.contiguous(), self.block_size, self.seq_lens, validate=False
        )

    def _check_compatible(self, other: BlockSparseMask, *, heads: bool = True) -> None:
        if self.block_size != other.block_size or self.seq_lens != other.seq_lens:
            raise ValueError(
                f"masks differ: block_size {self.block_size} vs {other.block_size}, "
                f"seq_lens {self.seq_lens} vs {other.seq_lens}"
            )
        dims = [("batch", self.batch, other.batch)] + ([("heads", self.heads, other.heads)] if heads else [])
        for what, a, b in dims:
            if a != b and 1 not in (a, b):
                raise ValueError(f"masks have {what} {a} and {b}; they must match or one must be 1")

    def union(self, other: BlockSparseMask) -> BlockSparseMask:
        """Blocks computed by either mask (a batch or head dim of 1 broadcasts against the other)."""
        self._check_compatible(other)
        return BlockSparseMask.from_dense(self.to_dense() | other.to_dense(), self.block_size, self.seq_lens)

    __or__ = union

    def intersection(self, other: BlockSparseMask) -> BlockSparseMask:
        self._check_compatible(other)
        return BlockSparseMask.from_dense(self.to_dense() & other.to_dense(), self.block_size, self.seq_lens)

    __and__ = intersection

    @staticmethod
    def cat_heads(masks: Sequence[BlockSparseMask]) -> BlockSparseMask:
        """Concatenate masks along the head dimension (batch dims must match or be 1)."""
        if not masks:
            raise ValueError("cat_heads needs at least one mask")
        first = masks[0]
        for m in masks[1:]:
            first._check_compatible(m, heads=False)
        bm = max(m.batch for m in masks)
        kmax = max(m.kv_indices.shape[3] for m in masks)
        idx, cnt = [], []
        for m in masks:
            if m.batch not in (1, bm):
                raise ValueError(f"cannot concatenate masks with batch {m.batch} and {bm}")
            i = torch.nn.functional.pad(m.kv_indices, (0, kmax - m.kv_indices.shape[3]))
            idx.append(i.expand(bm, -1, -1, -1))
            cnt.append(m.kv_counts.expand(bm, -1, -1))
        return BlockSparseMask(
            torch.cat(idx, 1).contiguous(),
            torch.cat(cnt, 1).contiguous(),
            first.block_size,
            first.seq_lens,
            validate=False,
        )

    def expand_batch(self, batch: int) -> BlockSparseMask:
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot expand a mask with batch {self.batch} to {batch}")
        return BlockSparseMask(
            self.kv_indices.expand(batch, -1, -1, -1).contiguous(),
            self.kv_counts.expand(batch, -1, -1).contiguous(),
            self.block_size,
            self.seq_lens,
            validate=False,
        )

    def to_flex_block_mask(self):
        """Convert to a FlexAttention ``BlockMask`` (needs ``torch.nn.attention.flex_attention``).

        FlexAttention requires one block size for q and k. Listed blocks that lie fully inside both
        sequences become *full* blocks (no ``mask_mod`` call in the fused kernel); the ragged last
        row/column of blocks become *partial* blocks. The ``mask_mod`` encodes the whole mask (block
        table lookup and ``< Nq`` / ``< Nk`` bounds), because FlexAttention's eager/CPU path ignores the
        block lists and applies only ``mask_mod``.
        """
        try:
            from torch.nn.attention.flex_attention import BlockMask
        except ImportError as e:  # pragma: no cover - depends on the torch build
            raise RuntimeError("to_flex_block_mask needs torch>=2.5 with FlexAttention") from e
        bq, bk = self.block_size
        nq, nk = self.seq_lens
        if bq != bk:
            raise ValueError(f"FlexAttention needs equal q/k block sizes, got {self.block_size}")
        qb, kb = self.num_q_blocks, self.num_kv_blocks
        dense = self.to_dense()  # [Bm, H, Qb, Kb]
        q_full = torch.arange(qb, device=self.device) < nq // bq
        k_full = torch.arange(kb, device=self.device) < nk // bk
        full = dense & q_full[:, None] & k_full[None, :]
        partial = dense & ~full

        def lists(block_bool):
            m = BlockSparseMask.from_dense(block_bool, (bq, bk), (nq, nk))
            idx = torch.nn.functional.pad(m.kv_indices, (0, max(kb - m.kv_indices.shape[-1], 0)))
            return m.kv_counts, idx.contiguous()

        table = dense if self.batch > 1 else dense[0]

        def mask_mod(b, h, q_idx, kv_idx):
            qi, ki = q_idx // bq, kv_idx // bk
            hit = table[b, h, qi, ki] if self.batch > 1 else table[h, qi, ki]
            return hit & (q_idx < nq) & (kv_idx < nk)

        p_cnt, p_idx = lists(partial)
        f_cnt, f_idx = lists(full)
        return BlockMask.from_kv_blocks(
            p_cnt, p_idx, f_cnt, f_idx, BLOCK_SIZE=(bq, bk), mask_mod=mask_mod, seq_lengths=(nq, nk)
        )

    def to_image(self, path, *, batch: int = 0, heads: Sequence[int] | None = None, scale: int = 4) -> None:
        """Render the block mask of ``batch`` (one panel per head) to a PNG at ``path``."""
        from .viz import save_block_masks

        save_block_masks(self, path, batch=batch, heads=heads, scale=scale)

    def memory_bytes(self) -> int:
        return self.kv_indices.numel() * 4 + self.kv_counts.numel() * 4

    def num_computed_blocks(self) -> int:
        return int(self.kv_counts.sum())
