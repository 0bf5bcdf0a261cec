"""The synthetic shapes dataset of the CPU demo: captioned images drawn with Pillow, no download.

Each image (``image_size``², default 64) holds one or two shapes from ``SHAPES`` in colours from
``COLORS``, ``small`` or ``large``, placed ``left``/``right``/``top``/``bottom``/``centre``, on a
gray, white or black background (``backgrounds="varied"``: any colour) that is never one of the
shapes' colours. Three images in four hold one shape. Captions are built from the attributes
with varied wording ("a small red circle on the left", "a drawing of a star", "two shapes: a
blue star and a yellow square", ...); half of the single-shape captions name the shape alone.

Compositional hold-out: the (colour, shape) pairs in ``HELD_OUT`` never appear in the ``train``
split (every colour and every shape still does, in other pairs). The ``heldout`` split draws
single-shape images of exactly those pairs, so zero-shot accuracy on it (shape task: which of
the 6 shapes; colour task: which of the 8 colours) measures composition, not memory.

Colour groups (``group_size`` > 1, train split): consecutive indices form groups of
``group_size``; with probability ``group_prob`` a group draws the first (or only) shape of every
image in one colour. The trainer's demo batches are runs of consecutive indices, so such a group
is a block of hard negatives: captions that colour cannot tell apart, only shape, size and
position. Why the demo needs them: in i.i.d. batches colour and position alone separate almost
every caption, the gradient that would teach shape is mostly noise, and neither tower learned
shape in the demo's 3-minute budget (zero-shot shape at or below chance on held-out pairs and on
training pairs, 2-core Zen 4, ViT and ResNet towers alike). With colour groups (16, always one
colour) the ResNet demo reaches 72% on training pairs and 35% on held-out pairs in 1300 steps;
groups that are one colour only half the time learned less shape in the same steps.

Everything is a pure function of ``(seed, split, index)``: ``__getitem__`` draws the sample on
the fly (about 0.2 ms for a 64×64 image), so the dataset costs no memory and any index can be
regenerated exactly (deterministic training and resume).
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
POSITIONS: Tuple[str, ...] = ("left", "right", "top", "bottom", "centre")
# Background-only colours, added to the palette colours not used by the image's shapes.
_EXTRA_BACKGROUNDS = {"gray": (128, 128, 128), "light gray": (190, 190, 190), "dark gray": (70, 70, 70),
                      "brown": (120, 75, 40), "pink": (240, 160, 190), "teal": (20, 130, 130)}

# One held-out shape per colour; each shape is held out in one or two colours.
HELD_OUT: Tuple[Tuple[str, str], ...] = (
    ("red", "star"), ("green", "circle"), ("blue", "cross"), ("yellow", "triangle"),
    ("purple", "square"), ("orange", "diamond"), ("white", "diamond"), ("black", "triangle"),
)
TRAIN_PAIRS: Tuple[Tuple[str, str], ...] = tuple(
    (c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in HELD_OUT)
_TRAIN_PAIRS_BY_COLOR: Dict[str, Tuple[Tuple[str, str], ...]] = {
    c: tuple(p for p in TRAIN_PAIRS if p[0] == c) for c in COLOR_NAMES}

# Centres as fractions of the image side; opposite pairs never overlap at the large size.
_CENTRES = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
            "centre": (0.5, 0.5)}
_PAIRS_OF_POSITIONS = (("left", "right"), ("top", "bottom"))
_RADIUS = {"small": (0.11, 0.14), "large": (0.19, 0.22)}  # fraction of the side, [lo, hi)
_POS_PHRASES = {"left": ("on the left", "at the left"), "right": ("on the right", "at the right"),
                "top": ("at the top", "near the top"), "bottom": ("at the bottom", "near the bottom"),
                "centre": ("in the centre", "in the middle")}
_PREFIXES = ("a", "a picture of a", "a photo of a", "a drawing of a", "an image of a")
SPLITS = ("train", "heldout")
# The caption mix, measured on the demo (ResNet tower, batch 128, 2-core Zen 4, ~560 steps): with
# half the images single-shape and 20% of their captions naming the shape alone, training-pair
# zero-shot shape reached 0.30 after 500 steps; with 75% single shapes and half of their
# captions shape-only (the word then carries a quarter of the EOT token's attention, not an
# eighth), 0.61.
_SINGLE_PROB = 0.75
_SHAPE_ONLY_PROB = 0.5
_NEUTRAL_BACKGROUNDS = ("gray", "light gray", "dark gray", "white", "black")
BACKGROUNDS = ("varied", "neutral")


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> List[Tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius ``r``, rotated by ``rot`` radians."""
    if shape == "square":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif shape == "triangle":
        pts = [(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif shape == "star":
        pts = [((r if k % 2 == 0 else 0.42 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (r if k % 2 == 0 else 0.42 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    elif shape == "diamond":
        pts = [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)]
    elif shape == "cross":
        a = 0.33 * r
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a),
               (-a, -a)]
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def _jitter(rgb: Tuple[int, int, int], rng: random.Random, amount: int) -> Tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in rgb)  # type: ignore[return-value]


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style dataset of ``(image FloatTensor [3, S, S], tokens LongTensor [context_length])``.

    Args:
        size: number of samples (indices ``0 .. size-1``).
        seed: the dataset seed; sample ``i`` depends only on ``(seed, split, i)``.
        split: ``"train"`` (one or two shapes, never a ``HELD_OUT`` pair) or ``"heldout"``
            (one shape of a ``HELD_OUT`` pair; see ``labels``).
        image_size: side S in pixels (default 64). Shapes are drawn at 2× and downsampled
            (box filter) for anti-aliased edges.
        context_length: token length (default 32; the longest caption is ~22 tokens).
        normalize: callable mapping a [3, S, S] tensor in [0, 1] to the model input; default
            CLIP's mean/std normalisation.
        group_size: colour groups of this many consecutive indices (default 1: none; train
            split only, see the module docstring).
        group_prob: probability that a group is one colour (default 0.5).
        backgrounds: ``"neutral"`` (default: gray, light gray, dark gray, white or black) or
            ``"varied"`` (also the palette colours and brown, pink, teal). Never a shape's colour.
            Neutral by default because the demo learns colour far sooner on it (zero-shot colour
            0.86 after 100 steps, against 0.18 with coloured backgrounds, which dominate the
            image's pixels), leaving the budget's steps to shape.
    """

    def __init__(self, size: int, seed: int = 0, split: str = "train", image_size: int = 64,
                 context_length: int = 32, normalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 group_size: int = 1, group_prob: float = 0.5, backgrounds: str = "neutral"):
        if backgrounds not in BACKGROUNDS:
            raise ValueError(f"backgrounds must be one of {BACKGROUNDS}, got {backgrounds!r}")
        self.backgrounds = backgrounds
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {group_size!r}")
        if not 0.0 <= float(group_prob) <= 1.0:
            raise ValueError(f"group_prob must be in [0, 1], got {group_prob!r}")
        self.group_size, self.group_prob = group_size, float(group_prob)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
        self.size, self.seed, self.split, self.image_size = size, int(seed), split, image_size
        self.context_length = context_length
        if normalize is None:
            from ..transforms import OPENAI_MEAN, OPENAI_STD
            mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
            std = torch.tensor(OPENAI_STD).view(3, 1, 1)
            normalize = lambda x: (x - mean) / std  # noqa: E731
        self.normalize = normalize
        self._token_cache: Dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        # A distinct, reproducible stream per (seed, split, index); Random(int) costs ~3 µs.
        return random.Random((self.seed * 2 + SPLITS.index(self.split)) * 1_000_000_007 + index)

    def group_color(self, index: int) -> Optional[str]:
        """The colour shared by ``index``'s group, or None (no groups, or a mixed group)."""
        if self.split != "train" or self.group_size == 1:
            return None
        g = random.Random((self.seed * 2 + 1) * 1_000_000_009 + index // self.group_size)
        return COLOR_NAMES[g.randrange(len(COLOR_NAMES))] if g.random() < self.group_prob else None

    def sample(self, index: int) -> Dict[str, object]:
        """The raw sample ``index``: ``{"image": PIL.Image, "caption": str, "objects": [...],
        "background": str}``; each object is ``{"shape", "color", "size", "position"}``."""
        if not 0 <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of size {self.size}")
        rng = self._rng(index)
        if self.split == "heldout":
            color, shape = HELD_OUT[rng.randrange(len(HELD_OUT))]
            objs = [dict(shape=shape, color=color, size=rng.choice(SIZES), position=rng.choice(POSITIONS))]
        else:
            group_color = self.group_color(index)
            pairs = TRAIN_PAIRS if group_color is None else _TRAIN_PAIRS_BY_COLOR[group_color]
            if rng.random() < _SINGLE_PROB:
                color, shape = pairs[rng.randrange(len(pairs))]
                objs = [dict(shape=shape, color=color, size=rng.choice(SIZES), position=rng.choice(POSITIONS))]
            else:  # the second shape's colour is free: two-shape captions still teach colour
                first = pairs[rng.randrange(len(pairs))]
                second = first
                while second == first:
                    second = TRAIN_PAIRS[rng.randrange(len(TRAIN_PAIRS))]
                positions = list(rng.choice(_PAIRS_OF_POSITIONS))
                rng.shuffle(positions)
                objs = [dict(shape=s, color=c, size=rng.choice(SIZES), position=p)
                        for (c, s), p in zip((first, second), positions)]
        used = {o["color"] for o in objs}
        if self.backgrounds == "neutral":
            backgrounds = [c for c in _NEUTRAL_BACKGROUNDS if c not in used]
        else:
            backgrounds = [c for c in COLOR_NAMES if c not in used] + list(_EXTRA_BACKGROUNDS)
        background = rng.choice(backgrounds)
        bg_rgb = COLORS.get(background) or _EXTRA_BACKGROUNDS[background]
        image = self._draw(objs, _jitter(bg_rgb, rng, 12), rng)
        return {"image": image, "caption": self._caption(objs, background, rng), "objects": objs,
                "background": background}

    def _draw(self, objs: Sequence[Dict[str, str]], bg: Tuple[int, int, int], rng: random.Random) -> Image.Image:
        big = 2 * self.image_size
        img = Image.new("RGB", (big, big), bg)
        draw = ImageDraw.Draw(img)
        for o in objs:
            fx, fy = _CENTRES[o["position"]]
            lo, hi = _RADIUS[o["size"]]
            r = big * rng.uniform(lo, hi)
            cx = big * fx + rng.uniform(-0.04, 0.04) * big
            cy = big * fy + rng.uniform(-0.04, 0.04) * big
            fill = _jitter(COLORS[o["color"]], rng, 10)
            if o["shape"] == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
            else:
                draw.polygon(_polygon(o["shape"], cx, cy, r, rng.uniform(-0.25, 0.25)), fill=fill)
        return img.resize((self.image_size, self.image_size), Image.Resampling.BOX)

    @staticmethod
    def _caption(objs: Sequence[Dict[str, str]], background: str, rng: random.Random) -> str:
        def phrase(o, with_size, with_pos):
            words = ([o["size"]] if with_size else []) + [o["color"], o["shape"]]
            text = "a " + " ".join(words)
            return text + " " + rng.choice(_POS_PHRASES[o["position"]]) if with_pos else text

        if len(objs) == 1:
            o = objs[0]
            if rng.random() < _SHAPE_ONLY_PROB:  # "a drawing of a star", "a photo of a large star"
                style = rng.randrange(3)
                words = o["shape"] if style < 2 else f"{o['size']} {o['shape']}"
                where = f" {rng.choice(_POS_PHRASES[o['position']])}" if style == 1 else ""
                return f"{rng.choice(_PREFIXES)} {words}{where}"
            style = rng.randrange(10)
            # Partial descriptions (shape only / colour only) teach the words on their own, as
            # zero-shot prompts use them ("a photo of a star shape.", "something red.").
            if style == 7:
                return f"{rng.choice(_PREFIXES)} {o['shape']}" + (f" {rng.choice(_POS_PHRASES[o['position']])}"
                                                                  if rng.random() < 0.5 else "")
            if style == 8:
                return f"{rng.choice(_PREFIXES)} {o['size']} {o['shape']}"
            if style == 9:
                return rng.choice(("something {}", "a {} shape", "a {} object", "the color {}")).format(o["color"])
            if style == 0:
                return phrase(o, True, True)
            if style == 1:
                return phrase(o, False, True)
            if style == 2:
                return phrase(o, False, False)
            if style == 3:
                return phrase(o, True, False)
            if style == 4:
                return f"{rng.choice(_POS_PHRASES[o['position']])} there is {phrase(o, True, False)}"
            if style == 5:
                return f"{rng.choice(_PREFIXES)} {phrase(o, rng.random() < 0.5, False)[2:]}"
            return f"{phrase(o, False, False)} on a {background} background"
        a, b = objs if rng.random() < 0.5 else objs[::-1]
        style = rng.randrange(4)
        if style == 0:
            return f"two shapes: {phrase(a, False, False)} and {phrase(b, False, False)}"
        if style == 1:
            return f"{phrase(a, False, False)} and {phrase(b, False, False)}"
        if style == 2:
            return f"{phrase(a, True, True)} and {phrase(b, True, True)}"
        return f"{phrase(a, False, True)}, {phrase(b, False, True)}"

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
        arr = np.asarray(image, dtype=np.uint8)  # [S, S, 3]
        return self.normalize(torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0))

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        s = self.sample(int(index))
        return self.image_tensor(s["image"]), self.tokens(s["caption"])

    def labels(self, index: int) -> Tuple[int, int]:
        """``(shape index in SHAPES, colour index in COLOR_NAMES)`` of a ``heldout`` sample."""
        if self.split != "heldout":
            raise ValueError("labels() is defined for split='heldout' (single-shape images) only")
        o = self.sample(int(index))["objects"][0]
        return SHAPES.index(o["shape"]), COLOR_NAMES.index(o["color"])

    def eval_tensors(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every ``heldout`` sample at once: ``(images [N, 3, S, S], shape_labels [N], color_labels [N])``."""
        if self.split != "heldout":
            raise ValueError("eval_tensors() is defined for split='heldout' only")
        images, shapes, colors = [], [], []
        for i in range(self.size):
            s = self.sample(i)
            o = s["objects"][0]
            images.append(self.image_tensor(s["image"]))
            shapes.append(SHAPES.index(o["shape"]))
            colors.append(COLOR_NAMES.index(o["color"]))
        return torch.stack(images), torch.tensor(shapes), torch.tensor(colors)
