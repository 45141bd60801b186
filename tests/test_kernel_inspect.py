"""The kernels compile spill-free, with tensor-core MMA, for sm_80 and sm_90 -- checked on a CPU.

``sparsediff.kernels.inspect`` compiles each kernel for a CUDA target with Triton's bundled ``ptxas`` (no
GPU needed) at the launch configuration the runtime picks, and reads registers / stack / shared memory
and the SASS. Compiles run in a subprocess without ``TRITON_INTERPRET`` (conftest.py sets it on CPU).

Default run: every (kernel, arch, head dim, block) of the shipped grid at bf16 -- forward, block mass
and the backward's dQ and dK/dV kernels, 48 compiles, about a minute on one core (Triton's on-disk cache
makes reruns faster). fp16 compiles to the same registers and instructions as bf16 (Triton 3.9);
``SPARSEDIFF_INSPECT_FULL=1`` adds it (96 compiles, about two minutes). (The backward's preprocessing
kernel, an elementwise row sum without a dot, is not in the grid.)
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("triton")

from sparsediff.kernels import inspect as kinspect  # noqa: E402

if kinspect.tools_missing():
    pytest.skip("; ".join(kinspect.tools_missing()), allow_module_level=True)

FULL = os.environ.get("SPARSEDIFF_INSPECT_FULL", "0") == "1"
GRID = dict(
    archs=kinspect.ARCHS,
    head_dims=kinspect.HEAD_DIMS,
    blocks=kinspect.BLOCKS,
    dtypes=kinspect.DTYPES if FULL else ("bf16",),
)


@pytest.fixture(scope="module")
def reports():
    return kinspect.inspect_kernels(**GRID)


def test_every_configuration_was_compiled(reports):
    want = {
        (kn, a, dt, d, b)
        for kn in kinspect.KERNELS
        for a in GRID["archs"]
        for dt in GRID["dtypes"]
        for d in GRID["head_dims"]
        for b in GRID["blocks"]
    }
    got = {(r.kernel, r.arch, r.dtype, r.head_dim, r.block) for r in reports}
    assert got == want and all(r.variant == "aligned" for r in reports)


def test_no_register_spills(reports):
    bad = [
        f"{r.label}: {r.registers} regs, stack {r.stack_bytes} B, local {r.local_bytes} B, "
        f"{r.local_loads} LDL / {r.local_stores} STL (warps {r.num_warps}, stages {r.num_stages}, "
        f"tile {r.tile_q}x{r.tile_kv})"
        for r in reports
        if r.spills
    ]
    assert not bad, "register spills:\n" + "\n".join(bad)


def test_tensor_core_mma_is_used(reports):
    want = {80: "HMMA", 90: "HGMMA"}  # mma.sync on Ampere; wgmma on Hopper
    bad = [f"{r.label}: {r.mma or 'no MMA'}" for r in reports if not r.mma.get(want[r.arch])]
    assert not bad, "no tensor-core MMA instruction:\n" + "\n".join(bad)


def test_launch_config_matches_the_runtime_choice_and_smem_estimate(reports):
    from sparsediff.kernels.block_sparse_attn import _SMEM_BUDGET, _smem_bytes, launch_config
    from sparsediff.kernels.block_sparse_attn_bwd import _bwd_smem_bytes, bwd_launch_config

    for r in reports:
        block_d = max(16, 1 << (r.head_dim - 1).bit_length())
        budget = min(kinspect.SMEM_OPTIN[r.arch], _SMEM_BUDGET)
        if r.kernel.startswith("backward_"):
            cfg = getattr(
                bwd_launch_config(r.block, r.block, block_d, 2, budget), r.kernel[len("backward_") :]
            )
            assert (r.num_warps, r.num_stages, r.tile_q, r.tile_kv) == tuple(cfg), r.label
            rows, step = (cfg.tile_q, cfg.tile_kv) if r.kernel == "backward_dq" else (cfg.tile_kv, cfg.tile_q)
            assert r.shared_bytes <= _bwd_smem_bytes(rows, step, block_d, 2, cfg.num_stages), r.label
            continue
        w, s, tq, tk = launch_config(r.block, r.block, block_d, 2, budget)
        assert (r.num_warps, r.num_stages, r.tile_kv) == (w, s, tk), r.label
        assert r.tile_q == (tq if r.kernel == "forward" else r.block), r.label
        if (
            r.kernel == "forward"
        ):  # the estimate launch_config budgets stages with bounds what Triton allocates
            assert r.shared_bytes <= _smem_bytes(r.tile_q, r.tile_kv, block_d, 2, r.num_stages), r.label
        assert r.shared_bytes <= kinspect.SMEM_OPTIN[r.arch], r.label


def test_markdown_table_lists_every_report(reports):
    table = kinspect.markdown_table(reports)
    assert table.count("\n") == len(reports) + 1
    assert "**no**" not in table
