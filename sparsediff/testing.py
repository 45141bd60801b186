"""Planted-structure attention: q/k/v with a known per-head pattern on a video layout (for tests and search).

Every head kind is built so that its *logits* ``scale * q·k`` (``scale = D ** -0.5``, the attention default)
follow a closed form, then hidden by a random rotation of the head dimension (q·k is unchanged) and a
little Gaussian noise (``noise``, in logit units). Grid tokens carry the structure; tokens outside the
primary grid (text) get small random q/k (near-uniform rows), which every pattern keeps dense anyway.

Head kinds (``kinds=`` per head):

``"local"``     energy decay in 3D: ``logit = -(a_t * Δf² + a_s * (Δh² + Δw²))`` (Gaussian window; matching
                families: tile, radial).
``"temporal"``  same spatial position across all frames: ``logit = -a_s * (Δh² + Δw²)`` with no frame term
                (matching: reordered ``order="frame"``).
``"cluster"``   ``groups`` semantic groups of tokens scattered at random over the grid; ``q = k = c_g`` + noise
                with random unit centroids ``c_g`` -- a token attends its group (matching: reordered
                ``order="cluster"``).
``"stripe"``    vertical stripes / sinks: ``num_sinks`` random key tokens have a large logit with every
                query (matching: topp, lse_cache).
``"global"``    diffuse: small random q/k, near-uniform attention (only dense is exact).

``v`` is standard normal. All randomness comes from one ``torch.Generator`` seeded with ``seed``.
:func:`drift` makes slowly drifting copies (as across denoising steps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .layout import TokenLayout

__all__ = ["PLANTED_KINDS", "Planted", "planted_qkv", "drift"]

PLANTED_KINDS = ("local", "temporal", "cluster", "stripe", "global")


@dataclass
class Planted:
    """q, k, v ``[B, H, N, D]`` float32 and the head kinds; ``info`` holds per-kind details (group labels,
    sink positions)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kinds: tuple[str, ...]
    layout: TokenLayout
    info: dict = field(default_factory=dict)


def _grid_coords(layout: TokenLayout) -> torch.Tensor:
    F, H, W = layout.grid
    f, h, w = torch.meshgrid(torch.arange(F), torch.arange(H), torch.arange(W), indexing="ij")
    c = torch.stack([f.reshape(-1), h.reshape(-1), w.reshape(-1)], -1).double()
    return c - c.mean(0)  # centred: keeps |x|² terms small


def _quadratic(coords: torch.Tensor, weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with ``q·k = -Σ_a w_a (x_a - y_a)² + (terms constant per query)``."""
    w = torch.tensor(weights, dtype=torch.float64)
    qf = torch.cat([coords * torch.sqrt(2 * w), torch.ones(coords.shape[0], 1, dtype=torch.float64)], -1)
    kf = torch.cat([coords * torch.sqrt(2 * w), -(w * coords**2).sum(-1, keepdim=True)], -1)
    return qf, kf


def planted_qkv(
    layout: TokenLayout,
    kinds: Sequence[str],
    *,
    batch: int = 1,
    head_dim: int = 64,
    seed: int = 0,
    noise: float = 0.1,
    local_decay: tuple[float, float] = (1.0, 1.0),
    temporal_decay: float = 6.0,
    groups: int = 32,
    cluster_strength: float = 12.0,
    num_sinks: int = 4,
    sink_strength: float = 10.0,
    global_noise: float = 1.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Planted:
    """Build planted q/k/v (see module docstring).

    Args:
        layout: a layout with a primary video/image grid.
        kinds: one of :data:`PLANTED_KINDS` per head.
        local_decay: ``(a_t, a_s)`` of local heads (logit decay per squared frame / pixel step).
        temporal_decay: ``a_s`` of temporal heads.
        groups: number of semantic groups of cluster heads; ``cluster_strength``: logit of q·k within a group.
        num_sinks / sink_strength: stripe heads (the sink logit above the rest).
        noise: std of the Gaussian logit noise added to every head (``global_noise`` for global heads).
    """
    if layout.grid is None:
        raise ValueError("planted_qkv needs a layout with a video/image grid")
    for kd in kinds:
        if kd not in PLANTED_KINDS:
            raise ValueError(f"unknown planted kind {kd!r}; known: {PLANTED_KINDS}")
    gen = torch.Generator().manual_seed(seed)
    N, D, H = layout.num_tokens, head_dim, len(kinds)
    off, ng = layout.grid_offset, layout.grid_len
    if D < 8:
        raise ValueError(f"head_dim must be >= 8, got {D}")
    root = D**0.25  # logits = (root*q)·(root*k) * D**-0.5 = q·k: the planted values are the logits
    coords = _grid_coords(layout)
    q = torch.zeros(batch, H, N, D, dtype=torch.float64)
    k = torch.zeros(batch, H, N, D, dtype=torch.float64)
    info: dict = {}

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    for h, kd in enumerate(kinds):
        qg = torch.zeros(batch, ng, D, dtype=torch.float64)
        kg = torch.zeros(batch, ng, D, dtype=torch.float64)
        if kd in ("local", "temporal"):
            w = (
                (local_decay[0], local_decay[1], local_decay[1])
                if kd == "local"
                else (0.0, temporal_decay, temporal_decay)
            )
            qf, kf = _quadratic(coords, w)
            qg[..., : qf.shape[1]] = qf
            kg[..., : kf.shape[1]] = kf
        elif kd == "cluster":
            lab = torch.randint(0, groups, (ng,), generator=gen)
            cent = rnd(groups, D)
            cent = cent / cent.norm(dim=-1, keepdim=True) * math.sqrt(cluster_strength)
            qg[:] = cent[lab]
            kg[:] = cent[lab]
            info.setdefault("cluster_labels", {})[h] = lab
        elif kd == "stripe":
            sinks = torch.randperm(ng, generator=gen)[:num_sinks]
            u = rnd(D)
            u = u / u.norm()
            qg[:] = u * math.sqrt(sink_strength)
            kg[:, sinks] = u * math.sqrt(sink_strength)
            info.setdefault("sinks", {})[h] = sinks + off
        # "global": nothing planted, noise only
        q[:, h, off : off + ng] = qg
        k[:, h, off : off + ng] = kg
        # logit noise of std ~`noise` from the dims the quadratic features leave free (no cross terms with
        # the large quadratic feature); all tokens, text included
        s = math.sqrt((global_noise if kd == "global" else noise) / math.sqrt(D - 4))
        q[:, h, :, 4:] += rnd(batch, N, D - 4) * s
        k[:, h, :, 4:] += rnd(batch, N, D - 4) * s
        rot = torch.linalg.qr(rnd(D, D))[0]
        q[:, h] = q[:, h] @ rot
        k[:, h] = k[:, h] @ rot
    q = q * root
    k = k * root
    v = rnd(batch, H, N, D)
    cast = {"dtype": dtype, "device": device}
    return Planted(q.to(**cast), k.to(**cast), v.to(**cast), tuple(kinds), layout, info)


def drift(x: torch.Tensor, step: int, amount: float = 0.02, seed: int = 1) -> torch.Tensor:
    """``x`` drifted by ``step`` steps of a fixed random direction: ``x + amount * step * |x|_rms * n``.

    Models the slow change of q/k across denoising steps (deterministic for a seed).
    """
    gen = torch.Generator().manual_seed(seed)
    n = torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)
    rms = x.float().pow(2).mean().sqrt().to(x.dtype)
    return x + amount * step * rms * n
