"""CLIP's symmetric softmax cross-entropy (docs/design.md §1).

    z_ij = s * <x̂_i, ŷ_j>                      (no bias: a softmax is shift-invariant)
    row_i = logsumexp_j z_ij,   col_j = logsumexp_i z_ij,   pos_i = z_ii
    loss  = 1/(2N) * Σ_i (row_i - pos_i) + (col_i - pos_i)

Epilogue: the online log-sum-exp of every row and column of a tile; statistics (float64)
merge by ``logaddexp``. Derivative of the statistics: ``d row_i / d z_ij = exp(z_ij - row_i)``
(and likewise for columns), which reads the merged statistics: two passes (forward, then a
backward that recomputes the tiles).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import LinearHead, LossSpec, register_loss


def _lse(z: Tensor, dim: int) -> Tensor:
    """logsumexp along ``dim`` as max + log(sum exp(z - max)), the max exact in z's dtype and
    the result in float64: at |z| = 1e4 an fp32 log-sum-exp is off by up to half an ulp,
    5e-4, and every exp(z - lse) of the backward would carry that error."""
    m = z.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)       # all -inf / +inf rows
    s = torch.exp(z - m).sum(dim=dim)
    return m.squeeze(dim).double() + torch.log(s.double())


def _exp_minus(z: Tensor, stat: Tensor) -> Tensor:
    """exp(z - stat) with a float64 ``stat`` and z in its own dtype: stat = hi + lo, both in
    z's dtype, and (z - hi) is exact where the result is not negligible (Sterbenz)."""
    hi = stat.to(z.dtype)
    lo = (stat - hi.double()).to(z.dtype)
    return torch.exp((z - hi) - lo)


def _ref_stats(z: Tensor, is_pos: Tensor) -> tuple[Tensor, Tensor]:
    return _lse(z, 1), _lse(z, 0)


def _ref_dz(z: Tensor, is_pos: Tensor, row: Tensor, col: Tensor, grad_row: Tensor,
            grad_col: Tensor) -> Tensor:
    return (grad_row[:, None].to(z.dtype) * _exp_minus(z, row[:, None])
            + grad_col[None, :].to(z.dtype) * _exp_minus(z, col[None, :]))


def clip_loss_naive(image_features: Tensor, text_features: Tensor, logit_scale,
                    normalize: bool = False) -> Tensor:
    """open_clip's formula: ``(CE(s·X̂Ŷᵀ, arange) + CE(s·ŶX̂ᵀ, arange)) / 2``.

    Shapes: [N, D], [N, D]; computes in the inputs' dtype (use float64 for an oracle).
    """
    x, y = image_features, text_features
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = logit_scale * x @ y.T                                   # [N, N]
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


CLIP = register_loss(LossSpec(
    name="clip",
    code=0,
    params=("logit_scale",),
    init=(1 / 0.07,),                         # CLIP: temperature 0.07
    merge="lse",
    one_pass=False,
    head=LinearHead(1.0, 1.0, -2.0),         # Σ_i (row_i - pos_i) + (col_i - pos_i)
    denominator=lambda n: 2 * n,
    ref_stats=_ref_stats,
    ref_dz=_ref_dz,
    naive=clip_loss_naive,
))
