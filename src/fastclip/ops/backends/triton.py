"""The ``triton`` backend: the Triton kernels of :mod:`fastclip.ops.triton` (issue 3).

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` in the environment (set before
fastclip's Triton kernels are first imported) it runs on CPU tensors through Triton's
interpreter, slowly, for tests. Takes float32, float16 and bfloat16 features (float64
has no Triton tensor-core path: the dispatcher sends it elsewhere, or refuses it when
``backend="triton"`` is named). ``triton`` itself is imported on first use only.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import Backend, register_backend


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _installed() -> bool:
    # Searching sys.path is the slow part of the probe, and `auto` asks on every call.
    return importlib.util.find_spec("triton") is not None


def _availability() -> tuple[bool, str]:
    if not _installed():
        return False, "the triton package is not installed (pip install triton)"
    if _interpreting():
        return True, ""
    if not torch.cuda.is_available():   # makes no CUDA context
        return False, ("the triton backend needs a CUDA GPU and none is visible "
                       "(TRITON_INTERPRET=1 runs it on the CPU, slowly, for tests)")
    return True, ""


def _kernels():
    from ..triton import contrastive_loss  # noqa: PLC0415  (imports triton: lazily)
    return contrastive_loss


def fwd(x, y, scale, normalize, eps, pos_offset):
    return _kernels().fwd(x, y, scale, normalize, eps, pos_offset)


def bwd(x, y, scale, normalize, eps, pos_offset, row_lse, col_lse, grad_row, grad_col,
        grad_pos):
    return _kernels().bwd(x, y, scale, normalize, eps, pos_offset, row_lse, col_lse, grad_row,
                          grad_col, grad_pos)


register_backend(Backend(
    name="triton",
    devices=("cuda", "cpu") if _interpreting() else ("cuda",),
    availability=_availability,
    fwd=fwd,
    bwd=bwd,
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
))
