"""Benchmark of fastclip.distributed.clip_loss: time and per-rank memory.

Modes:

* ``--mode cpu`` (default): W ranks spawned on this machine, gloo on 127.0.0.1, one
  forward+backward per case at D=512 float32 for ``dist_impl`` "gather", "ring" and
  open_clip's sharded loss ("openclip": features all-gathered with gradient, the two
  local n×N logit matrices, two cross-entropies; ``local_loss=True,
  gather_with_grad=True``). Per-rank peak memory is the rise of the resident set
  during the case (VmHWM after resetting it through /proc/self/clear_refs, minus VmRSS
  before), so it counts every buffer the loss allocates, the feature gradients
  included (2·n·D·4 bytes). Time is wall clock between two barriers: the slowest rank.
* ``--mode w1``: the single-device cost of the sharded code path. One process, a
  process group of size 1 (NCCL on CUDA, gloo on CPU), ``fastclip.clip_loss`` against
  ``fastclip.distributed.clip_loss`` "gather" and "ring" on the same features; CUDA
  time by events (median of ``--reps``), memory by ``torch.cuda.max_memory_allocated``.
  ``--device cuda`` (default) needs a GPU.

Writes ``<out>.csv`` (a row per measurement with device, versions, commit) and
``<out>.md``. Examples::

    python benchmarks/bench_distributed.py --mode cpu --worlds 2 4 --sizes 2048 8192 16384
    python benchmarks/bench_distributed.py --mode w1 --sizes 16384 65536 --dtypes bf16 fp32
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}


# ------------------------------------------------------------------- environment
def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                             capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=HERE, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _versions() -> dict:
    import fastclip  # noqa: PLC0415
    return {"torch": torch.__version__, "fastclip": fastclip.__version__,
            "python": platform.python_version(), "commit": _commit()}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) if m else 0


def _reset_peak_rss() -> bool:
    try:   # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ------------------------------------------------------------------- loss forms
def _openclip_loss(x, y, scale):
    """open_clip ClipLoss(local_loss=True, gather_with_grad=True), sharded."""
    from torch.distributed.nn.functional import all_gather  # noqa: PLC0415
    rank = dist.get_rank()
    all_x = torch.cat(all_gather(x), 0)
    all_y = torch.cat(all_gather(y), 0)
    logits_per_image = scale * x @ all_y.T                 # [n, N]
    logits_per_text = scale * y @ all_x.T                  # [n, N]
    labels = torch.arange(x.shape[0], device=x.device) + rank * x.shape[0]
    return (F.cross_entropy(logits_per_image, labels)
            + F.cross_entropy(logits_per_text, labels)) / 2


def _loss_fn(impl: str):
    if impl == "openclip":
        return _openclip_loss
    from fastclip.distributed import clip_loss  # noqa: PLC0415
    return lambda x, y, s: clip_loss(x, y, s, dist_impl=impl)


# ------------------------------------------------------------------- CPU, W ranks
def _cpu_rank(rank, world, port, args, q):
    import warnings  # noqa: PLC0415
    # torch.distributed.nn.functional.all_gather (the open_clip path) is deprecated in
    # torch 2.13 but is what open_clip calls.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        threads = max(1, (os.cpu_count() or 1) // world)
        torch.set_num_threads(threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=1800))
        rows = []
        gen = torch.Generator().manual_seed(1234 + rank)
        # Warm-up: first calls pay for thread pools, allocator growth, gloo buffers.
        for impl in args.impls:
            x = torch.randn(64, args.dim, generator=gen, requires_grad=True)
            y = torch.randn(64, args.dim, generator=gen, requires_grad=True)
            _loss_fn(impl)(x, y, torch.tensor(14.3, requires_grad=True)).backward()
        for N in args.sizes:
            n = N // world
            for impl in args.impls:
                x = F.normalize(torch.randn(n, args.dim, generator=gen), dim=1).requires_grad_()
                y = F.normalize(torch.randn(n, args.dim, generator=gen), dim=1).requires_grad_()
                s = torch.tensor(14.3, requires_grad=True)
                dist.barrier()
                rss0 = _status_kib("VmRSS")
                ok = _reset_peak_rss()
                t0 = time.perf_counter()
                loss = _loss_fn(impl)(x, y, s)
                loss.backward()
                dist.barrier()
                dt = time.perf_counter() - t0
                peak = (_status_kib("VmHWM") - rss0) / 1024 if ok else float("nan")
                stats = [None] * world
                dist.all_gather_object(stats, (dt, peak))
                if rank == 0:
                    rows.append({"world": world, "impl": impl, "N": N, "n_per_rank": n,
                                 "D": args.dim, "dtype": "fp32", "threads_per_rank": threads,
                                 "time_s": max(t for t, _ in stats),
                                 "peak_mib_per_rank": max(p for _, p in stats)})
                    print(f"W={world} N={N:6d} {impl:8s} {rows[-1]['time_s']:7.2f} s "
                          f"{rows[-1]['peak_mib_per_rank']:8.1f} MiB/rank", flush=True)
                del x, y, s, loss
        q.put((rank, "ok", rows))
    except BaseException:   # noqa: BLE001
        import traceback  # noqa: PLC0415
        q.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_cpu(args) -> list[dict]:
    import torch.multiprocessing as mp  # noqa: PLC0415
    # A fixed mmap threshold turns off glibc's adaptive one, so every large tensor is
    # mmapped and returned on free: the resident-set peak of a case is its own.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 17)
    ctx = mp.get_context("spawn")
    out = []
    for world in args.worlds:
        q = ctx.Queue()
        port = _free_port()
        procs = [ctx.Process(target=_cpu_rank, args=(r, world, port, args, q))
                 for r in range(world)]
        for p in procs:
            p.start()
        got = {}
        while len(got) < world:
            rank, status, payload = q.get(timeout=1800)
            if status != "ok":
                for p in procs:
                    p.terminate()
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            got[rank] = payload
        for p in procs:
            p.join(timeout=60)
        out.extend(got[0])
    device = f"CPU ({_cpu_name()}, {os.cpu_count()} cores shared by all ranks)"
    for r in out:
        r["device"] = device
    return out


# ------------------------------------------------------------------- one device, W=1
def run_w1(args) -> list[dict]:
    import fastclip  # noqa: PLC0415
    from fastclip.distributed import clip_loss as dclip  # noqa: PLC0415
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("--mode w1 --device cuda: no CUDA device here; nothing measured")
            return []
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1, timeout=timedelta(seconds=600))
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({_cpu_name()})"
    forms = {"plain": lambda x, y, s: fastclip.clip_loss(x, y, s),
             "gather": lambda x, y, s: dclip(x, y, s, dist_impl="gather"),
             "ring": lambda x, y, s: dclip(x, y, s, dist_impl="ring")}
    rows = []

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    try:
        for dname in args.dtypes:
            dt = DTYPES[dname]
            for N in args.sizes:
                x0 = F.normalize(torch.randn(N, args.dim, device=dev), dim=1).to(dt)
                y0 = F.normalize(torch.randn(N, args.dim, device=dev), dim=1).to(dt)
                for form, fn in forms.items():
                    x = x0.clone().requires_grad_()
                    y = y0.clone().requires_grad_()
                    s = torch.tensor(14.3, device=dev, requires_grad=True)
                    fn(x, y, s).backward()                  # warm-up (JIT, autotune)
                    sync()
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                        base = torch.cuda.memory_allocated(dev)
                    times = []
                    for _ in range(args.reps):
                        x.grad = y.grad = s.grad = None
                        sync()
                        t0 = time.perf_counter()
                        fn(x, y, s).backward()
                        sync()
                        times.append(time.perf_counter() - t0)
                    peak = ((torch.cuda.max_memory_allocated(dev) - base) / 2**20
                            if dev.type == "cuda" else float("nan"))
                    rows.append({"world": 1, "impl": form, "N": N, "n_per_rank": N,
                                 "D": args.dim, "dtype": dname, "threads_per_rank":
                                 torch.get_num_threads(), "time_s": statistics.median(times),
                                 "peak_mib_per_rank": peak, "device": name})
                    print(f"W=1 {dname} N={N:6d} {form:6s} {rows[-1]['time_s'] * 1e3:9.2f} ms "
                          f"{peak:9.1f} MiB", flush=True)
                    del x, y, s
    finally:
        dist.destroy_process_group()
    return rows


# ------------------------------------------------------------------- output
def write(rows: list[dict], out: str, args, wall: float) -> None:
    if not rows:
        return
    ver = _versions()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for r in rows:
        r.update(mode=args.mode, **ver, date=stamp)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    impls = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [f"# fastclip.distributed benchmark ({args.mode})", "",
             f"- device: {rows[0]['device']}",
             f"- torch {ver['torch']}, fastclip {ver['fastclip']}, Python {ver['python']}, "
             f"commit {ver['commit']}, {stamp}",
             f"- command: `python benchmarks/{os.path.basename(__file__)} "
             f"{' '.join(sys.argv[1:])}` ({wall:.0f} s)",
             "- one forward+backward per cell; time = slowest rank between barriers; memory "
             "= per-rank peak rise of the resident set (max over ranks), feature gradients "
             "included" if args.mode == "cpu" else
             f"- median of {args.reps} forward+backward; memory = peak allocated beyond the "
             f"inputs",
             ]
    if args.mode == "cpu":
        lines.append("- shared machine (other jobs were running): times are indicative, "
                     "memory is exact")
    for (world, dname) in dict.fromkeys((r["world"], r["dtype"]) for r in rows):
        sub = [r for r in rows if r["world"] == world and r["dtype"] == dname]
        lines += ["", f"## W = {world}, D = {args.dim}, {dname}", "",
                  "| N | n/rank | " + " | ".join(f"{i} time (s)" for i in impls) + " | "
                  + " | ".join(f"{i} MiB/rank" for i in impls) + " |",
                  "|---:|---:|" + "---:|" * (2 * len(impls))]
        for N in dict.fromkeys(r["N"] for r in sub):
            cell = {r["impl"]: r for r in sub if r["N"] == N}
            t = [f"{cell[i]['time_s']:.3f}" if i in cell else "" for i in impls]
            m = [f"{cell[i]['peak_mib_per_rank']:.0f}" if i in cell else "" for i in impls]
            lines.append(f"| {N} | {cell[impls[0]]['n_per_rank']} | " + " | ".join(t) + " | "
                         + " | ".join(m) + " |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {out}.csv and {out}.md")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("cpu", "w1"), default="cpu")
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--impls", nargs="+", default=["gather", "ring", "openclip"],
                   choices=("gather", "ring", "openclip"))
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=sorted(DTYPES),
                   help="w1 mode only (the cpu mode runs fp32)")
    p.add_argument("--device", default="cuda", help="w1 mode: cuda (default) or cpu")
    p.add_argument("--reps", type=int, default=5, help="w1 mode: timed repetitions")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.sizes is None:
        args.sizes = [2048, 8192, 16384] if args.mode == "cpu" else [16384, 65536]
    if args.out is None:
        kind = "cpu" if args.mode == "cpu" else f"w1-{torch.device(args.device).type}"
        args.out = os.path.join(HERE, "results", f"distributed-{kind}")
    t0 = time.perf_counter()
    rows = run_cpu(args) if args.mode == "cpu" else run_w1(args)
    write(rows, args.out, args, time.perf_counter() - t0)


if __name__ == "__main__":
    main()
