"""Attention probe: per-(layer, head) locality statistics of a Wan-style video transformer.

How q/k are obtained (no re-implementation of the model beyond RoPE's rotation): a forward pre-hook on every
self-attention module (``blocks.<i>.attn1``) receives the exact inputs the model's processor gets
(``hidden_states``, ``rotary_emb``); q/k are computed with the module's *own* projections and norms
(diffusers' ``_get_qkv_projections``, ``attn.norm_q`` / ``attn.norm_k``) and rotated with the same
interleaved-pair formula as ``WanAttnProcessor`` (the one unavoidable copy, 6 lines; a test checks that
``attn.to_out(SDPA(q, k, v))`` reproduces the module's output).

Statistics, for a sample of query tokens (``max_queries`` per call, full rows over all keys, float32), on the
video grid ``F x H x W`` after patchify (token ``n = (f * H + h) * W + w``), averaged over queries, prompts
and probed steps (conditional branch only):

* ``local_ratio`` -- attention mass in the query's nearest 3x3x3 neighbourhood (``|df|, |dh|, |dw| <= 1``)
  divided by the mass uniform attention would put there (neighbourhood size / N). Uniform = 1.
* ``same_frame`` -- mass with ``df = 0``; ``frame_window`` -- mass with ``|df| <= temporal_distance``;
  ``spatial_window`` -- mass with ``|dh|, |dw| <= spatial_radius`` (any frame).
* ``same_position_ratio`` -- mass at the query's own (h, w) in any frame, over uniform (F / N);
  ``far_same_position`` -- mass at the own (h, w) in frames ``|df| >= 2`` (what separates a temporal head
  from a 3D-local one).
* ``k90`` -- fraction of the keys needed to reach 90 % of the mass (sorted by weight); ``entropy`` --
  attention entropy over ``log N`` (1 = uniform).

Head kinds (:func:`classify`, in this order): ``temporal`` (``far_same_position >= 0.2`` and
``same_position_ratio >= 5`` and ``same_frame < 0.5``), ``local`` (``local_ratio >= 5``), ``diffuse``
(``k90 >= 0.5``), ``spatial`` (``same_frame >= 0.5``), else ``mixed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["HeadStats", "ProbeResult", "attention_stats", "classify", "compute_qkv", "probe_pipeline"]

_KEYS = (
    "local_mass",
    "local_ratio",
    "same_frame",
    "frame_window",
    "spatial_window",
    "same_position_ratio",
    "far_same_position",
    "k90",
    "entropy",
)


@dataclass
class HeadStats:
    """Statistics of one head (see the module docstring); ``kind`` from :func:`classify`."""

    layer: int
    head: int
    local_mass: float
    local_ratio: float
    same_frame: float
    frame_window: float
    spatial_window: float
    same_position_ratio: float
    far_same_position: float
    k90: float
    entropy: float
    kind: str = ""


def classify(s: dict[str, float] | HeadStats) -> str:
    """Head kind from its statistics: ``temporal`` | ``local`` | ``diffuse`` | ``spatial`` | ``mixed``."""
    g = s if isinstance(s, dict) else asdict(s)
    if g["far_same_position"] >= 0.2 and g["same_position_ratio"] >= 5 and g["same_frame"] < 0.5:
        return "temporal"
    if g["local_ratio"] >= 5:
        return "local"
    if g["k90"] >= 0.5:
        return "diffuse"
    if g["same_frame"] >= 0.5:
        return "spatial"
    return "mixed"


@dataclass
class ProbeResult:
    """Per-head statistics of a probe run; ``grid`` is the (F, H, W) token grid probed."""

    grid: tuple[int, int, int]
    heads: list[HeadStats]
    params: dict[str, Any] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for h in self.heads:
            out[h.kind] = out.get(h.kind, 0) + 1
        return out

    def head(self, layer: int, head: int) -> HeadStats:
        return next(h for h in self.heads if h.layer == layer and h.head == head)

    def to_dict(self) -> dict[str, Any]:
        return {"grid": list(self.grid), "params": self.params, "heads": [asdict(h) for h in self.heads]}

    def table(self) -> str:
        """Markdown table, one row per head."""
        r, d = self.params.get("spatial_radius", 2), self.params.get("temporal_distance", 1)
        lines = [
            f"| layer | head | kind | 3x3x3 mass / uniform | same frame | \\|df\\|<={d} | \\|dh\\|,\\|dw\\|<={r} "
            "| same pos. / uniform | same pos. \\|df\\|>=2 | keys for 90 % | entropy |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for h in self.heads:
            lines.append(
                f"| {h.layer} | {h.head} | {h.kind} | {h.local_ratio:.1f}x | {h.same_frame:.2f} | {h.frame_window:.2f} "
                f"| {h.spatial_window:.2f} | {h.same_position_ratio:.1f}x | {h.far_same_position:.2f} | {h.k90:.1%} "
                f"| {h.entropy:.2f} |"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        c = ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items()))
        return f"ProbeResult(grid={self.grid}, {len(self.heads)} heads: {c})"


def _coords(grid: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    F, H, W = grid
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([f.flatten(), h.flatten(), w.flatten()], -1).to(device)  # [N, 3]


@torch.no_grad()
def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    grid: tuple[int, int, int],
    *,
    query_index: torch.Tensor | None = None,
    temporal_distance: int = 1,
    spatial_radius: int = 2,
    mass: float = 0.9,
    scale: float | None = None,
) -> dict[str, torch.Tensor]:
    """Per-head statistics of ``softmax(q k^T * scale)`` rows.

    Args:
        q, k: ``[B, N, heads, D]`` (diffusers' layout, after norms and RoPE), ``N = F * H * W`` video tokens
            in (f, h, w) order.
        grid: ``(F, H, W)``. query_index: ``[Q]`` rows to evaluate (default: all N).
        scale: softmax scale (default ``D ** -0.5``, SDPA's).

    Returns:
        ``{name: [heads] float tensor}`` for the names in the module docstring, each averaged over batch and
        queries.
    """
    B, N, nh, D = q.shape
    if k.shape != q.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if math.prod(grid) != N:
        raise ValueError(f"grid {grid} has {math.prod(grid)} tokens, q has {N}")
    dev = q.device
    idx = torch.arange(N, device=dev) if query_index is None else query_index.to(dev)
    scale = D**-0.5 if scale is None else scale
    qs = q[:, idx].float().transpose(1, 2)  # [B, h, Q, D]
    ks = k.float().transpose(1, 2)  # [B, h, N, D]
    p = torch.softmax(qs @ ks.transpose(-1, -2) * scale, dim=-1)  # [B, h, Q, N]
    c = _coords(grid, dev)
    d = (c[idx][:, None, :] - c[None, :, :]).abs()  # [Q, N, 3]
    df, dh, dw = d.unbind(-1)
    local = (df <= 1) & (dh <= 1) & (dw <= 1)
    same_pos = (dh == 0) & (dw == 0)

    def m(mask: torch.Tensor) -> torch.Tensor:  # mass per [B, h, Q]
        return (p * mask.to(p.dtype)).sum(-1)

    local_mass = m(local)
    uniform_local = local.sum(-1).to(p.dtype) / N  # [Q]
    same_pos_mass = m(same_pos)
    ps = p.sort(dim=-1, descending=True).values.cumsum(-1)
    k_needed = (ps < mass).sum(-1).to(p.dtype) + 1  # [B, h, Q]
    ent = -(p * p.clamp_min(1e-30).log()).sum(-1) / math.log(N) if N > 1 else torch.zeros_like(local_mass)
    out = {
        "local_mass": local_mass,
        "local_ratio": local_mass / uniform_local,
        "same_frame": m(df == 0),
        "frame_window": m(df <= temporal_distance),
        "spatial_window": m((dh <= spatial_radius) & (dw <= spatial_radius)),
        "same_position_ratio": same_pos_mass / (grid[0] / N),
        "far_same_position": m(same_pos & (df >= 2)),
        "k90": k_needed.clamp(max=N) / N,
        "entropy": ent,
    }
    return {n: v.mean(dim=(0, 2)) for n, v in out.items()}


def _apply_rotary_emb(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    # The rotation WanAttnProcessor applies (interleaved pairs); identical formula.
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def compute_qkv(
    attn: torch.nn.Module, hidden_states: torch.Tensor, rotary_emb: Any
) -> tuple[torch.Tensor, ...]:
    """q, k, v ``[B, N, heads, D]`` of a Wan self-attention module for its input, with its own modules."""
    from diffusers.models.transformers.transformer_wan import _get_qkv_projections

    q, k, v = _get_qkv_projections(attn, hidden_states, None)
    q, k = attn.norm_q(q), attn.norm_k(k)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary_emb is not None:
        q, k = _apply_rotary_emb(q, *rotary_emb), _apply_rotary_emb(k, *rotary_emb)
    return q, k, v


def _self_attention_modules(transformer: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    blocks = getattr(transformer, "blocks", None)
    if blocks is None or not all(hasattr(b, "attn1") for b in blocks):
        raise TypeError(f"{type(transformer).__name__} is not a Wan-style transformer (blocks[i].attn1)")
    return [(i, b.attn1) for i, b in enumerate(blocks)]


@torch.no_grad()
def probe_pipeline(
    pipe: Any,
    prompts: Sequence[str],
    *,
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int = 10,
    steps: Sequence[int] | None = None,
    guidance_scale: float = 4.0,
    max_queries: int = 256,
    temporal_distance: int = 1,
    spatial_radius: int = 2,
    seed: int = 0,
) -> ProbeResult:
    """Run ``pipe`` on ``prompts`` and measure every self-attention head (see the module docstring).

    Args:
        pipe: an :class:`~sparsediff.embedded.pipeline.EmbeddedVideoPipeline` (or any pipeline whose
            ``transformer`` is a ``WanTransformer3DModel`` and whose call takes these arguments).
        steps: denoising step indices probed (default: first, middle, last).
        max_queries: query rows sampled per call (evenly spaced over the sequence, deterministic).
        seed: generator seed of the pipeline call for prompt ``i`` is ``seed + i``.
    """
    tr = pipe.transformer
    pt, ph, pw = tr.config.patch_size
    num_frames = num_frames or pipe.config.sample_num_frames
    height = height or pipe.config.sample_height
    width = width or pipe.config.sample_width
    grid = (num_frames // pt, height // ph, width // pw)
    N = math.prod(grid)
    steps = sorted({0, num_inference_steps // 2, num_inference_steps - 1} if steps is None else set(steps))
    calls_per_step = 2 if guidance_scale > 1.0 else 1
    qidx = torch.linspace(0, N - 1, min(max_queries, N)).round().long().unique()
    modules = _self_attention_modules(tr)
    sums: dict[int, dict[str, torch.Tensor]] = {}
    count = {"calls": 0, "samples": 0}

    def root_pre(_module, _args):
        count["calls"] += 1

    def make_hook(layer: int):
        def hook(attn, args, kwargs):
            call = count["calls"] - 1
            if call % calls_per_step != 0 or (call // calls_per_step) % num_inference_steps not in steps:
                return
            hs = args[0] if args else kwargs["hidden_states"]
            rot = args[3] if len(args) > 3 else kwargs.get("rotary_emb")
            q, k, _ = compute_qkv(attn, hs, rot)
            st = attention_stats(
                q,
                k,
                grid,
                query_index=qidx,
                temporal_distance=temporal_distance,
                spatial_radius=spatial_radius,
            )
            acc = sums.setdefault(layer, {n: torch.zeros_like(v) for n, v in st.items()})
            for n, v in st.items():
                acc[n] += v.cpu() if acc[n].device != v.device else v
            if layer == 0:
                count["samples"] += 1

        return hook

    handles = [tr.register_forward_pre_hook(root_pre)]
    handles += [m.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, m in modules]
    try:
        for i, prompt in enumerate(prompts):
            pipe(
                prompt,
                num_frames=num_frames,
                height=height,
                width=width,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=torch.Generator("cpu").manual_seed(seed + i),
                output_type="latent",
            )
            count["calls"] = 0
    finally:
        for h in handles:
            h.remove()
    n = max(count["samples"], 1)
    heads = []
    for layer in sorted(sums):
        acc = sums[layer]
        for h in range(acc["local_ratio"].shape[0]):
            vals = {name: float(acc[name][h]) / n for name in _KEYS}
            heads.append(HeadStats(layer, h, **vals, kind=classify(vals)))
    params = {
        "prompts": list(prompts),
        "num_frames": num_frames,
        "height": height,
        "width": width,
        "num_inference_steps": num_inference_steps,
        "steps": list(steps),
        "guidance_scale": guidance_scale,
        "max_queries": int(qidx.numel()),
        "temporal_distance": temporal_distance,
        "spatial_radius": spatial_radius,
    }
    return ProbeResult(grid, heads, params)
