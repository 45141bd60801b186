"""``sparsediff finetune``: a LoRA that teaches a model its sparse plan (dense teacher, sparse student).

On the shipped embedded model at 8 x 32 x 32 px (real attention structure; the shipped plan re-derived there
keeps ~44 % of blocks): a few steps lower the held-out sparse-vs-dense error, and do not when the teacher's
targets are replaced by noise (negative control); the saved adapter loads through diffusers' own API
bit-identically; ``enable_sparse_attention(DIR)`` loads plan + adapter and ``disable`` restores the model
exactly; fusing works with sparse attention on. The tiny Wan pipeline checks ``pipe.load_lora_weights``.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparsediff import Plan, enable_sparse_attention
from sparsediff.embedded import load_embedded_pipeline
from sparsediff.finetune import (
    ADAPTER_NAME,
    FinetuneConfig,
    FinetuneInputError,
    finetune,
    heldout_error,
    load_recording,
    record_teacher,
    replay_call,
    self_attention_linears,
    train_adapter,
)

PROMPTS = ["a red square moving left", "a blue circle moving up"]
HELD = ["a green diamond moving right"]
#: the PyTorch twin (under pytest the Triton interpreter would serve the op with autograd on)
SPARSE = {"backend": "reference"}
CFG = dict(rank=4, lr=3e-3, batch=1, num_inference_steps=4, guidance_scale=4.0, frames=8, height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield load_embedded_pipeline()
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def plan():
    from sparsediff.embedded import WEIGHTS_DIR

    return Plan.load(f"{WEIGHTS_DIR}/sparse_plan.json")


@pytest.fixture(scope="module")
def recorded(pipe):
    cfg = FinetuneConfig(steps=1, **CFG)
    train = record_teacher(pipe, PROMPTS, [0, 1], cfg, progress=False)
    held = record_teacher(pipe, HELD, [7], cfg, progress=False)
    return train, held


def _fresh(pipe):
    """A copy of the embedded transformer (no adapter, no hooks)."""
    return copy.deepcopy(pipe.transformer)


def _sparse_error(t, plan, held) -> float:
    h = enable_sparse_attention(t, plan, **SPARSE)
    try:
        assert 0 < min(h.densities()["transformer"].values() or [1.0]) <= 1
        return heldout_error(t, held)
    finally:
        h.disable()


def test_recording_holds_every_call_with_step_and_branch(recorded):
    train, _ = recorded
    calls = train[0]
    # 4 steps x CFG (cond, uncond as separate calls)
    assert len(calls) == 8
    assert [c.step for c in calls] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert {c.branch for c in calls} == {"cond", "uncond"}
    hs = calls[0].kwargs["hidden_states"]
    assert calls[0].target.shape[0] == hs.shape[0] and calls[0].target.shape[2:] == hs.shape[2:]
    # the two generations differ (different prompts, seeds)
    assert not torch.equal(train[0][0].target, train[1][0].target)


def test_adapter_lowers_heldout_sparse_error_and_noise_teacher_does_not(pipe, recorded):
    # The shipped plan is the one the shipped model was trained local for (its sparse error at 4 steps with
    # 3 dense warm-up steps is ~1.5e-4: little to learn in 8 steps); one tile per head and one dense step
    # (1/8 of the blocks at 8x8x8 tokens) leaves an error an adapter can learn to lower.
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    train, held = recorded
    t = _fresh(pipe)
    h = enable_sparse_attention(t, plan, **SPARSE)
    try:
        before = heldout_error(t, held)
        dens = h.report()["transformer"]
        dense_err = None
    finally:
        h.disable()
    assert before > 0, "sparse attention made no difference: nothing to learn"
    assert dens is not None
    dense_err = heldout_error(t, held)  # no hooks: the teacher itself
    assert dense_err < 1e-10 * max(before, 1.0), dense_err

    cfg = FinetuneConfig(steps=16, **CFG)
    result = train_adapter(t, plan, train, cfg, progress=False, sparse_options=SPARSE)
    assert result["steps"] == 16 and len(result["losses"]) == 16
    after = _sparse_error(t, plan, held)
    assert after < 0.9 * before, (before, after)

    # negative control: the same training against noise targets does not lower the error
    noisy = [[copy.copy(c) for c in g] for g in train]
    gen = torch.Generator().manual_seed(3)
    for g in noisy:
        for c in g:
            c.target = torch.randn(c.target.shape, generator=gen) * c.target.std()
    t2 = _fresh(pipe)
    train_adapter(t2, plan, noisy, cfg, progress=False, sparse_options=SPARSE)
    assert _sparse_error(t2, plan, held) > 0.95 * before


def test_adapter_runs_only_in_calls_that_run_sparse(pipe, recorded):
    """adapter_steps="sparse" (default): the "sparsediff" LoRA is off in the dense warm-up step (output
    bit-identical to the model without it) and on in a sparse step; its scaling is the user's again after
    every call, so fuse_lora / unfuse_lora round-trip the base weights; "all" runs it everywhere."""
    from sparsediff.finetune import _add_adapter

    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    _, held = recorded
    warm, late = held[0][0], held[0][-1]
    assert warm.step == 0 and late.step == 3
    t = _fresh(pipe)
    with torch.no_grad():
        ref_warm = replay_call(t, warm)
        with enable_sparse_attention(t, plan, **SPARSE):
            ref_late = replay_call(t, late)
    _add_adapter(t, FinetuneConfig(rank=4))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in t.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (an identity adapter): make it do something
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    scaling = {
        n: m.scaling[ADAPTER_NAME] for n, m in t.named_modules() if ADAPTER_NAME in getattr(m, "scaling", {})
    }
    assert scaling and set(scaling.values()) == {1.0}
    base = {k: v.clone() for k, v in t.state_dict().items() if "base_layer" in k}
    with torch.no_grad():
        with enable_sparse_attention(t, plan, **SPARSE) as h:
            out_warm = replay_call(t, warm)
            now = {n: m.scaling[ADAPTER_NAME] for n, m in t.named_modules() if n in scaling}
            out_late = replay_call(t, late)
            assert h.report()["transformer"]["sparse_calls"] > 0
            # fuse after a dense call, unfuse after another: the base weights come back
            t.fuse_lora(adapter_names=[ADAPTER_NAME])
            fused_warm = replay_call(t, warm)
            t.unfuse_lora()
        assert torch.equal(out_warm, ref_warm)  # off in the dense warm-up step
        assert now == scaling  # restored after the call
        assert (out_late - ref_late).abs().max() > 1e-3  # on in the sparse step
        assert (fused_warm - ref_warm).abs().max() > 1e-3  # a fused adapter is part of the weights
        after = {k: v for k, v in t.state_dict().items() if "base_layer" in k}
        assert all(torch.allclose(after[k], base[k], atol=1e-6) for k in base)
        with enable_sparse_attention(t, plan, adapter_steps="all", **SPARSE):
            assert (replay_call(t, warm) - ref_warm).abs().max() > 1e-3
    with pytest.raises(ValueError, match="adapter_steps"):
        enable_sparse_attention(t, plan, adapter_steps="dense", **SPARSE)


def test_on_policy_round_labels_the_students_trajectory_with_the_dense_model(pipe, tmp_path):
    """on_policy_rounds=1: after half the steps the student (plan + adapter) generates the training prompts;
    its calls carry the student's inputs (off the teacher's trajectory) and the dense model's prediction for
    them; the second half trains on both; a resumed run reuses everything."""
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    out = tmp_path / "ft"
    cfg = FinetuneConfig(steps=4, heldout=0, on_policy_rounds=1, **CFG)
    p = load_embedded_pipeline()
    meta = finetune(p, plan, PROMPTS, out, cfg, progress=False, sparse_options=SPARSE)
    assert meta["steps"] == 4 and meta["student_generations"] == len(PROMPTS) == meta["train_generations"]
    assert "on-policy: 1 round" in (out / "README.md").read_text()
    teacher = load_recording(out / "teacher" / "train-0000.pt")
    student = load_recording(out / "teacher" / "student1-0000.pt")
    assert [c.step for c in student] == [c.step for c in teacher]
    # same prompt, seed and first latents; after the first sparse step the trajectories part
    assert torch.equal(student[0].kwargs["hidden_states"], teacher[0].kwargs["hidden_states"])
    assert not torch.allclose(student[-1].kwargs["hidden_states"], teacher[-1].kwargs["hidden_states"])
    dense = _fresh(pipe)  # no adapter, no hooks: the teacher
    for call in (student[2], student[-1]):
        with torch.no_grad():
            want = replay_call(dense, call)
        assert (call.target - want).abs().max() <= 1e-5 * want.abs().max()
    # resume: nothing recorded or trained again
    stamp = (out / "teacher" / "student1-0001.pt").stat().st_mtime_ns
    again = finetune(
        load_embedded_pipeline(), plan, PROMPTS, out, cfg, resume=True, progress=False, sparse_options=SPARSE
    )
    assert again["steps"] == 4 and (out / "teacher" / "student1-0001.pt").stat().st_mtime_ns == stamp
    with pytest.raises(FinetuneInputError, match="on_policy_rounds"):
        FinetuneConfig(steps=2, on_policy_rounds=2)


def test_lora_targets_are_the_self_attention_linears(pipe):
    names = self_attention_linears(pipe.transformer)
    assert names and all(".attn1." in n for n in names), names
    assert not any(".attn2." in n for n in names)  # never the cross-attention
    assert {n.rsplit(".", 1)[-1] for n in self_attention_linears(pipe.transformer, "qkv")} == {
        "to_q",
        "to_k",
        "to_v",
    }
    block = self_attention_linears(pipe.transformer, "block")
    assert set(names) < set(block)  # a superset: the blocks' cross-attention and feed-forward too
    assert any(".attn2." in n for n in block) and any(".ffn." in n for n in block), block
    assert {n.split(".")[1] for n in block} == {n.split(".")[1] for n in names}  # the same blocks
    with pytest.raises(FinetuneInputError, match="targets"):
        self_attention_linears(pipe.transformer, "mlp")


def test_folder_adapter_warns_on_other_base_weights_only(pipe, plan, tmp_path, caplog):
    """The card records the adapted layers' base weights; enabling the folder on other weights of the same
    architecture (same config hash) warns, on the same weights (also stored in another dtype) it does not."""
    import json
    import logging

    out = tmp_path / "ft"
    cfg = FinetuneConfig(steps=1, heldout=0, **CFG)
    finetune(load_embedded_pipeline(), plan, PROMPTS[:1], out, cfg, progress=False, sparse_options=SPARSE)
    recorded = json.loads((out / "finetune.json").read_text())["model"]["base_weights"]
    assert sorted(recorded) == sorted(self_attention_linears(pipe.transformer))
    for t, warns in (
        (_fresh(pipe), False),
        (_fresh(pipe).to(torch.bfloat16).float(), False),
        (_fresh(pipe), True),
    ):
        if warns:  # one adapted layer fine-tuned a little (5 % of its weights' spread)
            w = t.get_submodule(sorted(recorded)[3]).weight
            with torch.no_grad():
                w += 0.05 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sparsediff"):
            h = enable_sparse_attention(t, str(out), **SPARSE)
        h.disable()
        hits = [r for r in caplog.records if "other base weights" in r.getMessage()]
        assert len(hits) == int(warns), [r.getMessage() for r in caplog.records]
        if warns:
            assert sorted(recorded)[3] in hits[0].getMessage() and hits[0].levelno == logging.WARNING


def test_finetune_folder_loads_through_diffusers_and_sparsediff(pipe, plan, recorded, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    cfg = FinetuneConfig(steps=3, heldout=1, **CFG)
    meta = finetune(
        pipe_copy := load_embedded_pipeline(),
        plan,
        PROMPTS[:1],
        out,
        cfg,
        progress=False,
        sparse_options=SPARSE,
    )
    assert meta["steps"] == 3 and meta["heldout_mse_after"] is not None
    assert {"pytorch_lora_weights.safetensors", "sparse_plan.json", "finetune.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert "held-out" in (out / "README.md").read_text()
    trained = pipe_copy.transformer  # has the adapter
    x = load_recording(next((out / "teacher").glob("heldout-*.pt")))[-1]
    assert x.step == 3  # past the plan's 2 dense warm-up steps: runs sparse

    def run(t):
        with torch.no_grad():
            return replay_call(t, x)

    ref = run(trained)
    # diffusers' API on a fresh copy: the adapter's weights come back bit-identical ...
    t = _fresh(pipe)
    t.load_lora_adapter(str(out), adapter_name=ADAPTER_NAME, use_safetensors=True)
    want = {k: v for k, v in trained.state_dict().items() if "lora_" in k}
    got = {k: v for k, v in t.state_dict().items() if "lora_" in k}
    assert want and want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    # ... and so does the model's output, up to the CPU kernels' summation order, which depends on where a
    # tensor lies in memory (a deepcopy of the trained model itself differs by ~1e-5 at |out| ~14)
    assert (run(t) - ref).abs().max() <= 1e-6 * ref.abs().max() * 10
    # sparsediff: enable(DIR) loads plan + adapter; disable restores the model without the adapter
    t = _fresh(pipe)
    base = run(t)
    h = enable_sparse_attention(t, str(out), **SPARSE)
    assert ADAPTER_NAME in t.peft_config
    sparse_tuned = run(t)
    h.disable()
    assert not getattr(t, "peft_config", {}), "disable left the adapter on the model"
    assert torch.equal(run(t), base)
    h = enable_sparse_attention(t, plan, **SPARSE)
    sparse_plain = run(t)
    assert h.report()["transformer"]["sparse_calls"] > 0
    h.disable()
    assert not torch.equal(sparse_plain, base)
    assert not torch.equal(sparse_tuned, sparse_plain)
    # the same as the trained transformer with the plan
    h = enable_sparse_attention(trained, plan, **SPARSE)
    try:
        assert (run(trained) - sparse_tuned).abs().max() <= 1e-5 * sparse_tuned.abs().max()
        # fuse / unfuse with sparse attention on
        trained.fuse_lora(adapter_names=[ADAPTER_NAME])
        fused = run(trained)
        trained.unfuse_lora()
        unfused = run(trained)
        # rounding of W + BA (- BA): ~2e-5 fused, ~6e-6 unfused at |out| ~14; the adapter itself moves the
        # sparse output by ~4e-2, so these bounds still tell "adapter applied once" from "not / twice"
        assert (fused - sparse_tuned).abs().max() < 2e-4
        assert (unfused - sparse_tuned).abs().max() < 2e-4
        assert (sparse_plain - sparse_tuned).abs().max() > 1e-2
    finally:
        h.disable()


def test_bad_inputs_fail_before_any_work(pipe, plan, tmp_path):
    with pytest.raises(FinetuneInputError, match="steps"):
        FinetuneConfig(steps=0)
    with pytest.raises(FinetuneInputError, match="rank"):
        FinetuneConfig(rank=0)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FinetuneInputError, match="exists"):
        finetune(pipe, plan, PROMPTS, out, FinetuneConfig(steps=1, **CFG), progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(FinetuneInputError, match="no prompts"):
        finetune(pipe, plan, [], tmp_path / "x", FinetuneConfig(steps=1, **CFG), progress=False)
    cached = plan.with_remainder("cached", 3)
    with pytest.raises(FinetuneInputError, match="cached"):
        finetune(pipe, cached, PROMPTS, tmp_path / "c", FinetuneConfig(steps=1, **CFG), progress=False)
    assert not (tmp_path / "c").exists()
    from sparsediff.plan import PlanMismatchError

    other = Plan.from_dict(
        {
            **plan.to_dict(),
            "model": {**plan.to_dict()["model"], "transformer_class": "FluxTransformer2DModel"},
        }
    )
    with pytest.raises(PlanMismatchError):
        finetune(pipe, other, PROMPTS, tmp_path / "y", FinetuneConfig(steps=1, **CFG), progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


# ---------------------------------------------------------------------------------------------- the CLI

SMALL = [
    "--frames",
    "8",
    "--height",
    "32",
    "--width",
    "32",
    "--inference-steps",
    "4",  # past the shipped plan's 3 dense warm-up steps
    "--guidance-scale",
    "4",
]


def _env():
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the twin, not the interpreter
    return {**env, "OMP_NUM_THREADS": "1"}


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--steps", "0"], "--steps"),
        (["--rank", "-1"], "--rank"),
        (["--prompts", "missing.txt"], "prompts file not found"),
        (["--plan", "nonexistent_plan.json"], "nonexistent_plan.json"),
        (["--plan", "FLUX"], None),  # written below: a plan for another model
    ],
)
def test_cli_bad_input_exits_2_before_any_work(tmp_path, capsys, extra, match, plan):
    from sparsediff.cli import main as sd_main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    if extra == ["--plan", "FLUX"]:
        other = tmp_path / "flux_plan.json"
        d = plan.to_dict()
        d["model"] = {**d["model"], "transformer_class": "FluxTransformer2DModel"}
        other.write_text(__import__("json").dumps(d))
        extra, match = ["--plan", str(other)], "FluxTransformer2DModel"
    out = tmp_path / "out"
    argv = ["finetune", "--prompts", str(prompts), "--out", str(out), *SMALL, *extra]
    if "--prompts" in extra:
        argv = ["finetune", "--out", str(out), *SMALL, *extra]
    with pytest.raises(SystemExit) if extra[0] in ("--steps", "--rank") else _nullcontext():
        rc = sd_main(argv)
        assert rc == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err, err
    assert not out.exists()


def _nullcontext():
    import contextlib

    return contextlib.nullcontext()


def test_cli_refuses_an_existing_out_folder_and_keeps_its_files(tmp_path, capsys):
    from sparsediff.cli import main as sd_main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert sd_main(["finetune", "--prompts", str(prompts), "--out", str(out), *SMALL]) == 2
    assert "--resume" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


@pytest.mark.slow  # three interpreter start-ups + gloo: ~40 s of CPU
def test_two_processes_train_the_adapter_of_one_process(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\na blue circle moving up\n")
    args = [
        "--prompts",
        str(prompts),
        *SMALL,
        "--steps",
        "3",
        "--batch",
        "2",
        "--heldout",
        "0",
        "--no-progress",
    ]
    args += ["--lr", "3e-3", "--rank", "2"]
    one = [
        sys.executable,
        "-m",
        "sparsediff.finetune",
        *args,
        "--out",
        str(tmp_path / "one"),
        "--threads",
        "1",
    ]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = launch + ["-m", "sparsediff.finetune", *args, "--out", str(tmp_path / "two"), "--threads", "1"]
    for argv in (one, two):
        proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("trained 3 steps") == 1, proc.stdout  # only the main process reports
    a = load_file(tmp_path / "one" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "two" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(k.startswith("transformer.") for k in a)
    # What the adapter does is delta W = B @ A per layer (B starts at zero). Adam's first steps are
    # sign-like, so float-level gradient differences (one batched forward vs two) show up as small value
    # differences -- in A above all, whose gradients are tiny while B is near zero; the two adapters' delta W
    # must agree to a small fraction of their size.
    for k in a:
        if "lora_A" in k:
            kb = k.replace("lora_A", "lora_B")
            d1, d2 = a[kb] @ a[k], b[kb] @ b[k]
            rel = ((d1 - d2).norm() / d1.norm()).item()
            assert d1.norm() > 0 and rel < 0.05, (k, rel)


def test_cli_without_peft_says_how_to_install_before_any_work(tmp_path, capsys, monkeypatch):
    import importlib.util

    from sparsediff.cli import main as sd_main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a)
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red square moving left\n")
    out = tmp_path / "out"
    assert sd_main(["finetune", "--prompts", str(prompts), "--out", str(out), *SMALL]) == 2
    assert "pip install 'sparsediff[finetune]'" in capsys.readouterr().err
    assert not out.exists()
