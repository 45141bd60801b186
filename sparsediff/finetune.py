"""``sparsediff finetune``: teach a model its sparse plan with a LoRA (dense teacher, sparse student).

Training-free sparse attention loses quality as density drops. This module distils the dense model into
the sparse one: the **teacher** is the pipeline itself with dense attention; the **student** is the same
weights with the plan's sparse attention plus a LoRA (peft, through diffusers' own adapter API
``transformer.add_adapter``) on the linear layers of the self-attention modules the model's sparsediff
adapter lists.

How, in three parts:

1. :func:`record_teacher` runs the pipeline densely on the prompts and seeds and records every transformer
   call it makes -- the call's own inputs (latents, timestep, the pipeline's conditioning of the prompt and
   of its negative prompt for CFG, ids, masks ...) and its output -- with the step index, the number of
   steps and the CFG branch. Nothing pipeline-specific is written here: whatever the pipeline hands its
   transformer is what the student sees, at the timesteps of the pipeline's own schedule.
2. :func:`train_adapter` replays recorded calls through the student and minimises the distance between
   the student's and the teacher's predictions -- per CFG branch, or of the guided prediction the sampler
   steps with (``loss="guided"``), each denoising step by the log of its error so that steps whose errors
   are 50x smaller still count (``step_loss="log"``). By default every optimizer step takes ``batch`` random
   (generation, sparse denoising step) pairs (``order="shuffled"``); a plan with cross-step heads is
   replayed in step order instead (a batch of generations, one optimizer step per sparse step, so those
   heads see the steps they would see in a real generation). The adapter is off where no layer runs sparse
   (the dense warm-up steps; ``adapter_steps="sparse"`` of :class:`~sparsediff.SparseAttentionConfig`, the
   default, also at inference). Gradients through sparse attention use the op's backward. Under
   ``accelerate launch`` the samples of a batch are split over the processes and the adapter's gradients
   summed, so N processes train the same adapter as one process on the same data.
3. The output folder loads with diffusers' API (``pipe.load_lora_weights(DIR)`` where the pipeline has it,
   ``transformer.load_lora_adapter(DIR)`` otherwise: the weights are stored under the ``transformer.``
   prefix), holds the plan it was trained for (``sparse_plan.json``; ``enable_sparse_attention(DIR)``
   accepts the folder and loads the adapter with the plan) and a card (``README.md`` + ``finetune.json``:
   base model, plan, steps, wall time, held-out sparse-vs-dense error before and after).

Files under ``OUT``: ``teacher/train-*.pt`` and ``teacher/heldout-*.pt`` (recorded calls, tensors only,
loaded with ``weights_only=True``), ``teacher/output-heldout-*.pt`` (the dense held-out generations' decoded
output, for the trajectory metric), ``checkpoint.pt`` (adapter + optimizer + position; ``--resume``),
the adapter ``pytorch_lora_weights.safetensors``, ``sparse_plan.json``, ``finetune.json``, ``README.md``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .plan import (
    ADAPTER_META_FILE,
    ADAPTER_NAME,
    ADAPTER_WEIGHTS_FILE,
    PLAN_FILE,
    Plan,
    adapter_layers,
    base_weights_fingerprint,
    plan_folder_files,
)

logger = logging.getLogger("sparsediff.finetune")

__all__ = [
    "ADAPTER_NAME",
    "DataGenerations",
    "EmbeddedClips",
    "FinetuneConfig",
    "FinetuneInputError",
    "RecordedCall",
    "adapter_files",
    "finetune",
    "LatentData",
    "capture_calls",
    "heldout_error",
    "load_adapter_state",
    "load_data",
    "load_recording",
    "record_teacher",
    "replay_call",
    "self_attention_linears",
    "train_adapter",
]

WEIGHT_NAME = ADAPTER_WEIGHTS_FILE
PLAN_NAME = PLAN_FILE
META_NAME = ADAPTER_META_FILE
CARD_NAME = "README.md"
#: training generations whose per-call error the card reports next to the held-out one (spread over the set)
FIT_GENERATIONS = 2
#: the key prefix of the transformer's LoRA weights in a pipeline-level LoRA file
PREFIX = "transformer"
#: what ``--targets`` may name (see :class:`FinetuneConfig`)
TARGETS = ("all", "qkv", "block")
#: what ``--loss`` may name (see :class:`FinetuneConfig`)
LOSSES = ("branch", "guided")
#: what ``--step-loss`` may name
STEP_LOSSES = ("log", "mse")
#: what ``--lr-schedule`` may name
LR_SCHEDULES = ("cosine", "constant")
#: what ``--order`` may name
ORDERS = ("auto", "shuffled", "steps")
#: how on-policy student generations are labelled (:attr:`FinetuneConfig.on_policy_labels`)
ON_POLICY_LABELS = ("dense", "anchored")
#: anchored labels pull with ``delta / max(sigma, ANCHOR_MIN_SIGMA)``: below this noise level the pull stays that of
#: this level instead of growing as ``1 / sigma`` (on the embedded model the full pull asked the last step,
#: sigma 0.009, for corrections of rms 5.6 -- ~80x the plan's error there -- that no adapter can predict from
#: the state, and the last steps hardly move the output: making them dense changed no PSNR)
ANCHOR_MIN_SIGMA = 0.5
#: diffusers' cache-context names of the two classifier-free-guidance branches
COND, UNCOND = "cond", "uncond"


class FinetuneInputError(ValueError):
    """Bad input to ``sparsediff finetune`` (found before any recording or training)."""


@dataclass
class FinetuneConfig:
    """What :func:`finetune` trains and how.

    Attributes:
        steps: optimizer steps (one per replayed denoising step of a batch of generations), >= 1.
        rank: LoRA rank; ``alpha`` its scaling numerator (default: ``rank``, scale 1).
        lr: AdamW learning rate for the adapter.
        batch: generations per optimizer step (over all processes).
        num_inference_steps: the pipeline's denoising steps when recording the teacher.
        guidance_scale: passed to the pipeline when not None (CFG conditioning is then recorded too).
        frames, height, width: video/image size passed to the pipeline when not None.
        seeds_per_prompt: training generations per prompt (seeds ``seed, seed + 1, ...``).
        heldout: held-out generations (prompts cycled, seeds from ``seed + 10_000``) for the before/after
            error; 0 skips the measurement.
        seed: base seed (noise of the recorded generations, batch order, adapter init).
        checkpoint_every: optimizer steps between checkpoints (and at the end).
        targets: which linear layers get the LoRA: ``"all"`` (every ``nn.Linear`` inside each sparse
            self-attention module), ``"qkv"`` (only their query/key/value projections), or ``"block"``
            (every ``nn.Linear`` of the transformer blocks that hold them: self- and cross-attention and the
            feed-forward -- more capacity to absorb what a sparse plan drops).
        on_policy_rounds: rounds of on-policy data (DAgger): the steps are split into ``rounds + 1`` equal
            phases; after each phase but the last the *student* (sparse plan + the adapter so far) generates
            the training prompts and seeds, every transformer call of those generations is labelled with the
            dense model's prediction for the same inputs (adapter off), and the following phases train on the
            teacher's and the students' generations together. The student then learns the dense prediction on
            the states its own sparse trajectory visits, not only on the dense trajectory's. 0: teacher only.
        on_policy_labels: the targets of the student generations' calls. ``"dense"`` (default): the dense
            model's prediction at the student's state -- from a state that has drifted off the teacher's
            trajectory it continues the drift. ``"anchored"``: that prediction plus ``delta / max(sigma,
            ANCHOR_MIN_SIGMA)``, with ``delta`` the student's latents minus the teacher's at the same step of
            the same (prompt, seed) and ``sigma`` the step's noise level: an Euler step of a flow-matching
            sampler then shrinks the drift by ``sigma_next / sigma`` (down to ``ANCHOR_MIN_SIGMA``; by
            ``1 - (sigma - sigma_next) / ANCHOR_MIN_SIGMA`` below) on top of what the dense model does -- the
            student learns to steer back to the dense generation it is measured against,
            where the plan's error persists from step to step (BENCHMARKS.md, "why a small per-call error
            costs so much PSNR"). Needs recordings with noise levels (flow-matching schedulers) whose
            prediction is the sampler's velocity (checked on the teacher's steps).
        loss: what is compared with the dense prediction. ``"branch"``: each transformer call's prediction
            (every CFG branch on its own). ``"guided"``: in every denoising step that has both CFG branches,
            the guided prediction the sampler steps with, ``uncond + g * (cond - uncond)`` (``g`` =
            ``guidance_scale``, default the pipeline's): at ``g = 4`` an error that is independent between the
            branches reaches the sampler ~5x amplified, and the branch loss does not see which errors cancel.
            Needs a pipeline that runs its branches as separate calls named ``"cond"``/``"uncond"``
            (diffusers' ``cache_context``); steps with one branch use the branch loss.
        step_loss: how one denoising step's error enters its update. ``"log"`` (default): the log of each
            sample's mean squared error, so every step is weighed by its *relative* improvement -- the sparse
            error of the last steps of a flow schedule is ~50x that of the middle ones, and with ``"mse"``
            (the plain error) those last steps' gradients dominate Adam's statistics while the middle steps,
            whose errors compound over the rest of the trajectory, are left as they were (measured on the
            embedded model: after 600 steps the middle steps' error was back where it started).
        lr_schedule: ``"cosine"`` (default): linear warm-up over the first 5 % of the steps, then cosine
            decay to 10 % of ``lr``; ``"constant"``: ``lr`` throughout.
        order: how the recorded calls are visited. ``"shuffled"``: every optimizer step takes ``batch``
            (generation, denoising step) pairs drawn without replacement from seeded shuffles of all of them
            (the sparse steps only), so consecutive updates see unrelated samples. ``"steps"``: a batch of
            generations replayed in step order, one optimizer step per sparse denoising step (17 consecutive
            updates on one generation at 20 steps: measured on the embedded model, the adapter chased each
            generation and the error of the next one rose up to 20x in the first passes). ``"auto"``
            (default): shuffled, except in step order when the plan has cross-step heads (their state comes
            from the earlier steps of the same generation) or the adapter runs in every step
            (``adapter_steps="all"``).
        renoise: fraction (0 to 1) of the training samples made *anew* from a recorded one: the step's input
            latents are replaced by ``(1 - sigma) * x0 + sigma * noise`` -- the generation's own final
            latents ``x0``, the step's noise level ``sigma``, fresh Gaussian noise -- and labelled online by
            the dense model (adapter off). Every such sample is a new noise seed of a recorded prompt for the
            cost of one dense call, instead of a whole recorded generation: the adapter's limit on the
            embedded model is generalisation over noise seeds (BENCHMARKS.md, "Finetune diagnostics").
            Needs a flow-matching scheduler (noisy latents on that path; checked on the recording) and
            recordings that hold each call's ``sigma`` and the final latents (:func:`record_teacher` stores
            them), and the shuffled order. 0 (default): recorded samples only.
    """

    steps: int = 200
    rank: int = 8
    alpha: float | None = None
    lr: float = 1e-3
    batch: int = 1
    num_inference_steps: int = 20
    guidance_scale: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    seeds_per_prompt: int = 1
    heldout: int = 1
    seed: int = 0
    checkpoint_every: int = 25
    targets: str = "all"
    on_policy_rounds: int = 0
    loss: str = "branch"
    step_loss: str = "log"
    lr_schedule: str = "cosine"
    order: str = "auto"
    renoise: float = 0.0
    on_policy_labels: str = "dense"
    extra_call_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("steps", "rank", "batch", "num_inference_steps", "seeds_per_prompt", "checkpoint_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise FinetuneInputError(f"{name} must be an integer >= 1, got {v!r}")
        if not isinstance(self.on_policy_rounds, int) or not 0 <= self.on_policy_rounds < self.steps:
            raise FinetuneInputError(
                f"on_policy_rounds must be an integer in [0, steps), got {self.on_policy_rounds!r}"
            )
        if self.heldout < 0:
            raise FinetuneInputError(f"heldout must be >= 0, got {self.heldout}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise FinetuneInputError(f"lr must be a positive number, got {self.lr}")
        for name, choices in (
            ("targets", TARGETS),
            ("loss", LOSSES),
            ("step_loss", STEP_LOSSES),
            ("lr_schedule", LR_SCHEDULES),
            ("order", ORDERS),
            ("on_policy_labels", ON_POLICY_LABELS),
        ):
            if getattr(self, name) not in choices:
                raise FinetuneInputError(
                    f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}"
                )
        if not (isinstance(self.renoise, (int, float)) and 0.0 <= self.renoise <= 1.0):
            raise FinetuneInputError(f"renoise must be a fraction in [0, 1], got {self.renoise!r}")
        if self.guidance_scale is not None and not math.isfinite(self.guidance_scale):
            raise FinetuneInputError(f"guidance_scale must be a finite number, got {self.guidance_scale}")
        for name in ("frames", "height", "width"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise FinetuneInputError(f"{name} must be an integer >= 1, got {v!r}")


# --------------------------------------------------------------------------------------------- recording


@dataclass
class RecordedCall:
    """One transformer call of a dense generation: its inputs, its output (the target), where it ran.

    ``args``/``kwargs`` are the call's positional / keyword arguments (tensors on the CPU); ``step`` /
    ``num_steps`` the denoising step and step count, ``branch`` the CFG branch (diffusers' cache-context
    name, or the call's index within its step); ``target`` the dense output ``[B, ...]``. With a
    flow-matching scheduler also ``sigma``, the noise level of the call's input latents, and on a generation's
    last call ``clean``, the generation's final latents (what ``renoise`` re-noises); None otherwise.
    """

    args: tuple
    kwargs: dict[str, Any]
    step: int
    num_steps: int | None
    branch: str | int
    target: torch.Tensor
    sigma: float | None = None
    clean: torch.Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "args": list(self.args),
            "kwargs": self.kwargs,
            "step": self.step,
            "num_steps": self.num_steps,
            "branch": self.branch,
            "target": self.target,
            "sigma": self.sigma,
            "clean": self.clean,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecordedCall:
        return cls(
            tuple(d["args"]),
            dict(d["kwargs"]),
            int(d["step"]),
            d["num_steps"],
            d["branch"],
            d["target"],
            d.get("sigma"),
            d.get("clean"),
        )


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return x


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    return x


def _prediction(output: Any) -> torch.Tensor:
    """The predicted tensor of a transformer's output (``.sample``, a tuple's first item, or a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the prediction in a transformer output of type {type(output).__name__}")


def _pipeline_kwargs(pipe: Any, cfg: FinetuneConfig) -> dict[str, Any]:
    """The pipeline call's keyword arguments from the config, only those its ``__call__`` accepts."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    wanted = {
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "num_frames": cfg.frames,
        "height": cfg.height,
        "width": cfg.width,
        "output_type": "latent",
    }
    out = {k: v for k, v in wanted.items() if v is not None and k in params}
    if cfg.frames is not None and "num_frames" not in params:
        raise FinetuneInputError(f"{type(pipe).__name__} takes no num_frames: drop --frames")
    out.update(cfg.extra_call_kwargs)
    return out


def flow_scheduler(pipe: Any) -> Any | None:
    """The pipeline's scheduler when it is a flow-matching one (noisy latents ``(1 - sigma) x0 + sigma
    noise``, its ``sigmas`` indexed by step), else None."""
    sched = getattr(pipe, "scheduler", None)
    if sched is None or getattr(sched, "sigmas", None) is None:
        return None
    conf = getattr(sched, "config", None) or {}
    if (
        "FlowMatch" in type(sched).__name__
        or conf.get("prediction_type") == "flow_prediction"
        or conf.get("use_flow_sigmas")
    ):
        return sched
    return None


def _scheduler_sigma(sched: Any) -> float | None:
    """The noise level of the step the scheduler is at (its ``step_index``; before the first ``step()``
    its ``begin_index``, else 0)."""
    idx = getattr(sched, "step_index", None)
    if idx is None:
        idx = getattr(sched, "begin_index", None) or 0
    sigmas = sched.sigmas
    return float(sigmas[idx]) if 0 <= idx < len(sigmas) else None


def _final_latents_callback(pipe: Any, call_kwargs: Mapping[str, Any], box: dict) -> dict[str, Any]:
    """Pipeline call arguments that keep the latents after every step in ``box["latents"]`` (the final ones
    at the end), through diffusers' ``callback_on_step_end``; none when the pipeline has no such callback or
    the call already sets one."""
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    if "callback_on_step_end" not in params or call_kwargs.get("callback_on_step_end") is not None:
        return {}

    def on_step_end(_pipe: Any, _i: int, _t: Any, kw: dict[str, Any]) -> dict[str, Any]:
        if isinstance(kw.get("latents"), torch.Tensor):
            box["latents"] = kw["latents"].detach().float().cpu()
        return {}

    out: dict[str, Any] = {"callback_on_step_end": on_step_end}
    if "callback_on_step_end_tensor_inputs" in params:
        out["callback_on_step_end_tensor_inputs"] = ["latents"]
    return out


def record_teacher(
    pipe: Any,
    prompts: Sequence[str],
    seeds: Sequence[int],
    cfg: FinetuneConfig,
    *,
    progress: bool = True,
    plan: Plan | None = None,
    sparse_options: Mapping[str, Any] | None = None,
) -> list[list[RecordedCall]]:
    """Run ``pipe`` densely once per (prompt, seed) pair and record every transformer call.

    The pipeline runs with sparsediff's hooks on an all-dense plan (bit-identical to the untouched
    pipeline) so each call's step index and CFG branch are known exactly as the sparse student will see
    them. With ``plan`` it runs that plan instead (the student's trajectory; the recorded outputs are then the
    student's -- :func:`label_with_dense` replaces them). Returns one list of calls per generation, in call
    order.
    """
    from .api import enable_sparse_attention
    from .hooks import get_state

    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    transformer = pipe.transformer
    call_kwargs = _pipeline_kwargs(pipe, cfg)
    sched = flow_scheduler(pipe)
    final: dict[str, torch.Tensor] = {}
    if sched is not None:
        call_kwargs = {**call_kwargs, **_final_latents_callback(pipe, call_kwargs, final)}
    generations: list[list[RecordedCall]] = []
    handle = enable_sparse_attention(
        transformer, plan or Plan.dense(), **(dict(sparse_options or {}) if plan is not None else {})
    )
    state = get_state(transformer)
    calls: list[RecordedCall] = []

    def keep(module: torch.nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        step, num_steps = state.step_info()
        calls.append(
            RecordedCall(
                _to_cpu(args),
                _to_cpu(kwargs),
                int(step or 0),
                num_steps,
                state.branch_key,
                _prediction(output).detach().float().cpu(),
                _scheduler_sigma(sched) if sched is not None else None,
            )
        )

    hook = transformer.register_forward_hook(keep, with_kwargs=True)
    try:
        for i, (prompt, seed) in enumerate(zip(prompts, seeds)):
            device = getattr(pipe, "device", torch.device("cpu"))
            gen = torch.Generator(device=device).manual_seed(int(seed))
            calls = []
            final.clear()
            with torch.no_grad():
                pipe(prompt=prompt, generator=gen, **call_kwargs)
            if not calls:
                raise RuntimeError(f"{type(pipe).__name__} made no transformer call for {prompt!r}")
            if "latents" in final:
                calls[-1].clean = final["latents"]
            generations.append(calls)
            if progress:
                logger.info(
                    "teacher %d/%d: %r seed %d, %d calls", i + 1, len(prompts), prompt, seed, len(calls)
                )
    finally:
        hook.remove()
        handle.disable()
    return generations


def _output_tensor(result: Any) -> torch.Tensor | None:
    """The frames/images tensor of a pipeline's output (None if it holds no tensor)."""
    for name in ("frames", "images", "videos"):
        value = getattr(result, name, None)
        if isinstance(value, torch.Tensor):
            return value.detach().float().cpu()
    if isinstance(result, (tuple, list)) and result and isinstance(result[0], torch.Tensor):
        return result[0].detach().float().cpu()
    return None


def output_psnr(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR (dB) of a generation's output against the dense one's (range: the dense output's max - min)."""
    mse = float((pred.float() - ref.float()).pow(2).mean())
    span = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(span**2 / mse)


def generate_output(
    pipe: Any,
    prompt: str,
    seed: int,
    cfg: FinetuneConfig,
    plan: Plan | None = None,
    sparse_options: Mapping[str, Any] | None = None,
) -> torch.Tensor | None:
    """One generation's decoded output as a tensor (``output_type="pt"`` where the pipeline takes it),
    dense or with ``plan`` (and the transformer's adapters as they are); None if the output is no tensor."""
    import inspect

    from .api import sparse_attention_enabled

    kwargs = _pipeline_kwargs(pipe, cfg)
    kwargs.pop("output_type", None)
    if "output_type" in inspect.signature(type(pipe).__call__).parameters:
        kwargs["output_type"] = "pt"
    gen = torch.Generator(device=getattr(pipe, "device", torch.device("cpu"))).manual_seed(int(seed))
    with sparse_attention_enabled(pipe.transformer, plan or Plan.dense(), **dict(sparse_options or {})):
        with torch.no_grad():
            return _output_tensor(pipe(prompt=prompt, generator=gen, **kwargs))


def heldout_generation_psnr(
    pipe: Any,
    jobs: Sequence[tuple[str, int]],
    dense: Sequence[torch.Tensor | None],
    cfg: FinetuneConfig,
    plan: Plan,
    sparse_options: Mapping[str, Any] | None = None,
) -> float | None:
    """Mean PSNR of whole held-out generations with ``plan`` (and the transformer's adapters as they are)
    against the dense ones (``dense``: their decoded outputs, one per (prompt, seed) of ``jobs``) -- the
    trajectory metric: unlike the per-call error it sees errors compound over the steps and what the decoder
    makes of them (on the embedded model, adapters that lowered the held-out per-call error by 8-18 % gained
    1.7-2.6 dB here). None when the pipeline's output is not a tensor."""
    if not jobs or any(d is None for d in dense):
        return None
    values = []
    for (prompt, seed), ref in zip(jobs, dense):
        got = generate_output(pipe, prompt, seed, cfg, plan, sparse_options)
        if got is None or got.shape != ref.shape:
            return None
        values.append(output_psnr(got, ref))
    return sum(values) / len(values)


def label_with_dense(
    transformer: torch.nn.Module, generation: Sequence[RecordedCall], device: torch.device | str = "cpu"
) -> None:
    """Replace every call's target by the dense model's prediction for the call's inputs: no sparse
    attention, the ``"sparsediff"`` adapter off (other adapters as they are), under the call's cache context."""
    layers = adapter_layers(transformer)
    saved = [m.scaling[ADAPTER_NAME] for m in layers]
    try:
        for m in layers:
            m.scaling[ADAPTER_NAME] = 0.0
        with torch.no_grad():
            for call in generation:
                call.target = replay_call(transformer, call, device).detach().float().cpu()
    finally:
        for m, v in zip(layers, saved):
            m.scaling[ADAPTER_NAME] = v


def _latents_of(call: RecordedCall) -> torch.Tensor:
    """The part of a call's input that its prediction is the velocity of, float32: the whole input, or its
    first channels where the model concatenates coordinate / conditioning channels (:func:`_latent_layout`
    with the prediction as the reference)."""
    hs = _hidden_states(call)
    _, ch = _latent_layout(hs, call.target, what="anchored labels", fallback="on_policy_labels 'dense'")
    return (hs if ch is None else hs[:, :ch]).float()


def _velocity_sign(generation: Sequence[RecordedCall]) -> float:
    """+1 when the recorded predictions are the velocity a flow-matching Euler sampler steps with,
    ``x_next = x + (sigma_next - sigma) * prediction`` (per branch, CFG combined or not: the cosine of the
    branches' mean with the step taken is what is checked), -1 when the pipeline negates them; raises when the
    steps do not follow the predictions either way."""
    steps = _steps_of([generation])
    cos = []
    for now, nxt in zip(steps, steps[1:]):
        a, b = now[0], nxt[0]
        if a.sigma is None or b.sigma is None or a.sigma == b.sigma:
            continue
        x0, x1 = _latents_of(a), _latents_of(b)
        pred = torch.stack([c.target.float() for c in now]).mean(0)
        if x0.shape != x1.shape or pred.shape != x0.shape:
            continue
        move = ((x1 - x0) / (b.sigma - a.sigma)).flatten()
        cos.append(float(torch.nn.functional.cosine_similarity(move, pred.flatten(), dim=0)))
    if not cos:
        raise FinetuneInputError(
            "anchored labels: the recording has no consecutive steps with noise levels and predictions shaped "
            "like the latents (flow-matching schedulers only); use on_policy_labels='dense'"
        )
    mean = sum(cos) / len(cos)
    if abs(mean) < 0.5:
        raise FinetuneInputError(
            f"anchored labels: the sampler's steps do not follow the recorded predictions (cosine {mean:.2f}): "
            "not a flow-matching Euler sampler on the transformer's output; use on_policy_labels='dense'"
        )
    return 1.0 if mean > 0 else -1.0


def anchor_labels(
    student: Sequence[RecordedCall], teacher: Sequence[RecordedCall], min_sigma: float = ANCHOR_MIN_SIGMA
) -> None:
    """Add ``sign * (x_student - x_teacher) / max(sigma, min_sigma)`` to every target of ``student`` (already
    labelled by the dense model, :func:`label_with_dense`), ``teacher`` being the dense generation of the same
    prompt and seed (:attr:`FinetuneConfig.on_policy_labels` ``"anchored"``): a flow-matching Euler step with
    the new target shrinks the student's drift from the teacher's trajectory by ``sigma_next / sigma`` (above
    ``min_sigma``) on top of what the dense prediction does. ``sign`` is the pipeline's
    (:func:`_velocity_sign`)."""
    if len(student) != len(teacher):
        raise FinetuneInputError(
            f"anchored labels: the student generation has {len(student)} calls, the teacher's {len(teacher)}"
        )
    sign = _velocity_sign(teacher)
    for s, t in zip(student, teacher):
        if (s.step, s.branch) != (t.step, t.branch):
            raise FinetuneInputError(
                f"anchored labels: call (step {s.step}, branch {s.branch!r}) of the student generation meets "
                f"(step {t.step}, branch {t.branch!r}) of the teacher's: not the same schedule"
            )
        if s.sigma is None or not s.sigma > 0:
            raise FinetuneInputError("anchored labels: the recorded call has no positive noise level (sigma)")
        delta = _latents_of(s) - _latents_of(t)
        s.target = s.target.float() + sign * delta / max(float(s.sigma), min_sigma)


def save_recording(generation: Sequence[RecordedCall], path: str | os.PathLike) -> None:
    """Write one recorded generation (tensors and plain values only; loadable with ``weights_only``)."""
    tmp = f"{path}.tmp"
    torch.save([c.to_dict() for c in generation], tmp)
    os.replace(tmp, path)


def load_recording(path: str | os.PathLike) -> list[RecordedCall]:
    """Read a generation written by :func:`save_recording`."""
    # memory-mapped: a replayed sample pages in only the calls it reads
    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return [RecordedCall.from_dict(d) for d in data]


# ------------------------------------------------------------------------------------------- replay


def _batch_size(call: RecordedCall) -> int:
    return int(call.target.shape[0])


def _cat(values: Sequence[Any], batch: Sequence[int], where: str) -> Any:
    """Concatenate one argument of the same call across generations along the batch dimension.

    A tensor whose first dimension is its generation's batch size is concatenated; anything else (ids,
    flags, shared masks) must be equal in every generation and is passed once."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if first.dim() > 0 and all(v.dim() > 0 and v.shape[0] == b for v, b in zip(values, batch)):
            return torch.cat(list(values), 0)
        if all(
            isinstance(v, torch.Tensor) and v.shape == first.shape and torch.equal(v, first) for v in values
        ):
            return first
        raise ValueError(f"{where}: differs between generations and has no batch dimension")
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([v[i] for v in values], batch, f"{where}[{i}]") for i in range(len(first)))
    if isinstance(first, dict):
        return {k: _cat([v[k] for v in values], batch, f"{where}.{k}") for k in first}
    if any(v != first for v in values[1:]):
        raise ValueError(f"{where}: differs between generations ({values!r})")
    return first


def _merge_calls(calls: Sequence[RecordedCall]) -> RecordedCall:
    """The same call (step, branch) of several generations as one batched call."""
    if len(calls) == 1:
        return calls[0]
    batch = [_batch_size(c) for c in calls]
    return RecordedCall(
        _cat([c.args for c in calls], batch, "args"),
        _cat([c.kwargs for c in calls], batch, "kwargs"),
        calls[0].step,
        calls[0].num_steps,
        calls[0].branch,
        torch.cat([c.target for c in calls], 0),
    )


def _steps_of(generations: Sequence[Sequence[RecordedCall]]) -> list[list[RecordedCall]]:
    """Group the batch's calls by (position in the generation): call i of every generation together, then
    by denoising step -- a list of steps, each a list of merged calls (one per branch)."""
    lengths = {len(g) for g in generations}
    if len(lengths) != 1:
        raise ValueError(f"generations of different lengths {sorted(lengths)}: record them with one schedule")
    merged = [_merge_calls([g[i] for g in generations]) for i in range(lengths.pop())]
    steps: list[list[RecordedCall]] = []
    for call in merged:
        if steps and steps[-1][0].step == call.step:
            steps[-1].append(call)
        else:
            steps.append([call])
    return steps


def replay_call(
    transformer: torch.nn.Module, call: RecordedCall, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One recorded call through the transformer, under the cache context it ran in (its step index and
    CFG branch, so sparse attention sees the step it would see in a generation); returns the prediction."""
    args = _to_device(call.args, device)
    kwargs = _to_device(call.kwargs, device)
    if isinstance(call.branch, str) and hasattr(transformer, "cache_context"):
        with transformer.cache_context(call.branch, step_index=call.step, num_inference_steps=call.num_steps):
            return _prediction(transformer(*args, **kwargs))
    return _prediction(transformer(*args, **kwargs))


def _hidden_states(call: RecordedCall) -> torch.Tensor:
    hs = call.kwargs.get("hidden_states")
    if hs is None and call.args and isinstance(call.args[0], torch.Tensor):
        hs = call.args[0]
    if not isinstance(hs, torch.Tensor):
        raise FinetuneInputError("renoise: the transformer call has no hidden_states tensor to re-noise")
    return hs


def _latent_layout(
    hs: torch.Tensor, clean: torch.Tensor, what: str = "renoise", fallback: str = "renoise 0"
) -> tuple[int, int | None]:
    """How the final latents ``clean [B, ...]`` sit in a call's hidden states: (batch repeat -- 2 where the
    pipeline batches its CFG branches --, channel count when the latents are the first channels of more (the
    coordinate or conditioning channels some models concatenate), else None for the whole tensor)."""
    b = clean.shape[0]
    if b and hs.shape[0] % b == 0:
        if hs.shape[1:] == clean.shape[1:]:
            return hs.shape[0] // b, None
        if hs.dim() == clean.dim() and hs.shape[2:] == clean.shape[2:] and hs.shape[1] > clean.shape[1]:
            return hs.shape[0] // b, clean.shape[1]
    raise FinetuneInputError(
        f"{what}: the transformer's input {tuple(hs.shape)} does not hold the pipeline's latents "
        f"{tuple(clean.shape)} (the same shape, or as its first channels): use {fallback}"
    )


def latent_input(call: RecordedCall, clean: torch.Tensor) -> torch.Tensor:
    """The noisy latents of a recorded call's input (the part :func:`renoise_call` replaces), float32."""
    hs = _hidden_states(call)
    _, ch = _latent_layout(hs, clean)
    return (hs if ch is None else hs[:, :ch]).float()


def renoise_call(call: RecordedCall, clean: torch.Tensor, noise: torch.Tensor) -> RecordedCall:
    """A copy of ``call`` whose input latents are ``(1 - sigma) * clean + sigma * noise`` at the call's
    noise level (other input channels -- coordinates, conditioning latents -- and arguments as recorded);
    its target is still the recorded one: label it (:func:`label_with_dense`) before training on it."""
    if call.sigma is None:
        raise FinetuneInputError("renoise: the recorded call has no noise level (sigma)")
    hs = _hidden_states(call)
    rep, ch = _latent_layout(hs, clean)
    x = (1.0 - call.sigma) * clean.float() + call.sigma * noise.float()
    x = x.repeat(rep, *([1] * (x.dim() - 1))).to(hs.dtype)
    if ch is None:
        new = x
    else:
        new = hs.clone()
        new[:, :ch] = x
    if "hidden_states" in call.kwargs:
        return replace(call, kwargs={**call.kwargs, "hidden_states": new})
    return replace(call, args=(new, *call.args[1:]))


def check_renoisable(generation: Sequence[RecordedCall]) -> torch.Tensor:
    """The generation's final latents, after checking that it can be re-noised: every call has its noise
    level, the last call the final latents, and the inputs lie on the flow-matching path -- at the call
    whose ``sigma`` is nearest 0.5, ``(x - (1 - sigma) x0) / sigma`` has a standard deviation near 1 (noise),
    as it has on the embedded model's generations (0.95-0.99). Raises :class:`FinetuneInputError`."""
    clean = generation[-1].clean if generation else None
    if clean is None or any(c.sigma is None for c in generation):
        raise FinetuneInputError(
            "renoise needs recordings that hold each call's noise level and the final latents (recorded by "
            "this version with a flow-matching scheduler); re-record them (--overwrite) or use renoise 0"
        )
    mid = [c for c in generation if 0.1 < c.sigma < 0.95]
    if mid:
        call = min(mid, key=lambda c: abs(c.sigma - 0.5))
        x = latent_input(call, clean)
        rep, _ = _latent_layout(_hidden_states(call), clean)
        x0 = clean.float().repeat(rep, *([1] * (clean.dim() - 1)))
        std = float(((x - (1.0 - call.sigma) * x0) / call.sigma).std())
        if not 0.5 <= std <= 1.5:
            raise FinetuneInputError(
                f"renoise: the recorded inputs are not (1 - sigma) x0 + sigma noise (at sigma {call.sigma:.3f} "
                f"the implied noise has std {std:.2f}, not ~1): this pipeline's latents do not follow the "
                "flow-matching path; use renoise 0"
            )
    return clean


# ------------------------------------------------------------------------------------------ clean data

#: clip ``i`` of :class:`EmbeddedClips` is drawn from the generator seed ``DATA_SEED_BASE + i``
DATA_SEED_BASE = 1_000_000
#: the data source ``--data`` names for the embedded model's procedural clips
EMBEDDED_DATA = "embedded"
#: the captions whose captured conditioning :class:`DataGenerations` keeps (the text encoder is the slow part)
_CONDITIONING_CACHE = 64


class EmbeddedClips:
    """The embedded model's own training distribution as clean samples: procedural clips of coloured shapes
    (:mod:`sparsediff.embedded.data`, distractors as in its training), clip ``i`` drawn from the seed
    ``DATA_SEED_BASE + i`` and drawn again (same generator) while its caption is one of ``exclude`` -- the
    held-out prompts stay held out. ``data[i] -> (caption, video [1, 3, F, H, W] in [-1, 1])``: the embedded
    pipeline runs in pixel space, so a clip is a clean latent."""

    def __init__(self, count: int, frames: int, height: int, width: int, exclude: Iterable[str] = ()) -> None:
        if not isinstance(count, int) or count < 1:
            raise FinetuneInputError(f"data samples must be an integer >= 1, got {count!r}")
        self.count, self.frames, self.height, self.width = count, frames, height, width
        self.exclude = {" ".join(e.split()) for e in exclude}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        from .embedded.data import sample_batch

        if not 0 <= i < self.count:
            raise IndexError(i)
        gen = torch.Generator().manual_seed(DATA_SEED_BASE + i)
        for _ in range(1000):
            batch = sample_batch(1, self.frames, self.height, self.width, gen)
            if batch.captions[0] not in self.exclude:
                return batch.captions[0], batch.video.float()
        raise FinetuneInputError("every embedded clip drawn has a held-out caption")

    def describe(self) -> str:
        return (
            f"{EMBEDDED_DATA}: {self.count} procedural clips {self.frames}x{self.height}x{self.width} "
            f"(seeds {DATA_SEED_BASE}+i), {len(self.exclude)} held-out captions excluded"
        )


class LatentData:
    """Clean samples from a file written with ``torch.save({"captions": [str, ...], "latents": Tensor[N,
    ...]})``: the latents in the pipeline's own latent format (what it returns with ``output_type="latent"``,
    e.g. your videos through ``pipe.vae.encode`` and the pipeline's latent normalisation). Samples whose
    caption is one of ``exclude`` are left out."""

    def __init__(self, path: str | os.PathLike, exclude: Iterable[str] = ()) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FinetuneInputError(f"--data {path}: no such file (or use --data {EMBEDDED_DATA})")
        try:
            d = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # a corrupt or foreign file: say which
            raise FinetuneInputError(f"--data {path}: not a torch.save file ({type(e).__name__}: {e})") from e
        caps, lat = (d.get("captions"), d.get("latents")) if isinstance(d, Mapping) else (None, None)
        if not (isinstance(caps, (list, tuple)) and all(isinstance(c, str) for c in caps)):
            raise FinetuneInputError(
                f"--data {path}: needs a dict with 'captions' (a list of strings) and 'latents'"
            )
        if not (isinstance(lat, torch.Tensor) and lat.dim() >= 2 and lat.shape[0] == len(caps)):
            raise FinetuneInputError(
                f"--data {path}: 'latents' must be a tensor [N, ...] with one sample per caption "
                f"({len(caps)} captions, latents {getattr(lat, 'shape', type(lat).__name__)})"
            )
        if not lat.is_floating_point() or not bool(torch.isfinite(lat).all()):
            raise FinetuneInputError(f"--data {path}: 'latents' must be finite floating-point values")
        held = {" ".join(e.split()) for e in exclude}
        self.captions, self.latents = list(caps), lat
        self.keep = [i for i, c in enumerate(caps) if " ".join(c.split()) not in held]
        if not self.keep:
            raise FinetuneInputError(f"--data {path}: every caption is a held-out prompt")
        if len(self.keep) < len(caps):
            logger.warning(
                "--data %s: %d samples with held-out captions left out", path, len(caps) - len(self.keep)
            )

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor]:
        k = self.keep[i]
        return self.captions[k], self.latents[k : k + 1].float()

    def describe(self) -> str:
        return f"{self.path.name}: {len(self.keep)} samples {tuple(self.latents.shape[1:])}"


def load_data(spec: str, cfg: FinetuneConfig, count: int | None, exclude: Iterable[str] = ()) -> Any:
    """The clean-data source ``--data`` names: ``"embedded"`` (:class:`EmbeddedClips`, ``count`` of them at
    the config's size, default 1000) or a file (:class:`LatentData`)."""
    if spec == EMBEDDED_DATA:
        if None in (cfg.frames, cfg.height, cfg.width):
            raise FinetuneInputError(f"--data {EMBEDDED_DATA} needs --frames, --height and --width")
        return EmbeddedClips(1000 if count is None else count, cfg.frames, cfg.height, cfg.width, exclude)
    data = LatentData(spec, exclude)
    if count is not None:
        raise FinetuneInputError(
            f"--data-samples is for --data {EMBEDDED_DATA}; a file's samples are its own"
        )
    return data


class _Captured(Exception):
    """Raised from the stand-in forward once the calls :func:`capture_calls` wants are recorded."""


def capture_calls(pipe: Any, prompt: str, cfg: FinetuneConfig, like: Sequence[RecordedCall]) -> list[tuple]:
    """The arguments ``(args, kwargs)`` of the pipeline's first ``len(like)`` transformer calls for
    ``prompt`` -- its own conditioning of the prompt and of its negative prompt -- without running the
    transformer: for the duration its ``forward`` is a stand-in that records the call and returns zeros
    shaped like the recorded ``like[k]``'s prediction, and the pipeline is stopped at the next call."""
    transformer = pipe.transformer
    seen: list[tuple] = []

    def stand_in(*args: Any, **kwargs: Any) -> Any:
        if len(seen) == len(like):
            raise _Captured
        seen.append((_to_cpu(args), _to_cpu(kwargs)))
        out = torch.zeros_like(like[len(seen) - 1].target).to(transformer.device)
        if kwargs.get("return_dict", True) is False:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)

    had = "forward" in transformer.__dict__
    old = transformer.__dict__.get("forward")
    bar = getattr(pipe, "_progress_bar_config", None)
    transformer.forward = stand_in
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(**{**(bar or {}), "disable": True})
    try:
        device = getattr(pipe, "device", torch.device("cpu"))
        with torch.no_grad():
            pipe(
                prompt=prompt,
                generator=torch.Generator(device=device).manual_seed(0),
                **_pipeline_kwargs(pipe, cfg),
            )
    except _Captured:
        pass
    finally:
        if had:
            transformer.forward = old
        else:
            del transformer.forward
        if bar is None:
            pipe.__dict__.pop("_progress_bar_config", None)
        else:
            pipe._progress_bar_config = bar
    if len(seen) != len(like):
        raise FinetuneInputError(
            f"{type(pipe).__name__} made {len(seen)} transformer calls in its first step for {prompt!r}, the "
            f"recorded template {len(like)}"
        )
    return seen


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.equal(a, b)
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


class DataGenerations(Sequence):
    """Clean data as training "generations": sample ``i`` is the recorded ``template`` generation's calls
    (their steps, CFG branches, noise levels and timesteps) with the pipeline's own conditioning of the
    sample's caption (:func:`capture_calls`) and the sample's latents re-noised at each call's noise level
    (the template's final latents replaced by the sample's). Their targets are the template's, never trained
    on: :func:`train_adapter` with ``renoise=1`` re-noises every sample afresh and labels it with the dense
    model. What varies between the template's steps (the latents, the timestep) comes from the template;
    everything else (text embeddings, pooled projections, masks, ids) from the captured calls."""

    def __init__(self, pipe: Any, template: Sequence[RecordedCall], data: Any, cfg: FinetuneConfig) -> None:
        self.pipe, self.data, self.cfg = pipe, data, cfg
        self.template = list(template)
        self.clean = check_renoisable(self.template)
        steps = _steps_of([self.template])
        self.first = steps[0]
        self.step_args: set[int] = set()
        self.step_kwargs: set[str] = set()
        for calls in steps[1:]:
            if len(calls) != len(self.first):
                raise FinetuneInputError("the template generation's steps make different numbers of calls")
            for call, ref in zip(calls, self.first):
                self.step_args |= {
                    p for p, v in enumerate(call.args) if p >= len(ref.args) or not _same(v, ref.args[p])
                }
                self.step_kwargs |= {k for k, v in call.kwargs.items() if not _same(v, ref.kwargs.get(k))}
        self._cache: dict[str, list[tuple]] = {}
        self.shape = tuple(self.clean.shape)
        if len(data):  # a sample of another size or model fails here, before any training
            self[0]

    def __len__(self) -> int:
        return len(self.data)

    def _conditioning(self, caption: str) -> list[tuple]:
        if caption not in self._cache:
            if len(self._cache) >= _CONDITIONING_CACHE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[caption] = capture_calls(self.pipe, caption, self.cfg, self.first)
        return self._cache[caption]

    def __getitem__(self, i: int) -> list[RecordedCall]:  # type: ignore[override]
        caption, x0 = self.data[i]
        if tuple(x0.shape) != self.shape:
            raise FinetuneInputError(
                f"data sample {i} ({caption!r}) has latents {tuple(x0.shape)}; the pipeline's are {self.shape} "
                "at this size"
            )
        captured = self._conditioning(caption)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(DATA_SEED_BASE + i))
        out = []
        for n, call in enumerate(self.template):
            args, kwargs = captured[n % len(self.first)]
            args = tuple(call.args[p] if p in self.step_args else v for p, v in enumerate(args))
            kwargs = {**kwargs, **{k: v for k, v in call.kwargs.items() if k in self.step_kwargs}}
            out.append(renoise_call(replace(call, args=args, kwargs=kwargs, clean=None), x0, noise))
        out[-1].clean = x0
        return out

    def describe(self) -> str:
        return self.data.describe() if hasattr(self.data, "describe") else f"{len(self.data)} samples"


def _sample_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample ``[B]``."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _cfg_pair(calls: Sequence[RecordedCall]) -> tuple[int, int] | None:
    """Indices (cond, uncond) of a denoising step's two CFG branches, or None when the step has not exactly
    the two calls diffusers names ``"cond"`` and ``"uncond"``."""
    names = [c.branch for c in calls]
    if len(calls) == 2 and sorted(map(str, names)) == [COND, UNCOND]:
        return names.index(COND), names.index(UNCOND)
    return None


def _guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """The guided prediction a CFG sampler steps with."""
    return uncond.float() + scale * (cond.float() - uncond.float())


def _step_errors(
    preds: Sequence[torch.Tensor], calls: Sequence[RecordedCall], guidance: float | None
) -> list[torch.Tensor]:
    """The training/held-out errors of one denoising step: with ``guidance`` and both CFG branches, one
    per-sample error of the guided prediction; otherwise one per call (branch)."""
    pair = _cfg_pair(calls) if guidance is not None else None
    if pair is None:
        return [_sample_errors(p, c.target.to(p.device)) for p, c in zip(preds, calls)]
    c, u = pair
    dev = preds[c].device
    target = _guided(calls[c].target.to(dev), calls[u].target.to(dev), guidance)
    return [_sample_errors(_guided(preds[c], preds[u], guidance), target)]


def guidance_for_loss(
    cfg: FinetuneConfig, pipe: Any, generation: Sequence[RecordedCall] | None = None
) -> float | None:
    """The CFG scale the ``"guided"`` loss combines the branches with (``None`` for the branch loss):
    ``cfg.guidance_scale``, else the default of the pipeline's ``__call__``. Raises
    :class:`FinetuneInputError` when there is no guidance (scale <= 1) or, given a recorded ``generation``,
    when no denoising step has the two branches as separate ``"cond"``/``"uncond"`` calls."""
    if cfg.loss != "guided":
        return None
    scale = cfg.guidance_scale
    if scale is None and pipe is not None:
        import inspect

        param = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
        if param is not None and isinstance(param.default, (int, float)):
            scale = float(param.default)
    if scale is None or not scale > 1:
        raise FinetuneInputError(
            f"loss 'guided' needs classifier-free guidance (a guidance scale > 1; got {scale}): pass "
            "--guidance-scale or use --loss branch"
        )
    if generation is not None and not any(_cfg_pair(calls) for calls in _steps_of([generation])):
        branches = sorted({str(c.branch) for c in generation})
        raise FinetuneInputError(
            "loss 'guided' needs the pipeline to run its CFG branches as separate transformer calls named "
            f"'cond' and 'uncond' (diffusers' cache_context); its calls ran as {branches}: use --loss branch"
        )
    return float(scale)


# ------------------------------------------------------------------------------------------- adapter


def self_attention_linears(transformer: torch.nn.Module, targets: str = "all") -> list[str]:
    """Full module names of the linear layers the LoRA adapts, from the model's sparsediff adapter (the
    self-attention modules that run sparse): every linear inside them (``"all"``), their q/k/v projections
    (``"qkv"``), or every linear of the transformer blocks that hold them (``"block"``: the module one level
    above each self-attention module, e.g. ``blocks.3`` for ``blocks.3.attn1``)."""
    from .pipelines.base import get_adapter

    if targets not in TARGETS:
        raise FinetuneInputError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    roots: list[tuple[str, torch.nn.Module]] = []
    for prefix, module in get_adapter(transformer).attention_modules(transformer):
        if targets == "block" and "." in prefix:
            parent = prefix.rsplit(".", 1)[0]
            prefix, module = parent, transformer.get_submodule(parent)
        if all(prefix != p for p, _ in roots):
            roots.append((prefix, module))
    names = []
    for prefix, module in roots:
        for sub, child in module.named_modules():
            # a linear layer, or one peft has wrapped (its base_layer); never peft's own inner layers
            linear = isinstance(child, torch.nn.Linear) or isinstance(
                getattr(child, "base_layer", None), torch.nn.Linear
            )
            if not sub or not linear:
                continue
            if any(part == "base_layer" or part.startswith("lora_") for part in sub.split(".")):
                continue
            leaf = sub.rsplit(".", 1)[-1]
            if targets == "qkv" and not any(t in leaf for t in ("to_q", "to_k", "to_v", "qkv")):
                continue
            names.append(f"{prefix}.{sub}")
    if not names:
        raise FinetuneInputError(
            f"{type(transformer).__name__}: no linear layers in its self-attention modules"
        )
    return names


def _add_adapter(transformer: torch.nn.Module, cfg: FinetuneConfig) -> list[torch.nn.Parameter]:
    try:
        from peft import LoraConfig
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("sparsediff finetune needs peft: pip install 'sparsediff[finetune]'") from e
    lora = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
        target_modules=self_attention_linears(transformer, cfg.targets),
        init_lora_weights=True,
    )
    torch.manual_seed(cfg.seed)
    transformer.add_adapter(lora, adapter_name=ADAPTER_NAME)
    params = []
    for name, p in transformer.named_parameters():
        train = "lora_" in name and f".{ADAPTER_NAME}." in f"{name}."
        p.requires_grad_(train)
        if train:
            params.append(p)
    if not params:
        raise RuntimeError("the LoRA adapter added no trainable parameters")
    return params


def _adapter_state(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {
        k: v.detach().cpu().contiguous()
        for k, v in get_peft_model_state_dict(transformer, adapter_name=ADAPTER_NAME).items()
    }


def save_adapter(transformer: torch.nn.Module, out: str | os.PathLike) -> Path:
    """Write the adapter as a pipeline-level LoRA file (keys under ``transformer.``) with its peft config
    as metadata -- what ``pipe.load_lora_weights(out)`` and ``transformer.load_lora_adapter(out)`` read."""
    from diffusers.loaders.lora_base import LoraBaseMixin

    config = transformer.peft_config[ADAPTER_NAME].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    LoraBaseMixin.write_lora_layers(
        state_dict=LoraBaseMixin.pack_weights(_adapter_state(transformer), PREFIX),
        save_directory=os.fspath(out),
        is_main_process=True,
        weight_name=WEIGHT_NAME,
        save_function=None,
        safe_serialization=True,
        lora_adapter_metadata={f"{PREFIX}.{k}": v for k, v in config.items()},
    )
    return Path(out) / WEIGHT_NAME


adapter_files = plan_folder_files


# ------------------------------------------------------------------------------------------- training


def load_adapter_state(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The adapter weights of a finetune folder (its ``pytorch_lora_weights.safetensors``), keyed as peft's
    state dict without the adapter name -- what ``train_adapter(init=...)`` starts from."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHT_NAME
    if not path.is_file():
        raise FinetuneInputError(f"--init {folder}: no adapter ({WEIGHT_NAME}) there")
    try:
        state = load_file(os.fspath(path))
    except Exception as e:
        raise FinetuneInputError(f"--init {folder}: unreadable adapter ({type(e).__name__}: {e})") from e
    pre = f"{PREFIX}."
    return {k[len(pre) :] if k.startswith(pre) else k: v for k, v in state.items()}


def _set_adapter_state(transformer: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into the ``"sparsediff"`` adapter; refuses a state of another LoRA shape or layers."""
    from peft.utils import set_peft_model_state_dict

    try:
        res = set_peft_model_state_dict(transformer, dict(state), adapter_name=ADAPTER_NAME)
    except RuntimeError as e:  # shape mismatch: another rank
        raise FinetuneInputError(f"the initial adapter does not fit this LoRA (another --rank?): {e}") from e
    unexpected = list(getattr(res, "unexpected_keys", None) or [])
    missing = [k for k in getattr(res, "missing_keys", None) or [] if "lora_" in k and ADAPTER_NAME in k]
    if unexpected or missing:
        raise FinetuneInputError(
            f"the initial adapter adapts other layers than this LoRA (another --targets or model?): "
            f"{len(unexpected)} unexpected, {len(missing)} missing LoRA weights, e.g. {(unexpected + missing)[0]}"
        )


def _dist() -> tuple[int, int]:
    """(rank, world size): several processes only under ``accelerate launch``."""
    from .loading import distributed

    rank, world, _ = distributed()
    return rank, world


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _heldout_errors(
    transformer: torch.nn.Module,
    generations: Iterable[Sequence[RecordedCall]],
    device: torch.device | str,
    guidance: float | None,
) -> tuple[float, float | None]:
    """(per-branch MSE over every call, guided MSE over the steps with both CFG branches or None)."""
    device = torch.device(device)
    total, n, g_total, g_n = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for gen in generations:
            for step in _steps_of([gen]):
                preds = [replay_call(transformer, call, device) for call in step]
                for err in _step_errors(preds, step, None):
                    total += float(err.sum())
                    n += err.numel()
                if guidance is not None and _cfg_pair(step) is not None:
                    (err,) = _step_errors(preds, step, guidance)
                    g_total += float(err.sum())
                    g_n += err.numel()
    return total / max(n, 1), (g_total / g_n if g_n else None)


def _plan_errors(
    transformer: torch.nn.Module,
    plan: Plan,
    held: Sequence[Path],
    fit: Sequence[Path],
    guidance: float | None,
    sparse_options: Mapping[str, Any] | None,
) -> tuple[float, float | None, float | None]:
    """With the plan enabled: (per-call MSE on the held-out recordings, their guided MSE or None, per-call MSE
    on the ``fit`` training recordings or None without them) -- the card's before / after numbers."""
    from .api import sparse_attention_enabled

    device = transformer.device
    with sparse_attention_enabled(transformer, plan, **dict(sparse_options or {})):
        branch, guided = _heldout_errors(transformer, (load_recording(p) for p in held), device, guidance)
        fit_err = (
            _heldout_errors(transformer, (load_recording(p) for p in fit), device, None)[0] if fit else None
        )
    return branch, guided, fit_err


def heldout_error(
    transformer: torch.nn.Module,
    generations: Iterable[Sequence[RecordedCall]],
    device: torch.device | str = "cpu",
    guidance: float | None = None,
) -> float:
    """Mean squared error of the transformer (as it is now: sparse or not, adapter or not) against the
    recorded dense outputs, over every call of every generation, replayed in step order. With ``guidance``
    the error of the guided prediction instead, over the steps with both CFG branches (what the
    ``"guided"`` loss minimises; NaN when no step has both)."""
    branch, guided = _heldout_errors(transformer, generations, device, guidance)
    if guidance is None:
        return branch
    return guided if guided is not None else float("nan")


def _order(n_generations: int, seed: int, count: int) -> list[int]:
    """The generations' order over training: seeded shuffles, one after another (same in every process)."""
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < count:
        perm = list(range(n_generations))
        rng.shuffle(perm)
        order.extend(perm)
    return order[:count]


def _sparse_steps(
    steps: Sequence[Sequence[RecordedCall]], plan: Plan, transformer: torch.nn.Module
) -> set[int]:
    """Indices into ``steps`` of the denoising steps that run some layer sparse under ``plan``."""
    from .pipelines.base import get_adapter

    num_layers = len(get_adapter(transformer).attention_modules(transformer))
    out = set()
    for k, calls in enumerate(steps):
        step, n = calls[0].step, calls[0].num_steps or len(steps)
        if any(not plan.schedule.is_dense(step, n, layer) for layer in range(num_layers)):
            out.add(k)
    return out


def _update_groups(num_steps: int, sparse: set[int]) -> list[list[int]]:
    """The denoising steps (indices) of each optimizer update: every step in ``sparse`` (it runs some layer
    sparse, :func:`_sparse_steps`) ends a group; the plan's all-dense warm-up steps join the group of the next
    sparse step."""
    groups: list[list[int]] = []
    pending: list[int] = []
    for k in range(num_steps):
        pending.append(k)
        if k in sparse:
            groups.append(pending)
            pending = []
    if not groups:
        raise FinetuneInputError(
            "the plan runs every recorded step dense (warm-up steps / dense layers): nothing to train"
        )
    groups[-1].extend(pending)
    return groups


def _plan_specs(plan: Plan) -> list[Any]:
    """Every head spec a plan names: its default and each layer's."""
    return [plan.default] + [s for layer in plan.layers or () for s in layer]


def _has_cached_remainder(plan: Plan) -> bool:
    return any(s.remainder == "cached" for s in _plan_specs(plan))


def _remainder_sources(
    transformer: torch.nn.Module, plan: Plan, steps: Sequence[Sequence[RecordedCall]], device: torch.device
) -> tuple[list[list[int]], set[int]]:
    """For a plan with ``remainder="cached"`` heads: (for each denoising step, the index into ``steps`` of the
    earlier steps a replay of that step alone must run first, without gradients, so that the cached heads hold
    what they hold at that step in a generation -- the steps their stored remainders were refreshed at; the
    steps whose calls are exact -- every cached head refreshed there, i.e. ran its dense pass, and the plan has
    no other sparse head).

    Found by replaying ``steps`` (one generation) in order through the enabled plan and reading which step
    every layer's stored remainders come from before and after each step: the hooks' own refresh rule,
    whatever the plan's warm-up, dense layers and refresh intervals. One refresh step: replaying it alone
    refreshes every group there, as the generation did. Several (heads with different intervals): every step
    from the oldest one on."""
    from .attention import CACHED_REMAINDER_SLOT
    from .hooks import get_state

    state = get_state(transformer)

    def stored() -> list[int]:
        return [
            int(entry[2])
            for layer in state.layers
            for st in layer.states.values()
            for entry in st.family_states.get(CACHED_REMAINDER_SLOT, {}).values()
            if entry[2] is not None
        ]

    only_cached = all(s.pattern == "dense" or s.remainder == "cached" for s in _plan_specs(plan))
    state.end_generation()
    live: list[set[int]] = []
    exact: set[int] = set()
    with torch.no_grad():
        for k, calls in enumerate(steps):
            live.append(set(stored()))
            for call in calls:
                replay_call(transformer, call, device)
            after = stored()
            if only_cached and after and all(s == calls[0].step for s in after):
                exact.add(k)
    state.end_generation()
    by_step = {calls[0].step: k for k, calls in enumerate(steps)}
    sources: list[list[int]] = []
    for k, found in enumerate(live):
        idx = sorted(by_step[s] for s in found if s in by_step)
        sources.append(idx if len(idx) <= 1 else list(range(idx[0], k)))
    return sources, exact


def _sparse_calls(handle: Any) -> int:
    return sum(r["sparse_calls"] for r in handle.report().values())


def lr_at(cfg: FinetuneConfig, step: int) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    warm = max(1, round(0.05 * cfg.steps))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def _objective(errs: Sequence[torch.Tensor], step_loss: str, divisor: int) -> torch.Tensor:
    """What one denoising step adds to its update, from its per-sample errors: summed over this process's
    samples and divided by ``divisor`` (the global batch x terms: N processes sum to one process's value)."""
    terms = [torch.log(e + 1e-20) if step_loss == "log" else e for e in errs]
    return sum(t.sum() for t in terms) / divisor


def _step_backward(
    transformer: torch.nn.Module,
    calls: Sequence[RecordedCall],
    step_loss: str,
    guidance: float | None,
    batch: int,
    device: torch.device,
) -> torch.Tensor:
    """Replay one denoising step's calls, backpropagate its objective; returns its mean squared error (the
    logged loss, whatever the objective) over ``batch``."""
    if guidance is None:  # one backward per call: only one call's graph alive at a time
        total = torch.zeros((), device=device)
        for call in calls:
            err = _sample_errors(replay_call(transformer, call, device), call.target.to(device))
            _objective([err], step_loss, batch * len(calls)).backward()
            total += err.detach().sum() / (batch * len(calls))
        return total
    preds = [replay_call(transformer, call, device) for call in calls]
    errs = _step_errors(preds, calls, guidance)
    _objective(errs, step_loss, batch * len(errs)).backward()
    return sum(e.detach().sum() for e in errs) / (batch * len(errs))


def _has_cross_step(plan: Plan) -> bool:
    return any(s.is_cross_step for s in _plan_specs(plan))


def train_adapter(
    transformer: torch.nn.Module,
    plan: Plan,
    generations: Sequence[Sequence[RecordedCall]] | Sequence[str | os.PathLike],
    cfg: FinetuneConfig,
    *,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    sparse_options: Mapping[str, Any] | None = None,
    stop_at: int | None = None,
    init: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Train a LoRA on ``transformer`` so that with ``plan``'s sparse attention it predicts what the
    recorded dense generations predicted.

    Args:
        transformer: the model (its adapter must list its self-attention modules); gets the adapter
            ``"sparsediff"`` and, for the duration, sparse attention with ``plan``.
        plan: the sparse plan the student runs (validated against the model).
        generations: recorded generations (:func:`record_teacher`) or paths of saved ones. All must come
            from one schedule (the same number of calls).
        cfg: steps, rank, lr, batch (generations per optimizer step over all processes), seed.
        checkpoint: file to write every ``cfg.checkpoint_every`` steps; with ``resume`` training continues
            from it (same data and config).
        sparse_options: keyword overrides for :func:`~sparsediff.enable_sparse_attention` (e.g.
            ``backend="reference"``).
        stop_at: stop after this many optimizer steps (a phase of a longer run: the learning-rate
            schedule still spans ``cfg.steps``); default ``cfg.steps``.
        init: the adapter's starting weights (peft state dict without the adapter name, as
            :func:`load_adapter_state` reads a finetune folder) instead of LoRA's own initialisation;
            a checkpoint being resumed overrides it.

    Returns: ``{"steps", "losses", "wall_s", "processes", "order"}`` (the order it used); the adapter stays on ``transformer`` (active).
    """
    from .api import enable_sparse_attention
    from .hooks import get_state

    rank, world = _dist()
    if cfg.batch % world:
        raise FinetuneInputError(f"batch {cfg.batch} does not split over {world} processes")
    device = next(transformer.parameters()).device
    setup = _training_setup(transformer, plan, cfg)
    if resume and checkpoint is not None:
        _check_checkpoint(Path(checkpoint), transformer, setup)
    params = _add_adapter(transformer, cfg)
    if init is not None:
        _set_adapter_state(transformer, init)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    start, losses, wall_before = 0, [], 0.0
    if resume and checkpoint is not None and Path(checkpoint).is_file():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(transformer, ck["adapter"], adapter_name=ADAPTER_NAME)
        opt.load_state_dict(ck["optimizer"])
        start, losses, wall_before = int(ck["step"]), list(ck["losses"]), float(ck.get("wall_s", 0.0))
        logger.info("resumed at step %d/%d from %s", start, cfg.steps, checkpoint)

    def load(i: int) -> Sequence[RecordedCall]:
        g = generations[i]
        return load_recording(g) if isinstance(g, (str, os.PathLike)) else g

    # Two orders (cfg.order). Step order: one pass = one batch of generations replayed step by step, an
    # optimizer step per denoising step that runs sparse. The plan's dense warm-up steps run the teacher's own
    # attention. With the adapter off where no layer runs sparse (``adapter_steps="sparse"``, the default, as
    # at inference) they are replayed without gradients (only for the state of cross-step patterns); with
    # ``adapter_steps="all"`` their gradients only keep the adapter near identity there and are ~0 at first,
    # so they are added to the next sparse step's update (plain squared error: the log of a float-noise error
    # would blow the noise up) instead of getting Adam steps of their own. Shuffled: every optimizer step
    # takes ``batch`` random (generation, sparse step) pairs, each replayed on its own.
    first_steps = _steps_of([load(0)])
    guidance = guidance_for_loss(cfg, None, load(0)) if cfg.loss == "guided" else None
    sparse = _sparse_steps(first_steps, plan, transformer)
    groups = _update_groups(len(first_steps), sparse)
    gated = dict(sparse_options or {}).get("adapter_steps", "sparse") == "sparse"
    cross = _has_cross_step(plan)
    if cfg.renoise and (cfg.order == "steps" or cross or not gated):
        raise FinetuneInputError(
            "renoise makes samples out of single denoising steps: it needs the shuffled order (no cross-step "
            "heads in the plan, the gated adapter); use renoise 0"
        )
    if isinstance(generations, DataGenerations) and cfg.renoise != 1:
        raise FinetuneInputError(
            "data samples have no dense targets of their own (a template's): train them with renoise=1, "
            "which labels every sample with the dense model"
        )
    # every recorded generation, before the first step (memory-mapped: reads two calls of each); data samples are
    # made on the flow path of their clean latents and checked for shape as they are built
    if cfg.renoise and not isinstance(generations, DataGenerations):
        for i in range(len(generations)):
            check_renoisable(load(i))
    if cfg.order == "shuffled" and (cross or not gated):
        raise FinetuneInputError(
            "order 'shuffled' replays steps out of order: not for a plan with cross-step heads "
            "(their state comes from the earlier steps) nor with adapter_steps='all'; use order 'steps'"
        )
    shuffled = cfg.order == "shuffled" or (cfg.order == "auto" and gated and not cross)
    cached_remainder = _has_cached_remainder(plan)
    sources: list[list[int]] | None = None
    warm = set(range(len(first_steps))) - sparse if gated else set()
    stop = cfg.steps if stop_at is None else min(int(stop_at), cfg.steps)
    local = cfg.batch // world

    def fresh(steps: list[list[RecordedCall]], k: int, gen: Sequence[RecordedCall], position: int) -> bool:
        """With probability ``cfg.renoise`` (seeded by the sample's position: the same in every process and
        on resume) replace step ``k``'s calls by re-noised copies (and those of the steps its cached remainder
        comes from, with the same noise: one flow path); True if it did (step ``k`` needs labels)."""
        rng = random.Random(cfg.seed * 1_000_003 + position)
        if rng.random() >= cfg.renoise:
            return False
        clean = check_renoisable(gen)
        noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(rng.getrandbits(62)))
        for j in [k, *(sources[k] if sources is not None else ())]:
            steps[j] = [renoise_call(c, clean, noise) for c in steps[j]]
        return True

    def updates() -> Iterable[list[tuple[list[list[RecordedCall]], list[int], bool]]]:
        """This process's work of every optimizer step from ``start``: (steps, denoising-step indices, whether
        they were re-noised and need the dense model's labels)."""
        if shuffled:
            samples = [(g, k) for g in range(len(generations)) for k in sorted(sparse)]
            seq = _order(len(samples), cfg.seed, stop * cfg.batch)
            for s in range(start, stop):
                lo = s * cfg.batch + rank * local
                work = []
                for position, i in enumerate(seq[lo : lo + local], start=lo):
                    gen = load(samples[i][0])
                    steps = _steps_of([gen])
                    made = cfg.renoise > 0 and fresh(steps, samples[i][1], gen, position)
                    work.append((steps, [samples[i][1]], made))
                yield work
            return
        per_pass = len(groups)
        order = _order(len(generations), cfg.seed, math.ceil(stop / per_pass) * cfg.batch)
        s = start
        while s < stop:
            p, first = divmod(s, per_pass)
            chosen = order[p * cfg.batch : (p + 1) * cfg.batch][rank * local : (rank + 1) * local]
            steps = _steps_of([load(i) for i in chosen])
            for group in groups[first:]:
                if s >= stop:
                    break
                yield [(steps, group, False)]
                s += 1

    handle = enable_sparse_attention(transformer, plan, **dict(sparse_options or {}))
    # remainder="cached" heads: a shuffled sample replays the steps its remainder was refreshed at first
    # (step order replays every step anyway)
    exact: set[int] = set()
    if cached_remainder:
        found, exact = _remainder_sources(transformer, plan, first_steps, device)
        sources = found if shuffled else None
    t0, step = time.perf_counter(), start
    bar = _progress(stop, start, enabled=progress and rank == 0)
    try:
        transformer.train(False)
        for work in updates():
            made = [c for steps, group, new in work if new for k in group for c in steps[k]]
            if made:  # the re-noised samples' targets: the dense model (no sparse attention, adapter off)
                handle.disable()
                try:
                    label_with_dense(transformer, made, device)
                finally:
                    handle = enable_sparse_attention(transformer, plan, **dict(sparse_options or {}))
            opt.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for steps, group, _ in work:
                if sources is not None:  # a fresh generation up to the sample's cached remainder
                    get_state(transformer).end_generation()
                    with torch.no_grad():
                        for j in sources[group[0]]:
                            for call in steps[j]:
                                replay_call(transformer, call, device)
                for k in group:
                    if k in warm:
                        with torch.no_grad():
                            for call in steps[k]:
                                replay_call(transformer, call, device)
                        continue
                    # plain squared error where the step is exact (warm-up; every cached remainder refreshing):
                    # its error is the adapter's alone, and the log of a float-noise error would blow it up
                    objective = cfg.step_loss if k in sparse and k not in exact else "mse"
                    mse = _step_backward(transformer, steps[k], objective, guidance, cfg.batch, device)
                    if k == group[-1]:
                        total += mse
                if _sparse_calls(handle) == 0:  # counts this generation so far
                    raise FinetuneInputError(
                        f"the plan ran no layer sparse at step {steps[group[-1]][0].step} (min_tokens, or a "
                        "size below the block size?): nothing to train"
                    )
            if world > 1:
                for prm in params:
                    if prm.grad is None:
                        prm.grad = torch.zeros_like(prm)
                    torch.distributed.all_reduce(prm.grad)
                torch.distributed.all_reduce(total)
            for grp in opt.param_groups:
                grp["lr"] = lr_at(cfg, step)
            opt.step()
            step += 1
            losses.append(float(total))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3g}")
            if on_step is not None:
                on_step(step, losses[-1])
            if checkpoint is not None and rank == 0 and (step % cfg.checkpoint_every == 0 or step == stop):
                wall = wall_before + time.perf_counter() - t0
                _save_checkpoint(checkpoint, transformer, opt, step, losses, wall, setup)
    finally:
        bar.close()
        handle.disable()
    for prm in params:
        prm.requires_grad_(False)
    wall = wall_before + time.perf_counter() - t0  # over every resumed run
    return {
        "steps": step,
        "losses": losses,
        "wall_s": wall,
        "processes": world,
        "order": "shuffled" if shuffled else "steps",
    }


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", disable=not enabled)


def _plan_hash(plan: Plan) -> str:
    """What the student runs: the plan without its search statistics and notes."""
    import hashlib

    d = {k: v for k, v in plan.to_dict().items() if k not in ("stats", "meta")}
    return "sha256:" + hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _base_identity(transformer: torch.nn.Module) -> dict[str, Any]:
    """The base model (class, adapter, config hash) and a fingerprint of every linear of its sparse blocks."""
    return {
        "model": plan_model_identity(transformer),
        "base_weights": base_weights_fingerprint(transformer, self_attention_linears(transformer, "block")),
    }


def _training_setup(transformer: torch.nn.Module, plan: Plan, cfg: FinetuneConfig) -> dict[str, Any]:
    """What a checkpoint's adapter is only valid for: the base model and its weights, the plan, the LoRA's
    shape. (Training hyperparameters may change on ``--resume``: continuing with another lr is allowed.)"""
    return {
        **_base_identity(transformer),
        "plan": _plan_hash(plan),
        "rank": cfg.rank,
        "targets": cfg.targets,
    }


def _describe(x: Any) -> str:
    """A stable JSON stand-in for a pipeline call argument JSON cannot hold (a tensor, an image): its type, shape
    and a digest of its content -- never ``repr``, which may hold a memory address."""
    import hashlib

    if isinstance(x, torch.Tensor):
        data = x.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        return f"Tensor{tuple(x.shape)}:{x.dtype}:{hashlib.sha256(data).hexdigest()[:16]}"
    if hasattr(x, "tobytes") and hasattr(x, "size") and hasattr(x, "mode"):  # a PIL image
        return f"{type(x).__name__}{tuple(x.size)}:{x.mode}:{hashlib.sha256(x.tobytes()).hexdigest()[:16]}"
    return type(x).__name__


def _recording_source(transformer: torch.nn.Module, cfg: FinetuneConfig) -> dict[str, Any]:
    """What the recorded teacher generations depend on: the base model and its weights and the pipeline
    call (size, denoising steps, guidance, extra call arguments)."""
    call = {
        "frames": cfg.frames,
        "height": cfg.height,
        "width": cfg.width,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "extra_call_kwargs": json.loads(json.dumps(cfg.extra_call_kwargs, sort_keys=True, default=_describe)),
    }
    return {**_base_identity(transformer), "call": call}


def _source_differences(
    stored: Mapping[str, Any], transformer: torch.nn.Module, now: Mapping[str, Any]
) -> list[str]:
    """Readable differences between a stored :func:`_recording_source` / :func:`_training_setup` and this
    run's (``now``); the base weights are compared with a tolerance (another storage dtype is the same)."""
    from .plan import base_weights_differences

    diffs = []
    for key, value in now.items():
        if key not in stored:
            continue
        if key == "base_weights":
            other = base_weights_differences(stored[key], transformer)
            if other:
                diffs.append(
                    f"base weights ({len(other)} of {len(stored[key])} layers differ, e.g. {other[0]})"
                )
        elif key in ("model", "call") and isinstance(value, Mapping) and isinstance(stored[key], Mapping):
            diffs += [
                f"{key} {k}: {stored[key].get(k)!r} there, {value.get(k)!r} now"
                for k in sorted(set(value) | set(stored[key]))
                if stored[key].get(k) != value.get(k)
            ]
        elif stored[key] != value:
            diffs.append(f"{key}: {stored[key]!r} there, {value!r} now")
    return diffs


def _check_checkpoint(path: Path, transformer: torch.nn.Module, setup: Mapping[str, Any]) -> None:
    """Refuse to resume from a checkpoint trained for another model, base weights, plan or LoRA shape."""
    if not path.is_file():
        return
    stored = torch.load(path, map_location="cpu", weights_only=True).get("setup")
    if stored is None:  # written before checkpoints recorded their setup
        return
    diffs = _source_differences(stored, transformer, setup)
    if diffs:
        raise FinetuneInputError(
            f"--resume: {path} was trained for another setup ({'; '.join(diffs)}); use a new --out, or "
            "--overwrite to start over"
        )


def _check_resume(
    out: Path,
    stored: Mapping[str, Any],
    transformer: torch.nn.Module,
    source: Mapping[str, Any],
    paths: Sequence[Path],
    jobs: Sequence[tuple[str, str, int]],
    setup: Mapping[str, Any],
) -> None:
    """Before anything is recorded or trained: refuse to continue a run in ``out`` whose recordings were made
    with another base model / base weights / pipeline call, whose files hold other (prompt, seed) pairs than
    this run's at the same names, or whose checkpoint was trained for another setup."""
    if stored.get("source"):
        diffs = _source_differences(stored["source"], transformer, source)
        if diffs:
            raise FinetuneInputError(
                f"--resume: the teacher in {out / 'teacher'} was recorded with another model or settings "
                f"({'; '.join(diffs)}); use a new --out, or --overwrite to start over"
            )
    known = stored.get("jobs") or {}
    for pth, (_, prompt, seed) in zip(paths, jobs):
        was = known.get(pth.name)
        if pth.is_file() and was is not None and list(was) != [prompt, seed]:
            raise FinetuneInputError(
                f"--resume: {pth} holds {was[0]!r} seed {was[1]}, this run wants {prompt!r} seed {seed} there "
                "(other prompts file, --seed or --seeds-per-prompt?); use a new --out, or --overwrite"
            )
    _check_checkpoint(out / "checkpoint.pt", transformer, setup)


def _save_checkpoint(
    path: str | os.PathLike,
    transformer,
    opt,
    step: int,
    losses: list[float],
    wall_s: float,
    setup: Mapping[str, Any] | None = None,
) -> None:
    tmp = f"{path}.tmp"
    torch.save(
        {
            "adapter": _adapter_state(transformer),
            "optimizer": opt.state_dict(),
            "step": step,
            "losses": losses,
            "wall_s": wall_s,
            "setup": dict(setup or {}),
        },
        tmp,
    )
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------- the job


def _write_card(out: Path, meta: Mapping[str, Any]) -> None:
    before, after = meta.get("heldout_mse_before"), meta.get("heldout_mse_after")
    lines = [
        "# sparsediff finetune adapter",
        "",
        f"- base model: `{meta['model']['class']}` (config hash `{meta['model']['config_hash']}`)",
        f"- plan: {meta['plan_summary']}",
        f"- LoRA: rank {meta['config']['rank']}, alpha {meta['config']['alpha'] or meta['config']['rank']},"
        f" {meta['lora_layers']} linear layers of "
        + (
            "the blocks holding the sparse self-attention modules"
            if meta["config"].get("targets") == "block"
            else "the self-attention modules"
        ),
        f"- training: {meta['steps']} steps, batch {meta['config']['batch']}, lr {meta['config']['lr']},"
        f" {meta['processes']} process(es), {meta['wall_s']:.0f} s wall (+ {meta['record_s']:.0f} s recording"
        f" the teacher), "
        + (
            f"{meta['data_samples']} data samples"
            if meta.get("data")
            else f"{meta['train_generations']} training generations"
        ),
    ]
    c = meta["config"]
    lines.append(
        f"- objective: {c.get('loss', 'branch')} prediction, step loss {c.get('step_loss', 'mse')}, order "
        f"{meta.get('order', c.get('order', 'steps'))}, lr schedule {c.get('lr_schedule', 'constant')}"
        + (
            f", {c['renoise']:.0%} of the samples re-noised (fresh noise, dense labels)"
            if c.get("renoise")
            else ""
        )
    )
    if meta.get("data"):
        lines.append(
            f"- data: {meta['data']}, each sample re-noised at a denoising step's noise level and labelled by the "
            "dense model (one recorded generation as the call template)"
        )
    if meta.get("init_adapter"):
        lines.append(f"- started from the adapter of `{meta['init_adapter']}`")
    if meta.get("student_generations"):
        lines.append(
            f"- on-policy: {meta['config']['on_policy_rounds']} round(s), {meta['student_generations']} student "
            f"generations labelled by the dense model ({meta.get('student_record_s') or 0:.0f} s)"
        )
    if before is not None and after is not None:
        lines.append(
            f"- held-out sparse-vs-dense prediction MSE ({meta['heldout_generations']} generations): "
            f"{before:.4g} before -> {after:.4g} after ({after / max(before, 1e-30):.2f}x)"
        )
    fb, fa = meta.get("train_mse_before"), meta.get("train_mse_after")
    if fb is not None and fa is not None and before is not None and after is not None:
        fit, held = fa / max(fb, 1e-30), after / max(before, 1e-30)
        lines.append(
            f"- the same on {meta['train_fit_generations']} training generations: {fb:.4g} -> {fa:.4g} "
            f"({fit:.2f}x)"
            + (
                f" -- the adapter fits its training generations far better than held-out ones ({held:.2f}x): "
                "more training prompts or seeds (`--seeds-per-prompt`) should help"
                if fit < 0.8 * held
                else ""
            )
        )
    gb, ga = meta.get("heldout_guided_mse_before"), meta.get("heldout_guided_mse_after")
    if gb is not None and ga is not None:
        lines.append(
            f"- held-out guided-prediction MSE (CFG {meta['heldout_guidance_scale']:g}): {gb:.4g} before -> "
            f"{ga:.4g} after ({ga / max(gb, 1e-30):.2f}x); loss: {meta['config'].get('loss', 'branch')}"
        )
    pb, pa = meta.get("heldout_output_psnr_before"), meta.get("heldout_output_psnr_after")
    if pb is not None and pa is not None:
        lines.append(
            f"- held-out generations vs dense (decoded output, mean PSNR over {meta['heldout_generations']}): "
            f"{pb:.2f} dB plan alone -> {pa:.2f} dB with the adapter ({pa - pb:+.2f} dB)"
        )
    lines += [
        "",
        "Load with diffusers' API: `pipe.load_lora_weights(DIR)` (or `pipe.transformer.load_lora_adapter(DIR, weight_name='pytorch_lora_weights.safetensors')`),",
        "or let sparsediff load the adapter with its plan: `pipe.enable_sparse_attention(DIR)`.",
        "",
    ]
    (out / CARD_NAME).write_text("\n".join(lines))


def finetune(
    pipe: Any,
    plan: Plan,
    prompts: Sequence[str],
    out: str | os.PathLike,
    cfg: FinetuneConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    heldout_prompts: Sequence[str] | None = None,
    sparse_options: Mapping[str, Any] | None = None,
    data: Any = None,
    data_samples: int | None = None,
    init_adapter: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Record the dense teacher, train the adapter, write ``out`` (adapter, plan, card). Returns the card's
    data (also in ``out/finetune.json``).

    ``data``: train on clean data instead of the recorded generations -- ``"embedded"`` (the embedded model's
    procedural clips, ``data_samples`` of them, default 1000), the path of a ``{"captions", "latents"}``
    file (:class:`LatentData`), or any object with ``len()`` and ``[i] -> (caption, latents [1, ...])``. Every
    training sample is then a data sample re-noised afresh at a denoising step's noise level and labelled by
    the dense model (:class:`DataGenerations`; a flow-matching pipeline); the prompts' first generation is
    recorded only as the template of the pipeline's calls, and captions equal to a held-out prompt are left
    out. ``init_adapter``: a finetune folder whose adapter the training starts from (same base weights,
    rank, alpha and targets), e.g. to continue the shipped adapter on new data.

    ``out`` must not exist unless ``resume`` (continue: the recorded teacher and checkpoint are reused; refused
    with :class:`FinetuneInputError`, before any work, when they were made with another base model or weights,
    pipeline call, (prompt, seed) pairs, plan or LoRA shape) or ``overwrite`` (start over; only sparsediff's own
    files there are replaced). The held-out generations
    (``cfg.heldout`` of them, seeds from ``cfg.seed + 10_000``) cycle through ``heldout_prompts`` (default:
    the training prompts)."""
    cfg = cfg or FinetuneConfig()
    out = Path(out)
    if not prompts:
        raise FinetuneInputError("no prompts")
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise FinetuneInputError(f"{out} exists: pass --resume to continue or --overwrite to start over")
    transformer = pipe.transformer
    plan.validate_for(transformer)
    if getattr(transformer, "peft_config", None) and ADAPTER_NAME in transformer.peft_config:
        raise FinetuneInputError(f"the transformer already has an adapter named {ADAPTER_NAME!r}")
    if cfg.loss == "guided":  # the scale the loss combines the branches with is the one recorded with
        cfg = replace(cfg, guidance_scale=guidance_for_loss(cfg, pipe))
    if cfg.renoise:
        if flow_scheduler(pipe) is None:
            raise FinetuneInputError(
                f"renoise needs a flow-matching scheduler (noisy latents (1 - sigma) x0 + sigma noise); "
                f"{type(getattr(pipe, 'scheduler', None)).__name__} is not one: use renoise 0"
            )
        if cfg.order == "steps" or _has_cross_step(plan):
            raise FinetuneInputError(
                "renoise makes samples out of single denoising steps: it needs the shuffled order (no "
                "cross-step heads in the plan); use renoise 0"
            )
    if cfg.on_policy_labels == "anchored":
        if not cfg.on_policy_rounds:
            raise FinetuneInputError(
                "anchored labels are the targets of on-policy student generations: give on-policy rounds (>= 1)"
            )
        if flow_scheduler(pipe) is None:
            raise FinetuneInputError(
                f"anchored labels steer a flow-matching sampler back to the teacher's trajectory; "
                f"{type(getattr(pipe, 'scheduler', None)).__name__} is not one: use on_policy_labels 'dense'"
            )
    held_prompts = list(heldout_prompts or prompts)
    if data is not None:
        if flow_scheduler(pipe) is None:
            raise FinetuneInputError(
                f"--data needs a flow-matching scheduler (noisy latents (1 - sigma) x0 + sigma noise); "
                f"{type(getattr(pipe, 'scheduler', None)).__name__} is not one"
            )
        if cfg.on_policy_rounds:
            raise FinetuneInputError(
                "--data trains on data samples only: on-policy rounds need recorded "
                "training generations; use --on-policy-rounds 0"
            )
        if cfg.renoise not in (0, 1):
            raise FinetuneInputError("--data re-noises every sample: drop --renoise (or give 1)")
        if cfg.order == "steps" or _has_cross_step(plan):
            raise FinetuneInputError(
                "--data makes samples out of single denoising steps: it needs the shuffled order (no "
                "cross-step heads in the plan)"
            )
        if isinstance(data, (str, os.PathLike)):
            data = load_data(os.fspath(data), cfg, data_samples, held_prompts)
        elif data_samples is not None:
            raise FinetuneInputError("data_samples is for the named data sources")
        if len(data) < 1:
            raise FinetuneInputError("--data holds no samples")
    init_state = None
    if init_adapter is not None:
        init_state = _check_init(Path(init_adapter), transformer, cfg)
    rank, world = _dist()
    teacher = out / "teacher"
    teacher.mkdir(parents=True, exist_ok=True)
    if data is None:
        jobs = [("train", p, cfg.seed + s) for s in range(cfg.seeds_per_prompt) for p in prompts]
    else:  # one generation: the template of the pipeline's calls
        jobs = [("train", prompts[0], cfg.seed)]
    jobs += [
        ("heldout", held_prompts[i % len(held_prompts)], cfg.seed + 10_000 + i) for i in range(cfg.heldout)
    ]
    paths = [teacher / f"{kind}-{i:04d}.pt" for i, (kind, _, _) in enumerate(jobs)]
    timing = teacher / "recording.json"  # what the recordings were made with; their wall time
    source = _recording_source(transformer, cfg)
    stored = json.loads(timing.read_text()) if resume and timing.is_file() else {}  # --overwrite: anew
    if resume:
        _check_resume(out, stored, transformer, source, paths, jobs, _training_setup(transformer, plan, cfg))
    labelled = stored.get("student_labels", "dense")  # the labels of the student generations already there
    if (
        resume
        and cfg.on_policy_rounds
        and labelled != cfg.on_policy_labels
        and any(teacher.glob("student*.pt"))
    ):
        raise FinetuneInputError(
            f"--resume: the student generations in {teacher} carry {labelled!r} labels, not "
            f"{cfg.on_policy_labels!r}; resume with --on-policy-labels {labelled} or start over (--overwrite)"
        )
    if cfg.renoise and resume and paths[0].is_file():  # an earlier version's recordings: no noise levels
        check_renoisable(load_recording(paths[0]))
    _barrier(world)
    if rank == 0:
        files = {**(stored.get("jobs") or {}), **{p.name: [j[1], j[2]] for p, j in zip(paths, jobs)}}
        labels = {"student_labels": cfg.on_policy_labels} if cfg.on_policy_rounds else {}
        timing.write_text(json.dumps({**stored, "source": source, "jobs": files, **labels}))
    t0 = time.perf_counter()
    finals = [pth.with_name(f"output-{pth.name}") for pth in paths]  # dense held-out outputs (decoded)
    todo = [i for i, pth in enumerate(paths) if not (resume and pth.is_file()) and i % world == rank]
    for i in todo:
        (gen,) = record_teacher(pipe, [jobs[i][1]], [jobs[i][2]], cfg, progress=progress)
        save_recording(gen, paths[i])
    for i, (kind, prompt, seed) in enumerate(jobs):
        if kind == "heldout" and i % world == rank and not (resume and finals[i].is_file()):
            out_i = generate_output(pipe, prompt, seed, cfg)
            if out_i is not None:
                torch.save(out_i, finals[i])
    _barrier(world)
    record_s = time.perf_counter() - t0
    if rank == 0:  # the recording's wall time over every resumed run
        stored = json.loads(timing.read_text())
        record_s += float(stored.get("record_s", 0.0))
        timing.write_text(json.dumps({**stored, "record_s": record_s}))
    train = [p for p, j in zip(paths, jobs) if j[0] == "train"]
    held = [p for p, j in zip(paths, jobs) if j[0] == "heldout"]
    if cfg.on_policy_labels == "anchored":  # the sampler steps with the recorded predictions: before training
        _velocity_sign(load_recording(train[0]))
    # the held-out error of the guided prediction too, whenever the pipeline guides (whatever the loss)
    try:
        held_guidance = guidance_for_loss(replace(cfg, loss="guided"), pipe, load_recording(train[0]))
    except FinetuneInputError:
        held_guidance = None
    held_jobs = [(j[1], j[2]) for j in jobs if j[0] == "heldout"]
    held_finals = [
        torch.load(f, weights_only=True) if f.is_file() else None
        for f, j in zip(finals, jobs)
        if j[0] == "heldout"
    ]
    before = before_guided = before_psnr = None
    # the same per-call error on a few training generations: far lower after than the held-out one means
    # the adapter fits its training generations, and more prompts / seeds are the lever
    fit = train[:: max(1, len(train) // FIT_GENERATIONS)][:FIT_GENERATIONS] if held and data is None else []
    fit_before = fit_after = None
    if held:
        before, before_guided, fit_before = _plan_errors(
            transformer, plan, held, fit, held_guidance, sparse_options
        )
        before_psnr = heldout_generation_psnr(pipe, held_jobs, held_finals, cfg, plan, sparse_options)
    rounds = cfg.on_policy_rounds
    train_jobs = [(i, j) for i, j in enumerate(jobs) if j[0] == "train"]
    student_s, gens = 0.0, list(train)
    train_cfg = cfg
    if data is not None:
        gens = DataGenerations(pipe, load_recording(train[0]), data, cfg)
        train_cfg = replace(cfg, renoise=1.0)
    for r in range(rounds + 1):
        # phase r trains up to this step on the teacher's and rounds 1..r students' generations
        result = train_adapter(
            transformer,
            plan,
            gens,
            train_cfg,
            checkpoint=out / "checkpoint.pt",
            resume=resume or r > 0,
            progress=progress,
            sparse_options=sparse_options,
            stop_at=cfg.steps * (r + 1) // (rounds + 1),
            init=init_state,
        )
        if r == rounds:
            break
        student = [teacher / f"student{r + 1}-{n:04d}.pt" for n in range(len(train_jobs))]
        t1 = time.perf_counter()
        for n, (_, (_, prompt, seed)) in enumerate(train_jobs):
            if n % world != rank or (resume and student[n].is_file()):  # --overwrite: recorded anew
                continue
            (gen,) = record_teacher(
                pipe, [prompt], [seed], cfg, progress=progress, plan=plan, sparse_options=sparse_options
            )
            label_with_dense(transformer, gen, transformer.device)
            if cfg.on_policy_labels == "anchored":
                anchor_labels(gen, load_recording(train[n]))
            save_recording(gen, student[n])
        _barrier(world)
        student_s += time.perf_counter() - t1
        transformer.delete_adapters(ADAPTER_NAME)  # the next phase restores it from the checkpoint
        gens += student
    if rank == 0 and rounds:
        stored = json.loads(timing.read_text())
        student_s += float(stored.get("student_record_s", 0.0))
        timing.write_text(json.dumps({**stored, "record_s": record_s, "student_record_s": student_s}))
    after = after_guided = after_psnr = None
    if held:
        after, after_guided, fit_after = _plan_errors(
            transformer, plan, held, fit, held_guidance, sparse_options
        )
        after_psnr = heldout_generation_psnr(pipe, held_jobs, held_finals, cfg, plan, sparse_options)
    meta = {
        "format": "sparsediff-finetune/1",
        "model": {
            **plan_model_identity(transformer),
            "base_weights": base_weights_fingerprint(
                transformer, self_attention_linears(transformer, cfg.targets)
            ),
        },
        "plan_summary": plan.summary(),
        "config": {k: v for k, v in asdict(cfg).items() if k != "extra_call_kwargs"},
        "prompts": list(prompts),
        "heldout_prompts": held_prompts,
        "lora_layers": len(self_attention_linears(transformer, cfg.targets)),
        "steps": result["steps"],
        "processes": result["processes"],
        "order": result["order"],
        "wall_s": result["wall_s"],
        "record_s": record_s,
        "student_record_s": student_s if rounds else None,
        "train_generations": len(train) if data is None else 0,
        "data": gens.describe() if data is not None else None,
        "data_samples": len(gens) if data is not None else None,
        "init_adapter": os.fspath(init_adapter) if init_adapter is not None else None,
        "student_generations": len(gens) - len(train) if data is None else 0,
        "heldout_generations": len(held),
        "heldout_mse_before": before,
        "heldout_mse_after": after,
        "heldout_guidance_scale": held_guidance,
        "heldout_guided_mse_before": before_guided,
        "heldout_guided_mse_after": after_guided,
        "heldout_output_psnr_before": before_psnr,
        "heldout_output_psnr_after": after_psnr,
        "train_fit_generations": len(fit),
        "train_mse_before": fit_before,
        "train_mse_after": fit_after,
        "final_loss": result["losses"][-1] if result["losses"] else None,
    }
    if rank == 0:
        save_adapter(transformer, out)
        plan.save(out / PLAN_NAME, overwrite=True)
        (out / META_NAME).write_text(json.dumps(meta, indent=1))
        _write_card(out, meta)
    _barrier(world)
    return meta


def _check_init(folder: Path, transformer: torch.nn.Module, cfg: FinetuneConfig) -> dict[str, torch.Tensor]:
    """The adapter weights of ``--init FOLDER`` after checking, before any work, that they were trained on
    this base model's weights with this LoRA's rank, alpha and targets."""
    from .plan import folder_base_differences

    if not folder.is_dir():
        raise FinetuneInputError(f"--init {folder}: not a folder (a finetune output folder)")
    meta_path = folder / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
        conf = meta["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinetuneInputError(
            f"--init {folder}: no readable {META_NAME} (a finetune output folder?)"
        ) from e
    diffs, n = folder_base_differences(folder, transformer) or ([], 0)
    if diffs:
        raise FinetuneInputError(
            f"--init {folder}: its adapter was trained on other base weights ({len(diffs)} of {n} adapted "
            f"layers differ, e.g. {diffs[0]})"
        )
    model = meta.get("model") or {}
    mine = plan_model_identity(transformer)
    if any(model.get(k) != mine[k] for k in ("class", "config_hash") if k in model):
        raise FinetuneInputError(
            f"--init {folder}: its adapter is for another model ({model.get('class')}, config "
            f"{model.get('config_hash')}; this one {mine['class']}, config {mine['config_hash']})"
        )
    want = {"rank": cfg.rank, "alpha": cfg.alpha, "targets": cfg.targets}
    other = {k: conf.get(k) for k in want if conf.get(k) != want[k]}
    if other:
        raise FinetuneInputError(
            f"--init {folder}: its adapter has {other}, this run { ({k: want[k] for k in other}) }: pass the same "
            "--rank and --targets"
        )
    return load_adapter_state(folder)


def plan_model_identity(transformer: torch.nn.Module) -> dict[str, Any]:
    """The base model's identity as plans record it (class, adapter, config hash)."""
    from .plan import ModelIdentity

    ident = ModelIdentity.of(transformer)
    return {"class": ident.transformer_class, "adapter": ident.adapter, "config_hash": ident.config_hash}


# ------------------------------------------------------------------------------------------- CLI


def build_parser():
    """``sparsediff finetune`` (also ``python -m sparsediff.finetune``; ``accelerate launch -m
    sparsediff.finetune`` splits recording and batches over processes)."""

    from .cli_args import Parser, add_output_args, add_threads_arg, positive_float, positive_int
    from .loading import add_source_args

    p = Parser(
        prog="sparsediff finetune",
        description="Train a LoRA that teaches a pipeline's transformer its sparse plan (dense teacher, "
        "sparse student); writes the adapter, the plan and a card to --out.",
    )
    add_source_args(p)
    p.add_argument("--prompts", required=True, metavar="FILE", help="training prompts, one per line")
    p.add_argument(
        "--plan",
        metavar="PLAN",
        help="plan JSON, plan folder (its plan; a new adapter is trained), or pattern name (default: the "
        "shipped plan of the embedded model, else the family default)",
    )
    p.add_argument(
        "--steps", type=positive_int, default=200, metavar="N", help="optimizer steps (default: 200)"
    )
    p.add_argument("--rank", type=positive_int, default=8, metavar="R", help="LoRA rank (default: 8)")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument(
        "--batch",
        type=positive_int,
        default=1,
        metavar="B",
        help="generations per optimizer step (default: 1)",
    )
    p.add_argument("--frames", type=positive_int, metavar="N", help="video frames (default: the pipeline's)")
    p.add_argument("--height", type=positive_int, metavar="PX", help="height in px (default: the pipeline's)")
    p.add_argument("--width", type=positive_int, metavar="PX", help="width in px (default: the pipeline's)")
    p.add_argument(
        "--inference-steps",
        type=positive_int,
        default=20,
        metavar="N",
        help="denoising steps of the recorded teacher generations (default: 20)",
    )
    p.add_argument("--guidance-scale", type=float, metavar="G", help="CFG scale (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0, help="base seed of noise, batch order and adapter init")
    p.add_argument(
        "--seeds-per-prompt",
        type=positive_int,
        default=1,
        metavar="N",
        help="training generations per prompt",
    )
    p.add_argument(
        "--heldout",
        type=int,
        default=2,
        metavar="N",
        help="held-out generations for before/after (default: 2)",
    )
    p.add_argument(
        "--heldout-prompts", metavar="FILE", help="held-out prompts (default: the training prompts)"
    )
    p.add_argument(
        "--targets",
        choices=TARGETS,
        default="all",
        help="LoRA on every linear of the sparse self-attention modules (all), their q/k/v only (qkv), or "
        "every linear of the blocks holding them: self/cross-attention and feed-forward (block)",
    )
    p.add_argument(
        "--on-policy-rounds",
        type=int,
        default=0,
        help="rounds of on-policy data: after each of the first R of R+1 equal phases the student (plan + adapter "
        "so far) generates the training prompts and the dense model labels its calls; later phases train on "
        "teacher and student generations (default 0: teacher only)",
    )
    p.add_argument(
        "--on-policy-labels",
        choices=ON_POLICY_LABELS,
        default="dense",
        help="targets of the student generations: dense = the dense model's prediction at the student's state; "
        "anchored = that plus the student's drift from the teacher's generation (same prompt and seed) divided by "
        "the noise level, so the student learns to steer back to it (flow-matching samplers)",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a run in --out (recording and checkpoint); refused when they were made with another base "
        "model or weights, size, steps, guidance, prompts/seeds, plan or LoRA rank/targets",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default="branch",
        help="compare each CFG branch's prediction with the dense one (branch), or the guided prediction "
        "uncond + g*(cond - uncond) the sampler steps with (guided; needs CFG) (default: branch)",
    )
    p.add_argument(
        "--step-loss",
        choices=STEP_LOSSES,
        default="log",
        help="each denoising step's objective: the log of its squared error, so every step counts by its "
        "relative improvement (log), or the plain squared error (mse) (default: log)",
    )
    p.add_argument(
        "--renoise",
        type=float,
        default=0.0,
        metavar="F",
        help="fraction of the training samples made anew from a recorded step: its latents re-noised with "
        "fresh noise at the step's noise level ((1 - sigma) x0 + sigma noise, x0 the generation's final "
        "latents) and labelled by the dense model -- new noise seeds for one dense call each; flow-matching "
        "pipelines, shuffled order (default: 0)",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="auto",
        help="each optimizer step on a batch of random (generation, denoising step) pairs (shuffled), or on "
        "a batch of generations replayed in step order, one step per update (steps); auto: shuffled unless the "
        "plan has cross-step heads (default: auto)",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="cosine",
        help="linear warm-up over the first 5 percent of the steps, then cosine decay to 0.1x --lr (cosine), or "
        "--lr throughout (constant) (default: cosine)",
    )
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="train on clean data instead of recorded generations: 'embedded' (the embedded model's "
        "procedural clips) or a torch.save file {'captions': [...], 'latents': Tensor[N, ...]} in the "
        "pipeline's latent format; every sample is re-noised at a denoising step's noise level and labelled "
        "by the dense model (flow-matching pipelines); the first prompt is recorded once as the call template, "
        "held-out captions are left out",
    )
    p.add_argument(
        "--data-samples",
        type=positive_int,
        metavar="N",
        help="how many clips --data embedded draws (default: 1000)",
    )
    p.add_argument(
        "--init",
        metavar="DIR",
        help="start from the adapter of this finetune folder (same base weights, --rank and --targets) "
        "instead of a new one, e.g. to continue the shipped adapter on --data",
    )
    add_threads_arg(p)
    add_output_args(p, out_help="output folder (adapter, plan, card, recorded teacher, checkpoint)")
    return p


def _refuse_other_base(folder: Path, transformer: torch.nn.Module) -> None:
    """``--plan DIR`` where DIR holds an adapter trained on other base weights of this architecture: its plan
    was made for those weights too (the config hash cannot tell), so refuse rather than train on it."""
    from .cli_args import InputError
    from .plan import folder_base_differences

    diffs, n = folder_base_differences(folder, transformer) or ([], 0)  # no card: a plain plan folder
    if diffs:
        raise InputError(
            f"--plan {folder}: its adapter was trained on other base weights than this model's ({len(diffs)} of "
            f"{n} adapted layers differ, e.g. {diffs[0]}); pass {folder / PLAN_NAME} to train "
            "on its plan anyway, or search a plan for this model (sparsediff search)"
        )


def _default_plan(transformer: torch.nn.Module, plan_arg: str | None) -> Plan:
    from .api import resolve_plan
    from .pipelines.base import get_adapter

    if plan_arg is None:
        from .embedded import WEIGHTS_DIR

        shipped = Path(WEIGHTS_DIR) / PLAN_FILE
        if type(transformer).__name__ == "WanTransformer3DModel" and shipped.is_file():
            plan = Plan.load(shipped)
            try:
                plan.validate_for(transformer)
                return plan
            except ValueError:
                pass
    return resolve_plan(plan_arg, get_adapter(transformer))


def main(argv: list[str] | None = None) -> int:
    from .cli_args import InputError, apply_threads, fail, read_prompts_file
    from .loading import check_source, load_pipeline

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    prog = "sparsediff finetune"
    try:
        # everything checkable before loading or recording anything
        import importlib.util

        if importlib.util.find_spec("peft") is None:
            raise InputError("sparsediff finetune needs peft: pip install 'sparsediff[finetune]'")
        prompts = read_prompts_file(args.prompts)
        if not prompts:
            raise InputError(f"no prompts in {args.prompts}")
        held = read_prompts_file(args.heldout_prompts) if args.heldout_prompts else None
        check_source(args.pipeline, args.model)
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file")
        if out.is_dir() and any(out.iterdir()) and not (args.resume or args.overwrite):
            raise InputError(f"--out {out} exists and is not empty: pass --resume to continue or --overwrite")
        if args.data_samples is not None and args.data != EMBEDDED_DATA:
            raise InputError(f"--data-samples is for --data {EMBEDDED_DATA}")
        if args.data not in (None, EMBEDDED_DATA) and not Path(args.data).is_file():
            raise InputError(f"--data {args.data}: no such file (or --data {EMBEDDED_DATA})")
        if args.init is not None and not (Path(args.init) / WEIGHT_NAME).is_file():
            raise InputError(f"--init {args.init}: no adapter ({WEIGHT_NAME}) there")
        cfg = FinetuneConfig(
            steps=args.steps,
            rank=args.rank,
            lr=args.lr,
            batch=args.batch,
            num_inference_steps=args.inference_steps,
            guidance_scale=args.guidance_scale,
            frames=args.frames,
            height=args.height,
            width=args.width,
            seeds_per_prompt=args.seeds_per_prompt,
            heldout=args.heldout,
            seed=args.seed,
            targets=args.targets,
            on_policy_rounds=args.on_policy_rounds,
            on_policy_labels=args.on_policy_labels,
            loss=args.loss,
            step_loss=args.step_loss,
            order=args.order,
            lr_schedule=args.lr_schedule,
            renoise=args.renoise,
        )
        apply_threads(args.threads)
        loaded = load_pipeline(args.pipeline, args.model, allow_random=False, command=prog)
        pipe = loaded.pipe
        if getattr(pipe, "transformer", None) is None:
            raise InputError(f"{type(pipe).__name__} has no 'transformer' component to fine-tune")
        plan = _default_plan(pipe.transformer, args.plan)
        plan.validate_for(pipe.transformer)
        if args.plan and Path(args.plan).is_dir():
            _refuse_other_base(Path(args.plan), pipe.transformer)
        call = dict(getattr(loaded, "call_kwargs", None) or {})
        cfg.extra_call_kwargs = {k: v for k, v in call.items() if k not in ("prompt", "generator")}
    except (InputError, FinetuneInputError, ValueError, FileNotFoundError) as e:
        return fail(prog, e)
    try:
        meta = finetune(
            pipe,
            plan,
            prompts,
            out,
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            heldout_prompts=held,
            data=args.data,
            data_samples=args.data_samples,
            init_adapter=args.init,
        )
    except FinetuneInputError as e:
        return fail(prog, e)
    rank, _ = _dist()
    if rank == 0:
        before, after = meta["heldout_mse_before"], meta["heldout_mse_after"]
        line = f"trained {meta['steps']} steps in {meta['wall_s']:.0f} s"
        if before is not None and after is not None:
            line += f"; held-out sparse-vs-dense MSE {before:.4g} -> {after:.4g}"
        print(line)
        print(f"wrote {out} (load: pipe.enable_sparse_attention({str(out)!r}))")
    from .loading import distributed, finish_processes

    finish_processes(distributed()[2])
    return 0


if __name__ == "__main__":  # pragma: no cover
    from .loading import exit_process

    exit_process(main())
