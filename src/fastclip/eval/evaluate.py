"""Evaluate a trained model: load it from any file fastclip writes or reads, and compute the
metrics ``fastclip train`` reports during training (zero-shot top-1/top-5, validation loss and
retrieval recall) plus a linear probe. ``fastclip eval`` (fastclip/cli.py) is the command line
of this module; the trainer calls ``zeroshot_metrics`` and ``val_metrics`` for its own evals.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from ._checks import as_images, eval_mode, int_at_least, unit_rows

# One zero-shot task: images [N, 3, S, S], labels [N], class names, prompt templates.
ZeroShotSet = Tuple[torch.Tensor, torch.Tensor, List[str], list]


def load_model(path: str, device="cpu", *, allow_torchscript_code: bool = False,
               architecture: Optional[Dict[str, object]] = None):
    """A ``CLIP`` in eval mode on ``device`` (fp32) from ``path``, which may be:

    - a run folder of ``fastclip train``: its ``model.safetensors``, or, for a run that has not
      finished, its newest training checkpoint (``checkpoints/step_*.safetensors``);
    - a model file written by ``fastclip train`` / ``fastclip.save_checkpoint`` (``.safetensors``
      with the model's config in its metadata);
    - a training checkpoint (``checkpoints/step_*.safetensors``): the model is rebuilt from the
      run configuration saved in it;
    - an OpenAI checkpoint (TorchScript archive such as ``ViT-B-32.pt``, a state dict, or a
      ``.safetensors`` file with OpenAI's keys), read by ``fastclip.load_openai``, which runs no
      code from the file unless ``allow_torchscript_code`` (see its warning).

    ``architecture``: what no weight records, for an OpenAI-layout file (``load_openai``'s
    ``quick_gelu``, ``vision_heads``, ``text_heads``; e.g. ``{"quick_gelu": False}`` for an
    open_clip model trained with exact GELU); a fastclip file records them, and a value that
    contradicts it is a ValueError.

    Raises ValueError naming ``path`` when it is none of these.
    """
    from ..models.openai import architecture_problem, check_recorded_architecture, is_safetensors_file, load_openai
    from ..train.checkpoint import FORMAT
    architecture = dict(architecture or {})
    why = architecture_problem(architecture)
    if why:
        raise ValueError(f"architecture: {why}")
    path = resolve_model_file(path)
    # By the header, not the name: a checkpoint copied as "step3.ckpt" is still one.
    if is_safetensors_file(path) and _safetensors_format(path) == FORMAT:
        model = _model_from_training_state(path)
        check_recorded_architecture(model.config, architecture, path)
    else:
        model = load_openai(path, "cpu", allow_torchscript_code=allow_torchscript_code, **architecture)
    return model.float().to(device).eval()


def resolve_model_file(path: str) -> str:
    """The file ``load_model`` reads for ``path``: a file itself; for a run folder its
    ``model.safetensors``, unless a training checkpoint in it is of a later step (a run resumed
    past its end and stopped before finishing again: the model file is the earlier end's), else
    the newest checkpoint. The model file's step is the one the trainer wrote in its metadata
    (or the run's ``metrics.json``); the files' times decide only when neither tells (copies
    do not keep them). Raises ValueError naming ``path`` when there is none."""
    from ..train.checkpoint import CKPT_DIR, list_checkpoints
    path = os.fspath(path)
    if not os.path.isdir(path):
        if not os.path.exists(path):
            raise ValueError(f"{path}: no such file or folder")
        if not os.path.isfile(path):     # a FIFO, a device, a socket: nothing a model is read from
            raise ValueError(f"{path}: not a regular file or a folder (expected a model file or a run folder)")
        return path
    model_file = os.path.join(path, "model.safetensors")
    found = sorted(list_checkpoints(path))
    newest = found[-1][1] if found else None
    if os.path.isfile(model_file):
        if newest is None:
            return model_file
        step = _model_step(path, model_file)
        if step is not None:
            return newest if found[-1][0] > step else model_file
        return model_file if os.path.getmtime(model_file) >= os.path.getmtime(newest) else newest
    if newest is None:
        raise ValueError(f"{path}: a folder without model.safetensors or {CKPT_DIR}/step_*.safetensors "
                         f"(expected the output folder of fastclip train, or a model file)")
    return newest


def _model_step(folder: str, model_file: str) -> Optional[int]:
    """The training step of a run folder's model file: its ``fastclip_step`` metadata, else the
    ``steps`` of the folder's ``metrics.json``; None when neither says."""
    from safetensors import safe_open
    try:
        with safe_open(model_file, framework="pt") as f:
            v = (f.metadata() or {}).get("fastclip_step", "")
        if v.isdigit():
            return int(v)
    except Exception:  # noqa: BLE001 - unreadable: the loader says why later
        pass
    from ..train.run_folder import finished_steps
    return finished_steps(folder)


def check_vocab(model, path: str) -> None:
    """The model must embed every id of fastclip's tokenizer (CLIP's BPE, 49,408 ids): a smaller
    ``vocab_size`` would fail inside the text tower on the first prompt. A model that pools at
    another end-of-sequence id (``text_eos_id``, open_clip's -worldwide models) was trained on
    another tokenizer: CLIP's ids would mean other words to it."""
    from ..tokenizer import EOT_ID, VOCAB_SIZE
    if model.config.vocab_size < VOCAB_SIZE:
        raise ValueError(f"{path}: the model's vocab_size {model.config.vocab_size} is smaller than the "
                         f"tokenizer's {VOCAB_SIZE} ids (CLIP's BPE): its text tower cannot read fastclip's tokens")
    eos = model.config.text_eos_id
    if eos is not None and eos != EOT_ID:
        raise ValueError(f"{path}: the model's text tower pools at token id {eos} (text_eos_id), a tokenizer "
                         f"other than CLIP's BPE (whose end-of-text is {EOT_ID}): fastclip's tokens would "
                         f"mean other words to it")


def _safetensors_format(path: str) -> Optional[str]:
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - unreadable: the loader that follows says why
        return None


def _model_from_training_state(path: str):
    """The model of a training checkpoint, rebuilt from the run configuration it saved."""
    from ..models import create_model, list_models
    from ..train.checkpoint import CheckpointError, read_training_state
    from ..train.config import model_kwargs
    try:
        state = read_training_state(path)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    extra = state.get("extra") if isinstance(state.get("extra"), dict) else {}
    saved = extra.get("config")
    if isinstance(extra.get("model_config"), dict):     # the architecture itself (a --pretrained run's too)
        from ..models import CLIP, CLIPConfig
        try:
            with torch.device("meta"):
                model = CLIP(CLIPConfig.from_dict(extra["model_config"]))
            model.load_state_dict(state["model"], assign=True)
        except (ValueError, TypeError, RuntimeError, KeyError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{path}: the checkpoint's weights do not fit its model config ({why})") from None
        return model
    if not isinstance(saved, dict) or saved.get("model") not in list_models():
        raise ValueError(f"{path}: the training checkpoint does not say which model it holds (no run "
                         f"configuration with a known model name in it)")
    try:
        with torch.device("meta"):   # the config's structure; the weights come from the file
            model = create_model(saved["model"], **model_kwargs(saved.get("loss", "clip"),
                                                                saved.get("model_overrides") or {}))
        model.load_state_dict(state["model"], assign=True)
    except (ValueError, TypeError, RuntimeError, KeyError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{path}: the checkpoint's weights do not fit its model {saved['model']!r} ({why})") from None
    return model


def _chunks(n: int, batch_size: int) -> Iterable[slice]:
    return (slice(a, min(a + batch_size, n)) for a in range(0, n, batch_size))


@torch.no_grad()
def encode_images(model, images: torch.Tensor, batch_size: int = 256, device=None) -> torch.Tensor:
    """L2-normalised image embeddings ``[N, embed_dim]`` (fp32, on the CPU) of ``images``
    ``[N, 3, S, S]``, ``batch_size`` images per forward (a positive int, default 256), in eval
    mode."""
    images = as_images(images, "images")
    batch_size = int_at_least(batch_size, "batch_size")
    return encode_batches(model, (images[s] for s in _chunks(images.shape[0], batch_size)), device)


@torch.no_grad()
def encode_batches(model, batches: Iterable[torch.Tensor], device=None) -> torch.Tensor:
    """``encode_images`` of a stream of image batches ``[b, 3, S, S]`` (a DataLoader: only the
    embeddings are kept, never the images of a whole dataset)."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model):
        out = [unit_rows(model.encode_image(b.to(dev)).float()).cpu() for b in batches]
    return torch.cat(out) if out else torch.zeros(0, model.embed_dim)


class FolderStream:
    """The decodable images of an ``ImageFolderDataset`` in batches, decoded by ``workers``
    DataLoader processes: iterate for ``images [b, 3, S, S]``; ``labels`` (all of them, in
    order) and ``skipped`` (files that did not decode) are filled in as it goes. ``batch_size``:
    a positive int."""

    def __init__(self, dataset, batch_size: int, workers: int = 0):
        batch_size = int_at_least(batch_size, "batch_size")
        self.loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                                  collate_fn=self._collate)
        self.labels: List[torch.Tensor] = []
        self.skipped = 0

    @staticmethod
    def _collate(samples):
        good = [s for s in samples if s is not None]
        imgs = torch.stack([s[0] for s in good]) if good else None
        return imgs, torch.tensor([s[1] for s in good], dtype=torch.long), len(samples) - len(good)

    def __iter__(self):
        for imgs, labels, skipped in self.loader:
            self.skipped += skipped
            if imgs is not None:
                self.labels.append(labels)
                yield imgs

    def all_labels(self) -> torch.Tensor:
        return torch.cat(self.labels) if self.labels else torch.zeros(0, dtype=torch.long)


@torch.no_grad()
def zeroshot_metrics(model, sets: Dict[str, ZeroShotSet], device=None, batch_size: int = 256) -> Dict[str, float]:
    """``zeroshot/<task>/top1``, ``zeroshot/<task>/top5`` and ``chance/<task>`` for each task of
    ``sets`` (``{name: (images, labels, classnames, templates)}``), and ``zeroshot/mean_top1``
    over the tasks. ``batch_size`` (a positive int, default 256): images per forward."""
    from .zeroshot import build_zeroshot_classifier, evaluate_zeroshot
    # Checked before the first task's classifier is built, not after.
    batch_size = int_at_least(batch_size, "batch_size")
    out: Dict[str, float] = {}
    for name, (imgs, labels, classes, templates) in sets.items():
        if len(imgs) == 0:
            raise ValueError(f"zero-shot task {name!r} has no images: its accuracy would be undefined")
        clf = build_zeroshot_classifier(model, classes, templates, device=device)   # [D, C]
        r = evaluate_zeroshot(model, imgs, labels, classifier=clf, batch_size=batch_size, device=device)
        out[f"zeroshot/{name}/top1"] = r["top1"]
        out[f"zeroshot/{name}/top5"] = r["top5"]
        out[f"chance/{name}"] = 1.0 / clf.shape[1]   # classes may be a generator, read once above
    return add_mean_top1(out)


def add_mean_top1(metrics: Dict[str, float]) -> Dict[str, float]:
    """``metrics`` with ``zeroshot/mean_top1``, the mean of its tasks' top-1 (when it has any)."""
    tops = [v for k, v in metrics.items() if k.startswith("zeroshot/") and k.endswith("/top1")
            and k != "zeroshot/mean_top1"]
    if tops:
        metrics["zeroshot/mean_top1"] = sum(tops) / len(tops)
    return metrics


@torch.no_grad()
def folder_zeroshot_metrics(model, dataset, name: str, templates, batch_size: int = 256, device=None,
                            workers: int = 0) -> Tuple[Dict[str, float], int]:
    """Zero-shot top-1/top-5 (and chance) of task ``name`` on an ``ImageFolderDataset``, its
    images decoded batch by batch (``workers`` DataLoader processes; only the logits are kept,
    so an ImageNet-sized folder needs no more memory than a batch), and the number of images
    that did not decode. Raises DataError when none decodes. ``batch_size`` (a positive int,
    default 256): images decoded and encoded at a time."""
    from .zeroshot import build_zeroshot_classifier, classification_metrics, zero_shot_classify
    batch_size = int_at_least(batch_size, "batch_size")
    with eval_mode(model):
        clf = build_zeroshot_classifier(model, dataset.classnames, templates, device=device)
        stream = FolderStream(dataset, batch_size, workers)
        logits = [zero_shot_classify(model, b, clf, batch_size, device).float().cpu() for b in stream]
    if not logits:
        from ..datasets.csv_dataset import DataError
        raise DataError(f"zero-shot folder {dataset.root!r}: no image could be decoded ({stream.skipped} tried)")
    r = classification_metrics(torch.cat(logits), stream.all_labels())
    return ({f"zeroshot/{name}/top1": r["top1"], f"zeroshot/{name}/top5": r["top5"],
             f"chance/{name}": 1.0 / len(dataset.classnames)}, stream.skipped)


@torch.no_grad()
def val_metrics(model, batches: Sequence[Tuple[torch.Tensor, ...]], loss: str = "clip",
                device=None, backend: str = "auto") -> Dict[str, float]:
    """On held-out ``(images, tokens)`` or ``(images, tokens, image_ids)`` batches (as
    ``fastclip.train.data.load_val_batches`` makes them): ``val/loss`` (``loss``, "clip" or
    "siglip", within each batch, averaged over samples; for "clip" over the batches of two or
    more rows, since the softmax loss of one pair is exactly 0: NaN when there is none, ``null``
    in the JSON files fastclip writes),
    ``val/n`` (rows), ``val/loss_n`` (the rows ``val/loss`` averages over) and the retrieval
    recalls of ``retrieval_metrics`` over all batches together (``val/image_to_text_R@1`` ...,
    ``val/mean_recall``). Rows with the same ``image_ids`` entry are one image with several
    captions (an image query is right when any of them ranks within K); without ids each row is
    its own image. The model runs in eval mode (its own mode is restored after)."""
    from ..ops.contrastive_loss import fused_loss
    from ..ops.losses import get_loss
    from .retrieval import retrieval_metrics
    names = get_loss(loss).params            # 'clip' of a model with a bias takes its scale alone
    if "logit_bias" in names and getattr(model, "logit_bias", None) is None:
        raise ValueError(f"loss {loss!r}: the model has no logit_bias (it was not trained with a loss "
                         f"that has one); its own loss is 'clip'")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    imgs_f, txts_f, ids, losses, ns = [], [], [], [], []
    with eval_mode(model):
        for batch in batches:
            imgs, toks = batch[0], batch[1]
            i, t, *ps = model(imgs.to(dev), toks.to(dev), normalize=False)
            losses.append(fused_loss(loss, i.float(), t.float(), [p.float() for p in ps[:len(names)]],
                                     normalize=True, backend=backend).item())
            ns.append(len(imgs))
            imgs_f.append(i.float().cpu())
            txts_f.append(t.float().cpu())
            ids.append(batch[2].long().cpu() if len(batch) > 2 and batch[2] is not None else None)
    if not ns:
        raise ValueError("val_metrics: no batches")
    scored = [(v, n) for v, n in zip(losses, ns) if n > 1 or loss != "clip"]
    val_loss = sum(v * n for v, n in scored) / sum(n for _, n in scored) if scored else float("nan")
    out = {"val/loss": val_loss, "val/n": sum(ns), "val/loss_n": sum(n for _, n in scored)}
    img, txt = torch.cat(imgs_f), torch.cat(txts_f)   # [M, D] each: one row per caption
    text_to_image = None
    if all(x is not None for x in ids):
        # One image row per distinct id (its first occurrence); each caption -> its image's row.
        uniq, text_to_image = torch.unique(torch.cat(ids), return_inverse=True)   # [N], [M]
        first = torch.full((len(uniq),), len(text_to_image), dtype=torch.long,
                           device=text_to_image.device)
        first.scatter_reduce_(0, text_to_image,
                              torch.arange(len(text_to_image), device=text_to_image.device),
                              reduce="amin")
        img = img[first]   # [N, D]
    for k, v in retrieval_metrics(img, txt, text_to_image).items():
        out[f"val/{k}"] = v
    return out


def probe_metrics(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                  test_labels: torch.Tensor, seed: int = 0) -> Dict[str, float]:
    """A logistic-regression probe on image embeddings (``encode_images``/``encode_batches``):
    fit on the training features ``[N, D]`` with labels ``[N]`` (the inverse regularisation C
    chosen on a held-out 20%, drawn with ``seed``, then refit on all of them), scored on the
    test features. Fitted with autocast off, whatever the caller's context (a bf16 fit lands
    at chance), in float64 when the features are on the CPU (as ``encode_images`` returns
    them), float32 on a GPU, as ``linear_probe`` does.
    Returns ``probe/top1``, ``probe/C``, ``probe/val_top1`` and ``probe/n_train``,
    ``probe/n_test``."""
    from ._checks import as_features
    from .linear_probe import linear_probe
    # as linear_probe takes them (NumPy arrays included), with the argument named when not
    xtr = as_features(train_features, "train_features").float()
    xte = as_features(test_features, "test_features").float()
    r = linear_probe(xtr, train_labels, xte, test_labels, seed=seed)   # fits with autocast off
    return {"probe/top1": r.accuracy, "probe/C": r.C, "probe/val_top1": r.val_accuracy,
            "probe/n_train": int(xtr.shape[0]), "probe/n_test": int(xte.shape[0])}


def single_pair_val_loss(metrics: Dict[str, float]) -> bool:
    """``val/loss`` is NaN because no val batch had two rows (the softmax loss of one pair is
    0, so none is scored), not because the model diverged: shown as n/a."""
    v = metrics.get("val/loss")
    scored = metrics.get("val/loss_n", 0 if metrics.get("val/n", 2) < 2 else None)   # (rows before the field)
    return isinstance(v, float) and v != v and scored == 0


def _no_val_loss(metrics: Dict[str, float]) -> str:
    n = metrics.get("val/n")
    return (f"n/a ({n} val pair: the softmax loss needs two)" if n == 1 else
            f"n/a ({n} val pairs, no batch of two: the softmax loss needs two)")


def format_metrics(metrics: Dict[str, float], header: Optional[str] = None) -> str:
    """The metrics as aligned ``name value`` lines; fractions as percentages."""
    lines = [header] if header else []
    width = max((len(k) for k in metrics), default=0)
    for k, v in metrics.items():
        if k == "val/loss" and single_pair_val_loss(metrics):
            shown = _no_val_loss(metrics)
        elif isinstance(v, float) and (k.endswith(("top1", "top5")) or "R@" in k or k.endswith("recall")
                                     or k.startswith("chance/")):
            shown = f"{100 * v:.2f}%"
        elif isinstance(v, float):
            shown = f"{v:.6g}"
        else:
            shown = str(v)
        lines.append(f"  {k:<{width}}  {shown}")
    return "\n".join(lines)


__all__ = ["FolderStream", "ZeroShotSet", "add_mean_top1", "check_vocab", "encode_batches", "encode_images",
           "folder_zeroshot_metrics", "format_metrics", "load_model", "probe_metrics", "resolve_model_file",
           "single_pair_val_loss", "val_metrics", "zeroshot_metrics"]

