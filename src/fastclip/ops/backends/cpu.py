"""The ``cpu`` backend: the C++ kernels of ``csrc/contrastive_loss/cpu`` (OpenMP).

float32 and float64 run natively; float16 and bfloat16 are upcast to float32 here
(O(N·D), the kernel's inner loops stay fp32) and the gradients are cast back.

Threads: ``torch.get_num_threads()`` OpenMP threads with a static schedule, so a fixed
thread count gives bit-identical results. The kernel picks its instruction set at run
time (AVX-512, AVX2+FMA, or a generic 128-bit build); ``FASTCLIP_CPU_ISA=avx2|generic``
forces a lesser one (tests, comparisons). Extra memory: O((n+m)·D) plus at most 64 MB of
per-thread dY buffers (``FASTCLIP_CPU_DY_BUDGET`` bytes overrides it); nothing n×m.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..._ext import extension, extension_error
from . import Backend, register_backend


def _availability() -> tuple[bool, str]:
    C = extension()
    if C is None:
        return False, extension_error()
    return True, ""


def _prep(t: Tensor) -> Tensor:
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if t.stride(1) != 1:
        t = t.contiguous()
    return t


def _vec(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


# Below this many multiply-adds a call runs on one thread: the kernel splits work in
# blocks of 96 rows anyway, and waking OpenMP's team costs more than the arithmetic
# (8x4x8 block: 0.01 ms on one thread, 24 ms on two on this shared 2-core machine).
_SERIAL_BELOW = 1 << 20


def _threads(n: int, m: int, d: int) -> int:
    return 1 if n * m * d < _SERIAL_BELOW else torch.get_num_threads()


def fwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float, pos_offset: int):
    C = extension()
    xc, yc = _prep(x), _prep(y)
    n, d = xc.shape
    m = yc.shape[0]
    dt = xc.dtype
    row = torch.empty(n, dtype=dt)
    col = torch.empty(m, dtype=dt)
    pos = torch.empty(n, dtype=dt)
    C.cpu_fwd(xc.data_ptr(), yc.data_ptr(), n, m, d, xc.stride(0), yc.stride(0),
              dt == torch.float64, float(scale), bool(normalize), float(eps), int(pos_offset),
              row.data_ptr(), col.data_ptr(), pos.data_ptr(), _threads(n, m, d))
    return row, col, pos


def bwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float, pos_offset: int,
        row_lse: Tensor, col_lse: Tensor, grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor):
    C = extension()
    xc, yc = _prep(x), _prep(y)
    n, d = xc.shape
    m = yc.shape[0]
    dt = xc.dtype
    r, c = _vec(row_lse, dt), _vec(col_lse, dt)
    gr, gc, gp = _vec(grad_row, dt), _vec(grad_col, dt), _vec(grad_pos, dt)
    dx = torch.empty((n, d), dtype=dt)
    dy = torch.empty((m, d), dtype=dt)
    ds = C.cpu_bwd(xc.data_ptr(), yc.data_ptr(), n, m, d, xc.stride(0), yc.stride(0),
                   dt == torch.float64, float(scale), bool(normalize), float(eps), int(pos_offset),
                   r.data_ptr(), c.data_ptr(), gr.data_ptr(), gc.data_ptr(), gp.data_ptr(),
                   dx.data_ptr(), dy.data_ptr(), _threads(n, m, d))
    return dx.to(x.dtype), dy.to(y.dtype), torch.tensor(ds, dtype=dt)


register_backend(Backend(name="cpu", devices=("cpu",), availability=_availability, fwd=fwd, bwd=bwd))
