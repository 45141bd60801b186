"""``sparsediff demo``: dense vs sparse attention on the embedded trained video model, fully offline.

By default it loads the embedded text-to-video model that ships inside the package
(:func:`sparsediff.embedded.load_embedded_pipeline`, a small Wan transformer trained by sparsediff on
procedural clips of coloured shapes), generates every prompt twice with the same seed -- dense, then with
sparse attention (the Wan family default plan, or ``--plan``) -- at the size the model was trained for, and
writes to the output folder:

* ``dense_<i>.mp4`` / ``sparse_<i>.mp4`` per prompt (``.gif`` when imageio-ffmpeg is missing, or with
  ``--format gif``),
* ``strip.png``: a labelled side-by-side strip, per prompt one row each for dense, sparse and the
  amplified difference, frames left to right,
* ``summary.json`` and ``summary.txt``: the plan, attention density per layer, seconds per denoising step
  (dense and sparse), time spent in attention operators (dense and sparse, from ``torch.profiler`` on a
  second, profiled run of each), PSNR / SSIM / temporal PSNR of the sparse video against the dense one
  (:mod:`sparsediff.metrics`).

``--model random-wan`` runs a tiny random-init ``WanPipeline`` instead (no text encoder: seeded prompt
embeddings; noise-like videos that show the machinery, not quality); ``--model PATH`` loads a folder
exported by the embedded model's trainer. Existing files are never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["main", "build_demo_pipeline", "run_demo", "DEFAULT_PROMPTS"]

logger = logging.getLogger(__name__)

#: Prompts of the embedded model's caption grammar (one row each in the strip).
DEFAULT_PROMPTS = ("a red circle moving right", "a cyan square moving up quickly")
OUTPUT_STEMS = ("dense", "sparse", "strip", "summary")
#: Attention operators whose time the profiled runs add up (dense SDPA -- self and cross attention -- and
#: the sparse op; the sparse run still calls SDPA for its dense layers/steps and for cross-attention).
ATTENTION_OPS = ("aten::scaled_dot_product_attention", "sparsediff::block_sparse_attn")


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
        else:
            from .embedded import load_embedded_pipeline

            path = None if which == "embedded" else which
            self.pipe = load_embedded_pipeline(path, device=device)
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

    def call_kwargs(self, prompt: str, seed: int) -> dict[str, Any]:
        if self.which == "random-wan":
            # no text encoder: seeded embeddings stand in for the prompt (its text seeds them)
            g = torch.Generator("cpu").manual_seed(seed + sum(map(ord, prompt)))
            return {
                "prompt_embeds": torch.randn(1, 16, 64, generator=g).to(self.device),
                "negative_prompt_embeds": torch.randn(1, 16, 64, generator=g).to(self.device),
            }
        return {"prompt": prompt}


def _attention_ms(prof: Any) -> float:
    """Milliseconds of CPU time in the top-level attention operators of a profiled run."""
    total = 0.0
    for ev in prof.key_averages():
        if ev.key in ATTENTION_OPS:
            total += ev.cpu_time_total / 1e3
    return total


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
) -> dict[str, Any]:
    """Generate dense and sparse for each prompt, write videos, strip and summary into ``out_dir``; return
    the summary dict (what ``summary.json`` holds)."""
    from . import __version__
    from .api import enable_sparse_attention
    from .metrics import video_metrics

    m = _Model(model, device)
    pipe = m.pipe
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    steps = steps or m.steps
    sizes = dict(m.sizes)
    for key, val in (("num_frames", frames), ("height", height), ("width", width)):
        if val is not None:
            sizes[key] = int(val)
    guidance = m.guidance if guidance_scale is None else float(guidance_scale)

    def generate(prompt: str, label: str, profile: bool = False) -> tuple[np.ndarray, float, float | None]:
        if progress:
            print(f"[sparsediff demo] {label}: {prompt!r}, {steps} steps", file=sys.stderr, flush=True)
        stamps = [time.perf_counter()]

        def on_step_end(pipe_, i, t, kwargs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return {}

        call = dict(
            **m.call_kwargs(prompt, seed),
            **sizes,
            num_inference_steps=steps,
            guidance_scale=guidance,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=on_step_end,
        )
        attn = None
        with torch.no_grad():
            if profile:
                from torch.profiler import ProfilerActivity
                from torch.profiler import profile as tprofile

                with tprofile(activities=[ProfilerActivity.CPU]) as prof:
                    out = pipe(**call).frames[0]
                attn = _attention_ms(prof)
            else:
                out = pipe(**call).frames[0]
        # denoising time only (decoding after the last step is not counted)
        return np.asarray(out, dtype=np.float32), stamps[-1] - stamps[0], attn

    handle_kwargs: dict[str, Any] = {"backend": backend}
    if block_size is not None:
        handle_kwargs["block_size"] = block_size
    results: list[dict[str, Any]] = []
    dense_videos = []
    t_dense = []
    attn_dense = []
    for i, p in enumerate(prompts):
        generate(p, "warm-up (not timed)") if i == 0 else None
        v, t, _ = generate(p, "dense")
        _, _, a = generate(p, "dense, profiled", profile=True)
        dense_videos.append(v)
        t_dense.append(t)
        attn_dense.append(a)
    handle = enable_sparse_attention(pipe, plan, **handle_kwargs)
    try:
        sparse_videos, t_sparse, attn_sparse = [], [], []
        for p in prompts:
            v, t, _ = generate(p, "sparse")
            _, _, a = generate(p, "sparse, profiled", profile=True)
            sparse_videos.append(v)
            t_sparse.append(t)
            attn_sparse.append(a)
        dens = handle.densities()["transformer"]
        plan_summary = handle.states["transformer"].plan.summary()
    finally:
        handle.disable()

    strip_rows = []
    for i, p in enumerate(prompts):
        q = video_metrics(sparse_videos[i], dense_videos[i])
        dpath = _write_video(dense_videos[i], out_dir / f"dense_{i}", fmt)
        spath = _write_video(sparse_videos[i], out_dir / f"sparse_{i}", fmt)
        diff = np.clip(np.abs(sparse_videos[i] - dense_videos[i]) * 4.0, 0, 1)
        strip_rows += [
            (f"{p}\ndense", dense_videos[i]),
            (f"{p}\nsparse  PSNR {q.psnr:.1f} dB  SSIM {q.ssim:.3f}", sparse_videos[i]),
            ("|sparse - dense| x 4", diff),
        ]
        results.append(
            {
                "prompt": p,
                "files": {"dense": dpath.name, "sparse": spath.name},
                "psnr_db": q.psnr,
                "ssim": q.ssim,
                "temporal_psnr_db": q.temporal_psnr,
                "seconds_per_step": {"dense": t_dense[i] / steps, "sparse": t_sparse[i] / steps},
                "attention_ms": {"dense": attn_dense[i], "sparse": attn_sparse[i]},
            }
        )
    _strip(strip_rows, out_dir / "strip.png")
    mean_density = sum(dens.values()) / len(dens) if dens else 1.0

    def mean(key: str, sub: str | None = None) -> float:
        vals = [r[key][sub] if sub else r[key] for r in results]
        return float(np.mean(vals))

    summary = {
        "model": m.description,
        "video": {**sizes, "steps": steps, "guidance_scale": guidance, "seed": seed},
        "plan": plan_summary,
        "block_size": block_size or 64,
        "density_per_layer": {str(k): round(v, 4) for k, v in sorted(dens.items())},
        "mean_density_sparse_layers": round(mean_density, 4),
        "seconds_per_step": {
            "dense": mean("seconds_per_step", "dense"),
            "sparse": mean("seconds_per_step", "sparse"),
        },
        "attention_ms_per_video": {
            "dense": mean("attention_ms", "dense"),
            "sparse": mean("attention_ms", "sparse"),
        },
        "psnr_sparse_vs_dense_db": mean("psnr_db"),
        "ssim_sparse_vs_dense": mean("ssim"),
        "prompts": results,
        "strip": "strip.png",
        "device": device,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "versions": {"sparsediff": __version__, "torch": torch.__version__},
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    sps = summary["seconds_per_step"]
    att = summary["attention_ms_per_video"]
    lines = [
        f"sparsediff demo: {m.description}",
        f"video {sizes['num_frames']}x{sizes['height']}x{sizes['width']}, {steps} steps, CFG {guidance}, seed {seed}, "
        f"{len(prompts)} prompt(s)",
        f"plan: {plan_summary} (block {summary['block_size']})",
        f"attention density (sparse layers): mean {mean_density:.3f}; "
        + ", ".join(f"L{k} {v:.2f}" for k, v in sorted(dens.items())),
        f"time per step: dense {sps['dense']:.3f} s, sparse {sps['sparse']:.3f} s ({device})",
        f"attention ops per video: dense {att['dense']:.0f} ms, sparse {att['sparse']:.0f} ms",
    ]
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
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for p in clash:
            p.unlink()
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
    )
    print((out_dir / "summary.txt").read_text(), end="")
    print(f"written to {out_dir.resolve()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
