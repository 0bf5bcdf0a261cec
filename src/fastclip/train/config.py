"""The arguments of ``fastclip train``: ``TrainConfig`` (the CLI flags are its field names with
dashes; ``fastclip.cli`` builds the parser from its defaults)."""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .._machine import MAX_THREADS, backend_problem, device_problem

PRECISIONS = ("fp32", "bf16", "fp16")
# The losses `fastclip train --loss` and `fastclip eval --loss` offer, named here without
# importing torch (`fastclip --help` stays fast); tests/train/test_cli.py checks that they
# are exactly the losses of fastclip.ops.LOSSES that have a module in fastclip.loss.LOSS_MODULES.
LOSSES = ("clip", "siglip")


@dataclass
class TrainConfig:
    """Every knob of ``fastclip train`` (the CLI flags are these names with dashes).

    Defaults are the CPU demo's: the ``demo`` model on the synthetic shapes dataset, a fixed
    amount of work (``steps`` x ``batch_size`` samples, the same on any machine).
    ``batch_size`` is per rank (as open_clip); the global batch is ``batch_size * world_size``.
    ``steps`` wins over ``epochs``; webdataset shards need ``steps`` or ``train_num_samples``.
    ``threads``: torch CPU threads; None on a CPU in one process: the faster of all threads and
    one, timed on the first steps (``fastclip.train.demo.ThreadTuner``; the thread count changes
    floating-point reduction order, never the data or the step count).
    ``time_budget`` (opt-in, off by default): after the first steps the trainer measures its
    speed and, if ``steps`` would not fit in the budget, lowers the step count so the whole cosine
    schedule (warmup, decay to 0) fits, the warmup keeping its share of the run; such a run
    depends on the machine's speed.
    ``warmup``: linear warmup steps before the cosine decay; None: min(2000, steps // 10),
    so that a short run on real data still decays (2000 fixed steps made any run under 2000
    steps all warmup, ending at the peak learning rate).
    ``eval_at_start``: also evaluate before the first step (the curves then start at chance).
    ``loss``: "clip" (softmax, ``ClipLoss``) or "siglip" (sigmoid, ``SigLipLoss``: the model gets
    a learnable ``logit_bias``, and the scale and bias start at the loss's initial values,
    SigLIP's t = 10, b = -10, unless ``model_overrides`` sets ``init_logit_scale``/``init_logit_bias``).
    ``pretrained``: start from the weights of a run folder, model file, training checkpoint or
    OpenAI checkpoint (anything ``fastclip.eval.evaluate.load_model`` reads); the architecture
    is the file's (``model`` unused; ``model_overrides`` may set only what no weight records:
    ``quick_gelu``, ``vision_heads``, ``text_heads``, ``text_eos_id``). For the sigmoid loss a model without
    a ``logit_bias`` gets one at the loss's initial value (-10) and keeps its scale.
    ``output`` holds one run: a folder with a run in it needs ``resume`` (continue it) or
    ``overwrite`` (delete it first), see ``fastclip.train.run_folder``.
    ``max_failed_batches``: a batch in which no sample loads is skipped; this many such batches in
    a row stop the run as unusable data (default: one epoch's worth, or 100 for streamed shards
    of unknown length).
    """

    output: Optional[str] = None
    model: str = "demo"
    pretrained: Optional[str] = None  # start from these weights (fastclip.eval.evaluate.load_model reads it)
    model_overrides: Dict[str, Any] = field(default_factory=dict)
    train_data: Optional[str] = None  # None: the synthetic shapes demo
    dataset_type: str = "auto"  # auto | shapes | csv | webdataset
    csv_img_key: str = "filepath"
    csv_caption_key: str = "title"
    csv_separator: str = ","
    train_num_samples: Optional[int] = None
    val_data: Optional[str] = None
    val_num_samples: Optional[int] = None
    zeroshot_data: Optional[str] = None
    zeroshot_classes: Optional[str] = None
    zeroshot_templates: str = "imagenet"
    demo_train_samples: int = 1_000_000
    demo_eval_samples: int = 480
    demo_design: str = "distinct"  # distinct | iid | colour-groups: see fastclip.datasets.shapes
    demo_group_size: int = 16  # the colour groups of demo_design="colour-groups"
    demo_group_prob: float = 1.0
    batch_size: int = 88  # the demo: one block of distinct captions per batch
    steps: Optional[int] = 1500
    epochs: int = 1
    # 1e-3 rather than 2e-3 (2-core Intel Xeon, 1 thread, seeds 0-9): at 2e-3 held-out colour,
    # near 100% by step 300, sank to 87.3% for seed 3 while shape was learned (its yellow
    # triangles read as orange) and seed 9 ended at 57.9% shape; at 1e-3 every seed ends at
    # >= 98.3% colour and 74.4-91.9% shape (docs/demo.md, "How the demo learns both attributes").
    lr: float = 1e-3
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup: Optional[int] = 30     # None: min(2000, a tenth of the run), real data's default
    grad_clip_norm: Optional[float] = None
    precision: str = "fp32"
    grad_checkpointing: bool = False
    compile: bool = False
    accum_micro_batch: Optional[int] = None
    loss: str = "clip"  # clip | siglip (fastclip.ops.losses)
    loss_backend: str = "auto"
    dist_impl: str = "gather"
    device: str = "auto"
    workers: int = 0
    threads: Optional[int] = None
    seed: int = 0
    log_every: Optional[int] = None
    eval_every: Optional[int] = None
    eval_at_start: bool = False
    save_every: Optional[int] = None
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    overwrite: bool = False
    max_failed_batches: Optional[int] = None
    plot: bool = True
    progress: str = "auto"  # auto | bar | lines | none
    time_budget: Optional[float] = None  # opt-in: seconds of training; fewer steps (same schedule shape) if slower


# What each field of TrainConfig may hold (the CLI's flag types, for a config built in Python):
# an int in [lo, 2**63), or a finite float in an interval, or one of some strings.
_INTS = {"batch_size": 1, "epochs": 1, "demo_train_samples": 1, "demo_eval_samples": 1, "demo_group_size": 1,
         "workers": 0, "keep_checkpoints": 0, "seed": 0}
# 0 where the trainer reads it as unset (``cfg.save_every or ...``): code that passes 0 for "off".
_OPTIONAL_INTS = {"steps": 1, "accum_micro_batch": 1, "warmup": 0, "threads": 1, "train_num_samples": 0,
                  "val_num_samples": 0, "log_every": 0, "eval_every": 0, "save_every": 0, "max_failed_batches": 0}
# Upper ends other than 2**63 - 1.
_INT_TOP = {"threads": MAX_THREADS}
# open_clip's SigLipLoss dist_impl names (fastclip.loss maps them to gather or ring).
_SIGLIP_DIST_IMPLS = (None, "bidir", "shift", "reduce")
# (lo, hi, lo open, hi open)
_FLOATS = {"lr": (0.0, math.inf, False, False), "weight_decay": (0.0, math.inf, False, False),
           "beta1": (0.0, 1.0, False, True), "beta2": (0.0, 1.0, False, True), "eps": (0.0, math.inf, True, False),
           "demo_group_prob": (0.0, 1.0, False, False)}
_OPTIONAL_FLOATS = {"grad_clip_norm": (0.0, math.inf, True, False), "time_budget": (0.0, math.inf, False, False)}
_CHOICES = {"dataset_type": ("auto", "shapes", "csv", "webdataset"),
            "zeroshot_templates": ("imagenet", "cifar", "simple"),
            "demo_design": ("distinct", "iid", "colour-groups"), "precision": PRECISIONS, "loss": LOSSES,
            "dist_impl": ("gather", "ring"), "progress": ("auto", "bar", "lines", "none")}
_STRINGS = ("model", "csv_img_key", "csv_caption_key", "loss_backend", "device")
_OPTIONAL_STRINGS = ("output", "pretrained", "train_data", "val_data", "zeroshot_data", "zeroshot_classes", "resume")
_BOOLS = ("grad_checkpointing", "compile", "eval_at_start", "overwrite", "plot")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def plain_fields(cfg: "TrainConfig") -> None:
    """In place: the path fields of ``cfg`` given as ``os.PathLike`` (``pathlib.Path``) as str (the
    trainer reads them as strings: "::" lists of shards, extensions), and NumPy numbers in its
    number and bool fields as Python's (``np.int64`` steps passed the checks and then failed
    writing config.json, half-written, which then blocked the folder)."""
    for name in _OPTIONAL_STRINGS:
        if isinstance(getattr(cfg, name), os.PathLike):
            setattr(cfg, name, os.fspath(getattr(cfg, name)))
    for name in (*_INTS, *_OPTIONAL_INTS):
        v = getattr(cfg, name)
        if _is_int(v) and type(v) is not int:
            setattr(cfg, name, int(v))
    for name in (*_FLOATS, *_OPTIONAL_FLOATS):
        v = getattr(cfg, name)
        if isinstance(v, numbers.Real) and not isinstance(v, bool) and type(v) not in (int, float):
            setattr(cfg, name, float(v))
    for name in _BOOLS:
        v = getattr(cfg, name)
        if type(v).__name__ == "bool_":          # numpy.bool_, without importing NumPy here
            setattr(cfg, name, bool(v))


def validate_config(cfg: "TrainConfig") -> None:
    """Raise TypeError (a value of the wrong type) or ValueError (out of range, or not one of the
    choices) naming the field of ``cfg`` whose flag type ``fastclip train`` would refuse, before
    any work: a config built in Python skipped those checks (a negative ``grad_clip_norm``
    trained the model backwards, a negative ``steps`` wrote an untrained model, ``steps="4"``
    failed deep in the trainer), and ``device`` and ``loss_backend`` as ``--device`` and
    ``--loss-backend`` are (available on this machine). The command line's checks across fields
    (``--dataset-type`` against the data, options for data the run does not read) stay its own;
    the trainer checks the batch against the model (BatchNorm) once it is built."""
    def bad(name: str, want: str, kind=ValueError) -> None:
        v = getattr(cfg, name)
        raise kind(f"TrainConfig.{name} must be {want}, got {v!r} ({type(v).__name__})")

    for name, lo in (*_INTS.items(), *_OPTIONAL_INTS.items()):
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL_INTS:
            continue
        hi = _INT_TOP.get(name, 2 ** 63 - 1)
        want = (f"an int in [{lo}, {'2**63)' if hi == 2 ** 63 - 1 else f'{hi}]'}"
                + (" or None" if name in _OPTIONAL_INTS else ""))
        if not _is_int(v):
            bad(name, want, TypeError)
        if not lo <= v <= hi:
            bad(name, want)
    for name, (lo, hi, lo_open, hi_open) in (*_FLOATS.items(), *_OPTIONAL_FLOATS.items()):
        v = getattr(cfg, name)
        if v is None and name in _OPTIONAL_FLOATS:
            continue
        right = ")" if hi_open or hi == math.inf else "]"
        span = f"{'(' if lo_open else '['}{lo:g}, {'inf' if hi == math.inf else f'{hi:g}'}{right}"
        want = f"a finite number in {span}" + (" or None" if name in _OPTIONAL_FLOATS else "")
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            bad(name, want, TypeError)
        if not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)):
            bad(name, want)
    for name, choices in _CHOICES.items():
        if name == "dist_impl" and cfg.loss == "siglip":
            choices = choices + _SIGLIP_DIST_IMPLS      # SigLipLoss takes open_clip's names too
        if getattr(cfg, name) not in choices:
            bad(name, f"one of {', '.join(map(repr, choices))}")
    for name in _STRINGS:
        if not isinstance(getattr(cfg, name), str):
            bad(name, "a str", TypeError)
    for name in _OPTIONAL_STRINGS:
        if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), (str, os.PathLike)):
            bad(name, "a str (a path) or None", TypeError)
    for name in _BOOLS:
        if not isinstance(getattr(cfg, name), bool):
            bad(name, "a bool", TypeError)
    if not isinstance(cfg.csv_separator, str):
        bad("csv_separator", "one character", TypeError)
    if len(cfg.csv_separator) != 1:
        bad("csv_separator", "one character")
    if not isinstance(cfg.model_overrides, dict):
        bad("model_overrides", "a dict (of create_model arguments)", TypeError)
    if cfg.pretrained is not None:
        from ..models.openai import architecture_problem
        why = architecture_problem(cfg.model_overrides)
        if why:
            raise ValueError(f"TrainConfig.model_overrides {cfg.model_overrides!r} with pretrained: {why}")
    if cfg.output is not None and os.path.exists(cfg.output) and not os.path.isdir(cfg.output):
        raise ValueError(f"TrainConfig.output {cfg.output!r} exists and is not a directory")
    # What this machine runs, as --device and --loss-backend are checked: an unavailable backend
    # failed at the first step (after the run folder was prepared, an old run deleted with
    # overwrite), a device 'tpu' with torch's own words from the distributed set-up.
    for name, why in (("device", device_problem(cfg.device)), ("loss_backend", backend_problem(cfg.loss_backend))):
        if why:
            raise ValueError(f"TrainConfig.{name} {why}")


def model_kwargs(loss: str, model_overrides: Dict[str, Any]) -> Dict[str, Any]:
    """The ``create_model`` keyword arguments of a run: what ``loss`` needs of the model (its
    initial scale, ``LossSpec.init``, and for a loss with a bias a learnable ``logit_bias``
    with its initial value), then ``model_overrides`` on top."""
    from ..ops.losses import get_loss
    spec = get_loss(loss)
    out: Dict[str, Any] = {"init_logit_scale": spec.init[0]}
    if "logit_bias" in spec.params:
        out["init_logit_bias"] = spec.init[spec.params.index("logit_bias")]
    out.update(model_overrides)
    return out
