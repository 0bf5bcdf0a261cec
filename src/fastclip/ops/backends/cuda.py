"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/contrastive_loss/cuda``.

Losses: every loss of :mod:`fastclip.ops.losses` (its ``code`` is the kernels' template
parameter ``LossKind``): ``fwd`` and ``bwd`` for all, the one-pass ``fwd_bwd`` for one-pass
losses (SigLIP's sigmoid).

Inputs: float32, float16 or bfloat16 features on a CUDA device (float64 is not
supported by this backend: ``Backend.dtypes`` leaves it out, so ``backend="cuda"``
with float64 features raises :class:`BackendUnavailableError` and ``auto`` moves on).
Statistics and ``pos`` are float64 (as their upstream gradients), ``dparams`` float32;
``dx``/``dy`` have the input dtype.

Precision: float16/bfloat16 products run on tensor cores (mma.sync m16n8k16, fp32
accumulate). float32 inputs run as exact fp32 FFMA unless torch lets float32 matrix
products use TF32 (``allow_tf32 = True``, ``fp32_precision = "tf32"`` or
``set_float32_matmul_precision("high")``: ``tf32_matmul`` in the registry), in which case the
tile products use TF32 tensor cores (m16n8k8), mirroring what ``torch.matmul`` would do.

Work: the forward is one product per tile (2nmD FLOP); the backward, and the one-pass
forward+backward, three (6nmD), nothing recomputed. Deterministic: no atomics on values;
the reductions across tiles run in a fixed order (docs/design.md §2). Extra device memory:
O((n+m)·D) fp32 accumulators plus O(n+m) partial statistics, nothing n×m.

The compiled functions take raw pointers, sizes, row strides, the current stream and a
device pointer to the fp32 parameters (no host synchronisation); this module allocates the
outputs and the workspace with torch on the features' device. The op layer
(:mod:`fastclip.ops.contrastive_loss`) hands over inputs already validated and in a kernel
layout (unit inner stride, row stride >= D or a single row: :func:`row_stride`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._ext import extension, extension_error
from ..losses import STAT_DTYPE
from . import Backend, register_backend, row_stride, tf32_matmul

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_STATUS: tuple[bool, str] | None = None


def _availability() -> tuple[bool, str]:
    """(ok, reason). Built with CUDA and a usable device; cached after the first probe."""
    global _STATUS
    if _STATUS is not None:
        return _STATUS
    C = extension()
    if C is None:
        return False, extension_error()
    if not getattr(C, "CUDA_BUILT", False):
        # The stub's reason says how to rebuild ("fastclip was built without CUDA ...").
        _STATUS = (False, C.cuda_status()[1])
        return _STATUS
    ok, reason = C.cuda_status()
    _STATUS = (True, "") if ok else (False, f"no CUDA device usable by fastclip's kernels "
                                            f"({reason})")
    return _STATUS


def _f64(t: Tensor) -> Tensor:
    """A statistic or its upstream gradient as the kernels read it: contiguous float64."""
    return t if t.dtype == STAT_DTYPE and t.is_contiguous() else t.to(STAT_DTYPE).contiguous()


def _head(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
          pos_offset: int) -> tuple:
    """The leading arguments every compiled entry point takes, in its order."""
    p = params.detach()
    if p.dtype != torch.float32 or not p.is_contiguous():
        p = p.to(torch.float32).contiguous()
    n, d = x.shape
    return (spec.code, x.data_ptr(), y.data_ptr(), n, y.shape[0], d, row_stride(x),
            row_stride(y), _DTYPE_CODE[x.dtype], x.dtype == torch.float32 and tf32_matmul(),
            p.data_ptr(), p.numel(), bool(normalize), float(eps), int(pos_offset)), p


def _workspace(nbytes: int, dev: torch.device) -> Tensor:
    # The caching allocator's blocks are 512-byte aligned (the kernels need 256).
    return torch.empty(nbytes, dtype=torch.uint8, device=dev)


def fwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
        pos_offset: int):
    """Block forward (see fastclip.ops.backends): (row [n], col [m], pos [n]) float64."""
    C = extension()
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    with torch.cuda.device(dev):
        head, p = _head(spec, x, y, params, normalize, eps, pos_offset)
        row, col, pos = (torch.empty(k, dtype=STAT_DTYPE, device=dev) for k in (n, m, n))
        nbytes = C.cuda_fwd_workspace_bytes(n, m, d)
        ws = _workspace(nbytes, dev)
        C.cuda_fwd(*head, row.data_ptr(), col.data_ptr(), pos.data_ptr(), ws.data_ptr(), nbytes,
                   torch.cuda.current_stream(dev).cuda_stream)
    return row, col, pos


def bwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
        pos_offset: int, row: Tensor, col: Tensor, grad_row: Tensor, grad_col: Tensor,
        grad_pos: Tensor):
    """Block backward (see fastclip.ops.backends): (dx [n, D], dy [m, D], dparams [P] fp32)."""
    C = extension()
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    with torch.cuda.device(dev):
        head, p = _head(spec, x, y, params, normalize, eps, pos_offset)
        vecs = [_f64(t) for t in (row, col, grad_row, grad_col, grad_pos)]
        dx = torch.empty((n, d), dtype=x.dtype, device=dev)
        dy = torch.empty((m, d), dtype=y.dtype, device=dev)
        dp = torch.empty(p.numel(), dtype=torch.float32, device=dev)
        nbytes = C.cuda_bwd_workspace_bytes(n, m, d)
        ws = _workspace(nbytes, dev)
        C.cuda_bwd(*head, *(v.data_ptr() for v in vecs), dx.data_ptr(), dy.data_ptr(),
                   dp.data_ptr(), ws.data_ptr(), nbytes,
                   torch.cuda.current_stream(dev).cuda_stream)
    return dx, dy, dp


def fwd_bwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
            pos_offset: int, grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor):
    """One-pass block forward and backward of a one-pass loss:
    (row, col, pos, dx, dy, dparams), as ``fwd`` then ``bwd`` would give them."""
    C = extension()
    n, d = x.shape
    m = y.shape[0]
    dev = x.device
    with torch.cuda.device(dev):
        head, p = _head(spec, x, y, params, normalize, eps, pos_offset)
        grads = [_f64(t) for t in (grad_row, grad_col, grad_pos)]
        row, col, pos = (torch.empty(k, dtype=STAT_DTYPE, device=dev) for k in (n, m, n))
        dx = torch.empty((n, d), dtype=x.dtype, device=dev)
        dy = torch.empty((m, d), dtype=y.dtype, device=dev)
        dp = torch.empty(p.numel(), dtype=torch.float32, device=dev)
        nbytes = C.cuda_fwd_bwd_workspace_bytes(n, m, d)
        ws = _workspace(nbytes, dev)
        C.cuda_fwd_bwd(*head, *(g.data_ptr() for g in grads), row.data_ptr(), col.data_ptr(),
                       pos.data_ptr(), dx.data_ptr(), dy.data_ptr(), dp.data_ptr(),
                       ws.data_ptr(), nbytes, torch.cuda.current_stream(dev).cuda_stream)
    return row, col, pos, dx, dy, dp


# ``auto`` prefers the triton backend (20) on every GPU; cuda (10) runs where Triton does
# not (a torch without Triton) and when asked for by name. Measured on an H200 (bf16,
# D = 512, forward+backward; benchmarks/results/cuda-nvidia-h200*.md): CLIP at N = 32768
# 66.7 ms (triton) against 205 ms (cuda), SigLIP 67.0 ms against 198 ms. The cuda forward
# is the faster half (8.5 ms against the floor's 1.9 ms); its gradient pass adds every
# 64x64 tile's dX and dY products into fp32 rows in global memory (a read and a write of
# (64 + 64) x D floats per tile: 24 FLOP per byte, against hundreds that the tensor cores
# need) and orders the dY adds through the turnstile, so it is bound by memory traffic,
# not by the tensor cores: the same holds on Ampere and Ada (mma.sync there as in Triton,
# less bandwidth), where no GPU has measured it yet. docs/design.md §6 has the numbers.
CUDA_PRIORITY = 10


register_backend(Backend(
    name="cuda", code=3, devices=("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    priority=CUDA_PRIORITY, availability=_availability, fwd=fwd, bwd=bwd, fwd_bwd=fwd_bwd,
    losses=("clip", "siglip"),
    # inf: the gradient pass never recomputes a logit another way. It forms each tile as
    # the forward does (tile_scores with x rows against y columns, the same K blocking and
    # mma order, the same explicitly rounded logit(): csrc/contrastive_loss/cuda), so every
    # exp(z - lse) of the softmax backward sees the forward's z bit for bit, at any |z|.
    exact_logits=float("inf"),
))
