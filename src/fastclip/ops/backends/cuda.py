"""The ``cuda`` backend: the CUDA C++ kernels of ``csrc/contrastive_loss/cuda``.

Inputs: float32, float16 or bfloat16 features on a CUDA device (float64 is not
supported by this backend: ``Backend.dtypes`` leaves it out, so ``backend="cuda"``
with float64 features raises :class:`BackendUnavailableError` and ``auto`` moves on).
Statistics, ``pos`` and ``dscale`` are float32; ``dx``/``dy`` have the input dtype.

Precision: float16/bfloat16 products run on tensor cores (mma.sync m16n8k16, fp32
accumulate). float32 inputs run as exact fp32 FFMA unless
``torch.backends.cuda.matmul.allow_tf32`` is True, in which case the tile products use
TF32 tensor cores (m16n8k8), mirroring what ``torch.matmul`` would do under the same flag.

The compiled functions take raw pointers, sizes, row strides, the current stream and a
device pointer to the fp32 scale (no host synchronisation); this module allocates the
outputs and the workspace with torch on the features' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._ext import extension, extension_error
from . import Backend, register_backend, row_stride

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


def _rows(t: Tensor) -> Tensor:
    """``t`` with a unit inner stride and a row stride >= D (any larger row stride is kept)."""
    n, d = t.shape
    if (d > 1 and t.stride(1) != 1) or (n > 1 and t.stride(0) < d):
        return t.contiguous()
    return t


def _check(x: Tensor, y: Tensor, scale: Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if t.device.type != "cuda":
            raise ValueError(f"cuda backend: {name} must be on a CUDA device, got {t.device}")
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"cuda backend: {name} must be float32, float16 or bfloat16, got "
                            f"{t.dtype} (float64 runs on the cpu, triton or reference backends)")
    if y.device != x.device or y.dtype != x.dtype:
        raise ValueError(f"cuda backend: x ({x.dtype}, {x.device}) and y ({y.dtype}, {y.device}) "
                         f"must share dtype and device")
    if scale.numel() != 1 or scale.device != x.device:
        raise ValueError(f"cuda backend: scale must be a one-element tensor on {x.device}, got "
                         f"shape {tuple(scale.shape)} on {scale.device}")


def _f32(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32).contiguous()


def _fwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float, pos_offset: int):
    """Block forward (see fastclip.ops.backends): (row_lse [n], col_lse [m], pos [n]) fp32."""
    C = extension()
    _check(x, y, scale)
    xc, yc = _rows(x.detach()), _rows(y.detach())
    n, d = xc.shape
    m = yc.shape[0]
    dev = xc.device
    with torch.cuda.device(dev):
        sc = _f32(scale).reshape(())
        row = torch.empty(n, dtype=torch.float32, device=dev)
        col = torch.empty(m, dtype=torch.float32, device=dev)
        pos = torch.empty(n, dtype=torch.float32, device=dev)
        nbytes = C.cuda_fwd_workspace_bytes(n, m, d)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        C.cuda_fwd(xc.data_ptr(), yc.data_ptr(), n, m, d, row_stride(xc), row_stride(yc), _DTYPE_CODE[xc.dtype],
                   bool(torch.backends.cuda.matmul.allow_tf32), sc.data_ptr(), bool(normalize),
                   float(eps), int(pos_offset), row.data_ptr(), col.data_ptr(), pos.data_ptr(),
                   ws.data_ptr(), nbytes, torch.cuda.current_stream(dev).cuda_stream)
    return row, col, pos


def _bwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float, pos_offset: int,
         row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor):
    """Block backward (see fastclip.ops.backends): (dx [n, D], dy [m, D], dscale [] fp32)."""
    C = extension()
    _check(x, y, scale)
    xc, yc = _rows(x.detach()), _rows(y.detach())
    n, d = xc.shape
    m = yc.shape[0]
    dev = xc.device
    with torch.cuda.device(dev):
        sc = _f32(scale).reshape(())
        r, c = _f32(row_lse), _f32(col_lse)
        gr, gc, gp = _f32(grad_row), _f32(grad_col), _f32(grad_pos)
        dx = torch.empty((n, d), dtype=xc.dtype, device=dev)
        dy = torch.empty((m, d), dtype=yc.dtype, device=dev)
        ds = torch.empty((), dtype=torch.float32, device=dev)
        nbytes = C.cuda_bwd_workspace_bytes(n, m, d)
        ws = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        C.cuda_bwd(xc.data_ptr(), yc.data_ptr(), n, m, d, row_stride(xc), row_stride(yc), _DTYPE_CODE[xc.dtype],
                   bool(torch.backends.cuda.matmul.allow_tf32), sc.data_ptr(), bool(normalize),
                   float(eps), int(pos_offset), r.data_ptr(), c.data_ptr(), gr.data_ptr(),
                   gc.data_ptr(), gp.data_ptr(), dx.data_ptr(), dy.data_ptr(), ds.data_ptr(),
                   ws.data_ptr(), nbytes, torch.cuda.current_stream(dev).cuda_stream)
    return dx, dy, ds


# Which GPU backend ``auto`` prefers, by compute capability (major, minor); the triton
# backend ranks 20 on every GPU. No GPU measurement backs this table yet
# (benchmarks/results/ will; then it must follow the numbers). The prior:
# * sm_80 / sm_86 / sm_87 / sm_89 (Ampere, Ada): these kernels use mma.sync m16n8k16 with
#   ldmatrix and cp.async, what Triton's ``tl.dot`` also lowers to there, with no
#   autotuning cost at first use: cuda first (30).
# * sm_90 (Hopper) and newer: Triton lowers ``tl.dot`` to wgmma (warpgroup MMA, TMA),
#   which these kernels do not use yet (their sm_80 mma.sync path runs there at about half
#   of Hopper's dense tensor throughput): triton first (cuda 10).
# * older than sm_80 (no bf16 mma.sync; the kernels are built for sm_80 and sm_90a only):
#   triton first; cuda reports the missing kernel image.
_AMPERE_ADA = {(8, 0), (8, 6), (8, 7), (8, 9)}


def _priority(device: torch.device) -> int:
    if not torch.cuda.is_available():
        return 10
    cap = torch.cuda.get_device_capability(device)
    return 30 if tuple(cap) in _AMPERE_ADA else 10


def fwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float, pos_offset: int):
    row, col, pos = _fwd(x, y, params[:1].reshape(()), normalize, eps, pos_offset)
    return row.double(), col.double(), pos.double()


def bwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float, pos_offset: int,
        row: Tensor, col: Tensor, grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor):
    dx, dy, ds = _bwd(x, y, params[:1].reshape(()), normalize, eps, pos_offset, row, col,
                      grad_row, grad_col, grad_pos)
    return dx, dy, ds.reshape(1)


register_backend(Backend(name="cuda", code=3, devices=("cuda",),
                         dtypes=(torch.float32, torch.float16, torch.bfloat16),
                         priority=_priority, availability=_availability, fwd=fwd, bwd=bwd,
                         losses=("clip",)))
