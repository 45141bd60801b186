"""PNG rendering of block masks and attention maps (pillow; imported lazily).

* :func:`save_block_masks` -- one panel per head of a :class:`~sparsediff.BlockSparseMask`
  (white = computed block, black = skipped), panels side by side with a 2-pixel grey gutter.
  ``BlockSparseMask.to_image(path)`` calls it.
* :func:`save_attention_map` -- a per-head attention probability map (or any ``[Nq, Nk]`` matrix),
  log-scaled grey levels, optionally with a block mask outlined in red.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["save_block_masks", "save_attention_map", "attention_probs"]


def _pil():
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is a dependency
        raise ImportError("sparsediff.viz needs pillow: pip install pillow") from e
    return Image


def save_block_masks(
    mask, path, *, batch: int = 0, heads: Sequence[int] | None = None, scale: int = 4
) -> Path:
    """Write the block masks of ``mask[batch, heads]`` to ``path`` (PNG); returns the path.

    Each block is ``scale x scale`` pixels; panels are laid out left to right in ``heads`` order
    (default: all heads).
    """
    Image = _pil()
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    d = mask.to_dense()[batch].cpu()  # [H, Qb, Kb]
    heads = list(range(d.shape[0])) if heads is None else list(heads)
    if not heads:
        raise ValueError("no heads to draw")
    qb, kb = d.shape[1], d.shape[2]
    gut = 2
    width = len(heads) * (kb * scale + gut) - gut
    canvas = torch.full((max(qb * scale, 1), max(width, 1)), 128, dtype=torch.uint8)
    for i, h in enumerate(heads):
        panel = (d[h].to(torch.uint8) * 255).repeat_interleave(scale, 0).repeat_interleave(scale, 1)
        x0 = i * (kb * scale + gut)
        canvas[: qb * scale, x0 : x0 + kb * scale] = panel
    path = Path(path)
    Image.fromarray(canvas.numpy()).save(path)
    return path


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Dense softmax probabilities ``[..., Nq, Nk]`` (float32) -- for small inputs / visualisation."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, -1)


def save_attention_map(
    probs: torch.Tensor,
    path,
    *,
    block_mask=None,
    head: int = 0,
    batch: int = 0,
    max_size: int = 1024,
    floor: float = 1e-6,
) -> Path:
    """Render ``probs [Nq, Nk]`` (or ``[B, H, Nq, Nk]``, picking ``batch``/``head``) as a log-scaled grey PNG.

    Values are mapped ``log10(max(p, floor))`` -> 0..255 relative to the map's maximum. Maps larger than
    ``max_size`` are max-pooled down. ``block_mask`` (a :class:`~sparsediff.BlockSparseMask` of the same
    ``(Nq, Nk)``) draws the outline of the kept blocks in red.
    """
    Image = _pil()
    p = probs
    if p.dim() == 4:
        p = p[batch, head]
    if p.dim() != 2:
        raise ValueError(f"probs must be [Nq, Nk] or [B, H, Nq, Nk], got shape {tuple(probs.shape)}")
    p = p.detach().float().cpu()
    nq, nk = p.shape
    f = max(1, -(-max(nq, nk) // max_size))
    if f > 1:
        p = torch.nn.functional.max_pool2d(p[None, None], f, ceil_mode=True)[0, 0]
    lg = torch.log10(p.clamp_min(floor))
    lo, hi = float(torch.log10(torch.tensor(floor))), float(lg.max())
    grey = ((lg - lo) / max(hi - lo, 1e-12) * 255).clamp(0, 255).to(torch.uint8)
    rgb = grey.unsqueeze(-1).repeat(1, 1, 3)
    if block_mask is not None:
        if tuple(block_mask.seq_lens) != (nq, nk):
            raise ValueError(f"block_mask is for {tuple(block_mask.seq_lens)}, probs are {(nq, nk)}")
        tm = block_mask.to_token_mask()[min(batch, block_mask.batch - 1), head].float()
        if f > 1:
            tm = torch.nn.functional.max_pool2d(tm[None, None], f, ceil_mode=True)[0, 0]
        tm = tm > 0
        edge = tm.clone()
        inner = tm.clone()
        inner[1:-1, 1:-1] = tm[:-2, 1:-1] & tm[2:, 1:-1] & tm[1:-1, :-2] & tm[1:-1, 2:] & tm[1:-1, 1:-1]
        edge &= ~inner
        rgb[edge] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    path = Path(path)
    Image.fromarray(rgb.numpy()).save(path)
    return path
