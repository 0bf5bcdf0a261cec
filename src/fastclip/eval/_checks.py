"""Checks and contexts the evaluation functions share: class-index labels, fp32 math."""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch


def class_indices(labels, name: str, num_classes: Optional[int] = None, device=None) -> torch.Tensor:
    """``labels`` as a LongTensor ``[N]`` of class indices, on ``device``.

    Raises TypeError for floating-point, complex or boolean labels (1.9 would silently become
    class 1) and ValueError for a shape other than ``[N]`` or an index outside ``[0,
    num_classes)`` (``[0, inf)`` when ``num_classes`` is None), naming ``name``."""
    t = torch.as_tensor(labels, device=device)
    if t.numel() == 0 and t.dim() == 1:
        return t.long()     # torch.as_tensor([]) is float32: no labels, nothing to check
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be integer class indices, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D [N], got shape {tuple(t.shape)}")
    t = t.long()
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
            raise ValueError(f"{name} must be class indices in {bound}, got values from {lo} to {hi}")
    return t


@contextlib.contextmanager
def fp32_math() -> Iterator[None]:
    """Autocast off on CPU and CUDA: similarities, softmaxes and probe fits in float32 whatever
    the caller's context (``fastclip eval --precision bf16`` runs the encoders under autocast;
    a bf16 similarity ties 7 of 48 rows of the demo's shape task, a bf16 probe fit lands at
    chance)."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[N]``: rows of ``x`` ``[N, ...]`` whose entries are all finite."""
    return torch.isfinite(x).flatten(1).all(1) if x.shape[0] else torch.ones(0, dtype=torch.bool, device=x.device)
