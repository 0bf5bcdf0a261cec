"""Pure-PyTorch block functions: the oracle of every kernel test and the last fallback.

:func:`block_fwd`, :func:`block_bwd` and :func:`block_fwd_bwd` implement the block contract of
:mod:`fastclip.ops.backends` for any loss of :mod:`fastclip.ops.losses` with plain tensor ops,
chunked over rows so that at most ``chunk × m`` logits exist at a time; the loss's epilogue
comes from its spec (``ref_stats``, ``ref_dz``). They back the ``reference`` backend. The
textbook formulas that materialise N×N (each loss's ``naive``) live with the losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .losses import STAT_DTYPE, LossSpec, merge
from .losses.clip import clip_loss_naive
from .losses.siglip import siglip_loss_naive

__all__ = ["acc_dtype", "block_fwd", "block_bwd", "block_fwd_bwd", "clip_loss_naive",
           "siglip_loss_naive"]

# Rows per chunk are chosen so one chunk of logits holds ~2^24 elements (64 MB fp32):
# large enough that the matmuls run at BLAS speed, small enough to keep memory flat.
_CHUNK_ELEMS = 1 << 24


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/statistics dtype for features of ``dtype``: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _inv_norms(t: Tensor, normalize: bool, eps: float) -> tuple[Tensor, Tensor]:
    """(rho [n] = 1/max(||t_i||, eps), keep [n]): keep_i = 1 where the norm is at least eps,
    0 where eps clamps it; there x̂ = x/eps is linear in x and its backward has no projection
    (as F.normalize's clamp_min). Without normalize rho = 1, keep = 0."""
    if not normalize:
        ones = torch.ones(t.shape[0], dtype=t.dtype, device=t.device)
        return ones, torch.zeros_like(ones)
    # The norm in float64: an fp32 row of norm > 1.8e19 (or < 1e-19) squares out of fp32's
    # range, and fp32's norm would make it inf (or 0), so x̂ would be 0, silently.
    norm = t.norm(dim=1, dtype=torch.float64)                                       # [n]
    return (1.0 / norm.clamp_min(eps)).to(t.dtype), (norm >= eps).to(t.dtype)


def _chunks(n: int, m: int):
    step = max(1, _CHUNK_ELEMS // max(m, 1))
    for a in range(0, n, step):
        yield a, min(n, a + step)


class _Block:
    """The pieces every block function needs, in the accumulation dtype."""

    def __init__(self, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
                 pos_offset: int):
        self.acc = acc_dtype(x.dtype)
        xa, ya = x.to(self.acc), y.to(self.acc)
        self.p = params.to(self.acc)
        self.s = self.p[0]
        self.b = self.p[1] if self.p.numel() > 1 else None
        self.n, self.m = xa.shape[0], ya.shape[0]
        self.rho, self.keep_x = _inv_norms(xa, normalize, eps)
        self.sig, self.keep_y = _inv_norms(ya, normalize, eps)
        self.xh = xa * self.rho[:, None]                             # x̂ [n, D]
        self.yh = ya * self.sig[:, None]                             # ŷ [m, D]
        self.off, self.normalize = pos_offset, normalize
        self.cols = torch.arange(self.m, device=x.device)

    def tile(self, a: int, b: int) -> tuple[Tensor, Tensor, Tensor]:
        """(u, z, is_pos) of rows [a, b): u = <x̂_i, ŷ_j>, z = s·u (+ bias)."""
        u = self.xh[a:b] @ self.yh.T                                 # [b-a, m]
        z = self.s * u if self.b is None else self.s * u + self.b
        rows = torch.arange(a, b, device=u.device)
        is_pos = self.cols[None, :] == rows[:, None] + self.off      # [b-a, m]
        return u, z, is_pos

    def pos(self, z: Tensor, is_pos: Tensor) -> Tensor:
        """z_{i, i+off} of a tile's rows, as the tile rounded it, in float64 (0 where the row's
        positive is outside the block): the statistics sum these same logits, so that a
        CLIP row's row_i - pos_i cancels the positive's rounding (exactly 0 at n = m = 1)."""
        return torch.where(is_pos, z, 0.0).sum(1).to(STAT_DTYPE)                    # [b-a]


def block_fwd(spec: LossSpec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
              pos_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """(row [n], col [m], pos [n]) statistics of one block (see fastclip.ops.backends)."""
    k = _Block(x, y, params, normalize, eps, pos_offset)
    row = torch.empty(k.n, dtype=STAT_DTYPE, device=x.device)
    pos = torch.empty(k.n, dtype=STAT_DTYPE, device=x.device)
    col = None
    for a, b in _chunks(k.n, k.m):
        _, z, is_pos = k.tile(a, b)
        r, c = spec.ref_stats(z, is_pos)
        row[a:b] = r
        pos[a:b] = k.pos(z, is_pos)
        col = merge(spec.merge, col, c)
    return row, col, pos


def _grads(spec: LossSpec, k: _Block, row, col, grad_row, grad_col, grad_pos, stats: bool):
    gxh = torch.zeros_like(k.xh)                                     # d/d x̂  [n, D]
    gyh = torch.zeros_like(k.yh)                                     # d/d ŷ  [m, D]
    dp = torch.zeros_like(k.p)
    out_row = torch.empty(k.n, dtype=STAT_DTYPE, device=k.xh.device) if stats else row
    out_pos = torch.empty(k.n, dtype=STAT_DTYPE, device=k.xh.device) if stats else None
    out_col = None if stats else col
    for a, b in _chunks(k.n, k.m):
        u, z, is_pos = k.tile(a, b)
        if stats:
            r, c = spec.ref_stats(z, is_pos)
            out_row[a:b] = r
            out_pos[a:b] = k.pos(z, is_pos)
            out_col = merge(spec.merge, out_col, c)
        g = spec.ref_dz(z, is_pos, row[a:b] if row is not None else None, col,
                        grad_row[a:b], grad_col)
        g = g + torch.where(is_pos, grad_pos[a:b, None], 0.0)
        dp[0] += (g * u).sum()                                       # dz/ds = u
        if dp.numel() > 1:
            dp[1] += g.sum()                                         # dz/db = 1
        gxh[a:b] += k.s * (g @ k.yh)
        gyh += k.s * (g.T @ k.xh[a:b])
    # d/dx = rho (d/dx̂ - x̂ <x̂, d/dx̂>) through the normalisation (identity without it); rows
    # that eps clamps (x̂ = x/eps) have no projection term.
    gx = k.rho[:, None] * (gxh - (k.keep_x[:, None] * k.xh) * (k.xh * gxh).sum(1, keepdim=True)) \
        if k.normalize else gxh
    gy = k.sig[:, None] * (gyh - (k.keep_y[:, None] * k.yh) * (k.yh * gyh).sum(1, keepdim=True)) \
        if k.normalize else gyh
    return out_row, out_col, out_pos, gx, gy, dp


def block_bwd(spec: LossSpec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
              pos_offset: int, row: Tensor, col: Tensor, grad_row: Tensor, grad_col: Tensor,
              grad_pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Vector-Jacobian product of :func:`block_fwd`: (dx [n, D], dy [m, D], dparams [P])."""
    k = _Block(x, y, params, normalize, eps, pos_offset)
    acc = k.acc
    _, _, _, gx, gy, dp = _grads(spec, k, row.to(STAT_DTYPE), col.to(STAT_DTYPE), grad_row.to(acc),
                              grad_col.to(acc), grad_pos.to(acc), stats=False)
    return gx.to(x.dtype), gy.to(y.dtype), dp


def block_fwd_bwd(spec: LossSpec, x: Tensor, y: Tensor, params: Tensor, normalize: bool,
                  eps: float, pos_offset: int, grad_row: Tensor, grad_col: Tensor,
                  grad_pos: Tensor):
    """Statistics and their vector-Jacobian product in one pass over the tiles, for a
    ``one_pass`` loss: (row, col, pos, dx, dy, dparams)."""
    if not spec.one_pass:
        raise ValueError(f"loss {spec.name!r} needs its merged statistics for the gradient: "
                         f"call block_fwd, then block_bwd")
    k = _Block(x, y, params, normalize, eps, pos_offset)
    acc = k.acc
    row, col, pos, gx, gy, dp = _grads(spec, k, None, None, grad_row.to(acc), grad_col.to(acc),
                                  grad_pos.to(acc), stats=True)
    return row, col, pos, gx.to(x.dtype), gy.to(y.dtype), dp
