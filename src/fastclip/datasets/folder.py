"""Class-named image folders (``root/<class>/.../<image>``) for zero-shot evaluation and linear
probes: the images of a class at any depth below its folder, as torchvision's ``ImageFolder``
reads them, and an error for a class folder without images. ``fastclip train`` and ``fastclip
eval`` read a folder the same way."""
from __future__ import annotations

import os
from collections.abc import KeysView
from collections.abc import Set as AbstractSet
from typing import Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch

from .csv_dataset import DataError, load_image

# The image files every reader takes (folders here and in zero-shot evaluation, webdataset
# members by their extension).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def read_classnames(spec: Optional[str]) -> Optional[List[str]]:
    """``--zeroshot-classes``: None, a path to a file with one class name per line, or a
    comma-separated list."""
    if spec is None:
        return None
    if os.path.isfile(spec):
        try:
            with open(spec, encoding="utf-8") as f:
                names = [line.strip() for line in f if line.strip()]
        except OSError as e:        # unreadable: one line naming it, as for every input file
            raise DataError(f"cannot read the class names file {spec!r} ({e.strerror or type(e).__name__})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"the class names file {spec!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise DataError(f"no class names in {spec!r}")
    dup = _same_prompts(names)
    if dup:     # two classes with one name get the same prompts: neither can be told apart
        raise DataError(f"class names repeat in {spec!r} (the tokenizer lower-cases them and collapses "
                        f"spaces): {'; '.join(' = '.join(repr(n) for n in g) for g in dup[:5])}")
    return names


def class_name_list(classnames: Iterable[str], name: str = "classnames") -> List[str]:
    """``classnames`` read once into a list of str, in order; TypeError naming ``name`` for a
    single string (its letters were taken for the class names), a set (its order changes between
    Python processes: column k must be class k; a dict's keys keep theirs and are taken), a
    non-iterable or a name that is not a str."""
    if isinstance(classnames, (str, bytes)):
        raise TypeError(f"{name} must be a sequence of class names, got a single string {classnames!r}")
    if isinstance(classnames, AbstractSet) and not isinstance(classnames, KeysView):
        raise TypeError(f"{name} must be an ordered sequence (a list or tuple: column k of the "
                        f"classifier is class k), got a {type(classnames).__name__}, whose order "
                        f"changes between Python processes")
    try:
        names = list(classnames)    # a generator has no len() and can be read only once
    except TypeError:
        raise TypeError(f"{name} must be an iterable of class names (str), got a "
                        f"{type(classnames).__name__}") from None
    for k, c in enumerate(names):
        if not isinstance(c, str):
            raise TypeError(f"{name} must be strings, got {type(c).__name__} {c!r} at position {k}")
    return names


def _same_prompts(names: Sequence[str], labels: Optional[Sequence[str]] = None) -> List[List[str]]:
    """Groups of ``names`` (shown as their ``labels``, default the names) that give the same
    prompts (equal once lower-cased with their whitespace collapsed, as the tokenizer reads them):
    their classifier columns are equal, so neither class can be told from the other."""
    groups: dict = {}
    for n, shown in zip(names, labels if labels is not None else names):
        groups.setdefault(" ".join(n.lower().split()), []).append(shown)
    return [g for g in groups.values() if len(g) > 1]


class ClassFolders(NamedTuple):
    """What ``scan_class_folders`` found under a root."""
    root: str
    folders: List[str]                  # the class folders' names, sorted: class k is folders[k]
    classnames: List[str]               # one per folder
    samples: List[Tuple[str, int]]      # (image path, class index), by class, then by path


# Folders an archiver leaves beside the data: macOS's zip puts resource forks ("._x.jpg", no
# image) in __MACOSX/, which became a class "  MACOSX" that no image could ever be right for.
_NOT_DATA = {"__MACOSX"}


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _NOT_DATA


def class_subfolders(root: str) -> List[str]:
    """The class folders of ``root``, sorted. Hidden folders (``.ipynb_checkpoints``, ``.git``)
    and macOS's ``__MACOSX`` are not classes."""
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not _hidden(d))


def _images_below(folder: str) -> List[str]:
    """The image files at any depth below ``folder``, sorted by their path relative to it (the
    same order on every machine: the probe's validation split is drawn over it). Regular files
    only: opening a FIFO named x.png would wait for a writer forever. Hidden sub-folders and
    files (macOS's "._x.jpg" resource forks) are skipped, as hidden class folders are; a linked
    folder is followed once (a link back to a folder above would otherwise be walked without
    end)."""
    found, seen = [], set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if not _hidden(d)]
        found += [os.path.join(top, f) for f in files if not f.startswith(".")
                  and f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(top, f))]
    return sorted(found, key=lambda p: os.path.relpath(p, folder).split(os.sep))


def scan_class_folders(root: str, classnames: Optional[Sequence[str]] = None,
                       what: Optional[str] = None, distinct_names: bool = True) -> ClassFolders:
    """The classes and images of ``root/<class>/``: class ``k`` is the k-th folder in sorted
    order (Python's: by code point, capitals first), named by ``classnames[k]`` when given, else
    by its folder name with underscores as spaces; its images are every image file at any depth
    below its folder. ``classnames`` that are the folders' own names (or those with spaces for
    underscores) in another order are matched to their folders by name.

    Raises DataError, naming ``what`` (default: the root's path), when ``root`` has fewer than
    two class folders, when ``classnames`` does not name each of them, or when a class folder holds no
    image file (the class would count towards chance, and no image could ever be right for it;
    torchvision's ImageFolder refuses it too); with ``distinct_names`` (for zero-shot
    classification, whose prompts are made of the names; a linear probe uses none), also when
    two classes have one name once lower-cased with spaces collapsed.
    """
    what = what or repr(root)
    if classnames is not None:
        classnames = class_name_list(classnames)
    if not os.path.isdir(root):
        raise DataError(f"{what}: not a directory")
    folders = class_subfolders(root)
    if not folders:
        raise DataError(f"{what} has no class folders (expected {os.path.join(root, '<class>', '<image>')})")
    if len(folders) < 2:
        # One class: every image is right whatever the model (zero-shot top-1 and a probe at 100%).
        raise DataError(f"{what} has one class folder ({folders[0]!r}): zero-shot classification and "
                        f"a linear probe need at least 2 classes")
    if classnames is not None and len(classnames) != len(folders):
        raise DataError(f"{len(classnames)} class names given for the {len(folders)} class folders of {what}")
    if classnames is not None and classnames != folders:
        # The folders' own names in another order (`ls` order, a hand-typed list) named every
        # folder by another's name: each class scored 0% with nothing said. Matched by name.
        by_name = {}
        for d in folders:
            by_name.setdefault(d, d)
            by_name.setdefault(d.replace("_", " "), d)
        if sorted(by_name.get(c, "") for c in classnames) == folders:
            given = {by_name[c]: c for c in classnames}
            classnames = [given[d] for d in folders]
    samples, empty = [], []
    for k, d in enumerate(folders):
        images = _images_below(os.path.join(root, d))
        if not images:
            empty.append(d)
        samples += [(p, k) for p in images]
    if empty:
        raise DataError(f"{what}: class folder(s) with no image file ({', '.join(IMAGE_EXTENSIONS)}) in them: "
                        f"{', '.join(repr(os.path.join(root, d)) for d in empty)}; remove them or add their "
                        f"images (a class without images counts towards chance and can never be right)")
    names = list(classnames) if classnames is not None else [d.replace("_", " ") for d in folders]
    dup = _same_prompts(names, names if classnames is not None else folders) if distinct_names else []
    if dup:
        if classnames is not None:
            raise DataError(f"{what}: class names that are one name to the tokenizer (it lower-cases them and "
                            f"collapses spaces): {'; '.join(' = '.join(repr(n) for n in g) for g in dup[:5])}")
        raise DataError(f"{what}: class folders that give one class name (the tokenizer lower-cases names and "
                        f"collapses spaces; underscores are spaces): "
                        f"{'; '.join(' = '.join(repr(d) for d in g) for g in dup[:5])}; merge or rename them "
                        f"(their prompts are the same: neither could be told from the other)")
    return ClassFolders(root, folders, names, samples)


def undecodable_classes(samples: Sequence[Tuple[str, int]], num_classes: int) -> List[int]:
    """The classes of ``samples`` (``(path, class)``) none of whose images decode, each class's
    files tried in order up to the first that does."""
    alive = set()
    for path, k in samples:
        if k not in alive and load_image(path) is not None:
            alive.add(k)
    return [k for k in range(num_classes) if k not in alive]


class ImageFolderDataset(torch.utils.data.Dataset):
    """``(image [3, S, S], label)`` for every image file at any depth under ``root/<class>/``
    (:func:`scan_class_folders`).

    Class ``k`` is the k-th subfolder in sorted order; its name is the folder name with
    underscores as spaces unless ``classnames`` (one per subfolder, same order) is given.
    ``distinct_names`` (default True: zero-shot prompts are made of the names): refuse classes
    whose names are one to the tokenizer (False for a linear probe, which uses none).
    ``dataset[i]`` is None for an image that fails to decode (``load_tensors`` skips and
    counts those).
    """

    def __init__(self, root: str, transform: Callable, classnames: Optional[Sequence[str]] = None,
                 distinct_names: bool = True):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"zero-shot folder {root!r} is not a directory")
        self._take(scan_class_folders(root, classnames, distinct_names=distinct_names), transform)

    @classmethod
    def from_scan(cls, scan: ClassFolders, transform: Callable) -> "ImageFolderDataset":
        """The dataset of a folder already scanned (``fastclip eval`` scans before it loads the
        model, to refuse a bad folder at once)."""
        ds = cls.__new__(cls)
        ds._take(scan, transform)
        return ds

    def _take(self, scan: ClassFolders, transform: Callable) -> None:
        self.root = scan.root
        self.classnames = list(scan.classnames)
        self.samples: List[Tuple[str, int]] = list(scan.samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        path, label = self.samples[index]
        img = load_image(path)
        return None if img is None else (self.transform(img), label)

    def check_decodable(self, what: Optional[str] = None) -> None:
        """Raise DataError, naming ``what`` (default: the root's path), unless an image of every
        class decodes (each class's files tried in order, stopping at the first that does: one
        decode per class for a sound folder). A class none of whose files decode counts towards
        chance and can never be right, as a class folder without image files."""
        what = what or repr(self.root)
        dead = undecodable_classes(self.samples, len(self.classnames))
        if len(dead) == len(self.classnames):
            raise DataError(f"{what}: no image could be decoded ({len(self.samples)} tried)")
        if dead:
            names = ", ".join(repr(self.classnames[k]) for k in dead[:5]) + (", ..." if len(dead) > 5 else "")
            raise DataError(f"{what}: no image of class(es) {names} could be decoded; remove their folders "
                            f"or fix their images (such a class counts towards chance and can never be right)")

    def load_tensors(self) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """All decodable images: ``(images [N, 3, S, S], labels [N], skipped)``."""
        good = [s for s in (self[i] for i in range(len(self))) if s is not None]
        if not good:
            raise DataError(f"no image under {self.root!r} could be decoded")
        return (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]),
                len(self) - len(good))
