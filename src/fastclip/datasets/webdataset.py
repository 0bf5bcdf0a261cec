"""Streamed webdataset-style tar shards (``key.jpg``/``key.png`` + ``key.txt``), read with ``tarfile``.

A shard is read sequentially (``tarfile`` stream mode: no seeking, no index, works on pipes
and network filesystems); consecutive members sharing a key (the file name up to its first dot, as
the webdataset convention) form one sample, and a member the sample already has (the key used
again) starts the next. A sample with no image, no caption (no key.txt, or a
blank one), or an image that does not decode is skipped and counted, never fatal; so is an
unreadable or truncated shard (its remaining samples are unknowable, so it counts as one skipped
sample).

Shard lists: brace ranges and lists (``data/{00000..00099}.tar``, ``{a,b}.tar``), globs
(``data/*.tar``), and several specs joined by ``::`` (open_clip's separator).
"""
from __future__ import annotations

import glob
import itertools
import os
import random
import re
import tarfile
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from .csv_dataset import DataError, caption_tokens, collate_skipping, load_image, seeded_transform
from .folder import IMAGE_EXTENSIONS

IMAGE_EXTS = tuple(e[1:] for e in IMAGE_EXTENSIONS)     # a sample's image member, by extension
# A member larger than this is not read (its sample is skipped and counted): web images and
# captions are far smaller, and a compressed shard can hold a member of any size.
MAX_MEMBER_BYTES = 128 << 20


class NoSamplesError(DataError):
    """A reader of the shards got no sample at all: they are empty, or fewer than the readers."""
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(spec: str) -> List[str]:
    """``"a{0..2}b"`` -> ``["a0b", "a1b", "a2b"]`` (zero padding kept; ``{2..0}`` counts down),
    ``"{x,y}"`` -> x and y; nested and repeated braces expand left to right."""
    m = _BRACE.search(spec)
    if m is None:
        return [spec]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        # As bash: padded to the wider end when either is written with a leading zero, and a
        # range written high to low counts down (it matched nothing).
        padded = any(len(v) > 1 and v.startswith("0") for v in (lo, hi))    # "0" alone is no padding
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(lo) <= int(hi) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    else:
        items = body.split(",")
    out = []
    for it in items:
        out.extend(expand_braces(spec[:m.start()] + it + spec[m.end():]))
    return out


def expand_urls(spec: str) -> List[str]:
    """Shard paths from ``spec`` (``::``-joined specs, braces, globs), in order, deduplicated.

    A glob that matches nothing and a brace-expanded path that does not exist are kept only if
    they exist: the caller checks that the list is not empty.
    """
    out: List[str] = []
    for part in spec.split("::"):
        for p in expand_braces(part.strip()):
            matches = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.exists(p) else [])
            out.extend(m for m in matches if m not in out)
    return out


def missing_shards(spec: str) -> List[str]:
    """The paths ``spec`` names (directly or by brace expansion) that do not exist: the ones
    :func:`expand_urls` leaves out (a glob names only what it matches)."""
    return [p for part in spec.split("::") for p in expand_braces(part.strip())
            if not glob.has_magic(p) and not os.path.exists(p)]


def tar_problem(path: str) -> Optional[str]:
    """Why the file at ``path`` is not a tar archive (plain or gzip/bz2/xz-compressed), read up
    to its first member's header, or None (a file of 0 bytes holds no sample and passes; a pipe
    is not read here: what is read from it is gone for the reader)."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return None
    try:
        with tarfile.open(path, mode="r|*") as tar:
            next(iter(tar), None)
    except (tarfile.TarError, EOFError) as e:
        return f"not a tar archive ({e})"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    return None


def bad_shards(urls: List[str], limit: int = 16) -> List[Tuple[str, str]]:
    """``(path, why)`` for each of the first ``limit`` of ``urls`` that is not a readable tar
    archive (:func:`tar_problem`): a few reads, whatever the list's length."""
    return [(u, why) for u in urls[:limit] for why in (tar_problem(u),) if why]


class _CutShard(tarfile.TarError):
    """A member header after the first that is cut short, missing or garbage."""


class _StrictTarInfo(tarfile.TarInfo):
    """``tarfile`` ends an archive quietly at the first header after offset 0 that is cut short
    (a copy interrupted inside it), absent (cut at a member boundary, before the end-of-archive
    zero blocks every tar writer adds) or invalid: the shard's remaining samples vanished with
    no skip counted. Only a zero block (the end-of-archive marker) ends it here; the others
    raise, and the shard counts as truncated."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except (tarfile.TruncatedHeaderError, tarfile.EmptyHeaderError, tarfile.InvalidHeaderError) as e:
            raise _CutShard(f"cut or corrupt member header at byte {tar.offset}: {e}") from None


def iter_tar_samples(path: str) -> Iterator[Optional[Dict[str, bytes]]]:
    """Yield one ``{ext: bytes}`` dict per key of the tar at ``path`` (streamed), or None once
    if the shard cannot be read (missing, truncated, inside a member or a header, or not a
    tar)."""
    current_key, current = None, {}
    try:
        if os.path.isfile(path) and os.path.getsize(path) == 0:
            return          # an empty shard (tar_problem passes it): no sample, not a fault (a pipe's
            #                 size is 0 too: it is read)
        with tarfile.open(path, mode="r|*", tarinfo=_StrictTarInfo) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = os.path.basename(member.name)
                dirname = os.path.dirname(member.name)
                if "." not in base or base.startswith(".") or "__MACOSX" in member.name.split("/"):
                    # Hidden files (macOS tar's "._0001.png" beside "0001.png", .DS_Store) are no
                    # samples: as a key "" each cut the sample around it in two (two good samples
                    # came out as 8 skipped ones). The image folders skip them too.
                    continue
                stem, ext = base.split(".", 1)
                key = os.path.join(dirname, stem)
                if member.size > MAX_MEMBER_BYTES:
                    # Not read into memory (a 1.4 MB gzip shard inflated a 1.5 GB member on every
                    # pass, 3 GB of RAM): left empty, its sample is skipped and counted.
                    data = b""
                else:
                    f = tar.extractfile(member)
                    data = f.read() if f is not None else b""
                ext = ext.lower()
                # A new key, or a member the sample already has (a key used twice, e.g. two
                # shards concatenated): the next sample. The second n.jpg replaced the first,
                # whose caption then went with the wrong image.
                if current and (key != current_key or ext in current):
                    yield current
                    current = {}
                current_key = key
                current[ext] = data
    except (OSError, tarfile.TarError, EOFError):
        if current:
            yield current
        yield None
        return
    if current:
        yield current


class WebDataset(torch.utils.data.IterableDataset):
    """Endless stream of batches ``(images [B', 3, S, S], tokens [B', L], skipped)`` from tar shards.

    Args:
        urls: shard list spec (see ``expand_urls``) or a list of paths.
        batch_size: samples per batch on this rank (B' < batch_size when some were skipped).
        transform: ``PIL.Image -> FloatTensor [3, S, S]``.
        context_length: caption token length (longer captions truncated).
        seed: shard order and the shuffle buffer are functions of ``(seed, epoch)``.
        rank, world_size: this process's slot; with DataLoader workers each (rank, worker)
            reads every ``world_size * num_workers``-th shard (or every such sample when there
            are fewer shards than readers).
        shuffle_buffer: samples held for shuffling (0: stream order).
        skip_batches: batches to fast-forward (resume); skipped samples are not decoded, so
            the position is exact unless corrupt samples fell in the skipped range.

    Epochs follow each other without end (the trainer decides how many batches to draw), or
    stop after ``max_epochs`` passes (evaluation), the last batch then possibly partial.
    """

    def __init__(self, urls, batch_size: int, transform: Callable, context_length: int = 77, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle_buffer: int = 1000, skip_batches: int = 0,
                 max_epochs: Optional[int] = None):
        self.urls = expand_urls(urls) if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise FileNotFoundError(f"no tar shards match {urls!r}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.batch_size, self.transform, self.context_length = batch_size, transform, context_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shuffle_buffer, self.skip_batches, self.max_epochs = shuffle_buffer, skip_batches, max_epochs
        self._any_samples: Optional[bool] = None      # whether any shard holds a sample (once asked)

    def _raw_samples(self, epoch: int, slot: int, stride: int) -> Iterator[Optional[Dict[str, bytes]]]:
        shards = list(self.urls)
        random.Random(self.seed * 7919 + epoch).shuffle(shards)
        by_shard = len(shards) >= stride
        mine = shards[slot::stride] if by_shard else shards
        k = 0
        for path in mine:
            for s in iter_tar_samples(path):
                if not by_shard:
                    k += 1
                    if (k - 1) % stride != slot:
                        continue
                yield s

    def _reader_can_never_produce(self, stride: int) -> bool:
        """After a pass in which a reader got no sample: whether it never will. With fewer shards
        than readers every pass deals it the same samples (none, then). With shards dealt out, a
        pass may deal it only empty shards while others hold samples: the next pass reshuffles
        (a run died mid-training when an empty shard came up alone); only when no shard holds
        a sample is the data empty."""
        if len(self.urls) < stride:
            return True
        if self._any_samples is None:
            self._any_samples = any(s is not None for path in self.urls
                                    for s in itertools.islice(iter_tar_samples(path), 1))
        return not self._any_samples

    def _shuffled(self, it: Iterator, rng: random.Random) -> Iterator:
        if self.shuffle_buffer <= 1:
            yield from it
            return
        buf: List = []
        for s in it:
            if len(buf) < self.shuffle_buffer:
                buf.append(s)
                continue
            j = rng.randrange(len(buf))
            buf[j], s = s, buf[j]
            yield s
        rng.shuffle(buf)
        yield from buf

    def _decode(self, raw: Optional[Dict[str, bytes]], aug_seed: int) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        if raw is None or "txt" not in raw:
            return None
        data = next((raw[e] for e in IMAGE_EXTS if e in raw), None)
        if data is None:
            return None
        img = load_image(data)
        if img is None:
            return None
        # An empty key.txt, or one of which the tokenizer keeps nothing: no caption to train on
        # (as a CSV row without one).
        tokens = caption_tokens(raw["txt"].decode("utf-8", errors="replace").strip(), self.context_length)
        if tokens is None:
            return None
        return seeded_transform(self.transform, aug_seed)(img), tokens

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor, int]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        # DataLoader takes batches round-robin from worker 0 on, also after a resume at data
        # position P, where the uninterrupted run's next batch came from worker P % nw: worker
        # wid plays that run's worker (wid + P) % nw (else, with 2 workers and P odd, the
        # batches came back pairwise swapped).
        wid = (wid + self.skip_batches) % nw
        slot, stride = self.rank * nw + wid, self.world_size * nw
        # This worker's share of the batches to skip.
        skip = self.skip_batches // nw + (1 if wid < self.skip_batches % nw else 0)
        epoch, n = 0, 0
        batch: List = []
        while True:
            rng = random.Random((self.seed * 1_000_003 + epoch) * 65_537 + slot)
            produced = False
            for raw in self._shuffled(self._raw_samples(epoch, slot, stride), rng):
                produced = True
                if skip > 0:
                    batch.append(None)
                    n += 1      # the augmentation seeds go on as if the sample had been drawn
                    if len(batch) == self.batch_size:
                        skip, batch = skip - 1, []
                    continue
                batch.append(self._decode(raw, aug_seed=(self.seed * 1_000_003 + epoch) * 1_000_003 + n))
                n += 1
                if len(batch) == self.batch_size:
                    yield collate_skipping(batch)
                    batch = []
            if not produced and self._reader_can_never_produce(stride):
                raise NoSamplesError(f"reader {slot} of {stride} got no samples from {len(self.urls)} shard(s) "
                                f"({self.urls[0]}{', ...' if len(self.urls) > 1 else ''}): the shards are empty, "
                                f"or hold fewer samples than there are readers (ranks x --workers)")
            epoch += 1  # a partial last batch carries into the next epoch
            if self.max_epochs is not None and epoch >= self.max_epochs:
                if batch and skip == 0:
                    yield collate_skipping(batch)
                return
