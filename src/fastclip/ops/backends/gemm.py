"""The ``gemm`` backend: the fused loss's logit tiles and epilogues in Triton, its two
gradient products on the vendor GEMM (torch.mm: cuBLAS on a GPU), chunk by chunk of rows
(fastclip/ops/triton/contrastive_loss_gemm.py).

Runs where the ``triton`` backend runs (CUDA tensors; CPU tensors under
``TRITON_INTERPRET=1``, slowly, for tests), on float32, float16 and bfloat16 features,
both losses, ``fwd_bwd`` for one-pass losses in 3 units of FLOP (the floor). Memory:
O(m·D) (an fp32 dY accumulator) plus one chunk of the logit matrix, 256 MiB (128 rows
where more: m > 2^20 in 16-bit), against O((n + m)·D) for the fused backends: beyond a few
hundred thousand rows the fused backends are the lean choice. Its GEMMs are PyTorch's: under
``torch.use_deterministic_algorithms(True)`` cuBLAS wants ``CUBLAS_WORKSPACE_CONFIG=:4096:8``
(PyTorch says so when it is missing), as every matmul of the model does.
"""

from __future__ import annotations

import torch

from . import register_backend
from .triton import triton_backend


def _kernels():
    from ..triton import contrastive_loss_gemm  # noqa: PLC0415  (imports triton: lazily)
    return contrastive_loss_gemm


def _priority(device: torch.device) -> int:
    # Below ``triton`` (20) until a GPU has measured it against the fused kernels; above
    # ``cuda`` (10). Under the interpreter on the CPU: below everything (it is slow).
    return 15 if device.type == "cuda" else -10


def _scratch_bytes(n: int, m: int, d: int, acc: int) -> int:
    # One chunk [R, m] of the logit matrix (the module docstring): R rows of ``acc`` bytes is
    # an upper bound for every feature dtype (a 16-bit chunk has twice the rows at half the
    # bytes), and holds past 256 MiB where the 128-row floor takes over (m > 2^19 in fp32:
    # a cap at 256 MiB undercounted it).
    try:
        from ..triton.contrastive_loss_gemm import chunk_rows  # noqa: PLC0415  (imports triton)
    except ImportError:          # no Triton: the backend cannot run; its nominal chunk
        return min(n * m, 1 << 26) * acc
    return chunk_rows(n, m, acc) * m * acc


register_backend(triton_backend("gemm", 4, _priority, _kernels, scratch_bytes=_scratch_bytes))
