"""Procedural, seeded text-to-video data: coloured shapes moving in a prompted direction.

Every clip shows one *main* object (a shape of one palette colour) on a black background, moving in the
captioned direction at the captioned speed, plus optional small grey distractors that move in random
directions and bounce off the frame borders. Captions follow a closed grammar::

    "a|an {colour} {shape} moving {direction}[ {speed}]"     e.g. "a red circle moving left quickly"

Geometry is in *fractions of the frame* (positions in [0, 1] of width/height, sizes in fractions of
``min(height, width)``, motion as the fraction of the free travel range covered over the whole clip), so the
same clip parameters render consistently at any resolution and frame count (8x32x32 and 16x64x64 show the
same motion). The main object's start point is drawn so that it never touches a border during the clip: its
centroid moves monotonically in the captioned direction, which is what :mod:`.checks` tests. Distractors
bounce (reflect at the borders) and are grey, a colour outside the palette, so they never match a caption.

Rendering is vectorised torch (hard masks, no anti-aliasing) and runs on whatever device it is asked to, so a
training loop generates batches on the GPU on the fly (a 32 x 16 x 64 x 64 batch takes milliseconds).

Determinism: :class:`ProceduralVideoDataset` item ``i`` depends only on ``(seed, i)``; :func:`sample_params`
draws from the ``torch.Generator`` it is given (a CPU generator; the params are tiny) and rendering is
deterministic given the params.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "COLOURS",
    "SHAPES",
    "DIRECTIONS",
    "SPEEDS",
    "DISTRACTOR_COLOUR",
    "BACKGROUND",
    "CAPTION_WORDS",
    "ClipParams",
    "sample_params",
    "render",
    "caption",
    "parse_caption",
    "sample_batch",
    "render_prompt",
    "ProceduralVideoDataset",
    "eval_prompts",
    "heldout_prompts",
    "HELDOUT_SEED",
]

#: Palette of the main object (RGB in [0, 1]); each colour is at least 0.45 away (L2) from every other, from
#: the background and from the distractor grey.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 0.85, 0.1),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "magenta": (0.95, 0.1, 0.95),
    "cyan": (0.1, 0.9, 0.95),
    "orange": (1.0, 0.5, 0.0),
    "white": (1.0, 1.0, 1.0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
#: Unit motion per direction in image coordinates (x right, y down).
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0),
    "right": (1.0, 0.0),
    "up": (0.0, -1.0),
    "down": (0.0, 1.0),
}
#: Caption speed word -> fraction of the free travel range covered over the clip ("" = no speed word).
#: Larger than the first recipe's 0.25 / 0.4 / 0.55: at 8 x 32 x 32 those moved the object about one pixel per
#: frame (a quarter of a 4-px patch), so a clip's start side said little about its direction.
SPEEDS: dict[str, float] = {"slowly": 0.45, "": 0.65, "quickly": 0.85}
DISTRACTOR_COLOUR: tuple[float, float, float] = (0.45, 0.45, 0.45)
BACKGROUND: tuple[float, float, float] = (0.0, 0.0, 0.0)
#: Every word a caption can contain (the tokenizer's closed vocabulary).
CAPTION_WORDS: tuple[str, ...] = (
    ("a", "an", "moving") + tuple(COLOURS) + SHAPES + tuple(DIRECTIONS) + tuple(s for s in SPEEDS if s)
)

_SIZE_RANGE = (0.13, 0.19)  # main object radius, fraction of min(H, W)
_DISTRACTOR_SCALE = 0.6  # distractor radius relative to the main object's range
_PERP_DRIFT = 0.12  # max perpendicular drift over the clip, fraction of the free range


@dataclass
class ClipParams:
    """Parameters of a batch of ``B`` clips (all tensors on CPU, resolution independent).

    Attributes:
        colour, shape, direction, speed: ``[B]`` int64 indices into ``COLOURS``, ``SHAPES``, ``DIRECTIONS``,
            ``SPEEDS`` (dict order).
        radius: ``[B]`` main object radius, fraction of ``min(H, W)``.
        start: ``[B, 2]`` main object centre at frame 0, (x, y) fractions of (W, H).
        travel: ``[B, 2]`` main object displacement over the whole clip, (x, y) fractions of (W, H).
        n_distractors: ``[B]`` number of active distractors (0..``dist_start.shape[1]``).
        dist_shape, dist_radius, dist_start, dist_travel: ``[B, K]``, ``[B, K]``, ``[B, K, 2]``, ``[B, K, 2]``
            (distractors bounce, so their travel may exceed the frame).
    """

    colour: torch.Tensor
    shape: torch.Tensor
    direction: torch.Tensor
    speed: torch.Tensor
    radius: torch.Tensor
    start: torch.Tensor
    travel: torch.Tensor
    n_distractors: torch.Tensor
    dist_shape: torch.Tensor
    dist_radius: torch.Tensor
    dist_start: torch.Tensor
    dist_travel: torch.Tensor

    def __len__(self) -> int:
        return int(self.colour.shape[0])

    def metadata(self, i: int) -> dict[str, Any]:
        """Plain-Python description of clip ``i`` (what :mod:`.checks` compares against)."""
        m = {
            "colour": list(COLOURS)[int(self.colour[i])],
            "shape": SHAPES[int(self.shape[i])],
            "direction": list(DIRECTIONS)[int(self.direction[i])],
            "speed": list(SPEEDS)[int(self.speed[i])],
            "radius": float(self.radius[i]),
            "start": tuple(float(v) for v in self.start[i]),
            "travel": tuple(float(v) for v in self.travel[i]),
            "n_distractors": int(self.n_distractors[i]),
        }
        m["caption"] = caption(m)
        return m


def caption(meta: dict[str, Any]) -> str:
    """``"a|an {colour} {shape} moving {direction}[ {speed}]"`` from a metadata dict ("an" before a vowel)."""
    article = "an" if meta["colour"][0] in "aeiou" else "a"
    text = f"{article} {meta['colour']} {meta['shape']} moving {meta['direction']}"
    return f"{text} {meta['speed']}" if meta.get("speed") else text


def parse_caption(text: str) -> dict[str, str | None]:
    """Inverse of :func:`caption`, tolerant: returns the first colour/shape/direction/speed word found
    (``None`` for a missing one; speed ``""`` when absent)."""
    words = text.lower().replace(",", " ").split()
    pick = lambda options: next((w for w in words if w in options), None)  # noqa: E731
    return {
        "colour": pick(COLOURS),
        "shape": pick(SHAPES),
        "direction": pick(DIRECTIONS),
        "speed": pick([s for s in SPEEDS if s]) or "",
    }


def _uniform(gen: torch.Generator, shape: tuple[int, ...], lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def sample_params(
    batch_size: int,
    generator: torch.Generator,
    *,
    distractor_prob: float = 0.3,
    max_distractors: int = 2,
    colour: int | None = None,
    shape: int | None = None,
    direction: int | None = None,
    speed: int | None = None,
) -> ClipParams:
    """Draw ``batch_size`` clips from ``generator`` (a CPU ``torch.Generator``).

    Each of the ``max_distractors`` distractor slots is active with probability ``distractor_prob``. Pass
    ``colour``/``shape``/``direction``/``speed`` (indices) to fix them, e.g. to render a given prompt.
    """
    B, K = batch_size, max_distractors

    def idx(n: int, fixed: int | None) -> torch.Tensor:
        if fixed is not None:
            return torch.full((B,), int(fixed), dtype=torch.long)
        return torch.randint(0, n, (B,), generator=generator)

    col, shp, dirn, spd = (
        idx(len(COLOURS), colour),
        idx(len(SHAPES), shape),
        idx(len(DIRECTIONS), direction),
        idx(len(SPEEDS), speed),
    )
    radius = _uniform(generator, (B,), *_SIZE_RANGE)
    # Motion: along the prompted axis cover SPEEDS[speed] of the free range, plus a small perpendicular drift.
    unit = torch.tensor(list(DIRECTIONS.values()))[dirn]  # [B, 2]
    frac = torch.tensor(list(SPEEDS.values()))[spd]  # [B]
    free = 1.0 - 2.0 * radius  # free range of the centre (square frames; fractions)
    along = frac * free
    perp = _uniform(generator, (B,), -_PERP_DRIFT, _PERP_DRIFT) * free
    travel = unit * along[:, None] + unit.flip(1).abs() * perp[:, None]
    # Start so that start + s * travel stays within [r, 1 - r] for s in [0, 1] on both axes.
    lo = radius[:, None] - torch.minimum(travel, torch.zeros_like(travel))
    hi = (1.0 - radius[:, None]) - torch.maximum(travel, torch.zeros_like(travel))
    start = lo + (hi - lo).clamp_min(0) * torch.rand((B, 2), generator=generator)

    active = torch.rand((B, K), generator=generator) < distractor_prob
    n_dist = active.sum(1)  # slots are i.i.d., so the first n_distractors slots are the drawn ones
    dist_shape = torch.randint(0, len(SHAPES), (B, K), generator=generator)
    dist_radius = _uniform(generator, (B, K), *_SIZE_RANGE) * _DISTRACTOR_SCALE
    dist_start = _uniform(generator, (B, K, 2), 0.1, 0.9)
    angle = _uniform(generator, (B, K), 0.0, 2 * math.pi)
    dist_speed = _uniform(generator, (B, K), 0.2, 0.8)
    dist_travel = torch.stack([angle.cos(), angle.sin()], -1) * dist_speed[..., None]
    return ClipParams(
        col, shp, dirn, spd, radius, start, travel, n_dist, dist_shape, dist_radius, dist_start, dist_travel
    )


def _fold(p: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Reflect positions ``p`` into ``[lo, hi]`` (bouncing off both ends)."""
    span = (hi - lo).clamp_min(1e-6)
    x = torch.remainder(p - lo, 2 * span)
    return lo + span - (x - span).abs()


def _shape_mask(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of ``SHAPES[shape]`` at normalised offsets ``u, v`` (radius 1, y down).

    ``shape`` broadcasts against ``u``/``v``. Shapes: circle (disc of radius 1), square (half-side 0.8, about
    the disc's area), triangle (equilateral, apex up, inscribed in the unit disc), diamond (|u|+|v| <= 1.1),
    cross (plus sign, arm half-width 0.33).
    """
    au, av = u.abs(), v.abs()
    masks = torch.stack(
        [
            u * u + v * v <= 1.0,
            torch.maximum(au, av) <= 0.8,
            (v <= 0.5) & (au <= (v + 1.0) * (math.sqrt(3.0) / 3.0)),
            au + av <= 1.1,
            ((au <= 0.33) & (av <= 1.0)) | ((av <= 0.33) & (au <= 1.0)),
        ]
    )
    index = shape.expand(masks.shape[1:]).unsqueeze(0)
    return torch.gather(masks, 0, index).squeeze(0)


def render(
    params: ClipParams,
    num_frames: int,
    height: int,
    width: int,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Render clips to a video tensor ``[B, 3, num_frames, height, width]`` in ``[-1, 1]``.

    Pixel centres are sampled at ``(i + 0.5) / size``; masks are hard (no anti-aliasing). Paint order:
    background, distractors, main object (the main object is never occluded).
    """
    dev = torch.device(device)
    p = {k: v.to(dev) for k, v in vars(params).items()}
    B, K, F = len(params), p["dist_start"].shape[1], num_frames
    s = torch.linspace(0.0, 1.0, F, device=dev) if F > 1 else torch.zeros(1, device=dev)
    ys = (torch.arange(height, device=dev, dtype=torch.float32) + 0.5) / height
    xs = (torch.arange(width, device=dev, dtype=torch.float32) + 0.5) / width
    short = float(min(height, width))
    # Radii in fractions of W (x) and H (y), so that shapes stay round on non-square frames.
    aspect = torch.tensor([short / width, short / height], device=dev)

    def centre(start: torch.Tensor, travel: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
        # start/travel [..., 2], radius [...] -> [..., F, 2], bounced into the frame
        pos = start[..., None, :] + s[:, None] * travel[..., None, :]
        r = radius[..., None, None] * aspect
        return _fold(pos, r, 1.0 - r)

    def mask(c: torch.Tensor, radius: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
        # c [..., F, 2], radius [...], shape [...] -> [..., F, H, W]
        rx = (radius * short / width)[..., None, None, None]
        ry = (radius * short / height)[..., None, None, None]
        u = (xs.view(1, 1, width) - c[..., 0, None, None]) / rx
        v = (ys.view(1, height, 1) - c[..., 1, None, None]) / ry
        return _shape_mask(shape[..., None, None, None], u, v)

    palette = torch.tensor(list(COLOURS.values()), device=dev, dtype=torch.float32)
    video = torch.empty(B, 3, F, height, width, device=dev, dtype=torch.float32)
    video[:] = torch.tensor(BACKGROUND, device=dev).view(1, 3, 1, 1, 1)
    if K:
        dmask = mask(
            centre(p["dist_start"], p["dist_travel"], p["dist_radius"]), p["dist_radius"], p["dist_shape"]
        )
        dmask &= (torch.arange(K, device=dev)[None, :] < p["n_distractors"][:, None])[..., None, None, None]
        dmask = dmask.any(1)  # [B, F, H, W]
        grey = torch.tensor(DISTRACTOR_COLOUR, device=dev).view(1, 3, 1, 1, 1)
        video = torch.where(dmask[:, None], grey, video)
    m = mask(centre(p["start"], p["travel"], p["radius"]), p["radius"], p["shape"])  # [B, F, H, W]
    colour = palette[p["colour"]].view(B, 3, 1, 1, 1)
    video = torch.where(m[:, None], colour, video)
    return (video * 2.0 - 1.0).to(dtype)


@dataclass
class Batch:
    """A rendered batch: ``video [B, 3, F, H, W]`` in [-1, 1], ``captions`` (B strings), ``params``."""

    video: torch.Tensor
    captions: list[str]
    params: ClipParams

    def metadata(self) -> list[dict[str, Any]]:
        return [self.params.metadata(i) for i in range(len(self.params))]


def sample_batch(
    batch_size: int,
    num_frames: int,
    height: int,
    width: int,
    generator: torch.Generator,
    *,
    device: torch.device | str = "cpu",
    distractor_prob: float = 0.3,
    max_distractors: int = 2,
) -> Batch:
    """Draw and render a batch (params from the CPU ``generator``, pixels on ``device``)."""
    params = sample_params(
        batch_size, generator, distractor_prob=distractor_prob, max_distractors=max_distractors
    )
    video = render(params, num_frames, height, width, device=device)
    return Batch(video, [params.metadata(i)["caption"] for i in range(batch_size)], params)


def render_prompt(
    prompt: str,
    num_frames: int,
    height: int,
    width: int,
    *,
    seed: int = 0,
    distractor_prob: float = 0.0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A ground-truth clip ``[3, F, H, W]`` in [-1, 1] for a caption (colour/shape/direction/speed parsed
    from it; missing words drawn from ``seed``), e.g. the reference for a generated sample."""
    want = parse_caption(prompt)
    fixed = {
        "colour": None if want["colour"] is None else list(COLOURS).index(want["colour"]),
        "shape": None if want["shape"] is None else SHAPES.index(want["shape"]),
        "direction": None if want["direction"] is None else list(DIRECTIONS).index(want["direction"]),
        "speed": list(SPEEDS).index(want["speed"] or ""),
    }
    gen = torch.Generator().manual_seed(seed)
    params = sample_params(1, gen, distractor_prob=distractor_prob, **fixed)
    return render(params, num_frames, height, width, device=device)[0]


class ProceduralVideoDataset(torch.utils.data.Dataset):
    """Map-style dataset: item ``i`` is a deterministic function of ``(seed, i)``.

    Each item is a dict ``{"video": [3, F, H, W] float in [-1, 1], "caption": str, **metadata}`` with the
    metadata of :meth:`ClipParams.metadata` (colour, shape, direction, speed, ...).
    """

    def __init__(
        self,
        num_frames: int = 8,
        height: int = 32,
        width: int = 32,
        *,
        length: int = 10_000,
        seed: int = 0,
        distractor_prob: float = 0.3,
        max_distractors: int = 2,
    ) -> None:
        self.num_frames, self.height, self.width = num_frames, height, width
        self.length, self.seed = length, seed
        self.distractor_prob, self.max_distractors = distractor_prob, max_distractors

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a dataset of length {self.length}")
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        batch = sample_batch(
            1,
            self.num_frames,
            self.height,
            self.width,
            gen,
            distractor_prob=self.distractor_prob,
            max_distractors=self.max_distractors,
        )
        return {"video": batch.video[0], **batch.metadata()[0]}


def eval_prompts(n: int | None = None) -> list[str]:
    """Fixed evaluation prompts: every colour once, directions and shapes cycled (8 prompts), no speed word.

    ``n`` > 8 continues the cycle with shifted shapes; used by the training script, the model card and the
    checks.
    """
    colours, dirs = list(COLOURS), list(DIRECTIONS)
    n = len(colours) if n is None else n
    out = []
    for i in range(n):
        meta = {
            "colour": colours[i % len(colours)],
            "shape": SHAPES[(i + i // len(colours)) % len(SHAPES)],
            "direction": dirs[i % len(dirs)],
            "speed": "",
        }
        out.append(caption(meta))
    return out


#: First generator seed of :func:`heldout_prompts` clips (prompt ``i`` uses ``HELDOUT_SEED + i``): seeds that
#: neither training (its own generator stream) nor the trainer's checks (0..15, 1234..) use.
HELDOUT_SEED = 50_000


def heldout_prompts(n: int = 16) -> list[str]:
    """Held-out evaluation prompts, other combinations than :func:`eval_prompts`: colours cycled backwards,
    directions in another order, shapes shifted by two, every third prompt with a speed word. All four
    directions appear equally often when ``n`` is a multiple of 4."""
    colours, dirs = list(COLOURS)[::-1], ["up", "left", "down", "right"]
    speeds = ["", "quickly", "", "slowly"]
    out = []
    for i in range(n):
        meta = {
            "colour": colours[(3 * i) % len(colours)],
            "shape": SHAPES[(i + 2) % len(SHAPES)],
            "direction": dirs[i % len(dirs)],
            "speed": speeds[(i // 3) % len(speeds)] if i % 3 == 2 else "",
        }
        out.append(caption(meta))
    return out
