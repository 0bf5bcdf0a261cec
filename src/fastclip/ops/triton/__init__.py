"""Triton kernels of fastclip, JIT-compiled at first use (docs/design.md §4).

``contrastive_loss``: the fused contrastive-loss block forward and backward
(docs/design.md §2); registered as the ``triton`` backend by
:mod:`fastclip.ops.backends.triton`.

Importing this package imports ``triton``; :mod:`fastclip` itself never does, so that
``import fastclip`` stays cheap. ``TRITON_INTERPRET=1`` must be set before the first
import (Triton reads it when the decorators run): the kernels then run on CPU tensors through Triton's interpreter.
"""

from .contrastive_loss import bwd, fwd

__all__ = ["fwd", "bwd"]
