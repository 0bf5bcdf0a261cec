"""Drop-in losses: open_clip's ``ClipLoss`` and ``SigLipLoss`` on fastclip's fused kernels.

An open_clip trainer changes one import::

    # from open_clip.loss import ClipLoss, SigLipLoss
    from fastclip.loss import ClipLoss, SigLipLoss

or, in open_clip's own trainer (``open_clip_train/main.py``), takes the loss factory from
here: ``from fastclip.loss import create_loss`` after ``from open_clip import ...``.

Single-process values and gradients equal open_clip's; with ``world_size > 1`` the loss
is the exact full-batch loss across ranks (see :func:`fastclip.distributed.clip_loss`
for the gradient contract), whatever open_clip's approximation flags say.
"""

from __future__ import annotations

import numbers
import operator
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.contrastive_loss import (
    DEFAULT_EPS,
    _check_dense,
    fused_loss,
    param_on_device,
    validate_options,
)

__all__ = ["ClipLoss", "SigLipLoss", "LOSS_MODULES", "create_loss"]


def _as_int(v):
    """``v`` as an int when it is an integer (Python's, NumPy's, or a one-element integer
    tensor: anything with ``__index__`` but a bool), else None."""
    if isinstance(v, bool) or (isinstance(v, Tensor) and v.dtype == torch.bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


def _check_ranks(rank, world_size) -> tuple[int, int]:
    w, r = _as_int(world_size), _as_int(rank)
    if w is None or w < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if rank is None and w == 1:          # one process reads no rank (as open_clip)
        return 0, 1
    if r is None:
        # At world size 1 any int is kept (below), so the message names no range there.
        where = f" in [0, world_size={w})" if w > 1 else ""
        raise ValueError(f"rank must be an int{where}, got {rank!r} ({type(rank).__name__})")
    # One process reads no rank (as open_clip): a global rank with a per-process loss, or
    # -1 for "not distributed" (Hugging Face's convention), is kept as given.
    if w > 1 and not 0 <= r < w:
        raise ValueError(f"rank must be in [0, world_size={w}), got {r}")
    return r, w


def _refuse_horovod(use_horovod, world_size) -> None:
    # At world size 1 horovod has nothing to do (open_clip does not touch it there either).
    w = _as_int(world_size)
    if use_horovod and w is not None and w > 1:
        raise ValueError("use_horovod=True is not supported by fastclip with world_size > 1; "
                         "launch with torchrun and torch.distributed instead")


class _FusedLoss(nn.Module):
    """The part both drop-ins share: one loss of fastclip.ops.losses, one process or many."""

    loss_name = ""

    def _init(self, rank, world_size, normalize, backend, dist_impl, eps):
        self.rank, self.world_size = _check_ranks(rank, world_size)
        # Checked here, not at the first training step.
        validate_options(normalize, eps)
        if backend != "auto":
            from .ops.backends import get_backend  # noqa: PLC0415
            if not isinstance(backend, str):
                raise TypeError(f"backend must be a backend name or 'auto', got {backend!r}")
            get_backend(backend)
        self.normalize, self.backend, self.eps = normalize, backend, eps
        self.fused_dist_impl = dist_impl
        # open_clip's label cache, for subclasses that call get_ground_truth (the fused
        # forward builds no labels).
        self.prev_num_logits = 0
        self.labels = {}

    def _features(self, image_features: Tensor, text_features: Tensor) -> tuple[Tensor, Tensor]:
        """The features the loss sees: L2-normalised when ``normalize=True``."""
        if self.normalize:
            return (F.normalize(image_features, dim=-1, eps=self.eps),
                    F.normalize(text_features, dim=-1, eps=self.eps))
        return image_features, text_features

    def _fused_loss(self, image_features, text_features, params, unused_bias=None) -> Tensor:
        if self.world_size > 1:
            from . import distributed  # noqa: PLC0415
            return distributed.fused_loss(
                self.loss_name, image_features, text_features, params,
                normalize=self.normalize, backend=self.backend, dist_impl=self.fused_dist_impl,
                eps=self.eps, expected_world_size=self.world_size, unused_bias=unused_bias)
        return fused_loss(self.loss_name, image_features, text_features, params,
                                normalize=self.normalize, backend=self.backend, eps=self.eps)


class ClipLoss(_FusedLoss):
    """open_clip's ``ClipLoss`` constructor and forward, fused.

    Args (open_clip's, same defaults):
        local_loss, gather_with_grad: accepted for compatibility. fastclip always
            returns the full-batch loss on every rank and, after DDP's averaging, the
            full-batch gradient. In open_clip these flags choose: the full loss and
            gradient (``gather_with_grad=True``), the rank's own rows' part of the loss
            with the full gradient (both True), the full loss with the gradient divided
            by the world size (both False, the default: only each rank's own rows carry
            a gradient), or an approximate gradient (``local_loss=True`` alone: each
            rank's part reaches only its own rows).
        cache_labels: accepted; fastclip builds no label tensor.
        rank, world_size: with ``world_size > 1`` the loss runs sharded over the
            default process group (``torch.distributed`` must be initialised; rank in
            [0, world_size)); with ``world_size=1`` any int rank (or None) is accepted and
            unused.
        use_horovod: not supported with ``world_size > 1`` (a clear error); at world size
            1 it has no effect, as in open_clip.
    fastclip extras (keyword-only):
        normalize: L2-normalise inside the kernel (default False: open_clip's models
            return normalised features).
        backend: kernel backend, "auto" by default.
        dist_impl: "gather" (default) or "ring" when ``world_size > 1``.
        eps: with ``normalize=True``, the floor on a row's norm (default 1e-12).

    forward(image_features [N, D], text_features [N, D], logit_scale, logit_bias=None,
    output_dict=False) -> 0-dim float32 loss (float64 for float64 features), or
    ``{"contrastive_loss": loss}``.
    ``logit_bias`` (a constant added to every logit) cancels in both softmaxes: the
    value is unchanged and its gradient is zero, as in open_clip.
    """

    loss_name = "clip"

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, normalize: bool = False, backend: str = "auto",
                 dist_impl: str = "gather", eps: float = DEFAULT_EPS):
        super().__init__()
        _refuse_horovod(use_horovod, world_size)
        if not isinstance(dist_impl, str) or dist_impl not in ("gather", "ring"):
            raise ValueError(f"dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.use_horovod = use_horovod
        self._init(rank, world_size, normalize, backend, dist_impl, eps)
        self.dist_impl = dist_impl

    # open_clip's helpers, for code written against its ClipLoss (e.g. a subclass like its
    # DistillClipLoss, whose forward calls them). They materialise what open_clip does: the
    # [N, N] logits (all-gathered features across ranks) and the label vector. The fused
    # forward above calls neither.
    def get_ground_truth(self, device, num_logits) -> Tensor:
        """open_clip's labels: ``arange(num_logits)`` (offset by ``num_logits·rank`` with
        ``local_loss`` on several ranks), cached per device when ``cache_labels``."""
        if self.prev_num_logits != num_logits or device not in self.labels:
            labels = torch.arange(num_logits, device=device, dtype=torch.long)
            if self.world_size > 1 and self.local_loss:
                labels = labels + num_logits * self.rank
            if self.cache_labels:
                self.labels[device] = labels
                self.prev_num_logits = num_logits
            return labels
        return self.labels[device]

    def get_logits(self, image_features: Tensor, text_features: Tensor, logit_scale,
                   logit_bias=None) -> tuple[Tensor, Tensor]:
        """open_clip's (logits_per_image, logits_per_text), materialised: [N, N] on one rank;
        across ranks the features are all-gathered as open_clip gathers them (with autograd
        when ``gather_with_grad``), [n, N] each with ``local_loss``, else [N, N]."""
        x, y = self._features(image_features, text_features)
        if self.world_size > 1:
            all_x, all_y = _gather_features(x, y, self.gather_with_grad, self.rank,
                                            self.world_size, self.local_loss)
            if self.local_loss:
                per_image = logit_scale * x @ all_y.T
                per_text = logit_scale * y @ all_x.T
            else:
                per_image = logit_scale * all_x @ all_y.T
                per_text = per_image.T
        else:
            per_image = logit_scale * x @ y.T
            per_text = logit_scale * y @ x.T
        if logit_bias is not None:
            per_image = per_image + logit_bias
            per_text = per_text + logit_bias
        return per_image, per_text

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        like = image_features if isinstance(image_features, Tensor) else None
        # Across ranks the bias is checked and agreed with the other inputs (a bad one on one
        # rank left the others waiting in the loss's collectives).
        check = ((lambda: _scalar_bias(logit_bias, like)) if logit_bias is not None and like is not None
                 else None)
        if check is not None and self.world_size == 1:
            check()      # a bad bias is refused before any kernel runs
        loss = self._fused_loss(image_features, text_features, (logit_scale,), unused_bias=check)
        if logit_bias is not None:
            # Softmax is shift-invariant: the bias (one constant) keeps a zero gradient in the
            # graph, and a NaN or inf bias a non-finite loss, as open_clip's logits + bias.
            loss = loss + 0.0 * _scalar_bias(logit_bias, loss)
        return {"contrastive_loss": loss} if output_dict else loss


# open_clip's SigLipLoss dist_impl names -> the fastclip form that computes the same exact
# loss: its neighbour exchanges ("bidir", "shift") are a ring, its "reduce" and "gather"
# collect every rank's text features like fastclip's gather form.
_SIGLIP_IMPLS = {None: "ring", "bidir": "ring", "shift": "ring", "reduce": "gather",
                 "gather": "gather", "ring": "ring"}


class SigLipLoss(_FusedLoss):
    """open_clip's ``SigLipLoss`` constructor and forward, fused.

    Args (open_clip's, same defaults):
        cache_labels: accepted; fastclip builds no label tensor.
        rank, world_size: with ``world_size > 1`` the loss runs sharded over the default
            process group (``torch.distributed`` must be initialised; rank in
            [0, world_size)); with ``world_size=1`` any int rank (or None) is accepted and
            unused.
        dist_impl: open_clip's names are accepted: None and "bidir"/"shift" (neighbour
            exchanges) run fastclip's ring form, "reduce" and "gather" its gather form;
            "ring" also works. Every one computes the exact loss (see below).
    fastclip extras (keyword-only):
        normalize: L2-normalise inside the kernel (default False).
        backend: kernel backend, "auto" by default.
        eps: with ``normalize=True``, the floor on a row's norm (default 1e-12).

    forward(image_features [N, D], text_features [N, D], logit_scale, logit_bias,
    output_dict=False) -> 0-dim float32 loss (float64 for float64 features)
    ``(1/N) Σ_ij softplus(-l_ij (s·<x_i, y_j> + b))``, or ``{"contrastive_loss": loss}``.
    ``logit_bias=None`` means no bias.

    With ``world_size > 1`` every rank gets the full-batch loss, normalised by the global
    N, and the gradient contract of :func:`fastclip.distributed.clip_loss` (after DDP's
    averaging, the gradients of one process on the concatenated batch). open_clip's
    ``SigLipLoss`` returns each rank's own rows' part divided by its local batch size
    instead: the mean over ranks of its values, and its DDP-averaged gradients, equal
    fastclip's when the shards are equal; with unequal shards it weights the ranks' rows
    differently (and its neighbour exchanges need equal shapes), fastclip stays exact.
    """

    loss_name = "siglip"

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, *, normalize: bool = False,
                 backend: str = "auto", eps: float = DEFAULT_EPS):
        super().__init__()
        if not (dist_impl is None or isinstance(dist_impl, str)) or dist_impl not in _SIGLIP_IMPLS:
            raise ValueError(f"dist_impl must be one of {sorted(k for k in _SIGLIP_IMPLS if k)} "
                             f"or None, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.dist_impl = dist_impl or "bidir"
        self._init(rank, world_size, normalize, backend, _SIGLIP_IMPLS[dist_impl], eps)

    # open_clip's helpers, for code written against its SigLipLoss (a subclass that calls
    # them). get_ground_truth and get_logits materialise [N, N] as open_clip does; _loss is
    # the fused single-block loss (open_clip's signature and value), never materialised.
    def get_ground_truth(self, device, dtype, num_logits, negative_only=False) -> Tensor:
        """open_clip's [num_logits, num_logits] labels: +1 on the diagonal, -1 elsewhere
        (all -1 with ``negative_only``)."""
        labels = -torch.ones((num_logits, num_logits), device=device, dtype=dtype)
        if not negative_only:
            labels = 2 * torch.eye(num_logits, device=device, dtype=dtype) + labels
        return labels

    def get_logits(self, image_features: Tensor, text_features: Tensor, logit_scale,
                   logit_bias=None) -> Tensor:
        """open_clip's logits ``s·X Yᵀ (+ b)``, materialised: [N, M]."""
        x, y = self._features(image_features, text_features)
        logits = logit_scale * x @ y.T
        return logits if logit_bias is None else logits + logit_bias

    def _loss(self, image_features: Tensor, text_features: Tensor, logit_scale,
              logit_bias=None, negative_only: bool = False) -> Tensor:
        """open_clip's ``SigLipLoss._loss``: the sigmoid loss of one block of this process's
        features, ``-Σ log σ(l_ij z_ij) / N`` (all l_ij = -1 with ``negative_only``, as for
        another rank's texts), fused; no exchange across ranks."""
        bias = 0.0 if logit_bias is None else logit_bias
        n = image_features.shape[0] if isinstance(image_features, Tensor) else 0
        return fused_loss(self.loss_name, image_features, text_features, (logit_scale, bias),
                          normalize=self.normalize, backend=self.backend, eps=self.eps,
                          pos_offset=n if negative_only else 0)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        bias = 0.0 if logit_bias is None else logit_bias
        loss = self._fused_loss(image_features, text_features, (logit_scale, bias))
        return {"contrastive_loss": loss} if output_dict else loss


def _scalar_bias(value, like: Tensor) -> Tensor:
    """ClipLoss's ``logit_bias``: a real number or a one-element real tensor (one constant
    added to every logit); a clear error for anything else (a per-pair [N, N] bias would
    change the loss, which the fused kernels do not compute)."""
    if isinstance(value, Tensor):
        _check_dense("logit_bias", value, "[] or [1]")
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"logit_bias must be a float or a one-element real tensor, got a "
                             f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return param_on_device("logit_bias", value, like).reshape(()).to(like.dtype)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=like.dtype, device=like.device)
    raise TypeError(f"logit_bias must be a float or a one-element real tensor, got "
                    f"{type(value).__name__} {value!r}")


def _gather_features(x: Tensor, y: Tensor, with_grad: bool, rank: int, world_size: int,
                     local_loss: bool) -> tuple[Tensor, Tensor]:
    """open_clip's ``gather_features`` (torch.distributed, no horovod): every rank's rows in
    rank order; with ``with_grad`` through autograd's all_gather, else a plain all_gather with
    this rank's own rows put back so that they keep their gradient (unless ``local_loss``,
    which uses its own rows directly). Shards may differ in size (open_clip's equal-size
    gather aborts the processes there): each is padded to the largest and cut back."""
    import torch.distributed as dist  # noqa: PLC0415
    from torch.distributed import nn as dist_nn  # noqa: PLC0415  (autograd's collectives)
    n = torch.tensor([x.shape[0], y.shape[0]], device=x.device)
    every = [torch.empty_like(n) for _ in range(world_size)]
    dist.all_gather(every, n)
    sizes = [tuple(int(v) for v in t.tolist()) for t in every]      # [(rows of x, rows of y)] per rank
    out = []
    for which, t in enumerate((x, y)):
        m = max(s[which] for s in sizes)
        padded = F.pad(t, (0, 0, 0, m - t.shape[0])).contiguous()   # [m, D]
        if with_grad:
            parts = list(dist_nn.all_gather(padded))
        else:
            parts = [torch.empty_like(padded) for _ in range(world_size)]
            dist.all_gather(parts, padded)
        parts = [p[:s[which]] for p, s in zip(parts, sizes)]
        if not with_grad and not local_loss:
            parts[rank] = t
        out.append(torch.cat(parts, dim=0))
    return out[0], out[1]

# Each loss's module, by its fastclip.ops name: fastclip's trainer builds its loss from here.
LOSS_MODULES = {"clip": ClipLoss, "siglip": SigLipLoss}


def create_loss(args):
    """open_clip's ``create_loss(args)`` (``open_clip/factory.py``) on fastclip's losses.

    ``args`` is open_clip_train's argument namespace; the fields read are open_clip's:
    ``siglip``, ``loss_dist_impl``, ``local_loss``, ``gather_with_grad``, ``rank``,
    ``world_size``, ``horovod``, ``distill`` and ``model`` (missing fields take open_clip's
    defaults). ``--siglip`` gives :class:`SigLipLoss`, otherwise :class:`ClipLoss`, built
    with the arguments open_clip passes. Distillation (``--distill``) and CoCa models need
    open_clip's ``DistillClipLoss`` / ``CoCaLoss``, which fastclip does not fuse: those come
    from open_clip's own ``create_loss``, with a warning that says so.
    """
    if args is None or isinstance(args, (dict, str, bytes)):
        raise TypeError(f"create_loss(args): args must be open_clip_train's argument namespace "
                        f"(argparse.Namespace, fields as attributes), got {type(args).__name__}")
    rank = getattr(args, "rank", 0)
    world_size = getattr(args, "world_size", 1)
    horovod = bool(getattr(args, "horovod", False))
    if getattr(args, "distill", False) or "coca" in str(getattr(args, "model", "")).lower():
        what = "DistillClipLoss" if getattr(args, "distill", False) else "CoCaLoss"
        try:
            from open_clip import create_loss as open_clip_create_loss  # noqa: PLC0415
        except ImportError as e:
            raise ImportError(f"these arguments ask for open_clip's {what}, which fastclip does "
                              f"not fuse, and open_clip could not be imported: {e}") from e
        warnings.warn(f"fastclip fuses ClipLoss and SigLipLoss only: this run uses open_clip's "
                      f"own {what}", stacklevel=2)
        return open_clip_create_loss(args)
    if getattr(args, "siglip", False):
        _refuse_horovod(horovod, world_size)
        return SigLipLoss(rank=rank, world_size=world_size,
                          dist_impl=getattr(args, "loss_dist_impl", None))
    return ClipLoss(local_loss=getattr(args, "local_loss", False),
                    gather_with_grad=getattr(args, "gather_with_grad", False),
                    cache_labels=True, rank=rank, world_size=world_size, use_horovod=horovod)
