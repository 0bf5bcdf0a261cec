"""Class-named image folders (``root/<class>/<image>``) for zero-shot evaluation."""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Sequence, Tuple

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
        with open(spec, encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise DataError(f"no class names in {spec!r}")
    return names


class ImageFolderDataset(torch.utils.data.Dataset):
    """``(image [3, S, S], label)`` for every image file under ``root/<class>/``.

    Class ``k`` is the k-th subfolder in sorted order; its name is the folder name with
    underscores as spaces unless ``classnames`` (one per subfolder, same order) is given.
    ``dataset[i]`` is None for an image that fails to decode (``load_tensors`` skips and
    counts those).
    """

    def __init__(self, root: str, transform: Callable, classnames: Optional[Sequence[str]] = None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"zero-shot folder {root!r} is not a directory")
        # Hidden folders (.ipynb_checkpoints, .git) are not classes.
        subdirs = sorted(d for d in os.listdir(root)
                         if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
        if not subdirs:
            raise DataError(f"{root!r} has no class subfolders (expected root/<class>/<image>)")
        if classnames is not None and len(classnames) != len(subdirs):
            raise DataError(f"{len(classnames)} class names given for {len(subdirs)} class folders in {root!r}")
        self.classnames = list(classnames) if classnames is not None else [d.replace("_", " ") for d in subdirs]
        self.samples: List[Tuple[str, int]] = []
        for k, d in enumerate(subdirs):
            for f in sorted(os.listdir(os.path.join(root, d))):
                path = os.path.join(root, d, f)
                # Regular files only: opening a FIFO named x.png would wait for a writer forever.
                if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path):
                    self.samples.append((path, k))
        if not self.samples:
            raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        self.transform = transform
        self.root = root

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[Tuple[torch.Tensor, int]]:
        path, label = self.samples[index]
        img = load_image(path)
        return None if img is None else (self.transform(img), label)

    def check_decodable(self) -> None:
        """Raise DataError unless some image decodes (tried in order, stopping at the first that
        does: one decode for a sound folder)."""
        if not any(load_image(path) is not None for path, _ in self.samples):
            raise DataError(f"no image under {self.root!r} could be decoded ({len(self.samples)} tried)")

    def load_tensors(self) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """All decodable images: ``(images [N, 3, S, S], labels [N], skipped)``."""
        good = [s for s in (self[i] for i in range(len(self))) if s is not None]
        if not good:
            raise DataError(f"no image under {self.root!r} could be decoded")
        return (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]),
                len(self) - len(good))
