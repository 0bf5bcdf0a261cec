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

import warnings
from typing import Optional

from torch import Tensor, nn

from .ops.contrastive_loss import DEFAULT_EPS, fused_loss

__all__ = ["ClipLoss", "SigLipLoss", "create_loss"]


def _check_ranks(rank, world_size) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")


def _refuse_horovod(use_horovod) -> None:
    if use_horovod:
        raise ValueError("use_horovod=True is not supported by fastclip; launch with "
                         "torchrun and torch.distributed instead")


class _FusedLoss(nn.Module):
    """The part both drop-ins share: one loss of fastclip.ops.losses, one process or many."""

    loss_name = ""

    def _init(self, rank, world_size, normalize, backend, dist_impl, eps):
        _check_ranks(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.normalize, self.backend, self.eps = normalize, backend, eps
        self.fused_dist_impl = dist_impl

    def _loss(self, image_features, text_features, params) -> Tensor:
        if self.world_size > 1:
            from . import distributed  # noqa: PLC0415
            return distributed.fused_loss(
                self.loss_name, image_features, text_features, params,
                normalize=self.normalize, backend=self.backend, dist_impl=self.fused_dist_impl,
                eps=self.eps, expected_world_size=self.world_size)
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
            default process group (``torch.distributed`` must be initialised).
        use_horovod: not supported (a clear error).
    fastclip extras (keyword-only):
        normalize: L2-normalise inside the kernel (default False: open_clip's models
            return normalised features).
        backend: kernel backend, "auto" by default.
        dist_impl: "gather" (default) or "ring" when ``world_size > 1``.

    forward(image_features [N, D], text_features [N, D], logit_scale, logit_bias=None,
    output_dict=False) -> 0-dim float32 loss, or ``{"contrastive_loss": loss}``.
    ``logit_bias`` (a constant added to every logit) cancels in both softmaxes: the
    value is unchanged and its gradient is zero, as in open_clip.
    """

    loss_name = "clip"

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, normalize: bool = False, backend: str = "auto",
                 dist_impl: str = "gather", eps: float = DEFAULT_EPS):
        super().__init__()
        _refuse_horovod(use_horovod)
        if dist_impl not in ("gather", "ring"):
            raise ValueError(f"dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.use_horovod = use_horovod
        self._init(rank, world_size, normalize, backend, dist_impl, eps)
        self.dist_impl = dist_impl

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        loss = self._loss(image_features, text_features, (logit_scale,))
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            # Softmax is shift-invariant: keep the bias in the graph with a zero gradient.
            loss = loss + 0.0 * logit_bias.sum().to(loss.dtype)
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
            process group (``torch.distributed`` must be initialised).
        dist_impl: open_clip's names are accepted: None and "bidir"/"shift" (neighbour
            exchanges) run fastclip's ring form, "reduce" and "gather" its gather form;
            "ring" also works. Every one computes the exact loss (see below).
    fastclip extras (keyword-only):
        normalize: L2-normalise inside the kernel (default False).
        backend: kernel backend, "auto" by default.

    forward(image_features [N, D], text_features [N, D], logit_scale, logit_bias,
    output_dict=False) -> 0-dim float32 loss ``(1/N) Σ_ij softplus(-l_ij (s·<x_i, y_j> + b))``,
    or ``{"contrastive_loss": loss}``. ``logit_bias=None`` means no bias.

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
        if dist_impl not in _SIGLIP_IMPLS:
            raise ValueError(f"dist_impl must be one of {sorted(k for k in _SIGLIP_IMPLS if k)} "
                             f"or None, got {dist_impl!r}")
        self.cache_labels = cache_labels
        self.dist_impl = dist_impl or "bidir"
        self._init(rank, world_size, normalize, backend, _SIGLIP_IMPLS[dist_impl], eps)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale, logit_bias,
                output_dict: bool = False):
        bias = 0.0 if logit_bias is None else logit_bias
        loss = self._loss(image_features, text_features, (logit_scale, bias))
        return {"contrastive_loss": loss} if output_dict else loss


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
        _refuse_horovod(horovod)
        return SigLipLoss(rank=rank, world_size=world_size,
                          dist_impl=getattr(args, "loss_dist_impl", None))
    return ClipLoss(local_loss=getattr(args, "local_loss", False),
                    gather_with_grad=getattr(args, "gather_with_grad", False),
                    cache_labels=True, rank=rank, world_size=world_size, use_horovod=horovod)
