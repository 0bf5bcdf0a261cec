"""Drop-in losses: open_clip's ``ClipLoss`` signature on fastclip's fused kernels.

An open_clip trainer changes one import::

    # from open_clip.loss import ClipLoss
    from fastclip.loss import ClipLoss

Single-process values and gradients equal open_clip's ``ClipLoss``; with
``world_size > 1`` the loss is the exact full-batch loss across ranks (see
:func:`fastclip.distributed.clip_loss` for the gradient contract).
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .ops.contrastive_loss import DEFAULT_EPS, clip_loss

__all__ = ["ClipLoss", "clip_loss"]


class ClipLoss(nn.Module):
    """open_clip's ``ClipLoss`` constructor and forward, fused.

    Args (open_clip's, same defaults):
        local_loss, gather_with_grad: accepted for compatibility. fastclip always
            computes the exact full-batch loss and gradient, which is what both of
            open_clip's settings approximate (``local_loss=True`` drops the
            off-shard columns' terms; ``gather_with_grad=False`` drops gradients).
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

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False,
                 cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 use_horovod: bool = False, *, normalize: bool = False, backend: str = "auto",
                 dist_impl: str = "gather", eps: float = DEFAULT_EPS):
        super().__init__()
        if use_horovod:
            raise ValueError("use_horovod=True is not supported by fastclip; launch with "
                             "torchrun and torch.distributed instead")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if dist_impl not in ("gather", "ring"):
            raise ValueError(f"dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod
        self.normalize, self.backend, self.dist_impl, self.eps = normalize, backend, dist_impl, eps

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale,
                logit_bias: Optional[Tensor] = None, output_dict: bool = False):
        if self.world_size > 1:
            from . import distributed  # noqa: PLC0415
            loss = distributed.clip_loss(image_features, text_features, logit_scale,
                                         normalize=self.normalize, backend=self.backend,
                                         dist_impl=self.dist_impl, eps=self.eps,
                                         expected_world_size=self.world_size)
        else:
            loss = clip_loss(image_features, text_features, logit_scale,
                             normalize=self.normalize, backend=self.backend, eps=self.eps)
        if isinstance(logit_bias, Tensor) and logit_bias.requires_grad:
            # Softmax is shift-invariant: keep the bias in the graph with a zero gradient.
            loss = loss + 0.0 * logit_bias.sum().to(loss.dtype)
        return {"contrastive_loss": loss} if output_dict else loss

