"""``sparsediff search``: profile a pipeline densely on calibration prompts and write a per-head plan.

::

    sparsediff search --pipeline mypkg.pipes:load_wan --prompts prompts.txt --steps 50 \\
        --frames 81 --height 480 --width 832 --target-error 0.05 --out wan_plan.json
    sparsediff search --model /models/Wan2.1-T2V-1.3B-Diffusers --prompts p.txt --density 0.25 --out plan.json

``--pipeline MODULE:FUNCTION`` calls ``FUNCTION()``, which returns a diffusers pipeline or a tuple
``(pipeline, call kwargs)``; ``--model ID_OR_FOLDER`` loads ``DiffusionPipeline.from_pretrained``; with
neither, the embedded model when its trained weights are in the package (:mod:`sparsediff.loading`). Every
input is checked before the model is loaded: missing / empty prompts file, existing output without
``--overwrite``, unwritable output, budgets, schedule, families. A budget that cannot be met still writes the closest plan, flagged in the output and in the
plan's ``meta.search.budget_met``.

Several processes (``accelerate launch --num_processes N -m sparsediff.search ...``, plus ``--multi_gpu``
on a machine without GPUs; gloo on CPU, one GPU per process): the prompts are split into contiguous
shares (``PartialState.split_between_processes``), each process profiles its share one prompt at a time,
and the main process merges the per-prompt statistics in prompt order -- the same sums, added in the
same order, as one process on all prompts, so the same plan. Only the main process writes ``--stats``
and ``--out`` and prints the table.

``--cp ulysses=U`` (models too large for one GPU; ``--num_processes U``): the processes profile every
prompt together under diffusers' Ulysses context parallelism -- each holds the whole sequence for ``H / U``
heads, so each measures its heads -- and the main process joins the heads in Ulysses-rank order (the
sampled query rows depend on the layout and seed only: the same statistics as one process). Ring
degrees are refused: under ring a rank holds a chunk of the queries, and the profile measures whole rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..cli_args import (
    InputError,
    Parser,
    add_cp_arg,
    add_output_args,
    add_seeds_arg,
    add_threads_arg,
    add_video_args,
    apply_threads,
    fail,
    positive_int,
    read_prompts_file,
)
from ..loading import add_source_args, check_source, finish_processes, load_pipeline

__all__ = ["main", "build_parser"]

PROG = "sparsediff search"


class SearchInputError(InputError):
    """Bad command-line input (reported as ``sparsediff search: error: ...``, exit status 2)."""


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(
        prog=PROG,
        description="Search a per-head sparse-attention plan by profiling a pipeline on calibration prompts.",
    )
    add_source_args(ap)
    ap.add_argument(
        "--prompts",
        metavar="FILE",
        help="calibration prompts, one per line (# comments, blank lines skipped)",
    )
    ap.add_argument("--prompt", action="append", default=[], help="a calibration prompt (repeatable)")
    add_video_args(ap, steps_default="the factory's call kwargs, else 50")
    add_seeds_arg(ap, help="generation and row-sampling seed (one value; default: 0)")
    ap.add_argument(
        "--profile-steps", metavar="I,J,...", help="steps to measure (default: 4 after the warm-up)"
    )
    ap.add_argument(
        "--candidates",
        metavar="FAMILY,...",
        help="restrict to these families (radial,tile,reordered,cluster,topp,lse_cache,skip)",
    )
    ap.add_argument(
        "--remainder",
        choices=("none", "pooled", "cached"),
        default="none",
        help="pooled: also try every sparse candidate with its unselected key blocks added back as one pooled "
        "key each (for near-uniform heads; priced, chosen per head where it pays). cached: give every static "
        "head of the chosen plan the stored remainder (an exact pass every --remainder-refresh steps, the "
        "part its mask leaves out merged into the steps between; priced; the errors reported are the masks' "
        "alone). Default none",
    )
    ap.add_argument(
        "--remainder-refresh",
        type=int,
        default=None,
        metavar="R",
        help="with --remainder cached: steps between the exact passes (default 5)",
    )
    ap.add_argument(
        "--remainder-layers",
        metavar="I,J,...",
        default=None,
        help="with --remainder cached: only these self-attention layers get the stored remainder (their "
        "exact passes are all it costs; default every layer)",
    )
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument(
        "--target-error", type=float, metavar="E", help="mean relative error budget over all heads"
    )
    budget.add_argument("--density", type=float, metavar="D", help="mean density budget (minimise error)")
    add_output_args(ap, out_help="the plan file to write", out_metavar="PLAN.json",
                    overwrite_help="replace an existing --out")  # fmt: skip
    ap.add_argument("--stats", metavar="FILE", help="load (if present), add this run's statistics, save back")
    ap.add_argument("--block-size", type=positive_int, default=64, help="tokens per mask block (default 64)")
    ap.add_argument(
        "--num-rows",
        type=positive_int,
        default=512,
        help="sampled query rows per head and call (default 512)",
    )
    ap.add_argument(
        "--dense-steps",
        metavar="N|F",
        help="dense warm-up of the plan: an int counts steps, a number with a decimal point is a fraction "
        "(default: the model family's, 0.25)",
    )
    ap.add_argument(
        "--dense-layers",
        metavar="I,J,...",
        help="self-attention layers kept dense ('' for none; default: the model family's, the first layer)",
    )
    ap.add_argument(
        "--keep-slow-layers",
        action="store_true",
        help="keep sparse layers whose replayed attention is not faster than dense on this device (by "
        "default they are made dense: the plan is never slower than dense where it was searched)",
    )
    ap.add_argument("--device", default=None, help="device for the pipeline (default: cuda if available)")
    ap.add_argument("--calibrate", action="store_true", help="time the op on this device for the cost model")
    add_threads_arg(ap)
    add_cp_arg(ap)
    return ap


def _read_prompts(path: str | None, extra: list[str]) -> list[str]:
    prompts = [q.strip() for q in extra if q.strip()]
    if path is not None:
        from_file = read_prompts_file(path)
        if not from_file:
            raise SearchInputError(
                f"prompts file {path} has no prompts (one per line; blank and # lines are ignored)"
            )
        prompts += from_file
    if not prompts:
        raise SearchInputError("no prompts: pass --prompts FILE and/or --prompt TEXT")
    return prompts


def _check_out(path: str, overwrite: bool) -> Path:
    p = Path(path)
    if p.is_dir():
        raise SearchInputError(f"--out {p} is a directory; give a file name such as {p / 'plan.json'}")
    if p.exists() and not overwrite:
        raise SearchInputError(f"--out {p} exists; pass --overwrite to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise SearchInputError(f"--out {p} is not writable: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SearchInputError(f"--out {p} is not writable (no write permission in {probe})")
    return p


def _parse_steps(s: str | None) -> list[int] | None:
    if not s:
        return None
    try:
        return sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise SearchInputError(f"--profile-steps must be comma-separated step indices, got {s!r}") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        return _run(args)
    except InputError as e:
        return fail(PROG, e)


def _parse_schedule(
    steps: str | None, layers: str | None
) -> tuple[int | float | None, tuple[int, ...] | None]:
    from ..specs import DenseSchedule

    ds: int | float | None = None
    if steps is not None:
        try:
            ds = float(steps) if any(c in steps for c in ".eE") else int(steps)
        except ValueError:
            raise SearchInputError(f"--dense-steps: {steps!r} is neither an int nor a fraction") from None
    dl: tuple[int, ...] | None = None
    if layers is not None:
        try:
            dl = tuple(int(x) for x in layers.split(",") if x.strip())
        except ValueError:
            raise SearchInputError(
                f"--dense-layers: {layers!r} is not a comma list of layer indices"
            ) from None
    try:
        DenseSchedule(0 if ds is None else ds, dl or ())
    except (TypeError, ValueError) as e:
        raise SearchInputError(f"--dense-steps / --dense-layers: {e}") from None
    return ds, dl


def _parse_remainder_layers(text: str, remainder: str) -> tuple[int, ...]:
    if remainder != "cached":
        raise SearchInputError(f"--remainder-layers {text!r}: with --remainder cached only")
    try:
        layers = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise SearchInputError(f"--remainder-layers: {text!r} is not a comma list of layer indices") from None
    if not layers or min(layers) < 0:
        raise SearchInputError(f"--remainder-layers: {text!r} is not a comma list of layer indices >= 0")
    return layers


_FAMILIES = ("dense", "radial", "tile", "reordered", "cluster", "topp", "lse_cache", "skip")


def _check_inputs(args) -> dict[str, Any]:
    """Every input that can be checked without the model; raises :class:`SearchInputError`."""
    from .profile import SearchStats

    check_source(args.pipeline, args.model)
    prompts = _read_prompts(args.prompts, args.prompt)
    out = _check_out(args.out, args.overwrite)
    if len(args.seeds) != 1:
        raise SearchInputError(f"--seeds: the search profiles one seed, got {len(args.seeds)}")
    if args.target_error is not None and args.target_error < 0:
        raise SearchInputError(f"--target-error must be >= 0, got {args.target_error}")
    if args.density is not None and not 0 < args.density <= 1:
        raise SearchInputError(f"--density must be in (0, 1], got {args.density}")
    if args.remainder_refresh is not None and (args.remainder != "cached" or args.remainder_refresh < 1):
        raise SearchInputError(
            f"--remainder-refresh {args.remainder_refresh}: an int >= 1, with --remainder cached only"
        )
    if args.remainder_layers is not None:
        args.remainder_layers = _parse_remainder_layers(args.remainder_layers, args.remainder)
    psteps = _parse_steps(args.profile_steps)
    args.dense_steps, args.dense_layers = _parse_schedule(args.dense_steps, args.dense_layers)
    fams = [x.strip() for x in args.candidates.split(",")] if args.candidates else None
    if fams and any(f not in _FAMILIES for f in fams):
        raise SearchInputError(
            f"--candidates: unknown famil(ies) {[f for f in fams if f not in _FAMILIES]}; known: {_FAMILIES}"
        )
    prior = None
    if args.stats and Path(args.stats).exists():
        try:
            prior = SearchStats.load(args.stats)
        except ValueError as e:
            raise SearchInputError(str(e)) from None
    return {"prompts": prompts, "out": out, "profile_steps": psteps, "families": fams, "prior": prior}


def _load(args, world: int, state) -> tuple[Any, dict[str, Any], Any, Any, str]:
    """(pipeline, call kwargs, transformer, adapter, device), the pipeline on its device."""
    import torch

    from ..pipelines.base import UnsupportedModelError, get_adapter

    loaded = load_pipeline(args.pipeline, args.model, allow_random=False, command=PROG)
    pipe, kw = loaded.pipe, loaded.call_kwargs
    comps = getattr(pipe, "components", None)
    transformer = comps.get("transformer") if isinstance(comps, dict) else None
    if not isinstance(transformer, torch.nn.Module):
        raise SearchInputError(f"{type(pipe).__name__} is not a DiT pipeline with a 'transformer' component")
    try:
        adapter = get_adapter(transformer)
    except UnsupportedModelError as e:
        raise SearchInputError(str(e)) from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if world > 1 and device.startswith("cuda"):
        device = str(state.device)  # one GPU per process
    pipe.to(device)
    for name, val in (
        ("num_frames", args.frames),
        ("height", args.height),
        ("width", args.width),
        ("guidance_scale", args.guidance_scale),
    ):
        if val is not None:
            kw[name] = val
    kw.pop("prompt", None)
    return pipe, kw, transformer, adapter, device


def _profile(args, inp: dict[str, Any], pipe, kw, steps: int, n_layers: int, rank: int, world: int, state):
    """The statistics of every prompt (main process; ``None`` elsewhere)."""
    from .profile import default_profile_steps, profile_pipeline

    prompts, psteps = inp["prompts"], inp["profile_steps"]
    n_prof = len(psteps) if psteps else len(default_profile_steps(steps))
    mine = list(range(len(prompts)))
    if state is not None and args.cp is None:
        with state.split_between_processes(mine) as share:
            mine = list(share)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        desc = "profiling (steps x layers)" + (f" [process {rank}]" if world > 1 else "")
        bar = tqdm(total=len(mine) * n_prof * n_layers, desc=desc, unit="call", position=rank)
    measure = dict(
        call_kwargs=kw,
        num_steps=steps,
        profile_steps=psteps,
        families=inp["families"],
        remainder=args.remainder == "pooled",
        block_size=args.block_size,
        num_rows=args.num_rows,
        seed=args.seeds[0],
        progress=None if bar is None else bar.update,
    )
    try:
        if state is None:
            return profile_pipeline(pipe, prompts, stats=inp["prior"], **measure)
        if args.cp is not None:  # Ulysses: every process profiles every prompt, for its heads
            return _join_heads(state, profile_pipeline(pipe, prompts, **measure), inp["prior"])
        return _profile_share(state, pipe, prompts, mine, inp["prior"], measure)
    except ValueError as e:
        raise SearchInputError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()


def _make_plan(args, stats, transformer, adapter, device: str, steps: int):
    """Search the plan from the statistics, price it on ``device``; returns (plan, report, price lines)."""
    from ..defaults import family_schedule
    from ..specs import DenseSchedule
    from .cost import CostCache
    from .price import price_searched_plan
    from .profile import plan_from_stats

    fs = family_schedule(adapter)
    schedule = DenseSchedule(
        fs["dense_steps"] if args.dense_steps is None else args.dense_steps,
        tuple(fs["dense_layers"]) if args.dense_layers is None else args.dense_layers,
    )
    any_layer = next(iter(stats.layers.values()))
    cost = CostCache().get(
        device, head_dim=any_layer.head_dim, block_size=args.block_size, dtype=transformer.dtype,
        calibrate=args.calibrate,
    )  # fmt: skip
    plan, report = plan_from_stats(
        stats, transformer, target_error=args.target_error, density=args.density, cost_model=cost,
        schedule=schedule, min_tokens=int(fs["min_tokens"]),
    )  # fmt: skip
    if args.remainder == "cached":
        plan = plan.with_remainder("cached", args.remainder_refresh, layers=args.remainder_layers)
    plan, _, lines = price_searched_plan(
        plan, stats, transformer, num_steps=steps, device=device, block_size=args.block_size,
        guard=not args.keep_slow_layers,
    )  # fmt: skip
    return plan, report, lines


def _run(args) -> int:
    from ..loading import distributed

    inp = _check_inputs(args)
    if args.cp is not None and args.cp[1] > 1:
        raise SearchInputError(
            "--cp: the search profiles whole query rows, which a ring rank does not hold; use --cp ulysses=U"
        )
    rank, world, state = distributed()
    pipe, kw, transformer, adapter, device = _load(args, world, state)
    if args.cp is not None:
        from ..loading import enable_context_parallel

        enable_context_parallel(pipe, args.cp, world)
    steps = int(args.steps or kw.get("num_inference_steps") or 50)
    n_layers = len(adapter.attention_modules(transformer))
    if args.remainder_layers is not None and max(args.remainder_layers) >= n_layers:
        raise SearchInputError(
            f"--remainder-layers {','.join(map(str, args.remainder_layers))}: the model has {n_layers} "
            f"self-attention layers (0..{n_layers - 1})"
        )
    stats = _profile(args, inp, pipe, kw, steps, n_layers, rank, world, state)
    if stats is None:
        finish_processes(state)  # not the main process: its statistics are in the main process's merge
        return 0
    if world > 1:
        print(f"profiled {len(inp['prompts'])} prompts on {world} processes")
    if args.stats:
        stats.save(args.stats)
    plan, report, lines = _make_plan(args, stats, transformer, adapter, device, steps)
    print(report.format())
    for line in lines:
        print(line)
    if not report.choice.met:
        print(
            "WARNING: the budget cannot be met; wrote the closest (best-effort) plan, flagged "
            "meta.search.budget_met = false",
            file=sys.stderr,
        )
    plan.save(inp["out"], overwrite=args.overwrite)
    print(f"wrote {inp['out']} ({plan.summary()})")
    finish_processes(state)
    return 0


def _join_heads(state, stats, prior):
    """``--cp ulysses=U``: every process measured every prompt for its ``H / U`` heads; the main process
    returns one statistics object with every head (processes in Ulysses-rank order), merged onto
    ``prior``; the others ``None``."""
    import dataclasses

    import torch
    from accelerate.utils import gather_object

    from .profile import SearchStats

    shares = gather_object([stats.to_dict()])
    if not state.is_main_process:
        return None
    parts = [SearchStats.from_dict(d) for d in shares]
    layers = {}
    for i, first in parts[0].layers.items():
        ls = [p.layers[i] for p in parts]
        layers[i] = dataclasses.replace(
            first,
            **{n: torch.cat([getattr(x, n) for x in ls]) for n in ("err", "recall", "density", "count")},
        )
    joined = SearchStats(layers, dict(parts[0].meta))
    return joined if prior is None else prior.merge(joined)


def _profile_share(state, pipe, prompts: list[str], mine: list[int], prior, measure: dict[str, Any]):
    """Profile prompts ``mine`` (this process's share); on the main process return the statistics of every
    prompt of every process merged in prompt order onto ``prior``, elsewhere ``None``.

    One statistics object per prompt, merged in prompt order, adds the same sums in the same order as
    :func:`profile_pipeline` on all prompts in one process (``to_dict`` / ``from_dict`` are exact). An error
    in any process is raised in every process, so none waits for the others forever.
    """
    from accelerate.utils import gather_object

    from .profile import SearchStats, profile_pipeline

    parts: list[tuple[int, dict[str, Any]]] = []
    error: Exception | None = None
    try:
        for i in mine:
            parts.append((i, profile_pipeline(pipe, [prompts[i]], **measure).to_dict()))
    except Exception as e:  # re-raised below, after the other processes have been told
        error = e
    failure = None if error is None else (type(error).__name__, str(error))
    shares = gather_object([{"rank": state.process_index, "failure": failure, "parts": parts}])
    if error is not None:
        raise error
    failed = [s for s in shares if s["failure"] is not None]
    if failed:
        kind, msg = failed[0]["failure"]
        text = f"process {failed[0]['rank']} failed: {kind}: {msg}"
        raise ValueError(text) if kind in ("ValueError", "SearchInputError") else RuntimeError(text)
    if not state.is_main_process:
        return None
    stats = prior if prior is not None else SearchStats()
    for _, d in sorted((p for s in shares for p in s["parts"]), key=lambda p: p[0]):
        stats = stats.merge(SearchStats.from_dict(d))
    return stats


if __name__ == "__main__":
    sys.exit(main())
