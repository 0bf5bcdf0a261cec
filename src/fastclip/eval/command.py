"""``fastclip eval MODEL``: evaluate a trained or released model without training it.

    fastclip eval runs/demo                         # the demo's zero-shot tasks (built-in shapes)
    fastclip eval runs/x --zeroshot-data imagenet/val --val-data val.csv
    fastclip eval ViT-B-32.pt --probe-train cifar/train --probe-test cifar/test --device cuda

MODEL is whatever ``fastclip.eval.evaluate.load_model`` reads (a run folder, a model or training
checkpoint of fastclip, an OpenAI checkpoint). The metrics are those ``fastclip train`` logs
(zero-shot top-1/top-5 with chance, validation loss and retrieval recall@1/5/10), plus a linear
probe; they are printed, and written as JSON with ``--output``. Bad arguments exit with status 2
and a message naming the flag, before the model is loaded; unreadable files too.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import Any, Dict, List, NamedTuple, Optional

from ..cli import (
    _CSV_ONLY,
    ZEROSHOT_CLASSES_HELP,
    PipeSafeLog,
    _flag,
    _json_dict,
    _nonneg_int,
    _positive_int,
    _seed,
    _separator,
    _threads,
    backend_problem,
    classes_problem,
    csv_file_problem,
    device_problem,
    run_reporting,
    shards_problem,
)
from ..train.config import LOSSES, PRECISIONS, TrainConfig

_D = TrainConfig()


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a fastclip train output folder, a model .safetensors or training checkpoint "
                                 "of fastclip, or an OpenAI checkpoint (e.g. ViT-B-32.pt)")
    g = p.add_argument_group("data (none given: a fastclip train run's own evaluation data, else --shapes)")
    g.add_argument("--zeroshot-data", default=None, help="zero-shot: folder of class-named image folders")
    g.add_argument("--zeroshot-classes", default=None,
                   help=ZEROSHOT_CLASSES_HELP)
    g.add_argument("--zeroshot-templates", choices=["imagenet", "cifar", "simple"], default=None,
                   help=f"prompt templates (default: the run's, else {_D.zeroshot_templates})")
    g.add_argument("--val-data", default=None, help="CSV/TSV or webdataset shards: val loss + retrieval recall")
    g.add_argument("--val-num-samples", type=_positive_int, default=None,
                   help="cap on validation samples (default: the run's, else 10k)")
    g.add_argument("--dataset-type", choices=["auto", "csv", "webdataset"], default=None,
                   help="--val-data's type when its name does not tell")
    g.add_argument("--csv-img-key", default=None, help=f"(default: the run's, else {_D.csv_img_key})")
    g.add_argument("--csv-caption-key", default=None, help=f"(default: the run's, else {_D.csv_caption_key})")
    g.add_argument("--csv-separator", type=_separator, default=None,
                   help="one character; '\\t' is a tab (default: the run's, else ',')")
    g.add_argument("--probe-train", default=None,
                   help="linear probe: folder of class-named image folders to fit on (needs --probe-test)")
    g.add_argument("--probe-test", default=None, help="linear probe: folder to score on, same class folders")
    g.add_argument("--shapes", action="store_true",
                   help="the demo's zero-shot tasks: shape and colour of the built-in shapes of held-out "
                        "(colour, shape) pairs (the numbers fastclip train's demo reports, for the same --seed)")
    g.add_argument("--demo-eval-samples", type=_positive_int, default=None,
                   help=f"images drawn for --shapes (default: the run's, else {_D.demo_eval_samples})")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    g.add_argument("--batch-size", type=_positive_int, default=None,
                   help="the batches --val-data's loss is computed within (a contrastive loss depends on "
                        "its batch size; default: the run's per-rank --batch-size when MODEL is a fastclip "
                        "train run, else 256) and, when given, the images per encoder forward (default 256)")
    g.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="fp32, or bf16/fp16 autocast for the encoders (on a CPU as well, as fastclip "
                        "train takes them); default: the run's, else fp32")
    g.add_argument("--loss", choices=("auto", *LOSSES), default="auto",
                   help="the loss of --val-data's val loss (auto: siglip for a model with a logit_bias, else clip)")
    g.add_argument("--loss-backend", default="auto", help="fastclip kernel backend of the val loss")
    g.add_argument("--threads", type=_threads, default=None, help="torch CPU threads")
    g.add_argument("--workers", type=_nonneg_int, default=0,
                   help="DataLoader processes decoding the --zeroshot-data and --probe images")
    g.add_argument("--seed", type=_seed, default=None,
                   help="--shapes draws the held-out images of the run with this seed; the probe's validation "
                        f"split (default: the run's, else {_D.seed})")
    g.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    g.add_argument("--model-overrides", type=_json_dict, default=None, metavar="JSON",
                   help="for an OpenAI-layout file, what no weight records: quick_gelu, vision_heads, "
                        "text_heads, text_eos_id (an open_clip model trained with exact GELU: "
                        "'{\"quick_gelu\": false}'); "
                        "a fastclip file records them")
    g.add_argument("--allow-torchscript-code", action="store_true",
                   help="read an OpenAI TorchScript archive with torch.jit.load, which RUNS the code stored in "
                        "it: only for files from a source you trust that the default reader cannot read")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclip eval",
                                description="Evaluate a model: zero-shot classification, validation loss and "
                                            "image-text retrieval recall, linear probe.")
    add_eval_args(p)
    return p


# Flags a run's config.json fills in when unset, with the value used otherwise.
RUN_DEFAULTS: Dict[str, Any] = {
    "seed": _D.seed, "batch_size": 256, "demo_eval_samples": _D.demo_eval_samples, "precision": "fp32",
    "val_num_samples": None, "zeroshot_templates": _D.zeroshot_templates,
    "csv_img_key": _D.csv_img_key, "csv_caption_key": _D.csv_caption_key, "csv_separator": _D.csv_separator,
    "dataset_type": "auto"}
DATA_FLAGS = ("zeroshot_data", "val_data", "probe_train", "shapes")


class RunConfig(NamedTuple):
    """What ``fastclip train`` recorded about the run a model belongs to."""
    path: Optional[str]            # where it was read (config.json, or the checkpoint itself)
    train: Dict[str, Any]          # the TrainConfig fields
    cwd: Optional[str]             # what its relative paths are relative to (None: not recorded)
    note: Optional[str] = None     # why nothing was read from a config.json that exists


def run_config(model_path: str) -> RunConfig:
    """The training configuration of the ``fastclip train`` run that ``model_path`` belongs to:
    the ``config.json`` of its folder (the path as given, and with symbolic links resolved;
    from a checkpoint, the folder above ``checkpoints/``), else the configuration a training
    checkpoint carries itself. Empty when there is none; a config.json that cannot be read
    gives a ``note`` saying why."""
    from ..train.checkpoint import saved_run_config
    folders = []
    for p in (os.path.abspath(model_path), os.path.realpath(model_path)):
        folder = p if os.path.isdir(p) else os.path.dirname(p)
        folders += [folder, os.path.dirname(folder)] if os.path.basename(folder) == "checkpoints" else [folder]
    for d in dict.fromkeys(folders):
        path = os.path.join(d, "config.json")
        if not os.path.lexists(path):
            continue
        try:
            if not os.path.isfile(path):        # a folder, a FIFO (would block), a dangling link
                raise OSError("not a regular file")
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            train = data.get("train") if isinstance(data, dict) else None
            if not isinstance(train, dict):
                raise ValueError("no 'train' object in it")
        except (OSError, ValueError, RecursionError) as e:
            why = (str(e).splitlines() or [type(e).__name__])[0][:120]
            return RunConfig(None, {}, None, f"{path} is unreadable ({type(e).__name__}: {why}): the run's "
                                             f"settings are not applied")
        cwd = data.get("cwd") if isinstance(data.get("cwd"), str) else None
        return RunConfig(path, train, cwd)
    if os.path.isfile(model_path) and model_path.endswith(".safetensors"):
        saved = saved_run_config(model_path)
        if saved:
            return RunConfig(model_path, saved, None)
    return RunConfig(None, {}, None)


def _valid(name: str, value: Any) -> bool:
    """Whether a recorded value can stand for the flag ``name`` (a hand-edited file is not trusted)."""
    if name == "seed":
        return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2 ** 63
    if name in ("batch_size", "demo_eval_samples", "val_num_samples"):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if name == "precision":
        return value in PRECISIONS
    if name == "zeroshot_templates":
        return value in ("imagenet", "cifar", "simple")
    if name == "dataset_type":
        return value in ("csv", "webdataset")
    if name == "csv_separator":
        return isinstance(value, str) and len(value) == 1
    return isinstance(value, str) and bool(value)


def _run_path(value: str, cwd: Optional[str], shards: bool = False) -> str:
    """A path the run recorded, made absolute against the folder the run was started from; with
    ``shards`` (--val-data), each of a ``::``-joined list that is no path of its own (only the
    first was: the others were read from the current folder, or found missing and the data
    evaluated in part)."""
    whole = value if os.path.isabs(value) or cwd is None else os.path.join(cwd, value)
    if shards and "::" in value and not os.path.exists(whole):
        return "::".join(_run_path(v, cwd) if v else v for v in value.split("::"))
    return whole


def fill_defaults(args: argparse.Namespace, log=print) -> None:
    """Flags left unset take the run's values, so that ``fastclip eval RUN`` evaluates as the run
    evaluated itself; without data flags, the run's own evaluation data (the built-in shapes for
    a demo run, else its --zeroshot-data/--val-data where they still exist, with its class
    names); RUN_DEFAULTS and --shapes otherwise. Sets ``args.encode_batch_size``: the images per
    forward (the run's batch size groups only the val loss: a per-rank batch of thousands would
    be one forward of thousands of images)."""
    run = run_config(args.model)
    if run.note:
        log(run.note)
    train, taken = run.train, []
    args.encode_batch_size = args.batch_size or RUN_DEFAULTS["batch_size"]
    for name, fallback in RUN_DEFAULTS.items():
        if getattr(args, name) is not None:
            continue
        value = train.get(name)
        ok = _valid(name, value)
        setattr(args, name, value if ok else fallback)
        if ok and value != fallback:
            taken.append(f"--{name.replace('_', '-')} {value}")
    if not any(getattr(args, f) for f in DATA_FLAGS):
        from ..datasets.webdataset import expand_urls
        demo = bool(train) and train.get("train_data") is None and train.get("dataset_type") in ("auto", "shapes")
        if run.cwd is None and any(isinstance(train.get(k), str) and not os.path.isabs(train[k])
                                   for k in ("zeroshot_data", "val_data")):
            log("the run did not record the folder it was started from: its relative data paths are read "
                "from this one")
        for name in ("zeroshot_data", "val_data"):
            value = train.get(name)
            if not (isinstance(value, str) and value):
                continue
            path = _run_path(value, run.cwd, shards=name == "val_data")
            if os.path.exists(path) or (name == "val_data" and expand_urls(path)):
                setattr(args, name, path)
                taken.append(f"--{name.replace('_', '-')} {path}")
            else:
                log(f"the run's --{name.replace('_', '-')} {path!r} is not found: not evaluated")
        classes = train.get("zeroshot_classes")
        if args.zeroshot_data and args.zeroshot_classes is None and _valid("zeroshot_classes", classes):
            # The run's class names go with the run's folder only.
            cpath = _run_path(classes, run.cwd)
            args.zeroshot_classes = cpath if os.path.isfile(cpath) else classes
            taken.append(f"--zeroshot-classes {args.zeroshot_classes}")
        if demo or not any(getattr(args, f) for f in DATA_FLAGS):
            args.shapes = True
    args.run_config_path = run.path
    if taken:
        log(f"from {run.path}: " + ", ".join(taken))


# Options that only one kind of evaluation data reads: ``main`` notes which of them were typed
# (before a run's config.json fills them in) and ``check_args`` refuses those that the data
# evaluated would ignore, as ``fastclip train`` refuses them.
DATA_OPTIONS = ("zeroshot_classes", "zeroshot_templates", "val_num_samples", "dataset_type", "csv_img_key",
                "csv_caption_key", "csv_separator", "demo_eval_samples")

def _check_options_apply(p: argparse.ArgumentParser, args: argparse.Namespace, given: set,
                         val_kind: Optional[str]) -> None:
    """Refuse options typed for data that is not evaluated (``--zeroshot-templates`` without
    ``--zeroshot-data``, ``--csv-img-key`` with shards, ...) rather than ignore them. ``args``
    holds the data evaluated: a run's own data (``fill_defaults``) counts as given."""
    if "zeroshot_classes" in given and args.zeroshot_data is None:
        p.error("--zeroshot-classes names the classes of --zeroshot-data's folders: pass that folder too")
    for dest, needs, what in (("zeroshot_templates", "zeroshot_data",
                               "makes the prompts of --zeroshot-data's classes (the built-in shapes "
                               "tasks have their own)"),
                              ("val_num_samples", "val_data", "caps the samples of --val-data"),
                              ("dataset_type", "val_data", "tells --val-data's type")):
        if dest in given and getattr(args, needs) is None:
            p.error(f"{_flag(dest)} {what}: pass that too, or drop {_flag(dest)}")
    if ("dataset_type" in given and args.dataset_type in ("csv", "webdataset") and val_kind is not None
            and val_kind != args.dataset_type):
        p.error(f"--dataset-type {args.dataset_type}: --val-data {args.val_data!r} is named as {val_kind} "
                f"(its name decides where it tells); drop --dataset-type or pass the right file")
    typed = [_flag(d) for d in _CSV_ONLY if d in given]
    if typed and val_kind != "csv":
        where = ("there is no --val-data" if args.val_data is None
                 else f"--val-data {args.val_data!r} is not one ({val_kind})")
        p.error(f"{typed[0]} reads CSV files, and {where}: drop {' and '.join(typed)}")
    if "demo_eval_samples" in given and not args.shapes:
        p.error("--demo-eval-samples draws the images of the built-in shapes tasks, which are not evaluated "
                "here: pass --shapes too, or drop --demo-eval-samples")


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace, given: Optional[set] = None) -> None:
    """Every flag, before the model is loaded: files and folders exist, the device is usable,
    --output can be written and is none of the inputs; the class folders of --zeroshot-data and
    the probe are scanned (``args.class_folders``, which ``evaluate`` reads). ``given``: the
    ``DATA_OPTIONS`` typed, to refuse those the data evaluated would ignore (unchecked when
    None)."""
    from ..train.data import detect_val_type
    from .evaluate import resolve_model_file
    try:
        model_file = resolve_model_file(args.model)
    except ValueError as e:
        p.error(f"model {e}")
    for flag, value in (("--zeroshot-data", args.zeroshot_data), ("--probe-train", args.probe_train),
                        ("--probe-test", args.probe_test)):
        if value is not None and not os.path.isdir(value):
            p.error(f"{flag} {value!r}: not a directory")
    if args.model_overrides is not None:
        from ..models.openai import architecture_problem
        why = architecture_problem(args.model_overrides)
        if why:
            p.error(f"--model-overrides {json.dumps(args.model_overrides)}: {why}")
    if (args.probe_train is None) != (args.probe_test is None):
        p.error("--probe-train and --probe-test go together (fit on one folder, score on the other)")
    why = None if args.zeroshot_classes is None else classes_problem(args.zeroshot_classes)
    if why:
        p.error(f"--zeroshot-classes {args.zeroshot_classes!r}: {why}")
    val_kind = None
    if args.val_data is not None:
        try:
            val_kind = detect_val_type(args.val_data, args.dataset_type)
        except ValueError as e:
            p.error(str(e))
        why = (csv_file_problem(args.val_data) if val_kind == "csv" else
               shards_problem(args.val_data) if val_kind == "webdataset" else None)
        if why:
            p.error(f"--val-data {args.val_data!r}: {why}")
    if given is not None:
        _check_options_apply(p, args, given, val_kind)
    if val_kind == "csv":       # the columns too, before the model is loaded
        from ..datasets.csv_dataset import csv_header, effective_separator
        fields = csv_header(args.val_data, args.csv_separator)
        for key, flag in ((args.csv_img_key, "--csv-img-key"), (args.csv_caption_key, "--csv-caption-key")):
            if fields is not None and key not in fields:
                p.error(f"--val-data {args.val_data!r}: column {key!r} ({flag}) not found; columns are "
                        f"{fields[:20]} (separator {effective_separator(args.val_data, args.csv_separator)!r})")
    args.class_folders = _scan_folders(p, args)
    # The loss backend serves --val-data's loss alone: without it, a FASTCLIP_BACKEND this
    # machine lacks (which --loss-backend auto takes) must not stop a zero-shot evaluation.
    backend = args.loss_backend != "auto" or args.val_data is not None
    for flag, why in (("--device", device_problem(args.device)),
                      ("--loss-backend", backend_problem(args.loss_backend) if backend else None)):
        if why:
            p.error(f"{flag} {why}")
    for flag, typed in (("--loss", args.loss != "auto"), ("--loss-backend", args.loss_backend != "auto")):
        if typed and args.val_data is None:     # (they were ignored)
            p.error(f"{flag} chooses how --val-data's loss is computed, and there is no --val-data: "
                    f"pass that too, or drop {flag}")
    if args.output is not None:
        run_folder = os.path.dirname(os.path.realpath(model_file))
        if os.path.basename(run_folder) == "checkpoints":
            run_folder = os.path.dirname(run_folder)
        from ..train.run_folder import RUN_FILES
        protected = [args.zeroshot_data, args.probe_train, args.probe_test, os.path.join(run_folder, "checkpoints")]
        _check_output(p, args.output, [model_file, args.val_data, args.zeroshot_classes,
                                       getattr(args, "run_config_path", None), *_val_files(args, val_kind),
                                       *(os.path.join(run_folder, n) for n in RUN_FILES)], protected)


def _val_files(args: argparse.Namespace, val_kind: Optional[str]) -> List[str]:
    """The files --val-data reads that --output could name: the shards a pattern or list
    expands to, the images a CSV lists (those with --output's file name, when it exists: only an
    existing file can be overwritten). --output 'shards/{000..001}.tar''s second shard was
    replaced by the JSON, and so was an image listed in the CSV."""
    if val_kind == "webdataset":
        from ..datasets.webdataset import expand_urls
        return expand_urls(args.val_data)
    if val_kind == "csv" and os.path.isfile(args.output):
        from ..datasets.csv_dataset import csv_image_paths
        names = {os.path.basename(args.output), os.path.basename(os.path.realpath(args.output))}
        return [q for q in csv_image_paths(args.val_data, args.csv_img_key, args.csv_separator)
                if os.path.basename(q) in names]
    return []


def _scan_folders(p: argparse.ArgumentParser, args: argparse.Namespace) -> Dict[str, Any]:
    """``scan_class_folders`` of --zeroshot-data (with --zeroshot-classes) and of the probe's
    folders, keyed by dest; a folder that cannot be used is a flag's error."""
    from ..datasets.csv_dataset import DataError
    from ..datasets.folder import read_classnames, scan_class_folders
    out: Dict[str, Any] = {}
    try:
        names = read_classnames(args.zeroshot_classes) if args.zeroshot_data is not None else None
    except (DataError, OSError) as e:
        p.error(f"--zeroshot-classes {args.zeroshot_classes!r}: {e}")
    try:
        if args.zeroshot_data is not None:
            out["zeroshot_data"] = scan_class_folders(args.zeroshot_data, names,
                                                      f"--zeroshot-data {args.zeroshot_data!r}")
        if args.probe_train is not None:
            for dest in ("probe_train", "probe_test"):
                # A probe uses no class names: Cat/ and cat/ are two classes to it.
                out[dest] = scan_class_folders(getattr(args, dest), None, f"{_flag(dest)} {getattr(args, dest)!r}",
                                               distinct_names=False)
    except (DataError, OSError) as e:
        p.error(str(e) if not isinstance(e, OSError) else f"cannot read a folder: {e}")
    if args.probe_train is not None and out["probe_train"].folders != out["probe_test"].folders:
        p.error(f"--probe-train and --probe-test must hold the same class folders, got "
                f"{out['probe_train'].folders} and {out['probe_test'].folders}")
    return out


def _check_output(p: argparse.ArgumentParser, output: str, inputs: List[Optional[str]],
                  folders: List[Optional[str]]) -> None:
    import tempfile

    from .._fileio import names_folder, path_inside
    if not output:
        p.error("--output '': expected a file name for the JSON metrics")
    real = os.path.realpath(output)
    if os.path.isdir(real) or names_folder(output):
        p.error(f"--output {output!r}: a folder; expected a file name for the JSON metrics")
    if any(i and os.path.exists(i) and os.path.samefile(i, real) for i in inputs if os.path.exists(real)) \
            or any(path_inside(real, f) for f in folders):
        p.error(f"--output {output!r} is one of the inputs (the model, its run's files or the data) or inside "
                f"a data folder: it would overwrite or add to it")
    if os.path.exists(output) and not os.path.isfile(output):
        # A device, a FIFO, or a pipe reached through /dev/stdout (its link resolves to
        # "pipe:[…]", a name that exists nowhere): written in place.
        return
    parent = os.path.dirname(real)
    if not os.path.isdir(parent):
        p.error(f"--output {output!r}: its folder {parent!r} does not exist")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        p.error(f"--output {output!r}: cannot write in {parent!r} ({e.strerror or e})")


def _autocast(device, precision: str):
    import torch
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def evaluate(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """Load ``args.model``, read the data the flags name, and return the metrics (written to
    ``args.output`` first when set). Expects ``fill_defaults`` and ``check_args`` to have run."""
    import torch

    from ..datasets.folder import ImageFolderDataset
    from ..train.data import folder_zeroshot_task, image_transform_for, load_val_batches
    from .evaluate import (
        FolderStream,
        add_mean_top1,
        check_vocab,
        encode_batches,
        folder_zeroshot_metrics,
        format_metrics,
        load_model,
        probe_metrics,
        resolve_model_file,
        val_metrics,
        zeroshot_metrics,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    source = resolve_model_file(args.model)
    model = load_model(source, device, allow_torchscript_code=args.allow_torchscript_code,
                       architecture=args.model_overrides)
    check_vocab(model, source)
    cfg = TrainConfig(seed=args.seed, batch_size=args.batch_size, val_data=args.val_data,
                      val_num_samples=args.val_num_samples, dataset_type=args.dataset_type,
                      csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
                      csv_separator=args.csv_separator, demo_eval_samples=args.demo_eval_samples,
                      zeroshot_data=args.zeroshot_data, zeroshot_classes=args.zeroshot_classes,
                      zeroshot_templates=args.zeroshot_templates)
    loss = args.loss if args.loss != "auto" else ("siglip" if model.logit_bias is not None else "clip")
    from ..ops.losses import get_loss
    if "logit_bias" in get_loss(loss).params and model.logit_bias is None and args.val_data:
        raise ValueError(f"--loss {loss}: the model has no logit_bias (it was not trained with a loss that "
                         f"learns one)")
    tf = image_transform_for(model, False)
    metrics: Dict[str, float] = {}
    skipped = 0
    sets = {}
    if args.shapes:
        from ..train.demo import shapes_zeroshot_sets
        sets.update(shapes_zeroshot_sets(cfg, model))
    folders = args.class_folders        # scanned by check_args
    zs = folder_zeroshot_task(cfg, model, sets) if args.zeroshot_data else None
    if zs is not None:
        # a class none of whose files decode (a folder of resource forks)
        zs[1].check_decodable(f"--zeroshot-data {args.zeroshot_data!r}")
    val_batches = load_val_batches(cfg, model, log=log) if args.val_data else None
    probe = None
    if args.probe_train:
        probe = (ImageFolderDataset.from_scan(folders["probe_train"], tf),
                 ImageFolderDataset.from_scan(folders["probe_test"], tf))
    with torch.no_grad(), _autocast(device, args.precision):
        eb = args.encode_batch_size
        if sets:
            metrics.update(zeroshot_metrics(model, sets, device=device, batch_size=eb))
        if zs is not None:
            name, ds, templates = zs
            m, n = folder_zeroshot_metrics(model, ds, name, templates, eb, device, args.workers)
            metrics.update(m)
            add_mean_top1(metrics)
            skipped += n
        if val_batches:
            metrics.update(val_metrics(model, val_batches[0], loss, device, args.loss_backend))
            skipped += val_batches[1]
        if probe is not None:
            streams = [FolderStream(d, eb, args.workers) for d in probe]
            feats = [encode_batches(model, s, device) for s in streams]
            skipped += sum(s.skipped for s in streams)
    if probe is not None:           # fitted outside autocast (probe_metrics turns it off as well)
        for flag, f, s in (("--probe-train", feats[0], streams[0]), ("--probe-test", feats[1], streams[1])):
            if not len(f):
                from ..datasets.csv_dataset import DataError
                raise DataError(f"{flag}: no image could be decoded ({s.skipped} tried)")
        try:
            metrics.update(probe_metrics(feats[0], streams[0].all_labels(), feats[1], streams[1].all_labels(),
                                         seed=args.seed))
        except ValueError as e:
            raise ValueError(f"--probe-train/--probe-test: {e}") from None
        few = _few_probe_images(len(feats[0]), len(feats[1]), len(probe[0].classnames))
        if few:
            print(f"fastclip eval: warning: {few}", file=sys.stderr, flush=True)
    metrics["skipped"] = skipped
    out: Dict[str, Any] = {"model": args.model, "model_file": source, "seed": args.seed,
                           "batch_size": args.batch_size, "precision": args.precision,
                           "config": model.config.to_dict(), "metrics": metrics}
    if args.output is not None:     # first: a reader of stdout that stops early must not lose it
        from .._fileio import atomic_write, strict_json

        stream = _std_stream(args.output)
        if stream is not None:
            # /dev/stdout (or stderr) onto a file: re-opening it would truncate what the shell's
            # redirection holds (and a rename would replace the file): written through the stream.
            stream.write(json.dumps(strict_json(out), indent=2, allow_nan=False) + "\n")
            stream.flush()
        else:
            def write(tmp: str) -> None:
                with open(tmp, "w", encoding="utf-8") as f:
                    json.dump(strict_json(out), f, indent=2, allow_nan=False)
            atomic_write(args.output, write, suffix=".json")
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    shown = source if os.path.realpath(source) == os.path.realpath(args.model) else f"{args.model} -> {source}"
    log(format_metrics(metrics, header=f"fastclip eval: {shown} ({n_params:.1f}M params, {device}, "
                                        f"{args.precision})"))
    if args.output is not None:
        log(f"wrote {args.output}")
    return out


# Below these a probe's accuracy is too coarse to compare models by: a test image moves
# probe/top1 by 1/n_test (a point at 100 images), and C is chosen on 20% of the training images.
PROBE_MIN_TEST = 100
PROBE_MIN_TRAIN_PER_CLASS = 10


def _few_probe_images(n_train: int, n_test: int, n_classes: int) -> Optional[str]:
    """What makes a probe of ``n_train`` and ``n_test`` decoded images of ``n_classes`` classes
    a rough figure, or None when it has enough of both."""
    if n_test >= PROBE_MIN_TEST and n_train >= PROBE_MIN_TRAIN_PER_CLASS * n_classes:
        return None
    return (f"the linear probe used {n_train} training and {n_test} test images ({n_classes} classes): "
            f"probe/top1 moves in steps of {100 / n_test:.3g} points and C was chosen on "
            f"{max(1, round(0.2 * n_train))} image(s); a rough figure (at least {PROBE_MIN_TEST} test and "
            f"{PROBE_MIN_TRAIN_PER_CLASS} training images per class make it a usable one)")


def _std_stream(path: str):
    """sys.stdout or sys.stderr when ``path`` is the file they write to (``/dev/stdout``,
    ``/proc/self/fd/1``, or the very file stdout is redirected to), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    for stream in (sys.stdout, sys.stderr):
        try:
            fs = os.fstat(stream.fileno())
        except (AttributeError, OSError, ValueError):      # replaced or closed streams
            continue
        if (fs.st_dev, fs.st_ino) == (st.st_dev, st.st_ino):
            stream.flush()
            return stream
    return None


def main(argv: Optional[List[str]] = None) -> int:
    from ..datasets.csv_dataset import DataError
    p = build_parser()
    args = p.parse_args(argv)
    # --output /dev/stdout: the JSON is the output, so the summary lines go to stderr (both on
    # stdout made it unparseable)
    log = PipeSafeLog(stderr=args.output is not None and _std_stream(args.output) is sys.stdout)
    given = {d for d in DATA_OPTIONS if getattr(args, d) is not None}     # before the run's values fill them
    fill_defaults(args, log)
    check_args(p, args, given)
    code = run_reporting("eval", lambda: evaluate(args, log), (DataError, ValueError, FileNotFoundError))
    return 141 if code == 0 and log.broken else code     # 141: the status of a process a closed pipe stopped


if __name__ == "__main__":
    sys.exit(main())
