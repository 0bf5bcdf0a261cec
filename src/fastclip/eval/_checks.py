"""Checks and contexts the evaluation functions share: class-index labels, features, eval
mode, fp32 math."""
from __future__ import annotations

import contextlib
import numbers
import sys
from typing import Iterator, Optional

import torch
import torch.nn.functional as F


def class_indices(labels, name: str, num_classes: Optional[int] = None, device=None) -> torch.Tensor:
    """``labels`` as a LongTensor ``[N]`` of class indices, on ``device``.

    Raises TypeError for floating-point, complex or boolean labels (1.9 would silently become
    class 1) and ValueError for a shape other than ``[N]`` or an index outside ``[0,
    num_classes)`` (``[0, inf)`` when ``num_classes`` is None), naming ``name``."""
    try:
        t = torch.as_tensor(labels, device=device)
    except (TypeError, ValueError, RuntimeError):
        what = type(labels).__name__
        if isinstance(labels, (list, tuple)) and labels:
            what += f" of {type(labels[0]).__name__} such as {labels[0]!r}"
        raise TypeError(f"{name} must be integer class indices (a LongTensor [N], a list of ints or "
                        f"a NumPy integer array), got a {what}; map class names to their indices "
                        f"first") from None
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


def int_at_least(value, name: str, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (a Python or NumPy integer, never a bool); TypeError
    for any other type and ValueError below ``minimum``, naming ``name``. ``range(0, n, -1)`` is
    empty, so a negative batch size would otherwise return no rows at all rather than fail."""
    what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be {what}, got {value}")
    if value > sys.maxsize:     # (slicing and itertools.islice take at most sys.maxsize)
        raise ValueError(f"{name} must be at most {sys.maxsize}, got {value}")
    return int(value)


def as_features(x, name: str) -> torch.Tensor:
    """``x`` (a tensor, or a NumPy array / nested list of numbers) as a tensor, detached (features
    are the evaluation's frozen inputs); TypeError naming ``name`` for anything else."""
    if isinstance(x, torch.Tensor):
        return x.detach()
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a tensor [N, D] (or a NumPy array), got "
                        f"{type(x).__name__}") from None


def as_images(x, name: str) -> torch.Tensor:
    """``x``, a batch of preprocessed images ``[N, 3, H, W]``, as a tensor (a NumPy array is
    taken as one); TypeError naming ``name`` for anything else (a list of images gave
    "'list' object has no attribute 'shape'" from deep inside)."""
    if isinstance(x, torch.Tensor):
        return x
    if type(x).__module__ == "numpy" and hasattr(x, "shape"):
        return torch.as_tensor(x)
    hint = " (torch.stack a list of images)" if isinstance(x, (list, tuple)) else ""
    raise TypeError(f"{name} must be a tensor [N, 3, H, W] of preprocessed images{hint}, got "
                    f"{type(x).__name__}")


@contextlib.contextmanager
def eval_mode(model) -> Iterator[None]:
    """``model`` in eval mode inside the block, its own mode restored after: in train mode a
    BatchNorm encoder (the ResNet) normalises with the batch's statistics, so a logit would
    depend on the batch it came in (up to 12 apart between batch sizes 4 and 1 on a fresh
    model), and it would overwrite its running statistics, even under no_grad. Each submodule's
    own flag is restored, not the model's applied to all: a tower the caller keeps in eval mode
    inside a training model (a frozen encoder's BatchNorm statistics) stays in eval mode."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


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


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` ``[..., D]`` (floating point) scaled to unit L2 norm without overflow or
    underflow: each row is divided by its largest magnitude first. ``F.normalize`` alone sums
    the squares in the input's precision, which in float32 is inf for rows with entries above
    ~1.8e19 and 0 below ~1e-23: every such row became the zero vector and tied with every other
    (finite features at 1e18 scored chance in retrieval). A zero row stays zero in float32 and
    float64 (in float16 ``F.normalize``'s eps 1e-12 rounds to 0 and it becomes NaN: the callers
    pass float32); a row with NaN or inf comes out non-finite, as before."""
    if x.shape[-1] == 0:
        return x
    m = x.abs().amax(dim=-1, keepdim=True)  # [..., 1]
    return F.normalize(torch.where(m > 0, x / m, x), dim=-1)
