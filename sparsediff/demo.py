"""``sparsediff demo``: dense vs sparse on an embedded tiny video pipeline, fully offline.

Builds a small random-init Wan 2.1 pipeline from configs (no Hub access, no text encoder: fixed seeded
prompt embeddings stand in for the prompt), generates the same seed densely and with sparse attention
(the Wan family default: radial, first 25 % of steps and the first layer dense), and writes to the
output folder:

* ``dense.mp4`` / ``sparse.mp4`` (``.gif`` when imageio-ffmpeg is missing, or with ``--format gif``),
* ``summary.json`` and ``summary.txt``: attention density per layer and mean, seconds per denoising step
  for both runs, PSNR of the sparse video against the dense one.

Random weights make noise-like videos: the demo shows the machinery (and its speed on your device), not
image quality. Existing files are never replaced without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["main", "build_demo_pipeline", "run_demo"]

OUTPUT_NAMES = ("dense", "sparse", "summary.json", "summary.txt")


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


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def _write_video(frames: Any, path_stem: Path, fmt: str, fps: int = 8) -> Path:
    import imageio.v2 as imageio
    import numpy as np

    arr = (np.clip(np.asarray(frames), 0.0, 1.0) * 255).round().astype(np.uint8)
    if fmt == "mp4":
        try:
            import imageio_ffmpeg  # noqa: F401

            path = path_stem.with_suffix(".mp4")
            imageio.mimwrite(path, list(arr), fps=fps, macro_block_size=1)
            return path
        except Exception:  # no ffmpeg: fall back to gif
            pass
    path = path_stem.with_suffix(".gif")
    imageio.mimwrite(path, list(arr), duration=1.0 / fps, loop=0)
    return path


def run_demo(
    out_dir: Path,
    *,
    steps: int = 8,
    frames: int = 33,
    height: int = 128,
    width: int = 128,
    seed: int = 0,
    plan: str | None = None,
    fmt: str = "mp4",
    device: str = "cpu",
    backend: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Generate dense and sparse, write the videos and the summary into ``out_dir``; return the summary."""
    from .api import enable_sparse_attention

    pipe = build_demo_pipeline(device)
    pipe.set_progress_bar_config(disable=not progress, leave=False)
    g = torch.Generator("cpu").manual_seed(seed)
    prompt_embeds = torch.randn(1, 16, 64, generator=g).to(device)
    negative = torch.randn(1, 16, 64, generator=g).to(device)
    call = dict(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative,
        height=height,
        width=width,
        num_frames=frames,
        num_inference_steps=steps,
        guidance_scale=5.0,
        output_type="np",
    )

    def generate(label: str):
        if progress:
            print(f"[sparsediff demo] {label}: {steps} steps", file=sys.stderr, flush=True)
        stamps = [time.perf_counter()]

        def on_step_end(pipe_, i, t, kwargs):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            return {}

        with torch.no_grad():
            out = pipe(
                **call, generator=torch.Generator("cpu").manual_seed(seed), callback_on_step_end=on_step_end
            ).frames[0]
        # denoising time only (the VAE decode after the last step is not counted)
        return torch.as_tensor(out), stamps[-1] - stamps[0]

    dense, t_dense = generate("dense")
    handle = enable_sparse_attention(pipe, plan, backend=backend)
    try:
        sparse, t_sparse = generate("sparse")
        dens = handle.densities()["transformer"]
        plan_summary = handle.states["transformer"].plan.summary()
    finally:
        handle.disable()

    dense_path = _write_video(dense.numpy(), out_dir / "dense", fmt)
    sparse_path = _write_video(sparse.numpy(), out_dir / "sparse", fmt)
    mean_density = sum(dens.values()) / len(dens) if dens else 1.0
    summary = {
        "model": "tiny random-init Wan 2.1 (4 layers, 4 heads x 32)",
        "video": {"frames": frames, "height": height, "width": width, "steps": steps, "seed": seed},
        "plan": plan_summary,
        "density_per_layer": {str(k): round(v, 4) for k, v in sorted(dens.items())},
        "mean_density_sparse_layers": round(mean_density, 4),
        "seconds_per_step": {"dense": round(t_dense / steps, 4), "sparse": round(t_sparse / steps, 4)},
        "psnr_sparse_vs_dense_db": round(_psnr(sparse, dense), 2),
        "files": {"dense": dense_path.name, "sparse": sparse_path.name},
        "device": device,
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [
        "sparsediff demo (tiny random-init Wan: shows the machinery, not quality)",
        f"plan: {plan_summary}",
        f"attention density (sparse layers): mean {mean_density:.3f}; "
        + ", ".join(f"L{k} {v:.2f}" for k, v in sorted(dens.items())),
        f"time per step: dense {t_dense / steps:.3f} s, sparse {t_sparse / steps:.3f} s ({device})",
        f"PSNR sparse vs dense: {summary['psnr_sparse_vs_dense_db']} dB",
        f"videos: {dense_path.name}, {sparse_path.name}",
    ]
    (out_dir / "summary.txt").write_text("\n".join(lines) + "\n")
    return summary


def _existing_outputs(out_dir: Path) -> list[Path]:
    if not out_dir.exists():
        return []
    return sorted(p for p in out_dir.iterdir() if p.stem in ("dense", "sparse", "summary"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsediff demo",
        description="Dense vs sparse attention on an embedded tiny video pipeline (offline).",
    )
    parser.add_argument("--out", default="sparsediff-demo", help="output folder (default: ./sparsediff-demo)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing demo files in --out")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--frames", type=int, default=33, help="video frames (4k+1)")
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plan", default=None, help="pattern name or plan JSON (default: the Wan default)")
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
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for p in clash:
            p.unlink()
    summary = run_demo(
        out_dir,
        steps=args.steps,
        frames=args.frames,
        height=args.height,
        width=args.width,
        seed=args.seed,
        plan=args.plan,
        fmt=args.format,
        device=args.device,
        backend=args.backend,
        progress=not args.no_progress,
    )
    print((out_dir / "summary.txt").read_text(), end="")
    print(f"written to {out_dir.resolve()}")
    _ = summary
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
