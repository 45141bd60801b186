"""Generation and timing of ``sparsediff compare``: dense once per (prompt, seed), then every variant.

:func:`compare` is the library entry point; under ``accelerate launch`` the (prompt, seed) pairs are
split between processes and the main process merges their records and writes the report.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..loading import distributed as _distributed
from ..media import save_strip, write_video
from . import report as _report
from .cache import CacheRunError, CacheSpec, EnabledCache, check_cache, config_dict, parse_cache
from .variants import (
    BASELINE,
    CompareError,
    Variant,
    check_output_dir,
    label_slug,
    parse_variant,
    preflight_plans,
    remove_outputs,
    unique_labels,
    vocabulary_warnings,
)

_PARTS_DIR = ".compare-parts"  # per-process results under accelerate, removed after the merge


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
    from ..timing import GenerationClock

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
    clock = GenerationClock(pipe, cuda=s.device.startswith("cuda"))
    if "callback_on_step_end" in params:
        kw["callback_on_step_end"] = clock.on_step_end
    with torch.no_grad(), clock:
        out = pipe(**kw)
    return {
        "frames": _as_frames(out),
        "s_per_step": clock.seconds_per_step,
        "total_s": clock.total,
        "steps": clock.steps,
        "attention_s": clock.attention.seconds,
        "self_attention_s": clock.attention.self_seconds,
        "denoise_s": clock.denoise_seconds,
        "attention_calls": clock.attention.calls,
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
    from ..plan import ModelIdentity
    from ..search.price import price_plan

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
    return _report._mean(vals)


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
    return merged


# ------------------------------------------------------------------------------------------------- a run
@dataclass
class _Run:
    """Everything the variants of one comparison share."""

    pipe: Any
    prompts: list[str]
    settings: _Settings
    params: set[str]
    meter: Any
    out_dir: Path | None
    video_format: str
    warmup: int
    base_config: Any
    world: int
    mine: list[tuple[int, int]]
    bar: Any
    cache: CacheSpec | None = None
    enabled_cache: EnabledCache | None = None  # while a "+ cache" row runs
    dense_frames: dict[tuple[int, int], np.ndarray] = field(default_factory=dict)
    strip_rows: dict[tuple[int, int], dict[str, np.ndarray]] = field(default_factory=dict)
    strip_notes: dict[tuple[int, int], dict[str, str]] = field(default_factory=dict)


def _check_inputs(
    prompts: Sequence[str], seeds: Sequence[int], plans: Sequence[str | Variant], video_format: str,
    backend: str, block_size: int | None, cache: str | CacheSpec | None = None, steps: int | None = None,
) -> tuple[list[str], list[int], list[Variant], Any, CacheSpec | None]:  # fmt: skip
    """Everything that can be checked without generating; raises :class:`CompareError`."""
    from ..config import SparseAttentionConfig

    prompts = [q.strip() for q in prompts if q and q.strip()]
    if not prompts:
        raise CompareError("no prompts: pass --prompt TEXT or --prompts FILE with at least one line")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise CompareError("no seeds")
    if video_format not in ("mp4", "gif"):
        raise CompareError(f"video_format must be 'mp4' or 'gif', got {video_format!r}")
    variants = unique_labels([v if isinstance(v, Variant) else parse_variant(v) for v in plans])
    if not variants:
        raise CompareError("no plans to compare (pass --plans ...)")
    try:
        base_config = SparseAttentionConfig(backend=backend, block_size=block_size, log_density=False)
    except (TypeError, ValueError) as e:
        raise CompareError(str(e)) from None
    if isinstance(cache, str):
        cache = parse_cache(cache)
    if cache is not None:
        check_cache(cache, steps)
        slugs: dict[str, str] = {}
        for name in _names(variants, cache):
            other = slugs.setdefault(label_slug(name), name)
            if other != name:
                raise CompareError(
                    f"two rows would share the file name of {name!r}; give the plan a label=NAME"
                )
    return prompts, seeds, variants, base_config, cache


def _names(variants: Sequence[Variant], cache: CacheSpec | None) -> list[str]:
    """Row labels in run order: dense, (dense + cache), then each plan (and plan + cache)."""
    names = []
    for label in [BASELINE] + [v.label for v in variants]:
        names.append(label)
        if cache is not None:
            names.append(f"{label} + {cache.label}")
    return names


def _one_sample(run: _Run, name: str, pi: int, seed: int) -> dict[str, Any]:
    """Generate (prompt ``pi``, ``seed``) with what is enabled now; metrics vs dense, video, strip row."""
    run.bar.set_description(f"{name} p{pi} s{seed}")
    if run.enabled_cache is not None:
        run.enabled_cache.reset()  # every generation starts with an empty cache
    g = _generate(run.pipe, run.prompts[pi], seed, run.settings, run.params)
    run.bar.update()
    frames = g.pop("frames")
    rec: dict[str, Any] = {"prompt_index": pi, "prompt": run.prompts[pi], "seed": seed, **g}
    m = None
    if name == BASELINE:  # plain dense: the reference of every row, "dense + cache" included
        run.dense_frames[(pi, seed)] = frames
    else:
        m = run.meter(frames, run.dense_frames[(pi, seed)])
        rec["metrics"] = asdict(m)  # floats (inf for identical videos); results.json writes null
    if run.out_dir is not None:
        path = write_video(
            frames, run.out_dir / "videos" / f"p{pi}_s{seed}_{label_slug(name)}", run.video_format
        )
        rec["video"] = str(path.relative_to(run.out_dir))
    run.strip_rows.setdefault((pi, seed), {})[name] = frames
    run.strip_notes.setdefault((pi, seed), {})[name] = (
        "reference"
        if m is None
        else f"PSNR {_report._fmt(m.psnr, 2)} dB\nSSIM {_report._fmt(m.ssim, 4)}\n"
        f"tPSNR {_report._fmt(m.temporal_psnr, 2)} dB"
    )
    return rec


def _sparse_record(run: _Run, handle: Any, samples: list, seen: dict, cfg: Any, dense: dict | None) -> dict:
    """Densities, run density and the predicted speed-ups of a sparse variant."""
    rec: dict[str, Any] = {
        "density_per_layer": {
            comp: {str(k): v for k, v in sorted(d.items())} for comp, d in handle.densities().items()
        },
        "run_density": _run_density(handle, samples),
    }
    plan = handle.states["transformer"].plan if "transformer" in handle.states else None
    search_meta = (plan.meta.get("search") or {}) if plan is not None else {}
    rec["search_predicted_speedup"] = search_meta.get("predicted_step_speedup")
    rec["predicted_speedup"] = _predicted_speedup(
        run.pipe, plan, seen, dense, samples, cfg, run.settings.device
    )
    return rec


def _run_variant(
    run: _Run, variant: Variant | None, dense: dict | None, cached: bool = False
) -> dict[str, Any]:
    """Warm-up calls, then every (prompt, seed) of this process with ``variant`` enabled (``None``: dense)
    and, with ``cached``, ``run.cache`` enabled after it (removed again before returning)."""
    from ..api import enable_sparse_attention

    name = BASELINE if variant is None else variant.label
    if cached:
        name = f"{name} + {run.cache.label}"
    handle, cfg, seen = None, None, {}

    def observe(call: Any) -> None:  # the run's layout and shapes, for the predicted price
        if "layout" not in seen:
            seen.update(layout=call.layout, shape=tuple(call.query.shape))

    if variant is not None:
        cfg = run.base_config.updated(**variant.overrides)
        if cfg.observer is None and run.world == 1:
            cfg = cfg.updated(observer=observe)
        handle = enable_sparse_attention(run.pipe, variant.target(), config=cfg)
    cuda = run.settings.device.startswith("cuda")
    try:
        if cached:
            run.enabled_cache = EnabledCache(run.pipe, run.cache, run.settings.num_inference_steps)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(run.warmup if run.mine else 0):
                run.bar.set_description(f"{name} warm-up")
                if run.enabled_cache is not None:
                    run.enabled_cache.reset()
                _generate(run.pipe, run.prompts[run.mine[0][0]], run.mine[0][1], run.settings, run.params)
                run.bar.update()
            samples = [_one_sample(run, name, pi, seed) for pi, seed in run.mine]
        except (RuntimeError, IndexError, KeyError, TypeError, ValueError, AttributeError) as e:
            if not cached or isinstance(e, CompareError):
                raise
            raise CacheRunError(run.cache, name, run.pipe, e) from e
        rec: dict[str, Any] = {"label": name, "samples": samples}
        if cuda:
            rec["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
        if handle is not None:
            rec.update(_sparse_record(run, handle, samples, seen, cfg, dense))
            if cached:  # the prices know nothing of the cache: no prediction for "+ cache" rows
                rec.update(predicted_speedup=None, search_predicted_speedup=None)
        return rec
    finally:
        if run.enabled_cache is not None:
            run.enabled_cache.disable()
            run.enabled_cache = None
        if handle is not None:
            handle.disable()


def _write_strips(run: _Run, strip_frames: int) -> None:
    for (pi, seed), rows in run.strip_rows.items():
        save_strip(
            rows,
            run.out_dir / "strips" / f"p{pi}_s{seed}.png",
            notes=run.strip_notes[(pi, seed)],
            n_frames=strip_frames,
            title=f"prompt {pi}: {run.prompts[pi]}  |  seed {seed}",
        )


def _gather(state: Any, rank: int, world: int, out_dir: Path | None, records: dict) -> dict | None:
    """Several processes: exchange the records through ``out_dir``; the main process gets them all
    (merged in (prompt, seed) order), the others ``None``."""
    if out_dir is None:
        raise CompareError("several processes need --out (they exchange results through it)")
    parts = out_dir / _PARTS_DIR
    parts.mkdir(exist_ok=True)
    (parts / f"rank{rank}.json").write_text(json.dumps(records))  # internal: inf as Infinity
    state.wait_for_everyone()
    if rank != 0:
        return None
    merged = _merge_parts([json.loads((parts / f"rank{r}.json").read_text()) for r in range(world)])
    for r in range(world):
        (parts / f"rank{r}.json").unlink()
    parts.rmdir()
    return merged


def _per_rank_memory(rank: int, records: dict) -> dict | None:
    """Context parallelism: every rank generated the same samples; the main process keeps its records and
    adds every rank's peak GPU memory per variant (``peak_memory_gb_per_rank``; ``peak_memory_gb`` is the
    largest); the others get ``None``."""
    from accelerate.utils import gather_object

    mem = gather_object([{k: r.get("peak_memory_gb") for k, r in records.items()}])
    if rank != 0:
        return None
    for k, r in records.items():
        per_rank = [m[k] for m in mem]
        if all(x is not None for x in per_rank):
            r["peak_memory_gb_per_rank"] = per_rank
            r["peak_memory_gb"] = max(per_rank)
    return records


def _preflight_cache(
    pipe: Any, variants: list[Variant], base_config: Any, cache: CacheSpec, steps: int | None
) -> dict[str, Any]:
    """The cache enabled and removed once alone and once on top of every plan (sparse attention enabled
    first, as in the run); returns the configs of the first time (``results.json``)."""
    from ..api import enable_sparse_attention

    with EnabledCache(pipe, cache, steps) as first:
        configs = {n: config_dict(c) for n, c in first.configs.items()}
    for v in variants:
        h = enable_sparse_attention(pipe, v.target(), config=base_config.updated(**v.overrides))
        try:
            EnabledCache(pipe, cache, steps).disable()
        finally:
            h.disable()
    return configs


def _start(
    pipe: Any, out_dir: Path | None, overwrite: bool, variants: list[Variant], base_config: Any,
    cache: CacheSpec | None = None, steps: int | None = None,
):  # fmt: skip
    """Output folder checks (main process), the plan (and cache) preflight; returns (rank, world, state,
    summaries, cache configs)."""
    rank, world, state = _distributed()
    if out_dir is not None and rank == 0:
        remove_outputs(check_output_dir(out_dir, overwrite))
    if state is not None:
        state.wait_for_everyone()
    summaries = preflight_plans(pipe, variants, base_config)
    configs = _preflight_cache(pipe, variants, base_config, cache, steps) if cache is not None else None
    if out_dir is not None:
        (out_dir / "videos").mkdir(exist_ok=True)
        (out_dir / "strips").mkdir(exist_ok=True)
    return rank, world, state, summaries, configs


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
    context_parallel: dict[str, int] | None = None,
    cache: str | CacheSpec | None = None,
) -> dict[str, Any]:
    """Generate every (prompt, seed) densely and with every plan on ``pipe``; measure; report.

    ``pipe`` is reused for every variant (sparse attention is enabled and disabled around each, so it is
    left as it came); ``plans`` are ``--plans`` entries (:func:`parse_variant`) or :class:`Variant`
    objects; ``out`` the folder for videos, strips, plots and reports (``None``: numbers only);
    ``num_frames`` ... ``negative_prompt`` go to the pipeline when given; ``backend`` / ``block_size``
    form the base :class:`~sparsediff.SparseAttentionConfig`; ``warmup`` untimed calls per variant;
    ``lpips`` ``"auto"`` / ``True`` / ``False``; ``video_format`` ``"mp4"`` (GIF fallback) or ``"gif"``.

    ``context_parallel`` (``--cp``: ``{"ulysses": U, "ring": R}``, parallelism already enabled on the
    transformers): every process runs every (prompt, seed) together; the main process writes the outputs
    and the report (peak GPU memory of every rank: ``peak_memory_gb_per_rank``).

    ``cache`` (``--cache``: a spec such as ``"first_block:threshold=0.15"``, see
    :mod:`sparsediff.compare.cache`, or a :class:`~sparsediff.compare.cache.CacheSpec`): one of diffusers'
    caches; the rows are then dense, ``dense + CACHE``, and each plan followed by ``PLAN + CACHE`` (the
    plan's sparse attention, then the cache, enabled with diffusers' ``enable_cache``), every row against
    plain dense (speedup and metrics), the cache reset before each generation and removed after its rows.

    Returns the ``results.json`` content (in memory, PSNR of identical videos is ``math.inf``; the file
    writes null). Raises :class:`CompareError` on bad input, before anything is generated.
    """
    from ..metrics import VideoQuality

    t_start, load_start = time.perf_counter(), _report._load_average()
    prompts, seeds, variants, base_config, cache = _check_inputs(
        prompts, seeds, plans, video_format, backend, block_size, cache, num_inference_steps
    )
    out_dir = Path(out) if out is not None else None
    rank, world, state, summaries, cache_configs = _start(
        pipe, out_dir, overwrite, variants, base_config, cache, num_inference_steps
    )
    device = str(getattr(pipe, "device", "cpu"))
    s = _Settings(num_frames, height, width, num_inference_steps, guidance_scale, negative_prompt, device)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    pairs = [(pi, seed) for pi in range(len(prompts)) for seed in seeds]
    mine = pairs if context_parallel else pairs[rank::world]  # context parallel: all ranks, every pair
    names = _names(variants, cache)
    bar = _progress(len(mine) * len(names) + warmup * len(names) * bool(mine), progress, rank)
    meter = VideoQuality(lpips=lpips, device=device if device.startswith("cuda") else "cpu")
    writes = out_dir if rank == 0 or not context_parallel else None
    run = _Run(pipe, prompts, s, _call_params(pipe), meter, writes, video_format, warmup, base_config,
               world, mine, bar, cache)  # fmt: skip
    records: dict[str, dict[str, Any]] = {BASELINE: _run_variant(run, None, None)}
    rows: dict[str, dict[str, Any]] = {BASELINE: {"base": BASELINE, "cache": None}}
    for v in [None, *variants]:
        if v is not None:
            records[v.label] = _run_variant(run, v, records[BASELINE])
            rows[v.label] = {"base": v.label, "cache": None}
        if cache is not None:
            rec = _run_variant(run, v, records[BASELINE], cached=True)
            records[rec["label"]] = rec
            rows[rec["label"]] = {"base": BASELINE if v is None else v.label, "cache": cache.label}
    bar.close()
    if run.out_dir is not None:
        _write_strips(run, strip_frames)
    if state is not None and context_parallel:
        records = _per_rank_memory(rank, records)
        if records is None:
            return {}
    elif state is not None:
        records = _gather(state, rank, world, out_dir, records)
        if records is None:
            return {}
    results = _report.summarise(
        records, names, variants, summaries, prompts=prompts, seeds=seeds, settings=s,
        extra_settings={"backend": backend, "block_size": block_size, "warmup": warmup, "processes": world,
                        "video_format": video_format, "context_parallel": context_parallel,
                        "cache": None if cache is None else cache.spec},
        rows=rows,
        cache=None if cache is None else {"spec": cache.spec, "name": cache.name, "label": cache.label,
                                          "config_class": cache.config_class, "config": cache_configs},
        model_info=model_info or {"class": type(pipe).__name__},
        notes=vocabulary_warnings(pipe, prompts),
        lpips_reason=meter.lpips_reason if meter._lpips_net is None else None,
        command=command, wall_s=time.perf_counter() - t_start, load=(load_start, _report._load_average()),
    )  # fmt: skip
    if out_dir is not None:
        _report.write_reports(out_dir, results, pairs)
    return results
