"""``sparsediff demo``: dense vs sparse attention on the embedded trained video model, fully offline.

By default it loads the embedded text-to-video model that ships inside the package
(:func:`sparsediff.embedded.load_embedded_pipeline`, a small Wan transformer trained by sparsediff on
procedural clips of coloured shapes), generates every (prompt, seed) twice -- dense, then with
sparse attention (the per-head plan searched for the model and shipped with it,
``weights/sparse_plan.json``; the Wan family default plan when a model folder has none; or ``--plan``) --
at the model's default size (16 x 64 x 64 px = 4096 tokens for the shipped model: a size where attention is
most of a denoising step, as in the video models users run), and writes to the output folder:

* ``dense_<i>.mp4`` / ``sparse_<i>.mp4`` per (prompt, seed) (``.gif`` when imageio-ffmpeg is missing, or with
  ``--format gif``),
* ``strip.png``: a labelled side-by-side strip, per prompt one row each for dense, sparse and the
  amplified difference, frames left to right,
* ``summary.json`` and ``summary.txt``: the plan, attention density per layer, seconds per denoising step
  and per whole generation (dense and sparse, and their ratio), the time spent in attention operators
  (dense SDPA -- self and cross attention -- and the sparse op, timed in the same runs by
  :class:`AttentionTimer`, no second run) and their share of a dense step, PSNR / SSIM / temporal PSNR of
  the sparse video against the dense one (:mod:`sparsediff.metrics`), and for the embedded model the
  colour / direction checks of both videos (:mod:`sparsediff.embedded.checks`).

``--model random-wan`` runs a tiny random-init ``WanPipeline`` instead (no text encoder: seeded prompt
embeddings; noise-like videos that show the machinery, not quality); ``--model PATH`` loads a folder
exported by the embedded model's trainer. Existing files are never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cli_args import (
    InputError,
    Parser,
    add_output_args,
    add_seeds_arg,
    add_threads_arg,
    add_video_args,
    apply_threads,
    fail,
    read_prompts_file,
)
from .loading import random_wan_pipeline
from .media import save_strip, write_video
from .metrics import strict_json
from .timing import ATTENTION_OPS, AttentionTimer, GenerationClock  # noqa: F401  (AttentionTimer re-exported)

__all__ = ["main", "build_demo_pipeline", "run_demo", "DEFAULT_PROMPTS", "AttentionTimer"]

logger = logging.getLogger(__name__)

#: Prompts of the embedded model's caption grammar (one row each in the strip).
DEFAULT_PROMPTS = ("a red circle moving right", "a cyan square moving up quickly")
OUTPUT_STEMS = ("dense", "sparse", "strip", "summary")


PROG = "sparsediff demo"

#: The tiny random-init Wan of ``--model random-wan`` (kept under its old name).
build_demo_pipeline = random_wan_pipeline


class DemoInputError(InputError):
    """An input of the demo is wrong (raised before anything is generated or written)."""


class _Model:
    """What the demo needs from a pipeline: how to call it for one prompt, and its description."""

    def __init__(self, which: str, device: str) -> None:
        self.which = which
        if which == "random-wan":
            self.pipe = random_wan_pipeline(device)
            self.description = (
                "tiny random-init Wan 2.1 (4 layers, 4 heads x 32): shows the machinery, not quality"
            )
            self.sizes = {"num_frames": 33, "height": 128, "width": 128}
            self.guidance = 5.0
            self.steps = 8
            self.shipped_plan = None
        else:
            from .embedded import load_embedded_pipeline, shipped_plan_path

            path = None if which == "embedded" else which
            self.pipe = load_embedded_pipeline(path, device=device)
            self.shipped_plan = shipped_plan_path(path)
            cfg = self.pipe.config
            t = self.pipe.transformer.config
            self.description = (
                f"embedded trained text-to-video Wan ({t.num_layers} layers, {t.num_attention_heads} heads x "
                f"{t.attention_head_dim}, pixel space, patch {tuple(t.patch_size)})"
            )
            self.sizes = {
                "num_frames": int(cfg.sample_num_frames),
                "height": int(cfg.sample_height),
                "width": int(cfg.sample_width),
            }
            self.guidance = 4.0
            self.steps = 20
        self.device = device

    def tokens(self, sizes: dict[str, int]) -> int:
        """Self-attention tokens of a video of ``sizes`` (after the VAE and the patch embedding)."""
        t = self.pipe.transformer.config
        pt, ph, pw = t.patch_size
        if self.which == "random-wan":  # Wan VAE: 4x temporal (first frame alone), 8x spatial
            f, h, w = (sizes["num_frames"] - 1) // 4 + 1, sizes["height"] // 8, sizes["width"] // 8
        else:  # pixel space
            f, h, w = sizes["num_frames"], sizes["height"], sizes["width"]
        return (f // pt) * (h // ph) * (w // pw)

    def call_kwargs(self, prompt: str, seed: int) -> dict[str, Any]:
        if self.which == "random-wan":
            # no text encoder: seeded embeddings stand in for the prompt (its text seeds them)
            g = torch.Generator("cpu").manual_seed(seed + sum(map(ord, prompt)))
            return {
                "prompt_embeds": torch.randn(1, 16, 64, generator=g).to(self.device),
                "negative_prompt_embeds": torch.randn(1, 16, 64, generator=g).to(self.device),
            }
        return {"prompt": prompt}


def _resolve(m: _Model, steps, frames, height, width, guidance_scale) -> tuple[int, dict[str, int], float]:
    """Steps, video sizes and guidance: the given ones, else the model's defaults; checked."""
    steps = m.steps if steps is None else int(steps)
    if steps < 1:
        raise DemoInputError(f"--steps must be >= 1, got {steps}")
    sizes = dict(m.sizes)
    for key, val in (("num_frames", frames), ("height", height), ("width", width)):
        if val is not None:
            if int(val) < 1:
                raise DemoInputError(f"--{'frames' if key == 'num_frames' else key} must be >= 1, got {val}")
            sizes[key] = int(val)
    return steps, sizes, m.guidance if guidance_scale is None else float(guidance_scale)


def _check_plan(m: _Model, plan: str | None, handle_kwargs: dict[str, Any]) -> tuple[str | None, str]:
    """The plan to run and where it came from; a plan that does not fit the model fails here, in seconds,
    before anything is generated or written."""
    from .api import enable_sparse_attention
    from .plan import ADAPTER_WEIGHTS_FILE

    if plan is not None:
        source = f"--plan {plan}"
        if Path(plan).is_dir() and (Path(plan) / ADAPTER_WEIGHTS_FILE).is_file():
            source += " with its LoRA adapter"
    elif m.shipped_plan is not None:
        plan, source = m.shipped_plan, "searched plan shipped with the model"
    else:
        source = "model family default"
    try:
        enable_sparse_attention(m.pipe, plan, **handle_kwargs).disable()
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise DemoInputError(f"--plan {plan}: {e}") from e
    return plan, source


def _generate(m: _Model, prompt: str, seed: int, call: dict[str, Any], label: str, progress: bool) -> dict:
    """One timed generation (``call``: sizes, steps, guidance)."""
    if progress:
        print(
            f"[{PROG}] {label}: {prompt!r}, seed {seed}, {call['num_inference_steps']} steps",
            file=sys.stderr,
            flush=True,
        )
    clock = GenerationClock(m.pipe, cuda=m.device.startswith("cuda"))
    kwargs = dict(
        **m.call_kwargs(prompt, seed),
        **call,
        output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
        callback_on_step_end=clock.on_step_end,
    )
    with torch.no_grad(), clock:
        out = m.pipe(**kwargs).frames[0]
    return {
        "video": np.asarray(out, dtype=np.float32),
        "seconds_per_step": clock.seconds_per_step,
        "seconds_total": clock.total,
        "attention_seconds": clock.attention.seconds,
        "attention_calls": clock.attention.calls,
    }


def _sample_record(i: int, prompt: str, seed: int, dense: dict, sparse: dict, q: Any, files: tuple) -> dict:
    return {
        "prompt": prompt,
        "seed": seed,
        "files": {"dense": files[0].name, "sparse": files[1].name},
        "psnr_db": q.psnr,
        "ssim": q.ssim,
        "temporal_psnr_db": q.temporal_psnr,
        "seconds_per_step": {"dense": dense["seconds_per_step"], "sparse": sparse["seconds_per_step"]},
        "seconds_total": {"dense": dense["seconds_total"], "sparse": sparse["seconds_total"]},
        "attention_ms": {
            "dense": dense["attention_seconds"] * 1e3,
            "sparse": sparse["attention_seconds"] * 1e3,
        },
    }


def _write_samples(out_dir: Path, pairs, dense: list, sparse: list, checks, fmt: str) -> list[dict]:
    """Videos, the strip and one record per (prompt, seed)."""
    from .metrics import video_metrics

    strip_rows: list[tuple[str, np.ndarray]] = []
    results: list[dict[str, Any]] = []
    for i, (p, seed) in enumerate(pairs):
        dv, sv = dense[i]["video"], sparse[i]["video"]
        q = video_metrics(sv, dv)
        files = (write_video(dv, out_dir / f"dense_{i}", fmt), write_video(sv, out_dir / f"sparse_{i}", fmt))
        head = p if len(pairs) == len({pp for pp, _ in pairs}) else f"{p} (seed {seed})"
        strip_rows += [
            (f"{head}\ndense", dv),
            (f"{head}\nsparse  PSNR {q.psnr:.1f} dB  SSIM {q.ssim:.3f}", sv),
            ("|sparse - dense| x 4", np.clip(np.abs(sv - dv) * 4.0, 0, 1)),
        ]
        rec = _sample_record(i, p, seed, dense[i], sparse[i], q, files)
        if checks is not None:
            rec["checks"] = {
                name: {
                    "colour_ok": bool(c.results[i].colour_ok),
                    "direction_ok": bool(c.results[i].direction_ok),
                }
                for name, c in checks.items()
            }
        results.append(rec)
    save_strip(strip_rows, out_dir / "strip.png", n_frames=8)
    return results


def run_demo(
    out_dir: Path,
    *,
    model: str = "embedded",
    prompts: tuple[str, ...] | list[str] = DEFAULT_PROMPTS,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int | None = None,
    seeds: tuple[int, ...] | list[int] = (0,),
    plan: str | None = None,
    guidance_scale: float | None = None,
    fmt: str = "mp4",
    device: str = "cpu",
    backend: str = "auto",
    block_size: int | None = None,
    progress: bool = True,
    replace: tuple[Path, ...] | list[Path] = (),
) -> dict[str, Any]:
    """Generate dense and sparse for each (prompt, seed), write videos, strip and summary into ``out_dir``;
    return the summary dict (what ``summary.json`` holds). ``seed`` (one seed) is the older spelling of
    ``seeds``. ``replace``: existing files to delete once the inputs are checked (``--overwrite``).

    ``plan`` None: the plan shipped with the model folder (:func:`sparsediff.embedded.shipped_plan_path`),
    else the model family's default. Steps, sizes and the plan are checked before any generation
    (:class:`DemoInputError`).
    """
    from .api import enable_sparse_attention

    seeds = [int(seed)] if seed is not None else [int(x) for x in seeds]
    if not prompts or not seeds:
        raise DemoInputError("no prompts" if not prompts else "no seeds")
    m = _Model(model, device)
    m.pipe.set_progress_bar_config(disable=not progress, leave=False)
    steps, sizes, guidance = _resolve(m, steps, frames, height, width, guidance_scale)
    handle_kwargs: dict[str, Any] = {"backend": backend}
    if block_size is not None:
        handle_kwargs["block_size"] = block_size
    plan, plan_source = _check_plan(m, plan, handle_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in replace:
        old.unlink(missing_ok=True)

    pairs = [(p, s) for p in prompts for s in seeds]
    call = {**sizes, "num_inference_steps": steps, "guidance_scale": guidance}
    # Warm-up (not timed): one short dense call at the demo size (allocator, thread pools, lazy imports).
    _generate(
        m, pairs[0][0], pairs[0][1], {**call, "num_inference_steps": 1}, "warm-up (not timed)", progress
    )
    dense = [_generate(m, p, s, call, "dense", progress) for p, s in pairs]
    handle = enable_sparse_attention(m.pipe, plan, **handle_kwargs)
    try:
        sparse = [_generate(m, p, s, call, "sparse", progress) for p, s in pairs]
        dens = handle.densities()["transformer"]
        plan_summary = handle.states["transformer"].plan.summary()
    finally:
        handle.disable()
    checks = None
    if m.which != "random-wan":
        from .embedded import checks as _checks

        checks = {
            name: _checks.check_videos([r["video"] for r in runs], [p for p, _ in pairs])
            for name, runs in (("dense", dense), ("sparse", sparse))
        }
    results = _write_samples(out_dir, pairs, dense, sparse, checks, fmt)
    info = {"sizes": sizes, "steps": steps, "guidance": guidance, "seeds": seeds, "plan_summary": plan_summary,
            "plan_source": plan_source, "block_size": block_size, "dens": dens, "n_prompts": len(prompts)}  # fmt: skip
    summary = _summary(m, results, checks, info)
    summary["json_notes"] = (
        "non-finite numbers are written as null (PSNR null with SSIM 1.0: identical videos)"
    )
    (out_dir / "summary.json").write_text(json.dumps(strict_json(summary), indent=1, default=str) + "\n")
    (out_dir / "summary.txt").write_text("\n".join(_summary_lines(summary, m, checks)) + "\n")
    return summary


def _summary(m: _Model, results: list[dict], checks, info: dict[str, Any]) -> dict[str, Any]:
    from . import __version__

    def mean(key: str, sub: str | None = None) -> float:
        return float(np.mean([r[key][sub] if sub else r[key] for r in results]))

    dens, steps, sizes = info["dens"], info["steps"], info["sizes"]
    sps = {k: mean("seconds_per_step", k) for k in ("dense", "sparse")}
    tot = {k: mean("seconds_total", k) for k in ("dense", "sparse")}
    att = {k: mean("attention_ms", k) for k in ("dense", "sparse")}
    dense_denoise_ms = sps["dense"] * steps * 1e3
    return {
        "model": m.description,
        "video": {
            **sizes,
            "tokens": m.tokens(sizes),
            "steps": steps,
            "guidance_scale": info["guidance"],
            "seeds": info["seeds"],
        },  # fmt: skip
        "plan": info["plan_summary"],
        "plan_source": info["plan_source"],
        "block_size": info["block_size"] or 64,
        "density_per_layer": {str(k): round(v, 4) for k, v in sorted(dens.items())},
        "mean_density_sparse_layers": round(sum(dens.values()) / len(dens) if dens else 1.0, 4),
        "seconds_per_step": sps,
        "speedup_per_step": sps["dense"] / sps["sparse"],
        "seconds_per_generation": tot,
        "speedup_per_generation": tot["dense"] / tot["sparse"],
        "attention_ms_per_video": att,
        "attention_share_of_dense_step": min(1.0, att["dense"] / max(dense_denoise_ms, 1e-9)),
        "attention_speedup": att["dense"] / max(att["sparse"], 1e-9),
        "psnr_sparse_vs_dense_db": mean("psnr_db"),
        "ssim_sparse_vs_dense": mean("ssim"),
        "checks": None
        if checks is None
        else {k: {"colour": c.colour_rate, "direction": c.direction_rate} for k, c in checks.items()},
        "prompts": results,
        "n_prompts": info["n_prompts"],
        "strip": "strip.png",
        "device": m.device,
        "threads": torch.get_num_threads() if m.device == "cpu" else None,
        "versions": {"sparsediff": __version__, "torch": torch.__version__},
    }


def _summary_lines(s: dict[str, Any], m: _Model, checks) -> list[str]:
    v, sps, tot, att = (
        s["video"],
        s["seconds_per_step"],
        s["seconds_per_generation"],
        s["attention_ms_per_video"],
    )
    dens = s["density_per_layer"]
    lines = [
        f"{PROG}: {m.description}",
        f"video {v['num_frames']}x{v['height']}x{v['width']} ({v['tokens']} tokens), {v['steps']} steps, CFG "
        f"{v['guidance_scale']}, seeds {v['seeds']}, {s['n_prompts']} prompt(s), {s['device']}"
        + (f", {s['threads']} thread(s)" if s["threads"] else ""),
        f"plan ({s['plan_source']}): {s['plan']} (block {s['block_size']})",
        f"attention density (sparse layers): mean {s['mean_density_sparse_layers']:.3f}; "
        + ", ".join(f"L{k} {d:.2f}" for k, d in dens.items()),
        f"time per denoising step: dense {sps['dense']:.3f} s, sparse {sps['sparse']:.3f} s "
        f"-> {s['speedup_per_step']:.2f}x faster",
        f"time per generation (text encoding, {v['steps']} steps, decoding): dense {tot['dense']:.2f} s, sparse "
        f"{tot['sparse']:.2f} s -> {s['speedup_per_generation']:.2f}x faster",
        f"attention ops: {s['attention_share_of_dense_step']:.0%} of a dense step; per video dense "
        f"{att['dense']:.0f} ms, sparse {att['sparse']:.0f} ms ({s['attention_speedup']:.2f}x)",
        f"quality of sparse vs dense (mean over prompts and seeds): PSNR {s['psnr_sparse_vs_dense_db']:.2f} dB, "
        f"SSIM {s['ssim_sparse_vs_dense']:.3f}",
    ]
    if checks is not None:
        lines.append(
            "checks (colour right / direction right): "
            + "; ".join(f"{k} {c.colour_rate:.0%} / {c.direction_rate:.0%}" for k, c in checks.items())
        )
    for r in s["prompts"]:
        lines.append(
            f"{r['prompt']!r} seed {r['seed']}: PSNR {r['psnr_db']:.2f} dB, SSIM {r['ssim']:.3f} vs dense "
            f"({r['files']['dense']}, {r['files']['sparse']})"
        )
    lines.append("strip: strip.png (dense / sparse / difference x 4 per prompt and seed)")
    return lines


def _existing_outputs(out_dir: Path) -> list[Path]:
    if not out_dir.exists():
        return []
    return sorted(p for p in out_dir.iterdir() if p.stem.split("_")[0] in OUTPUT_STEMS)


def build_parser() -> argparse.ArgumentParser:
    import torch

    p = Parser(
        prog=PROG, description="Dense vs sparse attention on the embedded trained video model (offline)."
    )
    p.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (default: the trained model shipped in the package), 'random-wan' (a tiny random-init "
        "WanPipeline: machinery only), or a folder exported by the embedded model's trainer",
    )
    p.add_argument(
        "--prompt", action="append", help="a prompt (repeatable; default: two prompts of the model's grammar)"
    )
    p.add_argument(
        "--prompts", metavar="FILE", help="text file, one prompt per line (# comments, blank lines skipped)"
    )
    add_seeds_arg(p, help="one dense and one sparse video per (prompt, seed) (default: 0)")
    add_video_args(
        p,
        steps_default="20; random-wan 8",
        size_default="the model's trained size",
        guidance_default="4; random-wan 5",
    )
    p.add_argument(
        "--plan",
        default=None,
        help="pattern name, plan JSON or plan folder (sparsediff finetune: plan + LoRA) "
        "(default: the plan shipped with the model)",
    )
    p.add_argument("--block-size", type=int, help="block size of the sparse masks (default 64)")
    p.add_argument(
        "--format", choices=("mp4", "gif"), default="mp4", help="video format (GIF without ffmpeg)"
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="device (default: cuda if available)",
    )
    p.add_argument(
        "--backend", choices=("auto", "triton", "reference"), default="auto", help="sparse op backend"
    )
    add_output_args(p, out_help="output folder (default: ./sparsediff-demo)", out_default="sparsediff-demo")
    add_threads_arg(p)
    return p


def _check_args(args: argparse.Namespace) -> tuple[list[str], list[Path]]:
    """Every input that can be checked without the model: prompts, model, plan path, output folder.
    Returns the prompts and the existing outputs to replace."""
    prompts = list(args.prompt or []) + (read_prompts_file(args.prompts) if args.prompts else [])
    prompts = [q.strip() for q in prompts if q.strip()]
    if args.prompts and not prompts:
        raise DemoInputError(f"--prompts {args.prompts} holds no prompts")
    if args.model == "embedded":
        from .embedded import has_trained_weights

        if not has_trained_weights():
            raise DemoInputError(
                "the embedded model's weights are not in this installation; "
                "run with --model random-wan, or --model PATH for an exported folder"
            )
    elif args.model != "random-wan" and not Path(args.model).is_dir():
        raise DemoInputError(f"--model {args.model!r} is neither 'embedded', 'random-wan' nor a folder")
    plan = args.plan
    if (
        plan is not None
        and (plan.endswith(".json") or "/" in plan or "\\" in plan)
        and not Path(plan).is_file()
        and not Path(plan).is_dir()
    ):
        raise DemoInputError(f"--plan {plan}: plan file not found")
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise DemoInputError(f"--out {out_dir} is a file, not a folder")
    clash = _existing_outputs(out_dir)
    if clash and not args.overwrite:
        raise DemoInputError(
            f"{out_dir} already holds {', '.join(p.name for p in clash)}; "
            "pass --overwrite to replace them or choose another --out"
        )
    return prompts or list(DEFAULT_PROMPTS), clash


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args.threads)
    out_dir = Path(args.out)
    try:
        prompts, clash = _check_args(args)
        run_demo(
            out_dir, model=args.model, prompts=prompts, steps=args.steps, frames=args.frames,
            height=args.height, width=args.width, seeds=args.seeds, plan=args.plan,
            guidance_scale=args.guidance_scale, fmt=args.format, device=args.device, backend=args.backend,
            block_size=args.block_size, progress=not args.no_progress, replace=clash if args.overwrite else (),
        )  # fmt: skip
    except InputError as e:
        return fail(PROG, e)
    print((out_dir / "summary.txt").read_text(), end="")
    print(f"written to {out_dir.resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
