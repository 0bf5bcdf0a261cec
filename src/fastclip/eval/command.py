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
from typing import Any, Dict, List, Optional, Tuple

from ..cli import _positive_int, _seed, _separator, backend_problem, device_problem
from ..train.config import PRECISIONS, TrainConfig

_D = TrainConfig()
DATA_FLAGS = ("zeroshot_data", "val_data", "probe_train", "shapes")


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a fastclip train output folder, a model .safetensors or training checkpoint "
                                 "of fastclip, or an OpenAI checkpoint (e.g. ViT-B-32.pt)")
    g = p.add_argument_group("data (with none of these: --shapes)")
    g.add_argument("--zeroshot-data", default=None, help="zero-shot: folder of class-named image folders")
    g.add_argument("--zeroshot-classes", default=None,
                   help="class names: comma-separated or a file with one per line (default: folder names)")
    g.add_argument("--zeroshot-templates", choices=["imagenet", "cifar", "simple"], default=_D.zeroshot_templates)
    g.add_argument("--val-data", default=None, help="CSV/TSV or webdataset shards: val loss + retrieval recall")
    g.add_argument("--val-num-samples", type=_positive_int, default=None, help="cap on validation samples (10k)")
    g.add_argument("--dataset-type", choices=["auto", "csv", "webdataset"], default="auto",
                   help="--val-data's type when its name does not tell")
    g.add_argument("--csv-img-key", default=_D.csv_img_key)
    g.add_argument("--csv-caption-key", default=_D.csv_caption_key)
    g.add_argument("--csv-separator", type=_separator, default=_D.csv_separator,
                   help="one character; '\\t' is a tab")
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
                   help="images per forward, and the batches --val-data's loss is computed within (a "
                        "contrastive loss depends on its batch size); default: the run's per-rank --batch-size "
                        "when MODEL is a fastclip train run, else 256")
    g.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32, or bf16/fp16 autocast on a GPU (bf16 autocast on a CPU)")
    g.add_argument("--loss", choices=["auto", "clip", "siglip"], default="auto",
                   help="the loss of --val-data's val loss (auto: siglip for a model with a logit_bias, else clip)")
    g.add_argument("--loss-backend", default="auto", help="fastclip kernel backend of the val loss")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    g.add_argument("--seed", type=_seed, default=None,
                   help="--shapes draws the held-out images of the run with this seed; the probe's validation "
                        f"split (default: the run's, else {_D.seed})")
    g.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    g.add_argument("--allow-torchscript-code", action="store_true",
                   help="read an OpenAI TorchScript archive with torch.jit.load, which RUNS the code stored in "
                        "it: only for files from a source you trust that the default reader cannot read")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclip eval",
                                description="Evaluate a model: zero-shot classification, validation loss and "
                                            "image-text retrieval recall, linear probe.")
    add_eval_args(p)
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every flag, before the model is loaded: files and folders exist, the device is usable."""
    from ..train.data import detect_val_type
    if not os.path.exists(args.model):
        p.error(f"model {args.model!r}: no such file or folder")
    for flag, value in (("--zeroshot-data", args.zeroshot_data), ("--probe-train", args.probe_train),
                        ("--probe-test", args.probe_test)):
        if value is not None and not os.path.isdir(value):
            p.error(f"{flag} {value!r}: not a directory")
    if (args.probe_train is None) != (args.probe_test is None):
        p.error("--probe-train and --probe-test go together (fit on one folder, score on the other)")
    if args.val_data is not None:
        from ..datasets.webdataset import expand_urls
        try:
            kind = detect_val_type(args.val_data, args.dataset_type)
        except ValueError as e:
            p.error(str(e))
        if kind == "csv" and not os.path.isfile(args.val_data):
            p.error(f"--val-data {args.val_data!r}: file not found")
        if kind == "webdataset" and not expand_urls(args.val_data):
            p.error(f"--val-data {args.val_data!r}: no tar shard matches")
    for flag, why in (("--device", device_problem(args.device)),
                      ("--loss-backend", backend_problem(args.loss_backend))):
        if why:
            p.error(f"{flag} {why}")
    if args.output is not None:
        parent = os.path.dirname(os.path.abspath(args.output))
        if os.path.isdir(args.output):
            p.error(f"--output {args.output!r}: a folder; expected a file name for the JSON metrics")
        if not os.path.isdir(parent):
            p.error(f"--output {args.output!r}: its folder {parent!r} does not exist")
        if not os.access(parent, os.W_OK):
            p.error(f"--output {args.output!r}: its folder {parent!r} is not writable")


RUN_DEFAULTS = {"seed": _D.seed, "batch_size": 256, "demo_eval_samples": _D.demo_eval_samples}


def run_config(model_path: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """The training configuration of the ``fastclip train`` run that ``model_path`` belongs to
    (its folder, its ``model.safetensors`` or one of its checkpoints): ``(config.json path,
    its "train" entries)``, or ``(None, {})`` when there is none or it does not parse."""
    p = os.path.abspath(model_path)
    folder = p if os.path.isdir(p) else os.path.dirname(p)
    for d in (folder, os.path.dirname(folder)) if os.path.basename(folder) == "checkpoints" else (folder,):
        path = os.path.join(d, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                train = json.load(f).get("train")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(train, dict):
            return path, train
    return None, {}


def _fill_defaults(args: argparse.Namespace, log) -> None:
    """Flags left unset take the run's values (so that `fastclip eval RUN` reproduces what the
    run reported), else RUN_DEFAULTS."""
    path, train = run_config(args.model)
    taken = []
    for name, fallback in RUN_DEFAULTS.items():
        if getattr(args, name) is not None:
            continue
        value = train.get(name)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name == "seed" else 1)
        setattr(args, name, value if ok else fallback)
        if ok:
            taken.append(f"{name.replace('_', '-')} {value}")
    if taken:
        log(f"from {path}: " + ", ".join(taken))


def _autocast(device, precision: str):
    import torch
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def evaluate(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """Load ``args.model``, read the data the flags name, and return the metrics (also written to
    ``args.output`` when set)."""
    import torch

    from ..datasets.folder import ImageFolderDataset
    from ..train.data import folder_zeroshot_set, image_transform_for, load_val_batches
    from .evaluate import format_metrics, load_model, probe_metrics, val_metrics, zeroshot_metrics
    if args.threads:
        torch.set_num_threads(args.threads)
    _fill_defaults(args, log)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16: autocast to fp16 needs a GPU; use bf16 or fp32 on a CPU")
    model = load_model(args.model, device, allow_torchscript_code=args.allow_torchscript_code)
    if not any(getattr(args, f) for f in DATA_FLAGS):
        args.shapes = True
    cfg = TrainConfig(seed=args.seed, batch_size=args.batch_size, zeroshot_data=args.zeroshot_data,
                      zeroshot_classes=args.zeroshot_classes, zeroshot_templates=args.zeroshot_templates,
                      val_data=args.val_data, val_num_samples=args.val_num_samples, dataset_type=args.dataset_type,
                      csv_img_key=args.csv_img_key, csv_caption_key=args.csv_caption_key,
                      csv_separator=args.csv_separator, demo_eval_samples=args.demo_eval_samples)
    loss = args.loss if args.loss != "auto" else ("siglip" if model.logit_bias is not None else "clip")
    if loss == "siglip" and model.logit_bias is None and args.val_data:
        raise ValueError("--loss siglip: the model has no logit_bias (it was not trained with the sigmoid loss)")
    out: Dict[str, Any] = {"model": args.model, "config": model.config.to_dict()}
    metrics: Dict[str, float] = {}
    skipped = 0
    sets = {}
    if args.shapes:
        from ..train.demo import shapes_zeroshot_sets
        sets.update(shapes_zeroshot_sets(cfg, model))
    if args.zeroshot_data:
        name, zs, n = folder_zeroshot_set(cfg, model)
        sets[name] = zs
        skipped += n
    val_batches = None
    if args.val_data:
        val_batches, n = load_val_batches(cfg, model, log=log)
        skipped += n
    probe = None
    if args.probe_train:
        tf = image_transform_for(model, False)
        tr = ImageFolderDataset(args.probe_train, tf)
        te = ImageFolderDataset(args.probe_test, tf)
        if tr.classnames != te.classnames:
            raise ValueError(f"--probe-train and --probe-test must hold the same class folders, got "
                             f"{tr.classnames} and {te.classnames}")
        xtr, ytr, n1 = tr.load_tensors()
        xte, yte, n2 = te.load_tensors()
        probe, skipped = ((xtr, ytr), (xte, yte)), skipped + n1 + n2
    with torch.no_grad(), _autocast(device, args.precision):
        if sets:
            metrics.update(zeroshot_metrics(model, sets, device=device, batch_size=args.batch_size))
        if val_batches:
            metrics.update(val_metrics(model, val_batches, loss, device, args.loss_backend))
    if probe is not None:
        with _autocast(device, args.precision):
            metrics.update(probe_metrics(model, probe[0], probe[1], device, args.batch_size, args.seed))
    metrics["skipped"] = skipped
    out["metrics"] = metrics
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    log(format_metrics(metrics, header=f"fastclip eval: {args.model} ({n_params:.1f}M params, {device}, "
                                        f"{args.precision})"))
    if args.output is not None:
        from .._fileio import atomic_write

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(out, f, indent=2)
        atomic_write(args.output, write, suffix=".json")
        log(f"wrote {args.output}")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    from ..datasets.csv_dataset import DataError
    p = build_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        evaluate(args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`fastclip eval RUN | head`): no traceback; Python's own flush at
        # exit would raise again, so stdout goes to /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (DataError, ValueError, FileNotFoundError) as e:
        # The user's files (or a flag that only the loaded model can judge): one line.
        print(f"fastclip eval: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
