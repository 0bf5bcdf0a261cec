"""Kernel backends of the fused contrastive losses and their registry.

This registry is the one place where backends are named: each backend module in this
package declares a :class:`Backend` (name, stable code, devices, dtypes, priority, the
losses it implements) and registers it; every other layer (the op, ``auto`` dispatch,
:mod:`fastclip.distributed`, the tests, the benchmarks) asks the registry. How to add a
backend or a loss: ``README.md`` beside this file.

Block contract (docs/design.md §1-§3). A block is a pair of row features ``x`` [n, D] and
column features ``y`` [m, D]; the single-device loss is one block, the sharded forms of
:mod:`fastclip.distributed` are many, glued together by the loss's merge. For a loss
``spec`` (:class:`fastclip.ops.losses.LossSpec`) with scalar parameters ``params`` [P]
(``params[0]`` = s, ``params[1]`` = b when P = 2)::

    u_ij = rho_i * sigma_j * <x_i, y_j>     rho, sigma = 1/max(||.||, eps) if normalize else 1
    z_ij = s * u_ij (+ b)                   the logits; j = i + pos_offset is i's positive
    fwd(spec, x, y, params, normalize, eps, pos_offset) -> (row [n], col [m], pos [n])
        row_i = MERGE_j f(z_ij)   col_j = MERGE_i f(z_ij)   (the loss's epilogue and merge)
        pos_i = z_{i, i+pos_offset}  (0 where i+pos_offset is outside [0, m); the logit as
                                      the forward's tile rounded it, see below)
    bwd(spec, x, y, params, normalize, eps, pos_offset, row, col,
        grad_row [n], grad_col [m], grad_pos [n]) -> (dx [n, D], dy [m, D], dparams [P])
        G_ij = grad_row_i d row_i/d z_ij + grad_col_j d col_j/d z_ij + grad_pos_i [j == i+off]
        dx, dy = d/dx, d/dy of sum_ij G_ij z_ij (G held fixed; through the normalisation)
        dparams = (sum_ij G_ij u_ij, sum_ij G_ij)[:P]
    fwd_bwd(spec, x, y, params, normalize, eps, pos_offset, grad_row, grad_col, grad_pos)
        -> (row, col, pos, dx, dy, dparams)   both at once; only for ``spec.one_pass`` losses

``bwd`` is exactly the vector-Jacobian product of ``fwd`` given the *merged* statistics
(for "lse" losses d row_i/d z_ij = exp(z_ij - row_i) with the merged row_i, which is also the
derivative through the merge). Statistics and ``pos`` are float64 whatever the features'
dtype (``fastclip.ops.losses.STAT_DTYPE``: an fp32 log-sum-exp of logits of 1e4 is off by
5e-4), and so are their upstream gradients; ``fwd``'s ``pos_i`` is the positive's logit taken
from the tile whose statistics include it (its rounding, stored in float64), so that a CLIP
row's ``row_i - pos_i`` cancels that rounding (exactly 0 at n = m = 1); ``fwd_bwd`` (SigLIP,
whose loss does not read ``pos``) may compute it apart, in float64; ``dparams`` is float32 (float64 for float64
inputs); ``dx``, ``dy`` have the features' dtype.

Inputs a backend receives (the op layer in :mod:`fastclip.ops.contrastive_loss` has validated
and normalised them): ``x`` and ``y`` 2-D, same dtype and device, n, m, D >= 1, unit stride
along D (or D = 1) and a row stride >= D (or a single row: use :func:`row_stride`);
``params`` a contiguous 1-D tensor of the accumulation dtype on the features' device; the
statistic and gradient vectors contiguous float64.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
import pkgutil
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

__all__ = ["Backend", "register_backend", "get_backend", "available_backends",
           "all_backends", "resolve_backend", "backend_by_code", "row_stride",
           "BackendUnavailableError", "ALL_DTYPES"]

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name but cannot run here; the message says why."""


@dataclass(frozen=True)
class Backend:
    """One implementation of the block functions.

    name: the registry key, also ``backend=`` of every public function.
    code: a small stable integer, unique among backends (the distributed handshake carries
        it to check that every rank runs the same backend).
    devices: device types it runs on ("cpu", "cuda").
    dtypes: feature dtypes it takes (others are refused by name and skipped by ``auto``).
    priority: ``auto`` takes the available backend with the highest priority for the
        features' device, dtype and loss; an int, or ``device -> int`` when it depends on
        the device (e.g. the GPU architecture).
    availability: () -> (ok, reason); the reason says how to get the backend when not ok.
    fwd, bwd, fwd_bwd: the block functions of the module docstring (``fwd_bwd`` None: the
        op runs ``fwd`` then ``bwd`` for one-pass losses too).
    losses: names of the losses whose epilogue it implements.
    emulated: () -> True when it runs through an interpreter here (slow: tests and
        benchmarks keep to small shapes), e.g. Triton under TRITON_INTERPRET=1.
    exact_logits: the largest |logit| up to which its float32 gradients meet the tolerance
        table of docs/design.md §5 (inf: any). A backward that recomputes the logits with a
        different rounding than its forward (another operand order or tiling) carries
        ε·|z| into every exp(z - lse): beyond this bound its gradients' relative error is
        at most 2^-23·max|z| instead (tested), e.g. 1.2e-3 at |z| = 1e4.
    scratch_bytes: (n, m, D, accumulator bytes) -> the bytes of its own buffers beyond the
        O((n+m)·D) every backend holds (the benchmarks' memory budget reads it): 0 for the
        fused kernels, their tiles and chunks for the others.
    """

    name: str
    code: int
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    priority: Union[int, Callable[[torch.device], int]]
    availability: Callable[[], tuple[bool, str]]
    fwd: Callable
    bwd: Callable
    fwd_bwd: Optional[Callable] = None
    losses: tuple[str, ...] = ("clip", "siglip")
    emulated: Callable[[], bool] = lambda: False
    exact_logits: float = float("inf")
    scratch_bytes: Callable[[int, int, int, int], int] = lambda n, m, d, acc: 0

    def available(self) -> bool:
        return self.availability()[0]

    def rank(self, device: torch.device) -> int:
        return self.priority(device) if callable(self.priority) else self.priority


_REGISTRY: dict[str, Backend] = {}
_RESOLVED: dict[tuple, Backend] = {}


def _without_autocast(fn: Optional[Callable]) -> Optional[Callable]:
    """``fn(spec, x, ...)`` run with autocast off on x's device. The op's contract is the
    features' own dtype with fp32 (or float64) accumulation whatever the caller's autocast
    says: the compiled kernels never see autocast, but a backend made of torch ops (the
    reference, gemm's GEMMs) would otherwise run fp32 inputs through bf16 matmuls inside
    an open_clip trainer's ``autocast()`` and return a less exact value than the others."""
    if fn is None or getattr(fn, "_fastclip_no_autocast", False):
        return fn

    @functools.wraps(fn)
    def run(spec, x, *args):
        dev = x.device.type
        if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(spec, x, *args)
        return fn(spec, x, *args)

    run._fastclip_no_autocast = True
    return run


def register_backend(backend: Backend) -> Backend:
    for other in _REGISTRY.values():
        if other.code == backend.code and other.name != backend.name:
            raise ValueError(f"backend code {backend.code} of {backend.name!r} is taken by "
                             f"{other.name!r}")
    backend = dataclasses.replace(backend, fwd=_without_autocast(backend.fwd),
                                  bwd=_without_autocast(backend.bwd),
                                  fwd_bwd=_without_autocast(backend.fwd_bwd))
    _REGISTRY[backend.name] = backend
    _RESOLVED.clear()
    return backend


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


def backend_by_code(code: int) -> Optional[Backend]:
    _load_builtin()
    return next((b for b in _REGISTRY.values() if b.code == code), None)


def row_stride(t: torch.Tensor) -> int:
    """The row stride to hand a kernel: a single row's stride is arbitrary in PyTorch
    (``torch.randn(8, 1).t()`` is contiguous with strides (1, 1)); kernels need >= D."""
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def tf32_matmul() -> bool:
    """Whether float32 matrix products may use TF32, as torch.matmul decides it now. torch >=
    2.9 keeps one setting that both of its APIs write (``allow_tf32 = True`` and
    ``set_float32_matmul_precision("high")`` make it "tf32", so does ``fp32_precision =
    "tf32"`` on ``torch.backends`` or ``torch.backends.cuda.matmul``); reading the legacy
    ``allow_tf32`` after the new API was used raises, so it is read only where the new
    setting does not exist."""
    flags = torch.backends.cuda.matmul
    if hasattr(flags, "fp32_precision"):
        return flags.fp32_precision == "tf32"
    return bool(flags.allow_tf32)


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_fits(b: Backend, name: str, device: torch.device, dtype, loss: str) -> None:
    if device.type not in b.devices:
        raise BackendUnavailableError(
            f"backend={name!r} runs on {'/'.join(b.devices)} tensors, but the features "
            f"are on {device}; move them or pass backend='auto'")
    if dtype is not None and dtype not in b.dtypes:
        raise BackendUnavailableError(
            f"backend={name!r} does not take {dtype} features (it takes "
            f"{_dtype_names(b.dtypes)}); cast them or pass backend='auto'")
    if loss not in b.losses:
        raise BackendUnavailableError(
            f"backend={name!r} does not implement the {loss!r} loss (it implements "
            f"{', '.join(b.losses)}); pass backend='auto'")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                    loss: str = "clip") -> Backend:
    """Pick the backend for ``loss`` on features of ``device`` (and ``dtype``, when given).

    ``"auto"`` honours ``FASTCLIP_BACKEND`` if set, else takes the available backend of the
    highest priority that runs on the device, takes the dtype and implements the loss. A
    backend named explicitly (argument or environment) that cannot run raises
    :class:`BackendUnavailableError` with the reason: never a silent fallback when the user
    asked for it by name. Results are cached per (name, device, dtype, loss, environment).
    """
    env = os.environ.get("FASTCLIP_BACKEND", "").strip()
    key = (backend, device, dtype, loss, env)
    hit = _RESOLVED.get(key)
    if hit is not None:
        return hit
    _load_builtin()
    from_env = backend == "auto" and env and env != "auto"
    name = env if from_env else backend
    if name != "auto":
        try:
            b = get_backend(name)
            ok, reason = b.availability()
            if not ok:
                raise BackendUnavailableError(f"backend={name!r} is not available: {reason}")
            _check_fits(b, name, device, dtype, loss)
        except (ValueError, BackendUnavailableError) as e:
            if from_env:      # the caller passed "auto": the name came from the environment
                raise type(e)(f"FASTCLIP_BACKEND={env!r} (backend='auto' honours it): {e}") from None
            raise
    else:
        fits = [b for b in _REGISTRY.values()
                if device.type in b.devices and (dtype is None or dtype in b.dtypes)
                and loss in b.losses and b.available()]
        if not fits:
            raise BackendUnavailableError(
                f"no fastclip backend runs the {loss!r} loss on device {device}"
                + ("" if dtype is None else f" with {dtype} features"))
        b = max(fits, key=lambda c: c.rank(device))     # ties: registration order
    _RESOLVED[key] = b
    return b


_LOADED = False
_LOADING = False
# Several threads' first calls at once: _LOADED was set before the imports, so the others found
# a registry empty or half filled ("no fastclip backend runs the 'clip' loss", or "auto" cached
# a backend other than the best). They now wait for the whole registry. Re-entrant: a backend
# module that looked a backend up while being imported would re-enter on the same thread.
_LOAD_LOCK = threading.RLock()


def _load_builtin() -> None:
    """Import every backend module of this package (each registers itself), once."""
    global _LOADED, _LOADING
    if _LOADED:
        return
    with _LOAD_LOCK:
        if _LOADED or _LOADING:
            return
        _LOADING = True
        try:
            for mod in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
                if not mod.name.startswith("_"):
                    importlib.import_module(f"{__name__}.{mod.name}")
        finally:
            _LOADING = False
        _LOADED = True
