"""The exact CLIP contrastive loss across ``torch.distributed`` ranks (design.md §3).

Each of W ranks holds its own rows: image features ``X_k`` [n_k, D] and text features
``Y_k`` [n_k, D] (``n_k`` may differ between ranks; N = Σ n_k; the positive of global
row i is global column i, rows ordered by rank). :func:`clip_loss` returns the loss of
the concatenated N-row batch on every rank, computed by the fused block kernels of
:mod:`fastclip.ops.contrastive_loss`; nothing N×N or n×N is ever held.

Two forms, same numbers:

* ``dist_impl="gather"``: ``Y`` is all-gathered once (no autograd), rank k runs one
  block ``X_k × Y_all``; its row statistics are complete, its column statistics are
  partial and are merged by an exact distributed log-sum-exp (all-reduce MAX, then
  all-reduce SUM of the rescaled sums, N floats each). The backward sends the column
  gradient home with one reduce-scatter. Memory O(N·D) per rank.
* ``dist_impl="ring"``: the ``Y`` blocks travel around the ring while ``X_k`` stays.
  A travelling block carries its partial column statistics (forward) and its partial
  gradient (backward), so after W steps every block is home complete. The send of the
  next block is posted before the tile work on the current one, so communication
  overlaps compute. Memory O(n·D) per rank.

Per rank both do 8·n_k·N·D FLOP (forward 2, backward 6: the tiles are recomputed).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .ops.contrastive_loss import (DEFAULT_EPS, contrastive_loss_bwd, contrastive_loss_fwd,
                                   prepare_scale, select_backend, validate_features)

__all__ = ["clip_loss", "DistributedLossError"]

_IMPLS = ("gather", "ring")
_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
_CODE_DTYPES = {v: k for k, v in _DTYPE_CODES.items()}
# Scales that differ by more than this (relative) between ranks are a caller bug: each
# rank would compute a different "full-batch" loss. Identical parameters on identical
# hardware give bit-identical scales; the tolerance only forgives mixed hardware.
_SCALE_RTOL = 1e-6


class DistributedLossError(RuntimeError):
    """The ranks of a sharded loss call disagree, or the group cannot carry the features.

    Raised on every rank of the group (the ranks first exchange a small metadata
    tensor, so a mismatch never leaves some ranks waiting in a large collective)."""


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


def _all_gather_rows(t: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenation over ranks of ``t`` [n_k, D] (row counts ``sizes``) -> [N, D]."""
    w, nmax = len(sizes), max(sizes)
    n = t.shape[0]
    src = t.contiguous()
    if n < nmax:     # collectives move equal-sized blocks: pad, then drop the padding
        src = torch.cat([src, src.new_zeros((nmax - n,) + tuple(t.shape[1:]))])
    out = t.new_empty((w * nmax,) + tuple(t.shape[1:]))
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(out, src, group=group)
    if all(s == nmax for s in sizes):
        return out
    return torch.cat([out[r * nmax: r * nmax + s] for r, s in enumerate(sizes)])


_REDUCE_SCATTER_OK: dict[str, bool] = {}


def _reduce_scatter_rows(t: Tensor, sizes: list[int], rank: int, group) -> Tensor:
    """Sum over ranks of ``t`` [N, D]; rank k receives its rows [n_k, D]."""
    w, nmax = len(sizes), max(sizes)
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
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


# Tags keep the travelling blocks and the statistics/gradients that follow them on
# separate channels (gloo matches by peer and tag; NCCL ignores tags and keeps order).
_TAG_BLOCK, _TAG_ACC = 1, 2


def _ring_exchange(send: list[Tensor], recv: list[Tensor], nxt: int, prv: int, group,
                   tag: int):
    """Post sends of ``send`` to ``nxt`` and receives of ``recv`` from ``prv``; returns
    the requests (waited on by the caller, after the overlapped work)."""
    ops = [dist.P2POp(dist.isend, t, nxt, group, tag) for t in send]
    ops += [dist.P2POp(dist.irecv, t, prv, group, tag) for t in recv]
    return dist.batch_isend_irecv(ops)


# -------------------------------------------------------------- the two forms
class _Plan:
    """What every rank agreed on: sizes, offsets, kernel configuration."""

    def __init__(self, group, rank, sizes, normalize, eps, backend):
        self.group, self.rank, self.sizes = group, rank, sizes
        self.world = len(sizes)
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.N = self.offsets[-1]
        self.normalize, self.eps, self.backend = normalize, eps, backend


def _finish_forward(ctx, plan: _Plan, row_lse: Tensor, own_col_lse: Tensor, pos: Tensor,
                    *saved: Tensor) -> Tensor:
    """Both forms' last step: the loss over all ranks' rows, (1/2N) Σ_i (r_i - L_ii) + (c_i - L_ii),
    with each row's differences taken before the sum (keeps the cancellation local); saves
    ``saved`` and the plan for backward."""
    total = ((row_lse - pos) + (own_col_lse - pos)).sum()
    dist.all_reduce(total, group=plan.group)
    ctx.save_for_backward(*saved)
    ctx.plan = plan
    return total / (2 * plan.N)


def _finish_backward(plan: _Plan, g: Tensor, ds_local: Tensor, dx: Tensor, dy: Tensor,
                     x: Tensor, y: Tensor, scale: Tensor):
    """Apply the gradient contract: features get (Σ_ranks g) × the unit-gradient VJP,
    the scale gets mean_ranks(g) × the full-batch derivative (Σ of the ranks' parts)."""
    acc = ds_local.dtype
    red = torch.stack([ds_local.reshape(()).to(acc), g.reshape(()).to(acc)])
    dist.all_reduce(red, group=plan.group)
    ds_full, g_tot = red[0], red[1]
    dscale = (ds_full * (g_tot / plan.world)).to(scale.dtype)
    # In place: dx and dy are this function's own buffers (no extra n·D copy).
    return dx.mul_(g_tot).to(x.dtype), dy.mul_(g_tot).to(y.dtype), dscale


class _GatherLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, plan: _Plan):
        k, o = plan.rank, plan.offsets[plan.rank]
        y_all = _all_gather_rows(y, plan.sizes, plan.group)                # [N, D]
        row_lse, col_part, pos = contrastive_loss_fwd(x, y_all, scale, plan.normalize,
                                                      plan.eps, o, plan.backend)
        # Exact distributed log-sum-exp of the columns: c_j = M_j + log Σ_k exp(c_kj - M_j).
        col_max = col_part.clone()
        dist.all_reduce(col_max, op=dist.ReduceOp.MAX, group=plan.group)
        col_sum = torch.exp(col_part - col_max)
        dist.all_reduce(col_sum, group=plan.group)
        col_lse = col_max + torch.log(col_sum)                              # [N], complete
        own_c = col_lse[o:o + plan.sizes[k]]
        return _finish_forward(ctx, plan, row_lse, own_c, pos, x, y_all, scale, row_lse, col_lse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, y_all, scale, row_lse, col_lse = ctx.saved_tensors
        plan = ctx.plan
        o, N, n = plan.offsets[plan.rank], plan.N, x.shape[0]
        acc = row_lse.dtype
        # Unit upstream gradient; everything is linear in g, applied in _finish_backward.
        gr = torch.full((n,), 1.0 / (2 * N), dtype=acc, device=x.device)
        gc = torch.full((N,), 1.0 / (2 * N), dtype=acc, device=x.device)
        gp = torch.full((n,), -1.0 / N, dtype=acc, device=x.device)    # in both terms
        dx, dy_all, ds = contrastive_loss_bwd(x, y_all, scale, plan.normalize, plan.eps, o,
                                              plan.backend, row_lse, col_lse, gr, gc, gp)
        # Column gradients are summed over the ranks' row blocks in the accumulation
        # dtype (design.md §2), then each rank keeps its own rows.
        dy = _reduce_scatter_rows(dy_all.to(acc), plan.sizes, plan.rank, plan.group)
        dx, dy, dscale = _finish_backward(plan, g, ds, dx, dy, x, y_all, scale)
        return dx, dy, dscale, None


class _RingLoss(torch.autograd.Function):
    """Ring form. Schedule of step t on rank k (block b = (k - t) mod W in hand):

    1. post the exchange of the next block (send b to k+1, receive b-1 from k-1);
    2. run the block kernel on (X_k, Y_b);
    3. wait for the accumulator of b that rank k-1 posted at step t-1 (it crossed the
       link while step 2 ran), add this rank's part, post it on to k+1;
    4. wait for the next block.

    The blocks (step 1) and the accumulators (step 3) both travel while the kernel of
    the following step runs; only their latency is exposed. At step W-1 the
    accumulator goes to its home rank, so the one that arrives last is our own block's.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, scale: Tensor, plan: _Plan):
        W, k = plan.world, plan.rank
        nxt = _global_rank(plan.group, (k + 1) % W)
        prv = _global_rank(plan.group, (k - 1) % W)
        o = plan.offsets[k]
        y_cur = y.contiguous()
        row_lse = pos = None
        in_flight = None        # (requests, sent accumulator, receive buffer)
        for t in range(W):
            b = (k - t) % W
            m_nxt = plan.sizes[(b - 1) % W]
            reqs = []
            if t < W - 1:
                y_nxt = y.new_empty((m_nxt, y.shape[1]))
                reqs = _ring_exchange([y_cur], [y_nxt], nxt, prv, plan.group, _TAG_BLOCK)
            r_part, c_part, p = contrastive_loss_fwd(x, y_cur, scale, plan.normalize, plan.eps,
                                                     o - plan.offsets[b], plan.backend)
            row_lse = r_part if row_lse is None else torch.logaddexp(row_lse, r_part)
            if b == k:
                pos = p
            # Column statistics of block b: merge ours into what the block brought along.
            if in_flight is None:
                c_acc = c_part
            else:
                for r in in_flight[0]:
                    r.wait()
                c_acc = torch.logaddexp(in_flight[2], c_part)
            if W > 1:
                c_in = c_acc.new_empty(m_nxt)
                in_flight = (_ring_exchange([c_acc], [c_in], nxt, prv, plan.group, _TAG_ACC),
                             c_acc, c_in)
            for r in reqs:
                r.wait()
            if t < W - 1:
                y_cur = y_nxt
        if in_flight is not None:
            for r in in_flight[0]:
                r.wait()
            col_lse = in_flight[2]          # our own block, complete after W hops
        else:
            col_lse = c_acc
        return _finish_forward(ctx, plan, row_lse, col_lse, pos, x, y, scale, row_lse, col_lse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, y, scale, row_lse, col_lse = ctx.saved_tensors
        plan = ctx.plan
        W, k, N, n = plan.world, plan.rank, plan.N, x.shape[0]
        nxt = _global_rank(plan.group, (k + 1) % W)
        prv = _global_rank(plan.group, (k - 1) % W)
        o = plan.offsets[k]
        acc = row_lse.dtype
        gr = torch.full((n,), 1.0 / (2 * N), dtype=acc, device=x.device)
        gp = torch.full((n,), -1.0 / N, dtype=acc, device=x.device)     # own block only
        dx = ds = None
        # A travelling block: its features and complete column log-sum-exp (sent ahead,
        # overlapped) and its partial gradient (accumulation dtype, one step behind).
        y_cur, c_cur = y.contiguous(), col_lse.contiguous()
        in_flight = None
        for t in range(W):
            b = (k - t) % W
            m_nxt = plan.sizes[(b - 1) % W]
            reqs = []
            if t < W - 1:
                y_nxt = y.new_empty((m_nxt, y.shape[1]))
                c_nxt = c_cur.new_empty(m_nxt)
                reqs = _ring_exchange([y_cur, c_cur], [y_nxt, c_nxt], nxt, prv, plan.group,
                                      _TAG_BLOCK)
            gc = torch.full((y_cur.shape[0],), 1.0 / (2 * N), dtype=acc, device=x.device)
            dx_p, dy_p, ds_p = contrastive_loss_bwd(x, y_cur, scale, plan.normalize, plan.eps,
                                                    o - plan.offsets[b], plan.backend,
                                                    row_lse, c_cur, gr, gc, gp)
            dx = dx_p.to(acc) if dx is None else dx.add_(dx_p)
            ds = ds_p if ds is None else ds + ds_p
            del dx_p
            if in_flight is None:
                d_acc = dy_p.to(acc)
            else:
                for r in in_flight[0]:
                    r.wait()
                d_acc = in_flight[2].add_(dy_p)
                in_flight = None        # the block we sent last step can go now
            del dy_p
            if W > 1:
                d_in = d_acc.new_empty((m_nxt, y.shape[1]))
                in_flight = (_ring_exchange([d_acc], [d_in], nxt, prv, plan.group, _TAG_ACC),
                             d_acc, d_in)
            for r in reqs:
                r.wait()
            if t < W - 1:
                y_cur, c_cur = y_nxt, c_nxt
        if in_flight is not None:
            for r in in_flight[0]:
                r.wait()
            dy = in_flight[2]               # our own block's gradient, complete
        else:
            dy = d_acc
        dx, dy, dscale = _finish_backward(plan, g, ds, dx, dy, x, y, scale)
        return dx, dy, dscale, None


# ------------------------------------------------------------------ public entry
def _local_problem(image_features, text_features, normalize) -> Optional[str]:
    """This rank's input error, as a message (None when the local inputs are fine)."""
    try:
        validate_features(image_features, text_features)
    except (TypeError, ValueError) as e:
        return str(e)
    if not isinstance(normalize, bool):
        return f"normalize must be a bool, got {type(normalize).__name__}"
    return None


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale, *,
              normalize: bool = False, backend: str = "auto", process_group=None,
              dist_impl: str = "gather", eps: float = DEFAULT_EPS,
              expected_world_size: Optional[int] = None) -> Tensor:
    """Exact full-batch CLIP loss over the ranks of a ``torch.distributed`` group.

    Call it on every rank of the group with that rank's rows (a collective call).

    Args:
        image_features: [n_k, D] this rank's image features; float32, float64,
            float16 or bfloat16 (the same dtype and D on every rank).
        text_features: [n_k, D] this rank's text features, same dtype and device; the
            row count ``n_k`` may differ between ranks (at least 1). Global row i (rows
            ordered by rank, then by row) has global column i as its positive.
        logit_scale: the already-exponentiated scale s > 0 (float or one-element tensor,
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
        ValueError / TypeError: bad arguments on this rank (dist_impl, eps, ...).
    """
    if dist_impl not in _IMPLS:
        raise ValueError(f"dist_impl must be 'gather' or 'ring', got {dist_impl!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastclip.distributed.clip_loss needs an initialised process group: "
                           "call torch.distributed.init_process_group(...) first (torchrun sets "
                           "the environment), or use fastclip.clip_loss for one process")
    group = process_group if process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError("this process is not a member of process_group; call clip_loss only "
                         "on the group's ranks")
    if expected_world_size is not None and expected_world_size != world:
        raise DistributedLossError(
            f"world_size={expected_world_size} was configured (ClipLoss(world_size=...)) but "
            f"the process group has {world} ranks; pass the group's size")

    # The metadata exchange needs a tensor on a device the group carries: pick it before
    # any other check so that a rank with bad inputs still takes part and every rank
    # raises the same error instead of leaving the others in a large collective.
    carry = _group_devices(group)
    feat_dev = image_features.device if isinstance(image_features, Tensor) else None
    dev_problem = None
    if feat_dev is not None and feat_dev.type not in carry:
        dev_problem = (
            f"the features are on {feat_dev} but the process group's backend "
            f"({dist.get_backend(group)}: carries {', '.join(sorted(carry)) or 'nothing'}) "
            f"cannot move {feat_dev.type} tensors; use NCCL for CUDA tensors and gloo for CPU "
            f"tensors (init_process_group(backend='cpu:gloo,cuda:nccl') carries both)")
    if feat_dev is not None and dev_problem is None:
        meta_dev = feat_dev
    else:
        meta_dev = torch.device("cpu") if "cpu" in carry else torch.device(
            "cuda", torch.cuda.current_device())

    problem = dev_problem or _local_problem(image_features, text_features, normalize)
    scale = be_name = None
    if problem is None:
        try:
            scale = prepare_scale(logit_scale, image_features)
            be_name = select_backend(backend, feat_dev, image_features.dtype).name
        except (TypeError, ValueError, RuntimeError) as e:
            problem = str(e)
    # [ok, n_rows, D, dtype code, normalize, eps, impl, scale, backend code]
    be_codes = {"reference": 0, "cpu": 1, "triton": 2, "cuda": 3}
    if problem is None:
        meta = [1.0, float(image_features.shape[0]), float(image_features.shape[1]),
                float(_DTYPE_CODES[image_features.dtype]), float(normalize), float(eps),
                float(_IMPLS.index(dist_impl)), 0.0, float(be_codes.get(be_name, -1))]
    else:
        meta = [0.0] + [-1.0] * 8
    mine = torch.tensor(meta, dtype=torch.float64).to(meta_dev)
    if problem is None:   # the scale joins on the device: the only host sync is below
        mine[7] = scale.detach().to(torch.float64)
    allm = torch.empty((world * len(meta),), dtype=torch.float64, device=meta_dev)
    gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_single(allm, mine, group=group)
    rows = allm.view(world, len(meta)).tolist()

    if problem is not None:
        raise DistributedLossError(f"rank {rank}: invalid input to the sharded loss: {problem}")
    bad = [r for r in range(world) if rows[r][0] != 1.0]
    if bad:
        raise DistributedLossError(f"rank(s) {bad} of the process group passed invalid input "
                                   f"(see the error on those ranks); no rank computed a loss")
    names = ["", "rows", "D", "dtype", "normalize", "eps", "dist_impl", "logit_scale",
             "backend"]
    for col in (2, 3, 4, 5, 6, 8):
        vals = [r[col] for r in rows]
        if any(v != vals[0] for v in vals):
            if col == 3:
                shown = [str(_CODE_DTYPES[int(v)]).replace("torch.", "") for v in vals]
            elif col == 6:
                shown = [_IMPLS[int(v)] for v in vals]
            elif col == 8:
                inv = {v: k for k, v in be_codes.items()}
                shown = [inv.get(int(v), "other") for v in vals]
            elif col == 4:
                shown = [bool(v) for v in vals]
            else:
                shown = [int(v) if col == 2 else v for v in vals]
            raise DistributedLossError(
                f"the ranks disagree on {names[col]}: per rank {shown}; every rank must pass "
                f"features of the same D and dtype and the same normalize, eps, dist_impl and "
                f"backend")
    scales = [r[7] for r in rows]
    if any(abs(v - scales[0]) > _SCALE_RTOL * abs(scales[0]) for v in scales):
        raise DistributedLossError(f"the ranks disagree on logit_scale: per rank {scales}; "
                                   f"it must be the same (replicated) value on every rank")
    sizes = [int(r[1]) for r in rows]

    plan = _Plan(group, rank, sizes, bool(normalize), float(eps), be_name)
    fn = _GatherLoss if dist_impl == "gather" else _RingLoss
    return fn.apply(image_features, text_features, scale, plan)
