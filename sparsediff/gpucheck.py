"""One prepared GPU run: ``python -m sparsediff.gpucheck --out DIR [--dry-run] [--budget-s 480]``.

In one process, within one time budget (default 480 s, sized for one H100 / H200), it runs four sections:

1. **correctness** -- forward checks of :func:`sparsediff.block_sparse_attention` with ``backend="triton"``
   (the native kernel on CUDA) against the fp32 oracle :func:`sparsediff.reference.attention_ref` on ugly
   shapes: ragged token counts (1000, 4099), ``Nq != Nk``, ``[B, N, H, D]`` transpose views, per-batch
   masks, empty rows, head dims 64 / 96 / 128, bf16 and fp16. Tolerance: the suite's one rule
   (``tests/tolerance.py``: error <= 2 x the naive same-dtype error + floor). Backward checks: the op's
   gradients vs autograd of the fp32 oracle (same rule). Then pytest on ``tests/test_kernel.py
   tests/test_backward.py tests/test_lse_cache.py tests/test_op.py`` with ``-m "not slow"`` in this
   process -- natively on a GPU (``tests/conftest.py`` turns the Triton interpreter on only without one)
   -- one entry per file, the log in ``DIR/pytest.log``. A failing check never stops the others.
2. **kernel** -- :func:`sparsediff.bench.run_benchmark` at every shape of :data:`sparsediff.bench.MODEL_SHAPES`,
   densities 5 / 10 / 25 / 50 %, bf16, blocks 128 and 64: the Triton kernel vs dense SDPA (flash, cuDNN) and
   compiled FlexAttention with the same mask (random block masks, equal blocks per row).
3. **fwd_bwd** -- forward and forward + backward of the op vs dense SDPA at the Flux and Wan2.1-1.3B
   shapes (the op's own backward: the Triton kernels on a GPU), with the peak memory of each.
4. **e2e** -- one transformer forward of Wan2.1-1.3B (480p, 81 frames: 21 x 30 x 52 tokens) and
   HunyuanVideo (720p, 33 frames: 9 x 45 x 80 tokens + 256 text) built from their published configs with
   random weights (nothing is downloaded; parameters in bf16 except the modules diffusers keeps in fp32),
   dense vs :func:`sparsediff.enable_sparse_attention` with the family default plan and with uniform
   ``tile`` plans whose windows give densities near 10 / 25 / 50 %: ms per forward, peak memory, and the
   50-step time with the family's dense warm-up estimated from them.

It writes ``DIR/gpucheck.md`` (tables; the environment -- GPU, driver, versions, date, commit, exact
command) and ``DIR/gpucheck.json`` (everything) after every item, so a crash or an outer timeout keeps
what ran, and prints the Markdown at the end.

**Budget.** Measured from the start of :func:`main`. Before every item its time is estimated (a FLOP
model, scaled by what the section's earlier items took against their estimates) and the item is run only
if it fits before its section's deadline -- cumulative fractions of the budget (:data:`SECTION_END`:
correctness by 45 %, kernel 72 %, fwd_bwd 78 %, e2e 100 %), so every section keeps a share and time an
earlier one leaves unused passes on. An item that does not fit is listed as skipped with the reason; a
running item is never interrupted (pytest: tests not yet started at the deadline are skipped).

**Exit status**: 0 when every correctness check ran and passed; 1 otherwise (a check failed, or did not
run: skipped for the budget, or the source tree's ``tests/`` is missing); 2 for a usage error.

``--dry-run``: the same code at tiny sizes -- without a GPU on CPU: the kernel under Triton's interpreter (the
command re-executes itself with ``TRITON_INTERPRET=1``), the PyTorch twin in the timings, the first three
tests of each test file, two-layer transformers with the same structure -- in well under a minute, so CI runs it and the script
cannot rot. ``--sections`` runs a subset (e.g. ``--sections e2e`` to redo the end-to-end part; the exit
status is then 1: no correctness check ran) and ``--shapes`` replaces the kernel section's shapes (e.g. those
a first run skipped for the budget: ``--sections kernel --shapes wan2.1-14b,hunyuanvideo``).

Run it from a source checkout (the correctness section reads ``tests/``)::

    python -m sparsediff.gpucheck --out gpucheck-out            # on the GPU, ~8 min
    python -m sparsediff.gpucheck --dry-run --out /tmp/gc       # CPU smoke run, < 1 min
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import logging
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import bench
from .bench import MODEL_SHAPES, Shape, environment_header, format_table, random_block_mask, run_benchmark
from .mask import BlockSparseMask
from .ops import block_sparse_attention, triton_reasons
from .reference import attention_ref

logger = logging.getLogger("sparsediff.gpucheck")  # also when run as __main__

__all__ = ["main", "SECTIONS", "SECTION_END", "Budget", "Sizes", "sizes_for"]

SECTIONS = ("correctness", "kernel", "fwd_bwd", "e2e")
#: Cumulative deadline of each section as a fraction of the budget.
SECTION_END = {"correctness": 0.45, "kernel": 0.72, "fwd_bwd": 0.78, "e2e": 1.0}
#: In this order: the kernel tests first (the ones that need the GPU), the op tests (mostly the CPU twin) last.
PYTEST_FILES = (
    "tests/test_kernel.py",
    "tests/test_backward.py",
    "tests/test_lse_cache.py",
    "tests/test_op.py",
)
#: Block size of the end-to-end runs (the op's default, what users get).
E2E_BLOCK = 64
_BUDGET_SKIP = "gpucheck: budget"  # marker of tests skipped at the deadline
_ROOT = Path(__file__).resolve().parent.parent  # the source checkout (tests/ lives here)


# ------------------------------------------------------------------------------------------------ sizes
@dataclass(frozen=True)
class FwdCase:
    """One direct kernel check: q ``[B, H, Nq, D]``, k/v ``[B, H, Nk, D]``, a random block mask."""

    B: int
    H: int
    nq: int
    nk: int
    D: int
    block: int
    bnhd: bool = True  # q/k/v are transpose views of diffusers' [B, N, H, D] buffers
    per_batch_mask: bool = False  # mask batch B (else 1, shared)
    empty_rows: bool = False  # some query blocks list no key block (out 0, lse -inf)
    density: float = 0.3

    def label(self, dtype: torch.dtype) -> str:
        n = f"N={self.nq}" if self.nq == self.nk else f"Nq={self.nq} Nk={self.nk}"
        parts = [
            f"{_dt(dtype)} {n} B={self.B} H={self.H} D={self.D} block {self.block}",
            "[B,N,H,D] view" if self.bnhd else "[B,H,N,D]",
        ]
        if self.per_batch_mask:
            parts.append("per-batch mask")
        if self.empty_rows:
            parts.append("empty rows")
        return ", ".join(parts)


@dataclass(frozen=True)
class ModelSpec:
    """A transformer built from its config with random weights, and the inputs of one forward call."""

    label: str
    cls_name: str  # diffusers class
    config: Mapping[str, Any]
    latent: tuple[int, int, int, int]  # C, F, H, W of hidden_states (B = 1)
    text_len: int  # encoder_hidden_states tokens
    text_dim: int
    text_valid: int | None = None  # HunyuanVideo: valid (unpadded) text tokens; the rest is masked
    pooled_dim: int | None = None  # HunyuanVideo: pooled_projections width
    calls_per_step: int = 1  # transformer calls per denoising step (Wan: CFG as two calls)


#: Wan2.1-T2V-1.3B, the published config (Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json).
WAN21_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)  # fmt: skip
#: HunyuanVideo, the published config (= diffusers' HunyuanVideoTransformer3DModel defaults).
HUNYUAN_VIDEO = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)  # fmt: skip


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the real run and ``--dry-run`` (the code paths are the same)."""

    dtypes: tuple[torch.dtype, ...]
    fwd_cases: tuple[FwdCase, ...]
    bwd_cases: tuple[FwdCase, ...]  # each in every dtype
    pytest_per_file: int | None  # run only the first n tests of each file (None: every test not marked slow)
    kernel_shapes: tuple[Shape, ...]
    densities: tuple[float, ...]
    blocks: tuple[int, ...]
    warmup: int
    reps: int
    fwd_bwd_shapes: tuple[Shape, ...]
    fwd_bwd_densities: tuple[float, ...]
    fwd_bwd_block: int
    models: tuple[ModelSpec, ...]
    e2e_densities: tuple[float, ...]
    e2e_warmup: int
    e2e_reps: int
    e2e_steps: int  # steps of the 50-step estimate
    flops_per_s: float  # assumed throughput for the time estimates (scaled by measurements)
    overhead_s: float  # fixed cost per timed item (compiles, mask building) for the estimates


def sizes_for(dry_run: bool) -> Sizes:
    """The real sizes (a GPU, ~8 min) or the dry-run's (tiny, CPU, < 1 min)."""
    bf16, fp16 = torch.bfloat16, torch.float16
    if not dry_run:
        return Sizes(
            dtypes=(bf16, fp16),
            fwd_cases=(
                FwdCase(1, 4, 1000, 1000, 64, 64),
                FwdCase(2, 3, 4099, 4099, 96, 128, per_batch_mask=True),
                FwdCase(1, 2, 4099, 4099, 128, 64, bnhd=False),
                FwdCase(2, 2, 1000, 4099, 128, 128, per_batch_mask=True),
                FwdCase(1, 2, 1000, 1000, 128, 64, empty_rows=True),
            ),
            bwd_cases=(
                FwdCase(1, 2, 1000, 1000, 64, 64),
                FwdCase(2, 2, 1000, 4099, 96, 128, per_batch_mask=True),
                FwdCase(1, 2, 1000, 1000, 128, 64, bnhd=False),
            ),
            pytest_per_file=None,
            kernel_shapes=tuple(
                MODEL_SHAPES[k] for k in ("wan2.1-1.3b", "cogvideox", "flux", "wan2.1-14b", "hunyuanvideo")
            ),
            densities=(0.05, 0.1, 0.25, 0.5),
            blocks=(128, 64),
            warmup=2,
            reps=5,
            fwd_bwd_shapes=(MODEL_SHAPES["flux"], MODEL_SHAPES["wan2.1-1.3b"]),
            fwd_bwd_densities=(0.1, 0.5),
            fwd_bwd_block=64,
            models=(
                ModelSpec(
                    "Wan2.1-1.3B 480p 81f",
                    "WanTransformer3DModel",
                    WAN21_1_3B,
                    (16, 21, 60, 104),
                    text_len=512,
                    text_dim=4096,
                    calls_per_step=2,
                ),
                ModelSpec(
                    "HunyuanVideo 720p 33f",
                    "HunyuanVideoTransformer3DModel",
                    HUNYUAN_VIDEO,
                    (16, 9, 90, 160),
                    text_len=256,
                    text_dim=4096,
                    text_valid=80,
                    pooled_dim=768,
                ),
            ),
            e2e_densities=(0.1, 0.25, 0.5),
            e2e_warmup=1,
            e2e_reps=2,
            e2e_steps=50,
            flops_per_s=300e12,
            overhead_s=3.0,
        )
    tiny_wan = {
        **WAN21_1_3B,
        "num_attention_heads": 2,
        "attention_head_dim": 64,
        "text_dim": 64,
        "freq_dim": 32,
        "ffn_dim": 128,
        "num_layers": 2,
    }
    tiny_hy = {
        **HUNYUAN_VIDEO,
        "num_attention_heads": 2,
        "attention_head_dim": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "num_refiner_layers": 1,
        "mlp_ratio": 2.0,
        "text_embed_dim": 32,
        "pooled_projection_dim": 32,
        "rope_axes_dim": (16, 24, 24),
    }
    return Sizes(
        dtypes=(bf16, fp16),
        fwd_cases=(
            FwdCase(1, 2, 97, 97, 64, 64),
            FwdCase(2, 2, 200, 200, 96, 128, per_batch_mask=True),
            FwdCase(1, 2, 130, 130, 128, 64, bnhd=False),
            FwdCase(2, 1, 97, 200, 128, 128, per_batch_mask=True),
            FwdCase(1, 2, 200, 200, 128, 64, empty_rows=True),
        ),
        bwd_cases=(
            FwdCase(1, 2, 130, 130, 64, 64),
            FwdCase(2, 2, 97, 200, 96, 128, per_batch_mask=True),
            FwdCase(1, 2, 130, 130, 128, 64, bnhd=False),
        ),
        pytest_per_file=3,
        kernel_shapes=(Shape("dry-run 512", 512, 2, 64), Shape("dry-run ragged 333", 333, 2, 128)),
        densities=(0.05, 0.1, 0.25, 0.5),
        blocks=(128, 64),
        warmup=0,
        reps=1,
        fwd_bwd_shapes=(Shape("dry-run 512", 512, 2, 64),),
        fwd_bwd_densities=(0.1, 0.5),
        fwd_bwd_block=64,
        models=(
            ModelSpec(
                "tiny Wan (2 layers)",
                "WanTransformer3DModel",
                tiny_wan,
                (16, 5, 16, 24),
                text_len=8,
                text_dim=64,
                calls_per_step=2,
            ),
            ModelSpec(
                "tiny HunyuanVideo (2+2 layers)",
                "HunyuanVideoTransformer3DModel",
                tiny_hy,
                (16, 3, 16, 16),
                text_len=16,
                text_dim=32,
                text_valid=8,
                pooled_dim=32,
            ),
        ),
        e2e_densities=(0.1, 0.25, 0.5),
        e2e_warmup=0,
        e2e_reps=1,
        e2e_steps=50,
        flops_per_s=2e9,
        overhead_s=0.1,
    )


# ----------------------------------------------------------------------------------------------- budget
class Budget:
    """The global time budget: elapsed time, section deadlines, estimates scaled by measurements."""

    def __init__(self, total_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.total = float(total_s)
        self.clock = clock
        self.start = clock()
        self._seen: dict[str, list[float]] = {}  # section -> [sum of estimates, sum of measured times]

    def elapsed(self) -> float:
        return self.clock() - self.start

    def deadline(self, section: str) -> float:
        """Seconds from the start by which ``section`` must be done."""
        return self.total * SECTION_END[section]

    def left(self, section: str) -> float:
        return self.deadline(section) - self.elapsed()

    def estimate(self, section: str, prior_s: float) -> float:
        """``prior_s`` scaled by measured / estimated time of the section's earlier items (0.5x .. 5x)."""
        prior, actual = self._seen.get(section, (0.0, 0.0))
        factor = min(5.0, max(0.5, actual / prior)) if prior > 0 else 1.0
        return prior_s * factor

    def check(self, section: str, prior_s: float) -> str | None:
        """None when an item estimated at ``prior_s`` fits before the section's deadline, else the reason."""
        est, left = self.estimate(section, prior_s), self.left(section)
        if est <= left:
            return None
        return (
            f"needs ~{est:.0f} s, {max(left, 0.0):.0f} s left before the {section} deadline "
            f"({self.deadline(section):.0f} s of the {self.total:.0f} s budget)"
        )

    def observe(self, section: str, prior_s: float, actual_s: float) -> None:
        s = self._seen.setdefault(section, [0.0, 0.0])
        s[0] += prior_s
        s[1] += actual_s


# ----------------------------------------------------------------------------------------------- report
class Report:
    """Results so far; :meth:`write` rewrites ``gpucheck.md`` / ``gpucheck.json`` (after every item)."""

    def __init__(self, out_dir: Path, device: torch.device, argv: Sequence[str], sizes: Sizes, args) -> None:
        self.out_dir = out_dir
        self.device = device
        self.header = environment_header(device)
        self.data: dict[str, Any] = {
            "command": "python -m sparsediff.gpucheck " + shlex.join(argv),
            "dry_run": bool(args.dry_run),
            "budget_s": args.budget_s,
            "sections_run": list(args.sections),
            "section_end": SECTION_END,
            "environment": _environment(device),
            "settings": _settings(sizes),
            "correctness": [],
            "kernel": [],
            "fwd_bwd": [],
            "e2e": [],
            "skipped": [],
            "errors": [],
            "elapsed_s": 0.0,
            "finished": False,
            "all_correct": False,
        }

    def add(self, section: str, row: dict) -> None:
        self.data[section].append(row)

    def skip(self, section: str, item: str, reason: str) -> None:
        logger.warning("gpucheck: skipped %s / %s: %s", section, item, reason)
        self.data["skipped"].append({"section": section, "item": item, "reason": reason})

    def error(self, section: str, item: str, exc: BaseException) -> None:
        logger.error("gpucheck: %s / %s failed: %s", section, item, _exc_line(exc))
        self.data["errors"].append(
            {"section": section, "item": item, "error": _exc_line(exc), "traceback": _tb(exc)}
        )

    def all_correct(self) -> bool:
        checks = self.data["correctness"]
        return bool(checks) and all(c["status"] == "pass" for c in checks)

    def write(self, elapsed: float, finished: bool = False) -> str:
        self.data["elapsed_s"] = round(elapsed, 1)
        self.data["finished"] = finished
        self.data["all_correct"] = self.all_correct()
        md = self.markdown()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / "gpucheck.json").write_text(json.dumps(_json_safe(self.data), indent=1) + "\n")
        (self.out_dir / "gpucheck.md").write_text(md + "\n")
        return md

    # -------------------------------------------------------------- markdown
    def markdown(self) -> str:
        d, env = self.data, self.data["environment"]
        lines = ["# sparsediff GPU check" + (" (dry run)" if d["dry_run"] else ""), "", self.header + "  "]
        extra = []
        if env.get("driver"):
            extra.append(f"driver {env['driver']}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}")
        extra.append(f"diffusers {env.get('diffusers')}, sparsediff {env.get('sparsediff')}")
        if env.get("commit"):
            extra.append(f"commit {env['commit']}")
        lines.append(", ".join(extra) + "  ")
        lines.append(f"command: `{d['command']}`  ")
        state = "finished" if d["finished"] else "**unfinished** (partial results)"
        lines.append(f"budget {d['budget_s']:.0f} s, elapsed {d['elapsed_s']:.0f} s, {state}")
        lines += ["", "## Correctness", ""]
        checks = d["correctness"]
        if checks:
            bad = [c for c in checks if c["status"] != "pass"]
            lines.append(
                f"**{len(checks) - len(bad)} of {len(checks)} checks passed**"
                + (f" -- not passed: {', '.join(c['name'] for c in bad)}" if bad else "")
            )
            lines += ["", "| check | result | detail | s |", "|---|---|---|---:|"]
            for c in checks:
                lines.append(f"| {c['name']} | {c['status']} | {_cell(c['detail'])} | {c['seconds']:.1f} |")
        else:
            lines.append("(no checks ran)")
        s = d["settings"]
        lines += ["", "## Kernel: block-sparse forward vs dense SDPA and FlexAttention", ""]
        lines.append(
            f"sparse = {s['kernel_backend']}; {s['dtype']}; B = 1; {s['stat']} of {s['reps']} after "
            f"{s['warmup']} warm-up; random block masks (equal blocks per row); `sparsediff.bench.run_benchmark`"
        )
        rows = d["kernel"]
        if rows:
            for block in sorted({r["block"] for r in rows}, reverse=True):
                lines += [
                    "",
                    f"### block {block}",
                    "",
                    format_table([r for r in rows if r["block"] == block]),
                ]
        else:
            lines += ["", "(no rows)"]
        lines += ["", "## Kernel: forward + backward vs dense SDPA", ""]
        lines.append(
            f"the op (forward and its own backward: {s['kernel_backend']}) vs "
            f"`F.scaled_dot_product_attention` (default backend); {s['dtype']}, B = 1, block "
            f"{s['fwd_bwd_block']}; peak = memory allocated above the inputs"
        )
        lines += ["", _fwd_bwd_table(d["fwd_bwd"])]
        lines += ["", "## End to end: one transformer forward, random weights", ""]
        lines.append(
            f"bf16 parameters (diffusers' fp32 modules kept in fp32), B = 1, {s['e2e_stat']} of "
            f"{s['e2e_reps']} forwards after {s['e2e_warmup']} warm-up, sparse = hooks with backend "
            f"{s['e2e_backend']!r}, block {E2E_BLOCK} (the default), every call a sparse step "
            "(dense_steps=0); density = mean over the layers that ran sparse (the default plan keeps layer 0 "
            "dense); peak = `torch.cuda.max_memory_allocated` over the forwards, weights included; "
            f"'{s['e2e_steps']} steps' = {s['e2e_steps']} x calls per step (Wan: 2, CFG) x (the family's "
            "dense warm-up steps at the dense time + the rest at the row's time)"
        )
        lines += ["", _e2e_table(d["e2e"])]
        lines += ["", "## Skipped or failed items", ""]
        if d["skipped"] or d["errors"]:
            lines += ["| section | item | reason |", "|---|---|---|"]
            for x in d["skipped"]:
                lines.append(f"| {x['section']} | {x['item']} | skipped: {_cell(x['reason'])} |")
            for x in d["errors"]:
                lines.append(f"| {x['section']} | {x['item']} | error: {_cell(x['error'])} |")
        else:
            lines.append("nothing skipped, no errors")
        return "\n".join(lines)


def _fwd_bwd_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "(no rows)"
    head = [
        "model",
        "N",
        "H×D",
        "block",
        "density",
        "ms fwd sparse",
        "ms fwd SDPA",
        "ms fwd+bwd sparse",
        "ms fwd+bwd SDPA",
        "fwd+bwd speedup",
        "peak MiB sparse",
        "peak MiB SDPA",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        cells = [r["model"], str(r["N"]), r["HxD"], str(r["block"]), f"{100 * r['density']:.1f} %"]
        cells += [_f(r[k]) for k in ("ms_fwd_sparse", "ms_fwd_sdpa", "ms_fwdbwd_sparse", "ms_fwdbwd_sdpa")]
        cells += [
            _f(r["speedup_fwdbwd"], "{:.2f}×"),
            _f(r["peak_mib_sparse"], "{:.0f}"),
            _f(r["peak_mib_sdpa"], "{:.0f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _e2e_table(rows: Sequence[dict]) -> str:
    if not rows:
        return "(no rows)"
    head = [
        "model",
        "tokens",
        "variant",
        "plan",
        "density",
        "ms / forward",
        "speedup",
        "peak GiB",
        "layer calls sparse / dense",
        "finite",
        "50 steps s (est.)",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        dense = ", ".join(f"{k} ×{v}" for k, v in sorted(r["dense_calls"].items())) or "0"
        cells = [
            r["model"],
            str(r["tokens"]),
            r["variant"],
            _cell(r["plan"]),
            "n/a" if r["density"] is None else f"{100 * r['density']:.1f} %",
            _f(r["ms"]),
            _f(r["speedup"], "{:.2f}×"),
            _f(r["peak_gib"]),
            f"{r['sparse_calls']} / {dense}",
            "yes" if r["finite"] else "**no**",
            _f(r["est_steps_s"], "{:.1f}"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _f(x, spec: str = "{:.2f}") -> str:
    return "n/a" if x is None else spec.format(x)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _dt(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _exc_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0][:300] if msg else ''}"


def _tb(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-4000:]


def _json_safe(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# ------------------------------------------------------------------------------------------ environment
def _environment(device: torch.device) -> dict[str, Any]:
    import importlib.metadata as md

    from . import __version__

    def version(dist: str) -> str | None:
        try:
            return md.version(dist)
        except md.PackageNotFoundError:
            return None

    env: dict[str, Any] = {
        "date_utc": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M}",
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": version("triton"),
        "diffusers": version("diffusers"),
        "sparsediff": __version__,
        "commit": _git_commit(),
        "cpu": bench._cpu_name(),
        "torch_threads": torch.get_num_threads(),
        "triton_interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            sms=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            driver=_driver_version(device),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    return env


def _run_quiet(cmd: Sequence[str]) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=20, cwd=_ROOT)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def _git_commit() -> str | None:
    if not (_ROOT / ".git").exists():
        return None
    head = _run_quiet(["git", "rev-parse", "--short=12", "HEAD"])
    if head is None:
        return None
    dirty = _run_quiet(["git", "status", "--porcelain", "--untracked-files=no"])
    return head + (" + uncommitted changes" if dirty else "")


def _driver_version(device: torch.device) -> str | None:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    out = _run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", str(idx)])
    if out:
        return out.splitlines()[0].strip()
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip()
    except OSError:
        return None


def _settings(sizes: Sizes) -> dict[str, Any]:
    d = asdict(sizes)
    d["dtypes"] = [_dt(t) for t in sizes.dtypes]
    d["models"] = [{**asdict(m), "config": dict(m.config)} for m in sizes.models]
    return d


# ------------------------------------------------------------------------------------------ correctness
def _load_tolerance():
    """``tests/tolerance.py``: the suite's one tolerance rule (the direct checks use it too)."""
    path = _ROOT / "tests" / "tolerance.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run gpucheck from a source checkout of sparsediff")
    spec = importlib.util.spec_from_file_location("_sparsediff_gpucheck_tolerance", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _case_inputs(case: FwdCase, dtype: torch.dtype, device: torch.device, seed: int, grad: bool = False):
    """q/k/v leaves (``[B, N, H, D]`` or ``[B, H, N, D]`` buffers) and the mask; ``view(x)`` gives the
    op's ``[B, H, N, D]`` view of a leaf."""
    g = torch.Generator().manual_seed(seed)

    def buf(n: int) -> torch.Tensor:
        shape = (case.B, n, case.H, case.D) if case.bnhd else (case.B, case.H, n, case.D)
        return torch.randn(shape, generator=g).to(device, dtype).requires_grad_(grad)

    q, k, v = buf(case.nq), buf(case.nk), buf(case.nk)
    qb, kb = -(-case.nq // case.block), -(-case.nk // case.block)
    bm = case.B if case.per_batch_mask else 1
    bb = torch.rand(bm, case.H, qb, kb, generator=g) < case.density
    rows = torch.arange(qb)
    bb[:, :, rows, (rows * kb) // qb] = True  # every row attends somewhere ...
    if case.empty_rows:  # ... except every third query block of head 0
        bb[:, 0, ::3] = False
    mask = BlockSparseMask.from_dense(bb, case.block, (case.nq, case.nk)).to(device)
    return (q, k, v), mask


def _view(case: FwdCase) -> Callable[[torch.Tensor], torch.Tensor]:
    return (lambda x: x.transpose(1, 2)) if case.bnhd else (lambda x: x)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.float(), ref.float()
    fin = torch.isfinite(ref)
    return (a - ref)[fin].abs().max().item() if fin.any() else 0.0


def forward_check(case: FwdCase, dtype: torch.dtype, device: torch.device, backend: str, tol) -> str:
    """The op vs the fp32 oracle (out and lse) at ``case``; raises AssertionError when out of tolerance."""
    (q, k, v), mask = _case_inputs(case, dtype, device, seed=case.nq * 31 + case.D)
    qv, kv, vv = (_view(case)(x) for x in (q, k, v))
    out, lse = block_sparse_attention(qv, kv, vv, mask, return_lse=True, backend=backend)
    if out.shape != qv.shape or out.dtype != qv.dtype or out.stride() != qv.stride():
        raise AssertionError(
            f"out shape/dtype/strides {tuple(out.shape)} {out.dtype} {out.stride()} != q's "
            f"{tuple(qv.shape)} {qv.dtype} {qv.stride()}"
        )
    tok = mask.to_token_mask()
    o_ref, lse_ref = attention_ref(qv, kv, vv, tok)
    o_naive, _ = attention_ref(qv, kv, vv, tok, upcast=False)
    del tok
    tol.assert_close_to_oracle(out, o_ref, o_naive, what="out vs fp32 oracle")
    tol.assert_close_to_oracle(lse, lse_ref, what="lse vs fp32 oracle")
    return (
        f"out err {_max_err(out, o_ref):.1e} (naive {_dt(dtype)} {_max_err(o_naive, o_ref):.1e}), "
        f"lse err {_max_err(lse, lse_ref):.1e}, density {mask.density():.2f}"
    )


def backward_check(case: FwdCase, dtype: torch.dtype, device: torch.device, backend: str, tol) -> str:
    """dq/dk/dv of the op vs autograd of the fp32 oracle (tolerance vs the naive same-dtype autograd)."""
    (q, k, v), mask = _case_inputs(case, dtype, device, seed=case.nq * 17 + case.D, grad=True)
    view = _view(case)
    tok = mask.to_token_mask()
    out = block_sparse_attention(view(q), view(k), view(v), mask, backend=backend)
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(device, dtype)
    got = torch.autograd.grad(out, (q, k, v), go)
    leaves32 = [x.detach().float().requires_grad_(True) for x in (q, k, v)]
    o_ref, _ = attention_ref(*(view(x) for x in leaves32), tok)
    ref = torch.autograd.grad(o_ref, leaves32, go.float())
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    o_naive, _ = attention_ref(*(view(x) for x in leaves), tok, upcast=False)
    naive = torch.autograd.grad(o_naive, leaves, go)
    errs = []
    for name, a, r, n in zip(("dq", "dk", "dv"), got, ref, naive):
        tol.assert_close_to_oracle(a, r, n, what=f"{name} vs fp32 oracle autograd")
        errs.append(f"{name} {_max_err(a, r):.1e} (naive {_max_err(n, r):.1e})")
    return "max err " + ", ".join(errs)


def _pytest_recorder(deadline: Callable[[], float], clock: Callable[[], float], per_file: int | None):
    import pytest

    class Recorder:
        """pytest plugin: keeps the first ``per_file`` tests of each file (all when None), records every
        report, and skips the tests not started by the deadline."""

        def __init__(self) -> None:
            # (file, nodeid, phase, outcome, message, seconds)
            self.reports: list[tuple[str, str, str, str, str, float]] = []
            # (file, outcome, message) of modules that failed to collect or were skipped whole
            self.collect: list[tuple[str, str, str]] = []

        def pytest_collection_modifyitems(self, config, items) -> None:
            if per_file is None:
                return
            seen: dict[str, int] = {}
            keep, drop = [], []
            for item in items:
                f = item.nodeid.split("::")[0]
                seen[f] = seen.get(f, 0) + 1
                (keep if seen[f] <= per_file else drop).append(item)
            if drop:
                config.hook.pytest_deselected(items=drop)
                items[:] = keep

        @pytest.hookimpl(tryfirst=True)
        def pytest_runtest_setup(self, item) -> None:
            if clock() > deadline():
                pytest.skip(f"{_BUDGET_SKIP}: not started before the correctness deadline")

        def pytest_runtest_logreport(self, report) -> None:
            self.reports.append(
                (
                    report.nodeid.split("::")[0],
                    report.nodeid,
                    report.when,
                    report.outcome,
                    _message(report),
                    float(getattr(report, "duration", 0.0) or 0.0),
                )
            )

        def pytest_collectreport(self, report) -> None:
            if report.failed or report.skipped:
                self.collect.append((report.nodeid.split("::")[0], report.outcome, _message(report)))

    return Recorder()


def _message(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2])
    if report.failed:
        return str(report.longrepr)[-1500:]
    return ""


def run_pytest(
    files: Sequence[str],
    per_file: int | None,
    log_path: Path,
    deadline: Callable[[], float],
    clock: Callable[[], float] = time.monotonic,
) -> list[dict]:
    """pytest on ``files`` (repo-relative; ``-m "not slow"``; only the first ``per_file`` tests of each when
    given) in this process, its output to ``log_path``. One entry per file: ``fail`` if a test or the
    collection failed, else ``skip`` if tests were left out for the budget or none passed, else ``pass``."""
    import pytest

    rec = _pytest_recorder(deadline, clock, per_file)
    args = [str(_ROOT / f) for f in files]
    args += ["-m", "not slow", "-q", "-p", "no:cacheprovider", f"--rootdir={_ROOT}"]
    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        rc = pytest.main(args, plugins=[rec])
    entries = []
    for f in files:
        mine = [r for r in rec.reports if r[0] == f]
        coll = [c for c in rec.collect if c[0] == f]
        failed = sorted({r[1] for r in mine if r[3] == "failed"})
        errors = [c[2] for c in coll if c[1] == "failed"]
        passed = [r for r in mine if r[2] == "call" and r[3] == "passed"]
        skipped = [r for r in mine if r[3] == "skipped"]
        budget = [r for r in skipped if r[4].startswith(_BUDGET_SKIP)]
        reasons: dict[str, int] = {}
        for msg in [r[4] for r in skipped if not r[4].startswith(_BUDGET_SKIP)] + [
            c[2] for c in coll if c[1] == "skipped"
        ]:
            reasons[msg[:100]] = reasons.get(msg[:100], 0) + 1
        detail = f"{len(passed)} passed, {len(failed)} failed, {len(skipped)} skipped"
        if reasons:
            detail += " (" + "; ".join(f"{k} ×{v}" for k, v in reasons.items()) + ")"
        if budget:
            detail += f"; {len(budget)} not run: budget"
        if errors:
            detail += "; collection error: " + errors[0].strip().splitlines()[-1][:200]
        if failed:
            detail += "; failed: " + ", ".join(n.split("::", 1)[-1] for n in failed[:8])
            detail += " ..." if len(failed) > 8 else ""
        status = "fail" if (failed or errors) else "skip" if (budget or not passed) else "pass"
        entries.append(
            {
                "name": f"pytest {f}" + (f" (first {per_file} tests)" if per_file else ""),
                "status": status,
                "detail": detail,
                "seconds": sum(r[5] for r in mine),
                "failed": failed,
                "pytest_exit_code": int(rc),
                "failures": {r[1]: r[4] for r in mine if r[3] == "failed"},
            }
        )
    return entries


def _run_check(name: str, fn: Callable[[], str]) -> dict:
    t0 = time.perf_counter()
    try:
        detail, status = fn(), "pass"
    except AssertionError as e:
        detail, status = str(e).strip().splitlines()[0][:400], "fail"
    except Exception as e:  # a crash is a failed check; the next check still runs
        detail, status = _exc_line(e), "fail"
        logger.debug("%s", _tb(e))
    secs = time.perf_counter() - t0
    logger.info("gpucheck: %s: %s (%s, %.1f s)", name, status, detail, secs)
    return {"name": name, "status": status, "detail": detail, "seconds": secs}


def run_correctness(sizes: Sizes, device: torch.device, budget: Budget, report: Report) -> None:
    sec = "correctness"
    backend = "triton"
    probe = torch.empty(1, 1, 1, 16, device=device)
    if device.type == "cpu" and triton_reasons(probe):  # CPU without the interpreter: the twin
        backend = "reference"
    try:
        tol = _load_tolerance()
    except Exception as e:
        tol, tol_error = None, e
    cases: list[tuple[str, Callable[[], str], float]] = []
    unit = sizes.overhead_s  # a direct check: mostly compile / launch time
    for case in sizes.fwd_cases:
        for dt in sizes.dtypes:
            cases.append(
                (
                    f"forward {case.label(dt)}",
                    lambda c=case, d=dt: forward_check(c, d, device, backend, tol),
                    unit,
                )
            )
    for case in sizes.bwd_cases:
        for dt in sizes.dtypes:
            cases.append(
                (
                    f"backward {case.label(dt)}",
                    lambda c=case, d=dt: backward_check(c, d, device, backend, tol),
                    unit,
                )
            )
    for name, fn, prior in cases:
        name = f"{name} [{backend}]"
        if tol is None:
            report.add(sec, {"name": name, "status": "skip", "detail": _exc_line(tol_error), "seconds": 0.0})
            continue
        reason = budget.check(sec, prior)
        if reason:
            report.add(sec, {"name": name, "status": "skip", "detail": "budget: " + reason, "seconds": 0.0})
            report.skip(sec, name, reason)
            continue
        entry = _run_check(name, fn)
        budget.observe(sec, prior, entry["seconds"])
        report.add(sec, entry)
        report.write(budget.elapsed())
    # pytest: the suite's kernel / op / LSE (/ backward) tests, natively on the GPU
    files = list(PYTEST_FILES)
    suffix = f" (first {sizes.pytest_per_file} tests)" if sizes.pytest_per_file else ""
    names = [f"pytest {f}{suffix}" for f in files]
    missing = [f for f in files if not (_ROOT / f).is_file()]
    why = None
    if missing:
        why = f"{', '.join(missing)} not found: run gpucheck from a source checkout"
    elif importlib.util.find_spec("pytest") is None:
        why = "pytest is not installed (pip install sparsediff[test])"
    elif budget.left(sec) < 5 * sizes.overhead_s:
        why = "budget: " + (budget.check(sec, 5 * sizes.overhead_s) or "no time left")
    if why:
        for n in names:
            report.add(sec, {"name": n, "status": "skip", "detail": why, "seconds": 0.0})
            report.skip(sec, n, why)
        return
    try:
        entries = run_pytest(
            files,
            sizes.pytest_per_file,
            report.out_dir / "pytest.log",
            deadline=lambda: budget.start + budget.deadline(sec),
            clock=budget.clock,
        )
    except Exception as e:
        entries = [{"name": n, "status": "fail", "detail": _exc_line(e), "seconds": 0.0} for n in names]
    for entry in entries:
        entry["detail"] += "; log: pytest.log"
        report.add(sec, entry)
    report.write(budget.elapsed())


# ----------------------------------------------------------------------------------------------- kernel
def _dense_s(sizes: Sizes, n: int, h: int, d: int, nk: int | None = None) -> float:
    """Estimated seconds of one dense attention forward."""
    return 4.0 * n * (nk or n) * h * d / sizes.flops_per_s


def run_kernel(sizes: Sizes, device: torch.device, budget: Budget, report: Report, backend: str) -> None:
    sec = "kernel"
    cuda = device.type == "cuda"
    dens = sum(sizes.densities)
    for shp in sizes.kernel_shapes:
        for block in sizes.blocks:
            item = f"{shp.name} block {block}"
            t_d = _dense_s(sizes, shp.seq_len, shp.heads, shp.head_dim)
            calls = (
                (sizes.warmup + sizes.reps) * (2 + 2.5 * dens)
                if cuda
                else (sizes.warmup + sizes.reps) * (1 + dens) * 2
            )
            nb = -(-shp.seq_len // block)
            masks = len(sizes.densities) * shp.heads * nb * nb * 5e-8
            prior = calls * t_d + masks + (20.0 if cuda else 0.0) + sizes.overhead_s
            reason = budget.check(sec, prior)
            if reason:
                report.skip(sec, item, reason)
                continue
            logger.info("gpucheck: kernel %s (~%.0f s)", item, budget.estimate(sec, prior))
            t0 = time.perf_counter()
            try:
                rows = run_benchmark(
                    [shp],
                    sizes.densities,
                    dtype=torch.bfloat16,
                    device=device,
                    block=block,
                    warmup=sizes.warmup,
                    reps=sizes.reps,
                    flex=cuda,
                    backend=backend,
                )
                for r, target in zip(rows, sizes.densities):
                    report.add(sec, {**r, "target_density": target})
            except Exception as e:
                report.error(sec, item, e)
            budget.observe(sec, prior, time.perf_counter() - t0)
            _free(device)
            report.write(budget.elapsed())


def _peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak memory allocated by one call of ``fn`` above what was allocated before (CUDA; else None)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def fwd_bwd_rows(
    shp: Shape,
    densities: Sequence[float],
    block: int,
    device: torch.device,
    backend: str,
    warmup: int,
    reps: int,
) -> list[dict]:
    """Forward and forward + backward of the op vs dense SDPA on ``[B=1, N, H, D]`` transpose views."""
    n, h, d = shp.seq_len, shp.heads, shp.head_dim
    cuda = device.type == "cuda"
    time_ms = bench._timer(cuda, warmup, reps)
    g = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(1, n, h, d, generator=g).to(device, torch.bfloat16).requires_grad_(True) for _ in range(3)
    ]
    go = torch.randn(1, h, n, d, generator=g).to(device, torch.bfloat16)

    def views():
        return [x.transpose(1, 2) for x in leaves]

    def fwd(attn):
        def run():
            with torch.no_grad():
                attn(*views())

        return run

    def fwd_bwd(attn):
        def run():
            for x in leaves:
                x.grad = None
            attn(*views()).backward(go)

        return run

    sdpa = F.scaled_dot_product_attention
    ms_fwd_sdpa, ms_fb_sdpa = time_ms(fwd(sdpa)), time_ms(fwd_bwd(sdpa))
    peak_sdpa = _peak_mib(fwd_bwd(sdpa), device)
    rows = []
    for dens in densities:
        mask = random_block_mask(h, n, block, dens, device=device)

        def op(q, k, v, mask=mask):
            return block_sparse_attention(q, k, v, mask, backend=backend)

        ms_fwd, ms_fb = time_ms(fwd(op)), time_ms(fwd_bwd(op))
        rows.append(
            {
                "model": shp.name,
                "N": n,
                "HxD": f"{h}x{d}",
                "block": block,
                "density": mask.density(),
                "ms_fwd_sparse": ms_fwd,
                "ms_fwd_sdpa": ms_fwd_sdpa,
                "ms_fwdbwd_sparse": ms_fb,
                "ms_fwdbwd_sdpa": ms_fb_sdpa,
                "speedup_fwdbwd": ms_fb_sdpa / ms_fb,
                "peak_mib_sparse": _peak_mib(fwd_bwd(op), device),
                "peak_mib_sdpa": peak_sdpa,
            }
        )
        logger.debug("%s", rows[-1])
    return rows


def run_fwd_bwd(sizes: Sizes, device: torch.device, budget: Budget, report: Report, backend: str) -> None:
    sec = "fwd_bwd"
    for shp in sizes.fwd_bwd_shapes:
        item = f"{shp.name} block {sizes.fwd_bwd_block}"
        t_d = _dense_s(sizes, shp.seq_len, shp.heads, shp.head_dim)
        # per timed call: SDPA fwd 1, fwd+bwd 3.5; the op's fwd+bwd at most ~10x its forward (the CPU twin)
        per = 4.5 + sum(1 + 11 * x for x in sizes.fwd_bwd_densities)
        prior = (sizes.warmup + sizes.reps + 1) * per * t_d + 2 * sizes.overhead_s
        reason = budget.check(sec, prior)
        if reason:
            report.skip(sec, item, reason)
            continue
        logger.info("gpucheck: fwd+bwd %s (~%.0f s)", item, budget.estimate(sec, prior))
        t0 = time.perf_counter()
        try:
            for r in fwd_bwd_rows(
                shp, sizes.fwd_bwd_densities, sizes.fwd_bwd_block, device, backend, sizes.warmup, sizes.reps
            ):
                report.add(sec, r)
        except Exception as e:
            report.error(sec, item, e)
        budget.observe(sec, prior, time.perf_counter() - t0)
        _free(device)
        report.write(budget.elapsed())


# -------------------------------------------------------------------------------------------------- e2e
def build_model(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> torch.nn.Module:
    """``spec.cls_name(**spec.config)`` with random weights on ``device``; parameters cast the way
    ``from_pretrained(torch_dtype=dtype)`` casts them (modules in ``_keep_in_fp32_modules`` stay fp32)."""
    import diffusers

    cls = getattr(diffusers, spec.cls_name)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(**spec.config)
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, p in model.named_parameters():
            target = torch.float32 if any(m in name.split(".") for m in keep) else dtype
            p.data = p.data.to(target)
    return model.eval()


def _param_count(spec: ModelSpec) -> int:
    import diffusers

    with torch.device("meta"):
        m = getattr(diffusers, spec.cls_name)(**spec.config)
    return sum(p.numel() for p in m.parameters())


def model_inputs(
    spec: ModelSpec, device: torch.device, dtype: torch.dtype = torch.bfloat16
) -> dict[str, Any]:
    """Random inputs of one forward (B = 1), without the timestep."""
    g = torch.Generator().manual_seed(1)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    inputs: dict[str, Any] = {
        "hidden_states": rand(1, *spec.latent),
        "encoder_hidden_states": rand(1, spec.text_len, spec.text_dim),
        "return_dict": False,
    }
    if spec.pooled_dim is not None:
        inputs["pooled_projections"] = rand(1, spec.pooled_dim)
    if spec.text_valid is not None:
        m = torch.zeros(1, spec.text_len, dtype=torch.bool)
        m[:, : spec.text_valid] = True
        inputs["encoder_attention_mask"] = m.to(device)
    if spec.cls_name.startswith("HunyuanVideo") and spec.config.get("guidance_embeds", True):
        inputs["guidance"] = torch.tensor([6000.0], device=device, dtype=dtype)
    return inputs


def tile_windows(layout, block: int, targets: Sequence[float]) -> list[tuple[tuple[int, int, int], float]]:
    """For each target density, a ``tile`` window (odd sizes, in tiles) whose static mask at ``layout`` and
    ``block`` has about that density -- the most even one (window / tiles alike on the three axes) within
    15 % of it, else the closest -- with its density."""
    from .patterns import static_mask
    from .patterns.tile import default_tile
    from .specs import HeadSpec

    tile = default_tile(layout.grid, block)
    ntiles = [-(-g // t) for g, t in zip(layout.grid, tile)]
    axes = [list(range(1, n + 2, 2)) for n in ntiles]  # odd windows up to the whole axis
    cands = []
    for wt in axes[0]:
        for wh in axes[1]:
            for ww in axes[2]:
                w = (wt, wh, ww)
                dens = static_mask(layout, HeadSpec.make("tile", window=w), block).density()
                spread = max(a / n for a, n in zip(w, ntiles)) - min(a / n for a, n in zip(w, ntiles))
                cands.append((w, dens, spread))
    out = []
    for t in targets:
        # within 15 % of the target: the most even window (relative to the axes); else the closest
        def key(c, t=t):
            off = abs(math.log(max(c[1], 1e-9) / t))
            return (off > 0.15, c[2] if off <= 0.15 else off)

        w, dens, _ = min(cands, key=key)
        out.append((w, dens))
    return out


def _time_forwards(
    model, inputs, warmup: int, reps: int, device: torch.device
) -> tuple[float, bool, float | None]:
    """(ms per forward, output finite, peak GiB). Each call gets a lower timestep: a new denoising step."""
    cuda = device.type == "cuda"
    count = [0]
    last: list[torch.Tensor] = []

    def forward():
        t = torch.tensor([999.0 - count[0]], device=device)
        count[0] += 1
        with torch.no_grad():
            out = model(**inputs, timestep=t)[0]
        last[:] = [out]

    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    ms = bench._timer(cuda, warmup, reps)(forward)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None
    finite = bool(torch.isfinite(last[0]).all()) if last else False
    return ms, finite, peak


def run_e2e(sizes: Sizes, device: torch.device, budget: Budget, report: Report, backend: str) -> None:
    sec = "e2e"
    from .api import enable_sparse_attention
    from .defaults import family_schedule
    from .pipelines.base import get_adapter
    from .plan import Plan

    cuda = device.type == "cuda"
    n_fwd = sizes.e2e_warmup + sizes.e2e_reps
    for spec in sizes.models:
        variants = ["dense", "default plan"] + [f"tile ≈{100 * x:.0f} %" for x in sizes.e2e_densities]
        try:
            params = _param_count(spec)
        except Exception as e:
            report.error(sec, spec.label, e)
            continue
        c, f, hh, ww = spec.latent
        cfg = spec.config
        p_t, p_h, p_w = (
            cfg["patch_size"]
            if "patch_size_t" not in cfg
            else (cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"])
        )
        tokens = (f // p_t) * (hh // p_h) * (ww // p_w) + (
            spec.text_len if spec.text_valid is not None else 0
        )
        inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        layers = cfg["num_layers"] + cfg.get("num_single_layers", 0)
        t_fwd = (2.0 * params * tokens + layers * 4.0 * tokens * tokens * inner) / sizes.flops_per_s
        build = (5.0 + params * 1e-9) if cuda else sizes.overhead_s
        prior = build + n_fwd * t_fwd + sizes.overhead_s
        reason = budget.check(sec, prior)
        if reason:
            for v in variants:
                report.skip(sec, f"{spec.label}: {v}", reason)
            continue
        logger.info(
            "gpucheck: e2e %s: %.2fB parameters, %d tokens (~%.0f s to build + dense)",
            spec.label,
            params / 1e9,
            tokens,
            budget.estimate(sec, prior),
        )
        t0 = time.perf_counter()
        model = None
        try:
            model = build_model(spec, device)
            inputs = model_inputs(spec, device)
            adapter = get_adapter(model)
            layout = adapter.layout(
                model,
                {
                    "hidden_states": inputs["hidden_states"],
                    "encoder_hidden_states": inputs["encoder_hidden_states"],
                },
            )
            ms_dense, finite, peak = _time_forwards(model, inputs, sizes.e2e_warmup, sizes.e2e_reps, device)
        except Exception as e:
            report.error(sec, f"{spec.label}: build + dense", e)
            for v in variants[1:]:
                report.skip(
                    sec, f"{spec.label}: {v}", "not run: building the model or its dense forward failed"
                )
            budget.observe(sec, prior, time.perf_counter() - t0)
            del model
            _free(device)
            continue
        budget.observe(sec, prior, time.perf_counter() - t0)
        sched = family_schedule(adapter)
        ds = sched["dense_steps"]
        n_dense = math.ceil(ds * sizes.e2e_steps) if isinstance(ds, float) else min(int(ds), sizes.e2e_steps)

        def steps_s(ms: float, dense: bool, n_dense=n_dense, ms_dense=ms_dense, calls=spec.calls_per_step):
            k = sizes.e2e_steps if dense else n_dense
            return calls * (k * ms_dense + (sizes.e2e_steps - k) * ms) / 1e3

        base = {"model": spec.label, "tokens": tokens, "params": params, "layout": str(layout)}
        report.add(
            sec,
            {
                **base,
                "variant": "dense",
                "plan": "(model's own attention)",
                "density": 1.0,
                "ms": ms_dense,
                "speedup": 1.0,
                "peak_gib": peak,
                "sparse_calls": 0,
                "dense_calls": {},
                "finite": finite,
                "est_steps_s": steps_s(ms_dense, True),
            },
        )
        report.write(budget.elapsed())
        default_over: dict[str, Any] = {"dense_steps": 0}
        if tokens < int(sched["min_tokens"]):
            # below the family's token threshold the default would run dense: time its pattern anyway
            # (dry-run / small models); the row's plan summary shows min_tokens
            default_over["min_tokens"] = 0
        plans: list[tuple[str, Any, dict]] = [("default plan", None, default_over)]
        try:
            windows = tile_windows(layout, E2E_BLOCK, sizes.e2e_densities)
        except Exception as e:
            report.error(sec, f"{spec.label}: tile windows", e)
            windows = []
        for (w, _), name in zip(windows, variants[2:]):
            plans.append((name, Plan.uniform("tile", window=w), {}))
        for name in variants[1 + len(plans) :]:
            report.skip(sec, f"{spec.label}: {name}", "no tile window found")
        for name, plan, over in plans:
            item = f"{spec.label}: {name}"
            vprior = n_fwd * ms_dense / 1e3 + sizes.overhead_s
            reason = budget.check(sec, vprior)
            if reason:
                report.skip(sec, item, reason)
                continue
            t1 = time.perf_counter()
            handle = None
            try:
                handle = enable_sparse_attention(model, plan, backend=backend, block_size=E2E_BLOCK, **over)
                ms, finite, peak = _time_forwards(model, inputs, sizes.e2e_warmup, sizes.e2e_reps, device)
                rep = handle.report()["transformer"]
                report.add(
                    sec,
                    {
                        **base,
                        "variant": name,
                        "plan": handle.plans["transformer"].summary(),
                        "density": rep["mean_density"],
                        "ms": ms,
                        "speedup": ms_dense / ms,
                        "peak_gib": peak,
                        "sparse_calls": rep["sparse_calls"],
                        "dense_calls": rep["dense_calls"],
                        "finite": finite,
                        "est_steps_s": steps_s(ms, False),
                        "densities": rep["densities"],
                    },
                )
            except Exception as e:
                report.error(sec, item, e)
            finally:
                if handle is not None:
                    handle.disable()
            budget.observe(sec, vprior, time.perf_counter() - t1)
            report.write(budget.elapsed())
        del model, inputs
        _free(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from .cli_args import Parser, deprecated_alias

    p = Parser(
        prog="python -m sparsediff.gpucheck",
        description="One prepared GPU run: correctness, kernel speed and end-to-end tables "
        "(see the module docstring).",
    )
    p.add_argument(
        "--out", required=True, metavar="DIR", help="folder for gpucheck.md, gpucheck.json and pytest.log"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's files in --out")
    deprecated_alias(p, "--force", "--overwrite")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes (CPU without a GPU), < 1 min")
    p.add_argument(
        "--budget-s", type=float, default=480.0, help="global time budget in seconds (default 480)"
    )
    p.add_argument(
        "--shapes",
        help=f"kernel section: comma list of {','.join(MODEL_SHAPES)} instead of the default shapes "
        "(e.g. those a first run skipped for the budget)",
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma list of {','.join(SECTIONS)} (default: all); the others are listed as skipped",
    )
    return p


_parser = build_parser  # the older name
OUTPUT_FILES = ("gpucheck.md", "gpucheck.json", "pytest.log")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the check; returns the exit status (0: every correctness check passed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        print(f"gpucheck: unknown section(s) {unknown}; choose from {SECTIONS}", file=sys.stderr)
        return 2
    args.sections = sections
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
        )
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        print(
            "gpucheck: no CUDA device; the full run needs a GPU (use --dry-run for the CPU smoke run)",
            file=sys.stderr,
        )
        return 2
    clash = [n for n in OUTPUT_FILES if (Path(args.out) / n).exists()]
    if clash and not args.overwrite:
        print(
            f"gpucheck: {args.out} already holds {', '.join(clash)}; pass --overwrite to replace them",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    budget = Budget(args.budget_s)
    sizes = sizes_for(args.dry_run)
    if args.shapes:
        keys = [k.strip() for k in args.shapes.split(",") if k.strip()]
        bad = [k for k in keys if k not in MODEL_SHAPES]
        if bad or not keys:
            print(f"gpucheck: unknown shape(s) {bad}; choose from {list(MODEL_SHAPES)}", file=sys.stderr)
            return 2
        sizes = replace(sizes, kernel_shapes=tuple(MODEL_SHAPES[k] for k in keys))
    backend = "triton" if cuda else "reference"  # timings: the kernel on a GPU, the twin on CPU
    report = Report(Path(args.out), device, argv, sizes, args)
    report.data["settings"].update(
        kernel_backend="Triton kernel" if cuda else "PyTorch twin (backend='reference')",
        dtype="bf16",
        stat="median" if cuda else "best",
        e2e_backend=backend,
        e2e_stat="median" if cuda else "best",
    )
    report.write(budget.elapsed())
    runners = {
        "correctness": lambda: run_correctness(sizes, device, budget, report),
        "kernel": lambda: run_kernel(sizes, device, budget, report, backend),
        "fwd_bwd": lambda: run_fwd_bwd(sizes, device, budget, report, backend),
        "e2e": lambda: run_e2e(sizes, device, budget, report, backend),
    }
    for sec in SECTIONS:
        if sec not in sections:
            report.skip(sec, "(whole section)", "not selected by --sections")
            if sec == "correctness":
                report.add(
                    sec,
                    {
                        "name": "correctness section",
                        "status": "skip",
                        "detail": "not selected by --sections",
                        "seconds": 0.0,
                    },
                )
            continue
        t0 = budget.elapsed()
        logger.info("gpucheck: section %s at %.0f s (deadline %.0f s)", sec, t0, budget.deadline(sec))
        try:
            runners[sec]()
        except Exception as e:  # a bug in one section must not lose the others
            report.error(sec, "(section)", e)
            if sec == "correctness":
                report.add(
                    sec,
                    {"name": "correctness section", "status": "fail", "detail": _exc_line(e), "seconds": 0.0},
                )
        report.data.setdefault("section_s", {})[sec] = round(budget.elapsed() - t0, 1)
        report.write(budget.elapsed())
    md = report.write(budget.elapsed(), finished=True)
    print(md, flush=True)
    return 0 if report.all_correct() else 1


def _needs_interpreter() -> bool:
    return (
        not torch.cuda.is_available()
        and os.environ.get("TRITON_INTERPRET", "0") != "1"
        and importlib.util.find_spec("triton") is not None
    )


if __name__ == "__main__":
    # Without a GPU the kernel runs under Triton's interpreter, which must be on before triton is first
    # imported -- importing sparsediff already did that -- so the command runs again with it on.
    if "--dry-run" in sys.argv[1:] and _needs_interpreter():
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(
            sys.executable,
            [sys.executable, "-m", "sparsediff.gpucheck", *sys.argv[1:]],
            {**os.environ, "TRITON_INTERPRET": "1"},
        )
    sys.exit(main())
