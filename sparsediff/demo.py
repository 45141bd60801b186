"""``sparsediff demo``: dense vs sparse attention on the embedded trained video model, fully offline.

By default it loads the embedded text-to-video model that ships inside the package
(:func:`sparsediff.embedded.load_embedded_pipeline`, a small Wan transformer trained by sparsediff on
procedural clips of coloured shapes), generates every prompt twice with the same seed -- dense, then with
sparse attention (the per-head plan searched for the model and shipped with it,
``weights/sparse_plan.json``; the Wan family default plan when a model folder has none; or ``--plan``) --
at the model's default size (16 x 64 x 64 px = 4096 tokens for the shipped model: a size where attention is
most of a denoising step, as in the video models users run), and writes to the output folder:

* ``dense_<i>.mp4`` / ``sparse_<i>.mp4`` per prompt (``.gif`` when imageio-ffmpeg is missing, or with
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

from .timing import ATTENTION_OPS, AttentionTimer, GenerationClock  # noqa: F401  (AttentionTimer re-exported)

__all__ = ["main", "build_demo_pipeline", "run_demo", "DEFAULT_PROMPTS", "AttentionTimer"]

logger = logging.getLogger(__name__)

#: Prompts of the embedded model's caption grammar (one row each in the strip).
DEFAULT_PROMPTS = ("a red circle moving right", "a cyan square moving up quickly")
OUTPUT_STEMS = ("dense", "sparse", "strip", "summary")


class DemoInputError(ValueError):
    """An input of the demo is wrong (raised before anything is generated or written)."""


def build_demo_pipeline(device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny random-init ``WanPipeline`` (4 layers, 4 heads x 32, text dim 64), built offline."""
    from diffusers import (
        AutoencoderKLWan,
        FlowMatchEulerDiscreteScheduler,
        WanPipeline,
        WanTransformer3DModel,
    )

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        text_dim=64,
        freq_dim=64,
        ffn_dim=256,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=256,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=transformer,
    )
    for c in pipe.components.values():
        if isinstance(c, torch.nn.Module):
            c.eval()
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def _write_video(frames: Any, path_stem: Path, fmt: str, fps: int = 8) -> Path:
    import imageio.v2 as imageio

    arr = (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)
    if fmt == "mp4":
        try:
            import imageio_ffmpeg  # noqa: F401

            path = path_stem.with_suffix(".mp4")
            imageio.mimwrite(path, list(arr), fps=fps, macro_block_size=1)
            return path
        except Exception as e:  # no ffmpeg binary: fall back to gif, visibly
            logger.warning("mp4 writing failed (%s: %s); writing a GIF instead", type(e).__name__, e)
    path = path_stem.with_suffix(".gif")
    imageio.mimwrite(path, list(arr), duration=1.0 / fps, loop=0)
    return path


def _strip(rows: list[tuple[str, np.ndarray]], path: Path, max_frames: int = 8) -> None:
    """Labelled strip PNG: one row per ``(label, video [F, H, W, 3] in [0, 1])``, up to ``max_frames`` evenly
    spaced frames, nearest-upscaled so that small videos are visible."""
    from PIL import Image, ImageDraw

    F, H, W, _ = rows[0][1].shape
    scale = max(1, min(4, 128 // max(H, W)))
    sel = np.linspace(0, F - 1, min(max_frames, F)).round().astype(int)
    label_w, gap = 260, 3
    cw, ch = W * scale, H * scale
    canvas = Image.new("RGB", (label_w + len(sel) * (cw + gap), len(rows) * (ch + gap) + gap), (32, 32, 32))
    draw = ImageDraw.Draw(canvas)
    for r, (label, video) in enumerate(rows):
        y = gap + r * (ch + gap)
        for j, fi in enumerate(sel):
            img = (np.clip(video[fi], 0, 1) * 255).round().astype(np.uint8)
            tile = Image.fromarray(img).resize((cw, ch), Image.NEAREST)
            canvas.paste(tile, (label_w + j * (cw + gap), y))
        for li, line in enumerate(label.split("\n")):
            draw.text((6, y + 4 + 14 * li), line, fill=(235, 235, 235))
    canvas.save(path)


class _Model:
    """What the demo needs from a pipeline: how to call it for one prompt, and its description."""

    def __init__(self, which: str, device: str) -> None:
        self.which = which
        if which == "random-wan":
            self.pipe = build_demo_pipeline(device)
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


def run_demo(
    out_dir: Path,
    *,
    model: str = "embedded",
    prompts: tuple[str, ...] | list[str] = DEFAULT_PROMPTS,
    steps: int | None = None,
    frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    plan: str | None = None,
    guidance_scale: float | None = None,
    fmt: str = "mp4",
    device: str = "cpu",
    backend: str = "auto",
    block_size: int | None = None,
    progress: bool = True,
    replace: tuple[Path, ...] | list[Path] = (),
) -> dict[str, Any]:
    """Generate dense and sparse for each prompt, write videos, strip and summary into ``out_dir``; return
    the summary dict (what ``summary.json`` holds). ``replace``: existing files to delete once the inputs
    are checked (``--overwrite``).

    ``plan`` None: the plan shipped with the model folder (:func:`sparsediff.embedded.shipped_plan_path`),
    else the model family's default. The plan is checked against the model before any generation.
    """
    from . import __version__
    from .api import enable_sparse_attention
    from .metrics import video_metrics

    m = _Model(model, device)
    pipe = m.pipe
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    steps = steps or m.steps
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sizes = dict(m.sizes)
    for key, val in (("num_frames", frames), ("height", height), ("width", width)):
        if val is not None:
            sizes[key] = int(val)
    guidance = m.guidance if guidance_scale is None else float(guidance_scale)
    if plan is not None:
        plan_source = f"--plan {plan}"
    elif m.shipped_plan is not None:
        plan, plan_source = m.shipped_plan, "searched plan shipped with the model"
    else:
        plan_source = "model family default"
    handle_kwargs: dict[str, Any] = {"backend": backend}
    if block_size is not None:
        handle_kwargs["block_size"] = block_size
    # A plan that does not fit the model fails here, in seconds, before anything is generated or written.
    try:
        enable_sparse_attention(pipe, plan, **handle_kwargs).disable()
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise DemoInputError(f"--plan {plan}: {e}") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in replace:
        old.unlink(missing_ok=True)

    def generate(prompt: str, label: str, n_steps: int = steps) -> dict[str, Any]:
        if progress:
            print(f"[sparsediff demo] {label}: {prompt!r}, {n_steps} steps", file=sys.stderr, flush=True)
        clock = GenerationClock(pipe, cuda=device.startswith("cuda"))
        call = dict(
            **m.call_kwargs(prompt, seed),
            **sizes,
            num_inference_steps=n_steps,
            guidance_scale=guidance,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=clock.on_step_end,
        )
        with torch.no_grad(), clock:
            out = pipe(**call).frames[0]
        timer = clock.attention
        total, per_step = clock.total, clock.seconds_per_step
        return {
            "video": np.asarray(out, dtype=np.float32),
            "seconds_per_step": per_step,
            "seconds_total": total,
            "attention_seconds": timer.seconds,
            "attention_calls": timer.calls,
        }

    # Warm-up (not timed): one short dense call at the demo size (allocator, thread pools, lazy imports).
    generate(prompts[0], "warm-up (not timed)", n_steps=1)
    dense = [generate(p, "dense") for p in prompts]
    handle = enable_sparse_attention(pipe, plan, **handle_kwargs)
    try:
        sparse = [generate(p, "sparse") for p in prompts]
        dens = handle.densities()["transformer"]
        plan_summary = handle.states["transformer"].plan.summary()
    finally:
        handle.disable()

    checks = None
    if m.which != "random-wan":
        from .embedded import checks as _checks

        checks = {
            name: _checks.check_videos([r["video"] for r in runs], list(prompts))
            for name, runs in (("dense", dense), ("sparse", sparse))
        }

    strip_rows = []
    results: list[dict[str, Any]] = []
    for i, p in enumerate(prompts):
        dv, sv = dense[i]["video"], sparse[i]["video"]
        q = video_metrics(sv, dv)
        dpath = _write_video(dv, out_dir / f"dense_{i}", fmt)
        spath = _write_video(sv, out_dir / f"sparse_{i}", fmt)
        diff = np.clip(np.abs(sv - dv) * 4.0, 0, 1)
        strip_rows += [
            (f"{p}\ndense", dv),
            (f"{p}\nsparse  PSNR {q.psnr:.1f} dB  SSIM {q.ssim:.3f}", sv),
            ("|sparse - dense| x 4", diff),
        ]
        rec: dict[str, Any] = {
            "prompt": p,
            "files": {"dense": dpath.name, "sparse": spath.name},
            "psnr_db": q.psnr,
            "ssim": q.ssim,
            "temporal_psnr_db": q.temporal_psnr,
            "seconds_per_step": {
                "dense": dense[i]["seconds_per_step"],
                "sparse": sparse[i]["seconds_per_step"],
            },
            "seconds_total": {"dense": dense[i]["seconds_total"], "sparse": sparse[i]["seconds_total"]},
            "attention_ms": {
                "dense": dense[i]["attention_seconds"] * 1e3,
                "sparse": sparse[i]["attention_seconds"] * 1e3,
            },
        }
        if checks is not None:
            rec["checks"] = {
                name: {
                    "colour_ok": bool(c.results[i].colour_ok),
                    "direction_ok": bool(c.results[i].direction_ok),
                }
                for name, c in checks.items()
            }
        results.append(rec)
    _strip(strip_rows, out_dir / "strip.png")
    mean_density = sum(dens.values()) / len(dens) if dens else 1.0

    def mean(key: str, sub: str | None = None) -> float:
        vals = [r[key][sub] if sub else r[key] for r in results]
        return float(np.mean(vals))

    sps = {k: mean("seconds_per_step", k) for k in ("dense", "sparse")}
    tot = {k: mean("seconds_total", k) for k in ("dense", "sparse")}
    att = {k: mean("attention_ms", k) for k in ("dense", "sparse")}
    dense_denoise_ms = sum(r["seconds_per_step"]["dense"] for r in results) / len(results) * steps * 1e3
    summary = {
        "model": m.description,
        "video": {
            **sizes,
            "tokens": m.tokens(sizes),
            "steps": steps,
            "guidance_scale": guidance,
            "seed": seed,
        },
        "plan": plan_summary,
        "plan_source": plan_source,
        "block_size": block_size or 64,
        "density_per_layer": {str(k): round(v, 4) for k, v in sorted(dens.items())},
        "mean_density_sparse_layers": round(mean_density, 4),
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
        "strip": "strip.png",
        "device": device,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "versions": {"sparsediff": __version__, "torch": torch.__version__},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    lines = [
        f"sparsediff demo: {m.description}",
        f"video {sizes['num_frames']}x{sizes['height']}x{sizes['width']} ({summary['video']['tokens']} tokens), "
        f"{steps} steps, CFG {guidance}, seed {seed}, {len(prompts)} prompt(s), {device}"
        + (f", {summary['threads']} thread(s)" if summary["threads"] else ""),
        f"plan ({summary['plan_source']}): {plan_summary} (block {summary['block_size']})",
        f"attention density (sparse layers): mean {mean_density:.3f}; "
        + ", ".join(f"L{k} {v:.2f}" for k, v in sorted(dens.items())),
        f"time per denoising step: dense {sps['dense']:.3f} s, sparse {sps['sparse']:.3f} s "
        f"-> {summary['speedup_per_step']:.2f}x faster",
        f"time per generation (text encoding, {steps} steps, decoding): dense {tot['dense']:.2f} s, sparse "
        f"{tot['sparse']:.2f} s -> {summary['speedup_per_generation']:.2f}x faster",
        f"attention ops: {summary['attention_share_of_dense_step']:.0%} of a dense step; per video dense "
        f"{att['dense']:.0f} ms, sparse {att['sparse']:.0f} ms ({summary['attention_speedup']:.2f}x)",
        f"quality of sparse vs dense (mean over prompts): PSNR {summary['psnr_sparse_vs_dense_db']:.2f} dB, "
        f"SSIM {summary['ssim_sparse_vs_dense']:.3f}",
    ]
    if checks is not None:
        lines.append(
            "checks (colour right / direction right): "
            + "; ".join(f"{k} {c.colour_rate:.0%} / {c.direction_rate:.0%}" for k, c in checks.items())
        )
    for r in results:
        lines.append(
            f"{r['prompt']!r}: PSNR {r['psnr_db']:.2f} dB, SSIM {r['ssim']:.3f} vs dense "
            f"({r['files']['dense']}, {r['files']['sparse']})"
        )
    lines.append("strip: strip.png (dense / sparse / difference x 4 per prompt)")
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    return summary


def _existing_outputs(out_dir: Path) -> list[Path]:
    if not out_dir.exists():
        return []
    return sorted(p for p in out_dir.iterdir() if p.stem.split("_")[0] in OUTPUT_STEMS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsediff demo",
        description="Dense vs sparse attention on the embedded trained video model (offline).",
    )
    parser.add_argument("--out", default="sparsediff-demo", help="output folder (default: ./sparsediff-demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing demo files in --out")
    parser.add_argument(
        "--model",
        default="embedded",
        help="'embedded' (default: the trained model shipped in the package), 'random-wan' (a tiny random-init "
        "WanPipeline: machinery only), or a folder exported by the embedded model's trainer",
    )
    parser.add_argument(
        "--prompt", action="append", help="a prompt (repeatable; default: two prompts of the model's grammar)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (default: 20; random-wan 8)")
    parser.add_argument("--frames", type=int, help="video frames (default: the model's trained size)")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--plan", default=None, help="pattern name or plan JSON (default: the Wan default)")
    parser.add_argument("--block-size", type=int, help="block size of the sparse masks (default 64)")
    parser.add_argument("--format", choices=("mp4", "gif"), default="mp4")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    out_dir = Path(args.out)
    clash = _existing_outputs(out_dir)
    if clash and not args.overwrite:
        print(
            f"sparsediff demo: {out_dir} already holds {', '.join(p.name for p in clash)}; "
            "pass --overwrite to replace them or choose another --out",
            file=sys.stderr,
        )
        return 2
    if args.model == "embedded":
        from .embedded import has_trained_weights

        if not has_trained_weights():
            print(
                "sparsediff demo: the embedded model's weights are not in this installation; "
                "run with --model random-wan, or --model PATH for an exported folder",
                file=sys.stderr,
            )
            return 2
    elif args.model != "random-wan" and not Path(args.model).is_dir():
        print(
            f"sparsediff demo: --model {args.model!r} is neither 'embedded', 'random-wan' nor a folder",
            file=sys.stderr,
        )
        return 2
    if args.steps is not None and args.steps < 1:
        print(f"sparsediff demo: --steps must be >= 1, got {args.steps}", file=sys.stderr)
        return 2
    try:
        run_demo(
            out_dir,
            model=args.model,
            prompts=args.prompt or DEFAULT_PROMPTS,
            steps=args.steps,
            frames=args.frames,
            height=args.height,
            width=args.width,
            seed=args.seed,
            plan=args.plan,
            guidance_scale=args.guidance_scale,
            fmt=args.format,
            device=args.device,
            backend=args.backend,
            block_size=args.block_size,
            progress=not args.no_progress,
            replace=clash if args.overwrite else (),
        )
    except DemoInputError as e:
        print(f"sparsediff demo: {e}", file=sys.stderr)
        return 2
    print((out_dir / "summary.txt").read_text(), end="")
    print(f"written to {out_dir.resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
