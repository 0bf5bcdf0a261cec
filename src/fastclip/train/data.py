"""The trainer's data: the step-indexed batch sampler, the training data of each dataset type
(shapes, CSV, webdataset shards), the batch iterator of a run, and the validation batches.

Data order. For map-style data (shapes, CSV) the global batch of step ``s`` is a slice of
``randperm(len, seed, epoch)`` with ``epoch = s // steps_per_epoch`` (the shapes dataset,
random by construction, is read in index order), and rank ``r`` takes its ``r``-th sub-slice;
random augmentation is seeded per (seed, epoch, index). The data position is therefore the step,
which is what makes a resumed run continue exactly (``fastclip.train.checkpoint``).

A batch in which no sample loads (missing or corrupt images) is skipped by the trainer, which
then draws the next one: the data position is then the number of batches drawn, which runs
ahead of the step. It is saved in the checkpoint, so a resumed run draws the same batches.
"""
from __future__ import annotations

import hashlib
import itertools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..eval.evaluate import ZeroShotSet  # (images, labels, classnames, templates)
from .config import TrainConfig
from .dist_env import DistEnv, sum_over_ranks


class StepBatches:
    """Map-style batches as a function of the step (see the module docstring).

    Yields lists of dataset keys for batch positions ``start_step, start_step + 1, ...``: ints,
    or ``(index, aug_seed)`` when ``augment`` (the dataset seeds its random transform with it).
    Batch ``b`` is that of step ``b`` in a run that skipped no batch. The iteration does not end
    at ``total_steps`` (``len()``: the planned steps): the trainer draws one more batch for each
    batch it had to skip.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int, seed: int, start_step: int,
                 total_steps: int, augment: bool = False, shuffle: bool = True):
        self.global_batch = batch_size * world_size
        if n < self.global_batch:
            from ..datasets.csv_dataset import DataError
            raise DataError(f"the dataset has {n} samples, fewer than one global batch "
                             f"({batch_size} per rank x {world_size} ranks)")
        self.n, self.batch_size, self.rank, self.seed = n, batch_size, rank, seed
        self.start_step, self.total_steps, self.augment, self.shuffle = start_step, total_steps, augment, shuffle
        self.steps_per_epoch = n // self.global_batch
        self._perm_epoch, self._perm = -1, None

    def keys(self, step: int) -> List:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            from ..datasets.csv_dataset import seeded_generator
            g = seeded_generator(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
            self._perm, self._perm_epoch = perm, epoch
        lo = b * self.global_batch + self.rank * self.batch_size
        idx = self._perm[lo:lo + self.batch_size].tolist()
        if self.augment:
            return [(i, (self.seed * 1_000_003 + epoch) * 10_000_019 + i) for i in idx]
        return idx

    def __iter__(self) -> Iterator[List]:
        for s in itertools.count(self.start_step):
            yield self.keys(s)

    def __len__(self) -> int:
        return self.total_steps - self.start_step


def trim_padding(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the trailing columns that are padding (0) in every row of ``tokens`` [B, L].

    Exact for CLIP's causal text encoder: the EOT feature only attends to earlier positions.
    The demo's captions are 8-20 tokens in a context of 32, so this saves ~40% of the text
    encoder's work.
    """
    nonzero = (tokens != 0).any(dim=0)  # [L]
    if not bool(nonzero.any()):
        return tokens
    last = int(nonzero.nonzero().max()) + 1
    return tokens[:, :last]


def collate_pairs(samples):
    """``(images, tokens, n_skipped)`` from a list of samples, ``None`` for a failed one."""
    from ..datasets.csv_dataset import collate_skipping
    return collate_skipping(samples)


def detect_dataset_type(path: Optional[str], dataset_type: str = "auto",
                        flag: str = "--train-data/--val-data") -> str:
    """``auto``: no path -> shapes; ``.csv``/``.tsv`` -> csv; ``.tar`` in the spec -> webdataset.
    ``flag``: the option the error names."""
    if dataset_type != "auto":
        return dataset_type
    if path is None:
        return "shapes"
    low = path.lower()
    if low.endswith((".csv", ".tsv")):
        return "csv"
    if ".tar" in low:
        return "webdataset"
    what = " (a folder)" if os.path.isdir(path) else ""
    raise ValueError(f"cannot tell the type of {flag} {path!r}{what} (expected a .csv/.tsv file "
                     f"or .tar shards); pass --dataset-type csv|webdataset")


def detect_val_type(path: str, dataset_type: str = "auto") -> str:
    """``--val-data``'s type: from its own name when it tells (``.csv``/``.tsv``, ``.tar``), so that
    a CSV validation file may go with shards for training and the other way round; else
    ``--dataset-type`` (csv or webdataset)."""
    try:
        return detect_dataset_type(path, "auto", "--val-data")
    except ValueError:
        if dataset_type in ("csv", "webdataset"):
            return dataset_type
        raise


def image_transform_for(model, train: bool):
    """CLIP's preprocessing at the model's resolution (random resized crop when ``train``)."""
    from ..transforms import image_transform
    return image_transform(model.image_size, train=train)


@dataclass
class TrainData:
    """What a run trains on.

    ``dataset``: a map-style dataset read through ``StepBatches`` (None for streamed shards);
    ``augment``: pass per-sample augmentation seeds; ``shuffle``: permute indices each epoch
    (False for a dataset that is random by construction); ``steps_per_epoch``: None when
    unknown (shards without ``train_num_samples``); ``desc``: for the run's first line;
    ``notes``: lines to log at start (e.g. CSV rows that were not valid UTF-8).
    """

    dataset: Optional[torch.utils.data.Dataset]
    augment: bool
    shuffle: bool
    steps_per_epoch: Optional[int]
    desc: str
    notes: List[str] = field(default_factory=list)


def _csv_dataset(flag: str, path: str, cfg: TrainConfig, transform, context_length: int):
    """``CsvDataset`` of ``path``, its faults naming ``flag`` and the column flags (the
    dataset's own words name its Python arguments: "column 'filepath' (img_key) not found")."""
    from ..datasets.csv_dataset import CsvDataset, DataError
    try:
        return CsvDataset(path, transform, cfg.csv_img_key, cfg.csv_caption_key, cfg.csv_separator, context_length)
    except DataError as e:
        why = str(e).replace("(img_key)", "(--csv-img-key)").replace("(caption_key)", "(--csv-caption-key)")
        raise DataError(f"{flag} {why}") from None


def build_train_data(cfg: TrainConfig, data_type: str, model, env: DistEnv) -> TrainData:
    """The training data of ``cfg`` for ``model`` (its resolution and context length).

    Raises ``DataError`` naming the data when it cannot make one global batch."""
    from ..datasets.csv_dataset import DataError
    global_batch = cfg.batch_size * env.world_size
    if data_type == "webdataset":
        if cfg.steps is None and cfg.train_num_samples is None:
            raise DataError(f"webdataset {cfg.train_data}: shards are streamed, their length is unknown: "
                            f"pass --steps or --train-num-samples")
        from ..datasets.webdataset import expand_urls
        n = cfg.train_num_samples
        if n and n < global_batch:
            # As map-style data below: an epoch shorter than one global batch would repeat samples
            # within a batch (a sample is its own negative).
            raise DataError(f"webdataset {cfg.train_data}: --train-num-samples {n} is less than one global "
                            f"batch ({global_batch})")
        shards = expand_urls(cfg.train_data)
        data = TrainData(None, True, True, max(1, n // global_batch) if n else None,
                         f"webdataset {cfg.train_data} ({len(shards)} shard{'s' if len(shards) != 1 else ''})")
        note = _missing_shards_note(cfg.train_data, shards, "training on the others")
        if note:
            data.notes.append(note)
        return data
    if data_type == "shapes":
        from ..datasets.shapes import BLOCK
        from .demo import shapes_train_data
        data = shapes_train_data(cfg, model)
        if cfg.demo_design == "distinct" and BLOCK % global_batch:
            # A global batch is consecutive indices: inside one block of BLOCK distinct pairs
            # only where it divides BLOCK (--batch-size 100 was taken without a word).
            data.notes.append(f"a global batch of {global_batch} does not divide the demo's blocks of {BLOCK} "
                              f"distinct (colour, shape) pairs: some batches hold a pair twice, captions "
                              f"the loss takes for negatives (batch {BLOCK}, or a divisor of it, holds none)")
    elif data_type == "csv":
        ds = _csv_dataset("--train-data", cfg.train_data, cfg, image_transform_for(model, True), model.context_length)
        data = TrainData(ds, True, True, None, f"CSV {cfg.train_data} ({len(ds)} rows)", ds.notes())
    else:
        raise ValueError(f"unknown dataset type {data_type!r}; expected shapes, csv or webdataset")
    data.steps_per_epoch = len(data.dataset) // global_batch
    if data.steps_per_epoch == 0:
        raise DataError(f"{data.desc}: {len(data.dataset)} samples is less than one global batch "
                         f"({global_batch})")
    left = len(data.dataset) % global_batch
    if data_type == "csv" and left and cfg.steps is None:
        # Full batches only (as open_clip's drop_last), each epoch a new shuffle: the rows left
        # out change from epoch to epoch; said, so that a small dataset's loss is no surprise.
        data.notes.append(f"each epoch trains {data.steps_per_epoch} full batches of {global_batch}: "
                          f"{left} of the {len(data.dataset)} rows (other ones each epoch, in a new "
                          f"shuffle) are left out of it")
    return data


def data_fingerprint(cfg: TrainConfig, data_type: str, data: TrainData) -> Optional[Dict[str, int]]:
    """What a checkpoint records of the training data, beside its path, for a resume to notice
    other data at the same path: a CSV's rows and bytes, the shards' count and bytes (sizes
    from the file system: nothing is read); None for the built-in shapes (made from the
    config)."""
    if data_type == "csv":
        return {"rows": len(data.dataset), "bytes": os.path.getsize(cfg.train_data)}
    if data_type == "webdataset":
        from ..datasets.webdataset import expand_urls
        shards = expand_urls(cfg.train_data)
        return {"shards": len(shards), "bytes": sum(os.path.getsize(u) for u in shards if os.path.isfile(u))}
    return None


def train_batches(cfg: TrainConfig, data: TrainData, model, env: DistEnv, start_batch: int,
                  total_steps: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
    """``(images, tokens, n_skipped)`` of this rank for batch positions ``start_batch ..``
    (the data position: batches drawn so far), without end."""
    if data.dataset is None:
        from ..datasets.webdataset import WebDataset
        ds = WebDataset(cfg.train_data, cfg.batch_size, image_transform_for(model, True), model.context_length,
                        seed=cfg.seed, rank=env.rank, world_size=env.world_size, skip_batches=start_batch)
        loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=cfg.workers,
                                             persistent_workers=cfg.workers > 0)
        return iter(loader)
    sampler = StepBatches(len(data.dataset), cfg.batch_size, env.rank, env.world_size, cfg.seed,
                          start_batch, total_steps, augment=data.augment, shuffle=data.shuffle)
    loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=sampler, collate_fn=collate_pairs,
                                         num_workers=cfg.workers)
    return iter(loader)


def _missing_shards_note(spec: str, shards: List[str], going_on: str) -> Optional[str]:
    """A note naming the shard paths of ``spec`` that do not exist when some others do (``shards``,
    its expansion), and those of the first 16 that are not tar archives (skipped as they are
    read); none at all is WebDataset's own error, which names the spec."""
    from ..datasets.webdataset import bad_shards, missing_shards
    missing = missing_shards(spec)
    bad = bad_shards(shards)
    notes = []
    if missing and shards:
        notes.append(f"{len(missing)} of the {len(missing) + len(shards)} shard paths named do not exist "
                     f"(e.g. {missing[0]})")
    if bad:
        notes.append(f"{len(bad)} of the first {len(shards[:16])} shards cannot be read (e.g. {bad[0][0]}: "
                     f"{bad[0][1]}): each counts as one skipped sample when drawn")
    return "; ".join(notes) + f": {going_on}" if notes else None


class _ImageIds:
    """Gives the rows of one image one id, so that retrieval counts them as one image with
    several captions (a COCO-style CSV lists an image once per caption) rather than as tied
    copies of which only one can rank first. An image is its file (CSV: the path, links
    resolved) or, in shards, its bytes: not its pixels after the eval transform, which merged
    different files that the centre crop made equal."""

    def __init__(self):
        self._ids: Dict[object, int] = {}

    def __call__(self, keys) -> torch.Tensor:
        return torch.tensor([self._ids.setdefault(k, len(self._ids)) for k in keys], dtype=torch.long)


def _digesting_shards(*args, **kwargs):
    """A ``WebDataset`` that records, in its ``digests`` list, a digest of each decoded
    sample's image bytes, in the order the samples are batched."""
    from ..datasets.webdataset import IMAGE_EXTS, WebDataset

    class _Digesting(WebDataset):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.digests: List[bytes] = []

        def _decode(self, raw, aug_seed):
            out = super()._decode(raw, aug_seed)
            if out is not None:
                data = next(raw[e] for e in IMAGE_EXTS if e in raw)
                self.digests.append(hashlib.blake2b(data, digest_size=16).digest())
            return out
    return _Digesting(*args, **kwargs)


def load_val_batches(cfg: TrainConfig, model, log: Optional[Callable[[str], None]] = None
                     ) -> Tuple[List[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]], int]:
    """Batches ``(images [B, 3, S, S], tokens [B, L], image_ids [B])`` of ``cfg.val_data`` (at most
    ``val_num_samples``, default 10k) and the number of samples skipped (image missing or corrupt,
    or no caption).
    ``image_ids`` number the distinct images across all batches (rows that repeat an image, one
    per caption, share its id). ``log`` receives notes on the data (CSV rows that were not valid
    UTF-8, or without a caption)."""
    from ..datasets.csv_dataset import collate_skipping
    kind = detect_val_type(cfg.val_data, cfg.dataset_type)
    limit = cfg.val_num_samples or 10_000
    # The softmax loss of a batch of one pair is exactly 0: batches of at least 2, and a last
    # batch of one sample joins the one before (val/loss of 17 samples in batches of 8 came out
    # 16/17 of that of the first 16).
    batch_size = max(2, cfg.batch_size)
    out, n, skipped_total = [], 0, 0
    image_ids = _ImageIds()
    if kind == "csv":
        ds = _csv_dataset("--val-data", cfg.val_data, cfg, image_transform_for(model, False), model.context_length)
        for note in ds.notes() if log is not None else ():
            log(note)
        for a in range(0, min(len(ds), limit), batch_size):
            rows = range(a, min(a + batch_size, len(ds), limit))
            samples = [ds[i] for i in rows]
            imgs, toks, skipped = collate_skipping(samples)
            skipped_total += skipped
            if len(imgs):
                files = [os.path.realpath(ds.images[i]) for i, smp in zip(rows, samples) if smp is not None]
                out.append((imgs, toks, image_ids(files)))
    else:
        from ..datasets.webdataset import expand_urls
        note = _missing_shards_note(cfg.val_data, expand_urls(cfg.val_data), "evaluating on the others")
        if note and log is not None:
            log(f"--val-data: {note}")
        from ..datasets.csv_dataset import DataError
        from ..datasets.webdataset import NoSamplesError
        ds = _digesting_shards(cfg.val_data, batch_size, image_transform_for(model, False),
                               model.context_length, seed=cfg.seed, shuffle_buffer=0, max_epochs=1)
        try:
            for imgs, toks, skipped in ds:
                skipped_total += skipped
                digests, ds.digests = ds.digests[:len(imgs)], ds.digests[len(imgs):]   # this batch's
                imgs, toks = imgs[:max(0, limit - n)], toks[:max(0, limit - n)]   # at most `limit` samples
                if len(imgs):
                    out.append((imgs, toks, image_ids(digests[:len(imgs)])))
                n += len(imgs) + skipped
                if n >= limit:
                    break
        except NoSamplesError:
            # The training reader's message ("reader 0 of 1 got no samples ... fewer samples than
            # there are readers (ranks x --workers)") named neither the flag nor the cause here:
            # validation reads its shards with one reader.
            raise DataError(f"--val-data {cfg.val_data!r}: no samples (its shards are empty)") from None
    if len(out) > 1 and len(out[-1][0]) == 1:
        last = out.pop()
        out[-1] = tuple(torch.cat([a, b]) for a, b in zip(out[-1], last))
    if not out:
        from ..datasets.csv_dataset import DataError
        example = ds.first_problem() if kind == "csv" else None
        raise DataError(f"--val-data {cfg.val_data!r}: no sample loaded ({skipped_total} skipped: missing or "
                        f"corrupt images, or no caption{'; ' + example if example else ''})" if skipped_total
                        else f"--val-data {cfg.val_data!r}: no samples")
    return out, skipped_total


def folder_zeroshot_task(cfg: TrainConfig, model, taken=()):
    """``--zeroshot-data`` (a folder of class-named folders): ``(name, ImageFolderDataset,
    templates)``; the name is the folder's, with "-folder" added where it is one of ``taken``
    (the built-in tasks' names). The images are listed now and decoded at each evaluation,
    batch by batch (``fastclip.eval.evaluate.folder_zeroshot_metrics``): an ImageNet-sized
    folder held as tensors would take tens of GB."""
    from ..datasets.folder import ImageFolderDataset, read_classnames
    from ..eval import templates as T
    ds = ImageFolderDataset(cfg.zeroshot_data, image_transform_for(model, False), read_classnames(cfg.zeroshot_classes))
    tmpl = {"imagenet": T.IMAGENET_TEMPLATES, "cifar": T.CIFAR_TEMPLATES,
            "simple": T.SIMPLE_TEMPLATES}[cfg.zeroshot_templates]
    name = os.path.basename(os.path.realpath(cfg.zeroshot_data)) or "zeroshot"
    return (name if name not in taken else f"{name}-folder"), ds, tmpl



class BatchDraws:
    """Training batches with too few loaded samples (none, or one where BatchNorm or the softmax
    loss in one process needs two) skipped, counted and reported; the data declared unusable
    after a run of them. ``trainer``: the ``Trainer`` (its ``cfg``, ``env``, ``min_batch``,
    ``min_batch_why``, ``steps_per_epoch`` and ``data_desc``); ``drawn``: batches drawn before."""

    def __init__(self, trainer, batches: Iterator, drawn: int):
        self.t, self.batches = trainer, batches
        self.drawn = drawn                      # batches drawn so far (the data position)
        self.skipped = self.skipped_batches = self.failed_in_a_row = 0
        self.most_in_failed = 0                 # the largest batch of the current failed run
        cfg = trainer.cfg
        self.fail_limit = cfg.max_failed_batches or trainer.steps_per_epoch or 100

    def next_usable(self, step: int, message: Callable[[str], None]) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch with enough samples, for training step ``step + 1``."""
        t, env = self.t, self.t.env
        while True:
            images, tokens, n_skip = next(self.batches)
            self.drawn += 1
            self.skipped += n_skip
            loaded = images.shape[0]
            empty = loaded < t.min_batch
            if env.distributed:  # all ranks skip together, or the loss's collectives would not pair up
                empty = sum_over_ranks(env, int(empty)) > 0
            if not empty:
                self.failed_in_a_row = self.most_in_failed = 0
                return images, tokens
            self.skipped_batches += 1
            self.failed_in_a_row += 1
            self.most_in_failed = max(self.most_in_failed, loaded)
            if self.failed_in_a_row >= self.fail_limit:
                self.unusable(self.failed_in_a_row, self.most_in_failed)
            if env.is_main and self.skipped_batches <= 3:
                what = ("no sample" if loaded == 0 else
                        f"{loaded} sample(s)" + (f" ({t.min_batch_why})" if loaded < t.min_batch else ""))
                where = "" if not env.distributed else (" on rank 0" if loaded < t.min_batch else
                                                            ", too few on another rank")
                message(f"step {step + 1}: {what} of batch {self.drawn} loaded{where} (images missing or "
                        f"corrupt, or no caption); skipped it{' on every rank' if env.distributed else ''} "
                        f"and drew the next batch"
                        + (" (further ones are only counted)" if self.skipped_batches == 3 else ""))

    def unusable(self, n: int, most: int = 0) -> None:
        """Raise: ``n`` batches in a row had too few samples, at most ``most`` each."""
        from ..datasets.csv_dataset import DataError
        t = self.t
        spe = t.steps_per_epoch
        span = " (a whole epoch)" if spe and n >= spe else ""
        if t.env.distributed:
            # ``most`` is this rank's: another rank may have been the short one
            short = "no sample" if t.min_batch == 1 else f"fewer than {t.min_batch} samples"
            what = (f"{short} loaded on at least one rank (every rank skips such a batch together"
                    + (f"; {t.min_batch_why}" if t.min_batch > 1 else "") + ")")
        else:
            what = ("no sample loaded" if most == 0 else
                    f"fewer than {t.min_batch} samples loaded ({t.min_batch_why})")
        ds = getattr(t, "dataset", None)
        example = ds.first_problem() if hasattr(ds, "first_problem") else None
        raise DataError(f"{t.data_desc}: {what} in {n} batches in a row{span} "
                        f"({n * t.cfg.batch_size * t.env.world_size} samples: images missing or corrupt, "
                        f"or no caption{'; ' + example if example else ''}); the data looks unusable: "
                        f"{self.advice()} (--max-failed-batches sets this limit)")

    def advice(self) -> str:
        """What to check in data of which no batch loads, by kind of data."""
        if self.t.data_desc.startswith("webdataset"):
            return ("check that each sample's image (key.jpg, key.png, ...) and caption (key.txt) "
                    "are consecutive members of the tar, as webdataset writes them (a shard with "
                    "all images first and all captions after pairs none), and that they decode")
        return "check the image paths (relative to the CSV file), --csv-img-key and --csv-caption-key"


__all__ = ["BatchDraws", "StepBatches", "TrainData", "ZeroShotSet", "build_train_data", "collate_pairs",
           "detect_dataset_type", "detect_val_type",
           "folder_zeroshot_task", "image_transform_for", "load_val_batches", "train_batches", "trim_padding"]

