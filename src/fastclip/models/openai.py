"""Loading OpenAI CLIP checkpoints, and fastclip's own safetensors checkpoints.

``load_openai`` accepts OpenAI's TorchScript archives (e.g. ``ViT-B-32.pt``; their weights are
read without running the archive's code, see ``fastclip.models.torchscript``), plain state dicts
with OpenAI's key names (in memory or saved with ``torch.save``, read with
``weights_only=True``) and ``.safetensors`` files with the same keys. The architecture is
inferred from tensor shapes. Head counts leave no trace in the shapes: they follow OpenAI's
rule (64-dim heads), which every OpenAI model uses, except for the vision widths of open_clip's
large ViTs (``_WIDE_VIT_HEADS``) and for registered fastclip models; ``load_openai``'s
``vision_heads``/``text_heads`` set them for anything else.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import pickle
import warnings
from typing import Any, Dict, Mapping, Optional, Union

import torch

from .._fileio import TRAINING_FORMAT, checkpoint_file_problem
from .clip import CLIP
from .configs import MODEL_CONFIGS, CLIPConfig

_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # scalars stored in OpenAI's archives
_TEXT_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight", "logit_scale")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def is_safetensors_file(path: str) -> bool:
    """Whether ``path`` holds a safetensors file, by its header (8 bytes: the little-endian length
    of a JSON header that follows, starting with ``{``), whatever its name: a file saved without
    the ``.safetensors`` suffix was read as a pickle and refused."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= size - 8


def dense_weights(sd: Dict[str, Any], source: str) -> Dict[str, Any]:
    """Each tensor of ``sd`` as a dense one of its own (a copy where it is a view with gaps or
    overlaps), refused when it claims more elements than its storage holds. A file may store a
    [49408, 64] weight as a view of one float (stride 0): kept as the parameter (``assign=True``),
    the fused optimizer wrote 3.1M floats into 4 bytes (a crash); a [2e9, 64] claim on a small
    storage asked for 512 GB when copied. Real checkpoints store each weight densely."""
    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor) and v.layout == torch.strided:
            have = v.untyped_storage().nbytes() - v.storage_offset() * v.element_size()
            if v.numel() * v.element_size() > have:
                raise ValueError(f"{source}: {k}: shape {tuple(v.shape)} with strides {v.stride()} claims "
                                 f"{v.numel()} elements, more than the {max(0, have) // v.element_size()} "
                                 f"its storage holds: not a checkpoint's weight")
            v = v if v.is_contiguous() else v.contiguous()
        out[k] = v
    return out


def _read(path: str, allow_torchscript_code: bool) -> Dict[str, torch.Tensor]:
    from .torchscript import TorchScriptReadError, is_torchscript_archive, read_torchscript_state_dict
    why = checkpoint_file_problem(path)
    if why:
        raise ValueError(f"{path}: {why}")
    if path.endswith(".safetensors") or is_safetensors_file(path):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:  # noqa: BLE001 - re-raised with the path
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if is_torchscript_archive(path):
        if allow_torchscript_code:
            try:
                return torch.jit.load(path, map_location="cpu").state_dict()
            except Exception as e:  # noqa: BLE001 - re-raised with the path
                raise ValueError(f"{path}: torch.jit.load failed ({_first_line(e)})") from None
        try:
            return read_torchscript_state_dict(path)
        except TorchScriptReadError as e:
            raise ValueError(f"{path}: cannot read the weights of this TorchScript archive: {e}. If you trust "
                             f"the file, load_openai(..., allow_torchscript_code=True) loads it with "
                             f"torch.jit.load, which runs the code stored in it") from None
    try:
        with warnings.catch_warnings():     # (torch's note on pickle protocols; the error says it)
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's own advice (weights_only=False) is what fastclip refuses to do: say why.
        detail = [ln[ln.index("Unsupported"):].split(" was not ")[0] for ln in str(e).splitlines()
                  if "Unsupported" in ln]
        raise ValueError(f"{path}: not a CLIP checkpoint fastclip can read: it is not a state dict of "
                         f"tensors and plain values{f' ({detail[0]})' if detail else ''}, and fastclip does "
                         f"not unpickle other Python objects (that can run code stored in the file)") from None
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: could not be read as a CLIP checkpoint (file truncated or corrupt?); "
                         f"with torch.load(weights_only=True): {_first_line(e)}") from None
    if isinstance(obj, Mapping):
        if {"step", "model", "optimizer"} <= set(obj):
            # fastclip's earlier pickle training checkpoint (step_*.pt): its model may use head
            # counts OpenAI's rules would not infer, and it has a converter that keeps them.
            raise ValueError(f"{path}: a training checkpoint in fastclip's earlier pickle format, not a model "
                             f"file; convert it with fastclip.train.checkpoint.convert_legacy_checkpoint and "
                             f"load the .safetensors file it writes")
        return _unwrap(obj)
    raise ValueError(f"{path}: expected a state dict (a mapping of name -> tensor), got {type(obj).__name__}")


_WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DistributedDataParallel, torch.compile


def strip_wrapper_prefixes(sd: Mapping) -> Dict:
    """``sd`` with the key prefixes of wrapped models removed while every key carries one:
    ``module.`` (``DistributedDataParallel``, ``DataParallel``) and ``_orig_mod.``
    (``torch.compile``), in any nesting (a compiled DDP model's keys start
    ``_orig_mod.module.``)."""
    sd = dict(sd)
    while sd:
        pre = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if pre is None:
            break
        sd = {k[len(pre):]: v for k, v in sd.items()}
    return sd


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside ``torch.compile``'s and ``DistributedDataParallel``'s (or
    ``DataParallel``'s) wrappers, in any nesting; ``model`` itself when it is not wrapped."""
    while True:
        inner = model._modules.get("_orig_mod") if hasattr(model, "_modules") else None
        if inner is None and isinstance(model, (torch.nn.parallel.DistributedDataParallel,
                                                torch.nn.DataParallel)):
            inner = model.module
        if inner is None:
            return model
        model = inner


def _unwrap(obj: Mapping) -> Dict:
    """The state dict inside a training script's checkpoint dict (``{"state_dict": ...}`` or
    ``{"model": ...}``, as open_clip and others save them), else ``obj`` itself, as a dict."""
    for k in ("state_dict", "model"):
        if k in obj and isinstance(obj[k], Mapping):
            obj = obj[k]
    return dict(obj)


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of distinct indices ``N`` in keys ``prefix.N.*``."""
    n = len(prefix) + 1
    return len({k[n:].split(".")[0] for k in sd if k.startswith(prefix + ".")})


def _mlp_width(sd: Mapping[str, torch.Tensor], prefix: str, width: int) -> Optional[int]:
    """The hidden width of a tower's MLPs (``c_fc``'s output rows), None where it is OpenAI's
    4 x width. open_clip's ViT-g, -bigG and -e image towers use mlp_ratio 4.3637, 4.9231 and
    8.5715 (hidden 6144, 8192, 15360): a fixed 4 x width refused them."""
    w = sd.get(f"{prefix}.resblocks.0.mlp.c_fc.weight")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] == 4 * width:
        return None
    return int(w.shape[0])


# open_clip's ViT-H (width 1280), ViT-g (1408), ViT-bigG (1664) and ViT-e (1792) image towers,
# and every variant of them in its model_configs (-quickgelu, -378, -worldwide, ViT-H-16), use
# 16 heads (head_width 80, 88, 104, 112): width // 64 gave 20, 22, 26 and 28 heads, which fit the
# same weight shapes, so the model loaded and gave other features (cosine ~0.8 to the right
# ones). Their text towers keep 64-wide heads.
_WIDE_VIT_HEADS = {1280: 16, 1408: 16, 1664: 16, 1792: 16}


def infer_config(sd: Mapping[str, torch.Tensor], source: str = "state dict") -> CLIPConfig:
    """Infer a ``CLIPConfig`` from a state dict in OpenAI's key layout (shapes only).

    Raises ValueError naming ``source`` and the missing keys when it is not a CLIP state dict.
    """
    missing = [k for k in _TEXT_KEYS if k not in sd]
    # A ViT by any of its own keys: one missing "visual.proj" was read as a ResNet, and the error
    # listed ResNet keys as missing.
    vit = "visual.proj" in sd or any(k.startswith(("visual.transformer.", "visual.class_embedding", "visual.ln_pre."))
                                     for k in sd)
    vis = (["visual.conv1.weight", "visual.class_embedding", "visual.positional_embedding", "visual.proj"] if vit else
           ["visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding"])
    missing += [k for k in vis if k not in sd]
    if missing:
        raise ValueError(f"{source}: not a CLIP checkpoint in OpenAI's layout; missing keys {missing}"
                         f" (found {len(sd)} keys{', e.g. ' + repr(list(sd)[:3]) if sd else ''})")
    if vit:
        width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
        layers = _count(sd, "visual.transformer.resblocks")
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_layers=layers, vision_width=width, patch_size=patch, image_size=grid * patch,
                      vision_heads=_WIDE_VIT_HEADS.get(width),
                      vision_mlp_width=_mlp_width(sd, "visual.transformer", width))
    else:
        layers = tuple(_count(sd, f"visual.layer{i}") for i in (1, 2, 3, 4))
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        out = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        vision = dict(vision_layers=layers, vision_width=width, image_size=out * 32)
    tw = sd["ln_final.weight"].shape[0]
    tp = sd["text_projection"]
    if tp.dim() != 2 or tp.shape[0] != tw:
        # embed_dim is read from it: a transposed one was reported as a wrong visual.proj
        raise ValueError(f"{source}: text_projection has shape {tuple(tp.shape)}; expected [text width {tw} "
                         f"(ln_final.weight's), embed_dim]")
    # A SigLIP model's learnable bias is a weight like the scale: its presence makes the model
    # one with a bias (the stored value replaces this initial one when the weights load).
    bias = sd.get("logit_bias")
    init_bias = None
    if isinstance(bias, torch.Tensor) and bias.numel() == 1:
        b = float(bias.detach().reshape(()).float())
        init_bias = b if math.isfinite(b) else -10.0
    cfg = CLIPConfig(embed_dim=sd["text_projection"].shape[1], context_length=sd["positional_embedding"].shape[0],
                     vocab_size=sd["token_embedding.weight"].shape[0], text_width=tw, text_heads=max(1, tw // 64),
                     text_layers=_count(sd, "transformer.resblocks"), init_logit_bias=init_bias,
                     text_mlp_width=_mlp_width(sd, "transformer", tw), **vision)
    return _registered_heads(cfg)


# The fields the weights' shapes decide (heads, the logit initialisation and the activation
# they do not).
_SHAPE_FIELDS = tuple(f.name for f in dataclasses.fields(CLIPConfig)
                      if f.name not in ("vision_heads", "text_heads", "init_logit_scale", "init_logit_bias",
                                        "quick_gelu", "text_eos_id"))


def _registered_heads(cfg: CLIPConfig) -> CLIPConfig:
    """Head counts leave no trace in the weights' shapes. Shapes that are exactly a registered
    model's (``torch.save(create_model("tiny-vit").state_dict())``) take its heads, not OpenAI's
    width // 64 rule, which gave tiny-vit 1 text head for its 2 (outputs off by up to 1.8)."""
    for reg in MODEL_CONFIGS.values():
        if all(getattr(reg, k) == getattr(cfg, k) for k in _SHAPE_FIELDS):
            return dataclasses.replace(
                cfg, vision_heads=reg.vision_heads if reg.vision_heads is not None else cfg.vision_heads,
                text_heads=reg.text_heads if reg.text_heads is not None else cfg.text_heads)
    return cfg


def load_openai(path_or_state_dict: Union[str, os.PathLike, Mapping[str, torch.Tensor]], device="cpu", *,
                dtype: Optional[torch.dtype] = torch.float32, allow_torchscript_code: bool = False,
                quick_gelu: Optional[bool] = None, vision_heads: Optional[int] = None,
                text_heads: Optional[int] = None, text_eos_id: Optional[int] = None) -> CLIP:
    """Build a ``CLIP`` from an OpenAI checkpoint and load its weights with ``strict=True``.

    ``path_or_state_dict``: a TorchScript archive (OpenAI's ``ViT-B-32.pt`` and the like), a
    ``torch.save``'d state dict, a ``.safetensors`` file, or an in-memory mapping. OpenAI's
    released weights are fp16; they are cast to ``dtype`` (default fp32; None keeps the stored
    dtypes). Returns the model in eval mode on ``device``.

    Loading a file runs no code from it: TorchScript archives are read by
    ``fastclip.models.torchscript`` (weights only; the archive's code is never compiled or run)
    and pickles by ``torch.load(weights_only=True)``.

    ``allow_torchscript_code=True`` loads TorchScript archives with ``torch.jit.load`` instead.
    Warning: that executes the code stored in the archive (its ``__setstate__`` methods can
    read and write files, for one); use it only for files from a source you trust, and only if
    the default reader cannot read the archive.

    A ``.safetensors`` file written by fastclip (``save_checkpoint``, ``fastclip train``) is
    rebuilt from the config stored in it, as ``load_checkpoint`` does. Other inputs follow
    OpenAI's layout rules (e.g. 64-wide attention heads), except that shapes which are exactly
    a registered model's take its head counts, and the image towers of open_clip's ViT-H, -g,
    -bigG and -e (widths 1280, 1408, 1664, 1792) take its 16 heads.

    ``vision_heads``, ``text_heads`` (positive ints, default None: the rules above): the
    attention heads of the image and text towers, which no weight shape records; a model built
    with other head counts loads with the wrong ones and gives other features, with no error.
    Pass them for such a state dict (open_clip's ``head_width`` other than 64: heads = width /
    head_width). For a fastclip file, which records them, a different value is a ValueError.

    ``quick_gelu``: the transformers' MLP activation, which no weight records. None (default):
    QuickGELU, as OpenAI's models (and open_clip's ``-quickgelu`` ones) were trained with, or
    what a fastclip checkpoint's config says. False: the exact GELU of open_clip's other models
    (``ViT-B-32`` with LAION's weights, for one); loaded with the wrong activation they give
    features about 1% off, with no error. ``save_checkpoint`` of the loaded model keeps the
    choice in its config.

    ``text_eos_id`` (a token id, default None): where the text tower pools, which no weight
    records either. None: at the largest token id of each row, OpenAI's rule, right for CLIP's
    BPE tokenizer (``fastclip.tokenize``), whose end-of-text token is its last id. A model
    trained with another tokenizer that pools at its end-of-sequence token (open_clip's
    ``-worldwide`` models: ``pool_type="eos"``, ``eos_id`` 2, or 1 for those on mT5's
    tokenizer) needs that id here; fed that tokenizer's ids, it then gives open_clip's text
    features. A state dict whose vocabulary is not CLIP's (49408 ids) loaded without
    ``text_eos_id`` gets a warning saying so.

    The MLP widths are read from the weights (``c_fc``): open_clip's ViT-g, -bigG and -e image
    towers, whose MLPs are not 4 x their width, load as they are.

    Raises ValueError naming the path for unreadable, truncated or non-CLIP files.
    """
    if quick_gelu is not None and not isinstance(quick_gelu, bool):
        raise TypeError(f"quick_gelu must be None, True or False, got {quick_gelu!r}")
    given = {k: v for k, v in (("quick_gelu", quick_gelu), ("vision_heads", vision_heads),
                               ("text_heads", text_heads), ("text_eos_id", text_eos_id)) if v is not None}
    for name in ("vision_heads", "text_heads", "text_eos_id"):
        v = given.get(name)
        low = 0 if name == "text_eos_id" else 1
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low):
            raise TypeError(f"{name} must be None or a {'non-negative' if low == 0 else 'positive'} int, "
                            f"got {type(v).__name__} {v!r}")
        if v is not None:
            given[name] = int(v)
    if isinstance(path_or_state_dict, Mapping):
        # The caller keeps its tensors: the model gets copies (assign=True below would otherwise
        # make the caller's tensors the model's parameters, and training would change them).
        sd, source = _unwrap(path_or_state_dict), "state dict"
        sd = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}
    else:
        source = os.fspath(path_or_state_dict)
        why = checkpoint_file_problem(source)
        if why:        # first: is_safetensors_file opens the file (a FIFO would block there)
            raise ValueError(f"{source}: {why}")
        safetensors = source.endswith(".safetensors") or is_safetensors_file(source)
        if safetensors and _metadata(source).get("format") == TRAINING_FORMAT:
            raise ValueError(_training_checkpoint(source))
        if safetensors and _fastclip_config(source) is not None:
            # fastclip's own checkpoint: its stored config, not one inferred by OpenAI's rules
            # (heads = width / 64 would be a guess for a model built with other head counts).
            model = load_checkpoint(source, device)
            check_recorded_architecture(model.config, given, source)
            return model if dtype is None else model.to(dtype)
        sd = _read(source, allow_torchscript_code)
    not_str = [k for k in sd if not isinstance(k, str)]
    if not_str:
        raise ValueError(f"{source}: not a state dict: its keys must be parameter names (str), got "
                         f"{[type(k).__name__ for k in not_str[:3]]} keys such as {not_str[:3]!r}")
    sd = strip_wrapper_prefixes(sd)
    # drop the scalar metadata and any serialised causal masks (not weights)
    sd = {k: v for k, v in sd.items() if k not in _EXTRA_KEYS and not k.endswith("attn_mask")}
    sd = dense_weights(sd, source)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{source}: entries that are not tensors: {bad[:5]}")
    config = infer_config(sd, source)
    for name, width in (("vision_heads", config.vision_width * 32 if config.is_resnet else config.vision_width),
                        ("text_heads", config.text_width)):
        if name in given and width % given[name]:
            raise ValueError(f"{source}: {name}={given[name]} does not divide the tower's attention width "
                             f"{width} (heads = width / head width)")
    if given:
        config = dataclasses.replace(config, **given)     # (validated again: text_eos_id < vocab_size)
    from ..tokenizer import VOCAB_SIZE
    if config.vocab_size != VOCAB_SIZE and config.text_eos_id is None:
        warnings.warn(f"{source}: a vocabulary of {config.vocab_size} ids, not CLIP's BPE ({VOCAB_SIZE}): "
                      f"the text tower pools at the largest token id of each row (OpenAI's end-of-text "
                      f"rule); a model that pools at its tokenizer's end-of-sequence id (open_clip's "
                      f"-worldwide models: 2, or 1 on mT5's tokenizer) needs load_openai(..., "
                      f"text_eos_id=<that id>)", stacklevel=2)
    with torch.device("meta"):
        model = CLIP(config)
    expected = model.state_dict()
    for k in expected:      # BatchNorm's step counters: absent from older saves, as torch allows
        if k.endswith(".num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=torch.long)
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shape = [f"{k}: {tuple(sd[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in sd and sd[k].shape != v.shape]
    kind = [f"{k}: {sd[k].dtype} for a {v.dtype} parameter" for k, v in expected.items()
            if k in sd and sd[k].is_floating_point() != v.is_floating_point()]
    if missing or unexpected or shape or kind:
        raise ValueError(f"{source}: state dict does not match the inferred {config} "
                         f"(missing {missing[:10]}, unexpected {unexpected[:10]}, wrong shapes {shape[:10]}"
                         + (f", wrong dtypes {kind[:10]}" if kind else "") + ")")
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device).eval()


def _training_checkpoint(path: str) -> str:
    return (f"{path}: a fastclip training checkpoint (model, optimizer and run state), not a model file: "
            f"load its model with fastclip.eval.evaluate.load_model({path!r}), or use the run's "
            f"model.safetensors")


# What no weight records, and so what a caller may set when loading a state dict.
ARCHITECTURE_CHOICES = ("quick_gelu", "vision_heads", "text_heads", "text_eos_id")


def architecture_problem(choices: Mapping[str, object]) -> Optional[str]:
    """What is wrong with ``choices`` as ``ARCHITECTURE_CHOICES`` for a pretrained file (keys
    outside them, values of the wrong kind), or None."""
    extra = sorted(set(choices) - set(ARCHITECTURE_CHOICES))
    if extra:
        return (f"only what no weight records may be set ({', '.join(ARCHITECTURE_CHOICES)}): the file "
                f"gives the rest, not {', '.join(map(str, extra))}")
    for k, v in choices.items():
        low = 0 if k == "text_eos_id" else 1
        ok = isinstance(v, bool) if k == "quick_gelu" else (
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low)
        if not ok:
            want = "true or false" if k == "quick_gelu" else ("a non-negative int" if low == 0 else "a positive int")
            return f"{k} must be {want}, got {v!r}"
    return None


def check_recorded_architecture(config: CLIPConfig, given: Mapping[str, object], source: str) -> None:
    """ValueError naming ``source`` when ``given`` (``ARCHITECTURE_CHOICES`` set by the caller)
    contradicts the config a fastclip file records (it would otherwise be ignored)."""
    recorded = {"quick_gelu": config.quick_gelu, "vision_heads": config.vision_num_heads,
                "text_heads": config.text_num_heads, "text_eos_id": config.text_eos_id}
    wrong = [f"{k}={v!r} (the file's: {recorded[k]!r})" for k, v in given.items() if v != recorded[k]]
    if wrong:
        raise ValueError(f"{source}: a fastclip model file records its architecture, which "
                         f"{', '.join(wrong)} contradicts: drop the argument")


def save_checkpoint(model: CLIP, path: Union[str, os.PathLike], metadata: Optional[Dict[str, str]] = None) -> None:
    """Write ``model.state_dict()`` to ``path`` as safetensors, with ``model.config`` as JSON in
    the metadata key ``fastclip_config`` (plus any extra str->str ``metadata``, which may not
    set the file's own keys ``fastclip_config`` and ``format``).

    The file is written atomically (a temporary file in the same folder, renamed into place)
    with the mode a plain ``open(path, "w")`` would give it (``0o666 & ~umask`` for a new file,
    an existing file's own mode; a file the user may not write raises ``PermissionError``, a
    folder ``IsADirectoryError``); missing parent folders are created."""
    # A compiled or DDP-wrapped model saves the model inside: the wrapper's keys carry its
    # prefix ("_orig_mod.", "module."), which no CLIP config describes.
    model = unwrap_model(model)
    if not isinstance(getattr(model, "config", None), CLIPConfig):
        raise ValueError("model must be a fastclip CLIP with a CLIPConfig in .config")
    from .._fileio import atomic_write, save_safetensors
    meta = {"format": "pt", "fastclip_config": json.dumps(model.config.to_dict())}
    extra = dict(metadata or {})
    # The file's own keys: a caller's "fastclip_config" or "format" replaced them and wrote a
    # file that load_checkpoint could not read back.
    taken = sorted(k for k in extra if k in meta)
    if taken:
        raise ValueError(f"metadata may not set {', '.join(map(repr, taken))}: save_checkpoint writes "
                         f"{'that key' if len(taken) == 1 else 'those keys'} itself")
    bad = [k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise TypeError(f"metadata must map str to str, got {bad[0]!r}: {extra[bad[0]]!r}")
    meta.update(extra)
    meta_dev = [k for k, v in model.state_dict().items() if v.is_meta]
    if meta_dev:
        raise ValueError(f"model holds tensors on the meta device, which have no data ({meta_dev[0]}"
                         f"{f' and {len(meta_dev) - 1} more' if len(meta_dev) > 1 else ''}): "
                         f"materialise it (to_empty and init_weights, or load weights) first")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(os.fspath(path), lambda tmp: save_safetensors(tensors, tmp, meta), suffix=".safetensors")


def _metadata(path: str) -> Dict[str, str]:
    """The metadata of a safetensors file ({} when it has none or cannot be read)."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return f.metadata() or {}
    except Exception:  # noqa: BLE001 - unreadable: load_openai's own reader says why
        return {}


def _fastclip_config(path: str) -> Optional[str]:
    """The ``fastclip_config`` metadata of a safetensors file, or None (none, or unreadable)."""
    return _metadata(path).get("fastclip_config")


def _check_depths(config: CLIPConfig, sd: Mapping[str, torch.Tensor]) -> None:
    """The config's layer counts against the blocks the file holds, before the model is built:
    building takes time linear in the layers (a config edited to 10^7 layers would take hours
    before the weights could be found not to fit)."""
    depths = [("text_layers", config.text_layers, _count(sd, "transformer.resblocks"))]
    if isinstance(config.vision_layers, int):
        depths.append(("vision_layers", config.vision_layers, _count(sd, "visual.transformer.resblocks")))
    else:
        depths.append(("vision_layers", tuple(config.vision_layers),
                       tuple(_count(sd, f"visual.layer{i}") for i in (1, 2, 3, 4))))
    for name, said, held in depths:
        if said != held:
            raise ValueError(f"{name} is {said} but the file holds {held} such blocks")


def load_checkpoint(path: Union[str, os.PathLike], device="cpu") -> CLIP:
    """Rebuild a ``CLIP`` written by ``save_checkpoint`` (config from the metadata, strict load).

    Raises ValueError naming ``path`` for a missing, truncated or corrupt file, corrupt config
    metadata, or weights that do not match the config."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = os.fspath(path)
    why = checkpoint_file_problem(path)
    if why:
        if os.path.isdir(path):
            why += (" (a fastclip train run folder's model is its model.safetensors; "
                    "fastclip.eval.evaluate.load_model reads run folders)")
        raise ValueError(f"{path}: {why}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        sd = load_file(path)
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path}: not a readable safetensors checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") == TRAINING_FORMAT:
        # Its keys are the whole training state's: "missing keys ['token_embedding.weight', ...]"
        # said nothing of what the file is.
        raise ValueError(_training_checkpoint(path))
    sd = strip_wrapper_prefixes(sd)     # a compiled model's file from an earlier save_checkpoint
    if "fastclip_config" in meta:
        try:
            d = json.loads(meta["fastclip_config"])
            if not isinstance(d, dict):
                raise TypeError(f"expected a JSON object, got {type(d).__name__}")
            config = CLIPConfig.from_dict(d)
            _check_depths(config, sd)
            with torch.device("meta"):
                model = CLIP(config)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:
            raise ValueError(f"{path}: corrupt 'fastclip_config' metadata ({type(e).__name__}: {e})") from None
    else:
        config = infer_config(sd, path)  # a safetensors file with OpenAI keys but no config
        with torch.device("meta"):
            model = CLIP(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: weights do not match the stored config: {e}") from None
    return model.to(device).eval()
