"""CLIP's byte-level BPE tokenizer (ids identical to OpenAI's ``SimpleTokenizer``).

Pipeline: ``ftfy.fix_text`` -> ``html.unescape`` twice -> strip -> collapse whitespace -> lower
-> regex pre-tokenizer -> bytes mapped to printable unicode -> BPE with a ``</w>`` end-of-word
suffix -> ids; ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407 wrap every text, and
padding is 0. The merges are the first 48,894 lines after the header of the vendored
``data/bpe_simple_vocab_16e6.txt.gz`` (MIT, Copyright (c) 2021 OpenAI; see
``data/CLIP_BPE_LICENSE``), giving 49,408 ids.

``tokenize`` runs the BPE in Rust through the ``tokenizers`` library (``Split`` pre-tokenizer
with the CLIP pattern, ``ByteLevel`` mapping, ``BPE(end_of_word_suffix="</w>")``).
``SimpleTokenizer`` is a small pure-Python BPE kept as the parity oracle for the tests.

Speed: ``benchmarks/bench_tokenizer.py`` (``fastclip bench tokenizer``) times both paths
stage by stage on synthetic captions (the text cleaning, which both paths share, the BPE
alone, and end to end); results in ``benchmarks/results/tokenizer-*.md``.
"""
from __future__ import annotations

import gzip
import heapq
import html
import os
import unicodedata
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple, Union

import ftfy
import numpy as np
import regex as re
import torch

BPE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "bpe_simple_vocab_16e6.txt.gz")
NUM_MERGES = 49152 - 256 - 2  # 48,894 merges -> 256 + 256 + 48,894 + 2 = 49,408 ids
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID, VOCAB_SIZE = 49406, 49407, 49408
PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
_PAT = re.compile(PATTERN, re.IGNORECASE)
_WS = re.compile(r"\s+")


@lru_cache()
def bytes_to_unicode() -> Dict[int, str]:
    """Reversible map of the 256 byte values to printable unicode characters (GPT-2's table):
    printable Latin-1 bytes map to themselves, the other 68 to U+0100 onwards in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table  # insertion order (printable bytes first) defines ids 0..255


def clean_text(text: str) -> str:
    """OpenAI's cleaning: ftfy, html-unescape twice, collapse whitespace, strip, lower-case.

    Then U+0345 (combining ypogegrammeni) becomes a space: OpenAI's pattern, compiled by
    Python's ``regex`` with IGNORECASE, matches none of its alternatives on it (the character
    splits words and is dropped), while the Rust engine of ``tokenize`` reads it as a letter.
    A fuzz of every code point up to U+2FFFF found no other such character among those
    Python's ``unicodedata`` knows; texts with a code point it does not know (newer Unicode,
    which ``regex`` and the Rust engine may each classify differently) go to the pure-Python
    path in :func:`tokenize`.
    """
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WS.sub(" ", text).strip().lower().replace("\u0345", " ")


@lru_cache()
def _vocab() -> Tuple[List[str], List[Tuple[str, str]]]:
    """(id -> token string list of length 49,408, merges in rank order)."""
    with gzip.open(BPE_PATH, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")[1:NUM_MERGES + 1]
    merges = [tuple(line.split()) for line in lines]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{BPE_PATH}: expected {NUM_MERGES} merge lines, the vocabulary file is damaged")
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [SOT, EOT]
    return tokens, merges


class SimpleTokenizer:
    """Pure-Python CLIP BPE (the reference/oracle). ``encode(text) -> list[int]`` without
    sot/eot; ``decode(ids) -> str``."""

    def __init__(self):
        tokens, merges = _vocab()
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = tokens
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.cache = {SOT: [SOT], EOT: [EOT]}

    def bpe(self, word: str) -> List[str]:
        """BPE-merge one pre-token (already byte-mapped) into vocabulary symbols."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        if len(parts) > 64:
            # The loop rescans the word for every merge: quadratic (a 20000-character word took
            # 11.7 s). A heap of adjacent pairs makes the same merges in the same order in
            # O(n log n) (tests/test_tokenizer.py checks the two against each other).
            parts = self._bpe_heap(parts)
        else:
            parts = self._bpe_loop(parts)
        if len(word) <= 64:     # a cache of words, not of every long run of characters seen
            self.cache[word] = parts
        return parts

    def _bpe_loop(self, parts: List[str]) -> List[str]:
        """OpenAI's merge loop: the pair of lowest rank, merged everywhere left to right, then
        the next."""
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, at = min(pairs)
            if rank == 1 << 30:
                break
            first, second = parts[at], parts[at + 1]
            merged, i = [], 0
            while i < len(parts):  # merge every occurrence of the best pair, left to right
                if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return parts

    def _bpe_heap(self, parts: List[str]) -> List[str]:
        """``bpe``'s merges with a heap of (rank, position) pairs. The loop merges the pair of
        lowest rank everywhere, left to right, then looks again; popping the lowest (rank,
        position) does the same: a rank names one pair of symbols, positions keep their order
        (a merged symbol keeps its left one's), and an entry whose symbols have changed since
        it was pushed is skipped. A merge never makes a new pair of the rank being merged (the
        merged symbol is longer than both of its halves)."""
        ranks = self.ranks
        n = len(parts)
        sym = list(parts)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap = []
        for i in range(n - 1):
            r = ranks.get((sym[i], sym[i + 1]))
            if r is not None:
                heap.append((r, i, sym[i], sym[i + 1]))
        heapq.heapify(heap)
        while heap:
            r, i, a, b = heapq.heappop(heap)
            j = nxt[i] if alive[i] else -1
            if j < 0 or sym[i] != a or sym[j] != b:
                continue                                # stale: a neighbour merged since
            sym[i] = a + b
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            for left, right in ((prv[i], i), (i, nxt[i])):
                if left >= 0 and right >= 0:
                    r2 = ranks.get((sym[left], sym[right]))
                    if r2 is not None:
                        heapq.heappush(heap, (r2, left, sym[left], sym[right]))
        return [sym[i] for i in range(n) if alive[i]]

    def encode(self, text: str, max_ids: Optional[int] = None) -> List[int]:
        """BPE ids of ``text``; with ``max_ids``, stop once that many are made (the ids are a
        prefix of the full encoding: what a truncating caller keeps, without the work on the rest)."""
        ids = []
        for tok in _PAT.finditer(clean_text(text)):
            tok = tok.group(0)
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8")) if tok not in (SOT, EOT) else tok
            ids.extend(self.encoder[p] for p in self.bpe(tok))
            if max_ids is not None and len(ids) >= max_ids:
                return ids[:max_ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache()
def get_tokenizer():
    """The cached ``tokenizers.Tokenizer`` implementing CLIP's BPE (no cleaning, no sot/eot)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    tokens, merges = _vocab()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens[:-2])}, merges=merges,
                               end_of_word_suffix="</w>", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PATTERN), behavior="removed", invert=True),  # keep matches, drop whitespace
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.add_special_tokens([SOT, EOT])
    if tok.token_to_id(SOT) != SOT_ID or tok.token_to_id(EOT) != EOT_ID or tok.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError("tokenizer construction produced unexpected special-token ids")
    return tok


class TextTooLongError(ValueError, RuntimeError):
    """A text does not fit ``context_length``. A ValueError, and a RuntimeError as OpenAI's
    ``clip.tokenize`` raises, so code written for either catches it."""


def tokenize(texts: Union[str, Sequence[str]], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """Tokenize ``texts`` (a str or a sequence of str) to a LongTensor ``[B, context_length]``:
    ``[49406, ids..., 49407, 0, ...]``; OpenAI's ids exactly (its cleaning, pattern and merges).

    ``context_length``: an int >= 2 (default 77, CLIP's). A text whose ids plus sot/eot exceed
    it raises :class:`TextTooLongError` (a ValueError and a RuntimeError) naming its index and
    length, unless ``truncate`` (then it is cut and EOT kept as the last id). An empty list gives
    shape ``[0, context_length]``. Anything but a str or a sequence of str (bytes included: decode
    them first) raises TypeError. As in OpenAI's tokenizer, ``<|startoftext|>`` and
    ``<|endoftext|>`` typed in a text (also as ``&lt;|endoftext|&gt;``) become the special ids:
    the text tower pools at the first end-of-text, so the rest of such a caption is not seen.
    """
    if isinstance(texts, str):
        texts = [texts]
    elif isinstance(texts, (bytes, bytearray, memoryview)):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__} "
                        f"(decode bytes first, e.g. texts.decode('utf-8'))")
    elif isinstance(texts, (dict, set, frozenset)):
        # No order of their own (a set's is the string hashes', which change between runs).
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__} "
                        f"(its order is not the rows'; pass a list)")
    else:
        try:
            texts = list(texts)
        except TypeError:
            raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}") from None
    if not _token_id(context_length) or context_length < 2:
        raise ValueError(f"context_length must be an int >= 2, got {context_length!r}")
    if not isinstance(truncate, (bool, np.bool_)):
        # Any truthy value cut the texts: truncate="no" truncated.
        raise TypeError(f"truncate must be a bool, got {truncate!r} ({type(truncate).__name__})")
    context_length = int(context_length)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(t).__name__}")
    out = np.zeros((len(texts), context_length), dtype=np.int64)
    if not texts:
        return torch.from_numpy(out)
    tok = get_tokenizer()
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast (tokenizers >= 0.20) skips offsets
    cleaned = [clean_text(t) for t in texts]
    all_ids = [enc.ids for enc in encode(cleaned, add_special_tokens=False)]
    # Where the Rust pre-tokenizer cannot follow OpenAI's regex, the pure-Python BPE does.
    for i, t in enumerate(cleaned):
        if _needs_oracle(t):
            all_ids[i] = _oracle().encode(texts[i], max_ids=context_length - 1 if truncate else None)
    for i, ids in enumerate(all_ids):
        if len(ids) + 2 > context_length:
            if not truncate:
                raise TextTooLongError(f"texts[{i}] is too long: {len(ids) + 2} tokens (with sot/eot) > "
                                 f"context_length={context_length}; pass truncate=True to cut it")
            ids = ids[:context_length - 2]
        out[i, 0] = SOT_ID
        out[i, 1:len(ids) + 1] = ids
        out[i, len(ids) + 1] = EOT_ID
    return torch.from_numpy(out)


def _needs_oracle(t: str) -> bool:
    """Whether a cleaned text must go the pure-Python way: "<|" (tokenizers pulls
    "<|endoftext|>" out of any text, while OpenAI's pattern can take "<|" into a run of
    punctuation: "hello,<|endoftext|>" is ",<|" "endoftext" "|>" there), U+017F (IGNORECASE
    folds "'ſ" into the contraction "'s"; tokenizers' regex has no such flag), or a code point
    Python's Unicode tables do not have (a newer letter, e.g. U+10940, that ``regex``'s tables
    know and the Rust engine's may not: the two then split the word differently)."""
    if "<|" in t or "\u017f" in t:
        return True
    return not t.isascii() and any(unicodedata.category(c) == "Cn" for c in t)


def _token_id(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_row(v) -> bool:
    if isinstance(v, (torch.Tensor, np.ndarray)):
        return v.ndim >= 1
    return isinstance(v, Sequence) and not isinstance(v, (str, bytes, bytearray))


def decode(ids: Union[torch.Tensor, Sequence[int], Sequence[Sequence[int]]]) -> Union[str, List[str]]:
    """Invert ``tokenize``: a 1-D sequence of ids -> str; a 2-D tensor / array / sequence of rows
    -> list of str. Ids are ints (Python or NumPy) or an integer tensor/array; anything else
    (floats, bools, strings, 0-D or 3-D arrays) raises TypeError or ValueError naming it.

    Drops the sot ids (the leading one, and any a text typed as ``<|startoftext|>``), everything
    from the first eot on (padding), and maps ``</w>`` to spaces.
    """
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else ids
        if arr.ndim not in (1, 2):
            raise ValueError(f"ids must be 1-D (one text) or 2-D (a batch), got shape {tuple(arr.shape)}")
        if arr.dtype.kind not in "iu":
            raise TypeError(f"ids must be integer token ids, got dtype {ids.dtype}")
        if arr.ndim == 2:     # a batch, also an empty one ([0, L] -> [])
            return [decode(row) for row in arr]
        ids = arr.tolist()
    elif isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise TypeError(f"ids must be a sequence of int token ids or of such rows, got "
                        f"{type(ids).__name__}")
    ids = list(ids)
    if ids and all(_is_row(r) for r in ids):
        return [decode(row) for row in ids]
    for k, i in enumerate(ids):
        if not _token_id(i):
            raise TypeError(f"ids[{k}] must be an int token id, got {i!r} ({type(i).__name__})")
    ids = [int(i) for i in ids]
    if EOT_ID in ids:
        ids = ids[:ids.index(EOT_ID)]
    else:
        while ids and ids[-1] == 0:
            ids.pop()
    ids = [i for i in ids if i != SOT_ID]
    bad = [i for i in ids if not 0 <= i < VOCAB_SIZE]
    if bad:
        raise ValueError(f"ids out of range [0, {VOCAB_SIZE}): {bad[:5]}")
    return _oracle().decode(ids).strip()


@lru_cache()
def _oracle() -> SimpleTokenizer:
    return SimpleTokenizer()
