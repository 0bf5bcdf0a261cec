"""Kernel backends of the fused contrastive loss and their registry.

Every backend implements the same two *block* functions. A block is a pair of
row features ``x`` [n, D] and column features ``y`` [m, D]; the single-device loss
is one block, the sharded forms of :mod:`fastclip.distributed` are many, glued
together by plain PyTorch ops (``logaddexp`` merges of the statistics) so that
autograd composes exactly.

Block contract (design.md §1-§3)::

    L_ij = s * rho_i * sigma_j * <x_i, y_j>       rho, sigma = 1/max(||.||, eps) if
                                                  normalize else 1
    fwd(x, y, scale, normalize, eps, pos_offset) -> (row_lse [n], col_lse [m], pos [n])
        row_lse_i = logsumexp_j L_ij        col_lse_j = logsumexp_i L_ij
        pos_i     = L_{i, i+pos_offset}     (0 where i+pos_offset is outside [0, m))
        all three float32 (float64 for float64 inputs).

    bwd(x, y, scale, normalize, eps, pos_offset, row_lse, col_lse,
        grad_row [n], grad_col [m], grad_pos [n]) -> (dx [n, D], dy [m, D], dscale [])
        G_ij   = grad_row_i * exp(L_ij - row_lse_i) + grad_col_j * exp(L_ij - col_lse_j)
                 + grad_pos_i * [j == i + pos_offset]
        dx     = d/dx sum_ij G_ij L_ij  (G held fixed; through the normalisation)
        dy     = d/dy sum_ij G_ij L_ij
        dscale = sum_ij G_ij L_ij / s
        dx, dy have the dtype of x, y; dscale is float32 (float64 for float64 inputs).

That is exactly the vector-Jacobian product of ``fwd``: autograd hands ``bwd`` the
upstream gradients of the three outputs, whatever loss was built from them.

Inputs a backend receives (the Python layer in ``fastclip.ops.contrastive_loss``
has validated them): ``x`` and ``y`` 2-D, same dtype and device, unit stride in
the last dimension (row stride arbitrary), n, m >= 1, D >= 1; ``scale`` a 0-dim
float32 tensor (float64 for float64 inputs) on the same device; the statistics and
gradient vectors contiguous, float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Backend", "register_backend", "get_backend", "available_backends",
           "all_backends", "resolve_backend", "BackendUnavailableError"]


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here; the message says why."""


@dataclass
class Backend:
    """One implementation of the block functions.

    name: registry key ("reference", "cpu", "triton", "cuda").
    devices: device types it runs on ("cpu", "cuda").
    availability: () -> (ok, reason); reason says how to get it when not ok.
    fwd, bwd: the block functions of the module docstring.
    dtypes: input dtypes it accepts natively (others are rejected before dispatch).
    """
    name: str
    devices: tuple[str, ...]
    availability: Callable[[], tuple[bool, str]]
    fwd: Callable
    bwd: Callable
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

    def available(self) -> bool:
        return self.availability()[0]


_REGISTRY: dict[str, Backend] = {}
# Preference of `auto` per device type, fastest first. The cuda entry is refined at
# run time by fastclip.ops.backends.cuda_preference (issue 7: a table keyed by GPU
# architecture); the CPU order is measured (benchmarks/results/cpu-*.md).
_AUTO_ORDER: dict[str, list[str]] = {"cpu": ["cpu", "reference"],
                                     "cuda": ["cuda", "triton", "reference"]}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def all_backends() -> dict[str, Backend]:
    _load_builtin()
    return dict(_REGISTRY)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Names of the backends that can run here (optionally: on tensors of ``device``)."""
    _load_builtin()
    dev = None if device is None else torch.device(device).type
    return [n for n, b in _REGISTRY.items() if b.available() and (dev is None or dev in b.devices)]


def get_backend(name: str) -> Backend:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is not a fastclip backend; expected one of "
                         f"{sorted(_REGISTRY) + ['auto']}")
    return _REGISTRY[name]


def _auto_order(device_type: str) -> list[str]:
    order = list(_AUTO_ORDER.get(device_type, ["reference"]))
    if device_type == "cuda":
        from . import cuda_preference  # noqa: PLC0415  (imported lazily: no CUDA at import)
        order = cuda_preference.auto_order(order)
    return order


def resolve_backend(backend: str, device: torch.device,
                    dtype: torch.dtype | None = None) -> Backend:
    """Pick the backend for tensors on ``device`` (and of ``dtype``, when given).

    ``"auto"`` honours ``FASTCLIP_BACKEND`` if set, else takes the first available
    backend of the device's preference list. A backend named explicitly (argument or
    environment) that cannot run raises :class:`BackendUnavailableError` with the
    reason: never a silent fallback when the user asked for it by name.
    """
    _load_builtin()
    if backend == "auto":
        env = os.environ.get("FASTCLIP_BACKEND", "").strip()
        if env and env != "auto":
            backend = env
    if backend != "auto":
        b = get_backend(backend)
        ok, reason = b.availability()
        if not ok:
            raise BackendUnavailableError(f"backend={backend!r} is not available: {reason}")
        if device.type not in b.devices:
            raise BackendUnavailableError(
                f"backend={backend!r} runs on {'/'.join(b.devices)} tensors, but the features "
                f"are on {device}; move them or pass backend='auto'")
        if dtype is not None and dtype not in b.dtypes:
            raise BackendUnavailableError(
                f"backend={backend!r} does not take {dtype} features (it takes "
                f"{', '.join(str(d).replace('torch.', '') for d in b.dtypes)}); cast them or "
                f"pass backend='auto'")
        return b
    for name in _auto_order(device.type):
        b = _REGISTRY.get(name)
        if (b is not None and device.type in b.devices and (dtype is None or dtype in b.dtypes)
                and b.available()):
            return b
    raise BackendUnavailableError(f"no fastclip backend runs on device {device}"
                                  + ("" if dtype is None else f" with {dtype} features"))


_LOADED = False


def _load_builtin() -> None:
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    from . import reference, cpu, triton, cuda  # noqa: F401,PLC0415  (each registers itself)
