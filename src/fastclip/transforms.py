"""CLIP image preprocessing with Pillow + torch (no torchvision).

Eval: bicubic resize of the short side to ``image_size``, centre crop, RGB, to [0, 1], normalise.
Train: random resized crop (area ``scale`` (0.9, 1.0), aspect ``ratio`` (3/4, 4/3)) resampled
bicubically to ``image_size``², RGB, to [0, 1], normalise; randomness from a ``torch.Generator``.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = Image.Resampling.BICUBIC


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> FloatTensor ``[3, H, W]`` in [0, 1]."""
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)  # [3, H, W]


def resize_short_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize so the shorter side is ``size`` (long side ``int(size * long / short)``)."""
    w, h = img.size
    if min(w, h) <= 0:
        raise ValueError(f"image of size {w}x{h}: an empty image cannot be resized")
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return img if new == (w, h) else img.resize(new, BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Crop the central ``size`` x ``size`` window (padding with black if the image is smaller)."""
    w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop_box(width: int, height: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                            generator: Optional[torch.Generator] = None) -> Tuple[int, int, int, int]:
    """Sample a crop ``(left, top, w, h)`` covering ``scale`` of the area with aspect in ``ratio``
    (10 tries, then a centre crop clamped to ``ratio``)."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(4, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_r[0] + (log_r[1] - log_r[0]) * u[1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(u[2] * (width - w + 1)), int(u[3] * (height - h + 1)), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eight_bit(im: Image.Image) -> Image.Image:
    """Single-channel images wider than 8 bits as 8-bit grayscale, scaled rather than clipped
    (Pillow's ``convert("RGB")`` clips a 16-bit PNG's 0..65535 at 255: a ramp came back 99.6%
    white). 16-bit modes, and 32-bit integer or float images whose values fit 0..65535, are
    divided by 257 (65535 -> 255); float images in 0..1 (the float convention) are multiplied
    by 255; values already in 0..255 are kept; any other range is stretched from its minimum
    to its maximum. ``La`` (gray with premultiplied alpha, which Pillow cannot convert to RGB)
    is returned as ``LA``. Other modes are returned as they are."""
    if im.mode == "La":
        return im.convert("LA")
    if not (im.mode.startswith("I") or im.mode == "F"):
        return im
    a = np.asarray(im, dtype=np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if im.mode.startswith("I;16"):
        a = a / 257.0
    elif im.mode == "F" and lo >= 0 and hi <= 1:
        a = a * 255.0
    elif lo >= 0 and hi <= 255:
        pass
    elif lo >= 0 and hi <= 65535:
        a = a / 257.0
    else:
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L")


# Resized images up to this many pixels (48 MiB in RGB), or of an aspect up to 16 (at most 16
# crops' worth of pixels), are made whole, then cropped: exactly OpenAI's preprocessing. Past
# both (a side over 74,898 pixels at 224) only the crop is resampled.
_WHOLE_RESIZE_MAX_PIXELS = 1 << 24
_WHOLE_RESIZE_MAX_ASPECT = 16


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """``center_crop(resize_short_side(img, size), size)``, exactly, unless the resized image
    would exceed 2^24 pixels and be more than 16 times as long as wide (or the other way
    round): then only the crop's region is resampled (a 1x100000 image
    resized whole is 224x22,400,000 pixels, 18.7 GiB, before the crop), to within two levels
    of the whole resize (measured on noise images: Pillow rounds to 8 bits between its two
    passes; the order of the passes is matched, not the weights' exact offsets)."""
    w, h = img.size
    if min(w, h) <= 0:
        raise ValueError(f"image of size {w}x{h}: an empty image cannot be resized")
    nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    if nw * nh <= _WHOLE_RESIZE_MAX_PIXELS or max(w, h) <= _WHOLE_RESIZE_MAX_ASPECT * min(w, h):
        # (Pillow orders its two passes by the sizes: no one order of a crop's resampling
        # matches it at mild aspects, where the crop-region path was up to 28 levels off)
        return center_crop(resize_short_side(img, size), size)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    fx, fy = w / nw, h / nh                        # source pixels per resized pixel
    x0, x1, y0, y1 = left * fx, (left + size) * fx, top * fy, (top + size) * fy
    if min(w, h) >= size:
        # A downscale (or none): one resize with a box makes its two passes in the order the
        # whole resize does (within two levels, measured on noise images, tall and wide).
        return img.resize((size, size), BICUBIC, box=(x0, y0, x1, y1))
    # An upscale: the whole resize makes its horizontal pass first, but one resize with a box
    # chose the vertical pass first on tall images and rounds to 8 bits in between (measured:
    # up to 25 levels off on a 20x1000 checkerboard). So two passes by hand, the horizontal
    # one on the rows the vertical filter reaches only: bicubic support 2 source pixels per
    # output pixel, plus a row for the rounding of its window.
    reach = 2.0 * max(fy, 1.0) + 2.0
    r0, r1 = max(0, int(y0 - reach)), min(h, int(y1 + reach) + 1)
    rows = img.crop((0, r0, w, r1))                              # [r1 - r0 rows, w]
    rows = rows.resize((size, r1 - r0), BICUBIC, box=(x0, 0, x1, r1 - r0))  # [r1 - r0, size]
    return rows.resize((size, size), BICUBIC, box=(0, y0 - r0, size, y1 - r0))


class ImageTransform:
    """Callable ``PIL.Image -> FloatTensor[3, image_size, image_size]`` (see ``image_transform``)."""

    def __init__(self, image_size: int, train: bool = False, mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD, scale: Tuple[float, float] = (0.9, 1.0),
                 ratio: Tuple[float, float] = (3 / 4, 4 / 3), generator: Optional[torch.Generator] = None):
        if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size <= 0:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        image_size = int(image_size)        # NumPy's integers too (a size read from an array)
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"mean and std must have 3 entries with std > 0, got mean={mean}, std={std}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {ratio}")
        self.image_size, self.train, self.scale, self.ratio, self.generator = image_size, train, scale, ratio, generator
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)  # [3, 1, 1]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if not isinstance(img, Image.Image):
            raise ValueError(f"expected a PIL.Image.Image, got {type(img).__name__}")
        s = self.image_size
        if img.mode not in ("RGB", "L"):
            img = eight_bit(img).convert("RGB")
        if self.train:
            left, top, w, h = random_resized_crop_box(img.width, img.height, self.scale, self.ratio, self.generator)
            img = img.resize((s, s), BICUBIC, box=(left, top, left + w, top + h))
        else:
            img = resize_center_crop(img, s)
        return (to_tensor(img) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"ImageTransform(image_size={self.image_size}, train={self.train}, scale={self.scale})"


def image_transform(image_size: int, train: bool = False, mean: Sequence[float] = OPENAI_MEAN,
                    std: Sequence[float] = OPENAI_STD, scale: Tuple[float, float] = (0.9, 1.0),
                    ratio: Tuple[float, float] = (3 / 4, 4 / 3),
                    generator: Optional[torch.Generator] = None) -> ImageTransform:
    """CLIP preprocessing: a callable ``PIL.Image -> FloatTensor[3, image_size, image_size]``.

    ``train=False`` (default): short-side bicubic resize + centre crop. ``train=True``: random
    resized crop with area fraction in ``scale`` (default (0.9, 1.0)) and aspect in ``ratio``,
    drawn from ``generator`` (a ``torch.Generator``; global RNG when None). Normalised with
    ``mean``/``std`` (OpenAI's by default).
    """
    return ImageTransform(image_size, train, mean, std, scale, ratio, generator)
