"""Quality vs speed of several sparse-attention plans, as a library call (what ``sparsediff compare`` runs).

Loads one pipeline, then generates the same prompts and seeds densely and with each plan on that same
pipeline object, and writes videos, side-by-side strips, ``report.html`` (self-contained, with a
quality-vs-speed plot and per-layer density), ``report.md`` and ``results.json`` into ``--out``::

    python samples/compare_plans.py --out compare-out
    python samples/compare_plans.py --out compare-out --plans radial "tile,dense_steps=0" my_plan.json

The command-line tool has every option (``sparsediff compare --help``); this script shows the four
library calls it is made of. It uses the embedded tiny video model (random-init when its trained weights
are not in the package: then it shows density and speed, not quality) at a small size that runs on a
CPU in about a minute. Existing outputs are never overwritten unless ``--overwrite`` is given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from sparsediff.compare import CompareError, compare, load_pipeline, read_prompts

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="compare-out")
    p.add_argument("--plans", nargs="+", default=["default", "radial", "dense"])
    p.add_argument("--prompts", default=str(HERE / "prompts_embedded.txt"))
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=min(4, torch.get_num_threads()), help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))

    try:
        # 1. the pipeline: the embedded model (or pass pipeline="module:function" / model="folder")
        pipe, info = load_pipeline(device="cuda" if torch.cuda.is_available() else "cpu")
        # 2. prompts, one per line
        prompts = read_prompts(args.prompts)[:2]
        # 3. dense once per (prompt, seed), then every plan on the same pipeline; metrics vs dense
        results = compare(
            pipe,
            prompts,
            seeds=args.seeds,
            plans=args.plans,  # pattern names, plan JSON files, "pattern,key=value" overrides
            out=args.out,
            num_frames=8,
            height=32,
            width=32,
            num_inference_steps=8,
            block_size=16,  # 8 x 8 x 8 = 512 tokens: 32 blocks of 16
            backend=args.backend,
            warmup=0,
            overwrite=args.overwrite,
            model_info=info,
            command="python samples/compare_plans.py " + " ".join(sys.argv[1:] if argv is None else argv),
        )
    except CompareError as e:
        print(f"compare_plans: {e}", file=sys.stderr)
        return 2
    # 4. the numbers (also in results.json): one row per variant, dense first
    for r in results["variants"]:
        print(
            f"{r['label']:>12}: density {r['mean_density']:.3f}  {r['s_per_step']:.3f} s/step  "
            f"PSNR {r['psnr']:.2f} dB  SSIM {r['ssim']:.4f}  temporal PSNR {r['temporal_psnr']:.2f} dB"
        )
    print(f"report: {Path(args.out, 'report.html').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
