"""``sparsediff compare``: the same prompts and seeds, dense vs each plan, numbers and pictures side by side.

What a user runs to decide whether to trust a plan. One pipeline is loaded once and reused for every
variant; the dense baseline runs once per (prompt, seed), each plan once per (prompt, seed) too::

    sparsediff compare --prompts samples/prompts_embedded.txt --plans default radial tile --out cmp
    sparsediff compare --model ./my-wan-folder --prompts samples/prompts_video.txt --seeds 0 1 \\
        --plans plans/wan.json "radial,dense_steps=0.25,radial.decay=0.5" --steps 30 --out cmp
    python -m sparsediff.compare ...                                        # the same
    accelerate launch --num_processes 2 -m sparsediff.compare ...           # (prompt, seed) pairs split

Pipeline (one of): the default -- the embedded trained tiny video model when its weights are in the
package, else its random-init twin (wiring only, a warning says so); ``--model PATH`` -- a local diffusers
folder (or a Hub id diffusers can resolve); ``--pipeline MODULE:FUNCTION`` -- a function returning a
pipeline (e.g. ``sparsediff.embedded:tiny_random_pipeline``). Prompts: ``--prompts FILE`` and/or
``--prompt TEXT``; with the default model and neither given, 4 of its evaluation captions.

Plans (``--plans``, each one variant; see :func:`parse_variant`)::

    default                      the model family's training-free default plan
    radial | tile | topp | ...   that pattern on every head, with the family's warm-up schedule
    path/to/plan.json            a saved (searched) plan
    dense                        every head dense (a sanity check: must equal the baseline, PSNR = inf)
    radial,dense_steps=0,block_size=32,radial.decay=0.5,label=r-fast
                                 any of the above plus SparseAttentionConfig overrides
                                 (``PATTERN.PARAM=value`` sets pattern_params; ``label=`` names it)

Outputs in ``--out`` (existing ones are never replaced without ``--overwrite``): ``videos/`` (mp4 through
imageio-ffmpeg, GIF fallback), ``strips/`` (one labelled PNG per (prompt, seed): a row per variant, dense
first), ``report.html`` (one self-contained file: images embedded, tables, a quality-vs-speed scatter and
per-layer density), ``report.md``, ``results.json`` (every number, the versions, device and command line),
``quality_speed.png``, ``density.png``.

Numbers: metrics from :mod:`sparsediff.metrics` (torchmetrics PSNR / SSIM / MS-SSIM / temporal PSNR;
LPIPS only from weights already on disk) of each sparse video against the dense video of the same
(prompt, seed). Time per denoising step excludes the first step of each call (prompt encoding, setup)
and, with ``--warmup N`` (default 1), N untimed calls per variant run first (lazy init, mask building);
on CUDA every step is synchronised. Peak memory is CUDA's max allocated (not measured on CPU). Density
per layer is the fraction of query x key blocks computed, measured on the first sparse call; "run
density" averages it over all layers and steps, counting dense warm-up steps and dense layers as 1.

Bad input -- a missing plan file, a plan for another model, an unwritable output folder, no prompts,
existing outputs without ``--overwrite`` -- stops with a clear error before anything is generated.
"""

from __future__ import annotations

import argparse
import ast
import base64
import datetime as _dt
import html
import importlib
import inspect
import json
import logging
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "CompareError",
    "Variant",
    "parse_variant",
    "read_prompts",
    "load_pipeline",
    "compare",
    "main",
]

#: Files and folders ``compare`` writes into ``--out`` (all refused when present, unless overwriting).
OUTPUT_FILES = ("report.html", "report.md", "results.json", "quality_speed.png", "density.png")
OUTPUT_DIRS = ("videos", "strips")
_PARTS_DIR = ".compare-parts"  # per-process results under accelerate, removed after the merge
BASELINE = "dense"


class CompareError(ValueError):
    """Bad input to ``compare``, found before any generation (the message says what and how to fix it)."""


# ---------------------------------------------------------------------------------------------- variants
@dataclass(frozen=True)
class Variant:
    """One sparse configuration to compare with dense.

    Attributes:
        label: short unique name (tables, file names).
        plan: ``None`` (the family default), a pattern name, or a plan JSON path -- what
            :func:`sparsediff.enable_sparse_attention` takes.
        overrides: :class:`~sparsediff.SparseAttentionConfig` fields for this variant.
        spec: the text it was parsed from.
    """

    label: str
    plan: str | None
    overrides: dict[str, Any] = field(default_factory=dict)
    spec: str = ""


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets / braces / parentheses / quotes."""
    parts, depth, cur, quote = [], 0, [], ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        low = text.lower()
        if low in ("true", "false"):
            return low == "true"
        if low in ("none", "null"):
            return None
        return text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-")[:60] or "plan"


def parse_variant(spec: str) -> Variant:
    """Parse one ``--plans`` entry: ``PLAN[,key=value,...]`` or only ``key=value,...`` (default plan).

    ``PLAN`` is ``default``, a pattern name or a plan JSON path. ``key`` is a
    :class:`~sparsediff.SparseAttentionConfig` field (``dense_steps=0.25``, ``dense_layers=[0]``,
    ``block_size=32``, ``min_tokens=0``, ``backend=reference``), ``PATTERN.PARAM`` (``radial.decay=0.5``,
    written into ``pattern_params``) or ``label`` (the variant's name). Values are Python literals (falling
    back to the text). Raises :class:`CompareError` for an unknown pattern, a missing plan file or an
    invalid override.
    """
    from .config import SparseAttentionConfig
    from .plan import Plan, PlanError
    from .specs import PATTERN_PARAMS

    tokens = _split_top(spec)
    if not tokens:
        raise CompareError("empty --plans entry")
    plan: str | None
    if "=" in tokens[0]:
        plan, rest = None, tokens
    else:
        plan, rest = tokens[0], tokens[1:]
    label = None
    overrides: dict[str, Any] = {}
    pattern_params: dict[str, dict[str, Any]] = {}
    for tok in rest:
        if "=" not in tok:
            raise CompareError(
                f"--plans {spec!r}: {tok!r} is not key=value (only the first item names a plan)"
            )
        key, val = (s.strip() for s in tok.split("=", 1))
        if key == "label":
            label = val
        elif "." in key:
            pat, param = key.split(".", 1)
            pattern_params.setdefault(pat, {})[param] = _value(val)
        else:
            overrides[key] = _value(val)
    if pattern_params:
        overrides["pattern_params"] = pattern_params
    try:
        SparseAttentionConfig().updated(**overrides)
    except (TypeError, ValueError) as e:
        raise CompareError(f"--plans {spec!r}: {e}") from None

    if plan in (None, "default"):
        plan, base = None, "default"
    elif plan in PATTERN_PARAMS:
        base = plan
    else:
        path = Path(plan)
        if not path.is_file():
            hint = f"pattern names: {', '.join(('default', *PATTERN_PARAMS))}"
            if path.suffix.lower() == ".json" or path.parent != Path("."):
                raise CompareError(f"--plans {spec!r}: plan file not found: {path} ({hint})")
            raise CompareError(
                f"--plans {spec!r}: {plan!r} is neither a pattern name nor a plan file ({hint})"
            )
        try:
            Plan.load(path)
        except (PlanError, OSError, ValueError) as e:
            raise CompareError(f"--plans {spec!r}: {e}") from None
        base = path.stem
    if label is None:
        label = base + ("" if not rest else "+" + ",".join(t for t in rest if not t.startswith("label=")))
    return Variant(label=label, plan=plan, overrides=overrides, spec=spec)


def _unique_labels(variants: Sequence[Variant]) -> list[Variant]:
    out, seen = [], {BASELINE}
    for v in variants:
        label = v.label if v.label != BASELINE else "dense-plan"
        slug = _slug(label)
        if slug in {_slug(s) for s in seen}:
            raise CompareError(
                f"two --plans entries share the name {label!r}; give one a label=NAME ({v.spec!r})"
            )
        seen.add(label)
        out.append(Variant(label, v.plan, v.overrides, v.spec))
    return out


# ---------------------------------------------------------------------------------------------- prompts
def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts of a text file: one per line; blank lines and lines starting with ``#`` are skipped."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CompareError(f"prompt file not found: {p}") from None
    except OSError as e:
        raise CompareError(f"cannot read prompt file {p}: {e}") from None
    prompts = [ln.strip() for ln in text.splitlines()]
    return [q for q in prompts if q and not q.startswith("#")]


# ---------------------------------------------------------------------------------------------- pipeline
def load_pipeline(
    pipeline: str | None = None,
    model: str | None = None,
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[Any, dict[str, Any]]:
    """The pipeline to compare on, and a description for the report.

    ``pipeline="MODULE:FUNCTION"`` calls that function (no arguments); ``model=PATH`` loads a diffusers
    folder (``EmbeddedVideoPipeline`` folders through :func:`sparsediff.embedded.load_embedded_pipeline`);
    neither: the embedded trained model when its weights are in the package, else the random-init
    embedded pipeline (with a warning: it shows the machinery, not quality).
    """
    from . import embedded

    info: dict[str, Any] = {}
    if pipeline and model:
        raise CompareError("pass at most one of --pipeline and --model")
    if pipeline:
        mod_name, _, fn_name = pipeline.partition(":")
        if not mod_name or not fn_name:
            raise CompareError(f"--pipeline {pipeline!r}: expected MODULE:FUNCTION")
        try:
            fn = getattr(importlib.import_module(mod_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise CompareError(f"--pipeline {pipeline!r}: {e}") from None
        pipe = fn()
        info = {"source": f"--pipeline {pipeline}", "trained": None}
    elif model:
        index = Path(model) / "model_index.json"
        if Path(model).exists() and not index.is_file():
            raise CompareError(f"--model {model}: not a diffusers pipeline folder (no model_index.json)")
        if index.is_file() and json.loads(index.read_text()).get("_class_name") == "EmbeddedVideoPipeline":
            pipe = embedded.load_embedded_pipeline(model, dtype=dtype or torch.float32)
        else:
            from diffusers import DiffusionPipeline

            kw = {"torch_dtype": dtype} if dtype is not None else {}
            pipe = DiffusionPipeline.from_pretrained(model, **kw)
        info = {"source": f"--model {model}", "trained": None}
    elif embedded.has_trained_weights():
        pipe = embedded.load_embedded_pipeline(dtype=dtype or torch.float32)
        info = {"source": "embedded trained model (sparsediff/embedded/weights)", "trained": True}
    else:
        logger.warning(
            "sparsediff compare: the embedded model's trained weights are not in this package; using its "
            "random-init twin (near-uniform attention: the comparison shows speed and density, not quality). "
            "Pass --model PATH or --pipeline MODULE:FUNCTION for a real model."
        )
        pipe = embedded.tiny_random_pipeline()
        info = {
            "source": "embedded model, random init (trained weights not in the package)",
            "trained": False,
        }
    if dtype is not None and pipeline:
        pipe = pipe.to(dtype=dtype)
    pipe = pipe.to(device)
    info["class"] = type(pipe).__name__
    comps = getattr(pipe, "components", {}) or {}
    info["transformers"] = {
        n: type(m).__name__
        for n, m in comps.items()
        if n.startswith("transformer") and isinstance(m, torch.nn.Module)
    }
    return pipe, info


# ---------------------------------------------------------------------------------------------- checks
def check_output_dir(out: Path, overwrite: bool) -> list[Path]:
    """Refuse existing outputs (unless ``overwrite``) and an unwritable folder; returns the outputs to
    replace. Creates ``out`` when missing."""
    existing = [out / n for n in OUTPUT_FILES if (out / n).exists()]
    existing += [out / d for d in OUTPUT_DIRS if (out / d).exists() and any((out / d).iterdir())]
    if existing and not overwrite:
        raise CompareError(
            f"{out} already holds {', '.join(p.name for p in existing)}; pass --overwrite to replace "
            "them or choose another --out"
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as e:
        raise CompareError(f"output folder {out} is not writable: {e.strerror or e}") from None
    return existing


def _preflight_plans(pipe: Any, variants: Sequence[Variant], base_config: Any) -> dict[str, str]:
    """Enable and disable every variant once (validates plan vs model, overrides); returns summaries."""
    from .api import enable_sparse_attention
    from .pipelines.base import UnsupportedModelError
    from .plan import PlanError

    summaries = {}
    for v in variants:
        try:
            h = enable_sparse_attention(pipe, v.plan, config=base_config.updated(**v.overrides))
        except (PlanError, UnsupportedModelError, ValueError, TypeError, FileNotFoundError) as e:
            raise CompareError(f"--plans {v.spec!r} cannot run on this pipeline: {e}") from None
        summaries[v.label] = "; ".join(f"{n}: {p.summary()}" for n, p in h.plans.items())
        h.disable()
    return summaries


def _vocabulary_warnings(pipe: Any, prompts: Sequence[str]) -> list[str]:
    tok = getattr(pipe, "tokenizer", None)
    vocab = getattr(tok, "token_to_id", None)
    if not isinstance(vocab, dict):
        return []
    unknown = sorted({w for q in prompts for w in q.lower().split() if w not in vocab})
    if not unknown:
        return []
    return [f"words outside the model's vocabulary (read as <unk>): {', '.join(unknown)}"]


# ---------------------------------------------------------------------------------------------- running
def _call_params(pipe: Any) -> set[str]:
    try:
        return set(inspect.signature(pipe.__call__).parameters)
    except (TypeError, ValueError):
        return set()


def _as_frames(output: Any) -> np.ndarray:
    """``[F, H, W, C]`` float32 in [0, 1] from a pipeline output (video ``.frames`` or image ``.images``)."""
    if hasattr(output, "frames"):
        x = output.frames[0]
    elif hasattr(output, "images"):
        x = output.images[0]
    else:
        x = output[0][0]
    if isinstance(x, torch.Tensor):
        x = x.float().cpu().numpy()
    if isinstance(x, list):
        x = np.stack(
            [np.asarray(f, dtype=np.float32) / (255.0 if np.asarray(f).dtype == np.uint8 else 1.0) for f in x]
        )
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    return np.clip(x, 0.0, 1.0)


@dataclass
class _Settings:
    num_frames: int | None
    height: int | None
    width: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    negative_prompt: str | None
    device: str


def _generate(pipe: Any, prompt: str, seed: int, s: _Settings, params: set[str]) -> dict[str, Any]:
    """One call: frames, seconds per denoising step (from the first transformer call to the last step's
    end, over the steps), total seconds, steps, seconds in attention operators (all / self-attention)."""
    kw: dict[str, Any] = {"prompt": prompt, "output_type": "np"}
    for name, val in (
        ("num_frames", s.num_frames),
        ("height", s.height),
        ("width", s.width),
        ("num_inference_steps", s.num_inference_steps),
        ("guidance_scale", s.guidance_scale),
        ("negative_prompt", s.negative_prompt),
    ):
        if val is not None:
            if name not in params:
                raise CompareError(f"{type(pipe).__name__} does not take {name}")
            kw[name] = val
    if "generator" in params:
        kw["generator"] = torch.Generator("cpu").manual_seed(seed)
    from .timing import GenerationClock

    clock = GenerationClock(pipe, cuda=s.device.startswith("cuda"))
    if "callback_on_step_end" in params:
        kw["callback_on_step_end"] = clock.on_step_end
    with torch.no_grad(), clock:
        out = pipe(**kw)
    timer = clock.attention
    total, steps = clock.total, clock.steps
    per_step, denoise = clock.seconds_per_step, clock.denoise_seconds
    return {
        "frames": _as_frames(out),
        "s_per_step": per_step,
        "total_s": total,
        "steps": steps,
        "attention_s": timer.seconds,
        "self_attention_s": timer.self_seconds,
        "denoise_s": denoise,
    }


def _predicted_speedup(
    pipe: Any,
    plan: Any,
    seen: dict[str, Any],
    dense: dict[str, Any] | None,
    samples: list,
    config: Any,
    device: str,
) -> float | None:
    """The replayed price of ``plan`` (:func:`sparsediff.search.price.price_plan`, what the search predicts
    with) at the run's layout and shapes, combined with the self-attention share measured in the dense
    runs: the predicted denoising-step speed-up, to put next to the measured one."""
    if plan is None or dense is None or "layout" not in seen or not samples:
        return None
    share = [
        r["self_attention_s"] / r["denoise_s"]
        for r in dense["samples"]
        if r.get("denoise_s") and r["denoise_s"] > 0
    ]
    steps = samples[0].get("steps") or 0
    if not share or steps < 1:
        return None
    from .plan import ModelIdentity
    from .search.price import price_plan

    transformer = pipe.components["transformer"]
    B, H, N, D = seen["shape"]
    heads = ModelIdentity.of(transformer).num_heads
    pp = price_plan(
        plan,
        seen["layout"],
        num_heads=dict(enumerate(heads)),
        head_dim=D,
        num_layers=len(heads),
        num_steps=steps,
        batch=B,
        device=device,
        dtype=next(transformer.parameters()).dtype,
        block_size=config.block_size,
        backend=config.backend,
    )
    return pp.step_speedup(min(1.0, sum(share) / len(share)))


def _mse_from_psnr(p: Any, data_range: float) -> float | None:
    if p is None:
        return None
    return 0.0 if p == math.inf else data_range**2 * 10 ** (-float(p) / 10)


def _psnr_from_mses(mses: list[float], data_range: float) -> float | None:
    if not mses:
        return None
    m = sum(mses) / len(mses)
    return math.inf if m == 0 else 10 * math.log10(data_range**2 / m)


def _mean(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _write_video(frames: np.ndarray, stem: Path, fmt: str, fps: int = 8) -> Path:
    import imageio.v2 as imageio

    arr = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    if fmt == "mp4":
        try:
            import imageio_ffmpeg  # noqa: F401

            path = stem.with_suffix(".mp4")
            imageio.mimwrite(path, list(arr), fps=fps, macro_block_size=1)
            return path
        except Exception as e:  # no ffmpeg binary / codec: fall back to GIF
            logger.warning("sparsediff compare: mp4 writing failed (%s); writing GIF instead", e)
    path = stem.with_suffix(".gif")
    imageio.mimwrite(path, list(arr), duration=1.0 / fps, loop=0)
    return path


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed bitmap font
        return ImageFont.load_default()


def save_strip(
    rows: dict[str, np.ndarray], notes: dict[str, str], path: Path, n_frames: int = 6, title: str = ""
) -> Path:
    """A labelled PNG: one row per variant (dense first), ``n_frames`` evenly spaced frames per row.

    ``rows[label]`` is ``[F, H, W, C]`` in [0, 1]; ``notes[label]`` is printed under the label.
    """
    from PIL import Image, ImageDraw

    names = list(rows)
    f, h, w, _ = rows[names[0]].shape
    scale = max(1, min(4, 128 // max(h, w)))
    th, tw = h * scale, w * scale
    idx = np.unique(np.linspace(0, f - 1, num=min(n_frames, f)).round().astype(int))
    label_w, pad, head = 190, 4, 26 + (22 if title else 0)
    width = label_w + len(idx) * (tw + pad)
    canvas = Image.new("RGB", (width, head + len(names) * (th + pad)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    big, small = _font(15), _font(12)
    y = 4
    if title:
        draw.text((4, y), title[:110], fill=(0, 0, 0), font=big)
        y += 22
    for c, fi in enumerate(idx):
        draw.text((label_w + c * (tw + pad), y), f"frame {fi}", fill=(90, 90, 90), font=small)
    for r, name in enumerate(names):
        y0 = head + r * (th + pad)
        title_lines = textwrap.wrap(name, 21, break_on_hyphens=False)[:3] or [name]
        for k, line in enumerate(title_lines):
            draw.text((6, y0 + 2 + 17 * k), line, fill=(0, 0, 0), font=big)
        y_note = y0 + 6 + 17 * len(title_lines)
        for k, line in enumerate(notes.get(name, "").split("\n")):
            draw.text((6, y_note + 15 * k), line[:30], fill=(70, 70, 70), font=small)
        vid = (np.clip(rows[name], 0, 1) * 255).round().astype(np.uint8)
        if vid.shape[-1] == 1:
            vid = np.repeat(vid, 3, axis=-1)
        for c, fi in enumerate(idx):
            tile = Image.fromarray(vid[fi]).resize((tw, th), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (tw + pad), y0))
    canvas.save(path)
    return path


def _distributed():
    """(rank, world size, accelerate state or None): several processes only under ``accelerate launch``."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, None
    from accelerate import PartialState

    # cpu=True without CUDA: gloo process group (MULTI_CPU); accelerate would otherwise run each
    # process alone. The state is a singleton: main() and compare() share it.
    state = PartialState(cpu=not torch.cuda.is_available())
    return state.process_index, state.num_processes, state


def compare(
    pipe: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    plans: Sequence[str | Variant] = ("default",),
    out: str | os.PathLike | None = None,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    negative_prompt: str | None = None,
    backend: str = "auto",
    block_size: int | None = None,
    warmup: int = 1,
    lpips: bool | str = "auto",
    video_format: str = "mp4",
    strip_frames: int = 6,
    overwrite: bool = False,
    progress: bool = True,
    model_info: dict[str, Any] | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Generate every (prompt, seed) densely and with every plan on ``pipe``; measure; report.

    Args:
        pipe: a diffusers pipeline with a supported transformer (reused for every variant; sparse
            attention is enabled and disabled around each variant, so ``pipe`` is left as it came).
        prompts: one or more prompts. seeds: one video per (prompt, seed) and variant.
        plans: ``--plans`` entries (see :func:`parse_variant`) or :class:`Variant` objects.
        out: folder for videos, strips, plots and reports (``None``: nothing written, numbers only).
        num_frames, height, width, num_inference_steps, guidance_scale, negative_prompt: passed to the
            pipeline when given (``None``: the pipeline's defaults).
        backend, block_size: base :class:`~sparsediff.SparseAttentionConfig` of every variant.
        warmup: untimed calls per variant before the timed ones (first prompt and seed).
        lpips: ``"auto"`` (when its weights are on disk), ``True`` (required) or ``False``.
        video_format: ``"mp4"`` (GIF when imageio-ffmpeg cannot write it) or ``"gif"``.

    Returns:
        The ``results.json`` content: ``variants`` (one dict per variant, dense first: label, plan summary,
        densities, timings, mean metrics, per-sample metrics), ``settings``, ``environment``, ``notes``.

    Raises:
        CompareError: bad input (before anything is generated).
    """
    from .api import enable_sparse_attention
    from .config import SparseAttentionConfig
    from .metrics import VideoQuality

    t_start = time.perf_counter()
    load_start = _load_average()
    prompts = [q.strip() for q in prompts if q and q.strip()]
    if not prompts:
        raise CompareError("no prompts: pass --prompt TEXT or --prompts FILE with at least one line")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise CompareError("no seeds")
    if video_format not in ("mp4", "gif"):
        raise CompareError(f"video_format must be 'mp4' or 'gif', got {video_format!r}")
    variants = _unique_labels([v if isinstance(v, Variant) else parse_variant(v) for v in plans])
    if not variants:
        raise CompareError("no plans to compare (pass --plans ...)")
    try:
        base_config = SparseAttentionConfig(backend=backend, block_size=block_size, log_density=False)
    except (TypeError, ValueError) as e:
        raise CompareError(str(e)) from None
    rank, world, state = _distributed()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None and rank == 0:
        stale = check_output_dir(out_dir, overwrite)
        _remove_outputs(stale)
    if state is not None:
        state.wait_for_everyone()
    summaries = _preflight_plans(pipe, variants, base_config)
    device = str(getattr(pipe, "device", "cpu"))
    s = _Settings(num_frames, height, width, num_inference_steps, guidance_scale, negative_prompt, device)
    params = _call_params(pipe)
    meter = VideoQuality(lpips=lpips, device=device if device.startswith("cuda") else "cpu")
    notes = _vocabulary_warnings(pipe, prompts)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)

    pairs = [(pi, seed) for pi in range(len(prompts)) for seed in seeds]
    mine = pairs[rank::world]
    if out_dir is not None:
        (out_dir / "videos").mkdir(exist_ok=True)
        (out_dir / "strips").mkdir(exist_ok=True)
    names = [BASELINE] + [v.label for v in variants]
    bar = _progress(
        total=len(mine) * len(names) + warmup * len(names) * bool(mine), enabled=progress, rank=rank
    )
    dense_frames: dict[tuple[int, int], np.ndarray] = {}
    records: dict[str, dict[str, Any]] = {}
    strips_rows: dict[tuple[int, int], dict[str, np.ndarray]] = {p: {} for p in mine}
    strip_notes: dict[tuple[int, int], dict[str, str]] = {p: {} for p in mine}

    for name in names:
        variant = None if name == BASELINE else next(v for v in variants if v.label == name)
        handle = None
        seen: dict[str, Any] = {}

        def observe(call: Any, seen: dict[str, Any] = seen) -> None:  # the run's layout, for the price
            if "layout" not in seen:
                seen.update(layout=call.layout, shape=tuple(call.query.shape))

        if variant is not None:
            cfg_v = base_config.updated(**variant.overrides)
            if cfg_v.observer is None and world == 1:
                cfg_v = cfg_v.updated(observer=observe)
            handle = enable_sparse_attention(pipe, variant.plan, config=cfg_v)
        try:
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            for _ in range(warmup if mine else 0):
                bar.set_description(f"{name} warm-up")
                _generate(pipe, prompts[mine[0][0]], mine[0][1], s, params)
                bar.update()
            samples = []
            for pi, seed in mine:
                bar.set_description(f"{name} p{pi} s{seed}")
                g = _generate(pipe, prompts[pi], seed, s, params)
                bar.update()
                frames = g.pop("frames")
                rec: dict[str, Any] = {"prompt_index": pi, "prompt": prompts[pi], "seed": seed, **g}
                if name == BASELINE:
                    dense_frames[(pi, seed)] = frames
                    m = None
                else:
                    m = meter(frames, dense_frames[(pi, seed)])
                    rec["metrics"] = m.to_dict()
                if out_dir is not None:
                    path = _write_video(
                        frames, out_dir / "videos" / f"p{pi}_s{seed}_{_slug(name)}", video_format
                    )
                    rec["video"] = str(path.relative_to(out_dir))
                strips_rows[(pi, seed)][name] = frames
                strip_notes[(pi, seed)][name] = (
                    "reference"
                    if m is None
                    else f"PSNR {_fmt(m.psnr, 2)} dB\nSSIM {_fmt(m.ssim, 4)}\ntPSNR {_fmt(m.temporal_psnr, 2)} dB"
                )
                samples.append(rec)
            rec_v: dict[str, Any] = {"label": name, "samples": samples}
            if device.startswith("cuda"):
                rec_v["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if handle is not None:
                rec_v["density_per_layer"] = {
                    comp: {str(k): v for k, v in sorted(d.items())} for comp, d in handle.densities().items()
                }
                rec_v["run_density"] = _run_density(handle, samples)
                plan_v = handle.states["transformer"].plan if "transformer" in handle.states else None
                search_meta = (plan_v.meta.get("search") or {}) if plan_v is not None else {}
                rec_v["search_predicted_speedup"] = search_meta.get("predicted_step_speedup")
                rec_v["predicted_speedup"] = _predicted_speedup(
                    pipe, plan_v, seen, records.get(BASELINE), samples, cfg_v, device
                )
            records[name] = rec_v
        finally:
            if handle is not None:
                handle.disable()
    bar.close()

    if out_dir is not None:
        for (pi, seed), rows in strips_rows.items():
            save_strip(
                rows,
                strip_notes[(pi, seed)],
                out_dir / "strips" / f"p{pi}_s{seed}.png",
                n_frames=strip_frames,
                title=f"prompt {pi}: {prompts[pi]}  |  seed {seed}",
            )

    # ---- gather (several processes) ----
    if state is not None:
        if out_dir is None:
            raise CompareError("several processes need --out (they exchange results through it)")
        parts = out_dir / _PARTS_DIR
        parts.mkdir(exist_ok=True)
        (parts / f"rank{rank}.json").write_text(json.dumps(_json_safe(records)))
        state.wait_for_everyone()
        if rank != 0:
            return {}
        records = _merge_parts([json.loads((parts / f"rank{r}.json").read_text()) for r in range(world)])
        for r in range(world):
            (parts / f"rank{r}.json").unlink()
        parts.rmdir()

    results = _summarise(
        records,
        names,
        variants,
        summaries,
        prompts=prompts,
        seeds=seeds,
        settings=s,
        extra_settings={
            "backend": backend,
            "block_size": block_size,
            "warmup": warmup,
            "processes": world,
            "video_format": video_format,
        },
        model_info=model_info or {"class": type(pipe).__name__},
        notes=notes,
        lpips_reason=meter.lpips_reason if meter._lpips_net is None else None,
        command=command,
        wall_s=time.perf_counter() - t_start,
        load=(load_start, _load_average()),
    )
    if out_dir is not None:
        _write_reports(out_dir, results, pairs)
    return results


def _fmt(x: Any, nd: int) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, str):
        return x
    if math.isinf(x):
        return "inf"
    return f"{x:.{nd}f}"


def _json_safe(obj: Any) -> Any:
    from .metrics import _json_safe as js

    return js(obj)


def _from_json(x: Any) -> Any:
    if x == "inf":
        return math.inf
    if x == "-inf":
        return -math.inf
    return x


def _remove_outputs(paths: Sequence[Path]) -> None:
    for p in paths:
        if p.is_dir():
            for q in p.iterdir():
                if q.is_file() and q.suffix.lower() in (".mp4", ".gif", ".png"):
                    q.unlink()
        elif p.is_file():
            p.unlink()


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_description(self, s: str) -> None: ...
    def close(self) -> None: ...


def _progress(total: int, enabled: bool, rank: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="compare", position=rank, leave=rank == 0, file=sys.stderr)


def _run_density(handle: Any, samples: list[dict[str, Any]]) -> float | None:
    """Attention work over the whole run relative to dense: sparse layers at their measured density,
    dense layers and dense warm-up steps at 1 (one transformer component: the mean over components)."""
    vals = []
    for comp, st in handle.states.items():
        n_layers = len(st.layers)
        steps = max((r.get("steps") or 0) for r in samples) if samples else 0
        if not n_layers or not steps:
            continue
        d = handle.densities().get(comp, {})
        sparse_step = sum(d.get(i, 1.0) for i in range(n_layers)) / n_layers
        nd = st.plan.schedule.num_dense_steps(steps)
        vals.append((nd + (steps - nd) * sparse_step) / steps)
    return _mean(vals)


def _merge_parts(parts: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    merged: dict[str, dict[str, Any]] = {}
    for part in parts:
        for name, rec in part.items():
            if name not in merged:
                merged[name] = {**rec, "samples": []}
            merged[name]["samples"] += rec["samples"]
            if "peak_memory_gb" in rec:
                merged[name]["peak_memory_gb"] = max(
                    merged[name].get("peak_memory_gb", 0), rec["peak_memory_gb"]
                )
    for rec in merged.values():
        rec["samples"].sort(key=lambda r: (r["prompt_index"], r["seed"]))
        for smp in rec["samples"]:
            if "metrics" in smp:
                smp["metrics"] = {k: _from_json(v) for k, v in smp["metrics"].items()}
    return merged


def _environment(device: str) -> dict[str, Any]:
    import diffusers

    from . import __version__

    env = {
        "sparsediff": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    try:
        import torchmetrics

        env["torchmetrics"] = torchmetrics.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["torch_threads"] = torch.get_num_threads()
    env["cpu_count"] = os.cpu_count()
    try:
        from .kernels import launch as kernels

        env["triton"] = kernels.triton_available()
    except Exception:  # pragma: no cover
        pass
    return env


def _summarise(
    records: dict[str, dict[str, Any]],
    names: list[str],
    variants: Sequence[Variant],
    summaries: dict[str, str],
    *,
    prompts: list[str],
    seeds: list[int],
    settings: _Settings,
    extra_settings: dict[str, Any],
    model_info: dict[str, Any],
    notes: list[str],
    lpips_reason: str | None,
    command: str | None,
    wall_s: float,
    load: tuple[float | None, float | None] = (None, None),
) -> dict[str, Any]:
    dense = records[BASELINE]
    base_step = _mean([r["s_per_step"] for r in dense["samples"]])
    out_variants = []
    skipped: dict[str, str] = {}
    for name in names:
        rec = records[name]
        smp = rec["samples"]
        row: dict[str, Any] = {
            "label": name,
            "spec": None if name == BASELINE else next(v.spec for v in variants if v.label == name),
            "plan": "dense attention (the model's own processors)" if name == BASELINE else summaries[name],
            "density_per_layer": rec.get("density_per_layer", {}),
            "mean_density": 1.0,
            "run_density": rec.get("run_density", 1.0),
            "s_per_step": _mean([r["s_per_step"] for r in smp]),
            "s_per_step_sd": _sd([r["s_per_step"] for r in smp]),
            "total_s": _mean([r["total_s"] for r in smp]),
            "peak_memory_gb": rec.get("peak_memory_gb"),
            "predicted_speedup": rec.get("predicted_speedup"),
            "search_predicted_speedup": rec.get("search_predicted_speedup"),
            "attention_share": _mean(
                [r["self_attention_s"] / r["denoise_s"] for r in smp if r.get("denoise_s")]
            ),
        }
        dens = [d for comp in row["density_per_layer"].values() for d in comp.values()]
        if name != BASELINE:
            row["mean_density"] = _mean(dens) if dens else 1.0
        row["speedup"] = base_step / row["s_per_step"] if base_step and row["s_per_step"] else None
        if name == BASELINE:
            row.update(psnr=math.inf, ssim=1.0, ms_ssim=None, temporal_psnr=math.inf, lpips=None)
        else:
            ms = [r["metrics"] for r in smp]
            row["psnr"] = _psnr_from_mses([_mse_from_psnr(_from_json(m["psnr"]), 1.0) for m in ms], 1.0)
            row["ssim"] = _mean([m["ssim"] for m in ms])
            row["ms_ssim"] = _mean([m["ms_ssim"] for m in ms])
            tp = [_mse_from_psnr(_from_json(m["temporal_psnr"]), 2.0) for m in ms]
            row["temporal_psnr"] = _psnr_from_mses([t for t in tp if t is not None], 2.0)
            row["lpips"] = _mean([m["lpips"] for m in ms])
            for m in ms:
                skipped.update(m.get("skipped", {}))
        row["samples"] = smp
        out_variants.append(row)
    if lpips_reason:
        skipped["lpips"] = lpips_reason
    notes = list(notes) + _timing_notes(out_variants, settings.device, load)
    for r in out_variants[1:]:
        if r["mean_density"] >= 0.999 and "all heads HeadSpec(dense)" not in r["plan"]:
            notes.append(
                f"{r['label']!r} kept every block at this size (density {r['mean_density']:.2f}): it ran dense "
                "in effect; try a smaller block_size (e.g. ',block_size=16') or a larger video"
            )
    return {
        "format": "sparsediff-compare/1",
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": command,
        "model": model_info,
        "environment": _environment(settings.device),
        "settings": {
            "prompts": prompts,
            "seeds": seeds,
            "num_frames": settings.num_frames,
            "height": settings.height,
            "width": settings.width,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "negative_prompt": settings.negative_prompt,
            **extra_settings,
        },
        "video_shape": _video_shape(records),
        "steps_run": max(
            (smp.get("steps") or 0 for rec in records.values() for smp in rec["samples"]), default=None
        ),
        "metrics_skipped": skipped,
        "notes": notes,
        "wall_s": wall_s,
        "variants": out_variants,
    }


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):  # not on every platform
        return None


def _sd(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    if len(xs) < 2:
        return None
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _timing_notes(
    rows: list[dict[str, Any]], device: str, load: tuple[float | None, float | None]
) -> list[str]:
    """Say when the timings cannot be trusted (busy machine, calls that vary) and what CPU timings mean."""
    notes = []
    ncpu = os.cpu_count() or 1
    busy = [x for x in load if x is not None and x > 0.8 * ncpu]
    if busy:
        notes.append(
            f"the machine was busy (1-minute load average {max(busy):.1f} on {ncpu} CPUs at the start/end of "
            "the run): timings and speedups are unreliable; rerun on an idle machine"
        )
    cvs = [
        (r["s_per_step_sd"] / r["s_per_step"], r["label"])
        for r in rows
        if r.get("s_per_step_sd") is not None and r.get("s_per_step")
    ]
    if cvs and max(cvs)[0] > 0.2:
        cv, label = max(cvs)
        notes.append(
            f"time per step varies by {cv:.0%} (sd / mean) between calls of {label!r}: speedups of less than "
            "about that much are noise"
        )
    if not device.startswith("cuda"):
        notes.append(
            "CPU run: sparse attention runs sparsediff's PyTorch twin, which beats dense only at low density "
            "on long sequences; speed claims need a GPU run (the quality numbers hold on any device)"
        )
    return notes


def _video_shape(records: dict[str, dict[str, Any]]) -> list[int] | None:
    for rec in records.values():
        for smp in rec["samples"]:
            if "metrics" in smp:
                m = smp["metrics"]
                return [m["frames"], m["height"], m["width"]]
    return None


# ---------------------------------------------------------------------------------------------- reports
def _plot_quality_speed(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = [r for r in results["variants"] if r["label"] != BASELINE]
    finite = [r["psnr"] for r in rows if r["psnr"] is not None and math.isfinite(r["psnr"])]
    cap = (max(finite) if finite else 40.0) + 6.0
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    for r in rows:
        x = r["speedup"] or 0.0
        y = r["psnr"] if math.isfinite(r["psnr"]) else cap
        ax.scatter([x], [y], s=60 + 240 * (1 - r["mean_density"]), alpha=0.8)
        tag = r["label"] + ("  (PSNR inf)" if not math.isfinite(r["psnr"]) else "")
        ax.annotate(tag, (x, y), textcoords="offset points", xytext=(7, 5), fontsize=9)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.text(1.0, ax.get_ylim()[0], " dense speed", color="grey", fontsize=8, va="bottom")
    ax.set_xlabel("speedup vs dense (s/step dense / s/step plan)")
    ax.set_ylabel("PSNR vs dense (dB, higher = closer)")
    ax.set_title("quality vs speed (marker size: sparsity)", fontsize=10)
    ax.grid(alpha=0.3)
    xs = [r["speedup"] or 0.0 for r in rows] + [1.0]
    lo, hi = min(xs), max(xs)
    ax.set_xlim(lo - 0.15 * (hi - lo + 0.2), hi + 0.35 * (hi - lo + 0.2))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_density(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [r for r in results["variants"] if r["label"] != BASELINE]
    colours = [f"C{j % 10}" for j in range(len(rows))]
    comps = sorted({c for r in rows for c in r["density_per_layer"]}) or ["transformer"]
    fig, axes = plt.subplots(len(comps), 1, figsize=(7.0, 2.8 * len(comps) + 0.6), dpi=110, squeeze=False)
    for ax, comp in zip(axes[:, 0], comps):
        n = 1 + max(
            (int(k) for r in rows for k in r["density_per_layer"].get(comp, {})),
            default=0,
        )
        width = 0.8 / max(1, len(rows))
        for j, r in enumerate(rows):
            d = r["density_per_layer"].get(comp, {})
            ys = [d.get(str(i), 1.0) for i in range(n)]
            xs = [i - 0.4 + width * (j + 0.5) for i in range(n)]
            bars = ax.bar(xs, ys, width=width * 0.95, color=colours[j])
            for i, b in enumerate(bars):
                if str(i) not in d:
                    b.set_alpha(0.25)
                    b.set_hatch("//")
        ax.set_ylim(0, 1.05)
        ax.set_xticks(range(n))
        ax.set_xlabel(f"{comp}: self-attention layer")
        ax.set_ylabel("density")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(
        "fraction of attention blocks computed per layer (hatched: dense layer)", fontsize=10
    )
    axes[-1, 0].legend(
        handles=[Patch(color=c, label=r["label"]) for c, r in zip(colours, rows)],
        fontsize=8,
        ncol=min(3, len(rows)),
        loc="upper center",
        bbox_to_anchor=(0.5, -0.3),
        frameon=False,
    )
    fig.tight_layout()
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


_COLUMNS = (
    ("plan", "label", None),
    ("density (sparse layers)", "mean_density", 3),
    ("run density", "run_density", 3),
    ("s / step", "s_per_step", 3),
    ("speedup", "speedup", 2),
    ("predicted speedup", "predicted_speedup", 2),
    ("search's prediction", "search_predicted_speedup", 2),
    ("total s", "total_s", 2),
    ("PSNR dB", "psnr", 2),
    ("SSIM", "ssim", 4),
    ("MS-SSIM", "ms_ssim", 4),
    ("temporal PSNR dB", "temporal_psnr", 2),
    ("LPIPS", "lpips", 4),
    ("peak mem GB", "peak_memory_gb", 2),
)


def _cell(row: dict[str, Any], key: str, nd: int | None) -> str:
    v = row.get(key)
    if nd is None:
        return str(v)
    if key in ("speedup", "predicted_speedup", "search_predicted_speedup") and v is not None:
        return f"{v:.2f}x"
    if key == "s_per_step" and v is not None and row.get("s_per_step_sd"):
        return f"{v:.3f} ± {row['s_per_step_sd']:.3f}"
    return _fmt(v, nd)


def _conditions(results: dict[str, Any]) -> list[str]:
    st, env, mdl = results["settings"], results["environment"], results["model"]
    shape = results.get("video_shape")
    dev = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('torch_threads')} torch threads)"
    return [
        f"Model: {mdl.get('source', '')} -- {mdl.get('class', '')}",
        f"Video: {'x'.join(map(str, shape)) + ' (frames x H x W)' if shape else 'n/a'}; steps "
        f"{st['num_inference_steps'] or str(results.get('steps_run')) + ' (pipeline default)'}; guidance {st['guidance_scale'] or 'pipeline default'}; "
        f"{len(st['prompts'])} prompt(s) x seeds {st['seeds']}",
        f"Device: {dev}; sparsediff {env['sparsediff']}, torch {env['torch']}, diffusers {env['diffusers']}, "
        f"torchmetrics {env.get('torchmetrics')}; backend {st['backend']}; block size "
        f"{st['block_size'] or 'default (64)'}; warm-up calls per variant {st['warmup']}; processes "
        f"{st['processes']}",
        f"Command: {results.get('command') or '(library call)'}",
        f"Date: {results['date']}; wall time {results['wall_s']:.1f} s",
    ]


_EXPLAIN = [
    "All metrics compare each plan's video with the dense video of the same prompt and seed.",
    "PSNR: pooled over frames and samples (inf = identical). SSIM / MS-SSIM: mean over frames. "
    "Temporal PSNR: PSNR of frame differences (low = flicker or different motion).",
    "s / step: from the first transformer call to the last step's end, over the steps (every step, the "
    "warm-up ones included; prompt encoding and decoding excluded), without the warm-up calls. Predicted "
    "speedup: the plan replayed on this device (sparsediff.search.price) with the self-attention share of "
    "the dense runs; the search's prediction: what the search wrote into a searched plan. "
    "Density: fraction of attention blocks computed in the layers that ran sparse (first sparse call); "
    "run density also counts dense warm-up steps and dense layers as 1.",
]


def _columns(results: dict[str, Any]) -> list[tuple[str, str, int | None]]:
    """The table columns, without those that no variant has a value for (their reason is listed)."""
    rows = results["variants"]
    return [c for c in _COLUMNS if c[2] is None or any(r.get(c[1]) is not None for r in rows)]


def _write_reports(out: Path, results: dict[str, Any], pairs: list[tuple[int, int]]) -> None:
    qs = _plot_quality_speed(results, out / "quality_speed.png")
    dp = _plot_density(results, out / "density.png")
    strips = [f"strips/p{pi}_s{seed}.png" for pi, seed in pairs]
    cols = _columns(results)
    (out / "results.json").write_text(json.dumps(_json_safe(results), indent=1, allow_nan=False) + "\n")

    # ---- markdown ----
    md = ["# sparsediff compare: dense vs sparse, same prompts and seeds", ""]
    md += [f"- {c}" for c in _conditions(results)] + [""]
    md += ["| " + " | ".join(c for c, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in results["variants"]:
        md.append("| " + " | ".join(_cell(r, k, nd) for _, k, nd in cols) + " |")
    if results["notes"]:
        md += ["", "Notes:"] + [f"- {n}" for n in results["notes"]]
    md += [""] + _EXPLAIN + [""]
    md += [f"- `{r['label']}`: {r['plan']}" for r in results["variants"]]
    if results["metrics_skipped"]:
        md += ["", "Not computed:"] + [f"- {k}: {v}" for k, v in results["metrics_skipped"].items()]
    md += ["", f"![quality vs speed]({qs.name})", "", f"![density per layer]({dp.name})", ""]
    md += [f"![{s}]({s})" for s in strips] + [""]
    (out / "report.md").write_text("\n".join(md))

    # ---- html (self-contained) ----
    def img(path: Path, alt: str) -> str:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c, _, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_cell(r, k, nd))}</td>" for _, k, nd in cols) + "</tr>"
        for r in results["variants"]
    )
    per = []
    for r in results["variants"][1:]:
        for smp in r["samples"]:
            m = smp["metrics"]
            per.append(
                f"<tr><td>{e(r['label'])}</td><td>{smp['prompt_index']}</td><td>{smp['seed']}</td>"
                f"<td>{e(_fmt(_from_json(m['psnr']), 2))}</td><td>{e(_fmt(m['ssim'], 4))}</td>"
                f"<td>{e(_fmt(_from_json(m['temporal_psnr']), 2))}</td>"
                f"<td>{e(_fmt(smp['s_per_step'], 3))}</td>"
                f'<td><a href="{e(smp.get("video", ""))}">{e(smp.get("video", ""))}</a></td></tr>'
            )
    plans = "".join(f"<li><code>{e(r['label'])}</code>: {e(r['plan'])}</li>" for r in results["variants"])
    skipped = "".join(f"<li>{e(k)}: {e(v)}</li>" for k, v in results["metrics_skipped"].items())
    notes = "".join(f"<li>{e(n)}</li>" for n in results["notes"])
    prompts = "".join(f"<li>{i}: {e(q)}</li>" for i, q in enumerate(results["settings"]["prompts"]))
    strip_html = "".join(f"<figure>{img(out / s, s)}<figcaption>{e(s)}</figcaption></figure>" for s in strips)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>sparsediff compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f2f2f2; }} td:first-child, th:first-child {{ text-align: left; }}
tr:first-child td {{ background: #fafafa; }}
.plots {{ display: flex; flex-wrap: wrap; gap: 16px; align-items: flex-start; }}
.plots img, figure img {{ border: 1px solid #ddd; max-width: 100%; }}
figure {{ margin: 0 0 16px; }} figcaption {{ font-size: 12px; color: #666; }}
.small {{ font-size: 13px; color: #444; }} code {{ background: #f4f4f4; padding: 0 3px; }}
</style></head><body>
<h1>sparsediff compare</h1>
<p class="small">{"<br>".join(e(c) for c in _conditions(results))}</p>
<h2>Summary (mean over {len(results["settings"]["prompts"])} prompt(s) x {len(results["settings"]["seeds"])} seed(s))</h2>
<table><tr>{head}</tr>{body}</table>
<p class="small">{"<br>".join(e(x) for x in _EXPLAIN)}</p>
{"<h3>Notes</h3><ul class='small'>" + notes + "</ul>" if notes else ""}
<div class="plots">{img(qs, "quality vs speed")}{img(dp, "density per layer")}</div>
<h2>Plans</h2><ul class="small">{plans}</ul>
{"<h2>Not computed</h2><ul class='small'>" + skipped + "</ul>" if skipped else ""}
<h2>Side by side (dense first; evenly spaced frames)</h2>
<ol class="small" start="0">{prompts}</ol>
{strip_html}
<h2>Per sample</h2>
<table><tr><th>plan</th><th>prompt</th><th>seed</th><th>PSNR dB</th><th>SSIM</th><th>temporal PSNR dB</th>
<th>s / step</th><th>video</th></tr>{"".join(per)}</table>
<p class="small">All numbers: <a href="results.json">results.json</a>.</p>
</body></html>
"""
    (out / "report.html").write_text(page, encoding="utf-8")


# ---------------------------------------------------------------------------------------------- CLI
def _parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    return table[name]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sparsediff compare",
        description="Dense vs sparse attention on the same prompts and seeds: metrics, timings, videos, report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Plans: default | PATTERN | plan.json | dense, each optionally followed by "
        ",key=value SparseAttentionConfig overrides (PATTERN.PARAM=value, label=NAME).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--pipeline", help="MODULE:FUNCTION returning a diffusers pipeline")
    src.add_argument("--model", help="a diffusers pipeline folder (default: the embedded model)")
    p.add_argument(
        "--prompts",
        help="text file, one prompt per line (# comments, blank lines skipped); default with the embedded "
        "model: 4 of its evaluation captions",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument(
        "--plans", nargs="+", default=["default", "tile", "topp"], help="variants to compare (see above)"
    )
    p.add_argument("--frames", type=int, default=None, help="video frames (default: the pipeline's)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the pipeline's)")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--block-size", type=int, default=None, help="tokens per mask block (default 64)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed calls per variant before timing (default 1)"
    )
    p.add_argument("--lpips", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    p.add_argument("--strip-frames", type=int, default=6)
    p.add_argument("--out", default="sparsediff-compare", help="output folder (default ./sparsediff-compare)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice; use 1 on a machine shared with other jobs)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if args.no_progress:
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()  # "Loading pipeline components" bars
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        # everything that can be checked without the model, before loading it
        prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
        prompts = [q.strip() for q in prompts if q.strip()]
        if not prompts and not args.prompts and not (args.pipeline or args.model):
            from .embedded.data import eval_prompts

            prompts = eval_prompts(4)  # the default model's own evaluation captions
        if not prompts:
            src = f"{args.prompts} holds no prompts" if args.prompts else "no --prompt or --prompts given"
            raise CompareError(f"no prompts: {src}")
        if args.warmup < 0 or args.strip_frames < 1:
            raise CompareError("--warmup must be >= 0 and --strip-frames >= 1")
        variants = [parse_variant(spec) for spec in args.plans]
        _unique_labels(variants)
        out = Path(args.out)
        check_output_dir(out, args.overwrite)  # read-only apart from creating the folder
        device = args.device
        _, world, state = _distributed()
        if world > 1 and device.startswith("cuda"):
            device = str(state.device)  # one GPU per process
        pipe, info = load_pipeline(args.pipeline, args.model, device=device, dtype=_parse_dtype(args.dtype))
        command = "sparsediff compare " + " ".join(shlex.quote(a) for a in argv)
        results = compare(
            pipe,
            prompts,
            seeds=args.seeds,
            plans=variants,
            out=out,
            num_frames=args.frames,
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            negative_prompt=args.negative_prompt,
            backend=args.backend,
            block_size=args.block_size,
            warmup=args.warmup,
            lpips={"auto": "auto", "on": True, "off": False}[args.lpips],
            video_format=args.format,
            strip_frames=args.strip_frames,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            model_info=info,
            command=command,
        )
    except CompareError as e:
        print(f"sparsediff compare: error: {e}", file=sys.stderr)
        return 2
    if results:
        print((out / "report.md").read_text().split("\n\nAll metrics")[0])
        print(f"\nreport: {(out / 'report.html').resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
