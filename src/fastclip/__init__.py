"""fastclip: the fastest, leanest way to train CLIP-style models.

The loss (``fastclip.clip_loss``, ``fastclip.loss.ClipLoss``) runs on fused kernels
that never hold the N×N logits; the rest (models, tokenizer, evaluation, trainer)
is a thin layer around it. Submodules load lazily: ``import fastclip`` makes no CUDA
call and needs no GPU.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from .ops import BackendUnavailableError, available_backends, clip_loss, siglip_loss  # noqa: E402

# name -> module that defines it; loaded on first access (PEP 562).
_LAZY = {
    "ClipLoss": "fastclip.loss",
    "SigLipLoss": "fastclip.loss",
    "create_model": "fastclip.models",
    "list_models": "fastclip.models",
    "load_openai": "fastclip.models.openai",
    "save_checkpoint": "fastclip.models",
    "load_checkpoint": "fastclip.models",
    "tokenize": "fastclip.tokenizer",
    "decode": "fastclip.tokenizer",
}
_SUBMODULES = {"loss", "ops", "models", "tokenizer", "transforms", "eval", "distributed",
               "train", "datasets", "bench", "cli"}

__all__ = ["__version__", "clip_loss", "siglip_loss", "available_backends",
           "BackendUnavailableError",
           *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"fastclip.{name}")
    raise AttributeError(f"module 'fastclip' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)
