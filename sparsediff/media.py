"""Videos and labelled strips written by the tools (``sparsediff demo``, ``sparsediff compare``).

* :func:`write_video` -- ``[F, H, W, C]`` frames in [0, 1] to an mp4 (imageio-ffmpeg) or a GIF (the
  fallback when mp4 cannot be written, or on request);
* :func:`save_strip` -- a labelled PNG: one row per video (label and notes on the left), evenly spaced
  frames left to right, nearest-upscaled so that small videos stay visible.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["write_video", "save_strip", "to_uint8"]

logger = logging.getLogger(__name__)


def to_uint8(frames: Any) -> np.ndarray:
    """``[F, H, W, 3]`` uint8 from frames in [0, 1] (one channel repeated to three)."""
    arr = (np.clip(np.asarray(frames, dtype=np.float32), 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 3:  # one frame
        arr = arr[None]
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def write_video(frames: Any, stem: str | Path, fmt: str = "mp4", fps: int = 8) -> Path:
    """Write ``frames`` to ``stem.mp4`` (``fmt="mp4"``; ``stem.gif`` with a warning when imageio-ffmpeg is
    missing or fails) or ``stem.gif``; returns the path written."""
    import imageio.v2 as imageio

    if fmt not in ("mp4", "gif"):
        raise ValueError(f"video format must be 'mp4' or 'gif', got {fmt!r}")
    arr = list(to_uint8(frames))
    stem = Path(stem)
    if fmt == "mp4":
        try:
            import imageio_ffmpeg  # noqa: F401

            path = stem.with_suffix(".mp4")
            imageio.mimwrite(path, arr, fps=fps, macro_block_size=1)
            return path
        except Exception as e:  # no ffmpeg binary / codec: fall back to GIF, visibly
            logger.warning("mp4 writing failed (%s: %s); writing a GIF instead", type(e).__name__, e)
    path = stem.with_suffix(".gif")
    imageio.mimwrite(path, arr, duration=1.0 / fps, loop=0)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def _label_lines(label: str, width_chars: int) -> list[str]:
    out: list[str] = []
    for part in label.split("\n"):
        out += textwrap.wrap(part, width_chars, break_on_hyphens=False) or [part]
    return out


def save_strip(
    rows: Mapping[str, Any] | Sequence[tuple[str, Any]],
    path: str | Path,
    *,
    notes: Mapping[str, str] | None = None,
    n_frames: int = 6,
    title: str = "",
) -> Path:
    """A labelled strip PNG: one row per ``(label, video [F, H, W, C] in [0, 1])``.

    ``rows`` is a mapping ``label -> video`` (insertion order) or a list of pairs (labels may repeat and
    hold ``\\n``). ``notes[label]`` is printed under the label in grey. ``n_frames`` evenly spaced frames
    per row, ``title`` on top (wrapped). Returns the path.
    """
    from PIL import Image, ImageDraw

    items = list(rows.items()) if isinstance(rows, Mapping) else list(rows)
    if not items:
        raise ValueError("save_strip: no rows")
    notes = notes or {}
    vids = [to_uint8(v) for _, v in items]
    f, h, w, _ = vids[0].shape
    scale = max(1, min(4, 128 // max(h, w)))
    th, tw = h * scale, w * scale
    idx = np.unique(np.linspace(0, f - 1, num=min(n_frames, f)).round().astype(int))
    label_w, pad = 210, 4
    width = label_w + len(idx) * (tw + pad)
    title_lines = textwrap.wrap(title, max(20, width // 8)) if title else []
    head = 8 + 20 * len(title_lines) + 18
    big, small = _font(15), _font(12)
    heights = []
    for label, _ in items:
        n_text = len(_label_lines(label, 24)[:4]) * 17 + len(notes.get(label, "").split("\n")) * 15 + 10
        heights.append(max(th, n_text))
    canvas = Image.new("RGB", (width, head + sum(heights) + pad * len(items)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((4, 4 + 20 * k), line, fill=(0, 0, 0), font=big)
    for c, fi in enumerate(idx):
        draw.text((label_w + c * (tw + pad), head - 16), f"frame {fi}", fill=(90, 90, 90), font=small)
    y0 = head
    for (label, _), vid, rh in zip(items, vids, heights):
        lines = _label_lines(label, 24)[:4]
        for k, line in enumerate(lines):
            draw.text((6, y0 + 2 + 17 * k), line, fill=(0, 0, 0), font=big)
        y_note = y0 + 6 + 17 * len(lines)
        for k, line in enumerate(notes.get(label, "").split("\n")):
            draw.text((6, y_note + 15 * k), line[:32], fill=(70, 70, 70), font=small)
        for c, fi in enumerate(idx):
            tile = Image.fromarray(vid[min(fi, len(vid) - 1)]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (tw + pad), y0))
        y0 += rh + pad
    path = Path(path)
    canvas.save(path)
    return path
