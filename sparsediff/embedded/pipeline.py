"""``EmbeddedVideoPipeline``: a tiny pixel-space text-to-video diffusers pipeline around ``WanTransformer3DModel``.

Components (``pipe.components``):

* ``transformer`` -- a real ``diffusers.WanTransformer3DModel`` with ``out_channels = 3`` working directly
  on pixels in [-1, 1] (no VAE) and ``in_channels = 3 + 3`` (pixels plus fixed t/y/x coordinate ramps, see
  :func:`with_coordinates`), patch ``(1, 4, 4)``: a 16 x 64 x 64 clip is 16 x 16 x 16 =
  4096 tokens. Because it *is* a Wan transformer, sparsediff's Wan adapter applies unchanged.
* ``text_encoder`` -- :class:`~sparsediff.embedded.text.CaptionTextEncoder` (diffusers ``ModelMixin``).
* ``tokenizer`` -- :class:`~sparsediff.embedded.text.CaptionTokenizer` (plain Python, JSON vocabulary).
* ``scheduler`` -- ``FlowMatchEulerDiscreteScheduler`` (rectified flow: ``x_t = (1 - s) x_0 + s noise``,
  the transformer predicts ``noise - x_0``, timesteps ``1000 s``).

The denoising loop mirrors ``WanPipeline``: the transformer is called twice per step under CFG (conditional
then unconditional, each in ``transformer.cache_context("cond" / "uncond")``), timestep ``t.expand(B)``.

Saving/loading: diffusers' generic loader only instantiates components whose class derives from a diffusers
or transformers base class, which the tokenizer deliberately does not (no ``transformers`` dependency). So
this class overrides :meth:`save_pretrained` (the tokenizer is written to ``<folder>/tokenizer/`` by itself and
recorded as ``[null, null]`` in ``model_index.json``) and :meth:`from_pretrained` (which loads it back from
``<folder>/tokenizer/``). Loading is local only: pass a folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from .text import CaptionTextEncoder, CaptionTokenizer

__all__ = [
    "EmbeddedVideoPipeline",
    "EmbeddedVideoPipelineOutput",
    "EmbeddedModelConfig",
    "build_pipeline",
    "dtype_kwargs",
    "to_storage_dtype",
    "tokens_per_sample",
    "with_coordinates",
    "coord_channels_of",
]


def dtype_kwargs(dtype: torch.dtype | None) -> dict[str, Any]:
    """``from_pretrained`` dtype keyword for the installed diffusers (``dtype``; ``torch_dtype`` before it
    was renamed)."""
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since the rename)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def to_storage_dtype(model: torch.nn.Module, dtype: torch.dtype = torch.float16) -> torch.nn.Module:
    """Cast ``model``'s floating parameters/buffers to ``dtype`` in place, except the modules the model class
    keeps in fp32 (``_keep_in_fp32_modules``: Wan's RoPE, time embedder, modulation tables, norms)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not keep.intersection(name.split(".")):
            t.data = t.data.to(dtype)
    return model


@dataclass
class EmbeddedVideoPipelineOutput(BaseOutput):
    """``frames``: ``np`` ``[B, F, H, W, 3]`` in [0, 1]; ``pt`` ``[B, F, 3, H, W]`` in [0, 1]; ``pil`` a list
    (per video) of lists of PIL images; ``latent`` the raw pixels ``[B, 3, F, H, W]`` in [-1, 1]."""

    frames: np.ndarray | torch.Tensor | list[list[PIL.Image.Image]]


@dataclass
class EmbeddedModelConfig:
    """Architecture of the embedded model (the transformer, text encoder, tokenizer and scheduler).

    ``num_heads * head_dim`` is the transformer width. The fp16 size of the shipped model must stay
    <= 10 MB (:meth:`num_parameters` estimates it before building). ``sample_*`` are the pipeline's default
    call sizes; ``shift`` is the flow-matching timestep shift used by the scheduler *and* by training (3.0:
    the caption only matters at high noise -- at low noise colour and position are visible in ``x_t`` --
    so shifting training towards high noise is what makes the text conditioning learn; in a 2-minute CPU
    run at 2 x 16 x 16 px, shift 1.0 left conditional and unconditional losses equal after 457 steps while
    shift 3.0 gave 50 % right colours after 474).

    ``coord_channels`` (0, 3 or 5): the transformer also reads fixed (t, y, x) coordinate ramps in [-1, 1]
    concatenated to its pixel input (:func:`with_coordinates`). Wan has no absolute position embedding (RoPE
    is relative only), so at high noise, where ``x_t`` is almost pure noise, a token cannot tell where in the
    frame or clip it sits, and the prompted *direction* -- "starts on the right, ends on the left" -- cannot
    be expressed: the first CPU run (6 690 steps, no coordinates) learned colours but its output changed by
    1.6e-4 (mean |diff|) when only the direction word changed. The channels are part of the transformer's
    ``in_channels`` (``in_channels - out_channels`` of them), so a saved model carries the choice.
    With 5, the products ``t*y`` and ``t*x`` are appended too. Measured (CPU runs 5-7, 3 channels): the model
    learned the direction's *axis* but not its sign -- the x0 prediction at noise 1 for "left" and "right"
    was the same to 0.003 mean |diff| (0.05 between "left" and "up"), and its text projection had squeezed
    the left/right difference 4x smaller than left/up. The sign only matters jointly with time *and*
    position (where a "right" clip starts is left of where it ends): a three-way interaction whose pairwise
    parts carry no signal, which gradient descent learns very slowly. With ``t*x`` / ``t*y`` given, the sign
    is a two-way interaction with one input feature.

    ``token_code_scale``: the text encoder adds a fixed orthogonal code per word to its output
    (:class:`~sparsediff.embedded.text.CaptionTextEncoder`), so words cannot collapse together; the first run's
    learned encoder had brought the four direction words within 0.4 % of each other.
    """

    num_layers: int = 6
    num_heads: int = 6
    head_dim: int = 32
    ffn_dim: int = 768
    freq_dim: int = 64
    patch_size: tuple[int, int, int] = (1, 4, 4)
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ffn_dim: int = 128
    max_text_length: int = 12
    rope_max_seq_len: int = 256
    shift: float = 3.0
    coord_channels: int = 3
    token_code_scale: float = 1.0
    token_code_bag: bool = True
    sample_num_frames: int = 16
    sample_height: int = 64
    sample_width: int = 64
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddedModelConfig:
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)

    def num_parameters(self) -> int:
        """Exact parameter count (builds the modules on the meta device)."""
        with torch.device("meta"):
            tr, te = _build_models(self)
        return sum(p.numel() for p in tr.parameters()) + sum(p.numel() for p in te.parameters())


def _build_models(cfg: EmbeddedModelConfig) -> tuple[WanTransformer3DModel, CaptionTextEncoder]:
    tok_vocab = CaptionTokenizer(max_length=cfg.max_text_length).vocab_size
    transformer = WanTransformer3DModel(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.head_dim,
        in_channels=3 + cfg.coord_channels,
        out_channels=3,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=cfg.rope_max_seq_len,
    )
    text_encoder = CaptionTextEncoder(
        vocab_size=tok_vocab,
        max_length=cfg.max_text_length,
        hidden_size=cfg.text_dim,
        num_layers=cfg.text_layers,
        num_heads=cfg.text_heads,
        ffn_dim=cfg.text_ffn_dim,
        token_code_scale=cfg.token_code_scale,
        token_code_bag=cfg.token_code_bag,
    )
    return transformer, text_encoder


def build_pipeline(cfg: EmbeddedModelConfig | None = None, seed: int = 0) -> EmbeddedVideoPipeline:
    """A random-init :class:`EmbeddedVideoPipeline` (fp32, CPU, eval mode) with the architecture ``cfg``.

    Random-init attention is near uniform: this proves wiring, not quality.
    """
    cfg = cfg or EmbeddedModelConfig()
    torch.manual_seed(seed)
    transformer, text_encoder = _build_models(cfg)
    tokenizer = CaptionTokenizer(max_length=cfg.max_text_length)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=cfg.shift)
    pipe = EmbeddedVideoPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder.eval(),
        transformer=transformer.eval(),
        scheduler=scheduler,
        sample_num_frames=cfg.sample_num_frames,
        sample_height=cfg.sample_height,
        sample_width=cfg.sample_width,
    )
    return pipe


class EmbeddedVideoPipeline(DiffusionPipeline):
    r"""Pixel-space text-to-video pipeline of the embedded tiny Wan model.

    Args:
        tokenizer: :class:`CaptionTokenizer`. text_encoder: :class:`CaptionTextEncoder`.
        transformer: ``WanTransformer3DModel`` with 3 input/output channels.
        scheduler: ``FlowMatchEulerDiscreteScheduler``.
        sample_num_frames, sample_height, sample_width: default call size (the training resolution; saved in
            ``model_index.json``).
    """

    model_cpu_offload_seq = "text_encoder->transformer"
    _optional_components = ["tokenizer"]  # saved/loaded by this class itself, see the module docstring
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        tokenizer: CaptionTokenizer,
        text_encoder: CaptionTextEncoder,
        transformer: WanTransformer3DModel,
        scheduler: FlowMatchEulerDiscreteScheduler,
        sample_num_frames: int = 16,
        sample_height: int = 64,
        sample_width: int = 64,
    ) -> None:
        super().__init__()
        self.register_modules(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, scheduler=scheduler
        )
        self.register_to_config(
            sample_num_frames=sample_num_frames, sample_height=sample_height, sample_width=sample_width
        )
        self.video_processor = VideoProcessor(vae_scale_factor=1)

    # ------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> None:
        """``DiffusionPipeline.save_pretrained`` for the diffusers components, then the tokenizer into
        ``save_directory/tokenizer`` (its ``model_index.json`` entry is ``[null, null]``)."""
        tokenizer = self.tokenizer
        self.register_modules(tokenizer=None)
        try:
            super().save_pretrained(save_directory, **kwargs)
        finally:
            self.register_modules(tokenizer=tokenizer)
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(save_directory, "tokenizer"))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any
    ) -> EmbeddedVideoPipeline:
        """Load from a local folder written by :meth:`save_pretrained` (``dtype`` -- or ``torch_dtype`` -- and
        the other keywords are passed on to diffusers; ``tokenizer=`` overrides the saved tokenizer)."""
        path = os.fspath(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"EmbeddedVideoPipeline loads from a local folder; {path!r} is not one")
        tokenizer = kwargs.pop("tokenizer", None)
        if tokenizer is None:
            tokenizer = CaptionTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
        if "torch_dtype" in kwargs or "dtype" in kwargs:
            kwargs.update(dtype_kwargs(kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)))
        pipe = super().from_pretrained(path, **kwargs)
        pipe.register_modules(tokenizer=tokenizer)
        return pipe

    # ---------------------------------------------------------------------------------------------- prompts
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def current_timestep(self) -> Any:
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def encode_prompt(
        self,
        prompt: str | list[str],
        num_videos_per_prompt: int = 1,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Text embeddings ``[B * num_videos_per_prompt, max_text_length, text_dim]`` (padding zeroed)."""
        if self.tokenizer is None:
            raise ValueError(
                "this pipeline has no tokenizer; load it with EmbeddedVideoPipeline.from_pretrained"
            )
        device = device or self._execution_device
        prompt = [prompt] if isinstance(prompt, str) else list(prompt)
        toks = self.tokenizer(prompt, max_length=self.text_encoder.config.max_length)
        ids, mask = toks["input_ids"].to(device), toks["attention_mask"].to(device)
        emb = self.text_encoder(ids, mask)
        return emb.repeat_interleave(num_videos_per_prompt, dim=0)

    def check_inputs(
        self,
        prompt: Any,
        negative_prompt: Any,
        num_frames: int,
        height: int,
        width: int,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
    ) -> None:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt and prompt_embeds")
        if prompt is not None and not isinstance(prompt, (str, list)):
            raise TypeError(f"prompt must be a str or a list of str, got {type(prompt).__name__}")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
        if prompt_embeds is not None and negative_prompt_embeds is not None:
            if prompt_embeds.shape != negative_prompt_embeds.shape:
                raise ValueError(
                    f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                    f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
                )
        if negative_prompt is not None and isinstance(prompt, list) and isinstance(negative_prompt, list):
            if len(negative_prompt) != len(prompt):
                raise ValueError(f"{len(negative_prompt)} negative prompts for {len(prompt)} prompts")
        pt, ph, pw = self.transformer.config.patch_size
        for name, v, p in (("num_frames", num_frames, pt), ("height", height, ph), ("width", width, pw)):
            if v < p or v % p:
                raise ValueError(
                    f"{name}={v} must be a positive multiple of the patch size {p} (pixel-space model, patch "
                    f"{tuple(self.transformer.config.patch_size)})"
                )

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 4.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Any = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
    ) -> EmbeddedVideoPipelineOutput | tuple:
        """Generate videos.

        Args:
            prompt: caption(s) in the dataset's grammar, e.g. ``"a red circle moving left"``.
            negative_prompt: unconditional branch text (default ``""``, what training dropped captions to).
            num_frames, height, width: video size in pixels; multiples of the patch size (1, 4, 4). Default:
                the pipeline's ``sample_*`` config (the training resolution).
            num_inference_steps: Euler steps. guidance_scale: CFG scale (<= 1 disables CFG: one transformer
                call per step instead of two).
            generator: seeds the initial noise ``[B, 3, F, H, W]``. latents: start noise instead.
            prompt_embeds, negative_prompt_embeds: text-encoder outputs ``[B, L, text_dim]`` instead of
                ``prompt`` / ``negative_prompt`` (as :meth:`encode_prompt` returns them; one row per video).
            output_type: ``"np"`` | ``"pt"`` | ``"pil"`` | ``"latent"`` (see :class:`EmbeddedVideoPipelineOutput`).

        Returns:
            :class:`EmbeddedVideoPipelineOutput`, or ``(frames,)`` with ``return_dict=False``.
        """
        num_frames = num_frames or self.config.sample_num_frames
        height = height or self.config.sample_height
        width = width or self.config.sample_width
        self.check_inputs(
            prompt, negative_prompt, num_frames, height, width, prompt_embeds, negative_prompt_embeds
        )
        self._guidance_scale = guidance_scale
        self._attention_kwargs = attention_kwargs
        self._current_timestep = None
        self._interrupt = False
        device = self._execution_device

        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            batch_size = len(prompts)
            prompt_embeds = self.encode_prompt(prompts, num_videos_per_prompt, device)
        else:
            num_videos_per_prompt, batch_size = 1, prompt_embeds.shape[0]  # embeddings give one row per video
            prompt_embeds = prompt_embeds.to(device)
        if not self.do_classifier_free_guidance:
            negative_prompt_embeds = None
        elif negative_prompt_embeds is None:
            negative_prompt = "" if negative_prompt is None else negative_prompt
            negs = (
                [negative_prompt] * batch_size if isinstance(negative_prompt, str) else list(negative_prompt)
            )
            negative_prompt_embeds = self.encode_prompt(negs, num_videos_per_prompt, device)
        else:
            negative_prompt_embeds = negative_prompt_embeds.to(device)
        transformer_dtype = self.transformer.dtype
        prompt_embeds = prompt_embeds.to(transformer_dtype)
        if negative_prompt_embeds is not None:
            negative_prompt_embeds = negative_prompt_embeds.to(transformer_dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (
            batch_size * num_videos_per_prompt,
            self.transformer.config.out_channels,
            num_frames,
            height,
            width,
        )
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
            latents = latents.to(device=device, dtype=torch.float32)

        self._num_timesteps = len(timesteps)
        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                self._current_timestep = t
                latent_model_input = with_coordinates(
                    latents.to(transformer_dtype), coord_channels_of(self.transformer)
                )
                timestep = t.expand(latents.shape[0])
                ctx = {
                    "step_index": i,
                    "sigma": float(self.scheduler.sigmas[i]),
                    "num_inference_steps": len(timesteps),
                }
                with self.transformer.cache_context("cond", **ctx):
                    noise_pred = self.transformer(
                        hidden_states=latent_model_input,
                        timestep=timestep,
                        encoder_hidden_states=prompt_embeds,
                        attention_kwargs=attention_kwargs,
                        return_dict=False,
                    )[0]
                if self.do_classifier_free_guidance:
                    with self.transformer.cache_context("uncond", **ctx):
                        noise_uncond = self.transformer(
                            hidden_states=latent_model_input,
                            timestep=timestep,
                            encoder_hidden_states=negative_prompt_embeds,
                            attention_kwargs=attention_kwargs,
                            return_dict=False,
                        )[0]
                    noise_pred = noise_uncond + guidance_scale * (noise_pred - noise_uncond)
                latents = self.scheduler.step(noise_pred.float(), t, latents, return_dict=False)[0]

                if callback_on_step_end is not None:
                    local = {
                        "latents": latents,
                        "prompt_embeds": prompt_embeds,
                        "negative_prompt_embeds": negative_prompt_embeds,
                    }
                    out = callback_on_step_end(
                        self, i, t, {k: local[k] for k in callback_on_step_end_tensor_inputs}
                    )
                    latents = out.pop("latents", latents)
                    prompt_embeds = out.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = out.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()
        self._current_timestep = None

        if output_type == "latent":
            video = latents
        else:
            video = self.video_processor.postprocess_video(latents.clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (video,)
        return EmbeddedVideoPipelineOutput(frames=video)


#: Coordinate channels :func:`with_coordinates` can append (0: none; 3: t, y, x; 5: also t*y, t*x).
COORD_CHANNELS = (0, 3, 5)


def with_coordinates(x: torch.Tensor, coord_channels: int) -> torch.Tensor:
    """``x [B, C, F, H, W]`` with ``coord_channels`` fixed coordinate channels appended: 3 = the ramps t, y,
    x, each in [-1, 1] over the clip's frames / rows / columns (pixel centres); 5 = also the products t*y and
    t*x (see :class:`EmbeddedModelConfig`), in ``x``'s dtype and device."""
    if coord_channels == 0:
        return x
    if coord_channels not in COORD_CHANNELS:
        raise ValueError(f"coord_channels must be one of {COORD_CHANNELS}, got {coord_channels}")
    B, _, F, H, W = x.shape

    def ramp(n: int) -> torch.Tensor:
        return (torch.arange(n, device=x.device, dtype=torch.float32) + 0.5) / n * 2 - 1

    t = ramp(F).view(1, 1, F, 1, 1).expand(B, 1, F, H, W)
    y = ramp(H).view(1, 1, 1, H, 1).expand(B, 1, F, H, W)
    xx = ramp(W).view(1, 1, 1, 1, W).expand(B, 1, F, H, W)
    chans = [t, y, xx] + ([t * y, t * xx] if coord_channels == 5 else [])
    return torch.cat([x] + [c.to(x.dtype) for c in chans], dim=1)


def coord_channels_of(transformer: torch.nn.Module) -> int:
    """Number of coordinate channels a transformer reads (``in_channels - out_channels``)."""
    return int(transformer.config.in_channels) - int(transformer.config.out_channels)


def tokens_per_sample(cfg: EmbeddedModelConfig, num_frames: int, height: int, width: int) -> int:
    """Self-attention sequence length of one clip."""
    pt, ph, pw = cfg.patch_size
    return math.prod((num_frames // pt, height // ph, width // pw))
