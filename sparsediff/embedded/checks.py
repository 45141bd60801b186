"""Automatic colour / direction check of generated clips against their prompts.

For each frame, every pixel is labelled with the nearest of: the palette colours, the background and the
distractor grey -- or "none" when it is farther than ``max_dist`` (RGB L2 in [0, 1]) from all of them.

* **colour right**: among the palette labels, the prompted colour covers the most pixels over the clip, and
  at least ``min_coverage`` of the frame on average (the smallest main object covers ~2 %).
* **direction right**: the centroid of the prompted colour's pixels, fitted by least squares over the frames
  where it is visible, moves at least ``min_move`` (fraction of the frame) over the clip, and the motion is
  within 45 degrees of the prompted direction (component along it larger than the perpendicular one).

Run on ground-truth clips from :mod:`.data` the check passes (the tests require >= 95 %); the issue's bar for
the trained model is direction >= 70 % and colour >= 90 % of prompts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .data import BACKGROUND, COLOURS, DIRECTIONS, DISTRACTOR_COLOUR, parse_caption

__all__ = ["ClipCheck", "CheckSummary", "check_clip", "check_videos", "label_pixels", "to_frames"]

_NAMES = list(COLOURS) + ["background", "distractor"]
_REFS = np.array(list(COLOURS.values()) + [BACKGROUND, DISTRACTOR_COLOUR], dtype=np.float32)


@dataclass
class ClipCheck:
    """Result for one clip. ``displacement`` is the fitted centroid motion over the clip, (dx, dy) in
    fractions of (width, height), y down; ``coverage`` the mean fraction of the frame in the prompted
    colour; ``detected_colour`` the palette colour covering the most pixels (``None`` if none does)."""

    prompt: str
    colour: str | None
    direction: str | None
    detected_colour: str | None
    coverage: float
    displacement: tuple[float, float] | None
    colour_ok: bool
    direction_ok: bool


@dataclass
class CheckSummary:
    """Rates over clips (``colour_rate``, ``direction_rate`` in [0, 1]) and the per-clip results."""

    colour_rate: float
    direction_rate: float
    results: list[ClipCheck]

    def to_dict(self) -> dict:
        return {
            "colour_rate": self.colour_rate,
            "direction_rate": self.direction_rate,
            "results": [asdict(r) for r in self.results],
        }

    def __str__(self) -> str:
        return (
            f"colour right {self.colour_rate:.0%}, direction right {self.direction_rate:.0%} "
            f"({len(self.results)} clips)"
        )


def to_frames(video: np.ndarray | torch.Tensor, layout: str) -> np.ndarray:
    """Convert a clip to ``[F, H, W, 3]`` float32 in [0, 1].

    ``layout``: ``"FHWC01"`` (pipeline ``output_type="np"``), ``"FCHW01"`` (pipeline ``"pt"``) or
    ``"CFHW11"`` (dataset / pipeline ``"latent"``, values in [-1, 1]).
    """
    x = (
        video.detach().float().cpu().numpy()
        if isinstance(video, torch.Tensor)
        else np.asarray(video, np.float32)
    )
    if layout == "FHWC01":
        out = x
    elif layout == "FCHW01":
        out = x.transpose(0, 2, 3, 1)
    elif layout == "CFHW11":
        out = (x.transpose(1, 2, 3, 0) + 1.0) / 2.0
    else:
        raise ValueError(f"unknown layout {layout!r}; expected 'FHWC01', 'FCHW01' or 'CFHW11'")
    if out.ndim != 4 or out.shape[-1] != 3:
        raise ValueError(f"expected one clip with 3 channels, got shape {x.shape} for layout {layout}")
    return np.clip(out.astype(np.float32), 0.0, 1.0)


def label_pixels(frames: np.ndarray, max_dist: float = 0.3) -> np.ndarray:
    """Index into ``list(COLOURS) + ["background", "distractor"]`` of the nearest reference colour per
    pixel, ``-1`` where none is within ``max_dist``. ``frames [F, H, W, 3]`` in [0, 1] -> ``[F, H, W]``."""
    d = np.linalg.norm(frames[..., None, :] - _REFS, axis=-1)  # [F, H, W, R]
    lab = d.argmin(-1)
    lab[d.min(-1) > max_dist] = -1
    return lab


def check_clip(
    frames: np.ndarray,
    prompt: str,
    *,
    max_dist: float = 0.3,
    min_coverage: float = 0.005,
    min_move: float = 0.05,
    min_pixels: int = 3,
) -> ClipCheck:
    """Check one clip ``frames [F, H, W, 3]`` in [0, 1] (see :func:`to_frames`) against ``prompt``."""
    want = parse_caption(prompt)
    F, H, W, _ = frames.shape
    lab = label_pixels(frames, max_dist)
    counts = np.array([(lab == i).sum() for i in range(len(COLOURS))])
    detected = list(COLOURS)[int(counts.argmax())] if counts.max() > 0 else None
    colour = want["colour"]
    coverage = 0.0
    colour_ok = direction_ok = False
    disp = None
    if colour is not None:
        ci = list(COLOURS).index(colour)
        mask = lab == ci  # [F, H, W]
        coverage = float(mask.mean())
        colour_ok = detected == colour and coverage >= min_coverage
        n = mask.sum((1, 2))
        vis = n >= min_pixels
        if vis.sum() >= 2 and F > 1:
            ys, xs = (np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W
            cx = (mask.sum(1) * xs).sum(1)[vis] / n[vis]
            cy = (mask.sum(2) * ys).sum(1)[vis] / n[vis]
            s = np.linspace(0.0, 1.0, F)[vis]
            if np.ptp(s) > 0:
                slope = lambda c: float(np.polyfit(s, c, 1)[0])  # noqa: E731
                disp = (slope(cx), slope(cy))
    if disp is not None and want["direction"] is not None:
        u = np.array(DIRECTIONS[want["direction"]])
        along = float(np.dot(disp, u))
        perp = float(abs(np.dot(disp, u[::-1])))
        direction_ok = along >= min_move and along > perp
    return ClipCheck(
        prompt, colour, want["direction"], detected, coverage, disp, bool(colour_ok), bool(direction_ok)
    )


def check_videos(videos: list[np.ndarray], prompts: list[str], **kwargs) -> CheckSummary:
    """:func:`check_clip` over clips (each ``[F, H, W, 3]`` in [0, 1]) and their prompts."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts")
    res = [check_clip(v, p, **kwargs) for v, p in zip(videos, prompts)]
    n = max(len(res), 1)
    return CheckSummary(sum(r.colour_ok for r in res) / n, sum(r.direction_ok for r in res) / n, res)
