"""Exact contrastive losses across ``torch.distributed`` ranks (docs/design.md §3).

Each of W ranks holds its own rows: image features ``X_k`` [n_k, D] and text features
``Y_k`` [n_k, D] (``n_k`` may differ between ranks; N = Σ n_k; the positive of global row
i is global column i, rows ordered by rank). :func:`clip_loss` and :func:`siglip_loss`
return the loss of the concatenated N-row batch on every rank, computed by the fused block
kernels of :mod:`fastclip.ops.contrastive_loss`; nothing N×N or n×N is ever held.

Every loss is the same code here: the block statistics merge with the loss's ``merge``
(:mod:`fastclip.ops.losses`), the loss is the loss's ``head`` summed over ranks, and its
gradient with respect to the statistics comes from the head (its weights, or autograd).

Two forms, same numbers:

* ``dist_impl="gather"``: ``Y`` is all-gathered once (no autograd), rank k runs one block
  ``X_k × Y_all``; its row statistics are complete, its column statistics are partial and
  are merged across ranks by an all-reduce (for a log-sum-exp: one SUM of the sums shifted
  by a bound of the logits known to every rank, with a MAX first only when that bound
  exceeds what the shift can take). The column gradient goes home with one reduce-scatter. Memory O(N·D)
  per rank. On the steady state (the same sizes and configuration as the previous call)
  the ranks' metadata travels inside the all-gather of ``Y``: no extra collective.
* ``dist_impl="ring"``: the ``Y`` blocks travel around the ring while ``X_k`` stays. A
  travelling block carries what its columns need; partial column results (statistics in
  the forward, gradients in the backward) follow it one step behind, so after W steps
  every block's are home complete. The send of the next block is posted before the tile
  work on the current one, so communication overlaps compute. Memory O(n·D) per rank.

Two-pass losses (CLIP's softmax) do 8·n_k·N·D FLOP per rank (the backward recomputes the
tiles); one-pass losses (SigLIP's sigmoid) compute their gradients in the forward's pass,
6·n_k·N·D, and the backward only scales them (the CPU and CUDA kernels' counts; the Triton
kernels recompute the tiles once more: 10 and 8 while D fits one BLOCK_DO, more beyond).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import astuple, dataclass, fields
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .ops.backends import Backend, backend_by_code
from .ops.contrastive_loss import (
    DEFAULT_EPS,
    _functorch_active,
    block_bwd,
    block_fwd_bwd,
    kernel_layout,
    prepare_params,
    promote_features,
    savable_for_backward,
    select_backend,
    validate_features,
    validate_options,
)
from .ops.contrastive_loss import block_fwd as _block_fwd_diff
from .ops.contrastive_loss import one_pass as uses_one_pass
from .ops.losses import STAT_DTYPE, LinearHead, LossSpec, get_loss, head_grads, merge

__all__ = ["clip_loss", "siglip_loss", "fused_loss", "DistributedLossError"]

_IMPLS = ("gather", "ring")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# Parameters that differ by more than this (relative) between ranks are a caller bug: each
# rank would compute a different "full-batch" loss. Identical parameters on identical
# hardware give bit-identical values; the tolerance only forgives mixed hardware.
_PARAM_RTOL = 1e-6
_MAX_PARAMS = 2


class DistributedLossError(RuntimeError):
    """The ranks of a sharded loss call disagree, or the group cannot carry the features.

    Raised on every rank of the group (the ranks first exchange a small metadata record, so
    a mismatch never leaves some ranks waiting in a large collective)."""


# --------------------------------------------------------------------- the handshake
@dataclass(frozen=True)
class _Meta:
    """What a rank tells the others before any large collective (float64 on the wire)."""

    ok: float              # 1: the local inputs are valid
    rows: float
    dim: float
    dtype: float           # _DTYPE_CODES
    normalize: float
    eps: float
    impl: float            # index in _IMPLS
    loss: float            # LossSpec.code
    backend: float         # Backend.code
    grad: float            # 1: this call records a backward (the collectives differ then)
    xnorm: float           # the largest row norm the kernels see: 1 with normalize
    ynorm: float           # (xnorm, ynorm, params: the last fields, filled on the device)
    param0: float          # logit_scale
    param1: float          # logit_bias (NaN when the loss has none)

    @staticmethod
    def invalid() -> "_Meta":
        return _Meta(0.0, *([-1.0] * (len(fields(_Meta)) - 1)))

    def tensor(self, device, params: Optional[Tensor] = None,
               norms: Optional[Tensor] = None) -> Tensor:
        """On ``device``; the parameters and the row norms join there from ``params`` and
        ``norms`` (no host sync: the only one is reading the gathered records)."""
        t = torch.tensor(astuple(self), dtype=torch.float64, device=device)
        first = len(fields(_Meta)) - _MAX_PARAMS
        if params is not None:
            t[first:first + params.numel()] = params.detach().reshape(-1).to(torch.float64)
        if norms is not None:
            t[first - 2:first] = norms.to(torch.float64)
        return t

    @staticmethod
    def size() -> int:
        return len(fields(_Meta))


# (name, how to show a value) of the fields every rank must agree on.
_AGREE = (
    ("dim", "D", lambda v: int(v)),
    ("dtype", "dtype", lambda v: str(_CODE_DTYPES[int(v)]).replace("torch.", "")),
    ("normalize", "normalize", lambda v: bool(v)),
    ("eps", "eps", lambda v: v),
    ("impl", "dist_impl", lambda v: _IMPLS[int(v)]),
    ("loss", "loss", lambda v: next((s for s in _loss_names() if get_loss(s).code == int(v)),
                                    "other")),
    ("backend", "backend", lambda v: getattr(backend_by_code(int(v)), "name", "other")),
    # One rank evaluating (no_grad, or features that need no gradient) while another trains:
    # their collectives would pair a forward with another call's (a rank's extra call).
    ("grad", "whether the call needs gradients", lambda v: bool(v)),
)


def _loss_names():
    from .ops.losses import LOSSES  # noqa: PLC0415
    return list(LOSSES)


def _same_param(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):      # a diverged run: every rank's is NaN
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= _PARAM_RTOL * max(abs(a), abs(b))


# A log-sum-exp merge of column statistics shifted by a bound B of the logits, known to
# every rank without a collective: c = B + log Σ_k exp(c_k - B). With |z| <= B every
# c_k - B lies in [-2B, log n]: exact in float64 (the statistics' dtype) while 2B stays
# far from exp's underflow at -745. Saves the all-reduce MAX of the general merge.
_SHIFT_MAX = 300.0


def _logit_bound(metas: list[_Meta]) -> Optional[float]:
    """A bound on |z| = |s <x̂, ŷ> + b| every rank computes alike from the gathered records
    (rank 0's parameters, the largest row norms of all ranks), or None when there is none
    small enough (or a value is not finite)."""
    s, b = abs(metas[0].param0), metas[0].param1
    bound = (s * max(m.xnorm for m in metas) * max(m.ynorm for m in metas)
             + (0.0 if math.isnan(b) else abs(b)))
    return bound if math.isfinite(bound) and bound <= _SHIFT_MAX else None


def _agree(metas: list[_Meta], rank: int, problem: Optional[str], group=None) -> list[int]:
    """Raise the same DistributedLossError on every rank unless all metadata agree; return
    the per-rank row counts. Ranks are named by their global rank (``torch.distributed``'s
    ``get_rank()``), also in a subgroup."""
    if problem is not None:
        raise DistributedLossError(f"rank {_global_rank(group, rank)}: invalid input to the sharded "
                                   f"loss: {problem}")
    bad = [_global_rank(group, r) for r, m in enumerate(metas) if m.ok != 1.0]
    if bad:
        raise DistributedLossError(f"rank(s) {bad} of the process group passed invalid input "
                                   f"(see the error on those ranks); no rank computed a loss")
    for attr, label, show in _AGREE:
        vals = [getattr(m, attr) for m in metas]
        if any(v != vals[0] for v in vals):
            raise DistributedLossError(
                f"the ranks disagree on {label}: per rank {[show(v) for v in vals]}; every rank "
                f"must pass features of the same D and dtype and the same normalize, eps, "
                f"dist_impl, loss and backend")
    for attr, label in (("param0", "logit_scale"), ("param1", "logit_bias")):
        vals = [getattr(m, attr) for m in metas]
        if not all(_same_param(v, vals[0]) for v in vals):
            raise DistributedLossError(f"the ranks disagree on {label}: per rank {vals}; it "
                                       f"must be the same (replicated) value on every rank")
    return [int(m.rows) for m in metas]


# ------------------------------------------------------------------ group plumbing
def _group_devices(group) -> dict[str, str]:
    """{device type: backend} the group can carry, e.g. {'cpu': 'gloo', 'cuda': 'nccl'}."""
    try:
        cfg = dist.get_backend_config(group)           # "cpu:gloo,cuda:nccl" or "nccl"
    except (AttributeError, RuntimeError, ValueError):
        cfg = str(dist.get_backend(group))
    out: dict[str, str] = {}
    for part in cfg.split(","):
        part = part.strip()
        if ":" in part:
            dev, be = part.split(":", 1)
            out[dev.strip()] = be.strip()
        elif part:   # a bare name: the device types that backend is known to carry
            devs = {"nccl": ("cuda",), "gloo": ("cpu",), "mpi": ("cpu", "cuda")}.get(
                part.lower(), ("cpu", "cuda"))
            for dev in devs:
                out[dev] = part
    return out


def _global_rank(group, group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


def _gather_single():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _pad_rows(t: Tensor, rows: int) -> Tensor:
    if t.shape[0] == rows:
        return t.contiguous()
    return torch.cat([t.contiguous(), t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))])


def _unpad(out: Tensor, sizes: list[int], nmax: int) -> Tensor:
    if all(s == nmax for s in sizes):
        return out
    return torch.cat([out[r * nmax: r * nmax + s] for r, s in enumerate(sizes)])


def _all_gather_rows(t: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenation over ranks of ``t`` [n_k, ...] (row counts ``sizes``) -> [N, ...]."""
    w, nmax = len(sizes), max(sizes)
    out = t.new_empty((w * nmax,) + tuple(t.shape[1:]))
    _gather_single()(out, _pad_rows(t, nmax), group=group)
    return _unpad(out, sizes, nmax)


_REDUCE_SCATTER_OK: dict[str, bool] = {}


def _reduce_scatter_rows(t: Tensor, sizes: list[int], rank: int, group) -> Tensor:
    """Sum over ranks of ``t`` [N, D]; rank k receives its rows [n_k, D]."""
    w, nmax = len(sizes), max(sizes)
    offs = _offsets(sizes)
    be = str(dist.get_backend(group))
    if _REDUCE_SCATTER_OK.get(be, True):
        if all(s == nmax for s in sizes):
            src = t.contiguous()
        else:    # pad every rank's slice to nmax rows: [W * nmax, D]
            src = t.new_zeros((w * nmax,) + tuple(t.shape[1:]))
            for r in range(w):
                src[r * nmax: r * nmax + sizes[r]] = t[offs[r]:offs[r + 1]]
        out = t.new_empty((nmax,) + tuple(t.shape[1:]))
        rs_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:
            rs_single(out, src, group=group)
            return out[:sizes[rank]]
        except (RuntimeError, NotImplementedError) as e:
            # Older gloo builds have no reduce_scatter. The check fails on every rank
            # alike before anything is sent, so falling back keeps the ranks in step.
            if "support" not in str(e).lower() and "implement" not in str(e).lower():
                raise
            _REDUCE_SCATTER_OK[be] = False
    buf = t.contiguous().clone()
    dist.all_reduce(buf, group=group)
    return buf[offs[rank]:offs[rank + 1]]


def _all_reduce_merge(kind: str, t: Tensor, group, extra: Optional[Tensor] = None,
                      shift: Optional[float] = None):
    """The loss's merge of ``t`` across ranks: SUM, or an exact distributed log-sum-exp
    (c = M + log Σ_k exp(c_k - M), M = max_k c_k: MAX, then SUM of the rescaled values;
    with ``shift``, a bound of the logits every rank shares, M = shift and no MAX).
    ``extra`` (a few values to sum over ranks as well) rides in the SUM: returns
    (merged, summed extra) then, one collective less than a separate all-reduce."""
    k = 0 if extra is None else extra.numel()
    if kind == "sum":
        buf = t.clone() if extra is None else torch.cat([t, extra.reshape(-1).to(t.dtype)])
        dist.all_reduce(buf, group=group)
        merged = buf[:t.numel()]
    else:
        if shift is not None:
            safe = torch.full_like(t, shift)
        else:
            mx = t.clone()
            dist.all_reduce(mx, op=dist.ReduceOp.MAX, group=group)
            safe = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)   # all -inf stays -inf
        buf = torch.exp(t - safe)
        if extra is not None:
            buf = torch.cat([buf, extra.reshape(-1).to(t.dtype)])
        dist.all_reduce(buf, group=group)
        merged = safe + torch.log(buf[:t.numel()])
    return merged if extra is None else (merged, buf[t.numel():t.numel() + k])


def _offsets(sizes: list[int]) -> list[int]:
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    return offs


# Tags keep the travelling blocks and the partial results that follow them on separate
# channels (gloo matches by peer and tag; NCCL ignores tags and keeps order).
_TAG_BLOCK, _TAG_ACC = 1, 2


def _ring_exchange(send: list[Tensor], recv: list[Tensor], nxt: int, prv: int, group, tag: int):
    """Post sends of ``send`` to ``nxt`` and receives of ``recv`` from ``prv``; returns
    the requests (waited on by the caller, after the overlapped work)."""
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, prv, group, tag) for t in recv]
    return dist.batch_isend_irecv(ops)


# -------------------------------------------------------------------------- the plan
class _Plan:
    """What every rank agreed on: sizes, offsets, the loss, the kernel configuration."""

    def __init__(self, group, rank: int, sizes: list[int], spec: LossSpec, be: Backend,
                 normalize: bool, eps: float, impl: str, shift: Optional[float] = None):
        # The plan lives on the loss's autograd node as long as the loss tensor does: a strong
        # reference there kept a destroyed gloo group alive, and its threads aborted the
        # interpreter at exit (SIGABRT, "terminate called without an active exception").
        self._group = weakref.ref(group)
        self.rank, self.sizes = rank, sizes
        self.world = len(sizes)
        self.offsets = _offsets(sizes)
        self.N = self.offsets[-1]
        self.spec, self.be, self.normalize, self.eps, self.impl = spec, be, normalize, eps, impl
        self.denom = spec.denominator(self.N)
        self.linear = isinstance(spec.head, LinearHead)
        # Only heads that read the column statistics need them merged across ranks.
        self.uses_cols = not self.linear or spec.head.coef[1] != 0.0
        self.shift = shift          # see _logit_bound

    @property
    def group(self):
        g = self._group()
        if g is None:
            raise DistributedLossError("the process group of this sharded loss was destroyed before "
                                       "its backward; call backward() before destroy_process_group()")
        return g

    @property
    def own(self) -> slice:
        return slice(self.offsets[self.rank], self.offsets[self.rank + 1])

    def ring_peers(self) -> tuple[int, int]:
        W, k = self.world, self.rank
        return (_global_rank(self.group, (k + 1) % W), _global_rank(self.group, (k - 1) % W))

    def col_grads(self, block: int, like: Tensor, own_grad: Optional[Tensor]) -> Tensor:
        """Upstream gradient of block ``block``'s column statistics: the head's weight (a
        linear head), or the owning rank's autograd gradient (``own_grad``, travelled)."""
        if self.linear:
            return torch.full((self.sizes[block],), self.spec.head.coef[1] / self.denom,
                              dtype=like.dtype, device=like.device)
        return own_grad


def _unit_grads(plan: _Plan, row: Tensor, col_own: Tensor, pos: Tensor):
    """d(loss)/d(this rank's statistics) for an upstream gradient of 1."""
    return head_grads(plan.spec, row, col_own, pos, plan.denom)


def _finish_forward(ctx, plan: _Plan, row: Tensor, col_own: Tensor, pos: Tensor,
                    dtype: torch.dtype) -> Tensor:
    """The loss over all ranks' rows: Σ_ranks head(row, own columns, pos) / denominator,
    summed in the statistics' float64, returned in ``dtype``."""
    total = plan.spec.head(row, col_own, pos)
    dist.all_reduce(total, group=plan.group)
    ctx.plan = plan
    return (total / plan.denom).to(dtype)


def _upstream_total(plan: _Plan, g: Tensor, acc: torch.dtype) -> Tensor:
    """Σ_ranks g, the factor of every rank's feature gradients (0-dim, ``acc`` dtype)."""
    t = g.detach().reshape(1).to(acc).clone()
    dist.all_reduce(t, group=plan.group)
    return t[0]


def _finish_backward(plan: _Plan, g: Tensor, dp_local: Tensor, dx: Tensor, dy: Tensor,
                     x: Tensor, y: Tensor, params: Tensor):
    """Apply the gradient contract to the unit-upstream gradients of a one-pass forward:
    features get (Σ_ranks g) × the unit-gradient VJP, the parameters get mean_ranks(g) ×
    the full-batch derivative (Σ of the ranks' parts). Out of place: the saved gradients
    stay unscaled for a second backward (retain_graph)."""
    acc = dp_local.dtype
    red = torch.cat([dp_local.reshape(-1).to(acc), g.reshape(1).to(acc)])
    dist.all_reduce(red, group=plan.group)
    dp_full, g_tot = red[:-1], red[-1]
    dparams = (dp_full * (g_tot / plan.world)).to(params.dtype)
    return (dx * g_tot).to(x.dtype), (dy * g_tot).to(y.dtype), dparams


def _finish_scaled_backward(plan: _Plan, dp_local: Tensor, dx: Tensor, dy: Tensor, x: Tensor,
                            y: Tensor, params: Tensor):
    """The same contract for gradients whose kernels already had Σ_ranks g in their
    upstream vectors (the two-pass backwards): the scale reaches the gradients before
    their rounding to the features' dtype (fp16 under a GradScaler: see
    fastclip.ops.contrastive_loss.one_pass). The parameters' parts are summed over the
    ranks and divided by W."""
    dp_full = dp_local.reshape(-1).clone()
    dist.all_reduce(dp_full, group=plan.group)
    return dx.to(x.dtype), dy.to(y.dtype), (dp_full / plan.world).to(params.dtype)


def _first_order(backward):
    """``once_differentiable``, loudly: a backward with ``create_graph=True`` (a second
    derivative) raises, where once_differentiable would return a gradient without its graph
    whenever the upstream gradient needs none (a gradient penalty would silently vanish)."""
    inner = torch.autograd.function.once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled() and any(ctx.needs_input_grad):
            raise RuntimeError(
                "fastclip.distributed losses are first-order: a backward with create_graph=True "
                "(a second derivative, e.g. a gradient penalty) is not supported across ranks; "
                "the single-process losses (fastclip.clip_loss, fastclip.siglip_loss) support it")
        return inner(ctx, *grads)
    return wrapper


class _GatherLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, params: Tensor, plan: _Plan, y_all):
        spec, be, o = plan.spec, plan.be, plan.offsets[plan.rank]
        if y_all is None:
            y_all = _all_gather_rows(y, plan.sizes, plan.group)            # [N, D]
        one_pass = uses_one_pass(spec, x.dtype) and any(ctx.needs_input_grad[:3])
        if one_pass:
            n = x.shape[0]
            z = torch.zeros(n, dtype=STAT_DTYPE, device=x.device)
            gr, _, gp = _unit_grads(plan, z, z, z)
            gc = torch.cat([plan.col_grads(b, z, None) for b in range(plan.world)])
            row, col, pos, dx, dy_all, dp = block_fwd_bwd(
                spec, be, x, y_all, params, plan.normalize, plan.eps, o, gr, gc, gp)
        else:
            with torch.no_grad():
                row, col, pos = _block_fwd_diff(spec, be, x, y_all, params, plan.normalize,
                                                plan.eps, o)
        total = None
        if plan.uses_cols and plan.linear:
            # A linear head's row and positive terms ride in the columns' SUM: every rank
            # then has every column's statistic, and the loss needs no collective of its own.
            wr, wc, wp = spec.head.coef
            part = (row * wr + pos * wp).sum().reshape(1)
            col, part = _all_reduce_merge(spec.merge, col, plan.group, extra=part,
                                          shift=plan.shift)
            total = part[0] + wc * col.sum()                               # float64
        elif plan.uses_cols:
            col = _all_reduce_merge(spec.merge, col, plan.group, shift=plan.shift)
        col_own = col[plan.own]
        if one_pass:
            ctx.save_for_backward(*map(savable_for_backward, (x, y_all, params)), dx, dy_all, dp)
        else:
            ctx.save_for_backward(*map(savable_for_backward, (x, y_all, params)), row, col, pos)
        ctx.one_pass = one_pass
        if total is not None:
            ctx.plan = plan
            return (total / plan.denom).to(params.dtype)
        return _finish_forward(ctx, plan, row, col_own, pos, params.dtype)

    @staticmethod
    @_first_order
    def backward(ctx, g):
        plan = ctx.plan
        if ctx.one_pass:
            x, y_all, params, dx, dy_all, dp = ctx.saved_tensors
        else:
            x, y_all, params, row, col, pos = ctx.saved_tensors
            g_tot = _upstream_total(plan, g, params.dtype)
            gr, gc_own, gp = (t * g_tot for t in _unit_grads(plan, row, col[plan.own], pos))
            gc = (torch.cat([plan.col_grads(b, col, None) for b in range(plan.world)]) * g_tot
                  if plan.linear else _all_gather_rows(gc_own, plan.sizes, plan.group))
            dx, dy_all, dp = block_bwd(plan.spec, plan.be, x, y_all, params, plan.normalize,
                                       plan.eps, plan.offsets[plan.rank], row, col, gr, gc, gp)
        # Column gradients are summed over the ranks' row blocks in the accumulation
        # dtype, then each rank keeps its own rows.
        dy = _reduce_scatter_rows(dy_all.to(params.dtype), plan.sizes, plan.rank, plan.group)
        if not ctx.one_pass:
            return (*_finish_scaled_backward(plan, dp, dx, dy, x, y_all, params), None, None)
        dx, dy, dparams = _finish_backward(plan, g, dp, dx.to(params.dtype), dy, x, y_all, params)
        return dx, dy, dparams, None, None


def _ring_pass(plan: _Plan, ahead: list[Tensor], step, merges: list[str]) -> list[Tensor]:
    """Run ``step(b, ahead_b) -> parts_b`` for every block b of the ring; return the merged
    parts of this rank's own block.

    Schedule of step t on rank k (block b = (k - t) mod W in hand, with ``ahead_b``, the
    tensors that travel with it: its features and what its columns need):

    1. post the exchange of the next block (send b's to k+1, receive b-1's from k-1);
    2. run ``step`` on block b;
    3. wait for the partial results of b that rank k-1 posted at step t-1 (they crossed
       the link while step 2 ran), merge this rank's part in (``merges``: "lse" or "sum"
       per part), post them on to k+1;
    4. wait for the next block.

    The blocks (step 1) and the partial results (step 3) both travel while the kernel of the
    following step runs; only their latency is exposed. At step W-1 the partial results go
    to their home rank, so the ones that arrive last are our own block's, complete.
    """
    W, k, sizes = plan.world, plan.rank, plan.sizes
    nxt, prv = plan.ring_peers()
    cur = [t.contiguous() for t in ahead]
    in_flight = None        # (requests, sent parts, receive buffers)
    parts = None
    for t in range(W):
        b = (k - t) % W
        m_nxt = sizes[(b - 1) % W]
        reqs, nxt_bufs = [], None
        if t < W - 1:
            nxt_bufs = [c.new_empty((m_nxt,) + tuple(c.shape[1:])) for c in cur]
            reqs = _ring_exchange(cur, nxt_bufs, nxt, prv, plan.group, _TAG_BLOCK)
        mine = step(b, cur)
        if in_flight is None:
            parts = mine
        else:
            for r in in_flight[0]:
                r.wait()
            parts = [merge(kind, got, p) for kind, got, p in zip(merges, in_flight[2], mine)]
            in_flight = None        # what we sent last step can go now
        del mine
        if W > 1 and parts:
            bufs = [p.new_empty((m_nxt,) + tuple(p.shape[1:])) for p in parts]
            in_flight = (_ring_exchange(parts, bufs, nxt, prv, plan.group, _TAG_ACC), parts, bufs)
        for r in reqs:
            r.wait()
        if t < W - 1:
            cur = nxt_bufs
    if in_flight is not None:
        for r in in_flight[0]:
            r.wait()
        return in_flight[2]
    return parts


class _RingLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, params: Tensor, plan: _Plan, _unused):
        spec, be = plan.spec, plan.be
        o, k, acc = plan.offsets[plan.rank], plan.rank, params.dtype
        one_pass = uses_one_pass(spec, x.dtype) and any(ctx.needs_input_grad[:3])
        st = {"row": None, "pos": None, "dx": None, "dp": None}
        if one_pass:
            z = torch.zeros(x.shape[0], dtype=STAT_DTYPE, device=x.device)
            gr, _, gp = _unit_grads(plan, z, z, z)

        def step(b, ahead):
            yb = ahead[0]
            off = o - plan.offsets[b]
            if one_pass:
                r, c, p, dxp, dyp, dpp = block_fwd_bwd(
                    spec, be, x, yb, params, plan.normalize, plan.eps, off, gr,
                    plan.col_grads(b, z, None), gp)
                st["dx"] = dxp.to(acc) if st["dx"] is None else st["dx"].add_(dxp)
                st["dp"] = dpp if st["dp"] is None else st["dp"] + dpp
                out = [dyp.to(acc)]
            else:
                with torch.no_grad():
                    r, c, p = _block_fwd_diff(spec, be, x, yb, params, plan.normalize, plan.eps,
                                              off)
                out = []
            st["row"] = merge(spec.merge, st["row"], r)
            if b == k:
                st["pos"] = p
            return out + ([c] if plan.uses_cols else [])

        merges = (["sum"] if one_pass else []) + ([spec.merge] if plan.uses_cols else [])
        home = _ring_pass(plan, [y], step, merges)
        col_own = home[-1] if plan.uses_cols else torch.zeros_like(st["row"])
        if one_pass:
            ctx.save_for_backward(*map(savable_for_backward, (x, y, params)), st["dx"], home[0], st["dp"])
        else:
            ctx.save_for_backward(*map(savable_for_backward, (x, y, params)), st["row"], col_own, st["pos"])
        ctx.one_pass = one_pass
        return _finish_forward(ctx, plan, st["row"], col_own, st["pos"], params.dtype)

    @staticmethod
    @_first_order
    def backward(ctx, g):
        plan = ctx.plan
        if ctx.one_pass:
            x, y, params, dx, dy, dp = ctx.saved_tensors
            return (*_finish_backward(plan, g, dp, dx, dy, x, y, params), None, None)
        x, y, params, row, col_own, pos = ctx.saved_tensors
        spec, be, o, acc = plan.spec, plan.be, plan.offsets[plan.rank], params.dtype
        g_tot = _upstream_total(plan, g, acc)
        gr, gc_own, gp = (t * g_tot for t in _unit_grads(plan, row, col_own, pos))
        st = {"dx": None, "dp": None}

        def step(b, ahead):
            # A travelling block: its features, its complete column statistics and their
            # upstream gradient (sent ahead, overlapped); its partial gradient follows.
            yb, cb, gcb = ahead
            dxp, dyp, dpp = block_bwd(spec, be, x, yb, params, plan.normalize, plan.eps,
                                      o - plan.offsets[b], row, cb, gr, gcb, gp)
            st["dx"] = dxp.to(acc) if st["dx"] is None else st["dx"].add_(dxp)
            st["dp"] = dpp if st["dp"] is None else st["dp"] + dpp
            return [dyp.to(acc)]

        (dy,) = _ring_pass(plan, [y, col_own, gc_own], step, ["sum"])
        return (*_finish_scaled_backward(plan, st["dp"], st["dx"], dy, x, y, params), None,
                None)


# ------------------------------------------------------------------ public entry
# The agreed plan of the previous call, per process group: on the steady state the next
# call's metadata rides inside the all-gather of Y (see _handshake). Keyed by the group
# itself, held weakly: a destroyed group's plan goes with it. Keyed by id(group), a new group
# (or a re-initialised default group) could reuse a freed group's id on some ranks and not
# others, and those ranks posted the steady-state all-gather of the old plan's size against
# the others' metadata gather (gloo aborted the process: "Received data size doesn't match").
_LAST: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _meta_for(spec, image_features, normalize, eps, impl, be, problem, grad: bool) -> _Meta:
    if problem is not None:
        return _Meta.invalid()
    return _Meta(1.0, float(image_features.shape[0]), float(image_features.shape[1]),
                 float(_DTYPE_CODES[image_features.dtype]), float(normalize), float(eps),
                 float(_IMPLS.index(impl)), float(spec.code), float(be.code), float(grad),
                 float("inf"), float("inf"), *([float("nan")] * _MAX_PARAMS))


def _handshake(group, rank, world, meta: _Meta, params: Optional[Tensor],
               norms: Optional[Tensor], meta_dev, y: Optional[Tensor]):
    """Exchange every rank's metadata; returns (metas, y_all or None).

    First call on a group (or after the previous call used the ring): one small all-gather
    of the metadata. Steady state after a gather call: every rank all-gathers one byte
    buffer of the previous plan's size, its metadata followed by its Y rows padded to the
    previous plan's largest shard; when every rank's metadata still fits that plan the
    gathered rows are Y_all and no other collective was needed. The choice depends only on
    the previous agreed plan, identical on every rank, so the ranks always post collectives
    of the same size, whatever their local inputs are.
    """
    K = _Meta.size()
    last = _LAST.get(group)
    if last is None:
        mine = meta.tensor(meta_dev, params, norms)
        allm = torch.empty((world * K,), dtype=torch.float64, device=meta_dev)
        _gather_single()(allm, mine, group=group)
        return [_Meta(*r) for r in allm.view(world, K).tolist()], None
    sizes, dim, dtype = last
    nmax, esize = max(sizes), torch.empty((), dtype=dtype).element_size()
    payload = nmax * dim * esize
    seg = 8 * K + (payload + 7) // 8 * 8                      # 8-byte aligned segments
    buf = torch.zeros((seg,), dtype=torch.uint8, device=meta_dev)
    buf[:8 * K] = meta.tensor(meta_dev, params, norms).view(torch.uint8)
    fits = (y is not None and meta.ok == 1.0 and int(meta.rows) == sizes[rank]
            and int(meta.dim) == dim and y.dtype == dtype and y.device == meta_dev)
    if fits:
        # A byte view needs plain dense rows: one of a tensor with the negative bit set
        # (torch._neg_view, z.conj().imag) or of size-1 rows with a stride of 2 (which PyTorch
        # calls contiguous) raised on this rank alone, the others waiting in the all-gather.
        plain = y.is_contiguous() and not y.is_neg() and not y.is_conj() and (y.numel() == 0 or y.stride(-1) == 1)
        rows = y if plain else torch.empty(y.shape, dtype=y.dtype, device=y.device).copy_(y)
        buf[8 * K:8 * K + sizes[rank] * dim * esize] = rows.reshape(-1).view(torch.uint8)
    out = torch.empty((world * seg,), dtype=torch.uint8, device=meta_dev).view(world, seg)
    _gather_single()(out.view(-1), buf, group=group)
    metas = [_Meta(*r) for r in out[:, :8 * K].contiguous().view(torch.float64)
             .view(world, K).tolist()]
    same = all(m.ok == 1.0 and int(m.rows) == s and int(m.dim) == dim
               and _CODE_DTYPES.get(int(m.dtype)) == dtype and int(m.impl) == 0
               for m, s in zip(metas, sizes))
    if not same:
        return metas, None
    rows = [out[r, 8 * K:8 * K + s * dim * esize].view(dtype).view(s, dim)
            for r, s in enumerate(sizes)]
    return metas, torch.cat(rows)


def _max_row_norm(t: Tensor) -> Tensor:
    """An upper bound of the row norms of ``t`` [n, D], a float64 scalar on its device, no host
    sync: the largest row norm (in fp32 for fp32 and half features, in float64 for float64),
    or, where that sum of squares may have underflowed (below ~1e-18 in fp32, ~1e-150 in
    float64), sqrt(D) times the largest entry: an fp32 norm of float64 rows of norm ~1e-50 was
    0, the logit bound 0, and the shifted merge overflowed to an infinite loss."""
    if t.shape[0] == 0 or t.shape[1] == 0:
        return torch.zeros((), dtype=torch.float64, device=t.device)
    wide = t.dtype == torch.float64
    m = (t.norm(dim=1) if wide else t.float().norm(dim=1)).max().double()
    entry = torch.maximum(t.amax(), -t.amin()).double() * math.sqrt(t.shape[1])
    return torch.where(m < (1e-150 if wide else 1e-18), entry, m)


def _check_config(dist_impl, normalize, eps) -> None:
    """The call's configuration (not its data): TypeError/ValueError naming the argument."""
    if dist_impl not in _IMPLS:
        raise ValueError(f"dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
    validate_options(normalize, eps)


def fused_loss(loss: str, image_features: Tensor, text_features: Tensor, params, *,
                     normalize: bool = False, backend: str = "auto", process_group=None,
                     dist_impl: str = "gather", eps: float = DEFAULT_EPS,
                     expected_world_size: Optional[int] = None,
                     unused_bias: Optional[Callable[[], Tensor]] = None) -> Tensor:
    """The exact full-batch loss ``loss`` over the ranks of a group; ``params`` its scalar
    parameters in ``LossSpec.params`` order. See :func:`clip_loss` for the contract.

    ``unused_bias`` (for a loss without a bias, such as ``ClipLoss``'s ``logit_bias``, which
    the softmax ignores): a function returning it as a 0-dim tensor, or raising TypeError /
    ValueError for an invalid one. It is checked with the rank's other inputs and agreed
    across ranks like a parameter, before any collective other than the handshake: one rank's
    bad bias left the others waiting in the loss's collectives, and one rank's NaN bias gave
    that rank alone a NaN loss."""
    spec = get_loss(loss)
    if not dist.is_available() or not dist.is_initialized():
        # No group, no collective to keep in step: a bad configuration says so first.
        _check_config(dist_impl, normalize, eps)
        raise RuntimeError(f"fastclip.distributed.{loss}_loss needs an initialised process "
                           f"group: call torch.distributed.init_process_group(...) first "
                           f"(torchrun sets the environment), or use fastclip.{loss}_loss for "
                           f"one process")
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group; call the loss only "
                         "on the group's ranks")
    # The metadata exchange needs a tensor on a device the group carries: pick it before
    # any other check so that a rank with bad inputs (or a bad configuration: one rank's
    # wrong dist_impl, eps or world_size) still takes part and every rank raises the same
    # error instead of leaving the others to pair with this rank's next call.
    carry = _group_devices(group)
    feat_dev = image_features.device if isinstance(image_features, Tensor) else None
    problem = None
    try:
        _check_config(dist_impl, normalize, eps)
    except (TypeError, ValueError) as e:
        problem = str(e)
    if problem is None and expected_world_size is not None and expected_world_size != world:
        problem = (f"world_size={expected_world_size} was configured (e.g. "
                   f"ClipLoss(world_size=...)) but the process group has {world} ranks; pass "
                   f"the group's size")
    if problem is None and _functorch_active():
        # (PyTorch's own error named a missing setup_context, words for the library's author)
        problem = (f"fastclip.distributed.{loss}_loss does not run under torch.func transforms "
                   f"(grad, vjp, jacrev, vmap): the ranks' collectives take plain tensors; use "
                   f"loss.backward() or torch.autograd.grad, or fastclip.{loss}_loss in one "
                   f"process")
    if problem is None and feat_dev is not None and feat_dev.type not in carry:
        problem = (
            f"the features are on {feat_dev} but the process group's backend "
            f"({dist.get_backend(group)}: carries {', '.join(sorted(carry)) or 'nothing'}) "
            f"cannot move {feat_dev.type} tensors; use NCCL for CUDA tensors and gloo for CPU "
            f"tensors (init_process_group(backend='cpu:gloo,cuda:nccl') carries both)")
    if feat_dev is not None and problem is None:
        meta_dev = feat_dev
    else:
        meta_dev = torch.device("cpu") if "cpu" in carry else torch.device(
            "cuda", torch.cuda.current_device())

    p = be = norms = bias = None
    if problem is None:
        try:
            validate_features(image_features, text_features, same_dtype=False)
            image_features, text_features = promote_features(image_features, text_features)
            validate_options(normalize, eps, image_features.dtype)
            p = prepare_params(spec, params, image_features)
            be = select_backend(backend, feat_dev, image_features.dtype, spec.name)
            if unused_bias is not None and spec.params == ("logit_scale",):
                # On the parameters' device and dtype here, inside the checks: a bias on another
                # device (a CPU scalar beside CUDA features) failed on its rank alone later.
                bias = unused_bias().detach().reshape(1).to(device=p.device, dtype=p.dtype)
        except (TypeError, ValueError, RuntimeError, NotImplementedError) as e:
            problem = str(e)
            if any(isinstance(t, Tensor) and t.ndim == 2 and t.shape[0] == 0
                   for t in (image_features, text_features)):
                # An uneven last batch of an epoch is the usual way a shard runs empty.
                problem += ("; across ranks every rank needs at least one row: drop a last "
                            "incomplete batch (DataLoader(..., drop_last=True)) or skip that "
                            "step on every rank")
    if problem is None and spec.merge == "lse":
        with torch.no_grad():       # O(n·D), on the device: what bounds the logits
            norms = (torch.ones(2, dtype=torch.float64, device=meta_dev) if normalize else
                     torch.stack([_max_row_norm(t) for t in (image_features, text_features)]))
    grad = problem is None and torch.is_grad_enabled() and (
        image_features.requires_grad or text_features.requires_grad or p.requires_grad)
    meta = _meta_for(spec, image_features, normalize, eps, dist_impl, be, problem, grad)
    try:
        shown = p
        if problem is None and bias is not None:     # in the bias slot of the records
            shown = torch.cat([p.detach().reshape(-1), bias])
        metas, y_all = _handshake(group, rank, world, meta, shown, norms, meta_dev,
                                  text_features if problem is None else None)
        sizes = _agree(metas, rank, problem, group)
    except DistributedLossError:
        _LAST.pop(group, None)      # every rank raised: every rank forgets alike
        raise
    x, y = kernel_layout(image_features), kernel_layout(text_features)
    if dist_impl == "gather":
        _LAST[group] = (sizes, x.shape[1], x.dtype)
    else:
        _LAST.pop(group, None)
    plan = _Plan(group, rank, sizes, spec, be, bool(normalize), float(eps), dist_impl,
                 shift=_logit_bound(metas) if spec.merge == "lse" else None)
    fn = _GatherLoss if dist_impl == "gather" else _RingLoss
    return fn.apply(x, y, p, plan, y_all)


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              normalize: bool = False, backend: str = "auto", process_group=None,
              dist_impl: str = "gather", eps: float = DEFAULT_EPS,
              expected_world_size: Optional[int] = None) -> Tensor:
    """Exact full-batch CLIP loss over the ranks of a ``torch.distributed`` group.

    Call it on every rank of the group with that rank's rows (a collective call).

    Args:
        image_features: [n_k, D] this rank's image features; float32, float64,
            float16 or bfloat16 (the same dtype and D on every rank).
        text_features: [n_k, D] this rank's text features on the same device (a different
            float dtype is promoted, as in :func:`fastclip.clip_loss`); the
            row count ``n_k`` may differ between ranks (at least 1). Global row i (rows
            ordered by rank, then by row) has global column i as its positive.
        logit_scale: the already-exponentiated scale s (float or one-element tensor,
            possibly requiring grad); the same value on every rank.
        normalize: L2-normalise the rows inside the kernel (default False).
        backend: kernel backend for the features' device, "auto" by default.
        process_group: the group to reduce over (default: the default group).
        dist_impl: "gather" (default; all-gathers Y, O(N·D) memory per rank) or "ring"
            (Y blocks travel around the ring, O(n·D) memory per rank).
        eps: the normalisation's floor on the row norm.
        expected_world_size: if given (``fastclip.loss.ClipLoss`` passes its
            ``world_size``), the group's size must equal it.

    Returns:
        0-dim float32 tensor (float64 for float64 inputs): the loss of the
        concatenated N-row batch, ``(CE(s·X̂Ŷᵀ, arange) + CE(s·ŶX̂ᵀ, arange)) / 2``, the same
        value on every rank.

    Gradient contract (what DDP needs). With upstream gradient g_k on rank k (1 for
    ``loss.backward()``) and G = Σ_k g_k:

    * rank k's feature gradients are G × ∂loss/∂(its rows) of the full batch, i.e.
      W × the full-batch gradient of its rows when every rank calls
      ``loss.backward()``. Each rank's features only feed its own rows and DDP divides
      the summed parameter gradients by W, so DDP's average is exactly the
      full-batch gradient of the encoders.
    * every rank's ``logit_scale`` gradient is mean_k(g_k) × ∂loss/∂s of the full batch
      (the ranks' partial sums are all-reduced in the backward): the full-batch
      gradient itself for ``loss.backward()``, identical on every rank, so DDP's
      average of W equal values is again the full-batch gradient.

    Hence W ranks under DDP give the loss value and the parameter gradients of one
    process on the concatenated batch.

    Raises:
        RuntimeError: the process group is not initialised.
        DistributedLossError (on every rank): the group's size differs from
            ``expected_world_size``; the ranks disagree on D, dtype, normalize, eps,
            dist_impl, backend or logit_scale; some rank's inputs are invalid; or the
            group's backend cannot carry tensors of the features' device.
        ValueError / TypeError: a bad ``dist_impl``, ``eps`` or ``normalize`` when no
            process group is initialised (with a group these reach every rank through the
            metadata exchange and raise ``DistributedLossError`` there, naming the rank).
    """
    return fused_loss("clip", image_features, text_features, (logit_scale,),
                            normalize=normalize, backend=backend, process_group=process_group,
                            dist_impl=dist_impl, eps=eps,
                            expected_world_size=expected_world_size)


def siglip_loss(image_features: Tensor, text_features: Tensor, logit_scale, logit_bias, *,
                normalize: bool = False, backend: str = "auto", process_group=None,
                dist_impl: str = "gather", eps: float = DEFAULT_EPS,
                expected_world_size: Optional[int] = None) -> Tensor:
    """Exact full-batch SigLIP loss over the ranks of a ``torch.distributed`` group.

    The arguments, the shards and the gradient contract are those of :func:`clip_loss`,
    with ``logit_bias`` (float or one-element tensor, the same value on every rank) beside
    ``logit_scale``; both parameters get the full-batch gradient on every rank. The loss is
    ``(1/N) Σ_ij softplus(-l_ij (s·<x̂_i, ŷ_j> + b))`` over the concatenated N-row batch,
    normalised by the global N. With gradients required, each block's loss and gradients
    are computed in one pass (the forward does the backward's work; the backward scales),
    except on float16 features, which take a forward then a backward as in
    :func:`fastclip.siglip_loss`.
    ``dist_impl="ring"`` keeps per-rank memory at a few n×D blocks whatever the number of
    ranks.
    """
    return fused_loss("siglip", image_features, text_features, (logit_scale, logit_bias),
                            normalize=normalize, backend=backend, process_group=process_group,
                            dist_impl=dist_impl, eps=eps,
                            expected_world_size=expected_world_size)
