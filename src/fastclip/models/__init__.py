"""CLIP encoders, configs, the model factory and checkpoint I/O."""
from __future__ import annotations

from typing import Any

from .clip import CLIP
from .configs import MODEL_CONFIGS, OPENAI_PARAM_COUNTS, CLIPConfig, get_config, list_models
from .resnet import ModifiedResNet
from .text import TextTransformer
from .vit import VisionTransformer


def create_model(name: str, **overrides: Any) -> CLIP:
    """Build a randomly initialised ``CLIP`` from a registered config (see ``list_models()``).

    ``overrides`` replace config fields, e.g. ``create_model("demo", context_length=16)``.
    Respects the ambient device context: ``with torch.device("meta"): create_model("ViT-L/14")``
    builds without allocating.
    """
    return CLIP(get_config(name, **overrides))


def save_checkpoint(model: CLIP, path, metadata=None) -> None:
    """Save ``model`` as safetensors with its config as JSON metadata (see ``openai.save_checkpoint``)."""
    from .openai import save_checkpoint as _save
    _save(model, path, metadata)


def load_checkpoint(path, device="cpu") -> CLIP:
    """Rebuild a ``CLIP`` saved by ``save_checkpoint`` (see ``openai.load_checkpoint``)."""
    from .openai import load_checkpoint as _load
    return _load(path, device)


__all__ = ["CLIP", "CLIPConfig", "MODEL_CONFIGS", "OPENAI_PARAM_COUNTS", "ModifiedResNet", "TextTransformer",
           "VisionTransformer", "create_model", "get_config", "list_models", "load_checkpoint", "save_checkpoint"]
