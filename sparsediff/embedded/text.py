"""Word-level tokenizer over the closed caption vocabulary, and a tiny trainable text encoder.

* :class:`CaptionTokenizer` -- lower-cases, splits on whitespace, maps each word to its id (unknown words to
  ``<unk>``), prepends ``<bos>`` and pads/truncates to ``max_length``. Plain Python, no ``transformers``
  dependency; saves/loads a JSON vocabulary (``tokenizer_config.json``) with ``save_pretrained`` /
  ``from_pretrained``. diffusers' pipeline loader only knows diffusers/transformers base classes, so
  :class:`~sparsediff.embedded.pipeline.EmbeddedVideoPipeline` saves and loads this component itself.
* :class:`CaptionTextEncoder` -- token + learned position embeddings and a few pre-norm transformer encoder
  layers (``diffusers`` ``ModelMixin, ConfigMixin``: ``save_pretrained`` / ``from_pretrained`` as any diffusers
  model). Output ``[B, L, hidden_size]`` with padded positions zeroed, as Wan's pipeline does with UMT5.

The empty prompt (CFG's unconditional branch, caption dropout in training) is ``<bos>`` alone, so an
encoder row always has at least one valid token.
"""

from __future__ import annotations

import json
import logging
import os

import torch
import torch.nn as nn
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from .data import CAPTION_WORDS

__all__ = ["CaptionTokenizer", "CaptionTextEncoder", "SPECIAL_TOKENS"]

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>")
TOKENIZER_CONFIG = "tokenizer_config.json"


class CaptionTokenizer:
    """Word-level tokenizer (ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, then the words).

    Args:
        vocab: the words after the special tokens (default: every word the dataset's captions use).
        max_length: sequence length of :meth:`__call__` including ``<bos>`` (default 12; captions have at most
            7 tokens).
    """

    def __init__(self, vocab: list[str] | tuple[str, ...] | None = None, max_length: int = 12) -> None:
        words = list(CAPTION_WORDS if vocab is None else vocab)
        if len(set(words)) != len(words) or any(
            w in SPECIAL_TOKENS or w != w.lower() or " " in w for w in words
        ):
            raise ValueError(
                "vocab must be unique lower-case words without spaces and without special tokens"
            )
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (<bos> + one word), got {max_length}")
        self.words = words
        self.max_length = int(max_length)
        self.id_to_token = list(SPECIAL_TOKENS) + words
        self.token_to_id = {t: i for i, t in enumerate(self.id_to_token)}
        self.pad_token_id, self.unk_token_id, self.bos_token_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"CaptionTokenizer(vocab_size={self.vocab_size}, max_length={self.max_length})"

    def encode(self, text: str) -> list[int]:
        """Ids of ``<bos>`` + the words of ``text`` (no padding, no truncation)."""
        return [self.bos_token_id] + [
            self.token_to_id.get(w, self.unk_token_id) for w in text.lower().split()
        ]

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Words of ``ids`` joined by spaces, special tokens dropped (``<unk>`` kept)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        toks = [self.id_to_token[i] for i in ids]
        return " ".join(t for t in toks if t not in ("<pad>", "<bos>"))

    def __call__(self, text: str | list[str], max_length: int | None = None) -> dict[str, torch.Tensor]:
        """Tokenize to ``{"input_ids": [B, L] int64, "attention_mask": [B, L] int64}``, ``L = max_length``.

        Longer texts are truncated (logged once per call).
        """
        texts = [text] if isinstance(text, str) else list(text)
        L = self.max_length if max_length is None else int(max_length)
        ids = torch.full((len(texts), L), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), L), dtype=torch.long)
        truncated = 0
        for i, t in enumerate(texts):
            seq = self.encode(t)
            truncated += len(seq) > L
            seq = seq[:L]
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        if truncated:
            logger.warning("CaptionTokenizer: %d text(s) truncated to %d tokens", truncated, L)
        return {"input_ids": ids, "attention_mask": mask}

    def save_pretrained(self, save_directory: str | os.PathLike, **_: object) -> None:
        """Write ``tokenizer_config.json`` (class name, words, max_length) into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        cfg = {"tokenizer_class": type(self).__name__, "vocab": self.words, "max_length": self.max_length}
        with open(os.path.join(save_directory, TOKENIZER_CONFIG), "w") as f:
            json.dump(cfg, f, indent=1)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, subfolder: str | None = None) -> CaptionTokenizer:
        """Load from a folder written by :meth:`save_pretrained` (local only)."""
        path = os.path.join(directory, subfolder or "", TOKENIZER_CONFIG)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no {TOKENIZER_CONFIG} at {path}")
        with open(path) as f:
            cfg = json.load(f)
        if cfg.get("tokenizer_class", cls.__name__) != cls.__name__:
            raise ValueError(f"{path} holds a {cfg['tokenizer_class']}, not a {cls.__name__}")
        return cls(cfg["vocab"], cfg["max_length"])


class CaptionTextEncoder(ModelMixin, ConfigMixin):
    """Tiny transformer text encoder, trained jointly with the video transformer.

    Args:
        vocab_size: tokenizer vocabulary size. max_length: longest sequence (position embeddings).
        hidden_size: output width (the video transformer's ``text_dim``). num_layers, num_heads, ffn_dim:
            pre-norm ``nn.TransformerEncoderLayer`` stack (GELU, no dropout).
        token_code_scale: weight of a fixed orthogonal code per word added to the output (0 = none). With
            ``vocab_size <= hidden_size`` every word's code is orthogonal to every other's, so no two words
            can collapse to the same output.
        token_code_bag: also add the sum of the caption's word codes (a bag of words) at every position, so
            a video token gets every word of the caption from whichever text token it attends to. Measured
            reason: with per-word codes alone the transformer kept attending the colour word and its output
            changed by ~0.1 % between "left" and "right" after 600 more steps.

    ``forward(input_ids [B, L], attention_mask [B, L] | None) -> [B, L, hidden_size]``; positions where the
    mask is 0 are zero in the output.
    """

    @register_to_config
    def __init__(
        self,
        vocab_size: int = len(SPECIAL_TOKENS) + len(CAPTION_WORDS),
        max_length: int = 12,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_dim: int = 128,
        token_code_scale: float = 0.0,
        token_code_bag: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= token_code_scale:
            raise ValueError(f"token_code_scale must be >= 0, got {token_code_scale}")
        # Fixed, orthogonal per-word codes added to the output (not trained, not saved: rebuilt from a fixed
        # seed). They keep every word distinguishable in the output whatever training does to the learned
        # part: in the first CPU run the learned encoder collapsed the four direction words to within 0.4 %
        # (relative L2) of each other, so the transformer could not have used them.
        n_code = min(vocab_size, hidden_size)
        g = torch.Generator().manual_seed(1234)
        basis, _ = torch.linalg.qr(torch.randn(hidden_size, n_code, generator=g))  # orthonormal columns
        code = torch.zeros(vocab_size, hidden_size)
        code[:n_code] = basis.T * (hidden_size**0.5) * token_code_scale  # unit RMS per element at scale 1
        self.register_buffer("token_code", code, persistent=False)
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Parameter(torch.randn(1, max_length, hidden_size) * 0.02)
        self.layers = nn.ModuleList(
            [
                nn.TransformerEncoderLayer(
                    hidden_size,
                    num_heads,
                    ffn_dim,
                    dropout=0.0,
                    activation="gelu",
                    batch_first=True,
                    norm_first=True,
                )
                for _ in range(num_layers)
            ]
        )
        self.final_norm = nn.LayerNorm(hidden_size)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        L = input_ids.shape[1]
        if L > self.config.max_length:
            raise ValueError(f"sequence length {L} > max_length {self.config.max_length}")
        x = self.token_embedding(input_ids) + self.position_embedding[:, :L].to(
            self.token_embedding.weight.dtype
        )
        pad = None if attention_mask is None else attention_mask == 0
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=pad)
        x = self.final_norm(x)
        if self.config.token_code_scale:
            code = self.token_code[input_ids].to(x.dtype)  # [B, L, hidden]
            x = x + code
            if self.config.token_code_bag:
                # every position also carries the caption's bag of words (sum of its words' codes): whichever
                # text token a video token attends to, every word of the caption reaches it
                valid = (input_ids != 0).to(x.dtype) if attention_mask is None else attention_mask.to(x.dtype)
                x = x + (code * valid[..., None]).sum(1, keepdim=True)
        if attention_mask is not None:
            x = x * attention_mask[..., None].to(x.dtype)
        return x
