"""The fused symmetric contrastive loss op: validation, dispatch, torch.library.

Two custom ops carry the block contract of :mod:`fastclip.ops.backends`:

* ``fastclip::contrastive_loss_fwd(x, y, scale, normalize, eps, pos_offset, backend)
  -> (row_lse, col_lse, pos)``
* ``fastclip::contrastive_loss_bwd(...)``: its vector-Jacobian product.

Both have fake (meta) implementations and the forward has an autograd formula, so
``torch.compile(fullgraph=True)`` keeps a graph that calls the loss whole, and the
loss itself is three means of their outputs in plain PyTorch.
"""

from __future__ import annotations

import math
import torch
from torch import Tensor

from .backends import Backend, resolve_backend
from .reference import acc_dtype

__all__ = ["clip_loss", "contrastive_loss_fwd", "contrastive_loss_bwd", "DEFAULT_EPS",
           "validate_features", "prepare_scale", "select_backend"]

DEFAULT_EPS = 1e-12          # as torch.nn.functional.normalize
_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _unit_inner(t: Tensor) -> Tensor:
    # Backends take any row stride but a unit stride along D (see backends doc).
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("fastclip::contrastive_loss_fwd", mutates_args=())
def contrastive_loss_fwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float,
                         pos_offset: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Block forward: (row_lse [n], col_lse [m], pos [n]); see fastclip.ops.backends."""
    from .backends import get_backend  # noqa: PLC0415
    return get_backend(backend).fwd(_unit_inner(x), _unit_inner(y), scale, normalize, eps,
                                    pos_offset)


@contrastive_loss_fwd.register_fake
def _(x, y, scale, normalize, eps, pos_offset, backend):
    acc = acc_dtype(x.dtype)
    return (x.new_empty((x.shape[0],), dtype=acc), y.new_empty((y.shape[0],), dtype=acc),
            x.new_empty((x.shape[0],), dtype=acc))


@torch.library.custom_op("fastclip::contrastive_loss_bwd", mutates_args=())
def contrastive_loss_bwd(x: Tensor, y: Tensor, scale: Tensor, normalize: bool, eps: float,
                         pos_offset: int, backend: str, row_lse: Tensor, col_lse: Tensor,
                         grad_row: Tensor, grad_col: Tensor, grad_pos: Tensor
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Block backward: (dx [n, D], dy [m, D], dscale []); see fastclip.ops.backends."""
    from .backends import get_backend  # noqa: PLC0415
    return get_backend(backend).bwd(_unit_inner(x), _unit_inner(y), scale, normalize, eps,
                                    pos_offset, row_lse.contiguous(), col_lse.contiguous(),
                                    grad_row.contiguous(), grad_col.contiguous(),
                                    grad_pos.contiguous())


@contrastive_loss_bwd.register_fake
def _(x, y, scale, normalize, eps, pos_offset, backend, row_lse, col_lse, grad_row, grad_col,
      grad_pos):
    return torch.empty_like(x), torch.empty_like(y), scale.new_empty(())


def _setup_context(ctx, inputs, output):
    x, y, scale, normalize, eps, pos_offset, backend = inputs
    row_lse, col_lse, _ = output
    ctx.save_for_backward(x, y, scale, row_lse, col_lse)
    ctx.cfg = (normalize, eps, pos_offset, backend)


def _backward(ctx, g_row, g_col, g_pos):
    x, y, scale, row_lse, col_lse = ctx.saved_tensors
    normalize, eps, pos_offset, backend = ctx.cfg
    # Outputs the loss did not use arrive as None: their gradient is zero.
    g_row = torch.zeros_like(row_lse) if g_row is None else g_row
    g_col = torch.zeros_like(col_lse) if g_col is None else g_col
    g_pos = torch.zeros_like(row_lse) if g_pos is None else g_pos
    dx, dy, ds = contrastive_loss_bwd(x, y, scale, normalize, eps, pos_offset, backend,
                                      row_lse, col_lse, g_row, g_col, g_pos)
    return dx, dy, ds.to(scale.dtype), None, None, None, None


contrastive_loss_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------- validation
def validate_features(image_features, text_features, *, same_rows: bool = True) -> None:
    """Raise a clear error for anything the kernels cannot take, before any kernel runs."""
    for name, t in (("image_features", image_features), ("text_features", text_features)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape [N, D], got {type(t).__name__}")
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
    if x.dtype != y.dtype:
        raise TypeError(f"image_features is {x.dtype} but text_features is {y.dtype}; both must "
                        f"have the same dtype")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feature sizes differ: image_features {tuple(x.shape)} and "
                         f"text_features {tuple(y.shape)} must share D")
    if same_rows and x.shape[0] != y.shape[0]:
        raise ValueError(f"batch sizes differ: image_features has N={x.shape[0]} rows and "
                         f"text_features M={y.shape[0]}; row i's positive is column i, so "
                         f"N must equal M")


def prepare_scale(logit_scale, like: Tensor) -> Tensor:
    """``logit_scale`` (float or 1-element tensor, already exponentiated) as a 0-dim tensor
    of the accumulation dtype on ``like``'s device; differentiable when it requires grad."""
    acc = acc_dtype(like.dtype)
    if isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
        if not math.isfinite(logit_scale) or logit_scale <= 0:
            raise ValueError(f"logit_scale must be a finite positive number (the already "
                             f"exponentiated scale), got {logit_scale}")
        return torch.tensor(float(logit_scale), dtype=acc, device=like.device)
    if not isinstance(logit_scale, Tensor):
        raise TypeError(f"logit_scale must be a float or a tensor with one element, got "
                        f"{type(logit_scale).__name__}")
    if logit_scale.numel() != 1:
        raise ValueError(f"logit_scale must have exactly one element, got shape "
                         f"{tuple(logit_scale.shape)}")
    if not logit_scale.is_floating_point():
        raise TypeError(f"logit_scale must be a floating-point tensor, got {logit_scale.dtype}")
    if logit_scale.device != like.device:
        if logit_scale.device.type != "cpu":
            raise ValueError(f"logit_scale is on {logit_scale.device} but the features are on "
                             f"{like.device}")
        logit_scale = logit_scale.to(like.device)
    return logit_scale.reshape(()).to(acc)


def select_backend(backend: str, device: torch.device,
                   dtype: torch.dtype | None = None) -> Backend:
    """Resolve ``backend`` ("auto" or a name) for features on ``device`` of ``dtype``."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    return resolve_backend(backend, device, dtype)


# --------------------------------------------------------------------------- public
def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              normalize: bool = False, backend: str = "auto",
              eps: float = DEFAULT_EPS) -> Tensor:
    """Symmetric CLIP loss, fused: never materialises the N×N logits.

    Args:
        image_features: [N, D] float32/float64/float16/bfloat16, any strides.
        text_features: [N, D], same dtype and device; row i's positive is text i.
        logit_scale: the already-exponentiated scale s > 0 (open_clip passes
            ``logit_scale.exp()``): a float or a one-element tensor, possibly requiring grad.
        normalize: L2-normalise the rows inside the kernel (default False: the
            features are assumed normalised, as open_clip's models return them).
        backend: "auto" (default; ``FASTCLIP_BACKEND`` overrides), "cpu", "triton",
            "cuda" or "reference".
        eps: the normalisation's floor on the row norm (as ``F.normalize``).

    Returns:
        0-dim float32 tensor (float64 for float64 inputs):
        ``(CE(s·X̂Ŷᵀ, arange) + CE(s·ŶX̂ᵀ, arange)) / 2``. Differentiable in both
        features and in ``logit_scale``. Non-finite inputs give a non-finite loss.
    """
    validate_features(image_features, text_features)
    scale = prepare_scale(logit_scale, image_features)
    b = select_backend(backend, image_features.device, image_features.dtype)
    row_lse, col_lse, pos = contrastive_loss_fwd(image_features, text_features, scale,
                                                 bool(normalize), float(eps), 0, b.name)
    # (r_i - L_ii) and (c_i - L_ii) before the mean: keeps the cancellation per row.
    return 0.5 * ((row_lse - pos).mean() + (col_lse - pos).mean())

