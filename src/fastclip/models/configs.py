"""Model configurations: OpenAI's nine released CLIP models plus small test/demo models."""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

# Layers per tower stage at most (OpenAI's deepest stage has 36).
_MAX_LAYERS = 1024


def _whole(name: str, v) -> int:
    """``v`` as an int when it is a whole number (Python's or NumPy's integers), else a
    ValueError naming ``name``: booleans and floats are refused."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
    return int(v)


@dataclass
class CLIPConfig:
    """Architecture hyper-parameters (JSON-serialisable via ``asdict``/``to_dict``).

    ``vision_layers``: an int for a ViT (transformer depth) or 4 ints for a ModifiedResNet
    (blocks per stage); ``patch_size`` is ignored for ResNets. Heads default to OpenAI's rule
    (ViT: width // 64; ResNet: width * 32 // 64; text: width // 64).
    ``init_logit_scale``: the initial (exponentiated) logit scale, CLIP's 1/0.07 by default
    (SigLIP: 10). ``init_logit_bias``: None (CLIP, OpenAI's checkpoints) or the initial value
    of a learnable bias added to every logit (SigLIP: -10); the model then has a
    ``logit_bias`` parameter. ``quick_gelu``: the transformers' MLP activation, QuickGELU
    (True, default: OpenAI's models and weights) or the exact GELU (False: open_clip's models
    without ``-quickgelu`` in their name, e.g. its LAION weights; the weights have the same
    names and shapes either way, so nothing in a state dict tells them apart).
    ``vision_mlp_width``, ``text_mlp_width``: the hidden width of the transformers' MLPs; None
    (default) is 4 x the tower's width, as in OpenAI's models (open_clip's ViT-g, -bigG and -e
    image towers use other ratios). ``text_eos_id``: where the text tower pools. None (default):
    at the largest token id in the row, OpenAI's rule (the end-of-text token is the last id of
    CLIP's BPE vocabulary); an int: at the first occurrence of that id, open_clip's
    ``pool_type="eos"`` for models with another tokenizer (its ``-worldwide`` models: 2, or 1
    for those with mT5's tokenizer), position 0 in a row without it.
    """

    embed_dim: int
    image_size: int
    vision_layers: Union[int, Tuple[int, ...]]
    vision_width: int
    patch_size: Optional[int] = None
    vision_heads: Optional[int] = None
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_heads: Optional[int] = None
    text_layers: int = 12
    init_logit_scale: float = 1 / 0.07
    init_logit_bias: Optional[float] = None
    quick_gelu: bool = True
    vision_mlp_width: Optional[int] = None
    text_mlp_width: Optional[int] = None
    text_eos_id: Optional[int] = None

    def __post_init__(self):
        if isinstance(self.vision_layers, list):
            self.vision_layers = tuple(self.vision_layers)
        for name in ("embed_dim", "image_size", "vision_layers", "vision_width", "context_length", "vocab_size",
                     "text_width", "text_layers"):
            if getattr(self, name) is None:     # (None then failed a comparison naming no field)
                raise ValueError(f"{name} must be set, got None (null)")
        if not self.is_resnet and self.patch_size is None:
            raise ValueError(f"vision_layers {self.vision_layers!r} (one int) makes a ViT image tower, which needs "
                             f"patch_size; a ResNet tower's vision_layers is 4 ints (blocks per stage, e.g. "
                             f"[2, 2, 2, 2])")
        # Whole numbers only: JSON's true passed as 1 (a one-layer tower), 64.0 failed deep in torch.
        for name in ("embed_dim", "image_size", "vision_width", "context_length", "vocab_size", "text_width",
                     "text_layers", "patch_size", "vision_heads", "text_heads", "vision_mlp_width",
                     "text_mlp_width", "text_eos_id"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, _whole(name, v))
        if self.is_resnet:
            self.vision_layers = tuple(_whole("vision_layers", v) for v in self.vision_layers)
        else:
            self.vision_layers = _whole("vision_layers", self.vision_layers)
        for name in ("embed_dim", "image_size", "vision_width", "vocab_size", "text_width", "text_layers"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.context_length < 2:     # a start and an end-of-text token at least
            raise ValueError(f"context_length must be >= 2, got {self.context_length}")
        layers = self.vision_layers if self.is_resnet else (self.vision_layers,)
        for name, counts in (("vision_layers", layers), ("text_layers", (self.text_layers,))):
            # Checked before anything is built: a million layers took hours to build on the meta device.
            if any(c > _MAX_LAYERS for c in counts):
                raise ValueError(f"{name} must be at most {_MAX_LAYERS} per stage, got {list(counts)}")
        if self.is_resnet:
            if len(self.vision_layers) != 4 or any(v <= 0 for v in self.vision_layers):
                raise ValueError(f"vision_layers must be 4 positive ints for a ResNet, got {list(self.vision_layers)}")
            if self.vision_width < 2:   # the stem's first convolution has width // 2 channels
                raise ValueError(f"vision_width must be >= 2 for a ResNet, got {self.vision_width}")
        else:
            if self.vision_layers <= 0:
                raise ValueError(f"vision_layers must be positive, got {self.vision_layers}")
            if self.patch_size <= 0 or self.patch_size > self.image_size:
                raise ValueError(f"patch_size must be in [1, image_size={self.image_size}], got {self.patch_size}")
        for name in ("vision_heads", "text_heads"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive (or null: width / 64), got {v}")
        for name in ("vision_mlp_width", "text_mlp_width"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be positive (or null: 4 x width), got {v}")
        towers = [("text_heads", self.text_heads, self.text_num_heads, "text_width", self.text_width)]
        if not self.is_resnet:       # (a ResNet's attention pool checks its own width, x 32)
            towers.insert(0, ("vision_heads", self.vision_heads, self.vision_num_heads, "vision_width",
                              self.vision_width))
        for name, given, heads, wname, width in towers:
            if width % heads:
                how = f"{name}={heads}" if given is not None else f"{name}=null ({heads}: {wname} // 64)"
                raise ValueError(f"{how} must divide {wname}={width}; set {name} to a divisor of {width}")
        if self.is_resnet and self.vision_mlp_width is not None:
            raise ValueError(f"vision_mlp_width is for a ViT; a ResNet image tower has no MLP, "
                             f"got {self.vision_mlp_width}")
        if self.text_eos_id is not None and not 0 <= self.text_eos_id < self.vocab_size:
            raise ValueError(f"text_eos_id must be a token id in [0, vocab_size={self.vocab_size}) "
                             f"(or null: pool at the largest id), got {self.text_eos_id}")
        if not isinstance(self.quick_gelu, bool):    # JSON's 0/1 or "false" would pass as truthy
            raise ValueError(f"quick_gelu must be true or false, got {self.quick_gelu!r}")
        for name in ("init_logit_scale", "init_logit_bias"):
            v = getattr(self, name)
            if isinstance(v, bool):
                raise ValueError(f"{name} must be a number, got {v!r}")
        # Any real number (NumPy's float32 too, which is no Python float), stored as a float.
        if not (isinstance(self.init_logit_scale, numbers.Real) and self.init_logit_scale > 0
                and math.isfinite(self.init_logit_scale)):
            raise ValueError(f"init_logit_scale must be a finite positive number, got {self.init_logit_scale!r}")
        if self.init_logit_bias is not None and not (isinstance(self.init_logit_bias, numbers.Real)
                                                     and math.isfinite(self.init_logit_bias)):
            raise ValueError(f"init_logit_bias must be a finite number or None, got {self.init_logit_bias!r}")
        # NumPy's scalars as Python floats: the config is written as JSON (checkpoints), which
        # takes no np.float32.
        if not isinstance(self.init_logit_scale, (int, float)):
            self.init_logit_scale = float(self.init_logit_scale)
        if self.init_logit_bias is not None and not isinstance(self.init_logit_bias, (int, float)):
            self.init_logit_bias = float(self.init_logit_bias)

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.vision_layers, (tuple, list))

    @property
    def vision_num_heads(self) -> int:
        if self.vision_heads is not None:
            return self.vision_heads
        return self.vision_width * 32 // 64 if self.is_resnet else max(1, self.vision_width // 64)

    @property
    def text_num_heads(self) -> int:
        return self.text_heads if self.text_heads is not None else max(1, self.text_width // 64)

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        if isinstance(d["vision_layers"], tuple):
            d["vision_layers"] = list(d["vision_layers"])
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "CLIPConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown CLIPConfig fields: {sorted(unknown)}")
        return cls(**d)


_T = dict(context_length=77, vocab_size=49408)
MODEL_CONFIGS: Dict[str, CLIPConfig] = {
    "RN50": CLIPConfig(1024, 224, (3, 4, 6, 3), 64, text_width=512, text_layers=12, **_T),
    "RN101": CLIPConfig(512, 224, (3, 4, 23, 3), 64, text_width=512, text_layers=12, **_T),
    "RN50x4": CLIPConfig(640, 288, (4, 6, 10, 6), 80, text_width=640, text_layers=12, **_T),
    "RN50x16": CLIPConfig(768, 384, (6, 8, 18, 8), 96, text_width=768, text_layers=12, **_T),
    "RN50x64": CLIPConfig(1024, 448, (3, 15, 36, 10), 128, text_width=1024, text_layers=12, **_T),
    "ViT-B/32": CLIPConfig(512, 224, 12, 768, patch_size=32, text_width=512, text_layers=12, **_T),
    "ViT-B/16": CLIPConfig(512, 224, 12, 768, patch_size=16, text_width=512, text_layers=12, **_T),
    "ViT-L/14": CLIPConfig(768, 224, 24, 1024, patch_size=14, text_width=768, text_layers=12, **_T),
    "ViT-L/14@336px": CLIPConfig(768, 336, 24, 1024, patch_size=14, text_width=768, text_layers=12, **_T),
    # small models for tests / CPU demos
    "tiny-vit": CLIPConfig(64, 32, 2, 64, patch_size=8, vision_heads=2, context_length=32,
                           text_width=64, text_heads=2, text_layers=2),
    "tiny-rn": CLIPConfig(64, 64, (1, 1, 1, 1), 8, vision_heads=4, context_length=32,
                          text_width=64, text_heads=2, text_layers=2),
    # The CPU demo: CLIP's ModifiedResNet (one block per stage, stem width 16) on 32x32 images.
    # Why not a ViT: the 4-layer ViT (8x8 patches, width 64-128) trained *supervised* on the
    # demo's shapes stays at chance after 300 steps, the ResNet reaches 84% (held-out pairs) in
    # 500; contrastively the ViT learned colour but never shape in the 3-minute budget.
    # Why 32x32: a step (batch 128, 1 thread) costs 113 ms of CPU instead of 286 ms at 64x64.
    # Why width 16: width 12 makes a step ~25% cheaper (tower forward + backward 38 ms instead
    # of 57 ms, batch 88), but at 1500 steps its held-out shape spread over 58-89% (4 seeds)
    # where width 16 stayed at 83-97% (5 seeds).
    "demo": CLIPConfig(64, 32, (1, 1, 1, 1), 16, vision_heads=4, context_length=32,
                       text_width=64, text_heads=2, text_layers=2),
}

# Published parameter totals of OpenAI's checkpoints (numel over all parameters, logit_scale included).
OPENAI_PARAM_COUNTS: Dict[str, int] = {
    "RN50": 102_007_137, "RN101": 119_688_033, "RN50x4": 178_300_601, "RN50x16": 290_979_217,
    "RN50x64": 623_258_305, "ViT-B/32": 151_277_313, "ViT-B/16": 149_620_737, "ViT-L/14": 427_616_513,
    "ViT-L/14@336px": 427_944_193,
}


def list_models() -> List[str]:
    """Names accepted by ``create_model``, OpenAI's nine first."""
    return list(MODEL_CONFIGS)


def get_config(name: str, **overrides: Any) -> CLIPConfig:
    """The ``CLIPConfig`` registered as ``name`` with ``overrides`` (field=value) applied."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model name {name!r}; available: {', '.join(MODEL_CONFIGS)}")
    known = {f.name for f in dataclasses.fields(CLIPConfig)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown config override(s) {bad} for model {name!r}; valid fields: {sorted(known)}")
    return dataclasses.replace(MODEL_CONFIGS[name], **overrides)
