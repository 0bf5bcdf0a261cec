"""Causal text transformer (CLIP's text encoder)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .transformer import LayerNorm, Transformer


class TextTransformer(nn.Module):
    """Token + positional embedding -> causal transformer -> ``ln_final`` -> features at the
    EOT token (the position of the largest token id, as OpenAI; with ``eos_id`` the first
    position of that id, as open_clip's ``pool_type="eos"``) -> ``@ text_projection``.

    Input LongTensor ``[B, context_length]`` (shorter sequences are accepted), output
    ``[B, output_dim]`` in the weights' dtype. Attribute names are OpenAI's top-level text keys,
    which is why ``CLIP`` inherits from this class instead of holding it as a submodule.
    """

    def __init__(self, context_length: int, vocab_size: int, width: int, heads: int, layers: int, output_dim: int,
                 quick_gelu: bool = True, mlp_width: Optional[int] = None, eos_id: Optional[int] = None):
        super().__init__()
        self.context_length, self.vocab_size, self.eos_id = context_length, vocab_size, eos_id
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = Transformer(width, layers, heads, causal=True, quick_gelu=quick_gelu, mlp_width=mlp_width)
        self.ln_final = LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, output_dim))

    def init_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.transformer.width ** -0.5)
        self.transformer.init_weights()

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """Features ``[B, output_dim]`` of token ids ``text`` ``[B, L <= context_length]`` (any
        integer dtype). Ids outside ``[0, vocab_size)`` are a ValueError in eager mode on the
        CPU; under ``torch.compile`` (a data-dependent check would break the graph) and on a GPU
        (a device sync per call) the embedding's own error reports them."""
        if (not isinstance(text, torch.Tensor) or text.dim() != 2 or text.is_floating_point() or text.is_complex()
                or text.dtype == torch.bool or text.shape[1] == 0):
            what = (f"a {text.dim()}-D {text.dtype} tensor of shape {tuple(text.shape)}"
                    if isinstance(text, torch.Tensor) else type(text).__name__)
            raise ValueError(f"text: expected integer token ids [B, L >= 1] (fastclip.tokenize), got {what}")
        if text.dtype not in (torch.int32, torch.int64):
            text = text.long()
        if text.shape[1] > self.context_length:
            raise ValueError(f"text: {text.shape[1]} tokens per row, more than the model's context_length "
                             f"{self.context_length} (tokenize with context_length={self.context_length})")
        if text.device.type == "cpu" and text.numel() and not torch.compiler.is_compiling():
            # On the CPU the range check costs no device sync (on a GPU an id out of range is
            # a device-side assert instead); the embedding's own error names no argument.
            lo, hi = int(text.min()), int(text.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"text: token ids from {lo} to {hi}, outside the model's vocabulary "
                                 f"[0, {self.vocab_size}) (fastclip.tokenize gives ids up to 49407, "
                                 f"CLIP's vocabulary of 49408)")
        L = text.shape[1]
        pos = self.positional_embedding[:L].to(self.token_embedding.weight.dtype)  # [L, W]
        x = self.token_embedding(text) + pos                                      # [B, L, W]
        x = self.ln_final(self.transformer(x))
        # [B] positions: the largest id (CLIP's end-of-text is its vocabulary's last id), or the
        # first eos_id (argmax of the int mask: the first maximum; 0 in a row without it)
        at = text.argmax(dim=-1) if self.eos_id is None else (text == self.eos_id).int().argmax(dim=-1)
        x = x[torch.arange(x.shape[0], device=x.device), at]  # [B, W] at EOT
        return x @ self.text_projection

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return self.encode_text(text)
