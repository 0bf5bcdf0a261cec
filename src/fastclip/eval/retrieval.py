"""Image <-> text retrieval recall@K, computed in row chunks (never the full N x M matrix)."""
from __future__ import annotations

import numbers
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

from ._checks import class_indices, fp32_math

# The rank of a query that cannot be ranked (a non-finite similarity): beyond every K.
_MISS = torch.iinfo(torch.long).max


@torch.no_grad()
def retrieval_metrics(image_features: torch.Tensor, text_features: torch.Tensor,
                      text_to_image: Optional[torch.Tensor] = None, ks: Sequence[int] = (1, 5, 10),
                      chunk_size: int = 1024, normalize: bool = True) -> Dict[str, float]:
    """Recall@K for image->text and text->image retrieval by cosine (or dot, ``normalize=False``)
    similarity.

    ``image_features`` ``[N, D]``, ``text_features`` ``[M, D]``; ``text_to_image`` LongTensor ``[M]``
    gives each caption's image (default: ``arange(N)``, one caption per image, M == N). An image
    query is correct at K when any of its captions ranks in the top K; a caption query when its
    image does. Ties are broken by index, exactly as a stable descending sort would (a candidate
    with an equal score and a lower index ranks first). A query with a non-finite similarity
    (NaN or inf features: a diverged model) is a miss at every K. Similarities are computed
    ``chunk_size`` query rows at a time (``[chunk_size, N or M]`` at most).

    Returns ``{"image_to_text_R@K": ..., "text_to_image_R@K": ..., "mean_recall": ...}`` as
    fractions in [0, 1].
    """
    if image_features.dim() != 2 or text_features.dim() != 2 or image_features.shape[1] != text_features.shape[1]:
        raise ValueError(f"image_features [N, D] and text_features [M, D] must share D, got "
                         f"{tuple(image_features.shape)} and {tuple(text_features.shape)}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if isinstance(ks, (str, bytes)) or not ks or any(
            isinstance(k, bool) or not isinstance(k, numbers.Integral) or k <= 0 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    ks = [int(k) for k in ks]
    n, m = image_features.shape[0], text_features.shape[0]
    dev = image_features.device
    if text_to_image is None:
        if n != m:
            raise ValueError(f"text_to_image is required when the number of texts ({m}) != images ({n})")
        text_to_image = torch.arange(n, device=dev)
    text_to_image = torch.as_tensor(text_to_image, device=dev)
    if text_to_image.shape != (m,):
        raise ValueError(f"text_to_image must have shape [{m}], got {tuple(text_to_image.shape)}")
    text_to_image = class_indices(text_to_image, "text_to_image (image index of each caption)", n)
    if torch.bincount(text_to_image, minlength=n).min() == 0 if n else False:
        raise ValueError("text_to_image: every image needs at least one caption")
    with fp32_math():   # float32 similarities even inside a caller's bf16 autocast
        return _recalls(image_features.float(), text_features.float().to(dev), text_to_image, ks,
                        chunk_size, normalize)


def _recalls(img: torch.Tensor, txt: torch.Tensor, text_to_image: torch.Tensor, ks: Sequence[int],
             chunk_size: int, normalize: bool) -> Dict[str, float]:
    n, m, dev = img.shape[0], txt.shape[0], img.device
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)

    # text -> image: rank of the correct image = #(s > s_c) + #(s == s_c and index < c)
    t2i_rank = torch.empty(m, dtype=torch.long, device=dev)
    idx_n = torch.arange(n, device=dev)
    for i in range(0, m, chunk_size):
        s = txt[i:i + chunk_size] @ img.t()  # [c, N]
        tgt = text_to_image[i:i + chunk_size]  # [c]
        sc = s.gather(1, tgt[:, None])  # [c, 1]
        rank = (s > sc).sum(1) + ((s == sc) & (idx_n[None] < tgt[:, None])).sum(1)
        t2i_rank[i:i + chunk_size] = rank.masked_fill(~torch.isfinite(s).all(1), _MISS)

    # image -> text: rank of the best-ranked correct caption (highest score, then lowest index)
    i2t_rank = torch.empty(n, dtype=torch.long, device=dev)
    idx_m = torch.arange(m, device=dev)
    for i in range(0, n, chunk_size):
        s = img[i:i + chunk_size] @ txt.t()  # [c, M]
        rows = torch.arange(i, min(i + chunk_size, n), device=dev)  # [c]
        correct = text_to_image[None, :] == rows[:, None]  # [c, M]
        best = s.masked_fill(~correct, float("-inf")).max(1, keepdim=True).values  # [c, 1]
        first = torch.where(correct & (s == best), idx_m[None], m).min(1, keepdim=True).values  # [c, 1]
        rank = (s > best).sum(1) + ((s == best) & (idx_m[None] < first)).sum(1)
        i2t_rank[i:i + chunk_size] = rank.masked_fill(~torch.isfinite(s).all(1), _MISS)

    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = (i2t_rank < k).float().mean().item() if n else 0.0
    for k in ks:
        out[f"text_to_image_R@{k}"] = (t2i_rank < k).float().mean().item() if m else 0.0
    out["mean_recall"] = sum(out.values()) / len(out)
    return out
