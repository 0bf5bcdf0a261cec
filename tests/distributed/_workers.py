"""Spawned ranks of the distributed tests: gloo on CPU, 127.0.0.1, bounded time.

One spawned group runs many cases (spawning costs ~3 s of imports per process on the
2-core CI machine). Every rank generates the same full batch from a shared seed and
keeps its own rows; it measures its errors against the single-process float64 oracle
(the loss's naive formula on the concatenated batch) and reports them
to the parent through a queue, which asserts. Exceptions travel the same way, so a
failing rank fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import queue as _queue
import sys
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastclip.bench.measure import free_port

# The test suite's error measures (the spawned ranks import this module by path).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests._ports import port_taken  # noqa: E402
from tests.ops._helpers import _term_matrix, feature_grad_sizes, param_grad_sizes, rel_err, rows_err  # noqa: E402


# ------------------------------------------------------------------- parent side
def run_group(world: int, seed: int, timeout: float = 100.0) -> dict:
    """Spawn ``world`` ranks, run every case, return {rank: {case: value}}.

    Raises AssertionError with the ranks' tracebacks if a rank fails, or if the group
    does not report within ``timeout`` seconds (the ranks are then terminated). The port is
    free when chosen but bound only once rank 0 has imported torch, seconds later: if
    another process took it meanwhile, the group runs once more on a new port.
    """
    try:
        return _run_group_once(world, seed, timeout)
    except AssertionError as e:
        if not port_taken(str(e)):
            raise
    return _run_group_once(world, seed, timeout)


def _run_group_once(world: int, seed: int, timeout: float) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=child, args=(r, world, port, seed, q), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(
                    f"distributed group of {world} did not finish within {timeout:.0f} s; "
                    f"reported: {sorted(results) + sorted(errors)}; exit codes: "
                    f"{[p.exitcode for p in procs]}; errors: {errors}")
            try:
                rank, status, payload = q.get(timeout=min(left, 1.0))
            except _queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if p.exitcode not in (None, 0) and r not in results and r not in errors]
                if dead:
                    # A rank died without reporting: give the others a moment to report.
                    deadline = min(deadline, time.monotonic() + 5)
                continue
            (results if status == "ok" else errors)[rank] = payload
        if errors:
            raise AssertionError("rank(s) failed:\n" + "\n".join(
                f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
        return results
    finally:
        for p in procs:
            p.join(timeout=10)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)


# -------------------------------------------------------------------- rank side
def child(rank: int, world: int, port: int, seed: int, q) -> None:
    try:
        torch.set_num_threads(1)        # W ranks share 2 cores
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=60))
        out = run_cases(rank, world, seed)
        q.put((rank, "ok", out))
    except BaseException:   # noqa: BLE001  (reported to the parent, which fails the test)
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _params(loss: str, scale: float) -> tuple:
    """The loss's scalar parameters: CLIP (s,), SigLIP (t, b) with b = -s/2 + 1."""
    return (scale,) if loss == "clip" else (scale, 1.0 - scale / 2)


def _oracle(X, Y, params, normalize, loss="clip"):
    """Loss and gradients (X, Y, *params) of the loss's naive formula in float64."""
    from fastclip.ops.losses import get_loss  # noqa: PLC0415
    if not isinstance(params, (tuple, list)):
        params = (params,)
    xd = X.detach().double().requires_grad_()
    yd = Y.detach().double().requires_grad_()
    pd = [torch.tensor(float(p), dtype=torch.float64, requires_grad=True) for p in params]
    out = get_loss(loss).naive(xd, yd, *pd, normalize=normalize)
    grads = torch.autograd.grad(out, (xd, yd, *pd))
    return (out.detach(), *grads)


def _case_sizes(world: int) -> list[list[int]]:
    if world == 2:
        return [[5, 5], [1, 6], [9, 2]]
    if world == 3:
        return [[4, 4, 4], [4, 1, 6], [1, 7, 2]]
    return [[3] * world, [1] + [4] * (world - 1)]


def _loss_case(rank, world, gen, sizes, impl, normalize, dtype, scale, backend="cpu",
               noncontig=False, d=11, loss="clip", inflate=0.0):
    from fastclip.distributed import fused_loss  # noqa: PLC0415
    N = sum(sizes)
    X = torch.randn(N, d, generator=gen, dtype=torch.float64)
    Y = torch.randn(N, d, generator=gen, dtype=torch.float64)
    if not normalize:   # features as open_clip's models return them, so logits are O(s)
        X, Y = X / X.norm(dim=1, keepdim=True), Y / Y.norm(dim=1, keepdim=True)
    if inflate:         # long image rows along a direction the text rows lack: large norms,
        X[:, 0] += inflate    # logits still O(s)
        Y[:, 0] = 0.0
    params = _params(loss, scale)
    ref = _oracle(X, Y, params, normalize, loss)
    o = sum(sizes[:rank])
    n = sizes[rank]
    xk, yk = X[o:o + n].to(dtype), Y[o:o + n].to(dtype)
    if noncontig:       # unit stride along rows, not along D
        xk = xk.T.contiguous().T
        yk = yk.T.contiguous().T
    xk.requires_grad_()
    yk.requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ps = [torch.tensor(p, dtype=acc, requires_grad=True) for p in params]
    out = fused_loss(loss, xk, yk, ps, normalize=normalize, dist_impl=impl, backend=backend)
    out.backward()
    # Contract: features get W × the full-batch gradient of their rows; the scale (and the
    # bias) get the full-batch gradient itself. A parameter's gradient is a sum of N² terms
    # that can cancel to near 0 for some draws: its error is measured against the size of
    # its terms (docs/design.md §5), which is its own size when nothing cancels. So is a
    # feature row's: a rank of one row whose softmax is one-hot at s = 100 has a gradient of
    # ~1e-15 made of terms of ~1e-2 (see feature_grad_sizes).
    sizes = torch.tensor(param_grad_sizes(loss, X, Y, params, normalize), dtype=torch.float64)
    sx, sy = feature_grad_sizes(loss, X, Y, params, normalize)
    gp = torch.stack([p.grad for p in ps]).double()
    return {"loss": rel_err(out, ref[0]),
            "gx": rows_err(xk.grad, world * ref[1][o:o + n], world * sx[o:o + n]),
            "gy": rows_err(yk.grad, world * ref[2][o:o + n], world * sy[o:o + n]),
            "gs": ((gp - torch.stack(ref[3:])).abs() / sizes).max().item(),
            "loss_dtype_ok": out.dtype == acc and xk.grad.dtype == dtype}


def _half_case(rank, world, gen, sizes, impl, dtype, d=64, scale=14.3, loss="clip"):
    """bf16/fp16 features: our error and that of the naive formula run by PyTorch in the
    same dtype, both against the float64 oracle (docs/design.md §5: ours ≤ 2× theirs)."""
    from fastclip.distributed import fused_loss  # noqa: PLC0415
    from fastclip.ops.losses import get_loss  # noqa: PLC0415
    N = sum(sizes)
    X = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype).double()
    Y = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype).double()
    params = _params(loss, scale)
    ref = _oracle(X, Y, params, True, loss)
    o, n = sum(sizes[:rank]), sizes[rank]
    xh = X.to(dtype).requires_grad_()
    yh = Y.to(dtype).requires_grad_()
    ph = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in params]
    base_loss = get_loss(loss).naive(xh, yh, *ph, normalize=True)
    bgx, bgy, *bgs = torch.autograd.grad(base_loss, (xh, yh, *ph))
    xk = X[o:o + n].to(dtype).requires_grad_()
    yk = Y[o:o + n].to(dtype).requires_grad_()
    ps = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in params]
    out = fused_loss(loss, xk, yk, ps, normalize=True, dist_impl=impl, backend="cpu")
    out.backward()
    ours = [out, xk.grad, yk.grad, torch.stack([p.grad for p in ps])]
    base = [base_loss, world * bgx[o:o + n], world * bgy[o:o + n], torch.stack(bgs)]
    refs = [ref[0], world * ref[1][o:o + n], world * ref[2][o:o + n], torch.stack(ref[3:])]
    # The parameters' gradient is a sum of N² terms that cancel (~100x for the scale): for
    # some draws PyTorch's low-precision result lands on it by luck (measured down to 9e-8
    # relative, fp16 clip), below what any fp32 result of those terms can promise. Its floor:
    # four fp32 roundings of the terms' size (param_grad_sizes), relative to the gradient.
    # The loss and the feature gradients need none: PyTorch's error there never came near 0
    # (over 1200 draws, W = 2: ≥ 9e-7 for the loss, ≥ 2e-3 bf16 / 3e-4 fp16 for the features).
    size = torch.tensor(param_grad_sizes(loss, X, Y, params, True), dtype=torch.float64)
    floors = [0.0, 0.0, 0.0, 4 * 2.0 ** -24 * size.norm().item() / refs[3].norm().item()]
    return {k: (rel_err(a, r), rel_err(b, r), f) for k, a, b, r, f in
            zip(("loss", "gx", "gy", "gs"), ours, base, refs, floors)} | {
        "finite": all(bool(torch.isfinite(t).all()) for t in ours),
        "dtypes_ok": xk.grad.dtype == dtype and out.dtype == torch.float32}


def _block_partials(X, Y, params, loss, sizes, rank):
    """The float64 parts of rank ``rank``'s feature gradients (full-batch, unit upstream) that
    the ring's block kernels compute one block at a time, and round to the features' dtype
    before they are summed: for X, one part per column block (rank k's text rows); for Y, one
    per row block. Their sum is the whole gradient (checked against the oracle by the
    caller)."""
    xd = X.detach().double().requires_grad_()
    yd = Y.detach().double().requires_grad_()
    xh = torch.nn.functional.normalize(xd, dim=1)
    yh = torch.nn.functional.normalize(yd, dim=1)
    t = float(params[0])
    _, g, _ = _term_matrix(loss, xh.detach(), yh.detach(), [float(p) for p in params])  # dloss/dz
    offs = [sum(sizes[:k]) for k in range(len(sizes))]
    o, n = offs[rank], sizes[rank]
    px, py = [], []
    for ok, nk in zip(offs, sizes):
        gxh = torch.zeros_like(xh)
        gxh[o:o + n] = t * g[o:o + n, ok:ok + nk] @ yh[ok:ok + nk].detach()
        px.append(torch.autograd.grad(xh, xd, gxh, retain_graph=True)[0][o:o + n])
        gyh = torch.zeros_like(yh)
        gyh[o:o + n] = t * g[ok:ok + nk, o:o + n].T @ xh[ok:ok + nk].detach()
        py.append(torch.autograd.grad(yh, yd, gyh, retain_graph=True)[0][o:o + n])
    return px, py


def _scaled_half_case(rank, world, gen, sizes, impl, loss, d=32, up=2.0 ** 12):
    """fp16 features, upstream gradient ``up`` (a GradScaler's scale; 2^16, its first, would
    overflow the naive formula's fp16 loss, as a GradScaler would then find) at SigLIP's
    initialisation (tiny gradients): the scale must reach the gradients before their
    rounding to fp16. Per gradient: (our error, that of the naive formula run by PyTorch in
    fp16 with the same scale) against the float64 oracle, and whether we flushed to zero an
    entry that the rounding of the W block parts cannot explain."""
    from fastclip.distributed import fused_loss  # noqa: PLC0415
    from fastclip.ops.losses import get_loss  # noqa: PLC0415
    N = sum(sizes)
    X = torch.randn(N, d, generator=gen, dtype=torch.float64).to(torch.float16).double()
    Y = torch.randn(N, d, generator=gen, dtype=torch.float64).to(torch.float16).double()
    params = (10.0,) if loss == "clip" else (10.0, -10.0)
    ref = _oracle(X, Y, params, True, loss)
    parts = _block_partials(X, Y, params, loss, sizes, rank)
    o, n = sum(sizes[:rank]), sizes[rank]
    for k, p in enumerate(parts):
        if rel_err(sum(p), ref[1 + k][o:o + n]) > 1e-10:
            raise AssertionError(f"the block parts of {loss}'s gradient {k} do not sum to the oracle's")
    xh, yh = X.half().requires_grad_(), Y.half().requires_grad_()
    ph = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in params]
    base = torch.autograd.grad(get_loss(loss).naive(xh, yh, *ph, normalize=True) * up, (xh, yh))
    xk = X[o:o + n].half().requires_grad_()
    yk = Y[o:o + n].half().requires_grad_()
    ps = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in params]
    out = fused_loss(loss, xk, yk, ps, normalize=True, dist_impl=impl, backend="cpu")
    (out * up).backward()
    # A gradient summed over the ranks adds W block parts, each rounded to fp16 by its block
    # kernel (error up to half an ulp of the part, 2^-11 relative, or half the subnormal step,
    # 2^-25), then rounds once more (2^-25 next to zero). An entry may come out 0 when its
    # exact value lies within one ulp of each part (half for its rounding, half for the fp32
    # arithmetic before it) plus W + 1 half subnormal steps: parts that cancel (a row alone
    # on its rank: its own column's part against the others') can leave a sum far below
    # their rounding. Unscaled (the bug this guards against), every entry whose parts lie
    # below up · 2^-25 ≈ 1e-4 came out 0.
    res = {}
    for k, got, theirs, r, p in (("gx", xk.grad, base[0], ref[1], parts[0]),
                                 ("gy", yk.grad, base[1], ref[2], parts[1])):
        r = world * r[o:o + n]
        tol = sum(2.0 ** -10 * (world * up * pk).abs() for pk in p) + (world + 1) * 2.0 ** -25
        res[k] = (rel_err(got.double() / up, r), rel_err(world * theirs[o:o + n].double() / up, r),
                  bool(((got == 0) & ((r * up).abs() > tol)).any()))
    return res


class _Tiny(torch.nn.Module):
    """Two linear encoders, a learnable log-scale and (SigLIP) a learnable bias."""

    def __init__(self, loss: str):
        super().__init__()
        self.img = torch.nn.Linear(7, 6)
        self.txt = torch.nn.Linear(5, 6)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-4.0)) if loss == "siglip" else None

    def forward(self, a, b):
        extra = () if self.logit_bias is None else (self.logit_bias,)
        return self.img(a), self.txt(b), (self.logit_scale.exp(), *extra)


def _ddp_case(rank, world, gen, sizes, impl, loss="clip"):
    """A tiny CLIP under DDP vs one process on the concatenated batch."""
    import copy  # noqa: PLC0415

    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    from fastclip.distributed import fused_loss  # noqa: PLC0415
    from fastclip.ops.losses import get_loss  # noqa: PLC0415

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = _Tiny(loss).double()                 # identical on every rank (same seed)
    N = sum(sizes)
    A = torch.randn(N, 7, generator=gen, dtype=torch.float64)
    B = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    single = copy.deepcopy(model)
    fi, ft, ps = single(A, B)
    get_loss(loss).naive(fi, ft, *ps, normalize=True).backward()
    ref = {k: p.grad.clone() for k, p in single.named_parameters()}
    # The learnable log-scale's and bias's gradients are sums of N² terms that can cancel
    # through 0 for some draws: measured against the size of their terms (as in _loss_case;
    # the log-scale's terms are t times the scale's).
    size = param_grad_sizes(loss, fi, ft, [float(p) for p in ps], True)
    term_size = {"logit_scale": float(ps[0]) * size[0], "logit_bias": size[-1]}

    ddp = DDP(model)
    o, n = sum(sizes[:rank]), sizes[rank]
    fi, ft, ps = ddp(A[o:o + n], B[o:o + n])
    fused_loss(loss, fi, ft, ps, normalize=True, dist_impl=impl, backend="cpu").backward()
    return {k: ((p.grad - ref[k]).abs().max().item() / term_size[k]) if k in term_size else
            rel_err(p.grad, ref[k]) for k, p in ddp.module.named_parameters()}


def _open_clip_siglip_case(rank, world, gen, sizes, impl):
    """fastclip's SigLipLoss against open_clip's own (its loss.py) on even shards.

    open_clip returns rank k's rows' part divided by n_k, its text features receive the
    other ranks' gradients through its exchanges, and DDP averages the parameters': so the
    mean over ranks of its values and of its scale/bias gradients, and its feature
    gradients as they are, must equal fastclip's."""
    from fastclip.bench.methods import load_open_clip  # noqa: PLC0415
    from fastclip.loss import SigLipLoss  # noqa: PLC0415
    cls, why = load_open_clip("SigLipLoss")
    if cls is None:
        return {"skipped": why}
    N, d = sum(sizes), 8
    X = torch.nn.functional.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    Y = torch.nn.functional.normalize(torch.randn(N, d, generator=gen, dtype=torch.float64), dim=1)
    o, n = sum(sizes[:rank]), sizes[rank]
    res = {}
    for name, make in (("open_clip", lambda: cls(rank=rank, world_size=world, dist_impl=impl)),
                       ("fastclip", lambda: SigLipLoss(rank=rank, world_size=world,
                                                       dist_impl=impl))):
        x = X[o:o + n].clone().requires_grad_()
        y = Y[o:o + n].clone().requires_grad_()
        t = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
        b = torch.tensor(-5.0, dtype=torch.float64, requires_grad=True)
        out = make()(x, y, t, b)
        out.backward()
        shared = torch.stack([out.detach(), t.grad, b.grad])
        if name == "open_clip":      # the mean over ranks (DDP's average)
            dist.all_reduce(shared)
            shared = shared / world
        res[name] = (shared, x.grad, y.grad)
    (sa, xa, ya), (sb, xb, yb) = res["open_clip"], res["fastclip"]
    return {"loss": rel_err(sb[0], sa[0]), "gx": rel_err(xb, xa), "gy": rel_err(yb, ya),
            "gs": rel_err(sb[1:], sa[1:]), "loss_dtype_ok": True}


def _steady_state_case(rank, world, gen):
    """The gather form's handshake rides inside the all-gather of Y once the previous call
    agreed on the same plan: one all-gather instead of two, the same numbers, and a change
    of plan (or a mismatch) still caught on every rank."""
    import fastclip.distributed as fd  # noqa: PLC0415
    sizes = [3 + r for r in range(world)]
    calls = []
    real = fd._gather_single

    def counting():
        fn = real()

        def wrapped(*a, **k):
            calls.append(1)
            return fn(*a, **k)
        return wrapped

    out = {}
    fd._gather_single = counting
    try:
        for i in range(3):
            calls.clear()
            out[f"call{i}"] = _loss_case(rank, world, gen, sizes, "gather", True,
                                         torch.float64, 10.0)
            out[f"gathers{i}"] = len(calls)
        calls.clear()                # a new plan (other sizes): found out, then re-gathered
        out["changed"] = _loss_case(rank, world, gen, [2] * world, "gather", True,
                                    torch.float64, 10.0)
        out["gathers_changed"] = len(calls)
        d = 4 if rank == 0 else 5   # a mismatch on the steady state raises everywhere
        out["mismatch"] = _expect_error(lambda: fd.clip_loss(torch.randn(2, d),
                                                             torch.randn(2, d), 10.0))
        out["after"] = _loss_case(rank, world, gen, sizes, "gather", False, torch.float64, 3.0)
        nan = fd.clip_loss(torch.randn(2, 4), torch.randn(2, 4), float("nan"))
        out["nan_scale_gives_nan"] = bool(torch.isnan(nan))
    finally:
        fd._gather_single = real
    return out


def _expect_error(fn) -> str:
    try:
        fn()
    except Exception as e:   # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def run_cases(rank: int, world: int, seed: int) -> dict:
    from fastclip.distributed import clip_loss  # noqa: PLC0415
    from fastclip.loss import ClipLoss  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)      # same stream on every rank
    out: dict = {}
    scales = [14.3, 100.0, 1.0]
    i = 0
    from fastclip.ops.losses import LOSSES  # noqa: PLC0415
    uneven = _case_sizes(world)[1]
    # Every loss of the registry: float64 against its oracle (both forms, both
    # normalisations, even and uneven shards), float32, bf16/fp16, DDP.
    for loss in LOSSES:
        for sizes in _case_sizes(world) if loss == "clip" else _case_sizes(world)[:2]:
            for impl in ("gather", "ring"):
                for normalize in (False, True):
                    scale = scales[i % len(scales)]
                    i += 1
                    out[f"{loss}/f64/{impl}/{sizes}/norm={normalize}/s={scale}"] = _loss_case(
                        rank, world, gen, sizes, impl, normalize, torch.float64, scale,
                        loss=loss)
        for impl in ("gather", "ring"):
            out[f"{loss}/f32/{impl}/{uneven}/norm=True"] = _loss_case(
                rank, world, gen, uneven, impl, True, torch.float32, 14.3, d=33, loss=loss)
            out[f"{loss}/ddp/{impl}/{uneven}"] = _ddp_case(rank, world, gen, uneven, impl,
                                                           loss=loss)
            for dt in (torch.bfloat16, torch.float16):
                out[f"{loss}/half/{dt}/{impl}/{uneven}"] = _half_case(rank, world, gen, uneven,
                                                                      impl, dt, loss=loss)
            out[f"{loss}/scaled-half/{impl}/{uneven}"] = _scaled_half_case(
                rank, world, gen, uneven, impl, loss)
    # The GPU backends where they run on CPU tensors (Triton's interpreter, set by
    # tests/conftest.py before the ranks start): the same block contract across ranks.
    from fastclip.ops.backends import all_backends  # noqa: PLC0415
    emulated = sorted(n for n, b in all_backends().items()
                      if b.emulated() and "cpu" in b.devices and b.available())
    out["emulated_backends"] = {"names": emulated}
    for be in emulated:
        for loss in LOSSES:
            for impl in ("gather", "ring"):
                out[f"{loss}/emulated-{be}/{impl}/{uneven}"] = _loss_case(
                    rank, world, gen, uneven, impl, True, torch.float32, 14.3, backend=be,
                    d=33, loss=loss)
    # Logits bounded by 300 (|s|·max‖x‖·max‖y‖) merge the columns against that bound, with
    # no all-reduce MAX (every case above); rows too long for the bound take the general
    # MAX-then-SUM merge: here ‖x‖ ≈ 40, so the bound is 14.3·40 while the logits stay O(s).
    out[f"clip/f64/gather/{uneven}/no-bound"] = _loss_case(
        rank, world, gen, uneven, "gather", False, torch.float64, 14.3, inflate=40.0)
    for impl in ("gather", "ring"):
        out[f"f64-noncontig-reference/{impl}/{uneven}"] = _loss_case(
            rank, world, gen, uneven, impl, True, torch.float64, 30.0, backend="reference",
            noncontig=True)
    for impl in ("bidir", "shift", "reduce", "gather"):
        out[f"openclip-siglip/{impl}"] = _open_clip_siglip_case(rank, world, gen, [4] * world,
                                                                impl)
    out["steady"] = _steady_state_case(rank, world, gen)

    # The all-reduce + slice path that replaces reduce-scatter where gloo lacks it.
    import fastclip.distributed as fd  # noqa: PLC0415
    fd._REDUCE_SCATTER_OK["gloo"] = False
    try:
        out[f"f64-allreduce-fallback/gather/{uneven}"] = _loss_case(
            rank, world, gen, uneven, "gather", True, torch.float64, 14.3)
    finally:
        fd._REDUCE_SCATTER_OK.pop("gloo", None)

    # open_clip's flags do not change the exact result.
    N = sum(uneven)
    X = torch.randn(N, 8, generator=gen, dtype=torch.float64)
    Y = torch.randn(N, 8, generator=gen, dtype=torch.float64)
    o, n = sum(uneven[:rank]), uneven[rank]
    ref_loss = _oracle(X, Y, (10.0,), True)[0]
    clip = {}
    for local_loss in (False, True):
        for gwg in (False, True):
            for impl in ("gather", "ring"):
                cl = ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank,
                              world_size=world, normalize=True, dist_impl=impl)
                clip[f"local={local_loss}/gwg={gwg}/{impl}"] = rel_err(
                    cl(X[o:o + n], Y[o:o + n], torch.tensor(10.0, dtype=torch.float64)),
                    ref_loss)
    out["cliploss"] = clip

    # open_clip's helper get_logits across ranks (a subclass such as its DistillClipLoss calls
    # it): the gathered logits as open_clip gathers them, for uneven shards too. Its plain
    # gather once raised NameError, and an equal-size gather aborts gloo on uneven shards.
    Xr = X.clone().requires_grad_()
    Xn, Yn = torch.nn.functional.normalize(Xr, dim=-1), torch.nn.functional.normalize(Y, dim=-1)
    full = 10.0 * Xn @ Yn.T                                              # [N, N]
    g_own = torch.autograd.grad(full.sum(), Xr)[0][o:o + n]              # d sum(logits) / d own rows
    full = full.detach()
    logits = {}
    for local_loss in (False, True):
        for gwg in (False, True):
            cl = ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=world,
                          normalize=True)
            x = X[o:o + n].clone().requires_grad_()
            per_image, per_text = cl.get_logits(x, Y[o:o + n], 10.0)
            want_i, want_t = (full[o:o + n], full.T[o:o + n]) if local_loss else (full, full.T)
            err = max(rel_err(per_image, want_i), rel_err(per_text, want_t))
            per_image.sum().backward()
            # This rank's rows get their gradient: the whole matrix's, from every rank's copy of
            # it through autograd's all_gather (W x) when gathered with grad and not local.
            want_g = g_own * (world if gwg and not local_loss else 1)
            grad_err = rel_err(x.grad, want_g) if x.grad is not None else float("inf")
            logits[f"local={local_loss}/gwg={gwg}"] = max(err, grad_err)
    out["get_logits"] = logits

    # Features of two float dtypes (bf16 images beside cached fp32 texts): promoted to fp32
    # on every rank, each gradient back in its own dtype, the numbers of fp32 inputs.
    from fastclip.distributed import fused_loss as dist_fused  # noqa: PLC0415
    mixed = {}
    for loss in LOSSES:
        for impl in ("gather", "ring"):
            # Every rank draws the whole batch (the generators stay in step), keeps its rows.
            xb = torch.randn(sum(uneven), 6, generator=gen)[o:o + n].bfloat16()
            yf = torch.randn(sum(uneven), 6, generator=gen)[o:o + n]
            ps = list(_params(loss, 8.0))
            a, b = xb.clone().requires_grad_(), yf.clone().requires_grad_()
            got = dist_fused(loss, a, b, ps, normalize=True, dist_impl=impl)
            got.backward()
            a32, b32 = xb.float().requires_grad_(), yf.clone().requires_grad_()
            want = dist_fused(loss, a32, b32, ps, normalize=True, dist_impl=impl)
            want.backward()
            mixed[f"{loss}/{impl}"] = (torch.equal(got, want) and a.grad.dtype == torch.bfloat16
                                       and torch.equal(a.grad, a32.grad.bfloat16())
                                       and torch.equal(b.grad, b32.grad))
    out["mixed_dtypes"] = mixed

    # Errors: raised on every rank, and the group stays usable afterwards.
    errs = {}
    d = 4 if rank == 0 else 5
    errs["mismatched_D"] = _expect_error(lambda: clip_loss(
        torch.randn(3, d), torch.randn(3, d), 10.0))
    errs["mismatched_dtype"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4, dtype=torch.float64 if rank == 0 else torch.float32),
        torch.randn(3, 4, dtype=torch.float64 if rank == 0 else torch.float32), 10.0))
    errs["mismatched_normalize"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4), torch.randn(3, 4), 10.0, normalize=rank == 0))
    errs["mismatched_impl"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4), torch.randn(3, 4), 10.0, dist_impl="ring" if rank else "gather"))
    errs["bad_rows_one_rank"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4), torch.randn(3 if rank else 2, 4), 10.0))
    errs["mismatched_scale"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4), torch.randn(3, 4), 10.0 + rank))
    errs["expected_world_size"] = _expect_error(lambda: ClipLoss(
        rank=0, world_size=world + 1)(torch.randn(3, 4), torch.randn(3, 4), 10.0))
    errs["meta_device"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4, device="meta"), torch.randn(3, 4, device="meta"), 10.0))
    # A bad configuration on one rank only: every rank raises (before, the others went on
    # and paired with that rank's next call).
    errs["bad_impl_one_rank"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4), torch.randn(3, 4), 10.0, dist_impl="Ring" if rank == 1 else "gather"))
    errs["bad_eps_one_rank"] = _expect_error(lambda: clip_loss(
        torch.randn(3, 4), torch.randn(3, 4), 10.0, eps=0.0 if rank == 1 else 1e-12))
    # One rank evaluating while the others train: the ring's one-pass forward and the
    # evaluation forward post different collectives.
    from fastclip.distributed import siglip_loss  # noqa: PLC0415
    errs["grad_mismatch"] = _expect_error(lambda: siglip_loss(
        torch.randn(3, 4).requires_grad_(rank == 0), torch.randn(3, 4), 10.0, -1.0,
        dist_impl="ring"))
    # ClipLoss's logit_bias (unused by the softmax) is checked and agreed before the loss's
    # collectives: a bad one on one rank left the others waiting there, a NaN one gave that
    # rank alone a NaN loss.
    cl = ClipLoss(rank=rank, world_size=world)
    errs["bad_bias_one_rank"] = _expect_error(lambda: cl(
        torch.randn(3, 4), torch.randn(3, 4), 10.0, torch.zeros(2) if rank == 1 else -1.0))
    errs["nan_bias_one_rank"] = _expect_error(lambda: cl(
        torch.randn(3, 4), torch.randn(3, 4), 10.0, float("nan") if rank == 1 else -1.0))
    # An empty shard on one rank (an uneven last batch): every rank raises, that one with
    # what to do about it.
    rows = 0 if rank == 1 else 3
    errs["empty_shard_one_rank"] = _expect_error(lambda: siglip_loss(
        torch.randn(rows, 4), torch.randn(rows, 4), 10.0, -1.0, dist_impl="ring"))
    out["errors"] = errs
    # A steady-state gather call (the handshake carries the text rows as bytes) with text
    # features that have the negative bit set on one rank: a byte view of them raised on that
    # rank alone, the others waiting in the all-gather.
    xs, ys = torch.randn(3, 4, generator=gen), torch.randn(3, 4, generator=gen)
    first = clip_loss(xs, ys, 10.0)
    again = clip_loss(xs, torch._neg_view(-ys) if rank == 1 else ys, 10.0)
    # float64 rows of norm ~1e-50 (scale 1e53, logits ~1e3): an fp32 norm underflowed to 0, the logit
    # bound to 0, and the shifted merge to an infinite loss.
    xt = torch.randn(sum(uneven), 5, generator=gen, dtype=torch.float64) * 1e-50
    yt = torch.randn(sum(uneven), 5, generator=gen, dtype=torch.float64)
    tiny = clip_loss(xt[o:o + n], yt[o:o + n], 1e53)
    from fastclip import clip_loss as single  # noqa: PLC0415
    from fastclip import siglip_loss as single_sig  # noqa: PLC0415
    # Features made under inference mode (frozen towers), only the scale learning: saved for
    # the backward as in one process (the autograd Functions refused inference tensors).
    with torch.inference_mode():
        xi, yi = torch.randn(sum(uneven), 5, generator=gen), torch.randn(sum(uneven), 5, generator=gen)
    inference = 0.0
    for impl in ("gather", "ring"):
        for dist_fn, one_fn, extra in ((clip_loss, single, ()), (siglip_loss, single_sig, (-1.0,))):
            s, s1 = torch.tensor(3.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
            got = dist_fn(xi[o:o + n], yi[o:o + n], s, *extra, dist_impl=impl)
            got.backward()
            want = one_fn(xi, yi, s1, *extra)
            want.backward()
            inference = max(inference, rel_err(got, want), rel_err(s.grad, s1.grad))
    out["robust"] = {"neg_view_same": bool(torch.equal(first, again)),
                     "tiny_norm": rel_err(tiny, single(xt, yt, 1e53)), "inference_mode": inference}
    # After the errors, a collective call still lines up on every rank.
    out["after_errors"] = _loss_case(rank, world, gen, uneven, "ring", False, torch.float64,
                                     5.0)
    return out


if __name__ == "__main__":   # manual run: python tests/distributed/_workers.py [world]
    import sys
    w = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    t0 = time.perf_counter()
    res = run_group(w, seed=int(os.environ.get("SEED", "0")))
    for k, v in res[0].items():
        print(k, v)
    print(f"{time.perf_counter() - t0:.1f} s")
