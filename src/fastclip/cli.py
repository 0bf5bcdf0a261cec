"""The ``fastclip`` command line: ``fastclip train …``, ``fastclip eval …`` (fastclip/eval/command.py)
and ``fastclip bench …``.

``fastclip train`` with no arguments trains the small ``demo`` CLIP on the synthetic shapes
dataset on the CPU (a fixed 1500 steps, about 1.5-2 minutes on 2 cores) and prints zero-shot
accuracy on (colour, shape) pairs it never saw. Bad arguments exit with status 2 and a message naming the flag.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import signal
import sys
import threading
from typing import Iterator, List, Optional

from ._machine import MAX_THREADS, backend_problem, device_problem
from .train.config import LOSSES, PRECISIONS, TrainConfig

# --zeroshot-classes of `fastclip train` and `fastclip eval` (datasets/folder.py matches them)
ZEROSHOT_CLASSES_HELP = ("class names: comma-separated or a file with one per line, one per class folder in "
                         "sorted order (Python's: capitals first); the folders' own names in any order are "
                         "matched by name (default: folder names)")

_DEFAULTS = TrainConfig()
# The demo evaluates before the first step and every DEMO_EVAL_EVERY steps (11 points on its
# curves, ~0.25 s each on 2 cores).
DEMO_EVAL_EVERY = 150
REAL_DATA_BATCH = 128


def _int_in(lo: int, hi: Optional[int] = None, what: str = ""):
    """An argparse type: an integer in [lo, hi) (no upper end when ``hi`` is None);
    ``what`` names the expectation in the error."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            v = None
        if v is None or v < lo or (hi is not None and v >= hi):
            raise argparse.ArgumentTypeError(f"expected {what}, got {s!r}")
        return v
    return parse


# Below 2**63 (sys.maxsize): slicing and itertools.islice take no more; a batch size of 10**20
# failed deep inside the run with islice's own message.
_positive_int = _int_in(1, 2 ** 63, what="a positive integer below 2**63")
_nonneg_int = _int_in(0, 2 ** 63, what="a non-negative integer below 2**63")
_seed = _int_in(0, 2 ** 63, what="an integer in [0, 2**63)")      # torch.manual_seed's range, >= 0
_threads = _int_in(1, MAX_THREADS + 1, what=f"a thread count in [1, {MAX_THREADS}]")

_ESCAPES = {"\\t": "\t", "\\n": "\n", "\\r": "\r", "\\\\": "\\", "tab": "\t"}


def _separator(s: str) -> str:
    """--csv-separator: one character; '\\t' (a backslash and a t, as open_clip users type it)
    means a tab."""
    v = _ESCAPES.get(s, s)
    if len(v) != 1:
        raise argparse.ArgumentTypeError(f"expected one character (or \\t for a tab), got {s!r}")
    return v


def _float_in(lo: float, hi: float = float("inf"), lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite float in the interval [lo, hi] (``*_open``: that end excluded)."""
    left, right = "(" if lo_open else "[", ")" if hi_open or hi == float("inf") else "]"
    span = f"{left}{lo:g}, {'inf' if hi == float('inf') else f'{hi:g}'}{right}"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected a finite number in {span}, got {s!r}")
        return v
    return parse


def _json_dict(s: str) -> dict:
    try:
        d = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r} ({e})") from None
    if not isinstance(d, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {s!r}")
    return d


def _add_train_args(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    g = p.add_argument_group("data")
    g.add_argument("--train-data", default=None,
                   help="CSV/TSV file, or webdataset .tar shards (brace ranges, globs, '::'-joined). "
                        "Default: the synthetic shapes demo")
    g.add_argument("--dataset-type", choices=["auto", "shapes", "csv", "webdataset"], default=d.dataset_type)
    g.add_argument("--csv-img-key", default=d.csv_img_key)
    g.add_argument("--csv-caption-key", default=d.csv_caption_key)
    g.add_argument("--csv-separator", type=_separator, default=d.csv_separator,
                   help="one character; escapes as typed in a shell are read: '\\t' is a tab")
    g.add_argument("--train-num-samples", type=_positive_int, default=None,
                   help="samples per epoch for webdataset shards (at least one global batch)")
    g.add_argument("--val-data", default=None, help="CSV or shards: val loss + retrieval recall")
    g.add_argument("--val-num-samples", type=_positive_int, default=None, help="cap on validation samples (10k)")
    g.add_argument("--zeroshot-data", default=None, help="folder of class-named image folders")
    g.add_argument("--zeroshot-classes", default=None,
                   help=ZEROSHOT_CLASSES_HELP)
    g.add_argument("--zeroshot-templates", choices=["imagenet", "cifar", "simple"], default=d.zeroshot_templates)
    g.add_argument("--workers", type=_nonneg_int, default=d.workers, help="DataLoader worker processes")
    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", default=None,
                   help=f"model config name (see fastclip.models.list_models(); default {d.model})")
    g.add_argument("--model-overrides", type=_json_dict, default=None,
                   help='JSON config overrides, e.g. \'{"text_layers": 2}\'; with --pretrained only what '
                        'no weight records: quick_gelu, vision_heads, text_heads, text_eos_id (an open_clip model with '
                        'exact GELU: \'{"quick_gelu": false}\')')
    g.add_argument("--pretrained", default=None, metavar="PATH",
                   help="start from these weights: a fastclip train output folder, model file or training "
                        "checkpoint, or an OpenAI checkpoint (the architecture is the file's: no --model); "
                        "--loss siglip adds a logit_bias (-10) to a model without one")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help=f"per rank (demo {d.batch_size}: one block of distinct captions; real data {REAL_DATA_BATCH})")
    g.add_argument("--steps", type=_positive_int, default=None,
                   help=f"optimizer steps (demo default {d.steps}; real data default: --epochs)")
    g.add_argument("--epochs", type=_positive_int, default=d.epochs,
                   help="passes over --train-data, each of rows // global batch full batches (a new "
                        "shuffle each epoch; the remainder rows are left out of that epoch)")
    g.add_argument("--lr", type=_float_in(0.0), default=None, help=f"peak learning rate (demo {d.lr}, real data 5e-4)")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=_float_in(0.0), default=None,
                   help=f"AdamW decoupled weight decay (demo {d.weight_decay}, real data 0.2)")
    g.add_argument("--beta1", type=_float_in(0.0, 1.0, hi_open=True), default=d.beta1)
    g.add_argument("--beta2", type=_float_in(0.0, 1.0, hi_open=True), default=d.beta2)
    g.add_argument("--eps", type=_float_in(0.0, lo_open=True), default=d.eps)
    g.add_argument("--warmup", type=_nonneg_int, default=None,
                   help=f"warmup steps (demo {d.warmup}; real data min(2000, a tenth of the steps))")
    g.add_argument("--grad-clip-norm", type=_float_in(0.0, lo_open=True), default=None)
    g.add_argument("--precision", choices=PRECISIONS, default=d.precision)
    g.add_argument("--grad-checkpointing", action="store_true")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--accum-micro-batch", type=_positive_int, default=None, metavar="K",
                   help="encode the batch K samples at a time (exact full-batch gradient, memory of K)")
    g.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="contrastive loss: clip (softmax, ClipLoss) or siglip (sigmoid with a learnable "
                        "bias, SigLipLoss; scale and bias start at 10 and -10)")
    g.add_argument("--loss-backend", default=d.loss_backend, help="fastclip kernel backend (auto)")
    g.add_argument("--dist-impl", choices=["gather", "ring"], default=d.dist_impl)
    g = p.add_argument_group("run")
    g.add_argument("--output", default=None, help="output directory (default runs/<timestamp>)")
    g.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    g.add_argument("--threads", type=_threads, default=None,
                   help="torch CPU threads (default on a CPU: the faster of all and one, timed on steps 2-9)")
    g.add_argument("--seed", type=_seed, default=d.seed)
    g.add_argument("--log-every", type=_positive_int, default=None)
    g.add_argument("--eval-every", type=_positive_int, default=None,
                   help=f"evaluate every K steps (demo {DEMO_EVAL_EVERY}, and before the first; real data: every "
                        f"total/4 steps, and at the end)")
    g.add_argument("--save-every", type=_positive_int, default=None, help="training checkpoint every K steps")
    g.add_argument("--keep-checkpoints", type=_nonneg_int, default=d.keep_checkpoints,
                   help=f"keep the newest K training checkpoints, deleting older ones (default "
                        f"{d.keep_checkpoints}; 0 keeps all)")
    g.add_argument("--resume", default=None, help="'latest' (in --output) or a checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="--output holds a run: delete its files and start afresh (without it, a folder "
                        "holding a run is refused unless --resume continues it)")
    g.add_argument("--max-failed-batches", type=_positive_int, default=None, metavar="N",
                   help="batches with no loadable sample are skipped; N in a row stop the run "
                        "(default: one epoch, 100 for shards of unknown length)")
    g.add_argument("--demo-train-samples", type=_positive_int, default=d.demo_train_samples)
    g.add_argument("--demo-eval-samples", type=_positive_int, default=d.demo_eval_samples)
    g.add_argument("--demo-design", choices=["distinct", "iid", "colour-groups"], default=d.demo_design,
                   help="demo batches: each training (colour, shape) pair once per batch of 88 (distinct), "
                        "pairs drawn at random (iid), or the earlier colour groups with partial captions")
    g.add_argument("--demo-group-size", type=_positive_int, default=d.demo_group_size,
                   help="colour-groups design: images per colour group")
    g.add_argument("--demo-group-prob", type=float, default=d.demo_group_prob,
                   help="colour-groups design: probability that a group is one colour")
    g.add_argument("--time-budget", type=_float_in(0.0), default=None, metavar="SECONDS",
                   help="opt-in: fit training in this many seconds by lowering --steps if the machine is "
                        "too slow (the result then depends on the machine's speed; default and 0: off)")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip curves.png")
    g.add_argument("--progress", choices=["auto", "bar", "lines", "none"], default=d.progress)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclip", description="fastclip: fused CLIP contrastive loss, "
                                "with a thin CLIP trainer and microbenchmarks.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"fastclip {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{train,eval,bench}")
    t = sub.add_parser("train", help="train a CLIP model (no arguments: the CPU shapes demo)",
                       description="Train CLIP with fastclip's fused loss. With no arguments: the 'demo' model "
                                   "on the synthetic shapes dataset on the CPU, then zero-shot accuracy on "
                                   "held-out (colour, shape) pairs. Multi-GPU: launch with torchrun.")
    _add_train_args(t)
    sub.add_parser("eval", help="evaluate a model: zero-shot, val loss and retrieval, linear probe "
                                "(fastclip eval --help)", add_help=False)
    sub.add_parser("bench", help="benchmarks: [loss] (default), distributed, tokenizer (fastclip bench --help)",
                   add_help=False)
    return p


def csv_file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a CSV file, or None."""
    if os.path.isdir(path):
        return "a folder, not a CSV file"
    if os.path.exists(path) and not os.path.isfile(path):
        return "not a regular file (a device, pipe or socket), not a CSV file"
    if not os.path.lexists(path) and "::" in path:
        return ("'::' joins lists of tar shards, and a CSV is one file: a CSV cannot be mixed with shards "
                "or other CSVs (train on one file, or on shards)")
    return None if os.path.isfile(path) else "file not found"


def shards_problem(spec: str) -> Optional[str]:
    """Why the webdataset ``spec`` names no readable shard list, or None."""
    from .datasets.webdataset import expand_urls
    urls = expand_urls(spec)
    if not urls:
        return "no tar shard matches"
    folders = [u for u in urls if os.path.isdir(u)]
    if folders:
        return (f"{folders[0]!r} is a folder: name its shards, e.g. "
                f"'{os.path.join(folders[0], '{00000..00099}.tar')}' or '{os.path.join(folders[0], '*.tar')}'")
    # The first shards' headers: a file that is no tar (a CSV given with --dataset-type
    # webdataset) otherwise streamed 100 empty batches before an error about the members' order.
    # Only when none of them is a tar: one bad shard among good ones is skipped as it is read
    # (a data fault, never fatal; named at start), wherever it stands in the list.
    from .datasets.webdataset import bad_shards
    bad = bad_shards(urls)
    if bad and len(bad) == len(urls[:16]):
        u, why = bad[0]
        more = f" (and the {len(bad) - 1} other shard(s) checked)" if len(bad) > 1 else ""
        return f"shard {u!r}: {why}{more}"
    return None


def classes_problem(value: str) -> Optional[str]:
    """Why ``--zeroshot-classes`` looks like a file that is not there (a path, not a
    comma-separated list of names), or None."""
    if os.path.isdir(value):      # not a file: it would be read as one class name, the folder's
        return "a folder; expected a file with one class name per line, or a comma-separated list of names"
    if os.path.exists(value) and not os.path.isfile(value):   # a FIFO: read, it would block
        return "not a regular file (a device, pipe or socket); expected a file with one class name per line"
    # A path (a separator, or a file's extension: "classes.txt" is no class name).
    looks_like_file = os.sep in value or value.lower().endswith((".txt", ".csv", ".tsv", ".json", ".lst"))
    if looks_like_file and "," not in value and not os.path.isfile(value):
        return "no such file (class names: a file with one per line, or a comma-separated list)"
    return None


def given_dests(p: argparse.ArgumentParser, argv: List[str]) -> set:
    """The ``dest`` of every option typed in ``argv`` (abbreviated or ``--flag=value`` forms
    included), told apart from the ones left at their defaults: ``argv`` parsed once more with
    every default suppressed. ``p`` is left as it was."""
    saved = [(a, a.default) for a in p._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        ns, _ = p.parse_known_args(argv)
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(ns))


# Options that only one kind of training data reads: typed with another, they would be ignored.
_DEMO_ONLY = ("demo_train_samples", "demo_eval_samples", "demo_design", "demo_group_size", "demo_group_prob")
_CSV_ONLY = ("csv_img_key", "csv_caption_key", "csv_separator")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_flags_apply(p: argparse.ArgumentParser, args: argparse.Namespace, given: set, train_kind: str,
                       val_kind: Optional[str]) -> None:
    """Refuse options typed for data the run does not read (``--demo-design`` with
    ``--train-data``, ``--train-num-samples`` with a CSV file, ...) rather than ignore them."""
    if train_kind != "shapes":
        typed = [_flag(d) for d in _DEMO_ONLY if d in given]
        if typed:
            p.error(f"{typed[0]} sets up the built-in shapes demo, which --train-data {args.train_data!r} "
                    f"replaces: drop {' and '.join(typed)}")
    elif args.demo_design != "colour-groups":
        typed = [_flag(d) for d in ("demo_group_size", "demo_group_prob") if d in given]
        if typed:
            p.error(f"{typed[0]} shapes the colour groups of --demo-design colour-groups, not of "
                    f"--demo-design {args.demo_design}: pass --demo-design colour-groups, or drop "
                    f"{' and '.join(typed)}")
    if "train_num_samples" in given and train_kind != "webdataset":
        where = ("the demo's samples are --demo-train-samples" if train_kind == "shapes"
                 else "a CSV file's samples are its rows; --steps or --epochs set the length of the run")
        p.error(f"--train-num-samples tells the length of webdataset shards (which the files do not say): "
                f"{where}")
    for dest, needs, what in (("zeroshot_templates", "zeroshot_data", "makes the prompts of --zeroshot-data's classes"),
                              ("val_num_samples", "val_data", "caps the samples of --val-data"),
                              ("keep_checkpoints", "save_every", "prunes the training checkpoints that "
                                                                 "--save-every writes")):
        if dest in given and getattr(args, needs) is None:
            p.error(f"{_flag(dest)} {what}: pass that too, or drop {_flag(dest)}")
    if "epochs" in given and "steps" in given:
        p.error("--steps and --epochs both set the length of the run (--steps would win): pass one")
    if "epochs" in given and train_kind == "shapes":
        p.error("--epochs counts passes over --train-data; the demo's length is --steps (its "
                "samples: --demo-train-samples): drop --epochs")
    if ("eval_every" in given and train_kind != "shapes" and args.val_data is None
            and args.zeroshot_data is None):
        p.error("--eval-every sets how often the run evaluates, and it has nothing to evaluate: "
                "pass --val-data or --zeroshot-data, or drop --eval-every")
    if "csv" not in (train_kind, val_kind):
        typed = [_flag(d) for d in _CSV_ONLY if d in given]
        if typed:
            p.error(f"{typed[0]} reads CSV files, and neither --train-data nor --val-data is one: drop "
                    f"{' and '.join(typed)}")


def _check_paths(p: argparse.ArgumentParser, args: argparse.Namespace, given: Optional[set] = None) -> None:
    """Check the ``train`` arguments before anything is built; ``given`` (``given_dests``): the
    options typed, to refuse those the run would ignore (unchecked when None)."""
    from .train.data import detect_dataset_type, detect_val_type
    kinds = {}
    if args.dataset_type == "shapes" and args.train_data is not None:
        p.error(f"--dataset-type shapes trains on the built-in synthetic shapes: drop --train-data "
                f"{args.train_data!r}, or pass --dataset-type auto|csv|webdataset")
    for flag, value in (("--train-data", args.train_data), ("--val-data", args.val_data)):
        if value is None:
            continue
        try:
            kind = (detect_val_type(value, args.dataset_type) if flag == "--val-data" else
                    detect_dataset_type(value, args.dataset_type if args.dataset_type != "shapes" else "auto",
                                        flag))
        except ValueError as e:
            p.error(str(e))
        kinds[flag] = kind
        why = (csv_file_problem(value) if kind == "csv" else
               shards_problem(value) if kind == "webdataset" else None)
        if not why and flag == "--val-data" and kind == "webdataset":
            from .datasets.webdataset import expand_urls
            pipe = next((u for u in expand_urls(value) if os.path.exists(u) and not os.path.isfile(u)
                         and not os.path.isdir(u)), None)
            if pipe is not None:    # (training shards may be pipes: they are read once per pass)
                why = (f"shard {pipe!r} is not a regular file (a pipe or device): validation data is read "
                       f"again at every evaluation")
        if why:
            p.error(f"{flag} {value!r}: {why}")
    if args.zeroshot_data is not None and not os.path.isdir(args.zeroshot_data):
        p.error(f"--zeroshot-data {args.zeroshot_data!r}: not a directory")
    if args.zeroshot_classes is not None:
        if args.zeroshot_data is None:
            p.error("--zeroshot-classes names the classes of --zeroshot-data's folders: pass that folder too")
        why = classes_problem(args.zeroshot_classes)
        if why:
            p.error(f"--zeroshot-classes {args.zeroshot_classes!r}: {why}")
    if args.resume not in (None, "latest") and not os.path.isfile(args.resume):
        what = ("not a regular file (a device, pipe or socket)" if os.path.exists(args.resume) and
                not os.path.isdir(args.resume) else "checkpoint file not found")
        p.error(f"--resume {args.resume!r}: {what} (or use 'latest')")
    if args.resume == "latest" and args.output is None:
        p.error("--resume latest needs --output (the run directory to resume)")
    if args.resume is not None and args.overwrite:
        p.error("--resume and --overwrite exclude each other (continue the run, or delete it)")
    if not 0.0 <= args.demo_group_prob <= 1.0:
        p.error(f"--demo-group-prob {args.demo_group_prob}: expected a probability in [0, 1]")
    if args.dataset_type in ("csv", "webdataset") and args.train_data is None:
        p.error(f"--dataset-type {args.dataset_type} needs --train-data (the {args.dataset_type} "
                f"{'file' if args.dataset_type == 'csv' else 'shards'} to train on)")
    if given is not None:
        # (no --train-data: the demo; a --dataset-type csv|webdataset without it was refused above)
        train_kind = kinds.get("--train-data", "shapes")
        _check_flags_apply(p, args, given, train_kind, kinds.get("--val-data"))
    if args.pretrained is not None:
        if not os.path.exists(args.pretrained):
            p.error(f"--pretrained {args.pretrained!r}: no such file or folder")
        if args.model is not None:
            p.error(f"--pretrained {args.pretrained!r} takes the architecture from the file: drop --model")
        from .models.openai import architecture_problem
        why = architecture_problem(args.model_overrides or {})
        if why:     # (what no weight records may be set: an open_clip model's exact GELU, its heads)
            p.error(f"--model-overrides {json.dumps(args.model_overrides)} with --pretrained: {why}")
    from .models import list_models
    args.model = _DEFAULTS.model if args.model is None else args.model
    args.model_overrides = {} if args.model_overrides is None else args.model_overrides
    if args.model not in list_models():
        p.error(f"--model {args.model!r}: unknown; available: {', '.join(list_models())}")
    _check_run_args(p, args)


def _check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--model, --model-overrides, --loss and --batch-size together, on the meta device."""
    import torch

    from .models import create_model
    try:
        with torch.device("meta"):  # builds the module tree without allocating weights
            model = create_model(args.model, **(args.model_overrides or {}))
    except (ValueError, TypeError, RuntimeError) as e:
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        p.error(f"--model-overrides {json.dumps(args.model_overrides)}: {why}")
    from .ops.losses import get_loss
    from .tokenizer import VOCAB_SIZE
    if model.config.vocab_size < VOCAB_SIZE:
        p.error(f"--model-overrides: vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                f"{VOCAB_SIZE} ids (CLIP's BPE)")
    if "logit_bias" in get_loss(args.loss).params and (args.model_overrides or {}).get("init_logit_bias", 0) is None:
        p.error(f"--loss {args.loss} learns a logit_bias: --model-overrides init_logit_bias must be a number, not null")
    if "logit_bias" not in get_loss(args.loss).params and model.logit_bias is not None:
        # a bias the loss never reads, kept in the model: its evaluation then took the sigmoid loss
        p.error(f"--loss {args.loss} uses no logit_bias: drop init_logit_bias from --model-overrides, or train "
                f"with --loss siglip")
    from .train.model import batchnorm_batch_problem
    # BatchNorm in training mode needs two values per channel: a forward of one image fails
    # where the tower ends at 1x1 (the demo's 32x32 images), and a batch of one is skipped.
    why = batchnorm_batch_problem(model, args.batch_size if args.batch_size is not None else 2,
                                  args.accum_micro_batch)
    if why:
        flag = "--batch-size" if args.batch_size == 1 else "--accum-micro-batch"
        p.error(f"{flag} 1: model {args.model!r} {why}")
    on_cpu = getattr(args, "device", "auto") == "cpu" or (getattr(args, "device", "auto") == "auto"
                                                            and not torch.cuda.is_available())
    if on_cpu:
        # Weights, gradients and AdamW's two moments: 16 bytes per parameter in fp32, before any
        # activation. A width of 2^20 asked for 207 GB at the first allocation, as a traceback.
        n_params = sum(t.numel() for t in model.parameters())
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            ram = 0
        if ram and 16 * n_params > ram:
            p.error(f"--model {args.model!r} with these overrides has {n_params / 1e9:.1f}B parameters: training "
                    f"needs at least {16 * n_params / 1e9:.0f} GB (weights, gradients, AdamW's moments), this "
                    f"machine has {ram / 1e9:.0f} GB")
    world = os.environ.get("WORLD_SIZE", "1")       # torchrun's
    if args.loss == "clip" and args.batch_size == 1 and world.strip() in ("", "1"):
        p.error("--batch-size 1 in one process: the softmax loss of a batch of one pair is always 0 "
                "(nothing to contrast), the model would learn nothing; use 2 or more")


def _check_run_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--model-overrides, --device, --loss-backend and --output, checked before anything is built."""
    if args.pretrained is None:    # (a --pretrained model is checked when the trainer reads it)
        _check_model_args(p, args)
    for flag, why in (("--device", device_problem(args.device)),
                      ("--loss-backend", backend_problem(args.loss_backend))):
        if why:
            p.error(f"{flag} {why}")
    if args.output is not None:
        from ._fileio import path_inside, writable_dir_problem
        zs = getattr(args, "zeroshot_data", None)
        if path_inside(args.output, zs):
            # Its classes are its folders: the run folder would become one more class.
            p.error(f"--output {args.output!r} is inside --zeroshot-data {zs!r}; put the run elsewhere")
        why = writable_dir_problem(args.output)
        if why:
            p.error(f"--output {args.output!r}: {why}")
        ck = os.path.join(args.output, "checkpoints")
        if os.path.lexists(ck) and not os.path.isdir(ck):
            p.error(f"--output {args.output!r}: its 'checkpoints' is not a folder (checkpoints are written there)")
        if os.path.isdir(ck) and not os.access(ck, os.W_OK | os.X_OK):
            p.error(f"--output {args.output!r}: its 'checkpoints' folder is not writable")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A ``TrainConfig`` from parsed ``train`` arguments; real data gets open_clip-like defaults
    (lr 5e-4, wd 0.2, min(2000, steps // 10) warmup steps, epochs instead of the demo's fixed
    step count)."""
    demo = args.train_data is None and args.dataset_type in ("auto", "shapes")
    fields = {k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__}
    fields["model"] = fields.get("model") or _DEFAULTS.model
    fields["model_overrides"] = fields.get("model_overrides") or {}
    cfg = TrainConfig(**fields)
    cfg.lr = args.lr if args.lr is not None else (_DEFAULTS.lr if demo else 5e-4)
    cfg.weight_decay = args.weight_decay if args.weight_decay is not None else (_DEFAULTS.weight_decay if demo else 0.2)
    cfg.warmup = args.warmup if args.warmup is not None else (_DEFAULTS.warmup if demo else None)
    cfg.steps = args.steps if args.steps is not None else (_DEFAULTS.steps if demo else None)
    cfg.batch_size = (args.batch_size if args.batch_size is not None
                      else (_DEFAULTS.batch_size if demo else REAL_DATA_BATCH))
    cfg.eval_every = args.eval_every if args.eval_every is not None else (DEMO_EVAL_EVERY if demo else None)
    cfg.eval_at_start = demo
    cfg.time_budget = args.time_budget or None
    return cfg


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, ``kill``) in a one-process command: unwinds as Ctrl-C does,
    so that a write in progress removes its temporary file and the command says why it ended."""


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises ``Terminated`` in this process while the block runs. Not under a launcher
    (RANK set): a rank blocked in a collective runs no Python handler until it returns, so it
    would outlive the launcher's SIGTERM instead of stopping at once. A forked child (a
    DataLoader worker) that inherits the handler takes the default action."""
    if _launcher_rank() is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[List[str]] = None) -> int:
    """The ``fastclip`` command: ``train`` (default), ``eval`` or ``bench``. Ctrl-C exits with
    130 and one line, SIGTERM with 143, from the moment this function runs (the command's own
    imports and argument checks included, where a traceback came); the interpreter's import of
    ``fastclip`` and torch before it, the first second or so, still ends in Python's traceback."""
    with _sigterm_unwinds():
        try:
            return _main(argv)
        except KeyboardInterrupt as e:
            return stopped(e, quiet=bool(_launcher_rank()))


def entry() -> None:
    """The ``fastclip`` console script and ``python -m fastclip``: :func:`main`, then exit with
    its status. A rank launched by torchrun leaves with ``os._exit`` once its command has ended
    (its files written and fsync'ed, the process group destroyed, stdout and stderr flushed):
    finalising the interpreter after gloo's threads had served the group aborted the rank now
    and then ("terminate called without an active exception", exit -6: 1 of 60-115 finished
    2-rank CPU runs), and the launcher reported a finished run as failed."""
    code = main()
    if _launcher_rank() is not None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    sys.exit(code)


def stopped(e: KeyboardInterrupt, what: str = "", quiet: bool = False) -> int:
    """The one line a command prints when Ctrl-C or SIGTERM (``Terminated``) stopped it,
    ``what`` saying what it leaves behind, and its exit status (130, or 143 for SIGTERM);
    ``quiet`` (a launched rank other than the first) prints nothing."""
    if not quiet:
        word = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"\n{word}" + (f": {what}" if what else ""), file=sys.stderr)
    return 143 if isinstance(e, Terminated) else 130


def _main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if argv and argv[0] == "eval":
        from .eval.command import main as eval_main
        return eval_main(argv[1:])
    p = build_parser()
    # Under torchrun every rank parses the same arguments: rank 0 alone prints their errors.
    quiet = contextlib.redirect_stderr(io.StringIO()) if _launcher_rank() else contextlib.nullcontext()
    with quiet:
        args = p.parse_args(argv)
    if args.command is None:
        p.print_help()
        return 2
    train_parser = p._subparsers._group_actions[0].choices["train"]  # errors name the subcommand
    # --output's folders that this command creates (checking that it is writable makes them):
    # removed again, if still empty, when the run never starts.
    created = _missing_dirs(args.output if args.output is not None else "runs")
    code = 1
    try:
        with quiet:
            _check_paths(train_parser, args, given_dests(train_parser, argv[1:]))
        from .datasets.csv_dataset import DataError
        from .train.checkpoint import CheckpointError
        from .train.run_folder import RunFolderError
        from .train.trainer import _train as train  # sets cfg.output (cleaned up below on failure)
        cfg = config_from_args(args)
        global _peer_stopped
        _peer_stopped = False
        log = PipeSafeLog()
        err = PipeSafeStream(sys.stderr)
        sys.stderr = err          # progress lines, notes and warnings all go through it
        try:
            code = run_reporting("train", lambda: train(cfg, log), (CheckpointError, DataError, RunFolderError))
        finally:
            sys.stderr = err.stream
            if args.output is None and cfg.output is not None:
                created.append(cfg.output)  # the default runs/<date>-<time>, claimed by creating it
    finally:
        if code != 0:
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    os.rmdir(d)             # only an empty folder: a run's files stay
    if _peer_stopped:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)
    # 141: the status of a process a closed pipe stopped
    return 141 if code == 0 and (log.broken or err.broken) else code


def _missing_dirs(path: str) -> List[str]:
    """The folders on the way to ``path`` (itself included) that do not exist yet, outermost first."""
    out: List[str] = []
    path = os.path.abspath(path)
    while not os.path.lexists(path):
        out.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return out[::-1]


class PipeSafeLog:
    """``print`` that survives a closed stdout (``fastclip train | head``): the command goes on
    (its files are still written), stdout is sent to /dev/null (Python's flush at exit would
    raise again), and ``broken`` records it for the exit status. ``stderr=True`` writes to
    stderr instead (``fastclip eval --output /dev/stdout``: the JSON alone on stdout)."""

    broken = False

    def __init__(self, stderr: bool = False):
        self.stderr = stderr

    def __call__(self, line: str) -> None:
        if self.broken:
            return
        # the stream of the moment (a test may swap it)
        out = PipeSafeStream(sys.stderr if self.stderr else sys.stdout)
        out.write(line + "\n")
        out.flush()
        self.broken = out.broken


class PipeSafeStream:
    """A text stream that survives being closed or failing: ``sys.stderr`` for a run (``fastclip
    train 2>&1 | head``, ``2>/dev/full``: the progress lines and notes would raise there and end
    the run before its model is written), and stdout for ``PipeSafeLog``. At the first failed
    write or flush the stream's descriptor is sent to /dev/null (the text still buffered then
    goes nowhere, and Python's flush at exit cannot raise), later text is dropped, and
    ``broken`` records it for the exit status."""

    def __init__(self, stream):
        self.stream, self.broken = stream, False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                return self.stream.write(text)
            except OSError:          # EPIPE: a closed pipe; ENOSPC: /dev/full
                self._gone()
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except OSError:
                self._gone()

    def _gone(self) -> None:
        self.broken = True
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())

    def __getattr__(self, name):     # isatty, fileno, encoding, ...: the stream's own
        return getattr(self.stream, name)


def run_reporting(command: str, fn, user_errors: tuple) -> int:
    """Run ``fn()`` for ``fastclip <command>``: 0 when it returns; 130 on Ctrl-C; for
    ``user_errors`` (the user's files or a flag only the loaded data can judge, not fastclip,
    are at fault) one line, like an argument error, and 2.

    Under torchrun (``RANK`` set) a rank other than 0 says which rank it is, and when a peer
    stops (its own error is printed by that peer), a rank whose collective then fails says so in
    one line and returns 2, instead of the process group's traceback."""
    rank = _launcher_rank()
    who = f"fastclip {command}: " + (f"rank {rank}: " if rank else "")
    try:
        fn()
    except KeyboardInterrupt as e:
        return stopped(e, quiet=bool(rank))
    except user_errors as e:
        print(f"{who}error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if rank is None or not _peer_gone(e):
            raise
        # (a rank interrupted or killed on its own prints nothing: only rank 0 reports Ctrl-C)
        print(f"{who}stopped: another rank stopped first (its error, if it printed one, is above; a "
              f"rank interrupted or killed prints none): {_one_line(str(e))[:200]}", file=sys.stderr)
        global _peer_stopped
        _peer_stopped = True
        return 2
    return 0


# Set when a peer rank's end broke this rank's process group: main() then leaves at once
# (os._exit), since tearing down a broken gloo group at interpreter exit can abort the process
# ("terminate called without an active exception", SIGABRT, in 1 of 3 tries with 2 ranks).
_peer_stopped = False


def _launcher_rank() -> Optional[int]:
    """This process's rank under torchrun (``RANK``), or None outside a launched group."""
    try:
        return int(os.environ["RANK"]) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    except (KeyError, ValueError):
        return None


def _peer_gone(e: RuntimeError) -> bool:
    """Whether ``e`` is a collective failing because a peer process ended (gloo: "Connection
    closed by peer", "Connection reset by peer", a broken pipe)."""
    import torch.distributed as dist
    text = str(e)
    return (isinstance(e, getattr(dist, "DistError", ())) or "Connection closed by peer" in text
            or "Connection reset by peer" in text or "Broken pipe" in text)


def _one_line(message: str) -> str:
    """An error's message on one line. An error raised in a DataLoader worker comes back with the
    worker's whole traceback in its message ("Caught DataError in DataLoader worker process 1.
    Original Traceback ..."): only its last line, the error itself, is kept."""
    if "Original Traceback (most recent call last)" in message:
        last = [line for line in message.strip().splitlines() if line.strip()][-1]
        message = re.sub(r"^[\w.]+(Error|Exception): ", "", last.strip())
    return " ".join(message.split())


if __name__ == "__main__":
    sys.exit(main())
