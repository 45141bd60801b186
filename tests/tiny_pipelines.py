"""Tiny random-init diffusers pipelines, built fully offline, for wiring tests on CPU.

Every factory ``tiny_<model>()`` returns a :class:`TinyPipeline`: a complete diffusers pipeline (real
pipeline class, real transformer/VAE/scheduler/text-encoder classes, tokenizers built from an in-memory
vocabulary -- no Hub access), the small call kwargs to run it in a second or two on CPU, and the token
layout its transformer's self-attention sees. Models are 1-2 layers, 2 heads, head dim 16 (so the sparse
path, which needs a supported head dim, is exercised), small frame/pixel counts, 2 denoising steps.

Random-init attention is near uniform: these pipelines prove wiring (hooks, layouts, reversibility), not
quality. The model survey these factories rely on is docs/MODELS.md.

=============  ==========================  ======================  =========================================
factory        pipeline                    self-attn tokens        notes
=============  ==========================  ======================  =========================================
wan            WanPipeline                 video 3x4x6             text only via cross-attn ``attn2``
wan22          WanPipeline (2 experts)     video 3x4x6             ``transformer`` step 0, ``transformer_2`` step 1
wan_vace       WanVACEPipeline             video 3x4x6             + ``vace_blocks``; called with prompt_embeds
skyreels_v2    SkyReelsV2Pipeline          video 3x4x6             called with prompt_embeds (ftfy, see below)
hunyuan_video  HunyuanVideoPipeline        video 3x4x6 + text 16   text after; padded text masked
cogvideox      CogVideoXPipeline           text 16 + video 3x4x6   text before; SDPA-calling processor
ltx            LTXPipeline                 video 2x8x16            packed by the pipeline; cross-attn text
mochi          MochiPipeline               video 3x4x6 + text n    text after, valid tokens only, per sample
flux           FluxPipeline                text 16 + image 8x12    dual + single blocks
qwenimage      QwenImagePipeline           text n + image 8x12     true CFG: separate calls
sd3            StableDiffusion3Pipeline    image 8x12 + text 93    + image-only ``attn2`` (SD3.5 dual attn)
=============  ==========================  ======================  =========================================

``WanVACEPipeline`` / ``SkyReelsV2Pipeline`` (diffusers 0.42.1) call ``ftfy.fix_text`` without checking
that ``ftfy`` is installed (``NameError: name 'ftfy' is not defined`` on any ``prompt=`` call), so their
factories pass ``prompt_embeds`` / ``negative_prompt_embeds`` computed with the same tiny UMT5.

Tokenizers (transformers 5, checked): ``T5Tokenizer(vocab=[(piece, score), ...], extra_ids=0)`` (unigram),
``LlamaTokenizer(vocab={...}, merges=[])``, ``CLIPTokenizer(vocab={...}, merges=[])`` and
``Qwen2Tokenizer(vocab={...}, merges=[])`` (byte-level BPE without merges: character-level) all build
offline. Text encoders are built from tiny transformers configs with the vocabulary size of the tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode as TorchFunctionModeBase

from sparsediff.layout import TokenLayout

__all__ = ["TinyPipeline", "FACTORIES", "build"]

SEED = 0
HEAD_DIM = 16
HEADS = 2
_WORDS = "a an the of cat dog video photo running red blue green sky sea city night in on with and".split()
PROMPT = "a red cat running in the city"
NEGATIVE = "blue sky"


@dataclass
class TinyPipeline:
    """A tiny pipeline plus what a test needs to run it and check its layout.

    Attributes:
        name: factory name (``"wan"``, ``"flux"``, ...).
        pipe: the diffusers pipeline (eval mode, CPU, fp32, progress bar off).
        kwargs: the call kwargs *without* ``generator`` (use :meth:`call_kwargs` for a fresh seeded one).
        layout: the :class:`~sparsediff.layout.TokenLayout` the transformer's joint self-attention sees for
            one sample of the conditional branch (grid after patchify; text segment if text is part of the
            self-attention sequence). For models with per-sample text (Mochi) it is the conditional
            prompt's layout.
        self_attn: anchored regexes of the self-attention module names (relative to the transformer).
        transformers: names of the pipeline attributes holding transformers (Wan 2.2: two).
        perturb: ``perturb(tiny, hidden_states, f, h, w) -> delta``: a tensor shaped like the
            transformer's ``hidden_states`` input that is non-zero exactly on the latent patch of token
            ``(f, h, w)`` of the grid -- built in the *unpacked* latent space and packed with the
            pipeline's own ``_pack_latents`` where the pipeline packs (Flux, QwenImage, LTX). Used by
            :func:`probe_token_order` (the planted frame/row/column-indexed signal).
    """

    name: str
    pipe: Any
    kwargs: dict[str, Any]
    layout: TokenLayout
    self_attn: tuple[str, ...]
    transformers: tuple[str, ...] = ("transformer",)
    perturb: Callable[..., torch.Tensor] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def call_kwargs(self, seed: int = SEED, **overrides: Any) -> dict[str, Any]:
        """Fresh call kwargs with a new ``torch.Generator`` seeded with ``seed``."""
        kw = dict(self.kwargs)
        kw["generator"] = torch.Generator("cpu").manual_seed(seed)
        kw.update(overrides)
        return kw

    def __call__(self, seed: int = SEED, **overrides: Any) -> torch.Tensor:
        """Run the pipeline and return its first output (latents or frames) as a tensor."""
        with torch.no_grad():
            out = self.pipe(**self.call_kwargs(seed, **overrides), return_dict=False)
        return out[0] if isinstance(out, (tuple, list)) else out


# ---------------------------------------------------------------------------------------------- tokenizers
def _t5_tokenizer():
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in _WORDS]
    vocab += [(c, -3.0) for c in "abcdefghijklmnopqrstuvwxyz\u2581"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def _bpe_vocab(specials: list[str], word_prefix: str = "", word_suffix: str = "") -> dict[str, int]:
    vocab: dict[str, int] = {}
    for s in specials:
        vocab[s] = len(vocab)
    for w in _WORDS:
        vocab.setdefault(word_prefix + w + word_suffix, len(vocab))
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-_<>|/()[]{}\n":
        vocab.setdefault(c, len(vocab))
        if word_suffix:
            vocab.setdefault(c + word_suffix, len(vocab))
    return vocab


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = _bpe_vocab(["<|startoftext|>", "<|endoftext|>"], word_suffix="</w>")
    return CLIPTokenizer(vocab=vocab, merges=[])


def _llama_tokenizer():
    from transformers import LlamaTokenizer

    vocab = _bpe_vocab(["<unk>", "<s>", "</s>"], word_prefix="\u2581")
    vocab.setdefault("\u2581", len(vocab))
    tok = LlamaTokenizer(vocab=vocab, merges=[])
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token
    return tok


def _qwen_tokenizer():
    from transformers import Qwen2Tokenizer

    vocab = _bpe_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], word_prefix="\u0120")
    vocab.setdefault("\u0120", len(vocab))
    vocab.setdefault("\u010a", len(vocab))  # byte-level "\n"
    return Qwen2Tokenizer(vocab=vocab, merges=[])


# ------------------------------------------------------------------------------------------ text encoders
def _t5_encoder(vocab_size: int, d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw = dict(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(SEED)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kw)).eval()
    return T5EncoderModel(T5Config(**kw)).eval()


def _clip_encoder(vocab_size: int, hidden: int, with_projection: bool, projection_dim: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(SEED)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(cfg).eval()


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            comp.eval()
    return pipe


# ------------------------------------------------------------------------------------------------- Wan
def _wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(SEED)
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )


def _wan_transformer(cls_name: str = "WanTransformer3DModel", heads: int = HEADS, **extra):
    import diffusers

    torch.manual_seed(SEED)
    return getattr(diffusers, cls_name)(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=HEAD_DIM,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        **extra,
    )


# Wan: 9 frames -> 3 latent frames (4x temporal), 64x96 px -> 8x12 latent (8x) -> 4x6 tokens (patch 2).
_WAN_CALL = dict(
    prompt=PROMPT,
    negative_prompt=NEGATIVE,
    height=64,
    width=96,
    num_frames=9,
    num_inference_steps=2,
    guidance_scale=5.0,
    max_sequence_length=16,
    output_type="latent",
)
_WAN_LAYOUT = TokenLayout.video(3, 4, 6)


def _perturb_wan(tiny, x, f, h, w):
    return _perturb_bcfhw(lambda c: tuple(c.patch_size))(tiny, x, f, h, w)


def _t5_prompt_embeds(tok, encoder, prompt: str, max_len: int) -> torch.Tensor:
    """Wan-style T5 prompt embeddings ``[1, max_len, d]``: valid tokens encoded, the rest zeros.

    Used for the Wan-derived pipelines whose ``prompt_clean`` calls ``ftfy`` unguarded
    (``WanVACEPipeline``, ``SkyReelsV2Pipeline`` in diffusers 0.42 raise ``NameError: ftfy`` when
    ``ftfy`` is not installed), so they are called with ``prompt_embeds`` instead of ``prompt``.
    """
    ids = tok(prompt, padding="max_length", max_length=max_len, truncation=True, return_tensors="pt")
    n = int(ids.attention_mask.sum())
    with torch.no_grad():
        emb = encoder(ids.input_ids, ids.attention_mask).last_hidden_state
    out = torch.zeros_like(emb)
    out[:, :n] = emb[:, :n]
    return out


def _wan_embeds_call(tok, encoder) -> dict[str, Any]:
    kw = {k: v for k, v in _WAN_CALL.items() if k not in ("prompt", "negative_prompt")}
    kw["prompt_embeds"] = _t5_prompt_embeds(tok, encoder, PROMPT, 16)
    kw["negative_prompt_embeds"] = _t5_prompt_embeds(tok, encoder, NEGATIVE, 16)
    return kw


def tiny_wan() -> TinyPipeline:
    """Wan 2.1 T2V (``WanPipeline``): self-attn ``blocks.{i}.attn1`` over the video grid, text via cross-attn."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tok = _t5_tokenizer()
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=_t5_encoder(len(tok), 32, umt5=True),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_wan_transformer(),
    )
    return TinyPipeline(
        "wan", _finish(pipe), dict(_WAN_CALL), _WAN_LAYOUT, (r"^blocks\.\d+\.attn1$",), perturb=_perturb_wan
    )


def tiny_wan22() -> TinyPipeline:
    """Wan 2.2 A14B-style: ``transformer`` (high noise) + ``transformer_2`` (low noise), ``boundary_ratio``.

    With 2 steps of the shifted flow schedule and ``boundary_ratio=0.9`` the first step runs on
    ``transformer`` and the second on ``transformer_2``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    tok = _t5_tokenizer()
    t1 = _wan_transformer()
    torch.manual_seed(SEED + 1)
    t2 = _wan_transformer()
    with torch.no_grad():  # make the two experts differ
        for p in t2.parameters():
            p.add_(0.01 * torch.randn_like(p))
    pipe = WanPipeline(
        tokenizer=tok,
        text_encoder=_t5_encoder(len(tok), 32, umt5=True),
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=t1,
        transformer_2=t2,
        boundary_ratio=0.9,
    )
    return TinyPipeline(
        "wan22",
        _finish(pipe),
        dict(_WAN_CALL),
        _WAN_LAYOUT,
        (r"^blocks\.\d+\.attn1$",),
        transformers=("transformer", "transformer_2"),
        perturb=_perturb_wan,
    )


def tiny_wan_vace() -> TinyPipeline:
    """Wan VACE (``WanVACEPipeline``): ``blocks.{i}.attn1`` and ``vace_blocks.{i}.attn1`` (control stream).

    Called without ``video``/``mask``: the pipeline conditions on an all-zero video and all-ones mask.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, WanVACEPipeline

    tok = _t5_tokenizer()
    enc = _t5_encoder(len(tok), 32, umt5=True)
    pipe = WanVACEPipeline(
        tokenizer=tok,
        text_encoder=enc,
        vae=_wan_vae(),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        transformer=_wan_transformer("WanVACETransformer3DModel", vace_layers=[0], vace_in_channels=96),
    )
    return TinyPipeline(
        "wan_vace",
        _finish(pipe),
        _wan_embeds_call(tok, enc),
        _WAN_LAYOUT,
        (r"^blocks\.\d+\.attn1$", r"^vace_blocks\.\d+\.attn1$"),
        perturb=_perturb_wan,
    )


def tiny_skyreels_v2() -> TinyPipeline:
    """SkyReels-V2 T2V (``SkyReelsV2Pipeline``): Wan-like, self-attn ``blocks.{i}.attn1``."""
    from diffusers import SkyReelsV2Pipeline, UniPCMultistepScheduler

    tok = _t5_tokenizer()
    enc = _t5_encoder(len(tok), 32, umt5=True)
    pipe = SkyReelsV2Pipeline(
        tokenizer=tok,
        text_encoder=enc,
        vae=_wan_vae(),
        scheduler=UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0
        ),
        transformer=_wan_transformer("SkyReelsV2Transformer3DModel"),
    )
    return TinyPipeline(
        "skyreels_v2",
        _finish(pipe),
        _wan_embeds_call(tok, enc),
        _WAN_LAYOUT,
        (r"^blocks\.\d+\.attn1$",),
        perturb=_perturb_wan,
    )


# ------------------------------------------------------------------------------------------ HunyuanVideo
def tiny_hunyuan_video() -> TinyPipeline:
    """HunyuanVideo: joint attention ``[video, text]`` (text after) in dual and single blocks.

    Text = ``max_sequence_length`` tokens (padded; the padding is masked through ``attn_mask``). The
    prompt template is replaced by ``"{}"`` (the real one is written for the real Llama tokenizer).
    Embedded guidance (``guidance_embeds=True``), no CFG: batch 1.
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import LlamaConfig, LlamaModel

    tok = _llama_tokenizer()
    torch.manual_seed(SEED)
    llama = LlamaModel(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=512,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).eval()
    tok2 = _clip_tokenizer()
    torch.manual_seed(SEED)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=32,
        pooled_projection_dim=32,
        rope_axes_dim=(4, 6, 6),
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=llama,
        tokenizer=tok,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=_clip_encoder(len(tok2), 32, with_projection=False),
        tokenizer_2=tok2,
    )
    kwargs = dict(
        prompt=PROMPT,
        prompt_template={"template": "{}", "crop_start": 0},
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=6.0,
        max_sequence_length=16,
        output_type="latent",
    )
    layout = TokenLayout.video(3, 4, 6, text_len=16, text_position="after")
    return TinyPipeline(
        "hunyuan_video",
        _finish(pipe),
        kwargs,
        layout,
        (r"^transformer_blocks\.\d+\.attn$", r"^single_transformer_blocks\.\d+\.attn$"),
        perturb=_perturb_bcfhw(lambda c: (c.patch_size_t, c.patch_size, c.patch_size)),
    )


# --------------------------------------------------------------------------------------------- CogVideoX
def tiny_cogvideox() -> TinyPipeline:
    """CogVideoX (5B-style, RoPE): joint attention ``[text, video]`` (text before), 226 -> 16 text tokens.

    ``hidden_states`` enter the transformer as ``[B, F, C, H, W]``; CFG on (batch 2).
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    tok = _t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=16,
        text_embed_dim=32,
        num_layers=2,
        sample_width=12,
        sample_height=8,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=16,
        use_rotary_positional_embeddings=True,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=tok,
        text_encoder=_t5_encoder(len(tok), 32),
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(),
    )
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=64,
        width=96,
        num_frames=9,
        num_inference_steps=2,
        guidance_scale=6.0,
        max_sequence_length=16,
        output_type="latent",
    )
    layout = TokenLayout.video(3, 4, 6, text_len=16, text_position="before")
    return TinyPipeline(
        "cogvideox",
        _finish(pipe),
        kwargs,
        layout,
        (r"^transformer_blocks\.\d+\.attn1$",),
        perturb=_perturb_bcfhw(
            lambda c: (c.patch_size_t or 1, c.patch_size, c.patch_size), frames_first=True
        ),
    )


# -------------------------------------------------------------------------------------------------- LTX
def tiny_ltx() -> TinyPipeline:
    """LTX-Video: self-attn ``transformer_blocks.{i}.attn1`` on packed tokens, text via cross-attn ``attn2``.

    The pipeline packs latents to ``[B, N, C]`` itself and passes the latent grid as
    ``num_frames/height/width`` kwargs (patch 1x1x1).
    """
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    tok = _t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        cross_attention_dim=32,
        num_layers=2,
        caption_channels=32,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(len(tok), 32),
        tokenizer=tok,
        transformer=transformer,
    )
    ts, ss = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
    frames, height, width = 2, 8, 16  # LTX needs pixel sizes % 32 == 0
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=height * ss,
        width=width * ss,
        num_frames=(frames - 1) * ts + 1,
        num_inference_steps=2,
        guidance_scale=3.0,
        max_sequence_length=16,
        output_type="latent",
    )
    layout = TokenLayout.video(frames, height, width)
    return TinyPipeline(
        "ltx", _finish(pipe), kwargs, layout, (r"^transformer_blocks\.\d+\.attn1$",), perturb=_perturb_ltx
    )


# ------------------------------------------------------------------------------------------------ Mochi
def tiny_mochi() -> TinyPipeline:
    """Mochi: joint attention ``[video, valid text]`` (text after), per-sample SDPA; CFG on (batch 2).

    The conditional prompt's valid text length is the token count of :data:`PROMPT` (+ ``</s>``); the
    negative prompt has another length, so the two CFG samples see different layouts.
    """
    from diffusers import (
        AutoencoderKLMochi,
        FlowMatchEulerDiscreteScheduler,
        MochiPipeline,
        MochiTransformer3DModel,
    )

    tok = _t5_tokenizer()
    torch.manual_seed(SEED)
    transformer = MochiTransformer3DModel(
        patch_size=2,
        num_attention_heads=HEADS,
        attention_head_dim=HEAD_DIM,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=12,
        out_channels=None,
        qk_norm="rms_norm",
        text_embed_dim=32,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLMochi(
        latent_channels=12,
        out_channels=3,
        encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32),
        layers_per_block=(1, 1, 1, 1, 1),
    )
    pipe = MochiPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_t5_encoder(len(tok), 32),
        tokenizer=tok,
        transformer=transformer,
    )
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=64,
        width=96,
        num_frames=13,
        num_inference_steps=2,
        guidance_scale=4.5,
        max_sequence_length=16,
        output_type="latent",
    )
    text_len = len(tok(PROMPT).input_ids)
    layout = TokenLayout.video(3, 4, 6, text_len=text_len, text_position="after")
    return TinyPipeline(
        "mochi",
        _finish(pipe),
        kwargs,
        layout,
        (r"^transformer_blocks\.\d+\.attn1$",),
        extra={"negative_text_len": len(tok(NEGATIVE).input_ids)},
        perturb=_perturb_bcfhw(lambda c: (1, c.patch_size, c.patch_size)),
    )


# ------------------------------------------------------------------------------------------------- Flux
def _sd_vae(latent_channels: int, blocks: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        block_out_channels=(4,) * blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )


def _flux_transformer(heads: int = HEADS):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(SEED)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=heads,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),
    )


def tiny_flux() -> TinyPipeline:
    """Flux (dev-style, guidance embeds): ``[text, image]`` (text before) in dual and single blocks.

    128x192 px -> 16x24 latent (8x) -> packed 2x2 -> 8x12 image tokens; 16 T5 text tokens.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tok, tok2 = _clip_tokenizer(), _t5_tokenizer()
    tok.model_max_length = 77
    transformer = _flux_transformer()
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_sd_vae(4),
        text_encoder=_clip_encoder(len(tok), 32, with_projection=False),
        tokenizer=tok,
        text_encoder_2=_t5_encoder(len(tok2), 32),
        tokenizer_2=tok2,
        transformer=transformer,
    )
    kwargs = dict(
        prompt=PROMPT,
        height=128,
        width=192,
        num_inference_steps=2,
        guidance_scale=3.5,
        max_sequence_length=16,
        output_type="latent",
    )
    layout = TokenLayout.image(8, 12, text_len=16, text_position="before")
    return TinyPipeline(
        "flux",
        _finish(pipe),
        kwargs,
        layout,
        (r"^transformer_blocks\.\d+\.attn$", r"^single_transformer_blocks\.\d+\.attn$"),
        perturb=_perturb_packed_2x2,
    )


# -------------------------------------------------------------------------------------------- QwenImage
def tiny_qwenimage() -> TinyPipeline:
    """QwenImage: ``[text, image]`` (text before); text encoder a tiny ``Qwen2_5_VLForConditionalGeneration``.

    64x96 px -> 16x24 latent (4x... the tiny VAE has 2 downsamples) -> packed 2x2 -> 8x12 image tokens.
    True CFG on (cond and uncond are separate transformer calls with different text lengths).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tok = _qwen_tokenizer()
    torch.manual_seed(SEED)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    vocab = len(tok)
    cfg = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            "rope_theta": 1000000.0,
        },
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": 16,
        },
        hidden_size=16,
        vocab_size=vocab,
        vision_start_token_id=vocab + 1,
        vision_end_token_id=vocab + 2,
        vision_token_id=vocab + 3,
        image_token_id=vocab + 4,
        video_token_id=vocab + 5,
    )
    torch.manual_seed(SEED)
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        transformer=transformer,
    )
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        true_cfg_scale=2.0,
        height=64,
        width=96,
        num_inference_steps=2,
        max_sequence_length=16,
        output_type="latent",
    )
    with torch.no_grad():
        emb, _ = pipe.encode_prompt(PROMPT, device="cpu", max_sequence_length=16)
    layout = TokenLayout.image(8, 12, text_len=emb.shape[1], text_position="before")
    return TinyPipeline(
        "qwenimage",
        _finish(pipe),
        kwargs,
        layout,
        (r"^transformer_blocks\.\d+\.attn$",),
        perturb=_perturb_packed_2x2,
    )


# -------------------------------------------------------------------------------------------------- SD3
def tiny_sd3() -> TinyPipeline:
    """SD3.5-style: joint ``attn`` ``[image, text]`` (text after: 77 CLIP + 16 T5) and image-only ``attn2``.

    128x192 px -> 16x24 latent -> patch 2 -> 8x12 image tokens; CFG on (batch 2).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2, tok3 = _clip_tokenizer(), _clip_tokenizer(), _t5_tokenizer()
    tok.model_max_length = tok2.model_max_length = 77
    torch.manual_seed(SEED)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=HEADS,
        caption_projection_dim=32,
        joint_attention_dim=64,
        pooled_projection_dim=64,
        out_channels=4,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_sd_vae(4),
        text_encoder=_clip_encoder(len(tok), 32, with_projection=True),
        tokenizer=tok,
        text_encoder_2=_clip_encoder(len(tok2), 32, with_projection=True),
        tokenizer_2=tok2,
        text_encoder_3=_t5_encoder(len(tok3), 64),
        tokenizer_3=tok3,
    )
    kwargs = dict(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        height=128,
        width=192,
        num_inference_steps=2,
        guidance_scale=5.0,
        max_sequence_length=16,
        output_type="latent",
    )
    layout = TokenLayout.image(8, 12, text_len=77 + 16, text_position="after")
    return TinyPipeline(
        "sd3",
        _finish(pipe),
        kwargs,
        layout,
        (r"^transformer_blocks\.\d+\.attn$", r"^transformer_blocks\.\d+\.attn2$"),
        extra={"image_only": (r"^transformer_blocks\.\d+\.attn2$",)},
        perturb=_perturb_bchw,
    )


# ------------------------------------------------------------------------------------ layout probing
def _perturb_bcfhw(patch: Callable[[Any], tuple[int, int, int]], frames_first: bool = False):
    """Perturber for ``[B, C, F, H, W]`` latents (``[B, F, C, H, W]`` when ``frames_first``)."""

    def perturb(tiny: TinyPipeline, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
        pt, ph, pw = patch(tiny.pipe.transformer.config)
        d = torch.zeros_like(x)
        sl = (slice(f * pt, (f + 1) * pt), slice(h * ph, (h + 1) * ph), slice(w * pw, (w + 1) * pw))
        if frames_first:
            d[:, sl[0], :, sl[1], sl[2]] = 1.0
        else:
            d[:, :, sl[0], sl[1], sl[2]] = 1.0
        return d

    return perturb


def _perturb_bchw(tiny: TinyPipeline, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    p = tiny.pipe.transformer.config.patch_size
    d = torch.zeros_like(x)
    d[:, :, h * p : (h + 1) * p, w * p : (w + 1) * p] = 1.0
    return d


def _perturb_packed_2x2(tiny: TinyPipeline, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """Flux / QwenImage: latents ``[B, C, 2H, 2W]`` packed 2x2 by the pipeline's ``_pack_latents``."""
    _, gh, gw = tiny.layout.grid
    b, n, c4 = x.shape
    c = c4 // 4
    lat = torch.zeros(b, c, 2 * gh, 2 * gw, dtype=x.dtype)
    lat[:, :, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2] = 1.0
    return tiny.pipe._pack_latents(lat, b, c, 2 * gh, 2 * gw).reshape(x.shape)


def _perturb_ltx(tiny: TinyPipeline, x: torch.Tensor, f: int, h: int, w: int) -> torch.Tensor:
    """LTX: latents ``[B, C, F*pt, H*p, W*p]`` packed by ``LTXPipeline._pack_latents``."""
    cfg = tiny.pipe.transformer.config
    p, pt = cfg.patch_size, cfg.patch_size_t
    gf, gh, gw = tiny.layout.grid
    b = x.shape[0]
    c = x.shape[2] // (p * p * pt)
    lat = torch.zeros(b, c, gf * pt, gh * p, gw * p, dtype=x.dtype)
    lat[:, :, f * pt : (f + 1) * pt, h * p : (h + 1) * p, w * p : (w + 1) * p] = 1.0
    return tiny.pipe._pack_latents(lat, p, pt)


def capture_transformer_call(tiny: TinyPipeline, component: str = "transformer") -> dict[str, Any]:
    """Run the pipeline once and return the keyword arguments of the first ``component(...)`` call
    (tensors cloned; positional arguments are bound to their names)."""
    from sparsediff.pipelines.base import bind_forward_inputs

    model = getattr(tiny.pipe, component)
    calls: list[dict[str, Any]] = []

    def hook(mod, args, kwargs):
        if not calls:
            inputs = bind_forward_inputs(mod, args, kwargs)
            calls.append({k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        tiny()
    finally:
        handle.remove()
    return calls[0]


def last_sample(inputs: dict[str, Any]) -> dict[str, Any]:
    """The call restricted to its last sample (the conditional branch of batched CFG)."""
    x = inputs["hidden_states"]
    b = x.shape[0]
    if b == 1:
        return dict(inputs)
    out = {}
    for k, v in inputs.items():
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == b:
            v = v[-1:]
        elif isinstance(v, list) and len(v) == b:
            v = v[-1:]
        out[k] = v
    return out


class _QCapture(TorchFunctionModeBase):
    """Records the ``query`` ([B, H, N, D]) of the first SDPA call made while ``armed``."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.q: torch.Tensor | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and self.armed and self.q is None:
            self.q = (args[0] if args else kwargs["query"]).detach().clone()
        return func(*args, **kwargs)


def first_attention_query(model: torch.nn.Module, module_name: str, inputs: dict[str, Any]) -> torch.Tensor:
    """``query`` ``[B, H, N, D]`` of the first SDPA call inside ``model.<module_name>`` during
    ``model(**inputs)`` -- with diffusers' native backend, the q every processor hands to attention."""
    mod = model.get_submodule(module_name)
    cap = _QCapture()
    h1 = mod.register_forward_pre_hook(lambda *a: setattr(cap, "armed", True))
    h2 = mod.register_forward_hook(lambda *a: setattr(cap, "armed", False))
    try:
        with torch.no_grad(), cap:
            model(**inputs)
    finally:
        h1.remove()
        h2.remove()
    if cap.q is None:
        raise RuntimeError(f"{module_name} made no scaled_dot_product_attention call")
    return cap.q


def probe_token_order(
    tiny: TinyPipeline,
    positions: list[tuple[int, int, int]],
    *,
    component: str = "transformer",
    module_name: str | None = None,
    inputs: dict[str, Any] | None = None,
) -> tuple[int, list[list[int]]]:
    """Plant a signal on the latent patch of each grid token ``(f, h, w)`` and see where it lands.

    Before the first attention every token is computed from its own patch only (patch embedding,
    norms, modulation, RoPE are per token), so perturbing one patch changes exactly one row of the
    first self-attention layer's ``query``. Returns ``(N, changed)``: the sequence length the attention
    saw and, per position, the sorted token indices whose query changed (for the last -- conditional --
    sample of the call).
    """
    model = getattr(tiny.pipe, component)
    if module_name is None:
        import re

        regs = [re.compile(p) for p in tiny.self_attn]
        module_name = next(n for n, _ in model.named_modules() if any(r.fullmatch(n) for r in regs))
    inputs = last_sample(inputs if inputs is not None else capture_transformer_call(tiny, component))
    inputs["return_dict"] = False
    q0 = first_attention_query(model, module_name, inputs)
    changed = []
    for f, h, w in positions:
        x = inputs["hidden_states"]
        pert = dict(inputs, hidden_states=x + tiny.perturb(tiny, x, f, h, w))
        q1 = first_attention_query(model, module_name, pert)
        diff = (q1 - q0).abs().amax(dim=(0, 1, 3))  # per token
        tol = 1e-6 * float(q0.abs().max())
        changed.append(torch.nonzero(diff > tol).flatten().tolist())
    return q0.shape[2], changed


def expected_token(layout: TokenLayout, f: int, h: int, w: int) -> int:
    """Index in the sequence of grid token ``(f, h, w)`` under ``layout`` (frame-major grid)."""
    _, gh, gw = layout.grid
    return layout.grid_offset + f * gh * gw + h * gw + w


def corner_positions(layout: TokenLayout) -> list[tuple[int, int, int]]:
    """A few grid positions that pin down F, H, W and their order: origin, last frame / row / column,
    an interior point and the far corner."""
    gf, gh, gw = layout.grid
    pts = [
        (0, 0, 0),
        (gf - 1, 0, 0),
        (0, gh - 1, 0),
        (0, 0, gw - 1),
        (gf // 2, gh // 2, gw // 2 + 1 if gw > 2 else 0),
    ]
    pts.append((gf - 1, gh - 1, gw - 1))
    return list(dict.fromkeys(pts))


FACTORIES: dict[str, Callable[[], TinyPipeline]] = {
    "wan": tiny_wan,
    "wan22": tiny_wan22,
    "wan_vace": tiny_wan_vace,
    "skyreels_v2": tiny_skyreels_v2,
    "hunyuan_video": tiny_hunyuan_video,
    "cogvideox": tiny_cogvideox,
    "ltx": tiny_ltx,
    "mochi": tiny_mochi,
    "flux": tiny_flux,
    "qwenimage": tiny_qwenimage,
    "sd3": tiny_sd3,
}


def build(name: str) -> TinyPipeline:
    """Build the tiny pipeline ``name`` (a key of :data:`FACTORIES`)."""
    return FACTORIES[name]()
