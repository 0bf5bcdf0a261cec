"""The ``triton`` backend: the Triton kernels of :mod:`fastclip.ops.triton`.

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


def _priority(device: torch.device) -> int:
    # On a GPU: above ``reference``; the ``cuda`` backend ranks itself above or below this
    # per architecture. Under the interpreter on the CPU: below everything (it is slow).
    return 20 if device.type == "cuda" else -10


def fwd(spec, x, y, params, normalize, eps, pos_offset):
    row, col, pos = _kernels().fwd(x, y, params[:1].reshape(()), normalize, eps, pos_offset)
    return row, col, pos.double()


def bwd(spec, x, y, params, normalize, eps, pos_offset, row, col, grad_row, grad_col, grad_pos):
    dx, dy, ds = _kernels().bwd(x, y, params[:1].reshape(()), normalize, eps, pos_offset,
                                row, col, grad_row.float(), grad_col.float(), grad_pos.float())
    return dx, dy, ds.reshape(1)


register_backend(Backend(
    name="triton",
    code=2,
    devices=("cuda", "cpu") if _interpreting() else ("cuda",),
    dtypes=(torch.float32, torch.float16, torch.bfloat16),
    priority=_priority,
    availability=_availability,
    fwd=fwd,
    bwd=bwd,
    losses=("clip",),
    emulated=_interpreting,
    # Pass B of the backward recomputes each logit tile with x and y swapped: at s = 1e3 the
    # feature gradients are off by 1.7e-5 relative (fp32), 2.4e-4 at 1e4 (measured under
    # the interpreter); CLIP's scale is clamped at 100, where they meet the table.
    exact_logits=100.0,
))
