"""The ``sparsediff compare`` command line (``python -m sparsediff.compare``)."""

from __future__ import annotations

import argparse
import logging
import shlex
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
    nonnegative_int,
    positive_int,
)
from ..loading import add_source_args, check_source, enable_context_parallel, finish_processes
from ..loading import distributed as _distributed
from ..loading import load_pipeline as _load
from .cache import CACHE_CONFIGS, check_cache, parse_cache
from .run import compare
from .variants import CompareError, check_output_dir, parse_variant, read_prompts, unique_labels

PROG = "sparsediff compare"


def load_pipeline(
    pipeline: str | None = None, model: str | None = None, *, device: str = "cpu", dtype: Any = None
) -> tuple[Any, dict[str, Any]]:
    """The pipeline to compare on and its description (:func:`sparsediff.loading.load_pipeline`: the
    embedded trained model by default, its random-init twin with a warning when the weights are
    missing). Call kwargs a ``--pipeline`` factory returns are not used. Raises :class:`CompareError`."""
    try:
        loaded = _load(pipeline, model, device=device, dtype=dtype, allow_random=True, command=PROG)
    except InputError as e:
        raise CompareError(str(e)) from None
    return loaded.pipe, loaded.info


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog=PROG,
        description="Dense vs sparse attention on the same prompts and seeds: metrics, timings, videos, report.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Plans: default | PATTERN | plan.json | dense, each optionally followed by "
        ",key=value SparseAttentionConfig overrides (PATTERN.PARAM=value, label=NAME); a plan file also "
        "takes remainder=none|pooled|cached, remainder_refresh=R, remainder_layers=[I, ...] "
        "(Plan.with_remainder).\n"
        "Cache: NAME[:field=value,...], NAME one of "
        + " | ".join(f"{k} ({v})" for k, v in CACHE_CONFIGS.items())
        + ", the fields of that diffusers config, values Python literals; e.g. first_block:threshold=0.15, "
        "mag:mag_ratios=[...] (calibrated). The rows become dense, dense + cache, PLAN, PLAN + cache, ...; "
        "every speedup and metric is against plain dense.",
    )
    add_source_args(p, default="the embedded trained model")
    p.add_argument(
        "--prompts",
        metavar="FILE",
        help="text file, one prompt per line (# comments, blank lines skipped); default with the embedded "
        "model: 4 of its evaluation captions",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt (default: the pipeline's)")
    add_seeds_arg(p, help="one video per (prompt, seed) and variant (default: 0)")
    p.add_argument(
        "--plans", nargs="+", default=["default", "tile", "topp"], help="variants to compare (see below)"
    )
    p.add_argument(
        "--cache",
        metavar="SPEC",
        default=None,
        help="also run dense and every plan with one of diffusers' caches: NAME[:field=value,...], NAME one of "
        + " | ".join(CACHE_CONFIGS)
        + " (e.g. first_block:threshold=0.15)",
    )
    add_video_args(p)
    p.add_argument(
        "--backend", choices=("auto", "triton", "reference"), default="auto", help="sparse op backend"
    )
    p.add_argument("--block-size", type=positive_int, default=None, help="tokens per mask block (default 64)")
    p.add_argument(
        "--warmup",
        type=nonnegative_int,
        default=1,
        help="untimed calls per variant before timing (default 1)",
    )
    p.add_argument(
        "--lpips", choices=("auto", "on", "off"), default="auto", help="LPIPS (auto: weights on disk)"
    )
    p.add_argument(
        "--format", choices=("mp4", "gif"), default="mp4", help="video format (GIF without ffmpeg)"
    )
    p.add_argument("--strip-frames", type=positive_int, default=6, help="frames per strip row (default 6)")
    add_output_args(
        p, out_help="output folder (default ./sparsediff-compare)", out_default="sparsediff-compare"
    )
    p.add_argument("--device", default=None, help="device for the pipeline (default: cuda if available)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help="pipeline dtype")
    add_threads_arg(p)
    add_cp_arg(p)
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt) + (read_prompts(args.prompts) if args.prompts else [])
    prompts = [q.strip() for q in prompts if q.strip()]
    if not prompts and not args.prompts and not (args.pipeline or args.model):
        from ..embedded.data import eval_prompts

        prompts = eval_prompts(4)  # the default model's own evaluation captions
    if not prompts:
        src = f"{args.prompts} holds no prompts" if args.prompts else "no --prompt or --prompts given"
        raise CompareError(f"no prompts: {src}")
    return prompts


def main(argv: list[str] | None = None) -> int:
    import torch

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    if args.no_progress:
        from diffusers.utils import logging as dlogging

        dlogging.disable_progress_bar()  # "Loading pipeline components" bars
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        # everything that can be checked without the model, before loading it
        check_source(args.pipeline, args.model)
        prompts = _prompts(args)
        variants = [parse_variant(spec) for spec in args.plans]
        unique_labels(variants)
        cache = parse_cache(args.cache) if args.cache else None
        if cache is not None:
            check_cache(cache, args.steps)
        out = Path(args.out)
        check_output_dir(out, args.overwrite, create=False)  # writes nothing
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        _, world, state = _distributed()
        if world > 1 and device.startswith("cuda"):
            device = str(state.device)  # one GPU per process
        dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        pipe, info = load_pipeline(args.pipeline, args.model, device=device, dtype=dtype[args.dtype])
        cp = enable_context_parallel(pipe, args.cp, world)
        results = compare(
            pipe, prompts, seeds=args.seeds, plans=variants, out=out, num_frames=args.frames,
            height=args.height, width=args.width, num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale, negative_prompt=args.negative_prompt, backend=args.backend,
            block_size=args.block_size, warmup=args.warmup,
            lpips={"auto": "auto", "on": True, "off": False}[args.lpips], video_format=args.format,
            strip_frames=args.strip_frames, overwrite=args.overwrite, progress=not args.no_progress,
            model_info=info, command="sparsediff compare " + " ".join(shlex.quote(a) for a in argv),
            context_parallel=cp, cache=cache,
        )  # fmt: skip
    except InputError as e:
        return fail(PROG, e)
    if results:
        print((out / "report.md").read_text().split("\n\nAll metrics")[0])
        print(f"\nreport: {(out / 'report.html').resolve()}")
    finish_processes(state)
    return 0
