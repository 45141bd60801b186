"""Search cost of one layer: ``search_attention`` at a real model's attention shape, wall time and peak memory.

Default: Wan2.1-1.3B at 480x832, 81 frames -- 21x30x52 = 32 760 tokens, 12 heads, d = 128, the default
candidate grid and sampling (512 rows per head). q/k/v are random (the cost does not depend on the
values, only the choices do). Peak memory is the process's peak RSS (CPU) or the CUDA allocator's peak.

    python samples/search_cost.py                       # CPU, one thread
    python samples/search_cost.py --device cuda --threads 0
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch

from sparsediff.layout import TokenLayout
from sparsediff.search import default_candidates, search_attention


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="21,30,52", help="F,H,W of the latent grid")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--num-rows", type=int, default=512)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    F, H, W = (int(x) for x in args.grid.split(","))
    lay = TokenLayout.video(F, H, W)
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    shape = (1, args.heads, lay.num_tokens, args.head_dim)
    q, k, v = (torch.randn(shape, generator=g).to(dev, getattr(torch, args.dtype)) for _ in range(3))
    n_cand = len(default_candidates(lay, args.block_size, cross_step=False))
    base = _rss_mib()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    res = search_attention(q, k, v, lay, num_rows=args.num_rows, block_size=args.block_size)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    wall = time.perf_counter() - t0
    nn_bytes = lay.num_tokens**2 * 4
    print(
        f"host {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        f"shape: {lay} heads={args.heads} d={args.head_dim} dtype={args.dtype} device={dev}; "
        f"{n_cand} candidates, {args.num_rows} rows/head, block {args.block_size}"
    )
    print(f"wall time: {wall:.1f} s ({wall / args.heads:.1f} s per head)")
    if dev.type == "cuda":
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB")
    print(
        f"peak RSS: {_rss_mib():.0f} MiB (inputs + baseline {base:.0f} MiB); one N x N fp32 matrix would be "
        f"{nn_bytes / 2**20:.0f} MiB per head"
    )
    print(f"choice: {res.family_counts()}; predicted attention speedup {res.attention_speedup:.2f}x")


if __name__ == "__main__":
    main()
