"""Kernel benchmark: ``python -m sparsediff.bench`` -- block-sparse attention vs dense SDPA and FlexAttention.

On CUDA it times :func:`sparsediff.block_sparse_attention` (Triton kernel) at real DiT shapes, B = 1,
random block masks at several densities, against dense ``F.scaled_dot_product_attention`` with the
flash and cuDNN backends (each only if it runs) and compiled FlexAttention with the same mask
(``mask.to_flex_block_mask()``). Timings use CUDA events: warm-up, then the median of ``--reps`` runs (on CPU: the best of them).

On CPU (no GPU) it runs a smoke version: the PyTorch twin vs dense SDPA on CPU at N = 8192, D = 64,
8 heads (``--quick``: N = 2048), densities 10/25/50 %; the two are run round-robin and the best of
``--reps`` is kept for each, since a shared CPU's speed drifts by several x over seconds.

Columns: ``ms sparse`` / ``ms SDPA-flash`` / ``ms SDPA-cudnn`` / ``ms flex``; ``TFLOP/s`` counts only the
computed blocks (``4 * B * D * computed_pairs / t``, ragged blocks counted exactly); ``% dense thrpt``
is that throughput over the best dense SDPA throughput (the target is >= 90 %); ``speedup`` is the
best dense SDPA time over the sparse time (dense-equivalent speedup).

Examples::

    python -m sparsediff.bench                       # all model shapes, densities 5/10/25/50 %
    python -m sparsediff.bench --quick --out bench.md
    python -m sparsediff.bench --shapes wan2.1-1.3b,32768:16:128 --densities 0.1,0.2 --dtype fp16
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli_args import Parser, add_threads_arg, apply_threads, deprecated_alias, nonnegative_int, positive_int
from .mask import BlockSparseMask
from .ops import block_sparse_attention
from .timing import sync

logger = logging.getLogger(__name__)

__all__ = [
    "Shape",
    "MODEL_SHAPES",
    "random_block_mask",
    "banded_block_mask",
    "run_benchmark",
    "format_table",
    "main",
]


@dataclass(frozen=True)
class Shape:
    name: str
    seq_len: int
    heads: int
    head_dim: int


#: Self-attention shapes of real pipelines (B = 1, one CFG branch).
MODEL_SHAPES = {
    "wan2.1-1.3b": Shape("Wan2.1-1.3B 480p 81f", 32760, 12, 128),
    "wan2.1-14b": Shape("Wan2.1-14B 720p 81f", 75600, 40, 128),
    "hunyuanvideo": Shape("HunyuanVideo 720p 129f", 118800 + 256, 24, 128),
    "cogvideox": Shape("CogVideoX-5B 49f", 44880, 48, 64),
    "flux": Shape("Flux 1024px", 4096 + 512, 24, 128),
}
QUICK_SHAPES = ("wan2.1-1.3b", "flux")
CPU_SHAPE = Shape("CPU smoke", 8192, 8, 64)
CPU_QUICK_SHAPE = Shape("CPU smoke (quick)", 2048, 8, 64)
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class BenchInputError(SystemExit):
    """A bad input: its one-line message goes to stderr and the exit status is 2 (``str()`` is the message)."""

    def __init__(self, message: str) -> None:
        print(message, file=sys.stderr)
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def random_block_mask(
    heads: int, seq_len: int, block: int, density: float, *, seed: int = 0, device="cpu"
) -> BlockSparseMask:
    """Random mask with the same number of key blocks in every row, ``round(density * Kb)`` (>= 1).

    Equal counts per row keep the work balanced, as the structured patterns (radial, tile) are.
    """
    nb = -(-seq_len // block)
    per_row = max(1, min(nb, round(density * nb)))
    g = torch.Generator(device="cpu").manual_seed(seed)
    order = torch.rand(1, heads, nb, nb, generator=g).argsort(-1)[..., :per_row]
    dense = torch.zeros(1, heads, nb, nb, dtype=torch.bool).scatter_(-1, order, True)
    return BlockSparseMask.from_dense(dense, block, (seq_len, seq_len)).to(device)


def banded_block_mask(
    heads: int, seq_len: int, block: int, density: float, *, device="cpu"
) -> BlockSparseMask:
    """Structured mask like the static patterns' at block level: every query block keeps the first key
    block (a sink / text block) and a band of key blocks centred on its own position (shifted inside the
    sequence at the edges), ``round(density * Kb)`` blocks in all, the same on every head."""
    nb = -(-seq_len // block)
    per_row = max(1, min(nb, round(density * nb)))
    band = per_row - 1
    rows = []
    for i in range(nb):
        lo = min(max(1, i - band // 2), max(1, nb - band))
        keep = {0, *range(lo, min(nb, lo + band))}
        rows.append([j in keep for j in range(nb)])
    dense = torch.tensor(rows, dtype=torch.bool).expand(1, heads, nb, nb)
    return BlockSparseMask.from_dense(dense, block, (seq_len, seq_len)).to(device)


MASK_KINDS = {"random": random_block_mask, "banded": banded_block_mask}


def _parse_shapes(spec: str | None, quick: bool, cuda: bool) -> list[Shape]:
    if spec is None:
        if not cuda:
            return [CPU_QUICK_SHAPE if quick else CPU_SHAPE]
        return [MODEL_SHAPES[n] for n in (QUICK_SHAPES if quick else MODEL_SHAPES)]
    shapes = []
    for item in spec.split(","):
        item = item.strip()
        if item in MODEL_SHAPES:
            shapes.append(MODEL_SHAPES[item])
        elif item.count(":") == 2:
            n, h, d = (int(x) for x in item.split(":"))
            shapes.append(Shape(f"custom N={n}", n, h, d))
        else:
            raise BenchInputError(
                f"sparsediff bench: error: unknown shape {item!r}: use one of {sorted(MODEL_SHAPES)} or N:H:D"
            )
    return shapes


def _timer(cuda: bool, warmup: int, reps: int) -> Callable[[Callable[[], object]], float]:
    def time_ms(fn: Callable[[], object]) -> float:
        for _ in range(warmup):
            fn()
        times = []
        if cuda:
            sync()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            # CPU: best of reps -- a shared CPU has slow phases lasting seconds that a median still catches
            return min(times)
        return statistics.median(times)

    return time_ms


def _paired_best(fns: Sequence[Callable[[], object]], warmup: int, reps: int) -> list[float]:
    """CPU: run the functions round-robin (one call each per round) and keep each one's best time (ms),
    so that the slow phases of a shared machine hit the sparse and the dense run alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], (time.perf_counter() - t0) * 1e3)
    return best


def _try(what: str, time_ms, fn) -> float | None:
    try:
        return time_ms(fn)
    except Exception as e:  # a backend that cannot run this shape/dtype/GPU is reported as n/a
        logger.warning("%s unavailable: %s: %s", what, type(e).__name__, str(e).splitlines()[0][:200])
        return None


def _sdpa_backends(cuda: bool):
    if not cuda:
        return {"sdpa": None}
    from torch.nn.attention import SDPBackend

    out = {"flash": SDPBackend.FLASH_ATTENTION}
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        out["cudnn"] = SDPBackend.CUDNN_ATTENTION
    return out


def run_benchmark(
    shapes: Sequence[Shape],
    densities: Sequence[float],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device | None = None,
    block: int | None = None,
    warmup: int = 3,
    reps: int = 10,
    flex: bool = True,
    backend: str | None = None,
    mask_kind: str = "random",
) -> list[dict]:
    """Time every (shape, density); returns one dict per row (times in ms, None when a baseline failed).

    ``mask_kind``: ``"random"`` (scattered blocks, equal count per row) or ``"banded"`` (sink + diagonal
    band, the block structure of the static patterns)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    block = block or (128 if cuda else 64)
    backend = backend or ("auto" if cuda else "reference")
    time_ms = _timer(cuda, warmup, reps)
    flex_fn = None
    if flex and cuda:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            flex_fn = torch.compile(flex_attention, dynamic=False)
        except Exception as e:  # pragma: no cover - depends on the torch build
            logger.warning("FlexAttention unavailable: %s", e)
    rows = []
    for shp in shapes:
        rows += _bench_shape(
            shp,
            densities,
            dtype,
            device,
            block,
            backend,
            time_ms,
            flex_fn,
            (warmup, reps),
            MASK_KINDS[mask_kind],
        )
        if cuda:
            torch.cuda.empty_cache()
    return rows


def _bench_shape(
    shp, densities, dtype, device, block, backend, time_ms, flex_fn, warmup_reps, make_mask=random_block_mask
) -> list[dict]:
    n, h, d = shp.seq_len, shp.heads, shp.head_dim
    gen = torch.Generator(device="cpu").manual_seed(0)
    # diffusers hands over [B, N, H, D]; the op reads the [B, H, N, D] transpose view in place
    q, k, v = (
        torch.randn(1, n, h, d, generator=gen, dtype=torch.float32).to(device, dtype).transpose(1, 2)
        for _ in range(3)
    )
    dense_ms = {}
    for name, be in _sdpa_backends(device.type == "cuda").items():
        if be is None:
            dense_ms[name] = None  # CPU: timed per density, interleaved with the sparse run
        else:
            from torch.nn.attention import sdpa_kernel

            def sdpa(be=be):
                with sdpa_kernel(be):
                    return F.scaled_dot_product_attention(q, k, v)

            dense_ms[name] = _try(f"SDPA-{name}", time_ms, sdpa)
    valid_dense = [t for t in dense_ms.values() if t is not None]
    best_dense = min(valid_dense) if valid_dense else None
    dense_tflops = 4.0 * d * h * n * n / (best_dense * 1e-3) / 1e12 if best_dense else None
    rows = []
    for dens in densities:
        mask = make_mask(h, n, block, dens, device=device)
        pairs = float(mask.density_per_head().sum()) * n * n  # computed q x k pairs over all heads
        ms = None
        if device.type == "cpu":  # interleaved with dense SDPA; this row's SDPA time is the paired one
            ms, dense_ms["sdpa"] = _paired_best(
                [
                    lambda mask=mask: block_sparse_attention(q, k, v, mask, backend=backend),
                    lambda: F.scaled_dot_product_attention(q, k, v),
                ],
                *warmup_reps,
            )
            best_dense = dense_ms["sdpa"]
            dense_tflops = 4.0 * d * h * n * n / (best_dense * 1e-3) / 1e12
        else:
            ms = _try(
                "block_sparse_attention",
                time_ms,
                lambda mask=mask: block_sparse_attention(q, k, v, mask, backend=backend),
            )
        flex_ms = None
        if flex_fn is not None:
            try:
                bm = mask.to_flex_block_mask()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    flex_ms = _try("FlexAttention", time_ms, lambda bm=bm: flex_fn(q, k, v, block_mask=bm))
            except Exception as e:
                logger.warning("FlexAttention mask conversion failed: %s", e)
        tflops = 4.0 * d * pairs / (ms * 1e-3) / 1e12 if ms else None
        rows.append(
            {
                "model": shp.name,
                "N": n,
                "HxD": f"{h}x{d}",
                "density": mask.density(),
                "block": block,
                "ms_sparse": ms,
                **{f"ms_sdpa_{name}": t for name, t in dense_ms.items()},
                "ms_flex": flex_ms,
                "tflops": tflops,
                "pct_dense_thrpt": 100.0 * tflops / dense_tflops if (tflops and dense_tflops) else None,
                "speedup": best_dense / ms if (ms and best_dense) else None,
            }
        )
        logger.info("%s", rows[-1])
    return rows


def run_plan_benchmark(
    plan,
    layout,
    *,
    num_heads: int | None = None,
    head_dim: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    block: int | None = None,
    warmup: int = 1,
    reps: int = 3,
    backend: str = "auto",
) -> list[dict]:
    """Time each self-attention layer of ``plan`` at ``layout`` -- the whole
    :func:`sparsediff.attention.sparse_attention` call the hooks make on a sparse step (mask lookup,
    token permutation, top-p scoring, the op) -- against dense SDPA on the same ``[B=1, N, H, D]`` inputs
    (diffusers' memory layout). Data-dependent heads run at the density the search measured for them
    (:func:`sparsediff.search.price.pricing_spec`); cross-step heads are timed after one refresh pass (the
    refresh itself is not in the time). Round-robin, best of ``reps`` on CPU / median on CUDA."""
    from .attention import LayerState, MaskCache, sparse_attention
    from .search.price import pricing_spec
    from .timing import time_call

    dev = torch.device(device)
    n = layout.num_tokens
    layers = plan.model.num_layers if plan.model is not None else 1
    heads = plan.model.num_heads if plan.model is not None else [int(num_heads or 0)] * layers
    if num_heads is not None:
        heads = [int(num_heads)] * layers
    if not all(heads):
        raise ValueError("the plan names no model: pass the number of heads")
    sdpa = F.scaled_dot_product_attention
    g = torch.Generator().manual_seed(0)
    rows = []
    for li in range(layers):
        h = heads[li]
        q, k, v = (
            torch.randn(1, n, h, head_dim, generator=g).to(dev, dtype).transpose(1, 2) for _ in range(3)
        )
        specs = plan.head_specs(li, h)
        dens = [r.get("density") for r in plan.stats[li]] if plan.stats is not None else [None] * h
        specs = tuple(pricing_spec(sp, d) for sp, d in zip(specs, dens))
        label = ", ".join(f"{p} {c}" for p, c in sorted(_count([sp.pattern for sp in specs]).items()))
        if li in plan.schedule.dense_layers or all(sp.pattern == "dense" for sp in specs):
            rows.append({"layer": li, "patterns": label + " (dense layer)", "density": 1.0, "ms_sparse": None,
                         "ms_dense": None, "speedup": None})  # fmt: skip
            continue
        state, cache = LayerState(), MaskCache()
        step = [0]

        def sparse(specs=specs, state=state, cache=cache, q=q, k=k, v=v, step=step):
            step[0] += 1
            return sparse_attention(
                q, k, v, layout, specs, state, step=step[0], block_size=block, cache=cache, backend=backend
            )

        with torch.no_grad():
            sparse_attention(q, k, v, layout, specs, state, step=0, force_dense=True, block_size=block,
                             cache=cache, backend=backend)  # fmt: skip
            ts, td = [], []
            for _ in range(warmup):
                sparse(), sdpa(q, k, v)
            for _ in range(reps):
                ts.append(time_call(sparse, dev))
                td.append(time_call(lambda q=q, k=k, v=v: sdpa(q, k, v), dev))
        pick = statistics.median if dev.type == "cuda" else min
        ms_s, ms_d = pick(ts) * 1e3, pick(td) * 1e3
        rows.append({"layer": li, "patterns": label, "density": state.last_mask.density(), "ms_sparse": ms_s,
                     "ms_dense": ms_d, "speedup": ms_d / ms_s})  # fmt: skip
    return rows


def _count(xs):
    out: dict = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def format_plan_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`run_plan_benchmark` rows (and the layers' total)."""
    lines = ["| layer | heads | density | ms sparse | ms SDPA | speedup |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['layer']} | {r['patterns']} | {100 * r['density']:.1f} % | {_fmt(r['ms_sparse'])} | "
            f"{_fmt(r['ms_dense'])} | {_fmt(r['speedup'], '{:.2f}×')} |"
        )
    timed = [r for r in rows if r["ms_sparse"] is not None]
    if timed:
        s, d = sum(r["ms_sparse"] for r in timed), sum(r["ms_dense"] for r in timed)
        lines.append(f"| sparse layers | | | {s:.2f} | {d:.2f} | {d / s:.2f}× |")
    return "\n".join(lines)


def _fmt(x, spec="{:.2f}"):
    return "n/a" if x is None else spec.format(x)


def format_table(rows: Sequence[dict]) -> str:
    """Markdown table of :func:`run_benchmark` rows."""
    if not rows:
        return "(no rows)"
    sdpa_cols = [c for c in rows[0] if c.startswith("ms_sdpa_")]
    header = ["model", "N", "H×D", "block", "density", "ms sparse"]
    header += [("ms SDPA-" + c[len("ms_sdpa_") :]) if c != "ms_sdpa_sdpa" else "ms SDPA" for c in sdpa_cols]
    header += ["ms flex", "TFLOP/s (computed)", "% dense thrpt", "speedup vs best SDPA"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        cells = [r["model"], str(r["N"]), r["HxD"], str(r["block"]), f"{100 * r['density']:.1f} %"]
        cells.append(_fmt(r["ms_sparse"]))
        cells += [_fmt(r[c]) for c in sdpa_cols]
        cells += [_fmt(r["ms_flex"]), _fmt(r["tflops"], "{:.3f}"), _fmt(r["pct_dense_thrpt"], "{:.0f} %")]
        cells.append(_fmt(r["speedup"], "{:.2f}×"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def environment_header(device: torch.device) -> str:
    import importlib.metadata as md

    try:
        triton_v = md.version("triton")
    except md.PackageNotFoundError:
        triton_v = "not installed"
    if device.type == "cuda":
        hw = f"GPU: {torch.cuda.get_device_name(device)}"
    else:
        hw = f"CPU: {_cpu_name()} ({torch.get_num_threads()} torch threads)"
        try:
            hw += ", load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
        except OSError:
            pass
    return (
        f"{hw}  \ntorch {torch.__version__}, triton {triton_v}, python {platform.python_version()}  \n"
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="sparsediff bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes/densities (CPU: N=2048)")
    p.add_argument("--shapes", help=f"comma list of {sorted(MODEL_SHAPES)} or N:H:D")
    p.add_argument(
        "--densities", help="comma list of fractions (default 0.05,0.1,0.25,0.5; CPU 0.1,0.25,0.5)"
    )
    p.add_argument("--dtype", choices=sorted(_DTYPES), help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument(
        "--block-size", type=positive_int, help="block size (q and kv); default 128 on CUDA, 64 on CPU"
    )
    deprecated_alias(p, "--block", "--block-size")
    p.add_argument(
        "--reps", type=positive_int, help="timed repetitions (median); default 10 on CUDA, 3 on CPU"
    )
    p.add_argument("--warmup", type=nonnegative_int, help="warm-up runs; default 3 on CUDA, 1 on CPU")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--device", help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", metavar="FILE.md", help="also write the table as Markdown to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    deprecated_alias(p, "--force", "--overwrite")
    add_threads_arg(p)
    p.add_argument(
        "--mask",
        choices=sorted(MASK_KINDS),
        default="random",
        help="random: scattered key blocks; banded: sink + diagonal band (static patterns' structure)",
    )
    p.add_argument(
        "--plan",
        help="time the layers of this plan (a plan JSON, a pattern name, or 'default': the family default plan "
        "for --grid) instead of random masks: the whole sparse-attention call of each layer vs dense SDPA",
    )
    p.add_argument(
        "--grid", help="with --plan: F,H,W token grid (default: the layout the plan was searched for)"
    )
    p.add_argument(
        "--heads", type=positive_int, help="with --plan: heads per layer (default: the plan's model)"
    )
    p.add_argument("--head-dim", type=positive_int, help="with --plan: head dimension (required)")
    return p


def main(argv: Sequence[str] | None = None) -> str:
    p = build_parser()
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    apply_threads(args.threads)
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise BenchInputError(
            f"sparsediff bench: error: --out {args.out} exists; pass --overwrite to replace it"
        )
    if args.plan is not None:
        return _plan_main(args)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    shapes = _parse_shapes(args.shapes, args.quick, cuda)
    if args.densities:
        densities = [float(x) for x in args.densities.split(",")]
    elif args.quick and cuda:
        densities = [0.1, 0.5]
    else:
        densities = [0.05, 0.1, 0.25, 0.5] if cuda else [0.1, 0.25, 0.5]
    dtype = _DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    reps = args.reps or (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)

    head = environment_header(device)
    what = "Triton kernel" if cuda else "PyTorch twin (backend='reference')"
    stat = "median" if cuda else "best"
    head += f"  \nsparse = {what}; dtype {str(dtype).split('.')[-1]}; B = 1; {stat} of {reps} after {warmup} warm-up"
    head += f"; {args.mask} block masks"
    print(head, flush=True)
    rows = run_benchmark(
        shapes, densities, dtype=dtype, device=device, block=args.block_size, warmup=warmup, reps=reps,
        flex=not args.no_flex, mask_kind=args.mask,
    )  # fmt: skip
    return _emit(head, format_table(rows), args.out)


def _emit(head: str, table: str, out: str | None) -> str:
    """Print ``table``; with ``out`` also write the conditions ``head`` and the table there (Markdown)."""
    print(table)
    if out:
        with open(out, "w") as f:
            f.write(head + "\n\n" + table + "\n")
    return table


def _plan_main(args) -> str:
    from .layout import TokenLayout
    from .plan import Plan, PlanError

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    grid_layout = None
    if args.grid:
        try:
            grid_layout = TokenLayout.video(*(int(x) for x in args.grid.split(",")))
        except (TypeError, ValueError):
            raise BenchInputError(f"sparsediff bench: error: --grid {args.grid!r} is not F,H,W") from None
    try:
        if args.plan == "default":
            if grid_layout is None:
                raise ValueError("the family default needs --grid F,H,W")
            from .defaults import default_plan

            # the training-free default of the grid's family (video when F > 1), its token threshold and dense
            # first layer ignored: the bench times the pattern
            family = "video" if grid_layout.grid[0] > 1 else "image"
            plan = default_plan(family).with_overrides(min_tokens=0, dense_layers=())
        else:
            plan = Plan.load(args.plan) if args.plan.endswith(".json") else Plan.uniform(args.plan)
    except (PlanError, ValueError, OSError) as e:
        raise BenchInputError(f"sparsediff bench: error: --plan {args.plan}: {e}") from None
    if grid_layout is not None:
        layout = grid_layout
    elif plan.layout is not None:
        layout = plan.layout
    else:
        raise BenchInputError("sparsediff bench: error: --plan without a searched layout needs --grid F,H,W")
    if not args.head_dim:
        raise BenchInputError("sparsediff bench: error: --plan needs --head-dim")
    dtype = _DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    reps = args.reps or (10 if cuda else 5)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    head = environment_header(device)
    head += (
        f"  \nplan {args.plan} ({plan.summary()}) at {layout} ({layout.num_tokens} tokens), D = {args.head_dim}, "
        f"dtype {str(dtype).split('.')[-1]}, block {args.block_size or 64}; "
        f"sparse = {'Triton kernel' if cuda else 'PyTorch twin'}; B = 1; "
        f"{'median' if cuda else 'best'} of {reps} after {warmup} warm-up, round-robin with SDPA"
    )
    print(head, flush=True)
    rows = run_plan_benchmark(
        plan, layout, num_heads=args.heads, head_dim=args.head_dim, dtype=dtype, device=device,
        block=args.block_size, warmup=warmup, reps=reps, backend="auto" if cuda else "reference",
    )  # fmt: skip
    return _emit(head, format_plan_table(rows), args.out)


if __name__ == "__main__":
    main()
