"""Train the embedded tiny video DiT on procedural data.

One command (GPU, about 15 minutes in all: 12.5 of training, then export, checks, probe, CPU timing)::

    python -m sparsediff.embedded.train --preset gpu --out runs/embedded --install

``--install`` copies the exported pipeline into ``sparsediff/embedded/weights/`` (what
:func:`sparsediff.embedded.load_embedded_pipeline` loads). Without a GPU, ``--preset cpu`` trains the small
8 x 32 x 32 configuration (about 1 s/step at batch 8 on two free cores).

Method: rectified flow (``x_t = (1 - s) x_0 + s noise``, the transformer predicts ``noise - x_0``), ``s`` =
shifted logit-normal (the scheduler's ``shift``), AdamW, linear warm-up + cosine decay to 10 %, gradient
clipping, EMA of all weights (the exported model is the EMA), caption dropout (captions replaced by ``""``,
the unconditional text of CFG), text encoder trained jointly, bf16 autocast on CUDA. Batches are rendered on
the training device on the fly (params from a seeded CPU generator), each batch at one resolution drawn from
the preset's list.

``--max-minutes`` bounds the training time: after ``--timing-steps`` steps the step time is measured and the
number of steps (and the cosine schedule) is cut to fit. Outputs in ``--out``: ``train.log``, ``metrics.jsonl``
(loss, lr, s/step; check rates at each sample), ``samples/step_XXXXXX.png``, ``checkpoint.pt`` (resume with
``--resume``), ``pipeline/`` (fp16 EMA weights, ``save_pretrained``) with ``MODEL_CARD.md``, ``samples.png``
and ``metrics.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from . import checks, data
from .card import render_model_card
from .pipeline import (
    EmbeddedModelConfig,
    EmbeddedVideoPipeline,
    build_pipeline,
    to_storage_dtype,
    tokens_per_sample,
    with_coordinates,
)

__all__ = ["TrainConfig", "PRESETS", "train", "save_grid", "main"]

logger = logging.getLogger("sparsediff.embedded.train")

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
MAX_SHIPPED_MB = 10.0


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in checkpoints, metrics and the model card)."""

    preset: str
    model: EmbeddedModelConfig
    resolutions: list[tuple[int, int, int]]  # (frames, height, width) per batch
    resolution_weights: list[float]
    batch_size: int
    steps: int
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 100
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    distractor_prob: float = 0.3
    grad_clip: float = 1.0
    max_minutes: float | None = None
    timing_steps: int = 30
    log_every: int = 25
    sample_every: int = 500
    ckpt_every: int = 500
    sample_steps: int = 20
    guidance_scale: float = 4.0
    seed: int = 0
    bf16: bool = True
    compile: bool = False
    #: Scale each batch to the same number of tokens as ``batch_size`` clips at the largest resolution, so a
    #: smaller resolution gives proportionally more clips per step at the same cost.
    equal_token_batches: bool = False
    #: Sparse-attention training ("teach the model its sparse plan"): per-head specs (``{"pattern": ...,
    #: "params": {...}}``, one per head, the same for every layer) that batches at the largest resolution
    #: run with -- with probability ``sparse_prob`` when every sample's noise level is <= ``sparse_max_sigma``
    #: (inference keeps its first, noisiest steps dense, where the layout of the scene is decided). The
    #: other batches stay dense, so the model learns to give the same prediction either way.
    sparse_heads: list[dict[str, Any]] | None = None
    sparse_prob: float = 0.0
    sparse_max_sigma: float = 1.0
    #: Weight of a consistency term on sparse batches: the mean squared difference between the sparse
    #: prediction and the same weights' dense prediction (no gradient through the dense one). The demo's
    #: quality is sparse vs dense output of the same model, which the data loss alone does not ask for.
    sparse_consistency: float = 0.0
    #: Weight of an attention-locality term on every batch: per self-attention layer and head, the attention
    #: mass that ``recall_rows`` random query rows of the *dense* attention put outside that head's
    #: ``sparse_heads`` mask, as ``-log(mass inside)`` (0 when all of it is inside). It teaches the dense
    #: model the locality its sparse plan assumes -- what makes the plan near-lossless -- rather than only
    #: asking the sparse model to follow the dense one.
    sparse_recall: float = 0.0
    recall_rows: int = 256
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        d["resolutions"] = [list(r) for r in self.resolutions]
        return d


def _preset(name: str) -> TrainConfig:
    if name == "gpu":
        # 16 x 64 x 64 px, patch (1, 4, 4) -> 16 x 16 x 16 = 4096 tokens; 6 layers x 6 heads x 32 dims
        # (~3.9 M parameters, ~7.9 MB fp16). 20 % of the batches at 8 x 32 x 32 so that the model also samples
        # quickly on a CPU at that size.
        return TrainConfig(
            preset="gpu",
            model=EmbeddedModelConfig(),
            resolutions=[(16, 64, 64), (8, 32, 32)],
            resolution_weights=[0.8, 0.2],
            batch_size=32,
            steps=8000,
            lr=1e-3,
            warmup_steps=200,
            ema_decay=0.999,
            max_minutes=12.5,
            log_every=50,
            sample_every=1000,
            ckpt_every=1000,
            bf16=True,
        )
    if name == "cpu":
        # 4 layers, 6 heads x 32, 8 x 32 x 32 px = 512 tokens. Half the steps at 8 x 16 x 16 px (128 tokens,
        # four times the clips for the same cost): geometry is in fractions of the frame and the coordinate
        # channels are normalised, so where an object starts and which way it goes -- what the caption's
        # direction decides -- is learned from four times as many clips per step.
        return TrainConfig(
            preset="cpu",
            model=EmbeddedModelConfig(
                num_layers=4,
                ffn_dim=512,
                sample_num_frames=8,
                sample_height=32,
                sample_width=32,
                coord_channels=5,
            ),
            resolutions=[(8, 32, 32), (8, 16, 16)],
            resolution_weights=[0.5, 0.5],
            equal_token_batches=True,
            distractor_prob=0.15,
            batch_size=8,
            steps=600,
            lr=1e-3,
            warmup_steps=50,
            ema_decay=0.99,
            log_every=10,
            sample_every=200,
            ckpt_every=200,
            sample_steps=10,
            bf16=False,
        )
    if name == "demo":
        # The shipped CPU model (the `cpu` preset's architecture) taught the demo's size: 16 x 64 x 64 px =
        # 16 x 16 x 16 = 4096 tokens, where attention is most of a denoising step on a CPU (as in the video
        # models users run), while keeping the sizes it already knows in the mix so it does not forget them.
        # Meant to continue from the shipped weights (``--init-from sparsediff/embedded/weights``); equal-token
        # batches give the small sizes proportionally more clips per step.
        cfg = _preset("cpu")
        cfg.preset = "demo"
        cfg.model.sample_num_frames, cfg.model.sample_height, cfg.model.sample_width = 16, 64, 64
        cfg.resolutions = [(16, 64, 64), (8, 32, 32), (8, 16, 16)]
        cfg.resolution_weights = [0.5, 0.3, 0.2]
        cfg.batch_size = 2
        cfg.steps = 1500
        cfg.lr = 3e-4
        cfg.warmup_steps = 20
        cfg.ema_decay = 0.98
        cfg.sample_every = 250
        cfg.ckpt_every = 25
        cfg.sample_steps = 10
        # Half the 4096-token batches below the first ~2 of 20 inference steps' noise run sparse: per head,
        # three spatial heads (3 x 3 tiles of 4 x 4 x 4 tokens, the same 4 frames) and three temporal heads
        # (their own 4 x 4 tile across all 16 frames) -- 10 % of the blocks, with the same tile order for all
        # heads (one permutation), equal key-block counts on every row (the CPU twin's fast path).
        cfg.sparse_heads = [{"pattern": "tile", "params": {"window": [1, 3, 3], "tile": [4, 4, 4]}}] * 3 + [
            {"pattern": "tile", "params": {"window": [5, 1, 1], "tile": [4, 4, 4]}}
        ] * 3
        cfg.sparse_prob = 0.75
        cfg.sparse_max_sigma = 0.97
        cfg.sparse_consistency = 1.0
        return cfg
    if name == "tiny":
        # Smoke tests only (seconds on one CPU thread).
        return TrainConfig(
            preset="tiny",
            model=EmbeddedModelConfig(
                num_layers=1,
                num_heads=2,
                head_dim=16,
                ffn_dim=32,
                freq_dim=16,
                text_dim=16,
                text_layers=1,
                text_heads=2,
                text_ffn_dim=32,
                sample_num_frames=4,
                sample_height=16,
                sample_width=16,
            ),
            resolutions=[(4, 16, 16)],
            resolution_weights=[1.0],
            batch_size=2,
            steps=3,
            lr=1e-3,
            warmup_steps=1,
            ema_decay=0.9,
            log_every=1,
            sample_every=0,
            ckpt_every=0,
            sample_steps=2,
            bf16=False,
        )
    raise ValueError(f"unknown preset {name!r}; choose one of {PRESETS}")


PRESETS = ("gpu", "cpu", "demo", "tiny")


# ------------------------------------------------------------------------------------------------- helpers
def save_grid(
    videos: list[np.ndarray], labels: list[str], path: str, max_frames: int = 8, scale: int = 2
) -> None:
    """Save a PNG grid: one row per clip (``[F, H, W, 3]`` in [0, 1]), up to ``max_frames`` evenly spaced
    frames per row, nearest-upscaled by ``scale``, with the label drawn left of each row."""
    from PIL import Image, ImageDraw

    rows = []
    label_w = 230
    for v, text in zip(videos, labels):
        F = v.shape[0]
        sel = np.linspace(0, F - 1, min(max_frames, F)).round().astype(int)
        frames = [np.kron(v[i], np.ones((scale, scale, 1))) for i in sel]
        pad = np.ones((frames[0].shape[0], 2, 3)) * 0.5
        strip = np.concatenate(sum(([f, pad] for f in frames), [])[:-1], axis=1)
        canvas = Image.new("RGB", (label_w + strip.shape[1], strip.shape[0] + 2), (40, 40, 40))
        canvas.paste(Image.fromarray((strip * 255).round().astype(np.uint8)), (label_w, 1))
        ImageDraw.Draw(canvas).text((4, strip.shape[0] // 2 - 6), text, fill=(230, 230, 230))
        rows.append(canvas)
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows)), (40, 40, 40))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    out.save(path)


def _sample(
    pipe: EmbeddedVideoPipeline,
    prompts: list[str],
    shape: tuple[int, int, int],
    steps: int,
    guidance: float,
    seed: int,
):
    F, H, W = shape
    vids = []
    for i, p in enumerate(prompts):
        out = pipe(
            p,
            num_frames=F,
            height=H,
            width=W,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=torch.Generator("cpu").manual_seed(seed + i),
            output_type="np",
        ).frames
        vids.append(out[0])
    return vids


def _load_init(path: str) -> dict[str, Any]:
    """The weights to warm-start from: a run's ``checkpoint.pt``, or an exported pipeline folder (e.g. the
    shipped ``sparsediff/embedded/weights``), whose fp16 EMA weights then start both the model and its EMA."""
    if os.path.isdir(path):
        from .pipeline import EmbeddedVideoPipeline

        pipe = EmbeddedVideoPipeline.from_pretrained(path, dtype=torch.float32)
        tr = {k: v.float().clone() for k, v in pipe.transformer.state_dict().items()}
        te = {k: v.float().clone() for k, v in pipe.text_encoder.state_dict().items()}
        return {
            "transformer": tr,
            "text_encoder": te,
            "ema_transformer": tr,
            "ema_text_encoder": te,
            "step": 0,
        }
    return torch.load(path, map_location="cpu", weights_only=False)


def warm_start_state(
    old: dict[str, torch.Tensor],
    new: dict[str, torch.Tensor],
    new_channel_norm: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Map a checkpoint's state dict ``old`` onto a model whose state dict is ``new``.

    Same shapes are copied. The patch embedding's weight (``patch_embedding.weight``, ``[inner, C_in, ...]``)
    may have grown along its input channels (coordinate channels added to the input): the old values fill its
    leading channels and the new channels start at zero, so the warm-started model computes exactly what the
    old one did until training uses the new inputs -- or, with ``new_channel_norm > 0``, at random weights
    of that norm per channel (a feature downstream layers can combine with the text from the first step; a
    zero column only gets the gradient of its own linear use). Any other mismatch (missing key, other shape
    change) raises.
    """
    out = {}
    for k, t in new.items():
        if k not in old:
            raise KeyError(f"warm start: {k} not in the checkpoint")
        o = old[k]
        if o.shape == t.shape:
            out[k] = o.to(t.dtype)
        elif (
            k == "patch_embedding.weight"
            and o.ndim == t.ndim
            and o.shape[0] == t.shape[0]
            and o.shape[2:] == t.shape[2:]
            and o.shape[1] < t.shape[1]
        ):
            z = torch.zeros_like(t)
            z[:, : o.shape[1]] = o.to(t.dtype)
            if new_channel_norm > 0:
                for c in range(o.shape[1], t.shape[1]):
                    r = torch.randn(z[:, c].shape, generator=generator)
                    z[:, c] = (r * (new_channel_norm / r.norm())).to(t.dtype)
            out[k] = z
        else:
            raise ValueError(
                f"warm start: {k} has shape {tuple(o.shape)} in the checkpoint, {tuple(t.shape)} here"
            )
    return out


def _lr_lambda(cfg: TrainConfig, state: dict[str, int]):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        total = max(state["total"], cfg.warmup_steps + 1)
        prog = min(1.0, (step - cfg.warmup_steps) / (total - cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def _now(dev: torch.device) -> float:
    """Wall time after the device's queued work finished (timings of asynchronous CUDA steps)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.time()


def _set_logging(out: str) -> None:
    root = logging.getLogger()
    if not any(isinstance(h, logging.StreamHandler) for h in root.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        root.addHandler(h)
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler)]:
        logger.removeHandler(h)
        h.close()
    fh = logging.FileHandler(os.path.join(out, "train.log"))
    fh.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(fh)
    root.setLevel(logging.WARNING)
    logger.setLevel(logging.INFO)


# --------------------------------------------------------------------------------------------------- train
class PlanRecall:
    """The attention-locality term of :attr:`TrainConfig.sparse_recall` (an observer of dense or sparse calls).

    For every self-attention call it sees (q/k still in the autograd graph) it samples ``rows`` query rows,
    computes their exact attention logits over all keys, and adds ``logsumexp(all) - logsumexp(inside the
    head's mask)`` -- minus the log of the attention mass the head's mask keeps -- averaged over rows, heads
    and samples. Masks are the heads' block masks (static families only) in natural token order, built once
    per layout from the families' own group work (so they are the masks the op computes).
    """

    def __init__(self, specs, rows: int, seed: int, block_size: int = 64) -> None:
        self.specs = tuple(specs)
        if not all(s.is_static for s in self.specs):
            raise ValueError("the locality term needs static patterns (their masks do not depend on q/k)")
        self.rows = int(rows)
        self.block_size = int(block_size)
        self.gen = torch.Generator().manual_seed(seed)
        self._masks: dict[Any, torch.Tensor] = {}
        self.terms: list[torch.Tensor] = []
        #: float ``[B]`` weight of each sample of the next calls (None: all 1), e.g. 0 above the noise level
        #: where inference keeps attention dense
        self.sample_weight: torch.Tensor | None = None

    def token_masks(self, layout, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """bool ``[H, N, N]`` (natural order): key ``j`` is inside head ``h``'s mask for query ``i``."""
        key = (layout, str(q.device))
        if key not in self._masks:
            from ..patterns.registry import GroupCall, get_family

            n, bs = layout.num_tokens, self.block_size
            nat = torch.arange(n, device=q.device)
            # the family's own group work, as the op builds it (static: no cache needed, built once here)
            call = GroupCall(q[:1, :1], k[:1, :1], k[:1, :1], layout, bs, 1.0, None, None, None, "auto")
            by_spec = {}
            for spec in dict.fromkeys(self.specs):
                work = get_family(spec.pattern).group_work(call, spec, (0,))
                perm_k = work.perm_k if work.perm_k is not None else work.perm_q
                qb = (nat if work.perm_q is None else work.perm_q.inv) // bs  # query block of each token
                kb = (nat if perm_k is None else perm_k.inv) // bs  # key block of each token
                by_spec[spec] = work.mask.to_dense()[0, 0][qb][:, kb]
            self._masks[key] = torch.stack([by_spec[s] for s in self.specs])
        return self._masks[key]

    def __call__(self, call) -> None:
        q, k = call.query, call.key  # [B, H, N, D]
        if q.shape[1] != len(self.specs):
            raise ValueError(f"{len(self.specs)} head specs for a call with {q.shape[1]} heads")
        masks = self.token_masks(call.layout, q.detach(), k.detach())
        n = q.shape[2]
        rows = torch.randint(n, (min(self.rows, n),), generator=self.gen).to(q.device)
        scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
        logits = (q[:, :, rows].float() @ k.float().transpose(-1, -2)) * scale  # [B, H, R, N]
        inside = masks[:, rows].unsqueeze(0)
        lse_all = torch.logsumexp(logits, -1)
        lse_in = torch.logsumexp(logits.masked_fill(~inside, float("-inf")), -1)
        per_sample = (lse_all - lse_in).mean((1, 2))  # [B]
        w = self.sample_weight
        if w is None:
            self.terms.append(per_sample.mean())
        elif float(w.sum()) > 0:
            self.terms.append((per_sample * w.to(per_sample)).sum() / w.sum())

    def take(self) -> torch.Tensor | None:
        """The mean term over the calls seen since the last ``take`` (None if there were none)."""
        if not self.terms:
            return None
        t = torch.stack(self.terms).mean()
        self.terms.clear()
        return t


def train(
    cfg: TrainConfig,
    out: str,
    *,
    device: str = "auto",
    resume: bool = False,
    evaluate: bool = True,
    install: bool = False,
    cpu_timing: bool = True,
    command: str | None = None,
    resume_total_steps: int | None = None,
    init_from: str | None = None,
    init_channel_norm: float = 0.0,
) -> dict[str, Any]:
    """Run a training job; returns the final metrics dict (also written to ``out/pipeline/metrics.json``).

    With ``resume``, training continues from ``out/checkpoint.pt`` up to the total number of steps planned
    by the interrupted run (after any time-budget cut), or to ``resume_total_steps`` when given.
    With ``init_from`` (a ``checkpoint.pt`` of another run, used only when there is nothing to resume), the
    weights and EMA weights start from that checkpoint (:func:`warm_start_state`) with a fresh optimizer and
    schedule.
    """
    os.makedirs(out, exist_ok=True)
    _set_logging(out)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    n_params = cfg.model.num_parameters()
    size_mb = n_params * 2 / 1e6
    max_tokens = max(tokens_per_sample(cfg.model, *r) for r in cfg.resolutions)
    logger.info(
        "preset %s on %s: %s parameters (%.2f MB fp16), %d tokens/sample at the largest resolution, config %s",
        cfg.preset,
        dev,
        f"{n_params:,}",
        size_mb,
        max_tokens,
        json.dumps(cfg.to_dict()),
    )
    if size_mb > MAX_SHIPPED_MB:
        logger.warning("model is %.2f MB in fp16, over the %.0f MB shipping limit", size_mb, MAX_SHIPPED_MB)

    torch.manual_seed(cfg.seed)
    pipe = build_pipeline(cfg.model, seed=cfg.seed)
    pipe.set_progress_bar_config(disable=True)
    transformer, text_encoder, tokenizer = pipe.transformer, pipe.text_encoder, pipe.tokenizer
    # DiT practice: zero-init the output projection, so training starts from "predict zero velocity".
    torch.nn.init.zeros_(transformer.proj_out.weight)
    torch.nn.init.zeros_(transformer.proj_out.bias)
    pipe.to(dev)
    # EMA weights live in a second pipeline (same architecture), used for samples and the export.
    ema = build_pipeline(cfg.model, seed=cfg.seed)
    ema.transformer.load_state_dict(transformer.state_dict())
    ema.text_encoder.load_state_dict(text_encoder.state_dict())
    ema.to(dev)
    ema.set_progress_bar_config(disable=True)
    for m in (ema.transformer, ema.text_encoder):
        m.requires_grad_(False).eval()
    model_params = list(transformer.parameters()) + list(text_encoder.parameters())
    ema_params = list(ema.transformer.parameters()) + list(ema.text_encoder.parameters())
    decay = [p for p in model_params if p.ndim >= 2]
    no_decay = [p for p in model_params if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.99),
        fused=dev.type == "cuda",
    )
    sched_state = {"total": cfg.steps}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, sched_state))
    gen = torch.Generator().manual_seed(cfg.seed)  # clip parameters, captions, resolution (CPU)
    noise_gen = torch.Generator(dev).manual_seed(cfg.seed + 1)  # noise and noise levels (on the device)
    start_step = 0
    ckpt_path = os.path.join(out, "checkpoint.pt")
    if resume and os.path.exists(ckpt_path):
        ck = torch.load(ckpt_path, map_location=dev, weights_only=False)
        transformer.load_state_dict(ck["transformer"])
        text_encoder.load_state_dict(ck["text_encoder"])
        ema.transformer.load_state_dict(ck["ema_transformer"])
        ema.text_encoder.load_state_dict(ck["ema_text_encoder"])
        opt.load_state_dict(ck["optimizer"])
        sched_state["total"] = resume_total_steps or ck["total_steps"]
        sched.last_epoch = ck["step"] - 1
        gen.set_state(ck["generator"].to("cpu"))
        noise_gen.set_state(ck["noise_generator"].to("cpu"))
        start_step = ck["step"]
        logger.info("resumed from %s at step %d", ckpt_path, start_step)
    elif init_from:
        ck = _load_init(init_from)
        for key, module in (
            ("transformer", transformer),
            ("text_encoder", text_encoder),
            ("ema_transformer", ema.transformer),
            ("ema_text_encoder", ema.text_encoder),
        ):
            g = torch.Generator().manual_seed(cfg.seed + 7)  # the same new columns for weights and EMA
            module.load_state_dict(warm_start_state(ck[key], module.state_dict(), init_channel_norm, g))
        logger.info("weights from %s (step %d of that run); fresh optimizer", init_from, ck["step"])
    cap = sched_state["total"]  # the time budget may cut the plan, never extend it beyond this

    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts outside autocast (patch conv, norms)
        torch.backends.cudnn.allow_tf32 = True
    fwd = torch.compile(transformer) if cfg.compile else transformer
    use_bf16 = cfg.bf16 and dev.type == "cuda"
    shift = cfg.model.shift
    weights = torch.tensor(cfg.resolution_weights, dtype=torch.float)
    eval_prompts = data.eval_prompts()
    metrics_f = open(os.path.join(out, "metrics.jsonl"), "a")
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet copied to the host (no per-step device sync)
    transformer.train()
    text_encoder.train()
    t0 = time.time()
    t_timing, timing_step = None, 0
    step = start_step
    last_log, last_log_step = time.time(), start_step
    n_sparse = 0  # batches trained with sparse attention (this process)

    def do_sample(tag: str) -> None:
        shape = cfg.resolutions[0]
        vids = _sample(ema, eval_prompts, shape, cfg.sample_steps, cfg.guidance_scale, seed=1234)
        res = checks.check_videos(vids, eval_prompts)
        path = os.path.join(out, "samples", f"{tag}.png")
        save_grid(vids, eval_prompts, path)
        logger.info("samples %s: %s -> %s", tag, res, path)
        metrics_f.write(
            json.dumps({"step": step, "colour_rate": res.colour_rate, "direction_rate": res.direction_rate})
            + "\n"
        )
        metrics_f.flush()

    def save_ckpt() -> None:
        torch.save(
            {
                "step": step,
                "total_steps": sched_state["total"],
                "transformer": transformer.state_dict(),
                "text_encoder": text_encoder.state_dict(),
                "ema_transformer": ema.transformer.state_dict(),
                "ema_text_encoder": ema.text_encoder.state_dict(),
                "optimizer": opt.state_dict(),
                "generator": gen.get_state(),
                "noise_generator": noise_gen.get_state(),
                "config": cfg.to_dict(),
            },
            ckpt_path + ".tmp",
        )
        os.replace(ckpt_path + ".tmp", ckpt_path)

    sparse_plan = None
    recall: PlanRecall | None = None
    recall_log: list[torch.Tensor] = []
    if cfg.sparse_recall > 0 and not cfg.sparse_heads:
        raise ValueError("sparse_recall needs sparse_heads (the masks whose locality it teaches)")
    if cfg.sparse_heads:
        from ..plan import Plan
        from ..specs import DenseSchedule, HeadSpec

        if len(cfg.sparse_heads) != cfg.model.num_heads:
            raise ValueError(
                f"sparse_heads lists {len(cfg.sparse_heads)} heads, the model has {cfg.model.num_heads}"
            )
        row = [
            HeadSpec.make(
                h["pattern"],
                **{k: tuple(v) if isinstance(v, list) else v for k, v in h.get("params", {}).items()},
            )
            for h in cfg.sparse_heads
        ]
        sparse_plan = Plan.per_head(transformer, [row] * cfg.model.num_layers, schedule=DenseSchedule(0, ()))
        if cfg.sparse_recall > 0:
            recall = PlanRecall(row, cfg.recall_rows, cfg.seed + 11)
            dense_plan = Plan.dense()
            logger.info(
                "locality term: weight %g, %d query rows per call", cfg.sparse_recall, cfg.recall_rows
            )
        logger.info(
            "sparse batches: %s (p=%.2f at sigma <= %.2f)",
            sparse_plan.summary(),
            cfg.sparse_prob,
            cfg.sparse_max_sigma,
        )

    while step < sched_state["total"]:
        ri = int(torch.multinomial(weights, 1, generator=gen)) if len(weights) > 1 else 0
        F, H, W = cfg.resolutions[ri]
        bsz = cfg.batch_size
        if cfg.equal_token_batches:
            bsz = max(1, cfg.batch_size * max_tokens // tokens_per_sample(cfg.model, F, H, W))
        batch = data.sample_batch(bsz, F, H, W, gen, device=dev, distractor_prob=cfg.distractor_prob)
        caps = [
            "" if float(torch.rand((), generator=gen)) < cfg.caption_dropout else c for c in batch.captions
        ]
        toks = tokenizer(caps, max_length=cfg.model.max_text_length)
        x0 = batch.video
        noise = torch.randn(x0.shape, generator=noise_gen, device=dev)
        u = torch.sigmoid(torch.randn(bsz, generator=noise_gen, device=dev))
        sigma = shift * u / (1 + (shift - 1) * u)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        target = noise - x0
        sparse = (
            sparse_plan is not None
            and ri == 0
            and float(sigma.max()) <= cfg.sparse_max_sigma
            and float(torch.rand((), generator=gen)) < cfg.sparse_prob
        )
        pred_dense = None
        if recall is not None:
            recall.sample_weight = (sigma <= cfg.sparse_max_sigma).float()
        if sparse:
            from ..api import sparse_attention_enabled

            attn_ctx = sparse_attention_enabled(
                transformer, sparse_plan, **({"observer": recall} if recall is not None else {})
            )
            if cfg.sparse_consistency > 0:
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    emb0 = text_encoder(toks["input_ids"].to(dev), toks["attention_mask"].to(dev))
                    pred_dense = fwd(
                        hidden_states=with_coordinates(xt, cfg.model.coord_channels),
                        timestep=sigma * 1000,
                        encoder_hidden_states=emb0,
                        return_dict=False,
                    )[0].float()
        elif recall is not None:
            from ..api import sparse_attention_enabled

            attn_ctx = sparse_attention_enabled(transformer, dense_plan, observer=recall)
        else:
            attn_ctx = contextlib.nullcontext()
        with attn_ctx, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
            emb = text_encoder(toks["input_ids"].to(dev), toks["attention_mask"].to(dev))
            xin = with_coordinates(xt, cfg.model.coord_channels)
            pred = fwd(
                hidden_states=xin, timestep=sigma * 1000, encoder_hidden_states=emb, return_dict=False
            )[0]
        n_sparse += int(sparse)
        loss = torch.nn.functional.mse_loss(pred.float(), target)
        if pred_dense is not None:
            loss = loss + cfg.sparse_consistency * torch.nn.functional.mse_loss(pred.float(), pred_dense)
        if recall is not None:
            recall.sample_weight = None  # set before the forward below; cleared here for the next batch
            term = recall.take()
            if term is not None:
                loss = loss + cfg.sparse_recall * term
                recall_log.append(term.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model_params, cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        with torch.no_grad():
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, [p.detach() for p in model_params], 1 - d)
        pending.append(loss.detach())

        done = step - start_step
        if cfg.max_minutes and done == cfg.timing_steps:
            t_timing, timing_step = _now(dev), step
        if (
            cfg.max_minutes
            and t_timing is not None
            and done >= 2 * cfg.timing_steps
            and (done == 2 * cfg.timing_steps or step % cfg.log_every == 0)
        ):
            # Average step time since the timing start (includes sampling/checkpoint overheads). The plan
            # shrinks whenever it would overrun; it may grow back (up to the configured steps) only during
            # its first half, so the cosine schedule is not disturbed late in the run.
            per_step = (_now(dev) - t_timing) / (step - timing_step)
            fit = min(cap, step + int((cfg.max_minutes * 60 - (time.time() - t0)) / per_step))
            old = sched_state["total"]
            if fit < old or (fit > old and step < old / 2):
                sched_state["total"] = max(fit, step)
                if done == 2 * cfg.timing_steps or abs(fit - old) > 0.05 * old:
                    logger.info(
                        "%.3f s/step: planning %d steps instead of %d to fit %.1f min",
                        per_step,
                        sched_state["total"],
                        old,
                        cfg.max_minutes,
                    )
        if step % cfg.log_every == 0 or step == sched_state["total"]:
            losses += torch.stack(pending).float().cpu().tolist()
            pending.clear()
            now = time.time()
            n = step - last_log_step
            rec = {
                "step": step,
                "loss": float(np.mean(losses[-n:])),
                "lr": sched.get_last_lr()[0],
                "grad_norm": float(gnorm),
                "s_per_step": (now - last_log) / n,
                "res": [F, H, W],
                "sparse_batches": n_sparse,
                "outside_mask": float(torch.stack(recall_log).mean()) if recall_log else None,
                "elapsed_min": (now - t0) / 60,
            }
            last_log, last_log_step = now, step
            if recall_log:
                logger.info("  locality: -log(attention mass inside the masks) %.4f", rec["outside_mask"])
                recall_log.clear()
            logger.info(
                "step %d/%d loss %.4f lr %.2e gnorm %.2f %.3f s/step (%.1f min)",
                step,
                sched_state["total"],
                rec["loss"],
                rec["lr"],
                rec["grad_norm"],
                rec["s_per_step"],
                rec["elapsed_min"],
            )
            metrics_f.write(json.dumps(rec) + "\n")
            metrics_f.flush()
        if cfg.sample_every and step % cfg.sample_every == 0 and step < sched_state["total"]:
            do_sample(f"step_{step:06d}")
        if cfg.ckpt_every and step % cfg.ckpt_every == 0:
            save_ckpt()

    train_minutes = (time.time() - t0) / 60
    save_ckpt()
    metrics: dict[str, Any] = {
        "config": cfg.to_dict(),
        "num_parameters": n_params,
        "train": {
            "steps": step,
            "minutes": train_minutes,
            "device": torch.cuda.get_device_name(dev)
            if dev.type == "cuda"
            else f"cpu ({torch.get_num_threads()} thread(s))",
            "final_loss": float(np.mean(losses[-50:])) if losses else None,
            "first_loss": float(np.mean(losses[:10])) if losses else None,
            "tokens_per_sample": max_tokens,
            "command": command or "",
        },
    }
    # ---- export: fp16 EMA weights
    export = os.path.join(out, "pipeline")
    if os.path.isdir(export):
        shutil.rmtree(export)
    ema.to("cpu")
    to_storage_dtype(ema.transformer)
    to_storage_dtype(ema.text_encoder)
    ema.save_pretrained(export)
    size = sum(
        os.path.getsize(os.path.join(r, f))
        for r, _, fs in os.walk(export)
        for f in fs
        if f.endswith(".safetensors")
    )
    metrics["size_mb"] = size / 1e6
    logger.info("exported %s (%.2f MB of safetensors)", export, size / 1e6)
    if evaluate:
        metrics.update(evaluate_export(export, cfg, dev, cpu_timing=cpu_timing))
    _write_card(export, metrics)
    metrics_f.close()
    if install:
        _install(export)
    return metrics


def _write_card(export: str, metrics: dict[str, Any]) -> None:
    """``metrics.json`` and ``MODEL_CARD.md`` of an export folder from ``metrics``."""
    with open(os.path.join(export, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1, default=str)
    with open(os.path.join(export, "MODEL_CARD.md"), "w") as f:
        f.write(render_model_card(metrics))


def _install(export: str, weights_dir: str | None = None) -> list[str]:
    """Replace the package's shipped weights (:data:`WEIGHTS_DIR`) with the export folder.

    The searched plan and the finetune adapter shipped next to the old weights (``sparse_plan.json``,
    ``sparse_plan_lora/``, anything the export does not have) were made for those weights and are removed
    with them -- with a WARNING that names them, since they cannot be rebuilt without re-running the search
    and the finetune. Returns the removed top-level names."""
    target = weights_dir or WEIGHTS_DIR
    removed = sorted(set(os.listdir(target)) - set(os.listdir(export))) if os.path.isdir(target) else []
    if removed:
        logger.warning(
            "--install replaces %s: removing %s, made for the old weights -- re-run `sparsediff search` "
            "(and `sparsediff finetune`) for the new ones",
            target,
            ", ".join(removed),
        )
    if os.path.isdir(target):
        shutil.rmtree(target)
    shutil.copytree(export, target)
    logger.info("installed the pipeline into %s", target)
    return removed


def reevaluate(
    out: str, cfg: TrainConfig, *, install: bool = False, history: str | None = None
) -> dict[str, Any]:
    """Re-run :func:`evaluate_export` on ``out/pipeline`` (e.g. after the checks changed), keep the training
    part of its ``metrics.json``, rewrite ``MODEL_CARD.md``, optionally install into the package."""
    _set_logging(out)
    export = os.path.join(out, "pipeline")
    with open(os.path.join(export, "metrics.json")) as f:
        metrics = json.load(f)
    cfg.model = EmbeddedModelConfig.from_dict(metrics["config"]["model"])
    for key in ("sample_steps", "guidance_scale"):
        setattr(cfg, key, metrics["config"].get(key, getattr(cfg, key)))
    cfg.resolutions = [tuple(r) for r in metrics["config"]["resolutions"]]
    if history:
        metrics["history"] = history
    metrics.update(evaluate_export(export, cfg, torch.device("cpu")))
    _write_card(export, metrics)
    if install:
        _install(export)
    return metrics


def evaluate_export(
    export: str, cfg: TrainConfig, dev: torch.device, *, cpu_timing: bool = True
) -> dict[str, Any]:
    """Checks, sample grid, attention probe and sampling times of an exported pipeline folder."""
    from .probe import probe_pipeline

    out: dict[str, Any] = {}
    pipe = EmbeddedVideoPipeline.from_pretrained(export, dtype=torch.float32).to(dev)
    pipe.set_progress_bar_config(disable=True)
    shape = tuple(cfg.resolutions[0])
    prompts = data.eval_prompts(16)
    vids = _sample(pipe, prompts, shape, cfg.sample_steps, cfg.guidance_scale, seed=0)
    res = checks.check_videos(vids, prompts)
    out["checks"] = res.to_dict()
    held_prompts = data.heldout_prompts(16)
    held = _sample(pipe, held_prompts, shape, cfg.sample_steps, cfg.guidance_scale, seed=data.HELDOUT_SEED)
    out["heldout_checks"] = checks.check_videos(held, held_prompts).to_dict()
    out["heldout_setting"] = (
        f"{shape[0]}x{shape[1]}x{shape[2]}, {cfg.sample_steps} steps, CFG {cfg.guidance_scale}, seeds "
        f"{data.HELDOUT_SEED}..{data.HELDOUT_SEED + len(held_prompts) - 1}"
    )
    # the same held-out check at every training size (a model taught a new size must keep the old ones)
    by_size = {
        "x".join(map(str, shape)): {k: out["heldout_checks"][k] for k in ("colour_rate", "direction_rate")}
    }
    for shp in [tuple(r) for r in cfg.resolutions[1:]]:
        h = _sample(pipe, held_prompts, shp, cfg.sample_steps, cfg.guidance_scale, seed=data.HELDOUT_SEED)
        r = checks.check_videos(h, held_prompts)
        by_size["x".join(map(str, shp))] = {"colour_rate": r.colour_rate, "direction_rate": r.direction_rate}
        logger.info("held-out checks at %s: %s", shp, r)
    out["heldout_by_size"] = by_size
    logger.info(
        "held-out checks: colour %.0f%%, direction %.0f%%",
        100 * out["heldout_checks"]["colour_rate"],
        100 * out["heldout_checks"]["direction_rate"],
    )
    out["check_setting"] = (
        f"{shape[0]}x{shape[1]}x{shape[2]}, {cfg.sample_steps} steps, CFG {cfg.guidance_scale}, seeds 0..{len(prompts) - 1}"
    )
    save_grid(vids[:8], prompts[:8], os.path.join(export, "samples.png"))
    out["grid_png"] = "samples.png"
    logger.info("checks on the export: %s", res)
    pr = probe_pipeline(
        pipe,
        prompts[:2],
        num_frames=shape[0],
        height=shape[1],
        width=shape[2],
        num_inference_steps=cfg.sample_steps,
        guidance_scale=cfg.guidance_scale,
    )
    out["probe"] = {
        "grid": list(pr.grid),
        "counts": pr.counts(),
        "table": pr.table(),
        "setting": f"2 prompts, steps {pr.params['steps']} of {cfg.sample_steps}, {pr.params['max_queries']} query rows",
        "heads": pr.to_dict()["heads"],
    }
    logger.info("probe: %s\n%s", pr, pr.table())
    timing = []
    targets = [("cpu", torch.device("cpu"))] if cpu_timing else []
    if dev.type != "cpu":
        targets.append((torch.cuda.get_device_name(dev), dev))
    for name, d in targets:
        p = pipe.to(d)
        for shp in sorted({tuple(r) for r in cfg.resolutions}):
            _sample(p, prompts[:1], shp, 2, cfg.guidance_scale, seed=0)  # warm-up
            if d.type == "cuda":
                torch.cuda.synchronize()
            t = time.time()
            _sample(p, prompts[:1], shp, cfg.sample_steps, cfg.guidance_scale, seed=0)
            if d.type == "cuda":
                torch.cuda.synchronize()
            timing.append(
                {
                    "device": name,
                    "threads": torch.get_num_threads() if d.type == "cpu" else "",
                    "shape": "x".join(map(str, shp)),
                    "steps": cfg.sample_steps,
                    "guidance": cfg.guidance_scale,
                    "seconds": time.time() - t,
                }
            )
            logger.info("sampling time %s %s: %.2f s", name, shp, timing[-1]["seconds"])
    out["timing"] = timing
    return out


def main(argv: list[str] | None = None) -> int:
    from ..cli_args import Parser

    ap = Parser(prog="python -m sparsediff.embedded.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (logs, samples, checkpoint, pipeline/)")
    ap.add_argument("--preset", choices=PRESETS, default="gpu")
    ap.add_argument("--steps", type=int, help="override the preset's number of steps")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--max-minutes", type=float, help="training time budget (0 = none)")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, help="torch CPU threads (CPU training)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the transformer")
    ap.add_argument(
        "--resume",
        action="store_true",
        help="continue from OUT/checkpoint.pt (to its planned steps, or --steps)",
    )
    ap.add_argument(
        "--init-from",
        help="start the weights (and EMA) from another run's checkpoint.pt or an exported pipeline folder "
        "(fresh optimizer; the patch embedding may grow by coordinate channels)",
    )
    ap.add_argument(
        "--init-channel-norm",
        type=float,
        default=0.0,
        help="with --init-from: norm of the random weights of new input channels (default 0: zero weights)",
    )
    ap.add_argument(
        "--evaluate-only",
        action="store_true",
        help="do not train: re-run the checks/probe/timing on OUT/pipeline and rewrite its card (and --install)",
    )
    ap.add_argument(
        "--sparse-recall",
        type=float,
        help="weight of the attention-locality term (TrainConfig.sparse_recall; needs a preset with sparse_heads)",
    )
    ap.add_argument(
        "--sparse-consistency",
        type=float,
        help="weight of the sparse-vs-dense consistency term (TrainConfig.sparse_consistency)",
    )
    ap.add_argument("--history", help="a line on the run's history for the model card")
    ap.add_argument("--no-eval", action="store_true", help="skip checks/probe/timing after training")
    ap.add_argument("--no-cpu-timing", action="store_true", help="skip the CPU sampling-time measurement")
    ap.add_argument(
        "--install", action="store_true", help="copy OUT/pipeline to sparsediff/embedded/weights/"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _preset(args.preset)
    for name in ("steps", "batch_size", "lr", "seed", "sparse_recall", "sparse_consistency"):
        if getattr(args, name) is not None:
            setattr(cfg, name, getattr(args, name))
    if args.max_minutes is not None:
        cfg.max_minutes = args.max_minutes or None
    cfg.compile = cfg.compile or args.compile
    cmd = "python -m sparsediff.embedded.train " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.evaluate_only:
        reevaluate(args.out, cfg, install=args.install, history=args.history)
        return 0
    train(
        cfg,
        args.out,
        device=args.device,
        resume=args.resume,
        evaluate=not args.no_eval,
        install=args.install,
        cpu_timing=not args.no_cpu_timing,
        command=cmd,
        resume_total_steps=args.steps if args.resume else None,
        init_from=args.init_from,
        init_channel_norm=args.init_channel_norm,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
