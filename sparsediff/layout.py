"""Token layouts: what the sequence an attention layer sees is made of.

A :class:`TokenLayout` is an ordered tuple of :class:`Segment` s. Each segment is a contiguous run of
tokens: a video latent grid ``(F, H, W)`` after patchify (frame-major: token ``f*H*W + h*W + w``), an
image grid ``(1, H, W)`` (edit pipelines append reference-image tokens), or text tokens (no grid).
Layouts are frozen and hashable so they can key mask caches -- the key always carries the resolution.

Examples::

    TokenLayout.video(21, 30, 52)                                  # Wan 2.1 480p, 32 760 tokens
    TokenLayout.video(33, 45, 80, text_len=256, text_position="after")   # HunyuanVideo
    TokenLayout.image(64, 64, text_len=512, text_position="before")      # Flux 1024^2
    TokenLayout((Segment.text(512), Segment.image_grid(64, 64), Segment.image_grid(64, 64)))  # edit

Patterns (radial, tile, reordered) act on the *first* grid segment (:attr:`TokenLayout.grid`); every
other token (text, extra image segments) is treated as "always dense": its rows and columns are
kept in full. :meth:`TokenLayout.text_mask` marks exactly those tokens that are text;
:meth:`TokenLayout.dense_mask` marks every token outside the primary grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

__all__ = ["Segment", "TokenLayout", "SEGMENT_KINDS"]

SEGMENT_KINDS = ("video", "image", "text")


@dataclass(frozen=True)
class Segment:
    """A contiguous run of tokens.

    Attributes:
        kind: ``"video"`` (grid ``(F, H, W)``), ``"image"`` (grid ``(1, H, W)``) or ``"text"`` (no grid).
        length: number of tokens; equals ``F * H * W`` when ``grid`` is set.
        grid: ``(F, H, W)`` for video/image, ``None`` for text.
    """

    kind: str
    length: int
    grid: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.kind not in SEGMENT_KINDS:
            raise ValueError(f"Segment.kind must be one of {SEGMENT_KINDS}, got {self.kind!r}")
        if not isinstance(self.length, int) or isinstance(self.length, bool) or self.length < 0:
            raise ValueError(f"Segment.length must be a non-negative int, got {self.length!r}")
        if self.kind == "text":
            if self.grid is not None:
                raise ValueError(f"a text segment has no grid, got grid={self.grid!r}")
            return
        if self.grid is None:
            raise ValueError(f"a {self.kind} segment needs grid=(F, H, W)")
        g = tuple(self.grid)
        if len(g) != 3 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in g):
            raise ValueError(f"grid must be three positive ints (F, H, W), got {self.grid!r}")
        object.__setattr__(self, "grid", g)  # normalise lists to tuples (hashable)
        if self.kind == "image" and g[0] != 1:
            raise ValueError(f"an image segment has grid (1, H, W), got {g}")
        if math.prod(g) != self.length:
            raise ValueError(f"{self.kind} segment length {self.length} != prod(grid {g}) = {math.prod(g)}")

    @classmethod
    def text(cls, length: int) -> Segment:
        return cls("text", length, None)

    @classmethod
    def video_grid(cls, frames: int, height: int, width: int) -> Segment:
        return cls("video", frames * height * width, (frames, height, width))

    @classmethod
    def image_grid(cls, height: int, width: int) -> Segment:
        return cls("image", height * width, (1, height, width))

    def __repr__(self) -> str:
        if self.grid is None:
            return f"{self.kind}[{self.length}]"
        f, h, w = self.grid
        return f"{self.kind}[{f}x{h}x{w}]"


@dataclass(frozen=True)
class TokenLayout:
    """The ordered segments of an attention layer's token sequence (frozen, hashable, validated).

    Attributes:
        segments: tuple of :class:`Segment` (at least one). The first grid segment (video or image)
            is the *primary grid* that spatial patterns act on.
    """

    segments: tuple[Segment, ...]

    def __post_init__(self) -> None:
        segs = tuple(self.segments)
        if not segs:
            raise ValueError("TokenLayout needs at least one segment")
        for s in segs:
            if not isinstance(s, Segment):
                raise TypeError(f"TokenLayout.segments must hold Segment objects, got {type(s).__name__}")
        object.__setattr__(self, "segments", segs)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def video(
        cls, frames: int, height: int, width: int, text_len: int = 0, text_position: str = "after"
    ) -> TokenLayout:
        """A video grid ``(frames, height, width)`` (latent tokens after patchify) plus optional joint text.

        ``text_position``: ``"after"`` (HunyuanVideo, Mochi) or ``"before"`` (CogVideoX). ``text_len=0``
        means no text segment (cross-attention text, e.g. Wan / LTX).
        """
        return cls._with_text(Segment.video_grid(frames, height, width), text_len, text_position)

    @classmethod
    def image(cls, height: int, width: int, text_len: int = 0, text_position: str = "before") -> TokenLayout:
        """An image grid ``(1, height, width)`` plus optional joint text (Flux/SD3/QwenImage: before)."""
        return cls._with_text(Segment.image_grid(height, width), text_len, text_position)

    @classmethod
    def _with_text(cls, grid_seg: Segment, text_len: int, text_position: str) -> TokenLayout:
        if text_position not in ("before", "after"):
            raise ValueError(f"text_position must be 'before' or 'after', got {text_position!r}")
        if not isinstance(text_len, int) or text_len < 0:
            raise ValueError(f"text_len must be a non-negative int, got {text_len!r}")
        if text_len == 0:
            return cls((grid_seg,))
        t = Segment.text(text_len)
        return cls((t, grid_seg) if text_position == "before" else (grid_seg, t))

    def append(self, segment: Segment) -> TokenLayout:
        """A new layout with ``segment`` appended (e.g. reference-image tokens of an edit pipeline)."""
        return TokenLayout(self.segments + (segment,))

    def refit_text(self, num_tokens: int) -> TokenLayout | None:
        """This layout re-fitted to a sequence of ``num_tokens`` tokens by changing its text, or None.

        ``self`` when the length already matches. Otherwise the grid segments are kept in order and the
        text absorbs the difference: with exactly the grids' tokens the text segments are dropped
        (image-only attention, SD3.5 ``attn2``); with more, a *single* text segment gets the remaining
        tokens (Mochi: the valid prompt tokens of one sample). Anything else -- fewer tokens than the
        grids, several text segments, no grid -- is ambiguous: None.
        """
        return _refit_text(self, num_tokens)

    # ------------------------------------------------------------------ properties
    @property
    def num_tokens(self) -> int:
        return sum(s.length for s in self.segments)

    @property
    def offsets(self) -> tuple[int, ...]:
        """Token offset of every segment."""
        out, o = [], 0
        for s in self.segments:
            out.append(o)
            o += s.length
        return tuple(out)

    def _primary(self) -> int | None:
        for i, s in enumerate(self.segments):
            if s.grid is not None:
                return i
        return None

    @property
    def grid(self) -> tuple[int, int, int] | None:
        """``(F, H, W)`` of the first video/image segment (the primary grid), or None for text-only layouts."""
        i = self._primary()
        return None if i is None else self.segments[i].grid

    @property
    def grid_offset(self) -> int:
        """Token offset of the primary grid (0 when there is none)."""
        i = self._primary()
        return 0 if i is None else self.offsets[i]

    @property
    def grid_len(self) -> int:
        """Number of tokens of the primary grid (0 when there is none)."""
        g = self.grid
        return 0 if g is None else math.prod(g)

    @property
    def text_len(self) -> int:
        return sum(s.length for s in self.segments if s.kind == "text")

    def text_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[N]``: True for text tokens."""
        parts = [torch.full((s.length,), s.kind == "text", dtype=torch.bool) for s in self.segments]
        return torch.cat(parts).to(device)

    def dense_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool ``[N]``: True for every token outside the primary grid (kept dense by all patterns)."""
        m = torch.ones(self.num_tokens, dtype=torch.bool)
        if self.grid is not None:
            m[self.grid_offset : self.grid_offset + self.grid_len] = False
        return m.to(device)

    def grid_coords(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 ``[N, 3]``: ``(f, h, w)`` of each token of the primary grid, ``-1`` for all other tokens."""
        out = torch.full((self.num_tokens, 3), -1, dtype=torch.int64)
        g = self.grid
        if g is not None:
            f, h, w = torch.meshgrid(*(torch.arange(x) for x in g), indexing="ij")
            o = self.grid_offset
            out[o : o + self.grid_len] = torch.stack([f.reshape(-1), h.reshape(-1), w.reshape(-1)], -1)
        return out.to(device)

    def __repr__(self) -> str:
        return f"TokenLayout({' + '.join(repr(s) for s in self.segments)}; N={self.num_tokens})"


@functools.lru_cache(maxsize=256)
def _refit_text(layout: TokenLayout, num_tokens: int) -> TokenLayout | None:
    # memoised: the same few (layout, length) pairs recur on every layer of every call
    if num_tokens == layout.num_tokens:
        return layout
    grids = tuple(s for s in layout.segments if s.kind != "text")
    n_text = sum(1 for s in layout.segments if s.kind == "text")
    rest = num_tokens - sum(s.length for s in grids)
    if rest < 0 or not grids:
        return None
    if rest == 0:
        return TokenLayout(grids)
    if n_text != 1:
        return None
    return TokenLayout(tuple(Segment.text(rest) if s.kind == "text" else s for s in layout.segments))
