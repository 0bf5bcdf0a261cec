"""Triton kernels of fastclip, JIT-compiled at first use (design.md §4).

``contrastive_loss``: the fused contrastive-loss block forward and backward
(design.md §2); registered as the ``triton`` backend by
:mod:`fastclip.ops.backends.triton`.

Importing this package imports ``triton``; :mod:`fastclip` itself never does, so that
``import fastclip`` stays cheap. ``TRITON_INTERPRET=1`` must be set before the first
import (pitfalls.md): the kernels then run on CPU tensors through Triton's interpreter.
"""

from .contrastive_loss import bwd, fwd

__all__ = ["fwd", "bwd"]
