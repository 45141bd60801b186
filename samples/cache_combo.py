"""A diffusers cache and sparse attention together, against each alone, on the embedded video model.

``sparsediff compare`` runs sparse-attention variants only (its variants are plans and
``SparseAttentionConfig`` overrides); this script adds the cache. For every (prompt, seed) it generates
four videos on one pipeline object -- dense, sparse attention (the family default plan, what
``compare``'s ``default`` runs), FirstBlockCache alone, FirstBlockCache + sparse attention -- and prints
wall seconds per generation and PSNR of each video against the dense one (:mod:`sparsediff.metrics`),
plus how many of the tail blocks' calls FirstBlockCache computed::

    OMP_NUM_THREADS=1 python samples/cache_combo.py   # 8 x 32 x 32 px, 20 steps, threshold 0.15
    python samples/cache_combo.py --threshold 0.1 --seeds 0 1 --json out.json

Timing is the median of ``--repeats`` generations per variant, the variants taking turns (the first round
is a warm-up, not counted, when ``--repeats`` > 1); wall and CPU seconds of the process (CPU seconds are
the steadier number on a shared machine). Needs the embedded model's trained weights (shipped in the package).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sparsediff.demo import DEFAULT_PROMPTS
from sparsediff.embedded import load_embedded_pipeline
from sparsediff.metrics import strict_json, video_metrics

VARIANTS = ("dense", "sparse", "fbc", "fbc+sparse")


class _TailCounter:
    """Counts calls of the last block's self-attention module (it runs only when the block computes)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.calls = 0
        self._h = transformer.blocks[-1].attn1.register_forward_pre_hook(self._pre)

    def _pre(self, module, args) -> None:
        self.calls += 1

    def close(self) -> None:
        self._h.remove()


def _generate(pipe, prompt: str, seed: int, call: dict) -> tuple[np.ndarray, float, float]:
    """One generation: (video, wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = pipe(prompt=prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **call)
    return np.asarray(out.frames[0], dtype=np.float32), time.perf_counter() - t0, time.process_time() - c0


def _one(pipe, variant: str, threshold: float, prompt: str, seed: int, call: dict) -> dict:
    """One generation of ``variant`` (the cache and sparse attention enabled for it, then removed)."""
    from diffusers.hooks import FirstBlockCacheConfig

    t = pipe.transformer
    handle = pipe.enable_sparse_attention() if "sparse" in variant else None
    if "fbc" in variant:
        t.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    counter = _TailCounter(t)
    try:
        video, wall, cpu = _generate(pipe, prompt, seed, call)
        density = None if handle is None else handle.report()["transformer"]["mean_density"]
    finally:
        counter.close()
        if "fbc" in variant:
            t.disable_cache()
        if handle is not None:
            handle.disable()
    return {"video": video, "wall": wall, "cpu": cpu, "tail": counter.calls, "density": density}


def run(prompts, seeds, *, steps: int, frames: int, height: int, width: int, threshold: float, repeats: int):
    """Rows of (prompt, seed, variant): median wall / CPU seconds over the timed generations, PSNR vs dense.

    The variants take turns (dense, sparse, fbc, fbc+sparse, dense, ...) so that a load change on a shared
    machine touches all of them alike; the first round is a warm-up when ``repeats`` > 1.
    """
    pipe = load_embedded_pipeline()
    call = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps, guidance_scale=4.0)
    rows = []
    for prompt in prompts:
        for seed in seeds:
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for _ in range(repeats):
                for variant in VARIANTS:
                    runs[variant].append(_one(pipe, variant, threshold, prompt, seed, call))
            timed = {v: (r[1:] if repeats > 1 else r) for v, r in runs.items()}
            walls = {v: statistics.median(x["wall"] for x in r) for v, r in timed.items()}
            cpus = {v: statistics.median(x["cpu"] for x in r) for v, r in timed.items()}
            videos = {v: r[-1]["video"] for v, r in runs.items()}
            for v, r in runs.items():  # every generation of a variant makes the same video
                if not all(np.array_equal(x["video"], videos[v]) for x in r):
                    raise RuntimeError(f"{v}: repeated generations differ (state left over between calls?)")
            for variant in VARIANTS:
                q = None if variant == "dense" else video_metrics(videos[variant], videos["dense"])
                rows.append(
                    {
                        "prompt": prompt,
                        "seed": seed,
                        "variant": variant,
                        "seconds": walls[variant],
                        "cpu_seconds": cpus[variant],
                        "speedup": walls["dense"] / walls[variant],
                        "cpu_speedup": cpus["dense"] / cpus[variant],
                        "psnr_db": None if q is None else q.psnr,
                        "tail_block_calls": runs[variant][-1]["tail"],
                        "transformer_calls": steps * 2,
                        "mean_density": runs[variant][-1]["density"],
                    }
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument(
        "--threshold",
        type=float,
        default=0.15,
        help="FirstBlockCacheConfig.threshold (diffusers default 0.05 skips nothing on the embedded model at "
        "8x32x32, 20 steps; 0.15 computes the tail blocks in about 26 of 40 transformer calls)",
    )
    p.add_argument("--repeats", type=int, default=3, help="generations per variant (first one: warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the rows here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.steps < 1:
        p.error("--repeats and --steps must be >= 1")
    torch.set_num_threads(max(1, args.threads))
    rows = run(
        args.prompts,
        args.seeds,
        steps=args.steps,
        frames=args.frames,
        height=args.height,
        width=args.width,
        threshold=args.threshold,
        repeats=args.repeats,
    )
    print(
        f"# embedded model, {args.frames}x{args.height}x{args.width} px, {args.steps} steps, CFG 4.0, "
        f"FirstBlockCache threshold {args.threshold}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread(s), torch {torch.__version__}"
    )
    print(
        "| prompt | seed | variant | wall s / generation | CPU s / generation | speedup vs dense (wall, CPU) "
        "| PSNR vs dense (dB) | tail block computed | mean density |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        psnr = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.2f}"
        dens = "-" if r["mean_density"] is None else f"{r['mean_density']:.3f}"
        print(
            f"| {r['prompt']} | {r['seed']} | {r['variant']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} "
            f"| {r['speedup']:.2f}x, {r['cpu_speedup']:.2f}x | {psnr} "
            f"| {r['tail_block_calls']}/{r['transformer_calls']} | {dens} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(strict_json(rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
