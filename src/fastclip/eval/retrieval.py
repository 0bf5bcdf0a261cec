"""Image <-> text retrieval recall@K, computed in row chunks (never the full N x M matrix)."""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from ._checks import as_features, class_indices, finite_rows, fp32_math, int_at_least, unit_rows

# The rank of a query that cannot be ranked (a non-finite similarity): beyond every K.
_MISS = torch.iinfo(torch.long).max


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: Optional[torch.Tensor] = None, ks: Union[int, Sequence[int]] = (1, 5, 10),
                      chunk_size: int = 1024, normalize: bool = True) -> Dict[str, float]:
    """Recall@K for image->text and text->image retrieval by cosine (or dot, ``normalize=False``)
    similarity.

    ``image_features`` ``[N, D]``, ``text_features`` ``[M, D]`` (tensors or NumPy arrays, any
    real dtype; compared in float32); ``text_to_image`` ``[M]`` integer indices in ``[0, N)``
    (a LongTensor, list or NumPy array) gives each caption's image (default: ``arange(N)``, one
    caption per image, M == N). ``ks``: a positive int or a non-empty sequence of them. An image
    query is correct at K when any of its captions ranks in the top K; a caption query when its
    image does. Ties are broken by index, exactly as a stable descending sort would (a candidate
    with an equal score and a lower index ranks first). Scores are float32 cosines (dots), summed
    in float64 so that they do not depend on ``chunk_size``; two scores equal in exact arithmetic
    can still differ in their last bit after the features' normalisation rounds.

    Non-finite features (NaN or inf: a diverged model) are never retrieved: such a candidate
    ranks below every other, so one bad caption does not spoil the other images' queries; a
    query whose own features are non-finite, or whose correct candidates all are, is a miss at
    every K, and so is a query with a non-finite similarity to a finite candidate (an overflow
    with ``normalize=False``). Similarities are computed ``chunk_size`` (a positive int) query
    rows at a time (``[chunk_size, N or M]`` at most).

    Returns ``{"image_to_text_R@K": ..., "text_to_image_R@K": ..., "mean_recall": ...}`` as
    fractions in [0, 1].
    """
    image_features = as_features(image_features, "image_features")
    text_features = as_features(text_features, "text_features")
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features [N, D] and text_features [M, D] must share D, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if image_features.shape[1] == 0:
        # (every similarity is 0: recalls came out as the tie order's, 1/3 at R@1 for 3 pairs)
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)} have D = 0: there is nothing to compare")
    chunk_size = int_at_least(chunk_size, "chunk_size")
    ks = _check_ks(ks)
    if not isinstance(normalize, (bool, np.bool_)):      # "no" is truthy: it normalised, unsaid
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__} {normalize!r}")
    normalize = bool(normalize)
    n, m = image_features.shape[0], text_features.shape[0]
    if n == 0 or m == 0:
        # a recall over no queries is undefined (it read 0.0: a model that retrieves nothing)
        raise ValueError(f"image_features {tuple(image_features.shape)} and text_features "
                         f"{tuple(text_features.shape)}: retrieval needs at least one image and one caption")
    dev = image_features.device
    if text_to_image is None:
        if n != m:
            raise ValueError(f"text_to_image is required when the number of texts ({m}) != images ({n})")
        text_to_image = torch.arange(n, device=dev)
    # class_indices first: it turns captions or other non-indices into a clear TypeError.
    text_to_image = class_indices(text_to_image, "text_to_image (image index of each caption)", n, dev)
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape [{m}], got {tuple(text_to_image.shape)}")
    if torch.bincount(text_to_image, minlength=n).min() == 0:
        raise ValueError("text_to_image: every image needs at least one caption")
    with fp32_math():   # float32 similarities even inside a caller's bf16 autocast
        return _recalls(image_features.float(), text_features.float().to(dev), text_to_image, ks,
                        chunk_size, normalize)


def _check_ks(ks) -> list:
    """``ks`` (one positive int or a non-empty iterable of them) as a list of ints."""
    given = ks
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        got = None if isinstance(ks, (str, bytes)) else list(ks)
    except TypeError:
        got = None
    ks = given          # the message shows what was passed: 0, not (0,)
    if not got or any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0 for k in got):
        raise ValueError(f"ks must be a non-empty sequence of positive ints (or one positive int), got {ks!r}")
    return [int(k) for k in got]


def _recalls(img: torch.Tensor, txt: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int],
             chunk_size: int, normalize: bool) -> Dict[str, float]:
    n, m, dev = img.shape[0], txt.shape[0], img.device
    ok_img, ok_txt = finite_rows(img), finite_rows(txt)  # [N], [M]
    if normalize:
        img, txt = unit_rows(img), unit_rows(txt)

    # text -> image: rank of the correct image = #(s > s_c) + #(s == s_c and index < c)
    t2i_rank = torch.empty(m, dtype=torch.long, device=dev)
    idx_n = torch.arange(n, device=dev)
    for i in range(0, m, chunk_size):
        s = _scores(txt[i:i + chunk_size], img)  # [c, N]
        tgt = text_to_image[i:i + chunk_size]  # [c]
        miss = _misses(s, ok_txt[i:i + chunk_size], ok_img) | ~ok_img[tgt]
        s = s.masked_fill(~ok_img[None], float("-inf"))   # a non-finite image ranks last
        sc = s.gather(1, tgt[:, None])  # [c, 1]
        rank = (s > sc).sum(1) + ((s == sc) & (idx_n[None] < tgt[:, None])).sum(1)
        t2i_rank[i:i + chunk_size] = rank.masked_fill(miss, _MISS)

    # image -> text: rank of the best-ranked correct caption (highest score, then lowest index)
    i2t_rank = torch.empty(n, dtype=torch.long, device=dev)
    idx_m = torch.arange(m, device=dev)
    for i in range(0, n, chunk_size):
        s = _scores(img[i:i + chunk_size], txt)  # [c, M]
        rows = torch.arange(i, min(i + chunk_size, n), device=dev)  # [c]
        correct = text_to_image[None, :] == rows[:, None]  # [c, M]
        miss = _misses(s, ok_img[i:i + chunk_size], ok_txt) | ~(correct & ok_txt[None]).any(1)
        s = s.masked_fill(~ok_txt[None], float("-inf"))   # a non-finite caption ranks last
        best = s.masked_fill(~correct, float("-inf")).max(1, keepdim=True).values  # [c, 1]
        first = torch.where(correct & (s == best), idx_m[None], m).min(1, keepdim=True).values  # [c, 1]
        rank = (s > best).sum(1) + ((s == best) & (idx_m[None] < first)).sum(1)
        i2t_rank[i:i + chunk_size] = rank.masked_fill(miss, _MISS)

    out = {}
    # (a K past int64 is every rank: compared as _MISS, which only the misses reach)
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < min(k, _MISS)).float().mean().item()
    for k in ks:
        out[f"text_to_image_R@{k}"] = (t2i_rank < min(k, _MISS)).float().mean().item()
    out["mean_recall"] = sum(out.values()) / len(out)
    return out


def _scores(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """float32 ``[c, K]`` similarities of ``queries`` ``[c, D]`` to ``candidates`` ``[K, D]``
    (both float32), accumulated in float64 and rounded once. A float32 product's last bit
    depends on how BLAS blocks it, i.e. on the chunk's height, which then decided near-ties
    (chunk_size is a memory setting: results must not depend on it); the float64 sums of float32
    products differ by chunk only far below a float32 ulp, which the rounding removes."""
    return (queries.double() @ candidates.double().t()).float()


def _misses(s: torch.Tensor, ok_query: torch.Tensor, ok_cand: torch.Tensor) -> torch.Tensor:
    """BoolTensor ``[c]``: queries that cannot be ranked, those with non-finite features of their
    own and those with a non-finite similarity to a finite candidate (NaN compares false with
    everything, which would rank such a query first). Similarities to non-finite candidates are
    not counted here: those candidates are ranked last instead."""
    return ~ok_query | (~torch.isfinite(s) & ok_cand[None]).any(1)
