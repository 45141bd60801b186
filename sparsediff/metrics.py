"""Quality of a generated video against a reference (usually: sparse attention vs the dense run).

Every metric comes from torchmetrics (a maintained, tested implementation), computed per frame and
summarised over the video::

    from sparsediff.metrics import video_metrics

    m = video_metrics(sparse_video, dense_video)     # both [F, H, W, 3], float in [0, 1]
    m.psnr, m.ssim, m.ms_ssim, m.temporal_psnr       # floats (None when not computable, see m.skipped)
    m.psnr_per_frame                                 # list of F floats
    m.to_dict()                                      # JSON-ready (inf written as the string "inf")

Input convention (both arguments): a numpy array or torch tensor ``[F, H, W, C]`` (frames, height,
width, channels; C = 3, or 1 for grey) with float values in ``[0, 1]`` -- what a diffusers video
pipeline returns with ``output_type="np"`` (``.frames[0]``) -- or ``uint8`` in ``[0, 255]`` (divided by
255). A single image ``[H, W, C]`` counts as a one-frame video. Values outside ``[0, 1]`` or NaN raise
``ValueError`` rather than being clipped silently.

Metrics (``data_range`` = 1 everywhere):

* **PSNR** (dB) -- ``psnr_per_frame[i]`` of frame i; ``psnr`` of the whole video, i.e. from the MSE pooled
  over all frames (not the mean of per-frame dB values, which one identical frame would make infinite).
  Identical inputs give ``inf``.
* **SSIM** -- Gaussian window (sigma 1.5, 11 px, shrunk to the largest odd size that fits frames smaller
  than 11 px); ``ssim`` is the mean of the per-frame values. Identical inputs give 1.
* **MS-SSIM** -- the standard 5 scales with an 11 px window, which needs frames of at least 176 x 176
  pixels (the coarsest scale is 1/16 of the frame and must be wider than the window); smaller frames
  give ``None`` with the reason in ``skipped["ms_ssim"]``.
* **Temporal PSNR** (dB) -- PSNR between the frame differences ``v[t+1] - v[t]`` of the two videos (data
  range 2, since differences lie in ``[-1, 1]``). A sparse video that flickers, or moves differently,
  has low temporal PSNR even when every frame alone looks close. ``None`` for one-frame inputs.
* **LPIPS** (AlexNet) -- only when asked (``lpips=True`` or ``"auto"``) *and* torchvision is installed *and*
  the AlexNet ImageNet weights are already in torch's hub cache (``torch.hub.get_dir()/checkpoints``);
  this module never downloads anything. Otherwise ``None`` with the reason in ``skipped["lpips"]``.
  Lower is better (0 = identical).
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "VideoMetrics",
    "VideoQuality",
    "video_metrics",
    "as_video",
    "lpips_unavailable_reason",
    "strict_json",
]

#: MS-SSIM: 5 scales (the standard betas) with an 11-px window need frames of at least this many pixels.
MS_SSIM_MIN_SIDE = 176


def as_video(x: Any, name: str = "video") -> torch.Tensor:
    """``x`` as a float64 CPU tensor ``[F, H, W, C]`` in ``[0, 1]`` (see the module docstring)."""
    t = torch.as_tensor(x.copy() if hasattr(x, "flags") and not x.flags.writeable else x)
    t = t.detach().cpu()
    if t.dtype == torch.uint8:
        t = t.double() / 255.0
    elif t.is_floating_point():
        t = t.double()
    else:
        raise TypeError(f"{name}: expected float values in [0, 1] or uint8, got dtype {t.dtype}")
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[-1] not in (1, 3):
        raise ValueError(
            f"{name}: expected [F, H, W, C] (or [H, W, C]) with C = 1 or 3, got shape {tuple(t.shape)}"
        )
    if min(t.shape[:3]) == 0:
        raise ValueError(f"{name}: empty video, shape {tuple(t.shape)}")
    if torch.isnan(t).any():
        raise ValueError(f"{name}: contains NaN")
    lo, hi = float(t.min()), float(t.max())
    if lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{name}: values must lie in [0, 1], got [{lo:.4g}, {hi:.4g}]")
    return t.clamp(0.0, 1.0)


def _psnr_from_mse(mse: float, data_range: float) -> float:
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


@dataclass
class VideoMetrics:
    """Quality of one video against its reference. Scalars summarise the per-frame lists; a metric that
    could not be computed is ``None`` and its reason is in ``skipped``."""

    frames: int
    height: int
    width: int
    psnr: float
    psnr_per_frame: list[float]
    ssim: float
    ssim_per_frame: list[float]
    ssim_kernel: int
    ms_ssim: float | None = None
    ms_ssim_per_frame: list[float] | None = None
    temporal_psnr: float | None = None
    temporal_psnr_per_pair: list[float] | None = None
    lpips: float | None = None
    lpips_per_frame: list[float] | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; non-finite floats become the strings ``"inf"`` / ``"-inf"``."""
        return _json_safe(asdict(self))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def strict_json(obj: Any) -> Any:
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts (strict JSON): non-finite floats
    -- and the strings "inf" / "-inf" / "nan" of :meth:`VideoMetrics.to_dict` -- become ``None``; tuples
    become lists; numpy / torch scalars become Python numbers. What the tools write (``results.json``,
    ``summary.json``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, str) and obj in ("inf", "-inf", "nan"):
        return None
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy / torch scalar
        return strict_json(obj.item())
    return obj


def _alexnet_checkpoint() -> str:
    from torchvision.models import AlexNet_Weights

    url = AlexNet_Weights.IMAGENET1K_V1.url
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def lpips_unavailable_reason() -> str | None:
    """``None`` when LPIPS can be computed offline, else why not (nothing is downloaded to find out)."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return "torchvision is not installed (LPIPS needs its AlexNet); pip install torchvision"
    try:
        path = _alexnet_checkpoint()
    except Exception as e:  # very old / new torchvision without the weights enum
        return f"cannot locate torchvision's AlexNet weights ({type(e).__name__}: {e})"
    if not os.path.isfile(path):
        return (
            f"AlexNet ImageNet weights are not on disk ({path}); sparsediff never downloads them -- "
            "place the file there to enable LPIPS"
        )
    return None


class VideoQuality:
    """Computes :class:`VideoMetrics`; holds the LPIPS network (built once) when it is enabled.

    Args:
        lpips: ``False`` (default) never computes LPIPS; ``"auto"`` computes it when possible and records
            the reason otherwise; ``True`` raises ``RuntimeError`` (with the reason) when it is impossible.
        device: where LPIPS runs (the other metrics are cheap and run on the CPU in float64).
    """

    def __init__(self, lpips: bool | str = False, device: str | torch.device = "cpu") -> None:
        if lpips not in (True, False, "auto"):
            raise ValueError(f"lpips must be True, False or 'auto', got {lpips!r}")
        self.device = torch.device(device)
        self._lpips_net = None
        self.lpips_reason: str | None = "not requested (lpips=False)"
        if lpips:
            self.lpips_reason = lpips_unavailable_reason()
            if self.lpips_reason is not None and lpips is True:
                raise RuntimeError(f"LPIPS requested but unavailable: {self.lpips_reason}")
            if self.lpips_reason is None:
                from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

                self._lpips_net = LearnedPerceptualImagePatchSimilarity(
                    net_type="alex", normalize=True, reduction="mean"
                ).to(self.device)

    def __call__(self, video: Any, reference: Any) -> VideoMetrics:
        """Metrics of ``video`` against ``reference`` (same shape ``[F, H, W, C]``, see module docstring)."""
        from torchmetrics.functional.image import (
            multiscale_structural_similarity_index_measure,
            structural_similarity_index_measure,
        )

        v = as_video(video, "video")
        r = as_video(reference, "reference")
        if v.shape != r.shape:
            raise ValueError(f"video {tuple(v.shape)} and reference {tuple(r.shape)} differ in shape")
        n, h, w, _ = v.shape
        skipped: dict[str, str] = {}

        se = (v - r) ** 2
        mse_frames = se.mean(dim=(1, 2, 3))
        psnr_frames = [_psnr_from_mse(float(m), 1.0) for m in mse_frames]
        psnr = _psnr_from_mse(float(se.mean()), 1.0)

        vc = v.permute(0, 3, 1, 2).contiguous()  # [F, C, H, W] as torchmetrics wants
        rc = r.permute(0, 3, 1, 2).contiguous()
        k = min(11, h, w)
        k = k if k % 2 == 1 else k - 1
        ssim_frames = structural_similarity_index_measure(
            vc, rc, data_range=1.0, kernel_size=k, sigma=1.5, reduction="none"
        )
        ssim_list = [float(s) for s in ssim_frames]

        ms_list = None
        if min(h, w) >= MS_SSIM_MIN_SIDE:
            ms = multiscale_structural_similarity_index_measure(vc, rc, data_range=1.0, reduction="none")
            ms_list = [float(s) for s in ms]
        else:
            skipped["ms_ssim"] = (
                f"frames {h}x{w} are smaller than {MS_SSIM_MIN_SIDE} px on a side (5 scales, 11-px window)"
            )

        t_list = t_psnr = None
        if n >= 2:
            dv, dr = v[1:] - v[:-1], r[1:] - r[:-1]
            dse = (dv - dr) ** 2
            t_list = [_psnr_from_mse(float(m), 2.0) for m in dse.mean(dim=(1, 2, 3))]
            t_psnr = _psnr_from_mse(float(dse.mean()), 2.0)
        else:
            skipped["temporal_psnr"] = "a single frame has no frame differences"

        lp_list = None
        if self._lpips_net is not None:
            lp_list = []
            with torch.no_grad():
                for i in range(n):
                    a = vc[i : i + 1].float().to(self.device)
                    b = rc[i : i + 1].float().to(self.device)
                    if a.shape[1] == 1:
                        a, b = a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1)
                    lp_list.append(float(self._lpips_net(a, b)))
        else:
            skipped["lpips"] = self.lpips_reason or "unavailable"

        return VideoMetrics(
            frames=n,
            height=h,
            width=w,
            psnr=psnr,
            psnr_per_frame=psnr_frames,
            ssim=sum(ssim_list) / n,
            ssim_per_frame=ssim_list,
            ssim_kernel=k,
            ms_ssim=None if ms_list is None else sum(ms_list) / n,
            ms_ssim_per_frame=ms_list,
            temporal_psnr=t_psnr,
            temporal_psnr_per_pair=t_list,
            lpips=None if lp_list is None else sum(lp_list) / n,
            lpips_per_frame=lp_list,
            skipped=skipped,
        )


def video_metrics(video: Any, reference: Any, *, lpips: bool | str = False) -> VideoMetrics:
    """:class:`VideoMetrics` of ``video`` against ``reference`` (both ``[F, H, W, C]`` in [0, 1]).

    One-off convenience; when comparing many videos with LPIPS, build one :class:`VideoQuality` and call
    it, so the network is loaded once.
    """
    return VideoQuality(lpips=lpips)(video, reference)
