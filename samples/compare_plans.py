"""Quality vs speed of several sparse-attention plans on one pipeline, same prompts and seeds.

Generates every seed densely and with each plan, then reports per plan: mean attention density of the
sparse layers, wall time per denoising step, PSNR and SSIM of the video against the dense one. Writes
into ``--out``:

* ``report.md``      -- the table, the conditions (device, versions, sizes) and the command line;
* ``strip.png``      -- side-by-side frames: one row per plan (dense first), ``--strip-frames`` columns;
* ``<plan>_s<seed>.gif`` -- every generated video.

Runs offline on the embedded tiny video pipeline (``sparsediff.demo.build_demo_pipeline``; random-init
until the embedded model is trained, so it shows the machinery and the density/speed trade-off, not
visual quality). Example::

    python samples/compare_plans.py --out compare-out --plans radial tile topp --seeds 0 1

Existing output files are never overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import sparsediff
from sparsediff.demo import build_demo_pipeline

OUTPUTS = ("report.md", "strip.png", "results.json")


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two videos with values in [0, 1]."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 7) -> float:
    """Mean SSIM over frames and channels of two videos ``[F, H, W, C]`` in [0, 1] (uniform window)."""
    c1, c2 = 0.01**2, 0.03**2
    x = a.double().permute(0, 3, 1, 2)  # [F, C, H, W]
    y = b.double().permute(0, 3, 1, 2)
    w = min(window, x.shape[-1], x.shape[-2])
    if w % 2 == 0:
        w -= 1
    pool = lambda t: F.avg_pool2d(t, w, stride=1)
    mx, my = pool(x), pool(y)
    vx = pool(x * x) - mx * mx
    vy = pool(y * y) - my * my
    cxy = pool(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


def generate(pipe, seed: int, args, device: str) -> tuple[torch.Tensor, float]:
    """One video ``[F, H, W, C]`` in [0, 1] and the mean seconds per denoising step."""
    g = torch.Generator("cpu").manual_seed(1000 + seed)
    prompt = torch.randn(1, 16, 64, generator=g).to(device)
    negative = torch.randn(1, 16, 64, generator=g).to(device)
    stamps = [time.perf_counter()]

    def on_step_end(pipe_, i, t, kwargs):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return {}

    with torch.no_grad():
        frames = pipe(
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=args.height,
            width=args.width,
            num_frames=args.frames,
            num_inference_steps=args.steps,
            guidance_scale=5.0,
            output_type="np",
            generator=torch.Generator("cpu").manual_seed(seed),
            callback_on_step_end=on_step_end,
        ).frames[0]
    return torch.as_tensor(np.asarray(frames)), (stamps[-1] - stamps[0]) / args.steps


def save_gif(video: torch.Tensor, path: Path) -> None:
    import imageio.v2 as imageio

    arr = (video.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    imageio.mimwrite(path, list(arr), duration=0.125, loop=0)


def save_strip(rows: dict[str, torch.Tensor], path: Path, n_frames: int, scale: int = 2) -> None:
    """One row per plan, ``n_frames`` evenly spaced frames per row, label on the left."""
    from PIL import Image, ImageDraw

    names = list(rows)
    f, h, w, _ = rows[names[0]].shape
    idx = np.linspace(0, f - 1, num=min(n_frames, f)).round().astype(int)
    label_w, pad = 90, 2
    canvas = Image.new(
        "RGB", (label_w + len(idx) * (w * scale + pad), len(names) * (h * scale + pad)), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for r, name in enumerate(names):
        y0 = r * (h * scale + pad)
        draw.text((4, y0 + h * scale // 2 - 5), name, fill=(0, 0, 0))
        vid = (rows[name].clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        for c, fi in enumerate(idx):
            tile = Image.fromarray(vid[fi]).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (w * scale + pad), y0))
    canvas.save(path)


def run(args) -> dict:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pipe = build_demo_pipeline(args.device)
    pipe.set_progress_bar_config(disable=True)
    results: dict[str, dict] = {}
    warm = argparse.Namespace(**{**vars(args), "steps": 1})
    generate(pipe, args.seeds[0], warm, args.device)  # warm-up (allocator, lazy imports) outside timing
    videos: dict[str, dict[int, torch.Tensor]] = {"dense": {}}
    dense_time = []
    for seed in args.seeds:
        v, t = generate(pipe, seed, args, args.device)
        videos["dense"][seed] = v
        dense_time.append(t)
        save_gif(v, out / f"dense_s{seed}.gif")
    results["dense"] = {
        "density": 1.0,
        "s_per_step": float(np.mean(dense_time)),
        "psnr": math.inf,
        "ssim": 1.0,
    }
    for plan in args.plans:
        label = Path(plan).stem if plan.endswith(".json") else plan
        handle = sparsediff.enable_sparse_attention(
            pipe, plan, backend=args.backend, block_size=args.block_size
        )
        try:
            times, ps, ss, dens = [], [], [], []
            videos[label] = {}
            for seed in args.seeds:
                v, t = generate(pipe, seed, args, args.device)
                videos[label][seed] = v
                times.append(t)
                ps.append(psnr(v, videos["dense"][seed]))
                ss.append(ssim(v, videos["dense"][seed]))
                d = handle.densities().get("transformer", {})
                if d:
                    dens.append(sum(d.values()) / len(d))
                save_gif(v, out / f"{label}_s{seed}.gif")
            summary = handle.states["transformer"].plan.summary()
        finally:
            handle.disable()
        results[label] = {
            "density": float(np.mean(dens)) if dens else 1.0,
            "s_per_step": float(np.mean(times)),
            "psnr": float(np.mean(ps)),
            "ssim": float(np.mean(ss)),
            "plan": summary,
        }
        print(f"[compare] {label}: {results[label]}", file=sys.stderr)
    save_strip({k: v[args.seeds[0]] for k, v in videos.items()}, out / "strip.png", args.strip_frames)
    write_report(out, results, args)
    return results


def write_report(out: Path, results: dict, args) -> None:
    import diffusers

    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    lines = [
        "# Plan comparison (dense vs sparse, same seeds)",
        "",
        f"Pipeline: embedded tiny video pipeline (random-init Wan, 4 layers x 4 heads x 32); "
        f"{args.frames} frames {args.height}x{args.width}, {args.steps} steps, seeds {list(args.seeds)}.",
        f"Device: {dev}; torch {torch.__version__}; diffusers {diffusers.__version__}; "
        f"sparsediff {sparsediff.__version__}; backend {args.backend}; "
        f"block size {args.block_size or 64}.",
        f"Command: `python samples/compare_plans.py {' '.join(sys.argv[1:])}`",
        "",
        "| plan | density (sparse layers) | s / step | speedup vs dense | PSNR vs dense (dB) | SSIM vs dense |",
        "|---|---|---|---|---|---|",
    ]
    base = results["dense"]["s_per_step"]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['density']:.3f} | {r['s_per_step']:.3f} | {base / r['s_per_step']:.2f}x | "
            f"{r['psnr']:.2f} | {r['ssim']:.4f} |"
        )
    lines += ["", "Density is the fraction of query x key pairs computed in the layers that ran sparse.", ""]
    lines += [f"- `{k}`: {v['plan']}" for k, v in results.items() if "plan" in v]
    lines += ["", "![strip](strip.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="compare-out")
    p.add_argument(
        "--plans", nargs="+", default=["radial", "tile", "topp"], help="pattern names or plan JSONs"
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--block-size", type=int, default=None, help="tokens per mask block (default: 64)")
    p.add_argument("--strip-frames", type=int, default=6)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    clash = [n for n in OUTPUTS if (out / n).exists()] + (
        [q.name for q in out.glob("*.gif")] if out.exists() else []
    )
    if clash and not args.overwrite:
        print(
            f"{out} already holds {', '.join(clash)}; pass --overwrite or choose another --out",
            file=sys.stderr,
        )
        return 2
    run(args)
    print((out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
