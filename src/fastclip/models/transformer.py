"""Shared transformer building blocks for the CLIP encoders.

Parameter names follow OpenAI's CLIP release (``attn.in_proj_weight``, ``attn.out_proj``,
``ln_1``, ``mlp.c_fc``, ``mlp.c_proj``, ``ln_2``, ``resblocks.N``) so OpenAI state dicts load
with ``strict=True``. Activations are batch-first ``[B, L, D]`` (OpenAI uses ``[L, B, D]``;
the weights do not depend on the layout).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def check_images(x: torch.Tensor, size: int) -> None:
    """A tower's input: ``[B, 3, size, size]``, floating point. Another size would fail later with
    a shape error inside the tower, or, for sizes a little off, run on cropped or zero-padded
    positions and give features of a different model."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3 or x.shape[2] != size or x.shape[3] != size:
        what = f"shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"images: expected [B, 3, {size}, {size}] (the model's image_size), got {what}")
    if not x.is_floating_point():
        # uint8 pixels (0..255) used to be cast and encoded as they were: features of images
        # the model never saw (it wants them scaled and normalised).
        raise ValueError(f"images: expected floating-point pixels, scaled and normalised as "
                         f"fastclip.transforms.image_transform gives them, got {x.dtype}")

class LayerNorm(nn.LayerNorm):
    """LayerNorm that always computes in fp32 and casts back to the input dtype (as OpenAI)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the GELU approximation the OpenAI weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a packed ``in_proj`` (nn.MultiheadAttention's key names),
    computed with ``F.scaled_dot_product_attention``. ``causal=True`` masks future positions."""

    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads={heads} must divide width={width}")
        self.heads, self.causal = heads, causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        qkv = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, L, D/H]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)  # [B, H, L, D/H]
        out = out.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` with an MLP of hidden
    width ``mlp_width`` (default 4 x width, OpenAI's) whose activation is QuickGELU
    (``quick_gelu=True``, OpenAI's) or the exact GELU (open_clip's models without
    ``-quickgelu`` in their name, the LAION weights among them)."""

    def __init__(self, width: int, heads: int, causal: bool = False, quick_gelu: bool = True,
                 mlp_width: Optional[int] = None):
        super().__init__()
        self.attn = SelfAttention(width, heads, causal)
        self.ln_1 = LayerNorm(width)
        act = QuickGELU() if quick_gelu else nn.GELU()
        hidden = mlp_width if mlp_width is not None else width * 4
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", act), ("c_proj", nn.Linear(hidden, width))]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """Stack of ``layers`` residual attention blocks on ``[B, L, width]`` inputs.

    ``grad_checkpointing`` (set through ``CLIP.set_grad_checkpointing``) recomputes each block in
    the backward pass (``torch.utils.checkpoint``, non-reentrant) to save activation memory.
    """

    def __init__(self, width: int, layers: int, heads: int, causal: bool = False, quick_gelu: bool = True,
                 mlp_width: Optional[int] = None):
        super().__init__()
        self.width, self.layers, self.heads = width, layers, heads
        self.grad_checkpointing = False
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal, quick_gelu, mlp_width)
                                         for _ in range(layers)])

    def init_weights(self) -> None:
        """OpenAI's init: attention std width^-0.5, projections std width^-0.5 (2 layers)^-0.5."""
        attn_std = self.width ** -0.5
        proj_std = self.width ** -0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for blk in self.resblocks:
            nn.init.normal_(blk.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(blk.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(blk.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(blk.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(blk.attn.in_proj_bias)
            nn.init.zeros_(blk.attn.out_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return x
