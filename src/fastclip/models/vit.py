"""Vision Transformer image encoder (CLIP's ViT variant: ln_pre, class token, ln_post + proj)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .transformer import LayerNorm, Transformer, check_images


class VisionTransformer(nn.Module):
    """Patchify with a stride-``patch_size`` conv, prepend a class token, add positional
    embeddings, ``ln_pre`` -> transformer -> ``ln_post`` on the class token -> ``@ proj``.

    Input ``[B, 3, image_size, image_size]`` (any float dtype; cast to the weights' dtype),
    output ``[B, output_dim]``.
    """

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int,
                 quick_gelu: bool = True, mlp_width: Optional[int] = None):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} must divide image_size={image_size}")
        self.input_resolution, self.patch_size, self.output_dim = image_size, patch_size, output_dim
        self.grid = image_size // patch_size
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu=quick_gelu, mlp_width=mlp_width)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def reset_embeddings(self) -> None:
        """Re-draw the class token, positional embedding and projection as the constructor does
        (normal, std width^-0.5)."""
        scale = self.class_embedding.shape[0] ** -0.5
        for p in (self.class_embedding, self.positional_embedding, self.proj):
            nn.init.normal_(p, std=scale)

    def init_weights(self) -> None:
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.input_resolution)
        x = self.conv1(x.to(self.conv1.weight.dtype))  # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)  # [B, g*g, W]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, W]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, g*g+1, W]
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0, :]) @ self.proj  # [B, output_dim]
