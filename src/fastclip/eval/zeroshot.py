"""Zero-shot classification with a prompt ensemble (CLIP paper, section 3.1.4)."""
from __future__ import annotations

import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from ..datasets.csv_dataset import DataError
from ..datasets.folder import IMAGE_EXTENSIONS, class_name_list
from ..tokenizer import tokenize
from ._checks import as_features, as_images, class_indices, eval_mode, fp32_math, int_at_least, unit_rows
from .templates import SIMPLE_TEMPLATES

Template = Union[str, Callable[[str], str]]


def _device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_template(t) -> None:
    if callable(t):
        return
    if not isinstance(t, str):
        raise TypeError(f"templates must be format strings or callables, got {type(t).__name__} {t!r}")
    # Letters only: a conversion (``{!r}``, ``{!a}``) quotes the name but keeps them as they are.
    marker = "fastclipCLASSNAMEmarker"
    try:
        placed = marker in t.format(marker)
    except (IndexError, KeyError, ValueError, AttributeError, TypeError) as e:   # "{0.foo}": AttributeError
        raise ValueError(f"template {t!r} is not a format string with one {{}} for the class name: {e}") from None
    if not placed:
        raise ValueError(f"template {t!r} has no {{}} for the class name: every class would get the same prompt")


def _as_classifier(classifier) -> torch.Tensor:
    """``classifier`` as a floating tensor ``[D, C]``; ValueError naming it otherwise."""
    clf = as_features(classifier, "classifier")
    if clf.dim() != 2 or not clf.is_floating_point():
        raise ValueError(f"classifier must be a float tensor [embed_dim, num_classes] (as "
                         f"build_zeroshot_classifier returns), got {clf.dtype} of shape {tuple(clf.shape)}")
    return clf


def _check_classifier_dim(clf: torch.Tensor, d: int) -> None:
    """The classifier's rows must be the image embedding's ``d`` dimensions: a [C, D] one would
    otherwise fail inside the matmul with a message that names neither."""
    if clf.shape[0] != d:
        hint = " (it looks transposed: [num_classes, embed_dim]; pass classifier.t())" if clf.shape[1] == d else ""
        raise ValueError(f"classifier must be [embed_dim={d}, num_classes] to match the model's image "
                         f"features, got shape {tuple(clf.shape)}{hint}")


@torch.no_grad()
def build_zeroshot_classifier(model, classnames: Iterable[str], templates: Sequence[Template],
                              tokenizer: Callable = tokenize, device=None, batch_size: int = 256) -> torch.Tensor:
    """Zero-shot weights FloatTensor ``[embed_dim, num_classes]`` (fp32, on ``device``).

    ``classnames``: any ordered iterable of str (a list, tuple or generator, read once; column k
    is its k-th name; a dict's keys in their order; a set is refused, its order changes between
    processes). ``templates``: an
    iterable of format strings with one ``{}`` or callables ``name -> prompt``. ``batch_size``
    (a positive int, default 256): prompts per ``encode_text`` call.

    Each class's prompts (``template.format(name)`` or ``template(name)``) are encoded with
    ``model.encode_text``, each L2-normalised, averaged, and the mean renormalised.
    ``tokenizer(texts, context_length=...)`` defaults to ``fastclip.tokenizer.tokenize``, with
    prompts longer than the model's context cut to fit (as open_clip's tokenizer does; the
    end-of-text token is kept). A string template must place the class name (``{}``): one
    without it gives every class the same embedding.
    """
    classnames = class_name_list(classnames)
    if isinstance(templates, (str, bytes)):
        raise TypeError(f"templates must be a sequence of templates, got a single string {templates!r} "
                        f"(pass [{templates!r}])")
    try:
        templates = list(templates)
    except TypeError:
        raise TypeError(f"templates must be an iterable of format strings or callables, got a "
                        f"{type(templates).__name__}") from None
    if len(classnames) == 0:
        raise ValueError("classnames must not be empty")
    if len(templates) == 0:
        raise ValueError("templates must not be empty")
    for t in templates:
        _check_template(t)
    batch_size = int_at_least(batch_size, "batch_size")
    dev = _device(model, device)
    prompts = [t(c) if callable(t) else t.format(c) for c in classnames for t in templates]  # class-major
    for k, p in enumerate(prompts):
        if not isinstance(p, str):
            # (the tokenizer named only a position in one of its batches)
            t, c = templates[k % len(templates)], classnames[k // len(templates)]
            raise TypeError(f"template {t!r} gave a {type(p).__name__} ({p!r}) for class {c!r}, not a str prompt")
    ctx = getattr(model, "context_length", 77)
    ids = []                                             # [b, L] token ids per batch
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        ids.append(tokenize(batch, context_length=ctx, truncate=True) if tokenizer is tokenize
                   else tokenizer(batch, context_length=ctx))
    ids = [torch.as_tensor(t) for t in ids]
    _refuse_same_prompts(classnames, prompts, torch.cat([t.cpu() for t in ids]), len(templates), ctx)
    feats = []
    with eval_mode(model):
        for tokens in ids:
            feats.append(unit_rows(model.encode_text(tokens.to(dev)).float()))
    feats = torch.cat(feats).view(len(classnames), len(templates), -1)  # [C, T, D]
    return unit_rows(feats.mean(dim=1)).t().contiguous()  # [D, C]


def _refuse_same_prompts(classnames: List[str], prompts: List[str], ids: torch.Tensor, per_class: int,
                         ctx: int) -> None:
    """ValueError when two classes' prompts are the same token ids ``ids`` ``[C * T, L]``
    (class-major): their columns would be equal, and argmax (ties to the lower index) gives
    every image of the second to the first, silently at 0% recall. Names equal but for case
    (the tokenizer lower-cases) or prompts cut to ``ctx`` tokens before the name do that."""
    seen: Dict[bytes, int] = {}
    for c in range(len(classnames)):
        key = ids[c * per_class:(c + 1) * per_class].numpy().tobytes()
        first = seen.setdefault(key, c)
        if first != c:
            a, b = classnames[first], classnames[c]
            if a == b:
                why = "the same name"
            elif prompts[first * per_class:(first + 1) * per_class] == prompts[c * per_class:(c + 1) * per_class]:
                why = "the templates give both the same text: each template must use the class name"
            else:
                why = ("the tokenizer lower-cases text and cleans its whitespace, and cuts prompts to the "
                       f"model's context_length {ctx} tokens")
            raise ValueError(f"classnames {first} {a!r} and {c} {b!r} give the same prompts after "
                             f"tokenisation ({why}; e.g. {prompts[c * per_class]!r}): their classifier "
                             f"columns would be equal and class {c} could never be predicted")


@torch.no_grad()
def zero_shot_classify(model, images: torch.Tensor, classifier: torch.Tensor, batch_size: int = 256,
                       device=None) -> torch.Tensor:
    """Logits FloatTensor ``[N, num_classes]`` = ``100 * normalise(encode_image(images)) @ classifier``
    for preprocessed ``images`` ``[N, 3, H, W]`` and ``classifier`` ``[embed_dim, num_classes]``
    (from ``build_zeroshot_classifier``; ValueError when its first dimension is not the image
    features'), in batches of ``batch_size`` images (a positive int, default 256). The encoder
    runs in the caller's precision (autocast included), in eval mode (the model's own mode is
    restored after); the similarity in float32."""
    images = as_images(images, "images")
    classifier = _as_classifier(classifier)
    batch_size = int_at_least(batch_size, "batch_size")
    dev = _device(model, device)
    out = []
    with eval_mode(model):
        for i in range(0, images.shape[0], batch_size):
            emb = model.encode_image(images[i:i + batch_size].to(dev))  # [b, D]
            _check_classifier_dim(classifier, emb.shape[-1])
            with fp32_math():
                f = unit_rows(emb.float())
                out.append(100.0 * f @ classifier.to(dev, torch.float32))
    return torch.cat(out) if out else torch.zeros(0, classifier.shape[1])


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """top1, top5 (top-min(5, C)) accuracy and mean per-class recall (over classes present) of
    ``logits`` ``[N, C]`` against ``labels`` ``[N]`` (integer class indices in ``[0, C)``, N >= 1:
    ValueError for no predictions, whose accuracy is undefined rather than 0). Classes are
    ranked by logit, ties broken by class index (the first of equal logits ranks first, as
    ``argmax`` and ``classify_folder``'s predictions pick it). A row with a NaN or +inf logit
    (a diverged model), or whose label's logit is -inf, is a miss, at top-1 and top-5 alike;
    -inf elsewhere masks a class out (it ranks last), as in scoring a subset of a label
    space. ``logits`` may be
    a NumPy array or nested lists, as the features of the other evaluation functions."""
    logits = as_features(logits, "logits")
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, C], got shape {tuple(logits.shape)}")
    labels = class_indices(labels, "labels", logits.shape[1], logits.device)
    if logits.shape[0] != labels.shape[0]:
        raise ValueError(f"labels has {labels.shape[0]} entries for {logits.shape[0]} predictions")
    n, c = logits.shape
    if n == 0:
        # (it read top-1 0.0: a model that is always wrong, folded into means of tasks)
        raise ValueError("no predictions to score (logits [0, C]): accuracy over no images is undefined")
    # -inf is the usual mask of classes outside a task (it read every masked row as a miss).
    ok = ~(torch.isnan(logits) | torch.isposinf(logits)).any(dim=1)  # [N]
    ok &= torch.isfinite(logits.gather(1, labels[:, None]))[:, 0]   # [N]
    # The label's rank: classes with a higher logit, plus equal ones of a lower index. (topk's
    # order among equal logits is unspecified: on CPU it picked the last of a tie in some rows
    # and the first in others, so a collapsed model's score depended on it; a stable full sort
    # fixed that at ~3 copies of the logits (231 MB for 20000 x 1000) and 0.63 s on 2 threads,
    # against 0.07 s and one row block at a time here.)
    rank = torch.empty(n, dtype=torch.long, device=logits.device)  # [N]
    idx = torch.arange(c, device=logits.device)  # [C]
    rows = max(1, (1 << 22) // max(1, c))        # ~4M logits per block
    for i in range(0, n, rows):
        blk, lab = logits[i:i + rows], labels[i:i + rows]  # [R, C], [R]
        own = blk.gather(1, lab[:, None])                  # [R, 1]
        rank[i:i + rows] = ((blk > own) | ((blk == own) & (idx[None, :] < lab[:, None]))).sum(dim=1)
    hit1 = (rank == 0) & ok
    hit5 = (rank < min(5, c)) & ok
    counts = torch.bincount(labels, minlength=c)                               # [C]
    hits = torch.bincount(labels, weights=hit1.double(), minlength=c)         # [C]
    present = counts > 0
    recalls = hits[present] / counts[present]
    return {"top1": hit1.float().mean().item(), "top5": hit5.float().mean().item(),
            "mean_per_class_recall": recalls.mean().item(), "n": n}


@torch.no_grad()
def evaluate_zeroshot(model, images_or_loader: Union[torch.Tensor, Iterable[Tuple[torch.Tensor, torch.Tensor]]],
                      labels: Optional[torch.Tensor] = None, classifier: Optional[torch.Tensor] = None,
                      batch_size: int = 256, device=None) -> Dict[str, float]:
    """Zero-shot accuracy of ``model`` with ``classifier`` (from ``build_zeroshot_classifier``).

    ``images_or_loader``: a FloatTensor ``[N, 3, H, W]`` (or NumPy array) with ``labels``
    LongTensor ``[N]``, or an iterable of ``(images, labels)`` batches (with ``labels`` left
    None: a ValueError otherwise; each batch as many labels as images); labels are
    integer class indices (a tensor, list or NumPy array), never class names. ``classifier``:
    ``[embed_dim, num_classes]``; ``batch_size``: images per forward (a positive int, default
    256). Returns a dict with ``top1``, ``top5``, ``mean_per_class_recall`` (fractions in [0, 1]) and ``n``.
    """
    if classifier is None:
        raise ValueError("classifier is required (see build_zeroshot_classifier)")
    # Checked before any image is encoded: a bad argument should not cost a pass over the data.
    classifier = _as_classifier(classifier)
    batch_size = int_at_least(batch_size, "batch_size")
    if type(images_or_loader).__module__ == "numpy" and hasattr(images_or_loader, "shape"):
        images_or_loader = torch.as_tensor(images_or_loader)   # an array of images, not batches
    elif not isinstance(images_or_loader, torch.Tensor) and labels is not None:
        raise ValueError("labels is for a tensor of images; the batches of images_or_loader (a "
                         f"{type(images_or_loader).__name__}) carry their own (images, labels)")
    with eval_mode(model):
        if isinstance(images_or_loader, torch.Tensor):
            if labels is None:
                raise ValueError("labels is required when images_or_loader is a tensor")
            labels = class_indices(labels, "labels")
            if labels.shape[0] != images_or_loader.shape[0]:
                raise ValueError(f"labels has {labels.shape[0]} entries for {images_or_loader.shape[0]} images")
            if images_or_loader.shape[0] == 0:
                raise ValueError("images_or_loader holds no images: accuracy over no images is undefined")
            logits = zero_shot_classify(model, images_or_loader, classifier, batch_size, device)
        else:
            chunks, labs = [], []
            try:
                batches = iter(images_or_loader)
            except TypeError:
                raise TypeError("images_or_loader must be a tensor [N, 3, H, W] or an iterable of "
                                f"(images, labels) batches, got {type(images_or_loader).__name__}") from None
            for k, pair in enumerate(batches):
                if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                    what = f"{len(pair)} items" if isinstance(pair, (tuple, list)) else type(pair).__name__
                    raise ValueError(f"batch {k} of images_or_loader must be a pair (images, labels), got {what}")
                imgs, lab = as_images(pair[0], f"the images of batch {k} of images_or_loader"), pair[1]
                lab = class_indices(lab, f"the labels of batch {k} of images_or_loader").cpu()
                if lab.shape[0] != imgs.shape[0]:
                    # (counts that differ batch by batch but sum up equal scored labels against
                    # other batches' images, silently)
                    raise ValueError(f"batch {k} of images_or_loader has {lab.shape[0]} labels for "
                                     f"{imgs.shape[0]} images")
                labs.append(lab)
                chunks.append(zero_shot_classify(model, imgs, classifier, batch_size, device).cpu())
            if not chunks or sum(c.shape[0] for c in chunks) == 0:
                raise ValueError("images_or_loader gave no images: accuracy over no images is undefined")
            logits, labels = torch.cat(chunks), torch.cat(labs)
        return classification_metrics(logits.cpu(), labels.cpu())


def _scan_folder(folder: str, classnames: Optional[Sequence[str]]) -> Tuple[List[str], Optional[List[int]], List[str]]:
    from ..datasets.folder import class_subfolders, scan_class_folders
    if classnames is not None:      # the checks of build_zeroshot_classifier ("dog" was split into letters)
        classnames = class_name_list(classnames)
    if class_subfolders(folder):
        try:
            scan = scan_class_folders(folder, classnames)
        except DataError as e:
            raise ValueError(str(e)) from None
        return [p for p, _ in scan.samples], [k for _, k in scan.samples], scan.classnames
    if classnames is None:
        raise ValueError(f"classnames is required: {folder} has no class-named subfolders")
    # Regular image files only (a FIFO named x.png would block the read for ever).
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder))
            if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(folder, f))], None, \
        list(classnames)


@torch.no_grad()
def classify_folder(model, folder: str, classnames: Optional[Sequence[str]] = None,
                    templates: Sequence[Template] = SIMPLE_TEMPLATES, image_size: Optional[int] = None,
                    batch_size: int = 64, device=None) -> Dict[str, object]:
    """Zero-shot classify every image file in ``folder``.

    With class-named subfolders (``folder/<class>/<img>``, images at any depth below a class's
    folder) these give the labels and, unless ``classnames`` is passed, the class names
    (underscores -> spaces), and a class folder without images is a ValueError; otherwise the
    images directly in ``folder`` are classified among ``classnames``. ``image_size`` defaults to
    ``model.image_size`` (the one size a fastclip model takes: another is a ValueError; it is
    for models without that attribute). Returns ``{"classnames", "predictions": [(path, class, prob), ...],
    "skipped": [paths of files that did not decode]}`` plus
    ``top1``/``top5``/``mean_per_class_recall``/``n`` when labels are known. Hidden subfolders
    (a leading ".") are not classes. ``batch_size`` (a positive int, default 64): images decoded
    and encoded at a time.
    """
    from ..datasets.csv_dataset import load_image
    from ..transforms import image_transform
    batch_size = int_at_least(batch_size, "batch_size")
    if image_size is not None:
        image_size = int_at_least(image_size, "image_size")
        own = getattr(model, "image_size", None)
        if own is not None and image_size != own:
            # (the encoders' position embeddings are of one size: the error came from the first batch)
            raise ValueError(f"image_size {image_size}: the model takes {own} px images (leave "
                             f"image_size None for the model's own)")
    if not os.path.isdir(folder):
        raise ValueError(f"folder {folder!r} is not a directory")
    paths, labels, names = _scan_folder(folder, classnames)
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    with eval_mode(model):
        clf = build_zeroshot_classifier(model, names, templates, device=device)
        tf = image_transform(image_size or model.image_size)
        # Files that do not decode are skipped and listed (as the trainer skips them). Decoded
        # and encoded batch_size images at a time: holding every image first took ~30 GB for
        # ImageNet's 50,000 validation images at 224 px.
        keep, skipped, batch, parts = [], [], [], []     # parts: [b, C] logits per batch

        def flush():
            parts.append(zero_shot_classify(model, torch.stack(batch), clf, batch_size, device).cpu())
            batch.clear()

        for k, p in enumerate(paths):
            im = load_image(p)
            if im is None:
                skipped.append(p)
                continue
            keep.append(k)
            batch.append(tf(im))                          # [3, S, S]
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
        if not keep:
            raise ValueError(f"no image in {folder} could be decoded ({len(skipped)} file(s) tried)")
        paths = [paths[k] for k in keep]
        labels = None if labels is None else [labels[k] for k in keep]
        logits = torch.cat(parts)                         # [N, C]
    probs = logits.softmax(dim=-1)
    conf, pred = probs.max(dim=-1)
    out: Dict[str, object] = {"classnames": names,
                              "predictions": [(p, names[k], c) for p, k, c in zip(paths, pred.tolist(), conf.tolist())],
                              "skipped": skipped}
    if labels is not None:
        out.update(classification_metrics(logits, torch.tensor(labels)))
    return out
