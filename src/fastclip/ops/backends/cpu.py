"""The ``cpu`` backend: the C++ kernels of ``csrc/contrastive_loss/cpu`` (OpenMP).

float32 and float64 run natively; float16 and bfloat16 are upcast to float32 here
(O(N·D)) and the gradients are cast back. The epilogues run in fp32 for every dtype; the
products run in fp32 too, except bfloat16 features on an AMD CPU with AVX512_BF16 (``isa()``
"avx512bf16": Zen 4 and later), whose three products take bf16 pairs (vdpbf16ps, twice the
fp32 rate there), the gradient products with dloss/dz rounded to bf16 as PyTorch's bf16
matmuls and the GPU kernels round it. Intel CPUs with AVX512_BF16 (Cooper Lake, Sapphire
Rapids and later) run bf16 on the fp32 products unless forced: on a Xeon of family 6 model 207
vdpbf16ps ran slower than the fp32 FMAs, the whole op 1.4-1.8x slower with it (measured).

Threads: ``torch.get_num_threads()`` OpenMP threads with a static schedule, so a fixed
thread count gives bit-identical results. The kernel picks its instruction set at run
time (AVX-512 with or without bf16 products, AVX2+FMA, or a generic 128-bit build);
``FASTCLIP_CPU_ISA=avx512bf16|avx512|avx2|generic`` picks one, never more than the CPU
has (tests, comparisons; ``avx512`` runs bfloat16 on the fp32 products, ``avx512bf16`` is
the default on AMD CPUs that have it and forces it on Intel's; another name is a ValueError at
the call). The bf16-product
build exists in extensions compiled by GCC >= 11, as the wheels are.
Extra memory: O((n+m)·D) plus the per-thread dY buffers, 64 MB (``FASTCLIP_CPU_DY_BUDGET``
bytes overrides it) or, where one 192-column chunk per thread is already more, threads ×
192 × D elements (201 MB at 64 threads, D = 4096, fp32); nothing n×m.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..._ext import extension, extension_error
from ..losses import STAT_DTYPE
from . import ALL_DTYPES, Backend, register_backend, row_stride


def _availability() -> tuple[bool, str]:
    if extension() is None:
        return False, extension_error()
    return True, ""


def isa() -> str:
    """The instruction set of the kernels a call runs now: "avx512bf16" (AVX-512, bf16
    products for bfloat16 features; by default on AMD CPUs with AVX512_BF16 only), "avx512",
    "avx2" or "generic" (128-bit); the CPU and ``FASTCLIP_CPU_ISA`` decide. Benchmarks record it: it changes the
    speed, and the rounding, of every product."""
    return extension().cpu_isa()


def kernels_for(x_dtype: torch.dtype, y_dtype: torch.dtype) -> str:
    """The build a call with these feature dtypes runs: ``isa()``, except that the
    "avx512bf16" build runs every dtype but bfloat16 on its fp32 products ("avx512"). Calls
    whose features hold values so small that a product of two could be subnormal take the fp32
    products too (the kernel checks; docs/design.md §2, "The CPU kernel")."""
    name = isa()
    if name == "avx512bf16" and not (x_dtype == y_dtype == torch.bfloat16):
        return "avx512"
    return name


def _prep(t: Tensor) -> Tensor:
    # Half precision runs the fp32 kernel: an O(n·D) copy; the op layer already gave a
    # kernel layout, and a dtype cast keeps it.
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _vec(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype).contiguous()


# Below this many multiply-adds a call runs on one thread (measured:
# benchmarks/results/cpu-kernel-tuning.md, "Small blocks run on one thread").
_SERIAL_BELOW = 1 << 20


def _threads(n: int, m: int, d: int) -> int:
    return 1 if n * m * d < _SERIAL_BELOW else torch.get_num_threads()


_ISAS = ("avx512bf16", "avx512", "avx2", "generic")


def _common(spec, x, y, params, normalize, eps, pos_offset):
    want = os.environ.get("FASTCLIP_CPU_ISA")
    if want and want not in _ISAS:
        # the kernels compare the exact names: anything else ran the best build, unsaid
        raise ValueError(f"FASTCLIP_CPU_ISA={want!r}: expected one of {', '.join(_ISAS)} (or unset)")
    xc, yc = _prep(x), _prep(y)
    n, d = xc.shape
    m = yc.shape[0]
    p = params.tolist()
    bias = p[1] if len(p) > 1 else 0.0
    head = (spec.code, xc.data_ptr(), yc.data_ptr(), n, m, d, row_stride(xc), row_stride(yc),
            xc.dtype == torch.float64, p[0], bias, bool(normalize), float(eps), int(pos_offset))
    # The fp32 copies hold bf16 values exactly: the kernels may take them as bf16 pairs.
    bf16 = x.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    return xc, yc, n, m, d, xc.dtype, head, bf16


def fwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float, pos_offset: int):
    xc, yc, n, m, d, dt, head, bf16 = _common(spec, x, y, params, normalize, eps, pos_offset)
    row, col, pos = (torch.empty(k, dtype=STAT_DTYPE, device=xc.device) for k in (n, m, n))
    extension().cpu_fwd(*head, row.data_ptr(), col.data_ptr(), pos.data_ptr(), _threads(n, m, d),
                        bf16)
    return row, col, pos


def _dparams(pair, params: Tensor, dt: torch.dtype) -> Tensor:
    return torch.tensor(pair[:params.numel()], dtype=dt, device=params.device)


def bwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float, pos_offset: int,
        row: Tensor, col: Tensor, grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor):
    xc, yc, n, m, d, dt, head, bf16 = _common(spec, x, y, params, normalize, eps, pos_offset)
    vecs = [_vec(t, STAT_DTYPE) for t in (row, col)] + [_vec(t, dt) for t in (grad_row,
                                                                             grad_col, grad_pos)]
    dx, dy = (torch.empty((k, d), dtype=dt, device=xc.device) for k in (n, m))
    pair = extension().cpu_bwd(*head, *(v.data_ptr() for v in vecs), dx.data_ptr(),
                               dy.data_ptr(), _threads(n, m, d), bf16)
    return dx.to(x.dtype), dy.to(y.dtype), _dparams(pair, params, dt)


def fwd_bwd(spec, x: Tensor, y: Tensor, params: Tensor, normalize: bool, eps: float,
            pos_offset: int, grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor):
    xc, yc, n, m, d, dt, head, bf16 = _common(spec, x, y, params, normalize, eps, pos_offset)
    grads = [_vec(t, dt) for t in (grad_row, grad_col, grad_pos)]
    row, col, pos = (torch.empty(k, dtype=STAT_DTYPE, device=xc.device) for k in (n, m, n))
    dx, dy = (torch.empty((k, d), dtype=dt, device=xc.device) for k in (n, m))
    pair = extension().cpu_fwd_bwd(*head, *(g.data_ptr() for g in grads), row.data_ptr(),
                                   col.data_ptr(), pos.data_ptr(), dx.data_ptr(), dy.data_ptr(),
                                   _threads(n, m, d), bf16)
    return row, col, pos, dx.to(x.dtype), dy.to(y.dtype), _dparams(pair, params, dt)


def _scratch_bytes(n: int, m: int, d: int, acc: int) -> int:
    """The per-thread dY buffers: all m columns unless that exceeds 64 MB, then chunks of at
    least 192 columns per thread (the module docstring)."""
    threads = torch.get_num_threads()
    return min(threads * m * d * acc, max(64 << 20, threads * 192 * d * acc))


register_backend(Backend(
    name="cpu", code=1, devices=("cpu",), dtypes=ALL_DTYPES,
    priority=100,                 # the fastest on the CPU (benchmarks/results/cpu-*.md)
    availability=_availability, fwd=fwd, bwd=bwd, fwd_bwd=fwd_bwd,
    losses=("clip", "siglip"), scratch_bytes=_scratch_bytes))
