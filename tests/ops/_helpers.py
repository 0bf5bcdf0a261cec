"""What every op test shares: the (loss, backend) matrix from the registries, one tolerance
table, the float64 oracles and the error measure (docs/design.md §5)."""

from __future__ import annotations

import os

import pytest
import torch

import fastclip
from fastclip.ops import reference as ref
from fastclip.ops.backends import all_backends
from fastclip.ops.losses import LOSSES, get_loss

# ---------------------------------------------------------------- the tolerance table
# Relative error ‖out − ref‖/‖ref‖ against the float64 oracle (docs/design.md §5):
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# float16/bfloat16 inputs: at most HALF_FACTOR × the error of the same formula computed by
# PyTorch in that dtype (flash-attention's rule), never NaN. The same factor judges fp32 on
# ill-conditioned cases, where PyTorch's own fp32 error exceeds TOL: max(TOL, 2 × torch).
HALF_FACTOR = 2.0
ACC = {torch.float64: torch.float64, torch.float32: torch.float32,
       torch.float16: torch.float32, torch.bfloat16: torch.float32}
EPS = 1e-12


def rel_err(out: torch.Tensor, ref_: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; absolute when ref is 0."""
    out, ref_ = out.detach().double().cpu(), ref_.detach().double().cpu()
    den = ref_.norm().item()
    num = (out - ref_).norm().item()
    return num / den if den > 0 else num


# ------------------------------------------------------------------- the test matrix
def emulated(backend: str) -> bool:
    """The backend runs through an interpreter on this machine: small shapes only."""
    return all_backends()[backend].emulated()


def backend_device(backend: str) -> torch.device:
    """Where a backend's tests run: its GPU if it has one and one is here, else the CPU."""
    b = all_backends()[backend]
    if "cuda" in b.devices and torch.cuda.is_available():
        return torch.device("cuda")
    if "cpu" in b.devices:
        return torch.device("cpu")
    pytest.skip(f"backend {backend!r} needs a CUDA GPU")


def backend_ok(backend: str) -> str:
    """Skip (with the registry's reason) when the backend cannot run here."""
    ok, why = all_backends()[backend].availability()
    if not ok:
        pytest.skip(f"backend {backend!r} unavailable: {why}")
    return backend


def kernel_device(backend: str) -> str:
    """Where a Triton-based backend's kernel tests run: "cpu" under TRITON_INTERPRET (the
    interpreter), else "cuda"; skips with the registry's reason where it cannot run."""
    backend_ok(backend)
    return "cpu" if interpreter_env() else "cuda"


def kernel_gpu(backend: str) -> str:
    """"cuda" for a Triton-based backend's GPU-only tests; skips without a GPU (or under
    the interpreter) and where the backend cannot run."""
    if interpreter_env() or not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (and TRITON_INTERPRET unset)")
    backend_ok(backend)
    return "cuda"


def cases(losses=None, dtypes=None):
    """(loss, backend) pairs: every backend of the registry with every loss it implements,
    optionally only those that take one of ``dtypes``."""
    out = []
    for name, b in all_backends().items():
        for loss in (losses or LOSSES):
            if loss in b.losses and (dtypes is None or any(d in b.dtypes for d in dtypes)):
                out.append(pytest.param(loss, name, id=f"{loss}-{name}"))
    return out


def takes(backend: str, dtype: torch.dtype) -> bool:
    return dtype in all_backends()[backend].dtypes


# ------------------------------------------------------------------------ parameters
def default_params(loss: str) -> tuple[float, ...]:
    """The loss's usual initial parameters (``LossSpec.init``)."""
    return get_loss(loss).init


def params_for(loss: str, scale: float, bias: float = -10.0) -> tuple[float, ...]:
    """A scale, and a bias for losses that have one (the test grids vary both)."""
    return (scale, bias)[:len(get_loss(loss).params)]


# ------------------------------------------------------------------------- the oracle
def oracle(loss: str, x, y, params, normalize: bool):
    """Loss and gradients (x, y, *params) of the loss's naive formula in float64."""
    xd = x.detach().double().cpu().requires_grad_()
    yd = y.detach().double().cpu().requires_grad_()
    pd = [torch.tensor(float(p), dtype=torch.float64, requires_grad=True) for p in params]
    out = get_loss(loss).naive(xd, yd, *pd, normalize=normalize)
    grads = torch.autograd.grad(out, (xd, yd, *pd))
    return (out.detach(), *grads)


def naive_in(loss: str, x, y, params, normalize: bool, dtype: torch.dtype):
    """The naive formula computed by PyTorch in ``dtype`` (inputs and parameters): the error
    PyTorch itself makes, for the relative rules of the tolerance table."""
    xd = x.detach().to(dtype).requires_grad_()
    yd = y.detach().to(dtype).requires_grad_()
    pd = [torch.tensor(float(p), dtype=dtype, device=x.device, requires_grad=True)
          for p in params]
    out = get_loss(loss).naive(xd, yd, *pd, normalize=normalize)
    grads = torch.autograd.grad(out, (xd, yd, *pd))
    return (out.detach(), *grads)


def run(loss: str, x, y, params, normalize: bool, backend: str, **kw):
    """Loss and gradients (x, y, *params) of fastclip's loss, in the inputs' dtype."""
    x = x.detach().requires_grad_()
    y = y.detach().requires_grad_()
    acc = ACC[x.dtype]
    ps = [torch.tensor(float(p), dtype=acc, device=x.device, requires_grad=True) for p in params]
    out = fastclip.ops.fused_loss(loss, x, y, ps, normalize=normalize, backend=backend, **kw)
    grads = torch.autograd.grad(out, (x, y, *ps))
    return (out.detach(), *grads)


def names(loss: str) -> tuple[str, ...]:
    return ("loss", "d_image", "d_text", *(f"d_{p}" for p in get_loss(loss).params))


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


def unit_rows(t: torch.Tensor) -> torch.Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-30)


def block_oracle(loss: str, x, y, params, normalize, pos_offset, grads):
    """The reference block functions in float64: (row, col, pos) and (dx, dy, dparams)."""
    spec = get_loss(loss)
    xd, yd = x.detach().double().cpu(), y.detach().double().cpu()
    pd = torch.tensor([float(p) for p in params], dtype=torch.float64)
    f = ref.block_fwd(spec, xd, yd, pd, normalize, EPS, pos_offset)
    b = ref.block_bwd(spec, xd, yd, pd, normalize, EPS, pos_offset, f[0], f[1],
                      *(g.double().cpu() for g in grads))
    return f, b


def scale_grad_size(loss: str, x, y, params, normalize: bool) -> float:
    """Σ_ij |G_ij u_ij| in float64: the size of the terms whose sum is the scale's gradient
    (u = <x̂_i, ŷ_j>). Where they cancel (nearly orthogonal rows), ‖out − ref‖/‖ref‖
    measures luck; the error is judged against this size instead."""
    return param_grad_sizes(loss, x, y, params, normalize)[0]


def _term_matrix(loss: str, xd, yd, params):
    """``(u, G, A)`` in float64 for the rows given (unit rows when the loss normalises):
    u = X Yᵀ, G = ∂loss/∂z, and A = |G| before any cancellation: the statistics' part
    (softmax or sigmoid terms) and the positives' part (CLIP's −δ_ij) added in absolute
    value, so that an entry like p_ii − 1 ≈ 0 keeps the size of its terms."""
    from fastclip.ops.losses import head_grads
    spec = get_loss(loss)
    n = xd.shape[0]
    u = xd @ yd.T
    z = params[0] * u + (params[1] if len(params) > 1 else 0.0)
    is_pos = torch.eye(n, dtype=torch.bool)
    row, col = spec.ref_stats(z, is_pos)
    pos = torch.diagonal(z).clone()
    gr, gc, gp = head_grads(spec, row, col, pos, spec.denominator(n))
    stats = spec.ref_dz(z, is_pos, row, col, gr, gc)
    return u, stats + torch.diag(gp), stats.abs() + torch.diag(gp).abs()


def param_grad_sizes(loss: str, x, y, params, normalize: bool) -> list[float]:
    """The size of the terms of each parameter's gradient, in float64: Σ|G u| for the scale,
    Σ|G| for the bias (see :func:`scale_grad_size`)."""
    xd, yd = x.detach().double().cpu(), y.detach().double().cpu()
    if normalize:
        xd, yd = unit_rows(xd), unit_rows(yd)
    u, G, _ = _term_matrix(loss, xd, yd, params)
    return [(G * u).abs().sum().item(), G.abs().sum().item()][:len(params)]


def feature_grad_sizes(loss: str, x, y, params, normalize: bool):
    """Per row, the size of the terms whose sum is that row's feature gradient, in float64:
    ``t Σ_j |G|_ij ‖y_j‖`` for image row i (``t Σ_j |G|_ij / ‖x_i‖`` with ``normalize``: the
    rows of Ŷ are unit and the projection shrinks by 1/‖x_i‖), and the same over columns for
    the text rows. A row whose softmax is one-hot to float64 precision has a gradient that
    cancels to ~1e-15 (p_ii − 1 and Σ_j≠i p_ij y_j both ≈ 0), which no float64 computation,
    the oracle's included, gets to a relative 1e-10; its error is judged against this size,
    which is the gradient's own size (within a small factor) when nothing cancels.

    Returns ``(sx [N], sy [N])``."""
    xd, yd = x.detach().double().cpu(), y.detach().double().cpu()
    nx, ny = xd.norm(dim=1), yd.norm(dim=1)
    if normalize:
        xd, yd = unit_rows(xd), unit_rows(yd)
    _, _, A = _term_matrix(loss, xd, yd, params)
    t = abs(float(params[0]))
    if normalize:
        return t * A.sum(1) / nx.clamp_min(1e-30), t * A.sum(0) / ny.clamp_min(1e-30)
    return t * (A @ ny), t * (A.T @ nx)


def rows_err(out: torch.Tensor, ref_: torch.Tensor, sizes: torch.Tensor) -> float:
    """‖out − ref‖ / max(‖ref‖, ‖sizes‖) in float64 over the given rows (see
    :func:`feature_grad_sizes`)."""
    out, ref_ = out.detach().double().cpu(), ref_.detach().double().cpu()
    den = max(ref_.norm().item(), sizes.double().norm().item())
    num = (out - ref_).norm().item()
    return num / den if den > 0 else num


def upstream(n: int, m: int, gen, dtype=torch.float64, device="cpu"):
    """Upstream gradients of the three statistics (float64, as the statistics): the size of
    a real loss's (1/n) plus noise, so that no term of G can cancel another by construction."""
    gr = (0.5 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)) / n
    gc = (0.5 + 0.1 * torch.rand(m, generator=gen, dtype=torch.float64)) / m
    gp = -(1.0 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)) / n
    return tuple(g.to(dtype).to(device) for g in (gr, gc, gp))


def interpreter_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ------------------------------------------------------------ kernel-module test tools
class LaunchCounter:
    """Wraps a Triton kernel (``kernel[grid](...)``) and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.calls = kernel, 0

    def __getitem__(self, grid):
        self.calls += 1
        return self.kernel[grid]


def param_tensor(loss: str, dev, scale: float = 12.0, bias: float = -4.0) -> torch.Tensor:
    """The block functions' ``params`` (fp32, on ``dev``): the scale, and the bias where
    the loss has one."""
    return torch.tensor(params_for(loss, scale, bias), dtype=torch.float32, device=dev)


def gpu_features(n: int, d: int, dtype: torch.dtype, seed: int):
    """Random x, y [n, d] on the GPU in ``dtype``."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, d, device="cuda", generator=g)
    y = torch.randn(n, d, device="cuda", generator=g)
    return x.to(dtype), y.to(dtype)


def gpu_step_extra_memory(loss: str, x, y, backend: str):
    """One forward+backward of the loss (normalize=True, the loss's initial parameters) on
    GPU features, after a warm-up (autotuning allocates benchmark buffers): (loss, bytes
    allocated at the peak beyond the inputs, the parameters and the two feature
    gradients). Leaves x.grad set."""
    x.requires_grad_()
    y.requires_grad_()
    ps = [torch.tensor(v, device="cuda", requires_grad=True) for v in default_params(loss)]

    def step():
        out = fastclip.ops.fused_loss(loss, x, y, ps, normalize=True, backend=backend)
        out.backward()
        return out

    step()
    x.grad = y.grad = None
    for p in ps:
        p.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated() + 2 * x.numel() * x.element_size()   # + gradients
    torch.cuda.reset_peak_memory_stats()
    out = step()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - base
