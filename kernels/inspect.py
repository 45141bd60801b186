"""Static GPU report of sparsediff's Triton kernels, made without a GPU.

``python -m sparsediff.kernels.inspect [--arch 80,90] [--head-dims 64,96,128] [--blocks 64,128]
[--dtypes bf16,fp16] [--kernels forward,block_mass,backward_dq,backward_dkdv]
[--variants aligned,misaligned,generic] [--json FILE]``

Exit status: 0 every report spill-free with tensor-core MMA, 1 report made but something spills (or has
no MMA), 2 Triton / its CUDA tools missing.

Every kernel is compiled ahead of time for each CUDA target (``GPUTarget("cuda", arch, 32)``; Triton and
its bundled ``ptxas`` run on a CPU machine) at every shipped configuration -- head dims 64/96/128, square
mask blocks of 64 and 128 tokens, bf16 and fp16 -- and the cubin is read back:

- registers per thread, stack frame and local memory (``cuobjdump -res-usage``);
- dynamic shared memory Triton allocates (the compiled metadata's ``shared``);
- local loads / stores (``LDL`` / ``STL``: register spills, since the kernels keep no local arrays) and
  tensor-core instructions (``HMMA`` = ``mma.sync``, sm_80+; ``HGMMA`` = ``wgmma``, sm_90) counted in
  the SASS that ``cuobjdump -sass`` prints.

The launch configuration (warps, stages, query / key tiles, constexprs) is not chosen here: the same
launch-argument helpers the runtime path calls (``block_sparse_attn._fwd_launch``,
``block_attn_mass._mass_launch`` and ``block_sparse_attn_bwd._bwd_launches``) build it from tensors of the configuration's dtype and head dim in
diffusers' ``[B, N, H, D]`` layout (seen as ``[B, H, N, D]``), and Triton's own argument binder
specializes the arguments (16-byte alignment, unit strides) exactly as a launch would.

Under ``TRITON_INTERPRET=1`` the ``@triton.jit`` functions are interpreter objects that cannot be
compiled, so :func:`inspect_kernels` then runs this module in a subprocess without the flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence

__all__ = [
    "ARCHS",
    "BLOCKS",
    "DTYPES",
    "HEAD_DIMS",
    "KERNELS",
    "VARIANTS",
    "KernelReport",
    "inspect_kernels",
    "markdown_table",
    "tools_missing",
]

#: The shipped grid: CUDA compute capabilities, head dims, square mask block sizes, dtypes, kernels.
ARCHS = (80, 90)
HEAD_DIMS = (64, 96, 128)
BLOCKS = (64, 128)
DTYPES = ("bf16", "fp16")
KERNELS = ("forward", "block_mass", "backward_dq", "backward_dkdv")
#: How the arguments are specialized. "aligned": as a launch with diffusers' tensors specializes them
#: (16-byte aligned pointers, strides that are multiples of 16, the unit head-dim stride folded into a
#: constant) -- what the runtime compiles. "misaligned": pointers not known to be 16-byte aligned (e.g.
#: a view at an odd element offset). "generic": no hint at all and no stride folded (also a non-unit
#: head-dim stride): the most general code, the worst case for registers.
VARIANTS = ("aligned", "misaligned", "generic")

#: Tokens of the example sequence the launch arguments are built for: not a multiple of any block
#: (ragged last block, as in real video layouts); the value is not specialized on by Triton.
_EXAMPLE_TOKENS = 1000
_EXAMPLE_HEADS = 2

#: Shared memory one block may opt in to, per compute capability (bytes; CUDA programming guide): what
#: ``torch.cuda.get_device_properties(dev).shared_memory_per_block_optin`` reports on such a GPU, which
#: the runtime passes to the launch helpers as ``smem_limit``.
SMEM_OPTIN = {80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_MMA_OPCODES = ("HMMA", "HGMMA")  # mma.sync (sm_80+) and wgmma (sm_90)
# One SASS instruction: "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], ..." -> "HGMMA".
_SASS_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)")
_RES_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What one compiled kernel uses on one CUDA target (per thread unless said otherwise)."""

    kernel: str  # "forward" | "block_mass" | "backward_dq" | "backward_dkdv"
    arch: int  # 80, 90, ...
    dtype: str  # "bf16" | "fp16"
    head_dim: int
    block: int  # mask block size (block_q = block_kv)
    variant: str  # "aligned" | "misaligned" | "generic" (see VARIANTS)
    num_warps: int
    num_stages: int
    tile_q: int  # query rows per program
    tile_kv: int  # keys per inner step
    registers: int
    stack_bytes: int  # stack frame (spilled registers live here)
    local_bytes: int  # local memory beyond the stack
    shared_bytes: int  # dynamic shared memory Triton allocates
    local_loads: int  # LDL instructions in the SASS
    local_stores: int  # STL instructions in the SASS
    mma: dict  # tensor-core opcode -> instruction count, e.g. {"HGMMA": 8}
    compile_s: float

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.local_bytes > 0 or self.local_loads > 0 or self.local_stores > 0

    @property
    def mma_count(self) -> int:
        return sum(self.mma.values())

    @property
    def label(self) -> str:
        return (
            f"{self.kernel} sm_{self.arch} {self.dtype} D={self.head_dim} block={self.block} {self.variant}"
        )


def _triton_bin(name: str) -> str | None:
    """Path of a CUDA binary Triton ships (``cuobjdump``, ``ptxas``), or None."""
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # older Triton, or the nvidia backend is missing
        pass
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
        return path if os.path.exists(path) else None
    except ImportError:
        return None


def tools_missing() -> list[str]:
    """Readable reasons why the report cannot be made here ([] = it can)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed"]
    reasons = []
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the Triton build
        reasons.append(f"Triton's nvidia backend cannot be imported ({e})")
    for tool in ("ptxas", "cuobjdump"):
        if _triton_bin(tool) is None:
            reasons.append(f"Triton's nvidia backend ships no {tool} binary")
    return reasons


def _jit_function(fn):
    from triton.runtime.jit import JITFunction

    return fn if isinstance(fn, JITFunction) else None


def _compile(fn, grid, args: tuple, meta: dict, arch: int, variant: str = "aligned"):
    """Compile ``fn[grid](*args, **meta)`` for ``sm_<arch>`` the way a launch would, without launching.

    ``variant`` (see :data:`VARIANTS`): ``"aligned"`` keeps the specialization Triton's binder derives
    from ``args``; ``"misaligned"`` drops the 16-byte alignment hints of the pointer arguments;
    ``"generic"`` drops every hint and folds no unit stride into a constant.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    del grid  # the grid does not enter the compiled code
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    # Triton's own argument binder: the same specialization (dtypes, 16-byte alignment, ints equal to 1
    # folded into constants) as JITFunction.run, with the nvidia backend but no driver.
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = fn._pack_args(backend, meta, bound, specialization, options)
    if variant == "misaligned":
        attrs = {
            key: ([] if signature[fn.params[key[0]].name].startswith("*") else a) for key, a in attrs.items()
        }
    elif variant == "generic":
        for i, p in enumerate(fn.params):
            if not p.is_constexpr and signature[p.name] == "constexpr":  # an int argument equal to 1
                signature[p.name] = "i32"
                del constexprs[(i,)]
        attrs = {}
    elif variant != "aligned":
        raise ValueError(f"unknown variant {variant!r} (one of {VARIANTS})")
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _analyse(compiled) -> dict:
    """Registers / stack / local from ``cuobjdump -res-usage``, LDL / STL / MMA counts from its SASS."""
    cuobjdump = _triton_bin("cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run(
            [cuobjdump, "-res-usage", path], check=True, capture_output=True, text=True
        ).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], check=True, capture_output=True, text=True).stdout
    m = _RES_USAGE.search(res)
    if m is None:
        raise RuntimeError(f"cannot read cuobjdump -res-usage output:\n{res}")
    ops = Counter(_SASS_OPCODE.findall(sass))
    if not ops:
        raise RuntimeError("cuobjdump -sass printed no instructions")
    return dict(
        registers=int(m[1]),
        stack_bytes=int(m[2]),
        local_bytes=int(m[4]),
        shared_bytes=int(compiled.metadata.shared),
        local_loads=ops["LDL"],
        local_stores=ops["STL"],
        mma={op: ops[op] for op in _MMA_OPCODES if ops[op]},
    )


def _example_inputs(dtype: str, head_dim: int):
    import torch

    tdt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    B, N, H = 1, _EXAMPLE_TOKENS, _EXAMPLE_HEADS
    # diffusers hands [B, N, H, D] buffers over; the op sees them as [B, H, N, D] views (no copies).
    q, k, v = (torch.zeros(B, N, H, head_dim, dtype=tdt).transpose(1, 2) for _ in range(3))
    return q, k, v


def _launch(kernel: str, arch: int, dtype: str, head_dim: int, block: int):
    """(jit function, grid, args, meta) of one shipped configuration, from the runtime's helpers."""
    import torch

    from . import block_attn_mass, block_sparse_attn

    q, k, v = _example_inputs(dtype, head_dim)
    B, H, N, _ = q.shape
    # on a GPU fp16 / bf16 use the tensor-core dot and fp32 the IEEE one (_dot_mode without a CUDA tensor)
    dot_mode = block_sparse_attn._DOT_IEEE if dtype == "fp32" else block_sparse_attn._DOT_NATIVE
    qb = -(-N // block)
    if kernel == "forward":
        kv_indices = torch.zeros(1, H, qb, qb, dtype=torch.int32)  # shared by the batch: batch stride 0
        kv_counts = torch.zeros(1, H, qb, dtype=torch.int32)
        out = torch.empty_like(q)
        lse = torch.empty(B, H, N, dtype=torch.float32)
        grid, args, meta = block_sparse_attn._fwd_launch(
            q, k, v, out, lse, kv_indices, kv_counts, block_q=block, block_kv=block, scale=head_dim**-0.5,
            dot_mode=dot_mode, smem_limit=SMEM_OPTIN.get(arch, block_sparse_attn._SMEM_BUDGET),
        )  # fmt: skip
        return block_sparse_attn._block_sparse_attn_fwd_kernel, grid, args, meta
    if kernel == "block_mass":
        lse = torch.zeros(B, H, N, dtype=torch.float32)
        out = torch.zeros(B, H, qb, qb, dtype=torch.float32)
        grid, args, meta = block_attn_mass._mass_launch(
            q, k, lse, out, block_q=block, block_kv=block, scale=head_dim**-0.5,
            dot_mode=dot_mode, smem_limit=SMEM_OPTIN.get(arch, block_sparse_attn._SMEM_BUDGET),
        )  # fmt: skip
        return block_attn_mass._block_mass_kernel, grid, args, meta
    if kernel in ("backward_dq", "backward_dkdv"):
        from . import block_sparse_attn_bwd as bwd

        kb = -(-N // block)
        out, dout = torch.empty_like(q), torch.empty_like(q)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        lse, delta = (torch.empty(B, H, N, dtype=torch.float32) for _ in range(2))
        kv_indices = torch.zeros(1, H, qb, kb, dtype=torch.int32)
        kv_counts = torch.zeros(1, H, qb, dtype=torch.int32)
        q_indices = torch.zeros(1, H, kb, qb, dtype=torch.int32)
        q_counts = torch.zeros(1, H, kb, dtype=torch.int32)
        launches = bwd._bwd_launches(
            q, k, v, out, dout, lse, delta, None, dq, dk, dv, kv_indices, kv_counts, q_indices, q_counts,
            block_q=block, block_kv=block, scale=head_dim**-0.5, dot_mode=dot_mode,
            smem_limit=SMEM_OPTIN.get(arch, block_sparse_attn._SMEM_BUDGET),
        )  # fmt: skip
        name = kernel.removeprefix("backward_")
        return bwd.KERNELS[name], *launches[name]
    raise ValueError(f"unknown kernel {kernel!r} (one of {KERNELS})")


def _inspect_one(kernel: str, arch: int, dtype: str, head_dim: int, block: int, variant: str) -> KernelReport:
    fn, grid, args, meta = _launch(kernel, arch, dtype, head_dim, block)
    if _jit_function(fn) is None:
        raise RuntimeError("the kernels were defined under TRITON_INTERPRET=1 and cannot be compiled")
    t0 = time.perf_counter()
    compiled = _compile(fn, grid, args, meta, arch, variant)
    compile_s = time.perf_counter() - t0
    return KernelReport(
        kernel=kernel, arch=arch, dtype=dtype, head_dim=head_dim, block=block, variant=variant,
        num_warps=meta["num_warps"], num_stages=meta["num_stages"],
        tile_q=meta.get("TILE_Q", meta["BLOCK_Q"]), tile_kv=meta.get("TILE_KV", meta["BLOCK_KV"]),
        compile_s=round(compile_s, 2), **_analyse(compiled),
    )  # fmt: skip


def _in_subprocess(argv: list[str]) -> list[KernelReport]:
    """Run this module without TRITON_INTERPRET (the interpreter's kernels cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "sparsediff.kernels.inspect", *argv, "--json", path, "--quiet"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode not in (0, 1) or not os.path.exists(path):  # 1: report made, something spills
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        with open(path) as f:
            return [KernelReport(**r) for r in json.load(f)["reports"]]


def _csv(values: Iterable) -> str:
    return ",".join(str(v) for v in values)


def inspect_kernels(
    archs: Sequence[int] = ARCHS,
    head_dims: Sequence[int] = HEAD_DIMS,
    blocks: Sequence[int] = BLOCKS,
    dtypes: Sequence[str] = DTYPES,
    kernels: Sequence[str] = KERNELS,
    variants: Sequence[str] = ("aligned",),
) -> list[KernelReport]:
    """Compile each (kernel, arch, dtype, head dim, block) and report what it uses; no GPU needed.

    Raises ``RuntimeError`` with :func:`tools_missing`'s reasons when Triton or its CUDA tools are
    absent. Compiles go through Triton's on-disk cache, so a second run of the same grid is fast.
    """
    missing = tools_missing()
    if missing:
        raise RuntimeError("cannot inspect the kernels: " + "; ".join(missing))
    from . import block_sparse_attn

    if _jit_function(block_sparse_attn._block_sparse_attn_fwd_kernel) is None:  # TRITON_INTERPRET=1
        argv = ["--arch", _csv(archs), "--head-dims", _csv(head_dims), "--blocks", _csv(blocks)]
        argv += ["--dtypes", _csv(dtypes), "--kernels", _csv(kernels), "--variants", _csv(variants)]
        return _in_subprocess(argv)
    return [
        _inspect_one(kernel, arch, dtype, d, block, variant)
        for kernel in kernels
        for arch in archs
        for dtype in dtypes
        for d in head_dims
        for block in blocks
        for variant in variants
    ]


def markdown_table(reports: Sequence[KernelReport]) -> str:
    """One row per report: config, launch config, registers, spills (stack / LDL+STL), smem, MMA."""
    head = (
        "| kernel | arch | dtype | D | block | variant | warps | stages | tile q x kv | regs | stack B | LDL/STL "
        "| smem KiB | MMA | spill-free |\n"
        "|---|---|---|---:|---:|---|---:|---:|---|---:|---:|---|---:|---|---|"
    )
    rows = [head]
    for r in reports:
        mma = ", ".join(f"{op} {n}" for op, n in r.mma.items()) or "none"
        rows.append(
            f"| {r.kernel} | sm_{r.arch} | {r.dtype} | {r.head_dim} | {r.block} | {r.variant} | {r.num_warps} | {r.num_stages} "
            f"| {r.tile_q}x{r.tile_kv} | {r.registers} | {r.stack_bytes} | {r.local_loads}/{r.local_stores} "
            f"| {r.shared_bytes / 1024:.0f} | {mma} | {'yes' if not r.spills else '**no**'} |"
        )
    return "\n".join(rows)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def _strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sparsediff.kernels.inspect",
        description="Compile sparsediff's Triton kernels for CUDA targets on this (CPU) machine and report "
        "registers, spills, shared memory and tensor-core instructions at every shipped configuration.",
    )
    p.add_argument("--arch", type=_ints, default=list(ARCHS), help="compute capabilities (default 80,90)")
    p.add_argument("--head-dims", type=_ints, default=list(HEAD_DIMS), help="default 64,96,128")
    p.add_argument("--blocks", type=_ints, default=list(BLOCKS), help="mask block sizes (default 64,128)")
    p.add_argument(
        "--dtypes", type=_strs, default=list(DTYPES), help="bf16,fp16 (default both); fp32 on request"
    )
    p.add_argument(
        "--kernels",
        type=_strs,
        default=list(KERNELS),
        help="forward,block_mass,backward_dq,backward_dkdv (default all)",
    )
    p.add_argument(
        "--variants",
        type=_strs,
        default=["aligned"],
        help="aligned (what launches compile; default), misaligned, generic",
    )
    p.add_argument("--json", metavar="FILE", help="also write the reports (and versions) as JSON")
    p.add_argument("--quiet", action="store_true", help="print no table")
    a = p.parse_args(argv)
    for d in a.dtypes:
        if d not in DTYPES + ("fp32",):  # fp32: opt-in, not shipped for speed (IEEE dot, no tensor cores)
            p.error(f"--dtypes: {d!r} is not one of {DTYPES + ('fp32',)}")
    for vn in a.variants:
        if vn not in VARIANTS:
            p.error(f"--variants: {vn!r} is not one of {VARIANTS}")
    for kn in a.kernels:
        if kn not in KERNELS:
            p.error(f"--kernels: {kn!r} is not one of {KERNELS}")
    missing = tools_missing()
    if missing:
        print("cannot inspect the kernels: " + "; ".join(missing), file=sys.stderr)
        return 2
    reports = inspect_kernels(a.arch, a.head_dims, a.blocks, a.dtypes, a.kernels, a.variants)
    if a.json:
        import triton

        doc = {
            "triton": triton.__version__,
            "date": time.strftime("%Y-%m-%d"),
            "reports": [dataclasses.asdict(r) for r in reports],
        }
        with open(a.json, "w") as f:
            json.dump(doc, f, indent=1)
    if not a.quiet:
        import triton

        print(
            f"triton {triton.__version__}; compiled for "
            + ", ".join(f"sm_{x}" for x in a.arch)
            + " (no GPU used)\n"
        )
        print(markdown_table(reports))
        bad = [r.label for r in reports if r.spills or not r.mma_count]
        print(f"\n{len(reports) - len(bad)}/{len(reports)} spill-free with tensor-core MMA" + (
            ": not " + "; ".join(bad) if bad else ""))  # fmt: skip
    return 1 if any(r.spills or not r.mma_count for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
