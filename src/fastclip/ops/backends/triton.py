"""The ``triton`` backend: the Triton kernels of :mod:`fastclip.ops.triton`.

Runs on CUDA tensors; with ``TRITON_INTERPRET=1`` in the environment (set before
fastclip's Triton kernels are first imported) it runs on CPU tensors through Triton's
interpreter, slowly, for tests. Takes float32, float16 and bfloat16 features (float64
has no Triton tensor-core path: the dispatcher sends it elsewhere, or refuses it when
``backend="triton"`` is named). Implements both losses (the epilogue is a ``constexpr`` of
every kernel, ``LOSS = spec.code``) and ``fwd_bwd`` for one-pass losses (SigLIP): the two
backward passes with statistics, no forward kernel. ``triton`` itself is imported on first
use only.
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


def _availability(name: str) -> tuple[bool, str]:
    if not _installed():
        return False, ("the triton package is not installed (torch's CUDA wheels bring the Triton they "
                       "were built with; install that version, e.g. triton==3.9.0 for torch 2.13)")
    if _interpreting():
        why = _interpreter_problem()
        return (not why), why
    if not torch.cuda.is_available():   # makes no CUDA context
        return False, (f"the {name} backend needs a CUDA GPU and none is visible "
                       "(TRITON_INTERPRET=1 runs it on the CPU, slowly, for tests)")
    return True, ""


@functools.lru_cache(maxsize=None)
def _interpreter_problem() -> str:
    return _kernels().interpreter_problem()


def _kernels():
    from ..triton import contrastive_loss  # noqa: PLC0415  (imports triton: lazily)
    return contrastive_loss


def _priority(device: torch.device) -> int:
    # On a GPU: first (``gemm`` 15, ``cuda`` 10: benchmarks/results/cuda-nvidia-h200-notes.md,
    # 3x faster than ``cuda``). Under the interpreter on the CPU: below everything (slow).
    return 20 if device.type == "cuda" else -10


def triton_backend(name: str, code: int, priority, kernels, scratch_bytes=lambda n, m, d, acc: 0) -> Backend:
    """A backend whose block functions are those of a Triton launcher module (``kernels()``
    imports it, and triton, on first use; the loss goes to the kernels as its code): the
    devices, dtypes, availability and losses of every Triton backend here."""

    def fwd(spec, x, y, params, normalize, eps, pos_offset):
        return kernels().fwd(spec.code, x, y, params, normalize, eps, pos_offset)

    def bwd(spec, x, y, params, normalize, eps, pos_offset, row, col, grad_row, grad_col,
            grad_pos):
        return kernels().bwd(spec.code, x, y, params, normalize, eps, pos_offset, row, col,
                             grad_row, grad_col, grad_pos)

    def fwd_bwd(spec, x, y, params, normalize, eps, pos_offset, grad_row, grad_col, grad_pos):
        return kernels().fwd_bwd(spec.code, x, y, params, normalize, eps, pos_offset,
                                 grad_row, grad_col, grad_pos)

    return Backend(
        name=name,
        code=code,
        devices=("cuda", "cpu") if _interpreting() else ("cuda",),
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
        priority=priority,
        availability=functools.partial(_availability, name),
        fwd=fwd,
        bwd=bwd,
        fwd_bwd=fwd_bwd,
        losses=("clip", "siglip"),
        emulated=_interpreting,
        # Every logit is rounded alike in the forward and the backward (one helper,
        # _tile_dot/_logits, with the forward's operand order; IEEE fp32 dot = one in-order
        # fma chain per element: fastclip/ops/triton/contrastive_loss.py, "Rounding"): no
        # bound, for the fused kernels and the gemm backend's gradient tiles alike.
        exact_logits=float("inf"),
        scratch_bytes=scratch_bytes,
    )


register_backend(triton_backend("triton", 2, _priority, _kernels))
