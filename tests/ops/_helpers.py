"""Shared helpers of the op tests: the fp64 oracle and the error measure of design.md §5."""

from __future__ import annotations

import torch

from fastclip.ops.reference import clip_loss_naive


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (design.md §5); absolute when ref is 0."""
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


def oracle(x: torch.Tensor, y: torch.Tensor, scale: float, normalize: bool):
    """Loss and gradients (x, y, scale) of the naive formula in float64."""
    xd = x.detach().double().requires_grad_()
    yd = y.detach().double().requires_grad_()
    sd = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    loss = clip_loss_naive(xd, yd, sd, normalize=normalize)
    gx, gy, gs = torch.autograd.grad(loss, (xd, yd, sd))
    return loss.detach(), gx, gy, gs


def run(fn, x: torch.Tensor, y: torch.Tensor, scale: float, normalize: bool, **kw):
    """Loss and gradients of ``fn(x, y, scale_tensor, normalize=...)`` in x's dtype."""
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_()
    s = torch.tensor(float(scale), dtype=torch.float32 if x.dtype != torch.float64 else x.dtype,
                     requires_grad=True)
    loss = fn(x, y, s, normalize=normalize, **kw)
    gx, gy, gs = torch.autograd.grad(loss, (x, y, s))
    return loss.detach(), gx, gy, gs


def embeddings(kind: str, n: int, d: int, dtype=torch.float32, gen=None):
    """Random features of a given geometry: 'random', 'orthogonal' (max cosine ≈ 0 between
    all rows of x and y) or 'identical' (every row the same: max cosine 1)."""
    if kind == "random":
        return (torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype),
                torch.randn(n, d, generator=gen, dtype=torch.float64).to(dtype))
    if kind == "orthogonal":
        assert 2 * n <= d
        q, _ = torch.linalg.qr(torch.randn(d, 2 * n, generator=gen, dtype=torch.float64))
        q = q.T                                                     # [2n, d] orthonormal rows
        return q[:n].to(dtype).contiguous(), q[n:].to(dtype).contiguous()
    if kind == "identical":
        v = torch.randn(1, d, generator=gen, dtype=torch.float64)
        return v.expand(n, d).to(dtype).contiguous(), v.expand(n, d).to(dtype).contiguous()
    raise ValueError(kind)
