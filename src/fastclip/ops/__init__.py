"""fastclip's ops: one kernel family, the fused contrastive loss, with one head per loss.

``contrastive_loss``: the op (validation, layout, dispatch, torch.library registration) and
the public losses ``clip_loss`` and ``siglip_loss``.
``losses``: the loss specs (epilogue + head per loss; docs/design.md §1-§2).
``reference``: the plain PyTorch block functions (the oracle of every test).
``backends``: the registry of kernel backends and ``auto`` dispatch.
"""

from .backends import BackendUnavailableError, all_backends, available_backends, get_backend
from .contrastive_loss import (
                               clip_loss,
                               contrastive_loss_bwd,
                               contrastive_loss_fwd,
                               contrastive_loss_fwd_bwd,
                               fused_loss,
                               siglip_loss,
)
from .losses import LOSSES

__all__ = ["clip_loss", "siglip_loss", "fused_loss", "contrastive_loss_fwd",
           "contrastive_loss_bwd", "contrastive_loss_fwd_bwd", "available_backends",
           "all_backends", "get_backend", "BackendUnavailableError", "LOSSES"]
