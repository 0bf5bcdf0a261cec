"""Pure-PyTorch contrastive loss: the oracle of every test and the last fallback.

Two forms live here:

* :func:`clip_loss_naive` is the textbook formula (open_clip's ``ClipLoss``):
  materialise the N×M logits, two cross-entropies. Differentiable by autograd; in
  float64 it is the test oracle.
* :func:`block_fwd` / :func:`block_bwd` implement the block contract of
  :mod:`fastclip.ops.backends` with plain tensor ops, chunked over rows so that at
  most ``chunk × m`` logits exist at a time. They back the ``reference`` backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk are chosen so one chunk of logits holds ~2^24 elements (64 MB fp32):
# large enough that the matmuls run at BLAS speed, small enough to keep memory flat.
_CHUNK_ELEMS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/statistics dtype for features of ``dtype``: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def clip_loss_naive(image_features: Tensor, text_features: Tensor, logit_scale: Tensor | float,
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


def _inv_norms(t: Tensor, normalize: bool, eps: float) -> Tensor:
    if not normalize:
        return torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
    return 1.0 / t.norm(dim=1).clamp_min(eps)                       # [n]


def _chunks(n: int, m: int):
    step = max(1, _CHUNK_ELEMS // max(m, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)


def block_fwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float,
              pos_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Row/column log-sum-exp and positive logits of one block (see backends doc)."""
    acc = acc_dtype(x.dtype)
    xa, ya, s = x.to(acc), y.to(acc), scale.to(acc)
    n, m = xa.shape[0], ya.shape[0]
    xh = xa * _inv_norms(xa, normalize, eps)[:, None]               # [n, D]
    yh = ya * _inv_norms(ya, normalize, eps)[:, None]               # [m, D]
    row_lse = torch.empty(n, dtype=acc, device=x.device)
    col_lse = torch.full((m,), float("-inf"), dtype=acc, device=x.device)
    for a, b in _chunks(n, m):
        logits = s * (xh[a:b] @ yh.T)                               # [b-a, m]
        row_lse[a:b] = torch.logsumexp(logits, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
    pos = torch.zeros(n, dtype=acc, device=x.device)
    lo, hi = max(0, -pos_offset), min(n, m - pos_offset)
    if hi > lo:
        pos[lo:hi] = s * (xh[lo:hi] * yh[lo + pos_offset:hi + pos_offset]).sum(1)
    return row_lse, col_lse, pos


def block_bwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float, pos_offset: int,
              row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor,
              grad_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Vector-Jacobian product of :func:`block_fwd` (see backends doc)."""
    acc = acc_dtype(x.dtype)
    xa, ya, s = x.to(acc), y.to(acc), scale.to(acc)
    n, m = xa.shape[0], ya.shape[0]
    rho, sig = _inv_norms(xa, normalize, eps), _inv_norms(ya, normalize, eps)
    xh, yh = xa * rho[:, None], ya * sig[:, None]                   # [n, D], [m, D]
    gxh = torch.zeros_like(xh)                                      # d/d x̂  [n, D]
    gyh = torch.zeros_like(yh)                                      # d/d ŷ  [m, D]
    dscale = torch.zeros((), dtype=acc, device=x.device)
    for a, b in _chunks(n, m):
        logits = s * (xh[a:b] @ yh.T)                               # [b-a, m]
        g = (grad_row[a:b, None] * torch.exp(logits - row_lse[a:b, None])
             + grad_col[None, :] * torch.exp(logits - col_lse[None, :]))
        dscale = dscale + (g * logits).sum() / s
        gxh[a:b] += s * (g @ yh)
        gyh += s * (g.T @ xh[a:b])
    lo, hi = max(0, -pos_offset), min(n, m - pos_offset)
    if hi > lo:
        gp = grad_pos[lo:hi, None]                                  # [k, 1]
        xs, ys = xh[lo:hi], yh[lo + pos_offset:hi + pos_offset]
        gxh[lo:hi] += s * gp * ys
        gyh[lo + pos_offset:hi + pos_offset] += s * gp * xs
        dscale = dscale + (gp[:, 0] * (xs * ys).sum(1)).sum()
    if normalize:   # d/dx = rho (d/dx̂ - x̂ <x̂, d/dx̂>)
        gx = rho[:, None] * (gxh - xh * (xh * gxh).sum(1, keepdim=True))
        gy = sig[:, None] * (gyh - yh * (yh * gyh).sum(1, keepdim=True))
    else:
        gx, gy = gxh, gyh
    return gx.to(x.dtype), gy.to(y.dtype), dscale
