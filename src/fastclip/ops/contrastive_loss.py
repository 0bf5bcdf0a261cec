"""The fused contrastive-loss op: validation, layout, dispatch, torch.library.

Three custom ops carry the block contract of :mod:`fastclip.ops.backends` for every loss
of :mod:`fastclip.ops.losses`:

* ``fastclip::contrastive_loss_fwd(x, y, params, loss, normalize, eps, pos_offset, backend)
  -> (row, col, pos)``, differentiable (its autograd formula is the next op);
* ``fastclip::contrastive_loss_bwd(...)``: its vector-Jacobian product;
* ``fastclip::contrastive_loss_fwd_bwd(...)``: both in one pass, for one-pass losses.

All three have fake (meta) implementations, so ``torch.compile(fullgraph=True)`` keeps a
graph that calls a loss whole. Eager calls (no compiler, no tensor subclass, no dispatch
mode) take a shorter path to the same backend functions: calling a custom op the first
time imports the compiler stack (``torch._dynamo``, seconds), and every call pays the
dispatcher; both paths run the same kernels on the same inputs (tested).

The public losses are heads on these ops: :func:`clip_loss` and :func:`siglip_loss`, both
:func:`fused_loss` with their :class:`~fastclip.ops.losses.LossSpec`.
"""

from __future__ import annotations

import contextlib
import numbers

import torch
from torch import Tensor

from . import flops as _flops
from .backends import Backend, get_backend, resolve_backend
from .losses import STAT_DTYPE, LossSpec, get_loss, head_grads
from .reference import acc_dtype
from .reference import block_fwd as _reference_block_fwd

__all__ = ["clip_loss", "siglip_loss", "fused_loss", "contrastive_loss_fwd",
           "contrastive_loss_bwd", "contrastive_loss_fwd_bwd", "DEFAULT_EPS",
           "validate_features", "promote_features", "validate_options", "prepare_params",
           "select_backend", "kernel_layout", "block_fwd", "block_bwd", "block_fwd_bwd",
           "one_pass"]

DEFAULT_EPS = 1e-12          # as torch.nn.functional.normalize
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- layout
def kernel_layout(t: Tensor) -> Tensor:
    """``t`` [k, D] in a layout every backend takes: unit stride along D (or D = 1) and a row
    stride >= D (or a single row). Anything else PyTorch calls valid (broadcast rows of
    stride 0, overlapping ``as_strided`` rows, column-strided views) is copied once here,
    with standard strides (``.contiguous()`` would return some of them unchanged). A
    negated view (``c.conj().imag``, ``torch._neg_view``) is made real first: its memory
    holds the values before the negation, which the kernels would read (a traced graph has
    no neg bits: the op bodies, run on real tensors, check)."""
    if not torch.compiler.is_compiling() and t.is_neg():
        t = t.resolve_neg()
    k, d = t.shape
    if (d == 1 or t.stride(1) == 1) and (k == 1 or t.stride(0) >= d):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _check_block(x: Tensor, y: Tensor, params: Tensor, loss: str, normalize: bool, eps: float,
                 pos_offset: int, backend: str, **vectors: Tensor
                 ) -> tuple[Backend, LossSpec, int]:
    """The arguments of a block op called directly (``torch.ops.fastclip.*``): what
    :func:`fused_loss` checks, plus the block's own (params [P] of the accumulation dtype;
    statistic and upstream vectors float64 of the rows' or columns' length, on the features'
    device). Returns the backend, the loss and the offset clamped as :func:`fused_loss`
    clamps it: the kernels read these raw, so nothing unchecked reaches them."""
    spec = get_loss(loss)
    validate_features(x, y, same_rows=False)
    validate_options(normalize, eps, x.dtype)
    be = resolve_backend(backend, x.device, x.dtype, spec.name)
    n, m = x.shape[0], y.shape[0]
    p, acc = len(spec.params), acc_dtype(x.dtype)
    if params.shape != (p,) or params.dtype != acc or params.device != x.device:
        raise ValueError(f"params must be a 1-D {acc} tensor of {p} element(s) "
                         f"({', '.join(spec.params)}) on {x.device} for loss {loss!r}, got shape "
                         f"{tuple(params.shape)} {params.dtype} on {params.device}")
    for name, v in vectors.items():
        k = m if name in ("col", "grad_col") else n
        if v.shape != (k,) or v.dtype != STAT_DTYPE or v.device != x.device:
            raise ValueError(f"{name} must be a 1-D {STAT_DTYPE} tensor of {k} elements on "
                             f"{x.device}, got shape {tuple(v.shape)} {v.dtype} on {v.device}")
    return be, spec, clamped_offset(pos_offset, n, m)


def clamped_offset(pos_offset: int, n: int, m: int) -> int:
    """Any offset beyond an [n, m] block means "no positive in any row": clamped to the
    nearest such value, so that i + pos_offset never overflows the kernels' 64-bit index
    (|offset| ~ 2^63)."""
    return max(-n, min(m, int(pos_offset)))


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("fastclip::contrastive_loss_fwd", mutates_args=())
def contrastive_loss_fwd(x: Tensor, y: Tensor, params: Tensor, loss: str, normalize: bool,
                         eps: float, pos_offset: int, backend: str
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Block forward: (row [n], col [m], pos [n]); see fastclip.ops.backends."""
    be, spec, pos_offset = _check_block(x, y, params, loss, normalize, eps, pos_offset, backend)
    return be.fwd(spec, kernel_layout(x), kernel_layout(y), params, normalize, eps, pos_offset)


@contrastive_loss_fwd.register_fake
def _(x, y, params, loss, normalize, eps, pos_offset, backend):
    st = STAT_DTYPE
    return (x.new_empty((x.shape[0],), dtype=st), y.new_empty((y.shape[0],), dtype=st),
            x.new_empty((x.shape[0],), dtype=st))


@torch.library.custom_op("fastclip::contrastive_loss_bwd", mutates_args=())
def contrastive_loss_bwd(x: Tensor, y: Tensor, params: Tensor, loss: str, normalize: bool,
                         eps: float, pos_offset: int, backend: str, row: Tensor, col: Tensor,
                         grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Block backward: (dx [n, D], dy [m, D], dparams [P]); see fastclip.ops.backends."""
    be, spec, pos_offset = _check_block(x, y, params, loss, normalize, eps, pos_offset, backend,
                                        row=row, col=col, grad_row=grad_row, grad_col=grad_col,
                                        grad_pos=grad_pos)
    return be.bwd(spec, kernel_layout(x), kernel_layout(y), params, normalize, eps, pos_offset,
                  row.contiguous(), col.contiguous(), grad_row.contiguous(),
                  grad_col.contiguous(), grad_pos.contiguous())


@contrastive_loss_bwd.register_fake
def _(x, y, params, loss, normalize, eps, pos_offset, backend, row, col, grad_row, grad_col,
      grad_pos):
    # new_empty, not empty_like: the kernels return contiguous gradients whatever the strides
    # of x and y (empty_like would keep a transposed input's strides).
    return x.new_empty(x.shape), y.new_empty(y.shape), params.new_empty(params.shape)


@torch.library.custom_op("fastclip::contrastive_loss_fwd_bwd", mutates_args=())
def contrastive_loss_fwd_bwd(x: Tensor, y: Tensor, params: Tensor, loss: str, normalize: bool,
                             eps: float, pos_offset: int, backend: str, grad_row: Tensor,
                             grad_col: Tensor, grad_pos: Tensor
                             ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One-pass block forward and backward (one-pass losses only):
    (row [n], col [m], pos [n], dx [n, D], dy [m, D], dparams [P])."""
    be, spec, pos_offset = _check_block(x, y, params, loss, normalize, eps, pos_offset, backend,
                                        grad_row=grad_row, grad_col=grad_col, grad_pos=grad_pos)
    return _fwd_bwd_impl(be, spec, kernel_layout(x), kernel_layout(y), params, normalize, eps,
                         pos_offset, grad_row.contiguous(), grad_col.contiguous(),
                         grad_pos.contiguous())


@contrastive_loss_fwd_bwd.register_fake
def _(x, y, params, loss, normalize, eps, pos_offset, backend, grad_row, grad_col, grad_pos):
    st = STAT_DTYPE
    return (x.new_empty((x.shape[0],), dtype=st), y.new_empty((y.shape[0],), dtype=st),
            x.new_empty((x.shape[0],), dtype=st), x.new_empty(x.shape), y.new_empty(y.shape),
            params.new_empty(params.shape))


def _fwd_bwd_impl(be: Backend, spec: LossSpec, x, y, params, normalize, eps, pos_offset,
                  grad_row, grad_col, grad_pos):
    if not spec.one_pass:
        raise ValueError(f"loss {spec.name!r} needs its merged statistics for the gradient: "
                         f"call contrastive_loss_fwd, then contrastive_loss_bwd")
    if be.fwd_bwd is not None:
        return be.fwd_bwd(spec, x, y, params, normalize, eps, pos_offset, grad_row, grad_col,
                          grad_pos)
    # A backend without a fused pass: the same numbers from its two passes.
    row, col, pos = be.fwd(spec, x, y, params, normalize, eps, pos_offset)
    dx, dy, dp = be.bwd(spec, x, y, params, normalize, eps, pos_offset, row, col, grad_row,
                        grad_col, grad_pos)
    return row, col, pos, dx, dy, dp


def savable_for_backward(t: Tensor) -> Tensor:
    # Features made under torch.inference_mode() cannot be saved for a backward (a scale that
    # requires grad still needs them): a copy outside inference mode can.
    # (A compiled graph's saved tensors are the compiler's: nothing to do there.)
    if torch.compiler.is_compiling():
        return t
    return t.clone() if t.is_inference() else t


def _setup_context(ctx, inputs, output):
    x, y, params, loss, normalize, eps, pos_offset, backend = inputs
    row, col, _ = output
    ctx.save_for_backward(*map(savable_for_backward, (x, y, params)), row, col)
    ctx.cfg = (loss, normalize, eps, pos_offset, backend)


def _zeros_for_none(g, like: Tensor) -> Tensor:
    # Outputs the loss did not use arrive as None: their gradient is zero.
    return torch.zeros_like(like) if g is None else g


def _backward(ctx, g_row, g_col, g_pos):
    x, y, params, row, col = ctx.saved_tensors
    loss, normalize, eps, pos_offset, backend = ctx.cfg
    _refuse_batched_grads(g_row, g_col, g_pos)
    if torch.is_grad_enabled():          # create_graph=True: a differentiable backward
        return (*differentiable_vjp(get_loss(loss), x, y, params, normalize, eps, pos_offset,
                                    (g_row, g_col, g_pos)), None, None, None, None, None)
    dx, dy, dp = contrastive_loss_bwd(x, y, params, loss, normalize, eps, pos_offset, backend,
                                      row, col, _zeros_for_none(g_row, row),
                                      _zeros_for_none(g_col, col), _zeros_for_none(g_pos, row))
    return dx, dy, dp.to(params.dtype), None, None, None, None, None


contrastive_loss_fwd.register_autograd(_backward, setup_context=_setup_context)
_flops.install()        # FlopCounterMode counts the ops' products (fastclip.ops.flops)


# ------------------------------------------------------- eager path to the same kernels
def _eager(*tensors: Tensor) -> bool:
    """True when the custom-op machinery can be skipped: not tracing or compiling, no
    dispatch mode (fake tensors, ...) active, plain tensors only."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return False
    return all(type(t) is Tensor or type(t) is torch.nn.Parameter for t in tensors)


def differentiable_vjp(spec: LossSpec, x: Tensor, y: Tensor, params: Tensor, normalize: bool,
                      eps: float, pos_offset: int, grads) -> tuple:
    """The block's vector-Jacobian product as a differentiable graph, for a backward with
    ``create_graph=True`` (a second derivative: gradient penalties, higher-order methods):
    the reference block forward (plain PyTorch, :mod:`fastclip.ops.reference`) re-run with
    autograd on, and differentiated with ``create_graph``. It keeps every chunk of logits
    for the graph: O(n·m) memory, like the unfused loss; a first-order backward never takes
    it. ``grads``: the upstream gradients of (row, col, pos), None where unused. Returns
    (dx, dy, dparams), None for an input that does not require grad."""
    wrt = [t for t in (x, y, params) if t.requires_grad]
    out = [None, None, None]
    if not wrt:
        return tuple(out)
    # Autocast off, as for the fused kernels: under torch.autocast the reference's matmuls
    # ran in bf16/fp16 and a create_graph gradient of fp32 features came out 1e-2 off
    # (first order: 2e-7).
    with torch.enable_grad(), _no_autocast(x.device):
        stats = _reference_block_fwd(spec, x, y, params, normalize, eps, pos_offset)
        pairs = [(s_, g.to(s_.dtype)) for s_, g in zip(stats, grads) if g is not None]
        try:
            got = torch.autograd.grad([a for a, _ in pairs], wrt, [g for _, g in pairs],
                                      create_graph=True, allow_unused=True)
        except RuntimeError as e:
            # torch.func.vjp / jacrev run this backward where the saved inputs are not tracked
            # at the transform's level (torch.func.grad's are): say what is supported.
            if _functorch_active() or any(_functorch_wrapped(t) for t in (x, y, params)):
                _no_vmap(e)
            raise
    it = iter(got)
    for i, t in enumerate((x, y, params)):
        if t.requires_grad:
            g = next(it)
            out[i] = torch.zeros_like(t) if g is None else g.to(t.dtype)
    return tuple(out)


def _no_autocast(device: torch.device):
    """A context that turns autocast off on ``device``'s type (a no-op where that type has no
    autocast, e.g. meta)."""
    available = getattr(torch.amp, "is_autocast_available", None)
    if available is not None and available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _no_vmap(*_args, **_kwargs):
    raise NotImplementedError(
        "fastclip's fused losses support torch.func.grad and grad_and_value, not vmap, vjp, "
        "jvp, jacrev, jacfwd or hessian: the kernels take one batch of features, not a batch "
        "of batches, and have no forward-mode derivative. Use torch.func.grad (or "
        "torch.autograd.grad, create_graph=True for second derivatives); for per-sample "
        "losses loop over the batches, or use the materialising formula "
        "fastclip.ops.reference.clip_loss_naive / siglip_loss_naive")


def _refuse_batched_grads(*grads) -> None:
    """A batch of upstream gradients (``torch.autograd.grad(..., is_grads_batched=True)``, which
    ``jacobian(vectorize=True)`` uses) is vmap over the backward: the message, not a kernel's
    "Cannot access data pointer of Tensor that doesn't have storage"."""
    if not torch.compiler.is_compiling() and any(
            g is not None and (_batched(g) or _legacy_batched(g)) for g in grads):
        _no_vmap()


class _EagerBlock(torch.autograd.Function):
    """contrastive_loss_fwd and its registered backward, without the dispatcher."""

    @staticmethod
    def forward(x, y, params, spec, be, normalize, eps, pos_offset):
        return be.fwd(spec, x, y, params, normalize, eps, pos_offset)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, params, spec, be, normalize, eps, pos_offset = inputs
        row, col, _ = output
        ctx.save_for_backward(*map(savable_for_backward, (x, y, params)), row, col)
        ctx.cfg = (spec, be, normalize, eps, pos_offset)

    vmap = staticmethod(_no_vmap)
    jvp = staticmethod(_no_vmap)          # forward mode (jacfwd, hessian): refused with the message

    @staticmethod
    def backward(ctx, g_row, g_col, g_pos):
        x, y, params, row, col = ctx.saved_tensors
        spec, be, normalize, eps, pos_offset = ctx.cfg
        _refuse_batched_grads(g_row, g_col, g_pos)
        if torch.is_grad_enabled():      # create_graph=True: a differentiable backward
            return (*differentiable_vjp(spec, x, y, params, normalize, eps, pos_offset,
                                        (g_row, g_col, g_pos)), None, None, None, None, None)
        dx, dy, dp = be.bwd(spec, x, y, params, normalize, eps, pos_offset, row, col,
                            _zeros_for_none(g_row, row).contiguous(),
                            _zeros_for_none(g_col, col).contiguous(),
                            _zeros_for_none(g_pos, row).contiguous())
        return dx, dy, dp.to(params.dtype), None, None, None, None, None


def _combined_style(fn: type) -> type:
    """``fn`` (a setup_context-style Function) in the combined ``forward(ctx, ...)`` style, for
    calls outside torch.func transforms: ``Function.apply`` binds a setup_context-style
    forward's arguments with ``inspect.signature`` at every call, 45-50 µs of a 380 µs CLIP
    forward+backward at N = 32 (2-core Zen 4, measured). Same forward, context and backward."""
    def forward(ctx, *args):
        out = fn.forward(*args)
        fn.setup_context(ctx, args, out)
        return out
    return type(f"{fn.__name__}Eager", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(fn.backward)})


_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor",
                             lambda t: False)
_forward_ad = torch.autograd.forward_ad
# The batched upstream gradients of is_grads_batched=True (torch's older vmap), and vmap's
# (torch.func.grad's are wrapped too, not batched).
_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", lambda t: False)
_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", lambda t: False)


def _apply(fn: type, fast: type, *args):
    """``fn.apply`` under torch.func transforms (they need setup_context) and inside a forward-mode
    AD level (``fn.jvp`` refuses with the message, where ``fast``, which Dynamo traces and so
    has no jvp, got PyTorch's "You must implement the jvp function"), else ``fast``'s."""
    if not torch.compiler.is_compiling() and (_functorch_active() or _forward_ad._current_level >= 0):
        return fn.apply(*args)
    return fast.apply(*args)


_EagerBlockFast = _combined_style(_EagerBlock)


def block_fwd(spec: LossSpec, be: Backend, x: Tensor, y: Tensor, params: Tensor,
              normalize: bool, eps: float, pos_offset: int) -> tuple[Tensor, Tensor, Tensor]:
    """Differentiable block forward (row, col, pos) on backend ``be``; inputs validated and
    in :func:`kernel_layout` already."""
    if _eager(x, y, params):
        return _apply(_EagerBlock, _EagerBlockFast, x, y, params, spec, be, normalize, eps,
                      pos_offset)
    return contrastive_loss_fwd(x, y, params, spec.name, normalize, eps, pos_offset, be.name)


def block_bwd(spec: LossSpec, be: Backend, x, y, params, normalize, eps, pos_offset, row, col,
              grad_row, grad_col, grad_pos) -> tuple[Tensor, Tensor, Tensor]:
    """The block's vector-Jacobian product (not differentiable)."""
    if _eager(x, y, params):
        return be.bwd(spec, x, y, params, normalize, eps, pos_offset, row, col, grad_row,
                      grad_col, grad_pos)
    return contrastive_loss_bwd(x, y, params, spec.name, normalize, eps, pos_offset, be.name,
                                row, col, grad_row, grad_col, grad_pos)


def block_fwd_bwd(spec: LossSpec, be: Backend, x, y, params, normalize, eps, pos_offset,
                  grad_row, grad_col, grad_pos):
    """One-pass statistics and gradients of a one-pass loss (not differentiable)."""
    if _eager(x, y, params):
        return _fwd_bwd_impl(be, spec, x, y, params, normalize, eps, pos_offset, grad_row,
                             grad_col, grad_pos)
    return contrastive_loss_fwd_bwd(x, y, params, spec.name, normalize, eps, pos_offset,
                                    be.name, grad_row, grad_col, grad_pos)


def one_pass(spec: LossSpec, dtype: torch.dtype) -> bool:
    """Whether a differentiable call computes ``spec``'s gradients in its forward, for
    features of ``dtype``: a one-pass loss, except on float16 features. The one pass makes
    the gradients for an upstream gradient of 1 and stores them in the features' dtype; the
    backward's upstream (a GradScaler's scale) multiplies them only after that rounding, so
    fp16's narrow range flushed the small ones to zero whatever the scale (SigLIP, N = 8192,
    D = 128, t = 10, b = -10: 225 entries of dX zeroed and 5e-4 relative error on the
    entries below 6.1e-5 at a scale of 1 and of 65536 alike). The two passes multiply the
    upstream into the backward's fp32 accumulation, as CLIP's do (1.9e-4 and none zeroed at
    65536). bfloat16 keeps the one pass: its range is float32's, so a scale changes nothing."""
    return spec.one_pass and dtype != torch.float16


class _OnePassLoss(torch.autograd.Function):
    """A one-pass loss: the forward also computes the gradients of the loss for an upstream
    gradient of 1 (the head is linear), the backward scales them by the upstream gradient."""

    @staticmethod
    def _unit_grads(spec, x, y):
        """d loss / d (row, col, pos) for an upstream gradient of 1: the linear head's weights
        (the statistics' values do not matter, zeros of their shapes stand in)."""
        n, m = x.shape[0], y.shape[0]
        return head_grads(spec, *(torch.zeros(k, dtype=STAT_DTYPE, device=x.device)
                                  for k in (n, m, n)), spec.denominator(n))

    @staticmethod
    def forward(x, y, params, gr, gc, gp, spec, be, normalize, eps, pos_offset):
        n = x.shape[0]
        row, col, pos, dx, dy, dp = block_fwd_bwd(spec, be, x, y, params, normalize, eps,
                                                  pos_offset, gr, gc, gp)
        loss = (spec.head(row, col, pos) / spec.denominator(n)).to(params.dtype)
        return loss, dx, dy, dp

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, params, _gr, _gc, _gp, spec, be, normalize, eps, pos_offset = inputs
        _, dx, dy, dp = output
        ctx.mark_non_differentiable(dx, dy, dp)
        # No zero gradients made for the three non-differentiable outputs: they would be
        # [N, D] buffers of zeros in the backward (+1 N·D·4 bytes of peak, measured).
        ctx.set_materialize_grads(False)
        # The inputs too, for a second derivative only (references, no copy; a copy only of
        # features made under inference mode, which cannot be saved otherwise).
        ctx.save_for_backward(dx, dy, dp, *map(savable_for_backward, (x, y, params)))
        ctx.cfg = (spec, normalize, eps, pos_offset)

    vmap = staticmethod(_no_vmap)
    jvp = staticmethod(_no_vmap)          # forward mode (jacfwd, hessian): refused with the message

    @staticmethod
    def backward(ctx, g, *_unused):
        if g is None:
            return (None,) * 11
        dx, dy, dp, x, y, params = ctx.saved_tensors
        if torch.is_grad_enabled():      # create_graph=True: a differentiable backward
            spec, normalize, eps, pos_offset = ctx.cfg
            gr, gc, gp = _OnePassLoss._unit_grads(spec, x, y)
            g64 = g.to(STAT_DTYPE)
            return (*differentiable_vjp(spec, x, y, params, normalize, eps, pos_offset,
                                        (gr * g64, gc * g64, gp * g64)),
                    *(None,) * 8)
        return ((dx * g).to(dx.dtype), (dy * g).to(dy.dtype), dp * g, *(None,) * 8)


_OnePassLossFast = _combined_style(_OnePassLoss)


# ----------------------------------------------------------------------- validation
def validate_features(image_features, text_features, *, same_rows: bool = True,
                      same_dtype: bool = True) -> None:
    """Raise a clear error for anything the kernels cannot take, before any kernel runs
    (``same_dtype=False``: the caller promotes two float dtypes, :func:`promote_features`)."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [N, D], got {type(t).__name__}")
        _check_dense(name, t)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(t.shape)} "
                             f"({t.dim()}-D)")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got "
                            f"{t.dtype} (shape {tuple(t.shape)}, device {t.device})")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)}); the "
                             f"contrastive loss needs at least one row")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has D=0 features (shape {tuple(t.shape)}); expected D >= 1")
    x, y = image_features, text_features
    if x.device != y.device:
        raise ValueError(f"image_features is on {x.device} but text_features is on {y.device}; "
                         f"both must be on the same device")
    if same_dtype and x.dtype != y.dtype:
        raise TypeError(f"image_features is {x.dtype} but text_features is {y.dtype}; both must "
                        f"have the same dtype")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: image_features {tuple(x.shape)} and "
                         f"text_features {tuple(y.shape)} must share D")
    if same_rows and x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: image_features has N={x.shape[0]} rows and "
                         f"text_features M={y.shape[0]}; row i's positive is column i, so "
                         f"N must equal M")


def promote_features(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Features of two float dtypes (fp32 text embeddings cached beside a bf16 image tower
    under autocast) in their common dtype, ``torch.promote_types``: nothing rounded, and
    each gradient returns in its own input's dtype."""
    if x.dtype == y.dtype:
        return x, y
    t = torch.promote_types(x.dtype, y.dtype)
    return x.to(t), y.to(t)


def _check_dense(name: str, t: Tensor, shape: str = "[N, D]") -> None:
    # Sparse, nested and other non-strided tensors have no strides for the kernels to read
    # (and torch fails on them deep inside with messages that do not name the argument).
    if t.is_nested or t.layout != torch.strided:
        what = "nested" if t.is_nested else str(t.layout).removeprefix("torch.")
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {what} tensor; "
                        f"convert it to a dense one of shape {shape} first")


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _finite(v: float) -> bool:
    # math.isfinite without math: under torch.compile(dynamic=True) a Python float may be a
    # symbolic one, which math.isfinite cannot take (a graph break); v - v is nan for
    # inf and nan, 0 otherwise.
    return v - v == 0


def validate_options(normalize, eps, dtype: torch.dtype | None = None) -> None:
    """``normalize`` a bool, ``eps`` a finite positive real: a clear error otherwise. With the
    features' ``dtype`` and ``normalize``: also ``eps`` at least the smallest normal number of
    the accumulation dtype (below it, 1/eps overflows there and a row of zeros became NaN)."""
    numpy_bool = type(normalize).__module__ == "numpy" and type(normalize).__name__ in ("bool",
                                                                                      "bool_")
    if not isinstance(normalize, bool) and not numpy_bool:
        raise TypeError(f"normalize must be a bool, got {normalize!r} "
                        f"({type(normalize).__name__})")
    if not _is_real(eps) or not _finite(float(eps)) or float(eps) <= 0:
        raise ValueError(f"eps must be a finite positive float (the floor on the row norm "
                         f"when normalize=True), got {eps!r}")
    if dtype is not None and normalize:
        acc = acc_dtype(dtype)
        tiny = torch.finfo(acc).tiny
        if float(eps) < tiny:
            raise ValueError(f"eps={eps!r} is below {tiny:.4g}, the smallest normal number of "
                             f"{acc} (in which {dtype} features are normalised): 1/eps overflows "
                             f"there and a row of zeros would give NaN; use eps >= {tiny:.4g}")


def _prepare_param(name: str, value, like: Tensor) -> Tensor:
    """One scalar parameter (float or one-element tensor) as a 0-dim tensor of the
    accumulation dtype on ``like``'s device, differentiable when it requires grad."""
    acc = acc_dtype(like.dtype)
    if _is_real(value):
        try:
            v = float(value)
        except OverflowError:            # an int beyond any float (10**400)
            v = None
        if v is None or (_finite(v) and abs(v) > torch.finfo(acc).max):
            raise ValueError(f"{name}={value!r} is beyond the range of {acc}, the precision the "
                             f"kernels compute {like.dtype} features in (|{name}| <= "
                             f"{torch.finfo(acc).max:.3g})")
        # zeros + v, not torch.tensor(v): under torch.compile(dynamic=True) a Python float stays
        # a symbolic input this way, where torch.tensor(v) specialises (a recompile per value)
        return torch.zeros((), dtype=acc, device=like.device) + v
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a float or a tensor with one element, got "
                        f"{type(value).__name__}")
    _check_dense(name, value, "[] or [1]")
    if value.numel() != 1:
        raise ValueError(f"{name} must have exactly one element, got shape {tuple(value.shape)}")
    if value.dtype == torch.bool or value.is_complex():
        raise TypeError(f"{name} must be a real number tensor, got {value.dtype}")
    return param_on_device(name, value, like).reshape(()).to(acc)


def param_on_device(name: str, value: Tensor, like: Tensor) -> Tensor:
    """A scalar parameter tensor on the features' device: a CPU one is moved there (as
    PyTorch lets a CPU scalar meet a GPU tensor); another device is a ValueError naming it
    (the loss would otherwise come back on that device)."""
    if value.device != like.device:
        if value.device.type != "cpu":
            raise ValueError(f"{name} is on {value.device} but the features are on "
                             f"{like.device}")
        value = value.to(like.device)
    return value


def prepare_params(spec: LossSpec, values, like: Tensor) -> Tensor:
    """The loss's scalar parameters (``spec.params`` order) as one 1-D tensor [P] of the
    accumulation dtype on ``like``'s device, differentiable in every one that requires grad.

    Any real value is accepted, float or tensor alike (the kernels are exact for any scale,
    0 and negative included); a non-finite value, float or tensor, gives a non-finite loss,
    as non-finite features do, so AMP's GradScaler sees it and skips the step. The values
    are held in the accumulation dtype (float32, float64 for float64 features): a float
    beyond its range is refused, a tensor beyond it becomes infinite there (a non-finite
    loss).
    """
    try:
        values = list(values)                # a tuple, a list, a 1-D tensor [P]
    except TypeError:
        values = None
    if values is None or len(values) != len(spec.params):
        # (zip dropped what was missing: siglip given [scale] ran with bias 0, silently)
        raise ValueError(f"params of loss {spec.name!r} must be its {len(spec.params)} parameters "
                         f"({', '.join(spec.params)}) in a sequence, got "
                         f"{'a non-sequence' if values is None else len(values)}")
    ps = [_prepare_param(name, v, like) for name, v in zip(spec.params, values)]
    return ps[0].reshape(1) if len(ps) == 1 else torch.stack(ps)


def _resolved_name(backend: str, device: torch.device, dtype: torch.dtype | None,
                   loss: str) -> str:
    # Run by torch.compile at trace time, its result a constant of the graph: the registry's
    # module discovery and availability probes (file system, CUDA, Triton) are not traced.
    return resolve_backend(backend, device, dtype, loss).name


# What torch.compiler.assume_constant_result(_resolved_name) does (it sets this attribute and
# returns the function), without the import of torch._dynamo that the public decorator makes
# first: ~1.5 s at `import fastclip` for eager users, who never need it. A test checks that
# the public decorator still sets exactly this (tests/ops/test_contrastive_loss.py).
_resolved_name._dynamo_marked_constant = True


def select_backend(backend: str, device: torch.device, dtype: torch.dtype | None = None,
                   loss: str = "clip") -> Backend:
    """Resolve ``backend`` ("auto" or a name) for ``loss`` on features of ``device``/``dtype``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if torch.compiler.is_compiling():
        return get_backend(_resolved_name(backend, device, dtype, loss))
    return resolve_backend(backend, device, dtype, loss)


# --------------------------------------------------------------------------- public
def fused_loss(loss: str, image_features: Tensor, text_features: Tensor, params, *,
               normalize: bool = False, backend: str = "auto", eps: float = DEFAULT_EPS,
               pos_offset: int = 0) -> Tensor:
    """The loss ``loss`` (a name of :data:`fastclip.ops.losses.LOSSES`) of one batch:
    ``head(row, col, pos) / denominator(N)`` of its block statistics; ``params`` its scalar
    parameters in ``LossSpec.params`` order. See :func:`clip_loss`, :func:`siglip_loss`.

    ``pos_offset`` (default 0): row i's positive is column ``i + pos_offset``; a row whose
    positive falls outside [0, N) has none (``pos_offset=N``: every pair a negative, as
    open_clip's ``SigLipLoss`` scores the blocks of other ranks' texts)."""
    spec = get_loss(loss)
    validate_features(image_features, text_features, same_dtype=False)
    image_features, text_features = promote_features(image_features, text_features)
    validate_options(normalize, eps, image_features.dtype)
    if not isinstance(pos_offset, numbers.Integral) or isinstance(pos_offset, bool):
        raise TypeError(f"pos_offset must be an int, got {pos_offset!r}")
    p = prepare_params(spec, params, image_features)
    be = select_backend(backend, image_features.device, image_features.dtype, spec.name)
    x, y = kernel_layout(image_features), kernel_layout(text_features)
    normalize, eps = bool(normalize), float(eps)
    pos_offset = clamped_offset(pos_offset, x.shape[0], y.shape[0])
    # torch.export keeps the op, not the autograd.Function around it: an exported graph's
    # backward is the block forward's registered autograd, so it takes the two passes.
    if one_pass(spec, x.dtype) and torch.is_grad_enabled() and (
            x.requires_grad or y.requires_grad or p.requires_grad) and (
            not torch.compiler.is_exporting()):
        # The unit upstream gradients are made here, outside the Function: made in its forward
        # from the row counts, they were tensors of a symbolic size inside the traced forward,
        # and torch.compile(dynamic=True) of a step with two one-pass losses failed there
        # ("lift_tracked_freevar_to_input should not be called on root SubgraphTracer").
        gr, gc, gp = _OnePassLoss._unit_grads(spec, x, y)
        return _apply(_OnePassLoss, _OnePassLossFast, x, y, p, gr, gc, gp, spec, be, normalize,
                      eps, pos_offset)[0]
    row, col, pos = block_fwd(spec, be, x, y, p, normalize, eps, pos_offset)
    # The head in float64 (the statistics' dtype), the loss in the accumulation dtype.
    return (spec.head(row, col, pos) / spec.denominator(x.shape[0])).to(p.dtype)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              normalize: bool = False, backend: str = "auto",
              eps: float = DEFAULT_EPS) -> Tensor:
    """Symmetric CLIP loss, fused: never materialises the N×N logits.

    Args:
        image_features: [N, D] float32/float64/float16/bfloat16, any strides.
        text_features: [N, D] on the same device; row i's positive is text i. A different
            float dtype is promoted (``torch.promote_types``) and each gradient returns in
            its own input's dtype.
        logit_scale: the already-exponentiated scale s (open_clip passes
            ``logit_scale.exp()``): a float or a one-element tensor, possibly requiring
            grad. Any real value; a non-finite one gives a non-finite loss.
        normalize: L2-normalise the rows inside the kernel (default False: the
            features are assumed normalised, as open_clip's models return them).
        backend: "auto" (default; ``FASTCLIP_BACKEND`` overrides) or a backend name
            (``fastclip.available_backends()``).
        eps: the normalisation's floor on the row norm (as ``F.normalize``), finite > 0;
            with ``normalize=True`` at least the smallest normal number of the accumulation
            dtype (1.18e-38 for float32/16-bit features, 2.2e-308 for float64).

    Returns:
        0-dim float32 tensor (float64 for float64 inputs):
        ``(CE(s·X̂Ŷᵀ, arange) + CE(s·ŶX̂ᵀ, arange)) / 2``. Differentiable in both
        features and in ``logit_scale``. Non-finite inputs give a non-finite loss.
    """
    return fused_loss("clip", image_features, text_features, (logit_scale,),
                            normalize=normalize, backend=backend, eps=eps)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                normalize: bool = False, backend: str = "auto",
                eps: float = DEFAULT_EPS) -> Tensor:
    """SigLIP's pairwise sigmoid loss, fused: never materialises the N×N logits.

    ``z_ij = s·<x̂_i, ŷ_j> + b``; ``loss = (1/N) Σ_ij softplus(-l_ij z_ij)`` with
    ``l_ij = +1`` for i == j and -1 otherwise (open_clip's ``SigLipLoss`` at world size 1).
    With gradients required, the loss and its gradients are computed in one pass over the
    tiles (three products instead of four on the cpu, cuda and gemm backends, four for
    Triton's one-pass kernel; the gradients are held until the backward). float16 features
    take a forward then a backward instead, so that a GradScaler's scale reaches the
    gradients before their fp16 rounding.

    Args:
        image_features, text_features: [N, D], as for :func:`clip_loss`.
        logit_scale: the already-exponentiated scale t (SigLIP initialises log t = log 10);
            a float or a one-element tensor, possibly requiring grad.
        logit_bias: the bias b (SigLIP initialises -10); a float or a one-element tensor,
            possibly requiring grad.
        normalize, backend, eps: as for :func:`clip_loss`.

    Returns:
        0-dim float32 tensor (float64 for float64 inputs), differentiable in both features,
        the scale and the bias. Exact for |z| up to the float range (softplus never
        overflows); non-finite inputs give a non-finite loss.
    """
    return fused_loss("siglip", image_features, text_features, (logit_scale, logit_bias),
                            normalize=normalize, backend=backend, eps=eps)
