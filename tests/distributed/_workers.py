"""Spawned ranks of the distributed tests: gloo on CPU, 127.0.0.1, bounded time.

One spawned group runs many cases (spawning costs ~3 s of imports per process on the
2-core CI machine). Every rank generates the same full batch from a shared seed and
keeps its own rows; it measures its errors against the single-process float64 oracle
(`fastclip.ops.reference.clip_loss_naive` on the concatenated batch) and reports them
to the parent through a queue, which asserts. Exceptions travel the same way, so a
failing rank fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import queue as _queue
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (design.md §5)."""
    out, ref = out.detach().double(), ref.detach().double()
    den = ref.norm().item()
    num = (out - ref).norm().item()
    return num / den if den > 0 else num


# ------------------------------------------------------------------- parent side
def run_group(world: int, seed: int, timeout: float = 100.0) -> dict:
    """Spawn ``world`` ranks, run every case, return {rank: {case: value}}.

    Raises AssertionError with the ranks' tracebacks if a rank fails, or if the group
    does not report within ``timeout`` seconds (the ranks are then terminated).
    """
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


def _oracle(X, Y, scale, normalize):
    from fastclip.ops.reference import clip_loss_naive  # noqa: PLC0415
    xd = X.detach().double().requires_grad_()
    yd = Y.detach().double().requires_grad_()
    sd = torch.tensor(float(scale), dtype=torch.float64, requires_grad=True)
    loss = clip_loss_naive(xd, yd, sd, normalize=normalize)
    gx, gy, gs = torch.autograd.grad(loss, (xd, yd, sd))
    return loss.detach(), gx, gy, gs


def _case_sizes(world: int) -> list[list[int]]:
    if world == 2:
        return [[5, 5], [1, 6], [9, 2]]
    if world == 3:
        return [[4, 4, 4], [4, 1, 6], [1, 7, 2]]
    return [[3] * world, [1] + [4] * (world - 1)]


def _loss_case(rank, world, gen, sizes, impl, normalize, dtype, scale, backend="cpu",
               noncontig=False, d=11):
    from fastclip.distributed import clip_loss  # noqa: PLC0415
    N = sum(sizes)
    X = torch.randn(N, d, generator=gen, dtype=torch.float64)
    Y = torch.randn(N, d, generator=gen, dtype=torch.float64)
    if not normalize:   # features as open_clip's models return them, so logits are O(s)
        X, Y = X / X.norm(dim=1, keepdim=True), Y / Y.norm(dim=1, keepdim=True)
    ref_loss, rgx, rgy, rgs = _oracle(X, Y, scale, normalize)
    o = sum(sizes[:rank])
    n = sizes[rank]
    xk, yk = X[o:o + n].to(dtype), Y[o:o + n].to(dtype)
    if noncontig:       # unit stride along rows, not along D
        xk = xk.T.contiguous().T
        yk = yk.T.contiguous().T
    xk.requires_grad_()
    yk.requires_grad_()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    s = torch.tensor(scale, dtype=acc, requires_grad=True)
    loss = clip_loss(xk, yk, s, normalize=normalize, dist_impl=impl, backend=backend)
    loss.backward()
    # Contract: features get W × the full-batch gradient of their rows; the scale gets
    # the full-batch gradient itself.
    return {"loss": rel_err(loss, ref_loss),
            "gx": rel_err(xk.grad, world * rgx[o:o + n]),
            "gy": rel_err(yk.grad, world * rgy[o:o + n]),
            "gs": rel_err(s.grad, rgs),
            "loss_dtype_ok": loss.dtype == acc and xk.grad.dtype == dtype}


def _half_case(rank, world, gen, sizes, impl, dtype, d=64, scale=14.3):
    """bf16/fp16 features: our error and that of the naive formula run by PyTorch in the
    same dtype, both against the float64 oracle (design.md §5: ours ≤ 2× theirs)."""
    from fastclip.distributed import clip_loss  # noqa: PLC0415
    from fastclip.ops.reference import clip_loss_naive  # noqa: PLC0415
    N = sum(sizes)
    X = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype).double()
    Y = torch.randn(N, d, generator=gen, dtype=torch.float64).to(dtype).double()
    ref = _oracle(X, Y, scale, True)
    o, n = sum(sizes[:rank]), sizes[rank]
    xh = X.to(dtype).requires_grad_()
    yh = Y.to(dtype).requires_grad_()
    sh = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    base_loss = clip_loss_naive(xh, yh, sh, normalize=True)
    bgx, bgy, bgs = torch.autograd.grad(base_loss, (xh, yh, sh))
    xk = X[o:o + n].to(dtype).requires_grad_()
    yk = Y[o:o + n].to(dtype).requires_grad_()
    s = torch.tensor(scale, dtype=torch.float32, requires_grad=True)
    loss = clip_loss(xk, yk, s, normalize=True, dist_impl=impl, backend="cpu")
    loss.backward()
    ours = [loss, xk.grad, yk.grad, s.grad]
    base = [base_loss, world * bgx[o:o + n], world * bgy[o:o + n], bgs]
    refs = [ref[0], world * ref[1][o:o + n], world * ref[2][o:o + n], ref[3]]
    return {k: (rel_err(a, r), rel_err(b, r)) for k, a, b, r in
            zip(("loss", "gx", "gy", "gs"), ours, base, refs)} | {
        "finite": all(bool(torch.isfinite(t).all()) for t in ours),
        "dtypes_ok": xk.grad.dtype == dtype and loss.dtype == torch.float32}


def _ddp_case(rank, world, gen, sizes, impl):
    """A tiny CLIP (two linear encoders + learnable log-scale) under DDP vs one process."""
    import copy  # noqa: PLC0415

    from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: PLC0415

    from fastclip.distributed import clip_loss  # noqa: PLC0415
    from fastclip.ops.reference import clip_loss_naive  # noqa: PLC0415

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.img = torch.nn.Linear(7, 6)
            self.txt = torch.nn.Linear(5, 6)
            self.logit_scale = torch.nn.Parameter(torch.tensor(2.3))

        def forward(self, a, b):
            return self.img(a), self.txt(b), self.logit_scale.exp()

    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
    model = Tiny().double()                      # identical on every rank (same seed)
    N = sum(sizes)
    A = torch.randn(N, 7, generator=gen, dtype=torch.float64)
    B = torch.randn(N, 5, generator=gen, dtype=torch.float64)
    single = copy.deepcopy(model)
    fi, ft, s = single(A, B)
    clip_loss_naive(fi, ft, s, normalize=True).backward()
    ref = {k: p.grad.clone() for k, p in single.named_parameters()}

    ddp = DDP(model)
    o, n = sum(sizes[:rank]), sizes[rank]
    fi, ft, s = ddp(A[o:o + n], B[o:o + n])
    loss = clip_loss(fi, ft, s, normalize=True, dist_impl=impl, backend="cpu")
    loss.backward()
    return {k: rel_err(p.grad, ref[k]) for k, p in ddp.module.named_parameters()}


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
    for sizes in _case_sizes(world):
        for impl in ("gather", "ring"):
            for normalize in (False, True):
                scale = scales[i % len(scales)]
                i += 1
                out[f"f64/{impl}/{sizes}/norm={normalize}/s={scale}"] = _loss_case(
                    rank, world, gen, sizes, impl, normalize, torch.float64, scale)
    uneven = _case_sizes(world)[1]
    for impl in ("gather", "ring"):
        out[f"f32/{impl}/{uneven}/norm=True"] = _loss_case(
            rank, world, gen, uneven, impl, True, torch.float32, 14.3, d=33)
        out[f"f64-noncontig-reference/{impl}/{uneven}"] = _loss_case(
            rank, world, gen, uneven, impl, True, torch.float64, 30.0, backend="reference",
            noncontig=True)
        out[f"ddp/{impl}/{uneven}"] = _ddp_case(rank, world, gen, uneven, impl)
        for dt in (torch.bfloat16, torch.float16):
            out[f"half/{dt}/{impl}/{uneven}"] = _half_case(rank, world, gen, uneven, impl, dt)

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
    ref_loss = _oracle(X, Y, 10.0, True)[0]
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
    out["errors"] = errs
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
