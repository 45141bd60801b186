"""``EmbeddedWanTransformer3DModel``: diffusers' ``WanTransformer3DModel`` plus pooled-text adaLN conditioning.

Wan conditions on text through cross-attention only; its adaptive layer norms (the ``scale_shift_table``
modulation of every block and of the output norm) see the timestep alone. With ``pooled_text=True`` the
timestep embedding also receives a projection of the mean of the text embeddings (``pooled_proj``, zero at
init: the model then computes exactly what a plain Wan transformer with the same weights computes), the way
DiT conditions on class labels: every block's shift/scale/gate then depends on the caption.

Why (measured on the CPU runs 5-9 of the embedded model, see ``sparsediff/embedded/README.md``): through
cross-attention the caption only *adds* to the residual stream, and which way a prompted object goes is an
interaction of the caption with time and position (where a "right" clip is at its first frame is where a
"left" clip is at its last). The model learned the direction's axis but not its sign; adaLN's scales are a
product of the caption with every feature, the interaction in one step.

Everything else -- attention processors, blocks, RoPE, the forward signature -- is the parent's, so
sparsediff's Wan adapter (matched on the class hierarchy) applies unchanged.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin, WanTransformer3DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.transformers.transformer_wan import WanTimeTextImageEmbedding
from torch import nn

__all__ = ["EmbeddedWanTransformer3DModel", "PooledTextTimeEmbedding"]

# diffusers' pipeline loader finds a custom component's base class by name in the component's module
# (``ModelMixin`` here) to pick its ``from_pretrained``.
_LOADABLE_BASE = ModelMixin


class PooledTextTimeEmbedding(WanTimeTextImageEmbedding):
    """Wan's condition embedder with ``temb += pooled_proj(mean_L(text))`` before the adaLN projection."""

    def __init__(
        self, dim: int, time_freq_dim: int, time_proj_dim: int, text_embed_dim: int, **kwargs
    ) -> None:
        super().__init__(dim, time_freq_dim, time_proj_dim, text_embed_dim, **kwargs)
        self.pooled_proj = nn.Linear(text_embed_dim, dim)
        nn.init.zeros_(self.pooled_proj.weight)
        nn.init.zeros_(self.pooled_proj.bias)

    def forward(
        self,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        timestep_seq_len: int | None = None,
    ):
        pooled = self.pooled_proj(encoder_hidden_states.mean(1))  # [B, dim] (padding rows are zero)
        timestep = self.timesteps_proj(timestep)
        if timestep_seq_len is not None:
            timestep = timestep.unflatten(0, (-1, timestep_seq_len))
        dtype = next(iter(self.time_embedder.parameters())).dtype
        if timestep.dtype != dtype and dtype != torch.int8:
            timestep = timestep.to(dtype)
        temb = self.time_embedder(timestep).type_as(encoder_hidden_states)
        temb = temb + (pooled[:, None] if temb.ndim == 3 else pooled).to(temb.dtype)
        timestep_proj = self.time_proj(self.act_fn(temb))
        encoder_hidden_states = self.text_embedder(encoder_hidden_states)
        if encoder_hidden_states_image is not None:
            encoder_hidden_states_image = self.image_embedder(encoder_hidden_states_image)
        return temb, timestep_proj, encoder_hidden_states, encoder_hidden_states_image


class EmbeddedWanTransformer3DModel(WanTransformer3DModel):
    """``WanTransformer3DModel`` with optional pooled-text adaLN conditioning (``pooled_text``)."""

    @register_to_config
    def __init__(
        self,
        patch_size: tuple[int, ...] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        image_dim: int | None = None,
        added_kv_proj_dim: int | None = None,
        rope_max_seq_len: int = 1024,
        pos_embed_seq_len: int | None = None,
        pooled_text: bool = False,
    ) -> None:
        super().__init__(
            patch_size=patch_size,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
            in_channels=in_channels,
            out_channels=out_channels,
            text_dim=text_dim,
            freq_dim=freq_dim,
            ffn_dim=ffn_dim,
            num_layers=num_layers,
            cross_attn_norm=cross_attn_norm,
            qk_norm=qk_norm,
            eps=eps,
            image_dim=image_dim,
            added_kv_proj_dim=added_kv_proj_dim,
            rope_max_seq_len=rope_max_seq_len,
            pos_embed_seq_len=pos_embed_seq_len,
        )
        if pooled_text:
            inner = num_attention_heads * attention_head_dim
            self.condition_embedder = PooledTextTimeEmbedding(
                inner,
                freq_dim,
                inner * 6,
                text_dim,
                image_embed_dim=image_dim,
                pos_embed_seq_len=pos_embed_seq_len,
            )
