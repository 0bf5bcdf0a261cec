"""A second renderer of the demo's shapes, written independently of ``fastclip.datasets.shapes``,
to measure whether the demo model knows the shapes or only the training renderer's drawings.

It shares nothing with the training renderer but the class names: shapes are point sets tested
analytically on a 4x supersampled grid with numpy (no Pillow drawing), with their own geometry
and proportions:

- star: five points, inner radius 0.50-0.65 of the outer (fatter than most training stars);
- cross: arms of half-width 0.13-0.21 of the arm length (thinner than any training cross);
- diamond: width 0.55-0.85 of its height; triangle: isosceles, base 0.8-1.2 times the
  equilateral one; square: half-side drawn directly (not a circumradius); circle: round;
- size anywhere between the training's small and large, position anywhere (the shape inside
  the image), rotation up to ±0.35 rad;
- background any gray from 0 to 255 at a Euclidean RGB distance of at least 110 from the fill;
- its own RGB value for every colour name, each channel jittered by up to ±25.

``heldout_set`` draws images of the held-out (colour, shape) pairs; ``all_pairs_set`` of any
pair. Both return CLIP-normalised tensors ready for ``evaluate_zeroshot``.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch

SHAPE_NAMES = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOR_NAMES = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
# Base colours chosen here, not copied: same names, other values.
BASE_RGB = {"red": (200, 45, 40), "green": (50, 150, 70), "blue": (45, 85, 200), "yellow": (230, 210, 60),
            "purple": (115, 55, 160), "orange": (235, 120, 40), "white": (235, 235, 230),
            "black": (30, 25, 30)}
HELD_OUT_PAIRS = (("red", "star"), ("green", "circle"), ("blue", "cross"), ("yellow", "triangle"),
                  ("purple", "square"), ("orange", "diamond"), ("white", "diamond"), ("black", "triangle"))
SS = 4  # supersampling factor per axis
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _inside_polygon(px: np.ndarray, py: np.ndarray, vx: Sequence[float], vy: Sequence[float]) -> np.ndarray:
    """Even-odd rule over the polygon's edges (vectorised over points)."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vx)
    for i in range(n):
        x0, y0, x1, y1 = vx[i], vy[i], vx[(i + 1) % n], vy[(i + 1) % n]
        crosses = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= crosses & (px < xc)
    return inside


def _mask(shape: str, u: np.ndarray, v: np.ndarray, extent: float, rng: np.random.Generator) -> np.ndarray:
    """Coverage of ``shape`` in local, rotated coordinates (u right, v down), fitting in a circle
    of radius ``extent``."""
    if shape == "circle":
        return u * u + v * v <= extent * extent
    if shape == "square":
        h = extent / math.sqrt(2.0)
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if shape == "diamond":
        w = extent * rng.uniform(0.55, 0.85)
        return np.abs(u) / w + np.abs(v) / extent <= 1.0
    if shape == "cross":
        arm = extent * 0.95
        a = arm * rng.uniform(0.13, 0.21)
        return ((np.abs(u) <= a) & (np.abs(v) <= arm)) | ((np.abs(v) <= a) & (np.abs(u) <= arm))
    if shape == "triangle":
        half_base = extent * math.sqrt(3.0) / 2 * rng.uniform(0.8, 1.2)
        vx, vy = (0.0, half_base, -half_base), (-extent, extent / 2, extent / 2)
        return _inside_polygon(u, v, vx, vy)
    if shape == "star":
        inner = rng.uniform(0.50, 0.65)
        ang = [-math.pi / 2 + k * math.pi / 5 for k in range(10)]
        rad = [extent if k % 2 == 0 else inner * extent for k in range(10)]
        return _inside_polygon(u, v, [r * math.cos(a) for r, a in zip(rad, ang)],
                               [r * math.sin(a) for r, a in zip(rad, ang)])
    raise ValueError(f"unknown shape {shape!r}")


def render(shape: str, color: str, image_size: int, rng: np.random.Generator) -> np.ndarray:
    """One image, uint8 ``[S, S, 3]``."""
    s = image_size
    extent = s * rng.uniform(0.18, 0.36)
    cx, cy = rng.uniform(extent, s - extent), rng.uniform(extent, s - extent)
    rot = rng.uniform(-0.35, 0.35)
    fill = np.clip(np.array(BASE_RGB[color]) + rng.integers(-25, 26, 3), 0, 255).astype(np.float32)
    while True:
        g = float(rng.integers(0, 256))
        if np.linalg.norm(fill - g) >= 110:
            break
    coords = (np.arange(s * SS, dtype=np.float64) + 0.5) / SS  # sample points in pixel units
    x, y = np.meshgrid(coords, coords)  # [sS, sS]; y grows downwards
    dx, dy = x - cx, y - cy
    c, sn = math.cos(rot), math.sin(rot)
    u, v = c * dx + sn * dy, -sn * dx + c * dy
    cover = _mask(shape, u, v, extent, rng).astype(np.float32)
    alpha = cover.reshape(s, SS, s, SS).mean(axis=(1, 3))[..., None]  # [S, S, 1]
    img = alpha * fill + (1.0 - alpha) * g
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD  # [N, S, S, 3]
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _draw_set(pairs: Sequence[Tuple[str, str]], n: int, image_size: int, seed: int):
    rng = np.random.default_rng(seed)
    imgs, shapes, colors = [], [], []
    for k in range(n):
        color, shape = pairs[k % len(pairs)]
        imgs.append(render(shape, color, image_size, rng))
        shapes.append(SHAPE_NAMES.index(shape))
        colors.append(COLOR_NAMES.index(color))
    return _to_tensor(np.stack(imgs)), torch.tensor(shapes), torch.tensor(colors)


def heldout_set(n: int = 480, image_size: int = 32, seed: int = 1234):
    """``(images [n, 3, S, S], shape labels [n], colour labels [n])`` of the held-out pairs,
    each pair ``n / 8`` times."""
    return _draw_set(HELD_OUT_PAIRS, n, image_size, seed)


def all_pairs_set(n: int = 480, image_size: int = 32, seed: int = 4321):
    """The same for all 48 (colour, shape) pairs."""
    pairs = [(c, s) for c in COLOR_NAMES for s in SHAPE_NAMES]
    return _draw_set(pairs, n, image_size, seed)
