"""fastclip's ops, one module per kernel family, each registered with torch.library.

``contrastive_loss``: the fused symmetric contrastive loss (design.md §1-§2).
``reference``: the plain PyTorch formulas (the oracle of every test).
``backends``: the registry of kernel backends and ``auto`` dispatch.
"""

from .backends import available_backends, all_backends, get_backend, BackendUnavailableError
from .contrastive_loss import clip_loss, contrastive_loss_fwd, contrastive_loss_bwd

__all__ = ["clip_loss", "contrastive_loss_fwd", "contrastive_loss_bwd", "available_backends",
           "all_backends", "get_backend", "BackendUnavailableError"]
