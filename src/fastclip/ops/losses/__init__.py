"""Loss heads on the one block contract of :mod:`fastclip.ops.backends`.

A contrastive loss over the logits ``z_ij = s * rho_i * sigma_j * <x_i, y_j> + b`` is, for
fastclip, two things (docs/design.md §1-§2):

* an **epilogue**: what a tile of logits turns into. Every block of rows x columns yields
  per-row statistics ``row [n]``, per-column statistics ``col [m]`` and the positive logits
  ``pos [n]``; the statistics of two blocks combine with the loss's **merge** ("lse":
  ``logaddexp``, as a softmax needs; "sum": plain addition, as a sigmoid needs). The
  epilogue is written once per backend as a policy (C++ template parameter, Triton
  constexpr, CUDA template parameter) and once here in plain PyTorch (``ref_stats`` and
  ``ref_dz``: the reference backend and the oracle of the kernels).
* a **head**: the scalar loss from the merged statistics of a block of rows and their own
  columns, ``head(row, col, pos)`` summed over all rows and divided by
  ``denominator(N)``. Its gradient with respect to the statistics is taken by autograd
  everywhere (single device and :mod:`fastclip.distributed`), never derived by hand.

:class:`LossSpec` holds both; :data:`LOSSES` maps a loss name to its spec. Adding a loss is
a new module here plus its epilogue in each backend (``ops/backends/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

__all__ = ["STAT_DTYPE", "LossSpec", "LinearHead", "LOSSES", "register_loss", "get_loss", "merge",
           "merge_identity", "head_grads"]

_MERGES = ("lse", "sum")

# The statistics (row, col, pos) are float64 whatever the features' dtype: a log-sum-exp
# of logits of size 1e4 rounded to fp32 is off by up to 5e-4, an error every exp(z - lse)
# of the backward would inherit (measured: 1.4e-5 relative on the feature gradients at
# s = 1e4, against 8e-7 for PyTorch's fp32 softmax); a sum of N² sigmoid terms wants the
# range. They are O(N): the cost is nil. Kernels still compute every tile in fp32.
STAT_DTYPE = torch.float64


class LinearHead:
    """A head that is a weighted sum of the statistics: ``wr·Σrow + wc·Σcol + wp·Σpos``.

    Its gradient with respect to the statistics is the weights themselves, known before
    any statistic exists: what a one-pass loss needs (and what lets a compiled graph take
    it without differentiating the head)."""

    def __init__(self, wr: float, wc: float, wp: float):
        self.coef = (float(wr), float(wc), float(wp))

    def __call__(self, row: Tensor, col: Tensor, pos: Tensor) -> Tensor:
        # Weighted per row, then summed: each row's terms cancel before the sum does (a
        # CLIP loss of 0.01 is a difference of statistics of size ~20 per row).
        wr, wc, wp = self.coef
        per_row = row if wr == 1.0 else row * wr
        if wc:
            per_row = per_row + col if wc == 1.0 else per_row + col * wc
        if wp:
            per_row = torch.add(per_row, pos, alpha=wp)
        return per_row.sum()


@dataclass(frozen=True)
class LossSpec:
    """One loss = an epilogue and a head (see the module docstring).

    name: the loss's name in every layer ("clip", "siglip").
    code: the epilogue's id in the compiled and Triton kernels (``LossKind`` in
        csrc/common.h); stable, unique.
    params: names of the scalar parameters, in kernel order: ``params[0]`` is always the
        scale s (already exponentiated), ``params[1]`` the bias b when present.
    init: the parameters' usual initial values (the paper's), in ``params`` order: what
        trainers, tests and benchmarks start from.
    merge: "lse" or "sum": how the row/column statistics of two blocks combine (also
        across ranks).
    one_pass: the epilogue's derivative ``dz`` does not read the merged statistics and the
        head is a :class:`LinearHead`, so a block's gradients are known as soon as its tile
        is: backends may compute loss and gradients in one pass (``fwd_bwd``).
    head: (row [n], col [n] of the same rows' own columns, pos [n]) -> 0-dim partial sum.
    denominator: N (global rows) -> the divisor of the summed heads.
    ref_stats: (z [b, m] logits, is_pos [b, m] bool) -> (row part [b], col part [m]),
        float64.
    ref_dz: (z, is_pos, row [b], col [m], grad_row [b], grad_col [m]) -> dloss/dz [b, m]
        in z's dtype, for the statistics' upstream gradients (the positive's ``grad_pos``
        is added by the caller).
    naive: the textbook formula on [N, D] features (materialises N x N): the test oracle
        in float64 and the benchmarks' peer.
    """

    name: str
    code: int
    params: tuple[str, ...]
    init: tuple[float, ...]
    merge: str
    one_pass: bool
    head: Callable[[Tensor, Tensor, Tensor], Tensor]
    denominator: Callable[[int], int]
    ref_stats: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    ref_dz: Callable[..., Tensor]
    naive: Callable[..., Tensor]

    def __post_init__(self):
        if self.merge not in _MERGES:
            raise ValueError(f"merge must be one of {_MERGES}, got {self.merge!r}")
        if not self.params or self.params[0] != "logit_scale":
            raise ValueError("params[0] of every loss is the scale 'logit_scale'")
        if len(self.init) != len(self.params):
            raise ValueError("init needs one value per parameter")
        if self.one_pass and not isinstance(self.head, LinearHead):
            raise ValueError("a one-pass loss needs a LinearHead: its statistics' gradients "
                             "must be known before the statistics")


LOSSES: dict[str, LossSpec] = {}


def register_loss(spec: LossSpec) -> LossSpec:
    for other in LOSSES.values():
        if other.code == spec.code and other.name != spec.name:
            raise ValueError(f"loss code {spec.code} of {spec.name!r} is taken by {other.name!r}")
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"loss={name!r} is not a fastclip loss; expected one of {sorted(LOSSES)}")
    return LOSSES[name]


def merge_identity(kind: str) -> float:
    """The statistic of an empty block: -inf for "lse", 0 for "sum"."""
    return float("-inf") if kind == "lse" else 0.0


def merge(kind: str, a: Optional[Tensor], b: Tensor) -> Tensor:
    """Combine the statistics of two blocks (``a`` may be None: nothing yet)."""
    if a is None:
        return b
    return torch.logaddexp(a, b) if kind == "lse" else a + b


def head_grads(spec: LossSpec, row: Tensor, col: Tensor, pos: Tensor, denom: float
               ) -> tuple[Tensor, Tensor, Tensor]:
    """d(head(row, col, pos) / denom) / d(row, col, pos): the weights of a
    :class:`LinearHead` (only the shapes of the statistics matter then, so zeros may be
    passed before any statistic exists), else by autograd on the head."""
    if isinstance(spec.head, LinearHead):
        # (a fill of w / denom: an .item() of a symbolic float under torch.compile(dynamic=True))
        return tuple(torch.full_like(t, w) / denom for w, t in zip(spec.head.coef, (row, col, pos)))
    with torch.enable_grad():
        r, c, p = (t.detach().requires_grad_() for t in (row, col, pos))
        out = spec.head(r, c, p) / denom
        grads = torch.autograd.grad(out, (r, c, p), allow_unused=True)
    return tuple(torch.zeros_like(t) if g is None else g.detach()
                 for g, t in zip(grads, (row, col, pos)))


# The built-in losses register themselves.
from . import clip, siglip  # noqa: E402,F401
