"""The synthetic shapes dataset of the CPU demo: captioned images drawn with Pillow, no download.

Each image (``image_size``², default 32) holds one shape, ``small`` or ``large``, anywhere in the
image, on a gray background of any shade that contrasts with the shape. The drawing varies what a
name does not fix: the radius within its size class, the position, a rotation of up to
±``MAX_ROTATION`` rad, the proportions (``PROPORTIONS``: a star's inner radius, a cross's arm
width, a diamond's width, a circle's roundness) and the RGB values (±``COLOR_JITTER`` per channel
around the colour's base value).

The task's vocabulary is ``SHAPES`` (6) and ``COLORS`` (8): zero-shot accuracy is measured on
them. Training also draws ``TRAIN_ONLY_SHAPES`` (ring, arrow) and ``TRAIN_ONLY_COLORS`` (pink,
brown, cyan, navy, each at least 97 RGB units from every task colour), every one of them in all
combinations. They are there for the held-out pairs below: seen with four more colours each
shape's features depend less on the colour it is drawn in, and seen on two more shapes each
colour's features depend less on the shape (docs/demo.md: held-out shape 74-95% against 62-72% at 1200
steps without them).

Compositional hold-out: the (colour, shape) pairs in ``HELD_OUT`` never appear in the ``train``
split (every colour and every shape still does, in other pairs). The ``heldout`` split draws
images of exactly those pairs, so zero-shot accuracy on it (shape task: which of the 6 shapes;
colour task: which of the 8 colours) measures composition, not memory.

Batches of distinct captions (``design="distinct"``, the default). Consecutive indices form
blocks of ``BLOCK`` = 88 samples that hold each training (colour, shape) pair once, in a random
order per block, with a random size; every caption names the colour and the shape, half of
them the size too ("a red circle", "a drawing of a small blue star"). The demo reads the data in
index order with a batch of 88, so each batch is one block: every caption describes exactly one
image of its batch, and every image has in its batch its colour in every other shape and its
shape in every other colour, the negatives that only shape (or only colour) tells apart. The
contrastive loss then has no false negatives. With the earlier partial captions ("a drawing of
a star" when the batch holds several stars) 13% of a batch's rows shared their exact caption,
and a shape-only caption described every star of the batch while the loss pushed it away from
all but one.

The other designs are kept for the measurements in docs/demo.md: ``"iid"`` draws every sample's
pair at random (same captions, so a batch may repeat a caption), ``"colour-groups"`` is the
earlier recipe on this renderer (runs of ``group_size`` indices sharing one colour with
probability ``group_prob``, half of the captions naming the shape alone, task vocabulary only).

Everything is a pure function of ``(seed, split, index)``: ``__getitem__`` draws the sample on
the fly (about 0.1 ms), so the dataset costs no memory and any index can be regenerated exactly
(deterministic training and resume).
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220), "yellow": (245, 225, 30),
    "purple": (130, 40, 170), "orange": (250, 135, 20), "white": (245, 245, 245), "black": (15, 15, 15),
}
COLOR_NAMES: Tuple[str, ...] = tuple(COLORS)
SIZES: Tuple[str, ...] = ("small", "large")
TRAIN_ONLY_SHAPES: Tuple[str, ...] = ("ring", "arrow")
TRAIN_ONLY_COLORS: Dict[str, Tuple[int, int, int]] = {
    "pink": (240, 150, 190), "brown": (130, 80, 40), "cyan": (40, 200, 210), "navy": (25, 35, 110)}

# One held-out shape per colour; each shape is held out in one or two colours.
HELD_OUT: Tuple[Tuple[str, str], ...] = (
    ("red", "star"), ("green", "circle"), ("blue", "cross"), ("yellow", "triangle"),
    ("purple", "square"), ("orange", "diamond"), ("white", "diamond"), ("black", "triangle"),
)
# The task's training pairs (40), and with the training-only vocabulary (88: 12 colours x 8
# shapes, less the held-out 8).
TRAIN_PAIRS: Tuple[Tuple[str, str], ...] = tuple(
    (c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in HELD_OUT)
ALL_TRAIN_PAIRS: Tuple[Tuple[str, str], ...] = tuple(
    (c, s) for c in (*COLOR_NAMES, *TRAIN_ONLY_COLORS) for s in (*SHAPES, *TRAIN_ONLY_SHAPES)
    if (c, s) not in HELD_OUT)
BLOCK = len(ALL_TRAIN_PAIRS)  # 88
PALETTE: Dict[str, Tuple[int, int, int]] = {**COLORS, **TRAIN_ONLY_COLORS}
SPLITS = ("train", "heldout")
DESIGNS = ("distinct", "iid", "colour-groups")
PREFIXES = ("a", "a picture of a", "a photo of a", "a drawing of a", "an image of a")
SIZE_WORD_PROB = 0.5  # captions that also name the size

# Circumradius as a fraction of the side, [lo, hi): the classes never overlap, and a small star
# still spans ~11 pixels at 32x32.
RADIUS = {"small": (0.17, 0.23), "large": (0.29, 0.37)}
MAX_ROTATION = 0.3  # radians; a square turned by 45 degrees would be a diamond
COLOR_JITTER = 20  # per channel
# A background gray g is drawn uniformly from 0..255 among the shades whose largest channel
# difference to the shape's base colour is at least this (white shapes: g <= 155, black: g >= 105).
MIN_CONTRAST = 90
# The proportion drawn per shape, uniform in [lo, hi) (see ``polygon``; circle: height / width of
# the ellipse; ring: hole radius / radius; arrow: direction in radians).
PROPORTIONS = {"circle": (0.85, 1.0), "square": (1.0, 1.0), "triangle": (1.0, 1.0), "star": (0.35, 0.6),
               "diamond": (0.5, 0.78), "cross": (0.22, 0.45), "ring": (0.45, 0.65), "arrow": (-math.pi, math.pi)}


def polygon(shape: str, cx: float, cy: float, r: float, rot: float, prop: float) -> List[Tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius ``r``, rotated by ``rot``
    radians. ``prop`` sets the proportion that varies: a star's inner radius and a cross's arm
    half-width (fractions of ``r``), a diamond's half-width (fraction of its half-height), an
    arrow's direction (added to ``rot``)."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else prop * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else prop * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "diamond":
        pts = [(0, -r), (prop * r, 0), (0, r), (-prop * r, 0)]
    elif shape == "cross":
        a = prop * r
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a),
               (-a, -a)]
    elif shape == "arrow":
        a = 0.3 * r
        pts = [(-r, -a), (0.1 * r, -a), (0.1 * r, -2 * a), (r, 0), (0.1 * r, 2 * a), (0.1 * r, a), (-r, a)]
        rot = rot + prop
    else:
        raise ValueError(f"no polygon for shape {shape!r}; expected one of "
                         f"{tuple(s for s in (*SHAPES, *TRAIN_ONLY_SHAPES) if s not in ('circle', 'ring'))}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def background_grays(rgb: Tuple[int, int, int]) -> List[int]:
    """The gray levels a shape of base colour ``rgb`` may be drawn on (``MIN_CONTRAST``)."""
    return [g for g in range(256) if max(abs(v - g) for v in rgb) >= MIN_CONTRAST]


_GRAYS = {c: background_grays(rgb) for c, rgb in PALETTE.items()}


def _jitter(rgb: Tuple[int, int, int], rng: random.Random, amount: int) -> Tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``(image FloatTensor [3, S, S], tokens LongTensor [context_length])``.

    Args:
        size: number of samples (indices ``0 .. size-1``).
        seed: the dataset seed; sample ``i`` depends only on ``(seed, split, i)``.
        split: ``"train"`` (never a ``HELD_OUT`` pair) or ``"heldout"`` (a ``HELD_OUT`` pair,
            each with probability 1/8; see ``labels``).
        image_size: side S in pixels (default 32). Shapes are drawn at 2x and downsampled
            (box filter) for anti-aliased edges.
        context_length: token length (default 32; captions are at most 10 tokens).
        normalize: callable mapping a [3, S, S] tensor in [0, 1] to the model input; default
            CLIP's mean/std normalisation.
        design: ``"distinct"`` (default), ``"iid"`` or ``"colour-groups"`` (see the module
            docstring). Train split only.
        group_size, group_prob: the colour groups of ``design="colour-groups"`` (default 16, 1.0).
    """

    def __init__(self, size: int, seed: int = 0, split: str = "train", image_size: int = 32,
                 context_length: int = 32, normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 design: str = "distinct", group_size: int = 16, group_prob: float = 1.0):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if not 0.0 <= float(group_prob) <= 1.0:
            raise ValueError(f"group_prob must be in [0, 1], got {group_prob!r}")
        self.size, self.seed, self.split, self.image_size = size, int(seed), split, image_size
        self.design, self.group_size, self.group_prob = design, group_size, float(group_prob)
        self.context_length = context_length
        self.normalize = normalize
        if normalize is None:  # CLIP's mean/std as one affine map of the uint8 pixels (numpy)
            from ..transforms import OPENAI_MEAN, OPENAI_STD
            std = np.asarray(OPENAI_STD, dtype=np.float32)
            self._scale = (1.0 / (255.0 * std)).astype(np.float32)
            self._shift = (-np.asarray(OPENAI_MEAN, dtype=np.float32) / std).astype(np.float32)
        self._token_cache: Dict[str, torch.Tensor] = {}
        self._block_cache: Tuple[int, List[int]] = (-1, [])

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # A distinct, reproducible stream per (seed, split, index); Random(int) costs ~3 us.
        return random.Random((self.seed * 2 + SPLITS.index(self.split)) * 1_000_000_007 + index)

    def block_order(self, block: int) -> List[int]:
        """The order of ``ALL_TRAIN_PAIRS`` in block ``block`` of the ``distinct`` design."""
        if self._block_cache[0] != block:
            order = list(range(BLOCK))
            random.Random((self.seed * 2 + 1) * 1_000_000_009 + block).shuffle(order)
            self._block_cache = (block, order)
        return self._block_cache[1]

    def group_color(self, index: int) -> Optional[str]:
        """``colour-groups`` design: the colour shared by ``index``'s group, or None (a mixed group,
        or another design)."""
        if self.split != "train" or self.design != "colour-groups" or self.group_size == 1:
            return None
        g = random.Random((self.seed * 2 + 1) * 1_000_000_009 + index // self.group_size)
        return COLOR_NAMES[g.randrange(len(COLOR_NAMES))] if g.random() < self.group_prob else None

    def _pair(self, index: int, rng: random.Random) -> Tuple[str, str]:
        if self.split == "heldout":
            return HELD_OUT[rng.randrange(len(HELD_OUT))]
        if self.design == "distinct":
            return ALL_TRAIN_PAIRS[self.block_order(index // BLOCK)[index % BLOCK]]
        if self.design == "iid":
            return ALL_TRAIN_PAIRS[rng.randrange(BLOCK)]
        group = self.group_color(index)
        pairs = TRAIN_PAIRS if group is None else tuple(p for p in TRAIN_PAIRS if p[0] == group)
        return pairs[rng.randrange(len(pairs))]

    def sample(self, index: int) -> Dict[str, object]:
        """The raw sample ``index``: ``{"image": PIL.Image, "caption": str, "color", "shape",
        "size": str, "background": int (gray level), "center": (x, y), "radius": float}``
        (``center`` and ``radius`` in pixels of the ``image_size`` image)."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of size {self.size}")
        rng = self._rng(index)
        color, shape = self._pair(index, rng)
        size = SIZES[rng.randrange(2)]
        s = self.image_size
        r = s * rng.uniform(*RADIUS[size])
        cx, cy = rng.uniform(r, s - r), rng.uniform(r, s - r)
        rot = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
        prop = rng.uniform(*PROPORTIONS[shape])
        gray = rng.choice(_GRAYS[color])
        fill = _jitter(PALETTE[color], rng, COLOR_JITTER)
        image = self._draw(shape, cx, cy, r, rot, prop, fill, gray)
        return {"image": image, "caption": self._caption(color, shape, size, rng), "color": color,
                "shape": shape, "size": size, "background": gray, "center": (cx, cy), "radius": r}

    def _draw(self, shape: str, cx: float, cy: float, r: float, rot: float, prop: float,
              fill: Tuple[int, int, int], gray: int) -> Image.Image:
        big = 2 * self.image_size
        img = Image.new("RGB", (big, big), (gray, gray, gray))
        draw = ImageDraw.Draw(img)
        cx, cy, r = 2 * cx, 2 * cy, 2 * r
        if shape == "circle":  # an axis-aligned ellipse, height / width = prop
            draw.ellipse((cx - r, cy - prop * r, cx + r, cy + prop * r), fill=fill)
        elif shape == "ring":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            q = prop * r
            draw.ellipse((cx - q, cy - q, cx + q, cy + q), fill=(gray, gray, gray))
        else:
            draw.polygon(polygon(shape, cx, cy, r, rot, prop), fill=fill)
        return img.resize((self.image_size, self.image_size), Image.Resampling.BOX)

    def _caption(self, color: str, shape: str, size: str, rng: random.Random) -> str:
        prefix = PREFIXES[rng.randrange(len(PREFIXES))]
        if self.design != "colour-groups" or self.split == "heldout":
            return f"{prefix} {size} {color} {shape}" if rng.random() < SIZE_WORD_PROB else f"{prefix} {color} {shape}"
        # colour-groups: the earlier caption mix, half of it naming the shape alone
        style = rng.randrange(6)
        if style < 3:
            return f"{prefix} {shape}"
        if style == 3:
            return f"{prefix} {size} {shape}"
        if style == 4:
            return f"{prefix} {color} {shape}"
        return f"{prefix} {size} {color} {shape}"

    def tokens(self, caption: str) -> torch.Tensor:
        """``caption`` tokenized to LongTensor ``[context_length]`` (cached: captions repeat)."""
        t = self._token_cache.get(caption)
        if t is None:
            from ..tokenizer import tokenize
            t = tokenize([caption], context_length=self.context_length, truncate=True)[0]
            if len(self._token_cache) < 200_000:
                self._token_cache[caption] = t
        return t

    def image_tensor(self, image: Image.Image) -> torch.Tensor:
        """``image`` as the model input, FloatTensor ``[3, S, S]``."""
        arr = np.asarray(image, dtype=np.uint8)  # [S, S, 3]
        if self.normalize is None:
            return torch.from_numpy(arr * self._scale + self._shift).permute(2, 0, 1)  # a channels-last view
        return self.normalize(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0))

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.sample(int(index))
        return self.image_tensor(s["image"]), self.tokens(s["caption"])

    def labels(self, index: int) -> Tuple[int, int]:
        """``(shape index in SHAPES, colour index in COLOR_NAMES)`` of a ``heldout`` sample."""
        if self.split != "heldout":
            raise ValueError("labels() is defined for split='heldout' only (training samples may use "
                             "the training-only shapes and colours)")
        s = self.sample(int(index))
        return SHAPES.index(s["shape"]), COLOR_NAMES.index(s["color"])

    def eval_tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every ``heldout`` sample at once: ``(images [N, 3, S, S], shape_labels [N], color_labels [N])``."""
        if self.split != "heldout":
            raise ValueError("eval_tensors() is defined for split='heldout' only")
        images, shapes, colors = [], [], []
        for i in range(self.size):
            s = self.sample(i)
            images.append(self.image_tensor(s["image"]))
            shapes.append(SHAPES.index(s["shape"]))
            colors.append(COLOR_NAMES.index(s["color"]))
        return torch.stack(images), torch.tensor(shapes), torch.tensor(colors)
