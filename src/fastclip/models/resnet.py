"""CLIP's ModifiedResNet image encoder.

Differences from torchvision's ResNet (as described in the CLIP paper): a 3-conv stem with an
average pool instead of a max pool, anti-aliased strided convolutions (an ``AvgPool2d(stride)``
before the last 1x1 conv of a strided Bottleneck and in its downsample branch), and an
attention-pooling head (``AttentionPool2d``: one multi-head attention query = the mean token).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .transformer import check_images


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1, self.relu1 = nn.BatchNorm2d(planes), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(planes), nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3, self.relu3 = nn.BatchNorm2d(planes * self.expansion), nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * self.expansion, 1, stride=1, bias=False)),
                ("1", nn.BatchNorm2d(planes * self.expansion))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """Attention pooling: tokens = [mean, h*w positions] + positional embedding; the mean token
    is the single query. ``[B, C, H, W] -> [B, output_dim]``."""

    def __init__(self, spacial_dim: int, embed_dim: int, num_heads: int, output_dim: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"the attention pool's {num_heads} heads must divide its width {embed_dim} "
                             f"(vision_width x 32); set vision_heads to a divisor of {embed_dim}")
        self.positional_embedding = nn.Parameter(torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj, self.q_proj, self.v_proj = (nn.Linear(embed_dim, embed_dim) for _ in range(3))
        self.c_proj = nn.Linear(embed_dim, output_dim or embed_dim)
        self.num_heads = num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, HW+1, C]
        h = self.num_heads
        q = self.q_proj(x[:, :1]).view(B, 1, h, C // h).transpose(1, 2)  # [B, h, 1, C/h]
        k = self.k_proj(x).view(B, H * W + 1, h, C // h).transpose(1, 2)  # [B, h, HW+1, C/h]
        v = self.v_proj(x).view(B, H * W + 1, h, C // h).transpose(1, 2)  # [B, h, HW+1, C/h]
        out = F.scaled_dot_product_attention(q, k, v).reshape(B, C)  # [B, h, 1, C/h] -> [B, C]
        return self.c_proj(out)


class ModifiedResNet(nn.Module):
    """CLIP ResNet. ``layers``: blocks per stage (4 ints); ``width``: stem width (64 for RN50).
    Input ``[B, 3, R, R]`` with R divisible by 32, output ``[B, output_dim]``."""

    def __init__(self, layers: Sequence[int], output_dim: int, heads: int, image_size: int = 224, width: int = 64):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"layers must have 4 entries, got {tuple(layers)}")
        if image_size % 32:
            raise ValueError(f"image_size={image_size} must be divisible by 32 for a ResNet")
        self.output_dim, self.input_resolution = output_dim, image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1, self.relu1 = nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2, self.relu2 = nn.BatchNorm2d(width // 2), nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3, self.relu3 = nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def reset_embeddings(self) -> None:
        """Re-draw the attention pool's positional embedding as its constructor does (normal,
        std embed_dim^-0.5)."""
        pe = self.attnpool.positional_embedding
        nn.init.normal_(pe, std=pe.shape[1] ** -0.5)

    def init_weights(self) -> None:
        """OpenAI's init: attnpool projections std in_features^-0.5, zero-init every bn3 gamma."""
        std = self.attnpool.c_proj.in_features ** -0.5
        for lin in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(lin.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                nn.init.zeros_(blk.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.input_resolution)
        if x.shape[0] == 1 and self.input_resolution // 32 <= 1 and any(
                m.training for m in self.layer4.modules() if isinstance(m, nn.BatchNorm2d)):
            # The last stage is 1x1 here: its BatchNorm sees one value per channel in a batch of
            # one, and torch's error ("Expected more than 1 value per channel") named no input.
            # Its BatchNorm layers' own mode decides: frozen ones (eval mode inside a training
            # model, as when fine-tuning) take a batch of one.
            raise ValueError(f"images: a batch of 1 in train mode, where this ResNet's BatchNorm "
                             f"needs at least 2 at image_size {self.input_resolution} (its last "
                             f"stage is 1x1); call model.eval() to encode one image")
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # [B, width, R/4, R/4]
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # [B, width*32, R/32, R/32]
        return self.attnpool(x)
