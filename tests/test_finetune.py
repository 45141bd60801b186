"""``sparsediff finetune``: a LoRA that teaches a model its sparse plan (dense teacher, sparse student).

On the shipped embedded model at 8 x 32 x 32 px (real attention structure; the shipped plan re-derived there
keeps ~44 % of blocks): a few steps lower the held-out sparse-vs-dense error, and do not when the teacher's
targets are replaced by noise (negative control); the saved adapter loads through diffusers' own API
bit-identically; ``enable_sparse_attention(DIR)`` loads plan + adapter and ``disable`` restores the model
exactly; fusing works with sparse attention on. The tiny Wan pipeline checks ``pipe.load_lora_weights``.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from sparsediff import Plan, enable_sparse_attention
from sparsediff.embedded import load_embedded_pipeline
from sparsediff.finetune import (
    ADAPTER_NAME,
    FinetuneConfig,
    FinetuneInputError,
    anchor_labels,
    check_renoisable,
    finetune,
    heldout_error,
    label_with_dense,
    latent_input,
    load_recording,
    record_teacher,
    renoise_call,
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


def _noise_targets(train):
    """Copies of the recorded generations whose targets are Gaussian noise of the targets' scale."""
    noisy = [[copy.copy(c) for c in g] for g in train]
    gen = torch.Generator().manual_seed(3)
    for g in noisy:
        for c in g:
            c.target = torch.randn(c.target.shape, generator=gen) * c.target.std()
    return noisy


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


def test_recording_holds_each_calls_noise_level_and_the_final_latents(pipe, recorded):
    train, _ = recorded
    calls = train[0]
    sched = copy.deepcopy(pipe.scheduler)
    sched.set_timesteps(CFG["num_inference_steps"])
    assert [c.sigma for c in calls] == pytest.approx([float(sched.sigmas[c.step]) for c in calls])
    assert all(c.clean is None for c in calls[:-1])
    # the final latents are what the pipeline returns as latents for the same prompt and seed ...
    kw = {k: CFG[k] for k in ("num_inference_steps", "guidance_scale", "height", "width")}
    with torch.no_grad():
        latents = pipe(
            prompt=PROMPTS[0], num_frames=CFG["frames"], generator=torch.Generator().manual_seed(0),
            output_type="latent", **kw,
        ).frames  # fmt: skip
    torch.testing.assert_close(calls[-1].clean, latents.float())
    # ... and the last Euler step from the last call's input with its recorded sigma and the guided
    # prediction lands on them (sigma and latents belong together)
    cond, uncond = (c.target for c in sorted(calls[-2:], key=lambda c: c.branch != "cond"))
    guided = uncond + CFG["guidance_scale"] * (cond - uncond)
    x_last = latent_input(calls[-1], calls[-1].clean)
    torch.testing.assert_close(x_last - calls[-1].sigma * guided, calls[-1].clean, atol=1e-5, rtol=1e-4)
    assert check_renoisable(calls) is calls[-1].clean


def test_renoise_call_replaces_only_the_latents_and_bad_recordings_are_refused(recorded):
    train, _ = recorded
    gen = train[0]
    clean = gen[-1].clean
    call = gen[2]  # step 1, cond
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(5))
    new = renoise_call(call, clean, noise)
    hs, new_hs = call.kwargs["hidden_states"], new.kwargs["hidden_states"]
    c = clean.shape[1]
    torch.testing.assert_close(new_hs[:, :c], (1 - call.sigma) * clean + call.sigma * noise)
    assert torch.equal(new_hs[:, c:], hs[:, c:])  # the coordinate channels as recorded
    assert not torch.allclose(new_hs[:, :c], hs[:, :c])
    assert new.kwargs["encoder_hidden_states"] is call.kwargs["encoder_hidden_states"]
    assert (new.step, new.branch, new.sigma) == (call.step, call.branch, call.sigma)
    assert call.kwargs["hidden_states"] is hs  # the recording is untouched

    with pytest.raises(FinetuneInputError, match="final latents"):
        check_renoisable([dataclasses.replace(x, clean=None) for x in gen])
    with pytest.raises(FinetuneInputError, match="final latents"):
        check_renoisable([dataclasses.replace(x, sigma=None) for x in gen])
    # inputs that are not on the flow-matching path (here: scaled latents) are refused
    scaled = [
        dataclasses.replace(x, kwargs={**x.kwargs, "hidden_states": x.kwargs["hidden_states"] * 4})
        for x in gen
    ]
    with pytest.raises(FinetuneInputError, match="flow-matching path"):
        check_renoisable(scaled)
    with pytest.raises(FinetuneInputError, match="does not hold"):
        renoise_call(call, clean[:, :, :2], noise[:, :, :2])


def test_renoised_samples_are_labelled_by_the_dense_model(pipe, recorded):
    """With every sample re-noised the recorded targets are never trained on: recorded targets replaced by
    noise (which alone teach nothing: the negative control below) still give an adapter that lowers the
    held-out error -- its labels came from the dense model, on new noise."""
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    train, held = recorded
    noisy = _noise_targets(train)
    t = _fresh(pipe)
    before = _sparse_error(t, plan, held)
    cfg = FinetuneConfig(steps=16, renoise=1.0, **CFG)
    train_adapter(t, plan, noisy, cfg, progress=False, sparse_options=SPARSE)
    after = _sparse_error(t, plan, held)
    assert after < 0.9 * before, (before, after)
    assert all(c.target.shape == n.target.shape for c, n in zip(train[0], noisy[0]))
    old = [[dataclasses.replace(c, sigma=None) for c in g] for g in train]  # an earlier version's recordings
    with pytest.raises(FinetuneInputError, match="final latents"):
        train_adapter(
            _fresh(pipe), plan, old, FinetuneConfig(steps=2, renoise=0.5, **CFG),
            progress=False, sparse_options=SPARSE,
        )  # fmt: skip
    with pytest.raises(FinetuneInputError, match="shuffled order"):
        train_adapter(
            _fresh(pipe), plan, train, FinetuneConfig(steps=2, renoise=0.5, order="steps", **CFG),
            progress=False, sparse_options=SPARSE,
        )  # fmt: skip


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
    noisy = _noise_targets(train)
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


def _drifted_student(pipe, teacher_gen, prompt, seed):
    """The tiny plan's generation of ``prompt``/``seed`` (the teacher's), labelled by the dense model."""
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    (student,) = record_teacher(
        pipe,
        [prompt],
        [seed],
        FinetuneConfig(steps=1, **CFG),
        progress=False,
        plan=plan,
        sparse_options=SPARSE,
    )
    label_with_dense(pipe.transformer, student)
    return student


def test_anchored_labels_add_the_drift_from_the_teacher_over_sigma(pipe, recorded):
    """on_policy_labels="anchored": each student call's target is the dense prediction plus (student latents -
    teacher latents) / max(sigma, 0.5) at that step, so an Euler step shrinks the drift; recordings
    whose steps do not follow their predictions, negated predictions and other schedules are handled."""
    teacher = recorded[0][0]  # PROMPTS[0], seed 0
    student = _drifted_student(pipe, teacher, PROMPTS[0], 0)
    dense = [c.target.clone() for c in student]
    anchored = [dataclasses.replace(c) for c in student]
    anchor_labels(anchored, teacher)
    ch = teacher[-1].clean.shape[1]  # the latents are the first channels of the embedded model's input
    drift = 0.0
    for a, d, t in zip(anchored, dense, teacher):
        delta = a.kwargs["hidden_states"][:, :ch].float() - t.kwargs["hidden_states"][:, :ch].float()
        torch.testing.assert_close(a.target, d + delta / max(a.sigma, 0.5), rtol=1e-6, atol=1e-6)
        drift = max(drift, float(delta.abs().max()))
    assert torch.equal(anchored[0].target, dense[0])  # the first call: the same latents, nothing to steer
    assert drift > 1e-2, "the student never left the teacher's trajectory: the test proves nothing"
    # the sampler steps with the recorded prediction (sign +1); a pipeline that negates it gets -delta / sigma
    flipped_teacher = [dataclasses.replace(c, target=-c.target) for c in teacher]
    flipped = [dataclasses.replace(c, target=-d) for c, d in zip(student, dense)]
    anchor_labels(flipped, flipped_teacher)
    for f, a, d in zip(flipped, anchored, dense):
        torch.testing.assert_close(f.target, -d - (a.target - d), rtol=1e-6, atol=1e-6)
    noise = torch.Generator().manual_seed(0)
    unrelated = [dataclasses.replace(c, target=torch.randn(c.target.shape, generator=noise)) for c in teacher]
    with pytest.raises(FinetuneInputError, match="do not follow"):
        anchor_labels([dataclasses.replace(c) for c in student], unrelated)
    with pytest.raises(FinetuneInputError, match="calls"):
        anchor_labels([dataclasses.replace(c) for c in student[:-2]], teacher)


def test_finetune_with_anchored_labels_and_its_resume(pipe, tmp_path):
    """finetune(on_policy_labels="anchored") labels the student generations so; a resume with other labels is
    refused before any work; without on-policy rounds or with a non-flow scheduler it is refused up front."""
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    out = tmp_path / "ft"
    cfg = FinetuneConfig(steps=2, heldout=0, on_policy_rounds=1, on_policy_labels="anchored", **CFG)
    p = load_embedded_pipeline()
    finetune(p, plan, PROMPTS[:1], out, cfg, progress=False, sparse_options=SPARSE)
    teacher = load_recording(out / "teacher" / "train-0000.pt")
    student = load_recording(out / "teacher" / "student1-0000.pt")
    ch = teacher[-1].clean.shape[1]
    dense = _fresh(pipe)
    call, twin = student[-1], teacher[-1]
    with torch.no_grad():
        want = replay_call(dense, call)
    delta = call.kwargs["hidden_states"][:, :ch].float() - twin.kwargs["hidden_states"][:, :ch].float()
    assert float(delta.abs().max()) > 1e-2
    torch.testing.assert_close(call.target, want + delta / max(call.sigma, 0.5), rtol=1e-4, atol=1e-5)
    with pytest.raises(FinetuneInputError, match="anchored"):
        finetune(
            load_embedded_pipeline(),
            plan,
            PROMPTS[:1],
            out,
            dataclasses.replace(cfg, on_policy_labels="dense"),
            resume=True,
            progress=False,
            sparse_options=SPARSE,
        )
    q = load_embedded_pipeline()
    with pytest.raises(FinetuneInputError, match="on-policy rounds"):
        finetune(
            q, plan, PROMPTS, tmp_path / "a", dataclasses.replace(cfg, on_policy_rounds=0), progress=False
        )
    from diffusers import DDIMScheduler

    q.scheduler = DDIMScheduler()
    with pytest.raises(FinetuneInputError, match="flow-matching"):
        finetune(q, plan, PROMPTS, tmp_path / "b", cfg, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(FinetuneInputError, match="on_policy_labels"):
        FinetuneConfig(on_policy_labels="teacher")


def test_guided_error_is_the_error_of_the_prediction_the_sampler_steps_with():
    from sparsediff.finetune import RecordedCall, _step_errors

    gen = torch.Generator().manual_seed(0)
    tc, tu, e = (torch.randn(2, 3, 4, generator=gen) for _ in range(3))
    # uncond first: the branches are found by name, not by position
    calls = [RecordedCall((), {}, 5, 20, "uncond", tu), RecordedCall((), {}, 5, 20, "cond", tc)]
    # errors that cancel in uncond + 4 * (cond - uncond) = 4 cond - 3 uncond: eu = 4e, ec = 3e
    preds = [tu + 4 * e, tc + 3 * e]
    branch = _step_errors(preds, calls, None)
    assert len(branch) == 2 and all(bool((b > 1).all()) for b in branch)
    (guided,) = _step_errors(preds, calls, 4.0)
    assert guided.shape == (2,) and float(guided.max()) < 1e-10
    # an error in the cond branch alone reaches the sampler 4x: 16x its mean squared error
    preds = [tu, tc + e]
    (guided,) = _step_errors(preds, calls, 4.0)
    torch.testing.assert_close(guided, 16 * _step_errors(preds, calls, None)[1])
    # a step with one branch (no CFG there) keeps the per-call error
    one = _step_errors(preds[1:], calls[1:], 4.0)
    assert len(one) == 1 and torch.equal(one[0], _step_errors(preds, calls, None)[1])


def test_guided_loss_trains_on_the_guided_error(pipe, recorded):
    """loss="guided": the first logged loss is the guided error of the first (generation, sparse step) sample
    of the shuffled order (adapter at its zero init), and training lowers the held-out guided error."""
    from sparsediff.finetune import _order, _step_errors, _steps_of, guidance_for_loss

    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    train, held = recorded
    cfg = FinetuneConfig(steps=8, loss="guided", **CFG)
    assert guidance_for_loss(cfg, pipe, train[0]) == 4.0
    t = _fresh(pipe)
    samples = [(g, k) for g in range(len(train)) for k in (1, 2, 3)]  # steps 1-3 run sparse
    g, k = samples[_order(len(samples), cfg.seed, 1)[0]]
    with enable_sparse_attention(t, plan, **SPARSE), torch.no_grad():
        step = _steps_of([train[g]])[k]
        preds = [replay_call(t, call) for call in step]
        (want,) = _step_errors(preds, step, 4.0)
        before = heldout_error(t, held, guidance=4.0)
        before_branch = heldout_error(t, held)
    assert before > 4 * before_branch  # the guided error is the larger one here
    result = train_adapter(t, plan, train, cfg, progress=False, sparse_options=SPARSE)
    assert result["losses"][0] == pytest.approx(float(want.sum()), rel=1e-4)
    with enable_sparse_attention(t, plan, **SPARSE):
        after = heldout_error(t, held, guidance=4.0)
    assert after < 0.9 * before, (before, after)


def test_guided_loss_needs_guidance_and_named_branches(pipe, plan, recorded, tmp_path):
    from sparsediff.finetune import guidance_for_loss

    with pytest.raises(FinetuneInputError, match="loss"):
        FinetuneConfig(loss="l1")
    cfg = FinetuneConfig(steps=1, loss="guided", **{**CFG, "guidance_scale": 1.0})
    with pytest.raises(FinetuneInputError, match="guidance"):
        finetune(pipe, plan, PROMPTS, tmp_path / "g", cfg, progress=False)
    assert not (tmp_path / "g").exists()
    # the pipeline's own default scale when none is given (the embedded pipeline's is > 1)
    default = FinetuneConfig(steps=1, loss="guided", **{**CFG, "guidance_scale": None})
    assert guidance_for_loss(default, pipe) > 1
    train, _ = recorded
    unnamed = [copy.copy(c) for c in train[0]]
    for i, c in enumerate(unnamed):
        c.branch = i % 2  # a pipeline outside diffusers' cache_context: calls known only by position
    with pytest.raises(FinetuneInputError, match="'cond' and 'uncond'"):
        guidance_for_loss(FinetuneConfig(loss="guided", guidance_scale=4.0), pipe, unnamed)


def test_lr_schedule_and_step_objective():
    from sparsediff.finetune import _objective, lr_at

    cfg = FinetuneConfig(steps=100, lr=1e-3)  # cosine: 5 warm-up steps, then down to 0.1 lr
    lrs = [lr_at(cfg, i) for i in range(100)]
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert {lr_at(FinetuneConfig(steps=100, lr_schedule="constant"), i) for i in (0, 50, 99)} == {0.001}
    # "log": a step whose error is 50x another's moves the adapter as much for the same relative change
    small = torch.tensor([1e-5, 2e-5], requires_grad=True)
    large = (small.detach() * 50).requires_grad_(True)
    for e in (small, large):
        _objective([e], "log", 2).backward()
    torch.testing.assert_close(small.grad * small.detach(), large.grad * large.detach())
    mse = _objective([small.detach()], "mse", 2)
    assert float(mse) == pytest.approx(1.5e-5)
    with pytest.raises(FinetuneInputError, match="step_loss"):
        FinetuneConfig(step_loss="l1")
    with pytest.raises(FinetuneInputError, match="lr_schedule"):
        FinetuneConfig(lr_schedule="linear")


def test_training_in_phases_equals_one_run(pipe, recorded, tmp_path):
    """stop_at + resume (the phases of on-policy rounds) give the adapter of one uninterrupted run: the
    learning-rate schedule spans all the steps."""
    from sparsediff.finetune import _adapter_state

    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    train, _ = recorded
    cfg = FinetuneConfig(steps=6, checkpoint_every=1, **CFG)
    one = _fresh(pipe)
    train_adapter(one, plan, train, cfg, progress=False, sparse_options=SPARSE)
    two = _fresh(pipe)
    ck = tmp_path / "ck.pt"
    first = train_adapter(
        two, plan, train, cfg, progress=False, sparse_options=SPARSE, checkpoint=ck, stop_at=3
    )
    assert first["steps"] == 3
    two.delete_adapters(ADAPTER_NAME)
    train_adapter(two, plan, train, cfg, progress=False, sparse_options=SPARSE, checkpoint=ck, resume=True)
    a, b = _adapter_state(one), _adapter_state(two)
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 0 for v in a.values())
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_shuffled_order_needs_a_stateless_plan_and_the_gated_adapter(pipe, recorded):
    train, _ = recorded
    cfg = FinetuneConfig(steps=1, order="shuffled", **CFG)
    cross = Plan.uniform("lse_cache", dense_steps=1)  # its state comes from the earlier steps
    with pytest.raises(FinetuneInputError, match="cross-step"):
        train_adapter(_fresh(pipe), cross, train, cfg, progress=False, sparse_options=SPARSE)
    tile = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    with pytest.raises(FinetuneInputError, match="adapter_steps"):
        train_adapter(
            _fresh(pipe), tile, train, cfg, progress=False, sparse_options={**SPARSE, "adapter_steps": "all"}
        )
    with pytest.raises(FinetuneInputError, match="order"):
        FinetuneConfig(order="random")
    # auto replays a cross-step plan in step order (trains without complaint)
    auto = FinetuneConfig(steps=2, **CFG)
    assert (
        train_adapter(_fresh(pipe), cross, train, auto, progress=False, sparse_options=SPARSE)["steps"] == 2
    )


def _cached_plan(refresh_of_head=None, model=None):
    """One tile per head (an error to learn), one dense warm-up step, the remainder cached and refreshed every
    2 steps -- or, per head, every ``refresh_of_head[h]`` steps (a per-head plan for ``model``'s identity)."""
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1).with_remainder("cached", 2)
    if refresh_of_head is None:
        return plan
    d = {**plan.to_dict(), "model": model.to_dict()["model"]}
    spec = d["default"]
    d["layers"] = [
        [{**spec, "params": {**spec["params"], "remainder_refresh": r}} for r in refresh_of_head]
        for _ in range(4)
    ]
    return Plan.from_dict(d)


@pytest.mark.parametrize("refresh_of_head", [None, [2, 3, 2, 3, 2, 3]], ids=["one-interval", "two-intervals"])
def test_cached_remainder_sample_sees_the_remainder_of_its_generation(pipe, plan, recorded, refresh_of_head):
    """A shuffled training sample of a remainder="cached" plan replays the steps its stored remainder comes
    from first: its prediction equals that step's in a generation replayed in order, and without them (the
    hooks would refresh at the sample's own step, returning the dense pass) it does not."""
    from sparsediff.finetune import _remainder_sources, _steps_of
    from sparsediff.hooks import get_state

    plan = _cached_plan(refresh_of_head, model=plan)
    if refresh_of_head is not None:
        assert {s.get("remainder_refresh") for layer in plan.layers for s in layer} == {2, 3}
    t = _fresh(pipe)
    steps = _steps_of([recorded[1][0]])
    h = enable_sparse_attention(t, plan, **SPARSE)
    try:
        with torch.no_grad():
            in_order = [[replay_call(t, c) for c in calls] for calls in steps]
            state = get_state(t)
            sources, exact = _remainder_sources(t, plan, steps, torch.device("cpu"))
            # warm-up step 0 seeds every remainder; 2 refreshes the heads due after 2 steps (all of them: an
            # exact step), 3 those due after 3
            assert sources[1] == [0] and sources[3] == ([2] if refresh_of_head is None else [0, 1, 2])
            assert exact == ({0, 2} if refresh_of_head is None else {0})
            merged = 0
            for k in (1, 2, 3):
                state.end_generation()
                for j in sources[k]:
                    for c in steps[j]:
                        replay_call(t, c)
                alone = [replay_call(t, c) for c in steps[k]]
                for a, b in zip(alone, in_order[k]):
                    torch.testing.assert_close(a, b, rtol=0, atol=0)
                state.end_generation()
                bare = [replay_call(t, c) for c in steps[k]]  # no source steps: refreshes at k (dense pass)
                merged += any(not torch.equal(a, b) for a, b in zip(bare, in_order[k]))
            assert merged >= 2, "the cached remainder was never merged: the test proves nothing"
    finally:
        h.disable()


def test_adapter_trains_for_a_cached_remainder_plan(pipe, recorded):
    """An adapter trained with a remainder="cached" plan (shuffled samples, half of them re-noised with their
    source steps on the same flow path) lowers that plan's held-out error, measured in generation order."""
    plan = _cached_plan()
    train, held = recorded
    t = _fresh(pipe)
    before = _sparse_error(t, plan, held)
    assert before > 0
    result = train_adapter(
        t, plan, train, FinetuneConfig(steps=16, renoise=0.5, **CFG), progress=False, sparse_options=SPARSE
    )
    assert result["order"] == "shuffled"
    after = _sparse_error(t, plan, held)
    assert after < 0.9 * before, (before, after)


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
    # the card's training-set error: the one training generation, replayed with the plan, before / after
    assert meta["train_fit_generations"] == 1
    fit = [load_recording(out / "teacher" / "train-0000.pt")]
    assert meta["train_mse_before"] == pytest.approx(_sparse_error(_fresh(pipe), plan, fit), rel=1e-4)
    assert meta["train_mse_after"] == pytest.approx(_sparse_error(pipe_copy.transformer, plan, fit), rel=1e-4)
    assert meta["train_mse_after"] != pytest.approx(meta["train_mse_before"], rel=1e-3)  # trained on it
    assert "training generations:" in (out / "README.md").read_text()
    assert {"pytorch_lora_weights.safetensors", "sparse_plan.json", "finetune.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    assert "held-out" in (out / "README.md").read_text()
    # the trajectory metric: the held-out generation with the plan vs the dense one, by decoded output
    from sparsediff.finetune import output_psnr

    dense_out = torch.load(next((out / "teacher").glob("output-heldout-*.pt")), weights_only=True)
    with torch.no_grad():
        again = pipe(
            PROMPTS[0],  # held-out prompts default to the training prompts; seeds from seed + 10_000
            generator=torch.Generator().manual_seed(10_000),
            output_type="pt",
            **{"num_inference_steps": 4, "guidance_scale": 4.0, "num_frames": 8, "height": 32, "width": 32},
        ).frames
    assert torch.equal(dense_out, again)  # the dense held-out generation's decoded frames
    # one sparse step (step 3 of 4, past the 3 warm-up steps) of the smallest sigma step: a small difference
    before, after = meta["heldout_output_psnr_before"], meta["heldout_output_psnr_after"]
    assert 10 < before < 200 and 10 < after < 200 and after != before
    assert "decoded output" in (out / "README.md").read_text()
    assert output_psnr(dense_out, dense_out) == float("inf")
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
    with pytest.raises(FinetuneInputError, match="renoise"):
        FinetuneConfig(renoise=1.5)
    with pytest.raises(FinetuneInputError, match="shuffled order"):
        finetune(
            pipe, plan, PROMPTS, tmp_path / "r", FinetuneConfig(steps=1, renoise=0.5, order="steps", **CFG)
        )
    from diffusers import DDIMScheduler

    flow = pipe.scheduler
    pipe.scheduler = DDIMScheduler()
    try:
        with pytest.raises(FinetuneInputError, match="flow-matching scheduler"):
            finetune(pipe, plan, PROMPTS, tmp_path / "r", FinetuneConfig(steps=1, renoise=0.5, **CFG))
    finally:
        pipe.scheduler = flow
    assert not (tmp_path / "r").exists()
    out = tmp_path / "exists"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(FinetuneInputError, match="exists"):
        finetune(pipe, plan, PROMPTS, out, FinetuneConfig(steps=1, **CFG), progress=False)
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with pytest.raises(FinetuneInputError, match="no prompts"):
        finetune(pipe, plan, [], tmp_path / "x", FinetuneConfig(steps=1, **CFG), progress=False)
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


def test_resume_refuses_another_base_call_prompts_or_plan_before_any_work(plan, tmp_path):
    """``--resume`` continues only the run it names: recordings of another base model / weights / pipeline
    call, other (prompt, seed) pairs at the same file names, or a checkpoint for another plan are refused
    before anything is recorded, trained or written; the same run resumes without re-recording."""
    out = tmp_path / "ft"
    cfg = FinetuneConfig(steps=1, heldout=0, **CFG)
    finetune(load_embedded_pipeline(), plan, PROMPTS, out, cfg, progress=False, sparse_options=SPARSE)
    snapshot = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def refused(match, pipe=None, prompts=PROMPTS, the_plan=plan, the_cfg=cfg):
        with pytest.raises(FinetuneInputError, match=match):
            finetune(
                pipe or load_embedded_pipeline(),
                the_plan,
                prompts,
                out,
                the_cfg,
                resume=True,
                progress=False,
                sparse_options=SPARSE,
            )
        assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == snapshot  # nothing touched

    other = load_embedded_pipeline()  # the same architecture, one linear fine-tuned a little
    w = other.transformer.blocks[1].ffn.net[2].weight
    with torch.no_grad():
        w += 0.05 * w.std() * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    refused("base weights .*blocks.1.ffn", pipe=other)
    from dataclasses import replace

    refused("call frames: 8 there, 16 now", the_cfg=replace(cfg, frames=16))
    refused("holds 'a red square moving left' seed 0", prompts=PROMPTS[::-1])
    wider = Plan.uniform("tile", window=(1, 2, 2), tile=(4, 4, 4), dense_steps=1)
    refused("checkpoint.pt was trained for another setup .*plan", the_plan=wider)
    refused("rank: 4 there, 8 now", the_cfg=replace(cfg, rank=8))
    # the same run resumes: nothing re-recorded
    teacher = sorted((out / "teacher").glob("train-*.pt"))
    before = [p.stat().st_mtime_ns for p in teacher]
    finetune(
        load_embedded_pipeline(), plan, PROMPTS, out, cfg, resume=True, progress=False, sparse_options=SPARSE
    )
    assert [p.stat().st_mtime_ns for p in teacher] == before


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
        (["--plan", "OTHER_BASE"], None),  # written below: an adapter folder trained on other base weights
        (["--data", "missing.pt"], "--data missing.pt: no such file"),
        (["--data-samples", "5"], "--data-samples is for --data embedded"),
        (["--init", "nowhere"], "--init nowhere: no adapter"),
        (["--data", "embedded", "--on-policy-rounds", "1"], "on-policy rounds need recorded"),
        (["--data", "embedded", "--renoise", "0.5"], "drop --renoise"),
        (["--init", "SHIPPED", "--rank", "4"], "pass the same --rank"),
        (["--data", "CORRUPT"], "not a torch.save file"),
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
    if extra == ["--plan", "OTHER_BASE"]:
        import json
        import shutil

        from sparsediff.embedded import WEIGHTS_DIR

        folder = tmp_path / "other_base"
        shutil.copytree(f"{WEIGHTS_DIR}/sparse_plan_lora", folder)
        card = json.loads((folder / "finetune.json").read_text())
        layer = sorted(card["model"]["base_weights"])[0]
        card["model"]["base_weights"][layer][1] *= 1.1  # its base's weights were 10 % wider there
        (folder / "finetune.json").write_text(json.dumps(card))
        extra, match = (
            ["--plan", str(folder)],
            f"other base weights than this model's (1 of 16 adapted layers differ, e.g. {layer}",
        )
    if "SHIPPED" in extra:
        from sparsediff.embedded import WEIGHTS_DIR

        extra = [f"{WEIGHTS_DIR}/sparse_plan_lora" if a == "SHIPPED" else a for a in extra]
    if "CORRUPT" in extra:
        (tmp_path / "corrupt.pt").write_bytes(b"\x00 not a tensor file")
        extra = [str(tmp_path / "corrupt.pt") if a == "CORRUPT" else a for a in extra]
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


def test_recording_source_describes_call_arguments_by_content_not_address():
    """A pipeline call argument JSON cannot hold (an image, a tensor) is recorded by type, shape and content
    digest, so the same input resumes and another one is refused (``repr`` would hold a memory address)."""
    from PIL import Image

    from sparsediff.finetune import _describe

    a, b = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "red")
    assert _describe(a) == _describe(b) and "0x" not in _describe(a)
    assert _describe(a) != _describe(Image.new("RGB", (8, 8), "blue"))
    t = torch.arange(6.0).reshape(2, 3)
    assert _describe(t) == _describe(t.clone()) != _describe(t + 1)
    assert _describe(t).startswith("Tensor(2, 3):torch.float32:")


def _tiny_recording(name):
    """A tiny diffusers pipeline of ``tests/tiny_pipelines.py``, a config for its own call arguments, and one
    recorded dense generation of its prompt."""
    from tiny_pipelines import build

    tiny = build(name)
    kw = dict(tiny.kwargs)
    prompt = kw.pop("prompt", "a cat")
    kw.pop("output_type", None)
    cfg = FinetuneConfig(steps=1, num_inference_steps=kw.pop("num_inference_steps", 4), extra_call_kwargs=kw)
    (gen,) = record_teacher(tiny.pipe, [prompt], [0], cfg, progress=False)
    return tiny, cfg, gen


@pytest.mark.parametrize("name", ["ltx", "flux", "cogvideox"])
def test_renoise_on_other_pipelines_packed_batched_or_not_flow(name):
    """LTX packs its latents and batches its CFG branches in one call, Flux packs them: the recorded final
    latents are found in the transformer's input and re-noised into every batch half; CogVideoX's DDIM
    scheduler records no noise levels and is refused."""
    from sparsediff.finetune import flow_scheduler

    tiny, cfg, gen = _tiny_recording(name)
    if name == "cogvideox":
        assert flow_scheduler(tiny.pipe) is None and all(c.sigma is None for c in gen)
        with pytest.raises(FinetuneInputError, match="noise level"):
            check_renoisable(gen)
        return
    clean = check_renoisable(gen)
    call = gen[-1]
    assert call.sigma is not None and 0 < call.sigma < 1
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    hs = renoise_call(call, clean, noise).kwargs["hidden_states"]
    want = (1 - call.sigma) * clean + call.sigma * noise
    halves = hs.shape[0] // clean.shape[0]
    assert halves == (2 if name == "ltx" else 1)
    for h in hs.split(clean.shape[0]):
        torch.testing.assert_close(h.float(), want)


# ------------------------------------------------------------------------------- --data, --init


class _Listed:
    """Clean samples from a list of (caption, latents): the ``data`` protocol in its plainest form."""

    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _assert_data_sample(pipe, template, gen, caption, x0, cfg):
    """``gen`` holds the pipeline's own calls for ``caption`` (what ``record_teacher`` records for it, but the
    latents and the timestep) at the template's steps, noise levels and timesteps, on x0's flow path."""
    (ref,) = record_teacher(pipe, [caption], [5], cfg, progress=False)
    assert len(gen) == len(template) == len(ref)
    for g, t, r in zip(gen, template, ref):
        assert (g.step, g.branch, g.sigma) == (t.step, t.branch, t.sigma)
        assert set(g.kwargs) == set(r.kwargs)
        for k, v in g.kwargs.items():
            if k == "timestep":
                assert torch.equal(v, t.kwargs[k])
            elif k != "hidden_states":
                assert _same_value(v, r.kwargs[k]), k
    assert torch.equal(gen[-1].clean, x0)
    torch.testing.assert_close(check_renoisable(gen), x0)  # inputs on x0's flow path
    assert not torch.equal(latent_input(gen[1], x0), latent_input(template[1], template[-1].clean))


def _same_value(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    return a == b


def test_data_samples_get_the_pipelines_conditioning_of_their_caption_without_running_it(pipe, recorded):
    from sparsediff.finetune import DataGenerations, EmbeddedClips

    cfg = FinetuneConfig(steps=1, **CFG)
    template = recorded[0][0]
    data = EmbeddedClips(3, 8, 32, 32, exclude=HELD)
    ran, forward = [], pipe.transformer.__dict__.get("forward")
    hook = pipe.transformer.blocks[0].register_forward_hook(lambda *a: ran.append(1))
    try:
        gens = DataGenerations(pipe, template, data, cfg)
        samples = [gens[i] for i in range(3)]
    finally:
        hook.remove()
    assert not ran, "capturing the conditioning ran the transformer"
    assert pipe.transformer.__dict__.get("forward") is forward  # the stand-in forward is gone
    assert gens.step_kwargs == {"hidden_states", "timestep"}
    captions = [data[i][0] for i in range(3)]
    assert len(set(captions)) > 1
    for i in (0, 2):
        _assert_data_sample(pipe, template, samples[i], captions[i], data[i][1], cfg)
    # held-out captions are drawn again; the draw is seeded by the sample's index
    again = EmbeddedClips(3, 8, 32, 32, exclude=[captions[0]])
    assert again[0][0] != captions[0] and again[1][0] == data[1][0]
    assert torch.equal(EmbeddedClips(3, 8, 32, 32)[1][1], data[1][1])
    with pytest.raises(FinetuneInputError, match="latents"):  # another size than the pipeline's
        DataGenerations(pipe, template, EmbeddedClips(2, 8, 16, 16), cfg)


def test_data_training_is_labelled_by_the_dense_model(pipe, recorded):
    """Trained on data samples only, whose template's recorded targets were replaced by noise, the adapter
    lowers the held-out error: every sample's target came from the dense model on the re-noised data."""
    from sparsediff.finetune import DataGenerations, EmbeddedClips

    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    train, held = recorded
    (template,) = _noise_targets(train[:1])
    cfg = FinetuneConfig(steps=16, **CFG)
    gens = DataGenerations(pipe, template, EmbeddedClips(8, 8, 32, 32, exclude=HELD), cfg)
    t = _fresh(pipe)
    before = _sparse_error(t, plan, held)
    train_adapter(t, plan, gens, dataclasses.replace(cfg, renoise=1.0), progress=False, sparse_options=SPARSE)
    after = _sparse_error(t, plan, held)
    assert after < 0.9 * before, (before, after)
    with pytest.raises(FinetuneInputError, match="renoise=1"):  # the template's targets are never trained on
        train_adapter(_fresh(pipe), plan, gens, cfg, progress=False, sparse_options=SPARSE)


def test_init_adapter_starts_from_a_folder_and_refuses_another_shape(pipe, recorded, tmp_path):
    from sparsediff.finetune import _check_init, load_adapter_state, save_adapter

    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    train, held = recorded
    cfg = FinetuneConfig(steps=4, **CFG)
    t = _fresh(pipe)
    train_adapter(t, plan, train, cfg, progress=False, sparse_options=SPARSE)
    trained = _sparse_error(t, plan, held)
    save_adapter(t, tmp_path)
    state = load_adapter_state(tmp_path)
    assert state and all(k.startswith("blocks.") for k in state)
    t2 = _fresh(pipe)  # zero learning rate: the initial adapter is the result
    train_adapter(
        t2, plan, train, dataclasses.replace(cfg, steps=1, lr=1e-30), init=state,
        progress=False, sparse_options=SPARSE,
    )  # fmt: skip
    assert _sparse_error(t2, plan, held) == pytest.approx(trained, rel=1e-6)
    with pytest.raises(FinetuneInputError, match="rank"):
        train_adapter(
            _fresh(pipe), plan, train, dataclasses.replace(cfg, rank=2), init=state,
            progress=False, sparse_options=SPARSE,
        )  # fmt: skip
    with pytest.raises(FinetuneInputError, match="other layers"):
        train_adapter(
            _fresh(pipe), plan, train, dataclasses.replace(cfg, targets="qkv"), init=state,
            progress=False, sparse_options=SPARSE,
        )  # fmt: skip
    from sparsediff.embedded import WEIGHTS_DIR

    shipped = f"{WEIGHTS_DIR}/sparse_plan_lora"
    assert _check_init(__import__("pathlib").Path(shipped), pipe.transformer, FinetuneConfig(rank=8))
    with pytest.raises(FinetuneInputError, match="--rank"):
        _check_init(__import__("pathlib").Path(shipped), pipe.transformer, FinetuneConfig(rank=4))


def test_latent_data_file_is_checked(tmp_path):
    from sparsediff.finetune import LatentData, load_data

    good = tmp_path / "d.pt"
    torch.save({"captions": ["a", "b b", "c"], "latents": torch.randn(3, 2, 4, 4)}, good)
    data = LatentData(good, exclude=["b  b"])
    assert len(data) == 2 and data[1][0] == "c" and data[1][1].shape == (1, 2, 4, 4)
    for bad, match in [
        (b"not a torch file", "not a torch.save file"),
        ({"captions": ["a"], "latents": torch.randn(2, 3)}, "one sample per caption"),
        ({"latents": torch.randn(2, 3)}, "captions"),
        ({"captions": ["a"], "latents": torch.tensor([[float("nan")]])}, "finite"),
        ({"captions": ["a"], "latents": torch.randn(1, 3)}, "held-out"),
    ]:
        path = tmp_path / "bad.pt"
        if isinstance(bad, bytes):
            path.write_bytes(bad)
        else:
            torch.save(bad, path)
        with pytest.raises(FinetuneInputError, match=match):
            LatentData(path, exclude=["a"] if match == "held-out" else ())
    with pytest.raises(FinetuneInputError, match="no such file"):
        load_data(str(tmp_path / "missing.pt"), FinetuneConfig(), None)
    with pytest.raises(FinetuneInputError, match="--frames"):
        load_data("embedded", FinetuneConfig(), None)
    with pytest.raises(FinetuneInputError, match="--data-samples"):
        load_data(str(good), FinetuneConfig(), 5)


@pytest.mark.parametrize("name", ["ltx", "flux"])
def test_data_samples_on_packed_and_batched_pipelines(name):
    """LTX batches its CFG branches in one call and packs its latents with masks and sizes beside them; Flux
    packs them with ids, pooled projections and a guidance input: a data sample gets what the pipeline hands
    its transformer for the sample's caption, at the template's steps."""
    from sparsediff.finetune import DataGenerations

    tiny, cfg, template = _tiny_recording(name)
    clean = template[-1].clean
    x0 = torch.randn(clean.shape, generator=torch.Generator().manual_seed(4))
    gens = DataGenerations(tiny.pipe, template, _Listed([("a dog on a red boat", x0)]), cfg)
    _assert_data_sample(tiny.pipe, template, gens[0], "a dog on a red boat", x0, cfg)


def test_finetune_on_data_records_one_template_and_writes_the_card(pipe, tmp_path):
    plan = Plan.uniform("tile", window=(1, 1, 1), tile=(4, 4, 4), dense_steps=1)
    out = tmp_path / "ft"
    cfg = FinetuneConfig(steps=2, heldout=1, **CFG)
    try:
        meta = finetune(
            pipe, plan, PROMPTS, out, cfg, progress=False, heldout_prompts=HELD, data="embedded",
            data_samples=3, sparse_options=SPARSE,
        )  # fmt: skip
    finally:
        if ADAPTER_NAME in (getattr(pipe.transformer, "peft_config", None) or {}):
            pipe.transformer.delete_adapters(ADAPTER_NAME)
    assert sorted(p.name for p in (out / "teacher").glob("*-*.pt")) == [
        "heldout-0001.pt",
        "output-heldout-0001.pt",
        "train-0000.pt",
    ]
    assert meta["data_samples"] == 3 and meta["train_generations"] == 0 and meta["student_generations"] == 0
    assert "1 held-out captions excluded" in meta["data"] and meta["config"]["renoise"] == 0
    assert meta["heldout_mse_after"] != meta["heldout_mse_before"]
    assert "3 data samples" in (out / "README.md").read_text()
    with pytest.raises(FinetuneInputError, match="data_samples"):
        finetune(pipe, plan, PROMPTS, tmp_path / "b", cfg, data=_Listed([]), data_samples=3)
    with pytest.raises(FinetuneInputError, match="no samples"):
        finetune(pipe, plan, PROMPTS, tmp_path / "b", cfg, data=_Listed([]))
    assert not (tmp_path / "b").exists()
