"""Image-caption pairs listed in a CSV/TSV file (open_clip's ``--csv-*`` conventions).

Also home of the helpers every real-data reader shares: ``load_image`` (never raises on a
missing or corrupt file) and ``collate_skipping`` (drops failed samples and counts them).
"""
from __future__ import annotations

import array
import csv
import io
import os
import warnings
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from PIL import Image

from ..transforms import eight_bit

Sample = Optional[Tuple[torch.Tensor, torch.Tensor]]


class DataError(ValueError):
    """Training or evaluation data that cannot be used at all (a CSV without the named columns or
    without rows, data in which no sample loads). The message names the data."""


def load_image(source: Union[str, bytes]) -> Optional[Image.Image]:
    """Open a path or encoded bytes as an RGB ``PIL.Image``; None when missing or undecodable.

    The image is fully decoded here (``convert`` forces it), so truncated files fail now
    rather than later in a transform.
    """
    if isinstance(source, str) and not os.path.isfile(source):
        return None         # missing, a folder, or a FIFO (opening one waits for a writer for ever)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's DecompressionBombWarning, EXIF warnings
            f = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
            with Image.open(f) as im:
                rgb = eight_bit(im).convert("RGB")
        return rgb if min(rgb.size) > 0 else None   # a 0-pixel side: nothing to resize or crop
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None


def seeded_generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with ``seed`` modulo 2**63: seeds derived from the
    run's (``seed * 1_000_003 + epoch``, ...) outgrow torch's 64-bit seed for a large
    ``--seed`` (from ~1.9e6 for the augmentation seeds); the ones that fit are unchanged."""
    return torch.Generator().manual_seed(int(seed) % 2 ** 63)


def seeded_transform(transform: Callable, seed: int) -> Callable:
    """Make ``transform``'s randomness (if it has a ``generator`` attribute, as
    ``fastclip.transforms.ImageTransform``) a function of ``seed``: reproducible whatever the
    worker that runs it."""
    if hasattr(transform, "generator"):
        transform.generator = seeded_generator(seed)
    return transform


def caption_tokens(caption: str, context_length: int) -> Optional[torch.Tensor]:
    """``caption``'s token ids ``[context_length]`` (cut to fit, end-of-text kept), or None when
    it holds no token: blank, or only what the tokenizer's cleaning drops (``&nbsp;``, a lone
    byte-order mark, control characters), which was trained on as the empty text."""
    from ..tokenizer import EOT_ID, tokenize
    tokens = tokenize([caption], context_length=context_length, truncate=True)[0]
    return None if context_length > 2 and int(tokens[1]) == EOT_ID else tokens


def collate_skipping(samples: Sequence[Sample]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the non-None ``(image [3, S, S], tokens [L])`` samples.

    Returns ``(images [B', 3, S, S], tokens [B', L], skipped)`` where ``skipped`` counts the None
    entries (missing or corrupt images). An all-None batch gives ``B' = 0`` tensors with
    unknown trailing sizes ``[0]``.
    """
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long), skipped
    return torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), skipped


def _header_desc(fields: List[str]) -> str:
    """What a CSV's header row holds, for an error: its columns, at most ~300 characters of
    them; or that it is not text (a NUL or undecodable bytes: a tar shard or an image given as
    CSV printed kilobytes of binary header as "columns")."""
    if not fields:
        return "the file is empty"
    head = "".join(fields)
    if "\0" in head or _has_surrogates(head):
        kind = "a tar archive" if "ustar" in head else "a binary file"
        return f"its first line is not text: it looks like {kind}, not a CSV"
    shown = repr(fields)
    return "columns are " + (shown if len(shown) <= 300 else shown[:300] + f"... ({len(fields)} columns)")


def _has_surrogates(s: str) -> bool:
    """True when ``s`` holds bytes that ``surrogateescape`` could not decode as UTF-8."""
    return any("\udc80" <= ch <= "\udcff" for ch in s)


class _Lines:
    """The physical lines of a text file, with the ones handed out since ``start()`` kept so that
    all but the first can be read again (``back_to_second()``)."""

    def __init__(self, f):
        self._f, self._again, self.taken = f, [], []

    def __iter__(self):
        return self

    def __next__(self) -> str:
        line = self._again.pop() if self._again else next(self._f)
        self.taken.append(line)
        return line

    def start(self) -> None:
        self.taken = []

    def back_to_second(self) -> None:
        self._again.extend(reversed(self.taken[1:]))
        self.taken = self.taken[:1]


def _records(f, separator: str, broken: List[int],
             is_row: Optional[Callable[[List[str], bool], bool]] = None) -> Iterator[Tuple[int, List[str]]]:
    """``(line, fields)`` of each non-empty record of the CSV text ``f``, ``line`` the physical
    line (from 1) it starts on.

    A record that is not valid CSV is skipped, its line appended to ``broken``, and reading goes
    on from the line after that one: a quote opened in a caption and never closed, or closed by
    another row's stray quote, made Python's lenient reader fold every later line into that one
    caption (16 rows read as 3, without a word), and a field past ``csv.field_size_limit`` (the
    same fault in a large file) stopped the whole file. A record spanning several lines (a
    quoted caption with line breaks) is checked by a strict parse of its lines alone, and, when
    ``is_row`` is given, is broken if one of its later lines, read alone, is a row by
    ``is_row(fields, last)`` (a stray quote closed by another at the end of a later line parses
    strictly; ``last``: the record's last line, which, where the caption column comes before the
    image column, holds the end of a legitimate caption and the image).
    """
    lines = _Lines(f)
    line_no = 1
    while True:
        reader = csv.reader(lines, delimiter=separator)
        while True:
            lines.start()
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error:
                row = None
            if row is not None and len(lines.taken) == 1 and any("\n" in v or "\r" in v for v in row):
                row = None      # a line break inside a field of one line: the file ended inside a quote
            elif row is not None and len(lines.taken) > 1:
                try:
                    strict = next(csv.reader(io.StringIO("".join(lines.taken)), delimiter=separator, strict=True))
                except (csv.Error, StopIteration):
                    strict = None
                last = len(lines.taken) - 1
                if strict != row or (is_row is not None and any(
                        is_row(r, k == last) for k in range(1, last + 1)
                        for r in csv.reader([lines.taken[k]], delimiter=separator))):
                    row = None
            if row is None:
                broken.append(line_no)
                lines.back_to_second()
                line_no += 1
                break           # a fresh reader: the failed one may hold a half-parsed record
            if row:             # a blank line is no record
                yield line_no, row
            line_no += len(lines.taken)


def _first_line(path: str) -> str:
    """The first non-blank line of ``path``, the header (blank lines are no records: a .tsv whose
    first line was blank was read with commas); "" when it cannot be read (the reader then says
    why)."""
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            for _ in range(1000):
                line = f.readline(1 << 20)
                if not line or line.rstrip("\r\n"):
                    return line
    except OSError:
        pass
    return ""


def effective_separator(path: str, separator: str = ",") -> str:
    """The separator ``CsvDataset`` reads ``path`` with: a tab for a ``.tsv`` file given the
    default ``,`` whose header line holds a tab, else ``separator``."""
    if separator == "," and path.lower().endswith(".tsv") and "\t" in _first_line(path):
        # A .tsv file is tab-separated unless another separator is given, or its header has
        # no tab (a comma-separated .tsv, with --csv-separator , given: it was read with tabs).
        return "\t"
    return separator


def _nonblank_records(path: str, separator: str) -> Iterator[List[str]]:
    """The records of ``path`` that are not blank lines, read with the plain ``csv`` reader and
    ``effective_separator`` (a broken record may hide some; the dataset's own reader says why)."""
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        yield from (r for r in csv.reader(f, delimiter=effective_separator(path, separator)) if r)


def csv_header(path: str, separator: str = ",") -> Optional[List[str]]:
    """The column names of ``path`` (its first record that is not a blank line, as the dataset
    reads it), or None when it cannot be read (``CsvDataset`` then says why); for checks that
    need no model."""
    try:
        return next(_nonblank_records(path, separator), [])
    except (OSError, csv.Error):
        return None


def csv_image_paths(path: str, img_key: str, separator: str = ",") -> Iterator[str]:
    """The image paths of ``path``'s column ``img_key``, joined to the file's folder as
    ``CsvDataset`` reads them (nothing when the file or the column cannot be read)."""
    root = os.path.dirname(os.path.abspath(path))
    try:
        rows = _nonblank_records(path, separator)
        header = next(rows, [])
        if img_key not in header:
            return
        k = header.index(img_key)
        for r in rows:
            if k < len(r) and r[k].strip():
                yield os.path.join(root, r[k])
    except (OSError, csv.Error):
        return


class CsvDataset(torch.utils.data.Dataset):
    """Map-style ``(image, tokens)`` pairs from a delimited file with a header row.

    Args:
        path: the CSV/TSV file. Relative image paths are resolved against its directory.
        transform: ``PIL.Image -> FloatTensor [3, S, S]`` (e.g. ``image_transform(S, train=True)``).
        img_key, caption_key, separator: column names and delimiter (open_clip's
            ``--csv-img-key filepath --csv-caption-key title --csv-separator ,`` by default;
            a ``.tsv`` file with the default ``,`` is read tab-separated when its header
            line holds a tab).
        context_length: caption token length; longer captions are truncated.

    ``dataset[i]`` or ``dataset[(i, aug_seed)]`` (the latter seeds a random transform) returns
    ``(image [3, S, S], tokens [context_length])``, or None when the image is missing or
    corrupt, or the row has no caption (an empty or blank cell, a row cut short before its
    caption column, or a caption of which the tokenizer keeps nothing, such as ``&nbsp;``):
    ``collate_skipping`` drops and counts those. Captionless rows are never
    trained on as an empty text; their line numbers are in ``no_caption_lines``. A row with
    more fields than the header (an unquoted separator inside a caption: its caption would be
    cut there) is skipped the same way, unless its extra fields are empty and most rows end in
    the same empty ones (a separator at the end of the lines); its line number is in
    ``long_row_lines``. A record that is not valid CSV (a quote never closed in its caption, or
    closed only by another row's stray quote, which is how a quoted caption with a later line
    that reads as a row, the header's field count and an existing image, is read; a field past
    ``csv.field_size_limit``) is skipped
    and the lines after its first read again as rows; its line number is in ``broken_lines``.

    The file is UTF-8 (a leading byte-order mark is ignored). Bytes that are not valid UTF-8 never
    stop the reader: in a caption they become U+FFFD (as the webdataset reader decodes captions),
    in an image path they are kept as the raw bytes of the file name (Python's
    ``surrogateescape``, so such files still open). The line numbers of those rows are in
    ``invalid_utf8_lines`` and summarised by ``describe_invalid_utf8()``.

    Raises ``DataError`` naming the file when it cannot be read, a column is missing or named
    twice in the header, or there are no usable rows. Line numbers are those of the file, the
    header's being 1; a record spanning several lines has the number of its first.
    """

    def __init__(self, path: str, transform: Callable, img_key: str = "filepath", caption_key: str = "title",
                 separator: str = ",", context_length: int = 77):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CSV file {path!r} does not exist")
        separator = effective_separator(path, separator)
        self.path = path
        self.invalid_utf8_lines: List[int] = []
        self.no_caption_lines: List[int] = []
        self.long_row_lines: List[int] = []
        self.broken_lines: List[int] = []
        self.row_lines = array.array("q")       # the line each row starts on
        rows = []
        # A caption past the csv module's default 128 KiB is a caption (cut to the context
        # length like any other), not a broken record; a quote left open folds lines into one
        # field until this limit, whose error then names the record as broken.
        limit = csv.field_size_limit()
        csv.field_size_limit(max(limit, 1 << 26))
        try:
            with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
                root = os.path.dirname(os.path.abspath(path))
                columns: List[int] = []        # (img_key's index, the header's width, caption first), once read

                def is_row(r: List[str], last: bool) -> bool:
                    """Whether a line inside a multi-line caption is a row: as many fields as the
                    header and an image that exists (a caption's own line with a separator in it
                    names no file). Not the record's last line when the caption column comes
                    first: there the end of a quoted caption is followed by the image."""
                    if not columns or (last and columns[2]) or len(r) < columns[1] or not r[columns[0]].strip():
                        return False
                    return os.path.isfile(os.path.join(root, r[columns[0]]))

                records = _records(f, separator, self.broken_lines, is_row)
                fields = next(records, (1, []))[1]
                if self.broken_lines[:1] == [1]:
                    # The next line would be taken for the header (its fields named as columns).
                    raise DataError(f"{path}: the header (line 1) is not valid CSV (a quote opened and not "
                                    f"closed?)")
                for key, what in ((img_key, "img_key"), (caption_key, "caption_key")):
                    if key not in fields:
                        raise DataError(f"{path}: column {key!r} ({what}) not found; {_header_desc(fields)} "
                                        f"(separator {separator!r})")
                    if fields.count(key) > 1:
                        # csv.DictReader kept the last of them; open_clip's pandas reader, the first
                        at = [i + 1 for i, f in enumerate(fields) if f == key]
                        raise DataError(f"{path}: column {key!r} ({what}) is named {len(at)} times in the header "
                                        f"(columns {', '.join(map(str, at))}): rename all but the one to use")
                ii, ic, width = fields.index(img_key), fields.index(caption_key), len(fields)
                columns[:] = [ii, width, int(ic < ii)]
                # Fields past the header's: a row with some is an unquoted separator in a caption
                # (cut there), unless they are empty and most rows end in the same empty ones:
                # a separator at the end of the lines (a writer's habit, which a hand-edited line
                # may lack; an empty extra field on a few rows only is a caption's tail that slid
                # into an empty last column).
                extras: List[Tuple[int, List[str]]] = []     # (line, the row's extras)
                for line, r in records:
                    extras.append((line, r[width:]))
                    self.row_lines.append(line)
                    rows.append((r[ii] if ii < len(r) else "", r[ic] if ic < len(r) else ""))
                tails = [len(x) for _, x in extras if x and not any(v.strip() for v in x)]
                trailing = len(tails) * 2 > len(extras) and len(set(tails)) == 1
                for k, (line, extra) in enumerate(extras):
                    img, cap = rows[k]
                    if extra and not (trailing and len(extra) == tails[0] and not any(v.strip() for v in extra)):
                        self.long_row_lines.append(line)
                        rows[k] = (img, "")
                        continue
                    if _has_surrogates(img) or _has_surrogates(cap):
                        self.invalid_utf8_lines.append(line)
                        cap = cap.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                        rows[k] = (img, cap)
                    if not cap.strip():
                        self.no_caption_lines.append(line)
        except csv.Error as e:
            raise DataError(f"{path}: not a readable CSV file ({e})") from None
        except OSError as e:     # unreadable (permissions), a folder, an I/O error
            raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
        finally:
            csv.field_size_limit(limit)
        if not rows:
            if self.broken_lines:
                raise DataError(self.describe_broken(what="that could not be read as CSV", done="no row left to read"))
            raise DataError(f"{path}: no rows (only a header)")
        if len(self.long_row_lines) == len(rows):
            raise DataError(f"{path}: every row has more fields than the header's {len(fields)} "
                            f"(separator {separator!r}: quote captions that contain it)")
        if len(self.no_caption_lines) + len(self.long_row_lines) == len(rows):
            raise DataError(f"{path}: no row has a caption in column {caption_key!r} (caption_key)")
        self.images: List[str] = [p if os.path.isabs(p) else os.path.join(root, p) for p, _ in rows]
        self.captions: List[str] = [c for _, c in rows]
        self.transform, self.context_length = transform, context_length

    def _describe_rows(self, lines: List[int], what: str, done: str, limit: int) -> Optional[str]:
        """``"<path>: <n> row(s) <what> (line(s) <first ``limit``>): <done>"``, or None without lines."""
        n = len(lines)
        if not n:
            return None
        shown = ", ".join(str(i) for i in lines[:limit]) + (", ..." if n > limit else "")
        s = "s" if n > 1 else ""
        return f"{self.path}: {n} row{s} {what} (line{s} {shown}): {done}"

    def describe_invalid_utf8(self, limit: int = 10) -> Optional[str]:
        """One line naming the rows that were not valid UTF-8, or None when every row was."""
        return self._describe_rows(self.invalid_utf8_lines, "with bytes that are not valid UTF-8",
                                   "replaced by U+FFFD in captions, kept as raw bytes in image paths", limit)

    def describe_no_captions(self, limit: int = 10) -> Optional[str]:
        """One line naming the rows without a caption (skipped as failed samples), or None."""
        return self._describe_rows(self.no_caption_lines, "without a caption", "skipped, as missing images are",
                                   limit)

    def describe_long_rows(self, limit: int = 10) -> Optional[str]:
        """One line naming the rows with more fields than the header (skipped), or None."""
        return self._describe_rows(self.long_row_lines, "with more fields than the header",
                                   "skipped (an unquoted separator in a caption? quote such captions)", limit)

    def describe_broken(self, limit: int = 10, what: str = "that could not be read as CSV",
                        done: str = "skipped, and the lines after each read as rows again (a quote opened in "
                                    "a caption and not closed there? quote the whole caption, doubling the "
                                    "quotes inside it)") -> Optional[str]:
        """One line naming the records that could not be parsed (skipped), or None."""
        return self._describe_rows(self.broken_lines, what, done, limit)

    def notes(self) -> List[str]:
        """The lines to report about the file's rows (``describe_broken``, ``describe_invalid_utf8``,
        ``describe_no_captions``, ``describe_long_rows``)."""
        return [n for n in (self.describe_broken(), self.describe_invalid_utf8(), self.describe_no_captions(),
                            self.describe_long_rows()) if n]

    def first_problem(self, limit: int = 200) -> Optional[str]:
        """Why the first failing row among the first ``limit`` fails, with its line and its image's
        path as resolved (relative paths are relative to the CSV's folder), or None: for an error
        about data of which nothing loads, where one example shows a typo, a stray space or the
        wrong folder at once."""
        no_caption = None      # said only when no image fails: the notes name such rows already
        for k in range(min(limit, len(self.images))):
            line, path = self.row_lines[k], self.images[k]
            if not self.captions[k].strip() or caption_tokens(self.captions[k], self.context_length) is None:
                no_caption = no_caption or f"e.g. line {line} has no caption"
                continue
            if not os.path.exists(path):
                return f"e.g. line {line}: image {path!r} does not exist"
            if not os.path.isfile(path):
                return f"e.g. line {line}: image {path!r} is not a file"
            if load_image(path) is None:
                return f"e.g. line {line}: image {path!r} does not decode"
        return no_caption

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key) -> Sample:
        index, aug_seed = key if isinstance(key, tuple) else (key, None)
        if not self.captions[index].strip():
            return None
        tokens = caption_tokens(self.captions[index], self.context_length)
        img = load_image(self.images[index]) if tokens is not None else None
        if img is None:
            return None
        tf = self.transform if aug_seed is None else seeded_transform(self.transform, aug_seed)
        return tf(img), tokens
