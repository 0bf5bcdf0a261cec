"""SigLIP's pairwise sigmoid loss (Zhai et al., 2023; docs/design.md §1).

    z_ij = s * <x̂_i, ŷ_j> + b,      l_ij = +1 if j is i's positive else -1
    phi_ij = softplus(-l_ij * z_ij)   (= -log sigmoid(l_ij z_ij))
    row_i = Σ_j phi_ij,   col_j = Σ_i phi_ij,   pos_i = z_ii
    loss  = 1/N * Σ_i row_i

Epilogue: softplus of the labelled logit, summed along rows and columns; statistics merge by
addition. ``d phi_ij / d z_ij = -l_ij * sigmoid(-l_ij z_ij)`` reads no statistic and the head
is a plain sum, so a tile's gradient is known as soon as its logits are: loss and gradients
in one pass over the tiles (three products, 6·N²·D FLOP instead of 8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import LinearHead, LossSpec, register_loss


def _signed(z: Tensor, is_pos: Tensor) -> Tensor:
    """t = -l * z: the argument of softplus (positives: -z, negatives: z)."""
    return torch.where(is_pos, -z, z)


def _ref_stats(z: Tensor, is_pos: Tensor) -> tuple[Tensor, Tensor]:
    # softplus(t) = -logsigmoid(-t): exact at any |t| (F.softplus returns t itself past
    # t = 20, an error of exp(-20) per term that a float64 oracle must not have).
    phi = -F.logsigmoid(-_signed(z, is_pos))
    return phi.sum(dim=1, dtype=torch.float64), phi.sum(dim=0, dtype=torch.float64)


def _ref_dz(z: Tensor, is_pos: Tensor, row: Tensor, col: Tensor, grad_row: Tensor,
            grad_col: Tensor) -> Tensor:
    t = _signed(z, is_pos)
    dphi = torch.where(is_pos, -torch.sigmoid(t), torch.sigmoid(t))      # d phi / d z
    return (grad_row[:, None] + grad_col[None, :]).to(z.dtype) * dphi


def siglip_loss_naive(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                      normalize: bool = False) -> Tensor:
    """open_clip's ``SigLipLoss`` at world size 1, written out:
    ``-sum(logsigmoid(labels * (s·X̂Ŷᵀ + b))) / N`` with labels +1 on the diagonal, -1 off it.

    Shapes: [N, D], [N, D]; computes in the inputs' dtype (use float64 for an oracle).
    """
    x, y = image_features, text_features
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = logit_scale * x @ y.T + logit_bias                        # [N, N]
    n = x.shape[0]
    labels = 2 * torch.eye(n, dtype=logits.dtype, device=x.device) - 1
    return -F.logsigmoid(labels * logits).sum() / n


SIGLIP = register_loss(LossSpec(
    name="siglip",
    code=1,
    params=("logit_scale", "logit_bias"),
    init=(10.0, -10.0),                       # SigLIP: t = 10, b = -10
    merge="sum",
    one_pass=True,
    head=LinearHead(1.0, 0.0, 0.0),          # Σ_i row_i
    denominator=lambda n: n,
    ref_stats=_ref_stats,
    ref_dz=_ref_dz,
    naive=siglip_loss_naive,
))
