"""The sharded-loss benchmark: fastclip's distributed forms against open_clip's.

For one loss (``--loss``, default ``clip``; its sharded forms come from its entry in
:mod:`fastclip.bench.methods`), three modes:

* ``--mode cpu`` (default): W ranks spawned on this machine, gloo on 127.0.0.1, one
  forward+backward per case at D=512 float32 for fastclip's ``gather`` and ``ring``
  and ``openclip``: open_clip's own class for W ranks (CLIP: ``ClipLoss(local_loss=True,
  gather_with_grad=True)``) when open_clip is importable, else the same formula on
  all-gathered features. Per-rank peak memory is the rise of the resident set during
  the case (VmHWM after resetting it, minus VmRSS before), so it counts every buffer
  the loss allocates, the feature gradients included (2·n·D·4 bytes). Time is wall
  clock between two barriers: the slowest rank.
  World sizes above ``--max-world`` (default 4 ranks per core this process may use) are
  refused before any rank is spawned, in this mode and the next.
* ``--mode overhead``: per-call wall time at small N (default 32, 256, 1024 global,
  W = 2), where the collectives and the dispatch dominate: one forward and one
  forward+backward per call, each timed alone on every rank with the methods
  interleaved; per call the slowest rank, then the median over many calls (µs).
* ``--mode w1``: the single-device cost of the sharded code path. One process, a
  process group of size 1 (NCCL on CUDA, gloo on CPU), the plain fused loss against
  the sharded ``gather`` and ``ring`` on the same features; wall time between device
  synchronisations (median of ``--reps``), memory by ``torch.cuda.max_memory_allocated``
  on CUDA, by the rise of the resident set on the CPU.

Writes ``<out>/distributed-<mode>[-<device>][-<loss>].csv`` (a row per measurement with
device, versions, commit) and ``.md``; ``<out>`` defaults to ``./benchmarks/results``
when the current directory has one (existing files there are replaced only with
``--overwrite``), else the current directory.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import signal
import statistics
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from . import methods as M
from .env import cpu_count, cpu_name, env_info, gb, meminfo_bytes
from .measure import (
    Step,
    free_port,
    malloc_for_memory,
    per_call_times,
    proc_status_kb,
    reset_peak_rss,
    unit_features,
)
from .report import (
    BenchError,
    ListArg,
    add_out_args,
    check_out_dir,
    check_replace,
    default_out_dir,
    derive_overhead,
    parse_size,
    write_csv,
    write_overhead_markdown,
    write_text,
)

__all__ = ["main", "build_parser", "run_cpu", "run_overhead", "run_w1"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
IMPLS = ("gather", "ring", "openclip")
PEER = "openclip"
# Ranks per core allowed by default: each rank is a process with its own torch (hundreds of
# MB) and at least one thread, so past a few per core the run measures the scheduler, and a
# typo such as --worlds 64 on a small machine would spawn 64 processes for minutes.
RANKS_PER_CORE = 4


def default_max_world() -> int:
    """The largest world size --mode cpu/overhead spawns without --max-world."""
    return RANKS_PER_CORE * cpu_count()


# ------------------------------------------------------------------- loss forms
def _peer(spec: M.BenchLoss, rank: int, world: int):
    """(fn(x, y, params) -> loss over the group, description) of open_clip's sharded loss."""
    kwargs = spec.open_clip_sharded(rank, world)
    cls, why = M.load_open_clip(spec.open_clip_class)
    if cls is not None:
        inst = cls(**kwargs)
        args = ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "rank")
        return (lambda x, y, p: inst(x, y, *p)), f"{why}({args})"
    return ((lambda x, y, p: spec.sharded_formula(x, y, p, rank)),
            f"the same formula on all-gathered features ({why})")


def _loss_fn(spec: M.BenchLoss, impl: str, rank: int, world: int, backend: str):
    """(fn(x, y, params), description) of one sharded form."""
    if impl == PEER:
        return _peer(spec, rank, world)
    return ((lambda x, y, p: spec.distributed(x, y, p, impl, backend)),
            f"fastclip distributed {spec.name} loss, dist_impl={impl!r}, backend={backend!r}")


def _rank_setup(rank: int, world: int, port: int, timeout_s: float) -> int:
    import warnings  # noqa: PLC0415
    # torch.distributed.nn.functional.all_gather (open_clip's gather_with_grad path) is
    # deprecated in torch 2.13 but is what open_clip calls.
    warnings.filterwarnings("ignore", category=FutureWarning)
    threads = max(1, cpu_count() // world)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    return threads


class RankFailed(BenchError):
    """A rank raised or died; ``rows`` and ``impls`` hold what its world measured before."""

    def __init__(self, message: str, rows: list | None = None, impls: dict | None = None):
        super().__init__(message)
        self.rows, self.impls = rows or [], impls or {}


class _SentRows(list):
    """A rank's rows, each also sent to the parent as it is measured: a rank killed later
    (for memory, at a larger N) while another is still computing loses nothing measured (the
    parent held only the rows of ranks that had finished)."""

    def __init__(self, q, rank: int, impls: dict):
        super().__init__()
        self.q, self.rank, self.impls = q, rank, impls

    def append(self, row) -> None:
        super().append(row)
        self.q.put((self.rank, "rows", (list(self), dict(self.impls))))


def _rank_main(body, rank, world, port, args, q, timeout_s):
    """One spawned rank: join the gloo group, run ``body(rank, world, args, threads, rows,
    impls)`` (which fills ``rows`` and ``impls`` as it goes) and send them to the parent, with
    its traceback if it failed (the rows measured before stay); leave the group however it
    ends."""
    impls = {}
    rows = _SentRows(q, rank, impls)
    try:
        threads = _rank_setup(rank, world, port, timeout_s)
        body(rank, world, args, threads, rows, impls)
        q.put((rank, "ok", (list(rows), impls)))
    except KeyboardInterrupt:
        pass                # Ctrl-C reached the whole process group: the parent reports it
    except BaseException as e:   # noqa: BLE001 - reported to the parent, which raises
        import traceback  # noqa: PLC0415
        last = f"{type(e).__name__}: {e}".strip().splitlines()
        q.put((rank, "error", (last[0] if last else type(e).__name__, traceback.format_exc(), list(rows),
                               impls)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    # Leave without finalising the interpreter, once the reports are through the pipe: a rank
    # that finalised after gloo's threads had served its group printed "terminate called
    # without an active exception" now and then (1 of 30 overhead runs), after its report,
    # as `fastclip train`'s ranks did under torchrun (cli.entry).
    q.close()
    q.join_thread()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def _died(rank: int, code: int, world: int) -> str:
    """What a rank process that ended without reporting did: killed by a signal, or exited."""
    how = (f"killed by signal {-code}" + (" (SIGKILL: out of memory?)" if code == -9 else "")
           if code < 0 else f"exited with status {code}")
    return f"rank {rank} {how} before reporting, at world size {world}"


def _spawn(body, world: int, args, timeout_s: float) -> dict:
    """Run ``body`` on ``world`` spawned ranks of one gloo group (collectives time out after
    ``timeout_s``); return {rank: (rows, impls)}. A rank that raises, or dies without a word
    (killed for memory, a crash), is ``RankFailed`` here within seconds, never a hang; it
    carries rank 0's rows measured before."""
    import torch.multiprocessing as mp  # noqa: PLC0415
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(body, r, world, port, args, q, timeout_s))
             for r in range(world)]
    # The ranks start with Ctrl-C ignored (an ignored signal stays ignored in the new process):
    # the parent alone handles it and ends them; one interrupted mid-import printed a traceback.
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:          # not the main thread: leave the handler as it is
        previous = None
    try:
        for p in procs:
            p.start()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    import queue  # noqa: PLC0415
    got, sent = {}, {}      # the finished ranks' reports; every rank's rows measured so far

    def measured():
        return got.get(0) or sent.get(0) or ([], {})
    deadline = time.monotonic() + timeout_s
    dead_since = None
    try:
        while len(got) < world:
            try:
                rank, status, payload = q.get(timeout=1.0)
            except queue.Empty:
                # A rank gone without a message (its report may still be in the pipe for a
                # moment after it exits: a few seconds' grace).
                gone = [(r, p.exitcode) for r, p in enumerate(procs) if r not in got and p.exitcode is not None]
                now = time.monotonic()
                if gone:
                    dead_since = dead_since or now
                    if now - dead_since > 5:
                        raise RankFailed(_died(*gone[0], world), *measured()) from None
                if now > deadline:
                    raise RankFailed(f"no report from rank(s) {sorted(set(range(world)) - set(got))} in "
                                     f"{timeout_s:.0f} s at world size {world}", *measured()) from None
                continue
            if status == "rows":
                sent[rank] = payload
                continue
            if status != "ok":
                first, tb, rows, impls = payload
                # A peer killed without a word makes the ranks waiting on it fail at once
                # ("Connection closed by peer"): the one that died is the cause to name.
                for _ in range(20):
                    dead = [(r, p.exitcode) for r, p in enumerate(procs)
                            if r != rank and r not in got and p.exitcode is not None and p.exitcode < 0]
                    if dead:
                        raise RankFailed(_died(*dead[0], world) + f" (rank {rank} then lost its peer)",
                                         rows, impls)
                    time.sleep(0.1)
                if os.environ.get("FASTCLIP_BENCH_TRACEBACK"):
                    print(tb, file=sys.stderr)
                # Every rank keeps the rows: its measured cases stay with the world's error.
                raise RankFailed(f"rank {rank} failed at world size {world}: {first}", rows, impls)
            got[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=60 if len(got) == world else 1)
            if p.is_alive():
                p.terminate()
    return got


# ------------------------------------------------------------------- CPU, W ranks
def _cpu_rank(rank, world, args, threads, rows, impls):
    spec = M.get_loss(args.loss)
    gen_seed = 1234 + rank
    # Warm-up: first calls pay for thread pools, allocator growth, gloo buffers.
    for impl in args.impls:
        fn, impls[impl] = _loss_fn(spec, impl, rank, world, args.backend)
        x, y = unit_features(64, args.dim, torch.float32, "cpu", gen_seed)
        fn(x, y, spec.params("cpu")).backward()
    for N in args.sizes:
        n = N // world
        for impl in args.impls:
            fn, _ = _loss_fn(spec, impl, rank, world, args.backend)
            x, y = unit_features(n, args.dim, torch.float32, "cpu", gen_seed)
            params = spec.params("cpu")
            malloc_for_memory()     # every buffer >= 128 KB mapped fresh: this case's own peak
            dist.barrier()
            rss0 = proc_status_kb("VmRSS")
            ok = reset_peak_rss()
            t0 = time.perf_counter()
            loss = fn(x, y, params)
            loss.backward()
            dist.barrier()
            dt = time.perf_counter() - t0
            peak = (proc_status_kb("VmHWM") - rss0) / 1024 if ok else float("nan")
            stats = [None] * world
            dist.all_gather_object(stats, (dt, peak))
            # Every rank records the row (whichever rank fails later reports what was measured).
            rows.append({"world": world, "impl": impl, "N": N, "n_per_rank": n,
                         "D": args.dim, "dtype": "fp32", "threads_per_rank": threads,
                         "time_s": max(t for t, _ in stats),
                         "peak_mib_per_rank": max(p for _, p in stats)})
            if rank == 0:
                print(f"W={world} N={N:6d} {impl:8s} {rows[-1]['time_s']:8.4g} s "
                      f"{rows[-1]['peak_mib_per_rank']:8.1f} MiB/rank", flush=True)
            del x, y, params, loss


def _by_world(per_world: dict[int, dict]) -> dict:
    """One description per method: the same at every world size, or each world's in turn
    (open_clip's class is built with its world_size)."""
    out = {}
    for name in dict.fromkeys(k for d in per_world.values() for k in d):
        seen = {w: d[name] for w, d in per_world.items() if name in d}
        vals = list(dict.fromkeys(seen.values()))
        out[name] = vals[0] if len(vals) == 1 else "; ".join(f"W = {w}: {v}" for w, v in seen.items())
    return out


def _run_worlds(body, timeout_s: float, args, out: list | None, impls: dict | None) -> tuple[list[dict], dict]:
    """``body`` on every world size of ``args.worlds`` in turn; the rows and descriptions go into
    ``out`` and ``impls`` as each world finishes (what an interrupted run keeps)."""
    out, impls = ([] if out is None else out), ({} if impls is None else impls)
    for world in args.worlds:
        try:
            rows, impls[world] = _spawn(body, world, args, timeout_s)[0]
        except RankFailed as e:
            out.extend(e.rows)          # this world's cases measured before the failure
            if e.impls:
                impls[world] = e.impls
            raise
        out.extend(rows)
    return out, _by_world(impls)


def run_cpu(args, out: list | None = None, impls: dict | None = None) -> tuple[list[dict], dict]:
    return _run_worlds(_cpu_rank, 1800, args, out, impls)


# ------------------------------------------------------------------- overhead, W ranks
def _overhead_rank(rank, world, args, threads, rows, impls):
    spec = M.get_loss(args.loss)

    def agree(rounds: int) -> int:           # every rank runs the same calls
        t = torch.tensor([rounds])
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())

    for N in args.sizes:
        n = N // world
        x, y = unit_features(n, args.dim, torch.float32, "cpu", 1234 + rank)
        params = spec.params("cpu")
        steps = {}
        for impl in args.impls:
            fn, impls[impl] = _loss_fn(spec, impl, rank, world, args.backend)
            steps[impl] = Step((lambda f=fn, a=x, b=y, p=params: f(a, b, p)),
                               lambda loss: loss.backward(), impls[impl])
        times = per_call_times(steps, (x, y, *params), sync=lambda: None,
                               budget_s=args.target_s, rounds=args.calls, agree=agree)
        every = [None] * world
        dist.all_gather_object(every, times)
        for impl in args.impls:     # every rank records the rows (see _cpu_rank); rank 0 prints
            # per call the slowest rank, then the median over the calls
            fwd = [max(ts) for ts in zip(*(e[impl][0] for e in every))]
            tot = [max(ts) for ts in zip(*(e[impl][1] for e in every))]
            rows.append({"world": world, "method": impl, "N": N, "n_per_rank": n,
                         "D": args.dim, "dtype": "fp32", "threads_per_rank": threads,
                         "fwd_us": f"{statistics.median(fwd) * 1e6:.1f}",
                         "fwd_bwd_us": f"{statistics.median(tot) * 1e6:.1f}",
                         "fwd_us_min": f"{min(fwd) * 1e6:.1f}",
                         "fwd_bwd_us_min": f"{min(tot) * 1e6:.1f}",
                         "calls": len(tot), "status": "ok", "impl": impls[impl]})
            if rank == 0:
                print(f"W={world} N={N:5d} {impl:8s} fwd {rows[-1]['fwd_us']:>9} us  "
                      f"fwd+bwd {rows[-1]['fwd_bwd_us']:>9} us  ({len(tot)} calls)",
                      flush=True)
        del x, y, params, steps


def run_overhead(args, out: list | None = None, impls: dict | None = None) -> tuple[list[dict], dict]:
    return _run_worlds(_overhead_rank, 900, args, out, impls)


# ------------------------------------------------------------------- one device, W=1
def run_w1(args, rows: list | None = None, impls: dict | None = None) -> tuple[list[dict], dict]:
    """The plain loss, gather and ring on one process; ``rows`` (filled as cases finish) keeps
    what was measured when a later case fails."""
    spec = M.get_loss(args.loss)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            print("--mode w1 --device cuda: no CUDA device here; nothing measured")
            return [], {}
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                            rank=0, world_size=1, timeout=timedelta(seconds=600))
    forms = {"plain": lambda x, y, p: spec.fused(x, y, p, args.backend),
             "gather": lambda x, y, p: spec.distributed(x, y, p, "gather", args.backend),
             "ring": lambda x, y, p: spec.distributed(x, y, p, "ring", args.backend)}
    impls = {} if impls is None else impls
    impls.update({"plain": f"{spec.fused_name}(backend={args.backend!r})",
                  "gather": "dist_impl='gather'", "ring": "dist_impl='ring'"})
    rows = [] if rows is None else rows

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    try:
        for dname in args.dtypes:
            for N in args.sizes:
                x0, y0 = unit_features(N, args.dim, DTYPES[dname], dev.type, 0)
                for form, fn in forms.items():
                    x = x0.detach().clone().requires_grad_()
                    y = y0.detach().clone().requires_grad_()
                    params = spec.params(dev.type)
                    fn(x, y, params).backward()                  # warm-up (JIT, autotune)
                    sync()
                    x.grad = y.grad = None
                    for p in params:
                        p.grad = None
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(dev)
                        base = torch.cuda.memory_allocated(dev)
                    else:
                        malloc_for_memory()
                        base = proc_status_kb("VmRSS")
                        valid = reset_peak_rss()
                    times = []
                    for _ in range(args.reps):
                        x.grad = y.grad = None
                        for p in params:
                            p.grad = None
                        sync()
                        t0 = time.perf_counter()
                        fn(x, y, params).backward()
                        sync()
                        times.append(time.perf_counter() - t0)
                    if dev.type == "cuda":
                        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
                    else:       # the resident set's rise over the reps (gradients included)
                        peak = (proc_status_kb("VmHWM") - base) / 1024 if valid else float("nan")
                    rows.append({"world": 1, "impl": form, "N": N, "n_per_rank": N,
                                 "D": args.dim, "dtype": dname, "threads_per_rank":
                                 torch.get_num_threads(), "time_s": statistics.median(times),
                                 "peak_mib_per_rank": peak})
                    print(f"W=1 {dname} N={N:6d} {form:6s} {rows[-1]['time_s'] * 1e3:9.2f} ms "
                          f"{peak:9.1f} MiB", flush=True)
                    del x, y, params
    finally:
        dist.destroy_process_group()
    return rows, impls


# ------------------------------------------------------------------- output
def _stem(args) -> str:
    kind = args.mode if args.mode != "w1" else f"w1-{torch.device(args.device).type}"
    return f"distributed-{kind}" + (f"-{args.loss}" if args.loss != "clip" else "")


def write(rows: list[dict], impls: dict, args, argv: list[str], wall: float,
          info: dict) -> str:
    """``<out>/<stem>.csv`` and ``.md``; returns the prefix ("" when nothing was measured).
    ``info``: :func:`fastclip.bench.env.env_info` taken at the start of the run."""
    if not rows:
        return ""
    gpu = args.mode == "w1" and torch.device(args.device).type == "cuda"      # (cpu:0 is a CPU)
    device = (torch.cuda.get_device_name(torch.device(args.device)) if gpu
              else f"CPU ({cpu_name()}, {os.cpu_count()} cores"
              + (" shared by all ranks)" if args.mode != "w1" else ")"))
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    for r in rows:
        r.update(loss=args.loss, device=device, mode=args.mode, torch=info["torch"],
                 fastclip=info["fastclip"], python=info["python"], commit=info["commit"],
                 date=stamp)
    prefix = os.path.join(args.out, _stem(args))
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "overhead":
        derive_overhead(rows, peer=PEER)        # (before the CSV: its ratio columns were missing)
    write_csv(rows, prefix + ".csv", list(dict.fromkeys(k for r in rows for k in r)))
    spec = M.get_loss(args.loss)
    head = [f"device: {device}",
            f"torch {info['torch']}, fastclip {info['fastclip']}, Python {info['python']}, "
            f"commit {info['commit']}, {stamp}; load average at start {info['load']}",
            f"command: `fastclip bench distributed {' '.join(argv)}` ({wall:.0f} s)"]
    head += [f"{k}: {v}" for k, v in impls.items()]
    if args.mode == "overhead":
        head += ["N is the global batch (n = N/W rows per rank), D = "
                 f"{args.dim}, fp32, threads per rank "
                 + ", ".join(f"{max(1, cpu_count() // w)} at W = {w}" for w in args.worlds)
                 + "; gloo on 127.0.0.1.",
                 "per call: one forward (the loss is dropped), or one forward+backward, each "
                 "timed alone on every rank, the methods interleaved call by call; the slowest "
                 "rank's time per call, median (and minimum) over `calls` calls after 10 "
                 "warm-up steps."]
        write_overhead_markdown(rows, f"fastclip.distributed {spec.name} loss: per-call "
                                "overhead", head, prefix + ".md", peer=PEER)
        print(f"wrote {prefix}.csv and {prefix}.md")
        return prefix
    if args.mode == "cpu":
        head.append("one forward+backward per cell; time = slowest rank between barriers; "
                    "memory = per-rank peak rise of the resident set (max over ranks), feature "
                    "gradients included; other work on the machine inflates the times, not the "
                    "memory")
    elif torch.device(args.device).type == "cuda":
        head.append(f"median of {args.reps} forward+backward; memory = peak allocated beyond "
                    "the inputs")
    else:
        head.append(f"median of {args.reps} forward+backward; memory = rise of the resident set "
                    "over them, feature gradients included")
    names = list(dict.fromkeys(r["impl"] for r in rows))
    lines = [f"# fastclip.distributed {spec.name} loss benchmark ({args.mode})", "",
             *(f"- {h}" for h in head)]
    for (world, dname) in dict.fromkeys((r["world"], r["dtype"]) for r in rows):
        sub = [r for r in rows if r["world"] == world and r["dtype"] == dname]
        lines += ["", f"## W = {world}, D = {args.dim}, {dname}", "",
                  "| N | n/rank | " + " | ".join(f"{i} time (s)" for i in names) + " | "
                  + " | ".join(f"{i} MiB/rank" for i in names) + " |",
                  "|---:|---:|" + "---:|" * (2 * len(names))]
        for N in dict.fromkeys(r["N"] for r in sub):
            cell = {r["impl"]: r for r in sub if r["N"] == N}
            t = [f"{cell[i]['time_s']:.4g}" if i in cell else "" for i in names]
            m = [f"{cell[i]['peak_mib_per_rank']:.1f}" if i in cell else "" for i in names]
            lines.append(f"| {N} | {next(iter(cell.values()))['n_per_rank']} | "
                         + " | ".join(t) + " | " + " | ".join(m) + " |")
    write_text(prefix + ".md", "\n".join(lines) + "\n")
    print(f"wrote {prefix}.csv and {prefix}.md")
    return prefix


def build_parser(prog: str = "fastclip bench distributed") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, allow_abbrev=False,
        description="Time and memory of fastclip's sharded loss (gather, ring) against "
                    "open_clip's, on W spawned gloo ranks; or per-call overhead at small N; "
                    "or the single-device cost of the sharded path (w1).")
    p.add_argument("--loss", choices=[n for n, s in M.LOSSES.items() if s.distributed],
                   default="clip")
    p.add_argument("--mode", choices=("cpu", "overhead", "w1"), default="cpu")
    p.add_argument("--worlds", action=ListArg, convert=int, default=None,
                   help="world sizes, comma- or space-separated (default: cpu 2 4; overhead 2)")
    p.add_argument("--max-world", type=int, default=None,
                   help="cpu and overhead modes: refuse a world size above this (default "
                        f"{RANKS_PER_CORE} ranks per core this process may use, here "
                        f"{default_max_world()}); every rank is a spawned process")
    p.add_argument("--sizes", action=ListArg, convert=parse_size, default=None,
                   help="global batch sizes N, comma- or space-separated, 64k = 65536 "
                        "(default: cpu 2048 8192 16384; overhead 32 256 1024; w1 16384 65536)")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--impls", action=ListArg, allowed=list(IMPLS), default=list(IMPLS))
    p.add_argument("--backend", default="auto",
                   help="fastclip backend of the fused blocks (default auto)")
    p.add_argument("--dtypes", action=ListArg, allowed=sorted(DTYPES), default=["bf16", "fp32"],
                   help="w1 mode only (the other modes run fp32)")
    p.add_argument("--device", default="cuda", help="w1 mode: cuda (default) or cpu")
    p.add_argument("--reps", type=int, default=5, help="w1 mode: timed repetitions")
    p.add_argument("--calls", type=int, default=0,
                   help="overhead mode: timed calls per method and N (default: what fits "
                        "--target-s, at least 30)")
    p.add_argument("--target-s", type=float, default=3.0,
                   help="overhead mode: seconds of timed calls per N (default 3)")
    add_out_args(p)
    return p


def _check_args(p: argparse.ArgumentParser, args) -> None:
    """Every argument checked before a rank is spawned: one-line errors."""
    from ..ops.backends import all_backends  # noqa: PLC0415
    for flag, vals in (("--worlds", args.worlds), ("--sizes", args.sizes), ("--dim", [args.dim]),
                       ("--reps", [args.reps])):
        if any(v < 1 for v in vals):
            p.error(f"{flag} must be positive, got {' '.join(map(str, vals))}")
    if args.max_world is not None and args.max_world < 1:
        p.error(f"--max-world must be positive, got {args.max_world}")
    if args.mode != "w1":           # w1 runs one process whatever --worlds says
        bound = default_max_world() if args.max_world is None else args.max_world
        big = [w for w in args.worlds if w > bound]
        if big:
            why = (f"the default bound {bound}: {RANKS_PER_CORE} ranks per core on the "
                   f"{cpu_count()} cores this process may use" if args.max_world is None
                   else f"--max-world {bound}")
            p.error(f"--worlds {big[0]}: more ranks than {why} (every rank is a spawned "
                    f"process); pass --max-world {max(big)} to run it anyway")
    # A flag the mode does not read is refused, not ignored (it was recorded in the markdown's
    # command line as if it had applied).
    applies = {"--dtypes": ("w1",), "--device": ("w1",), "--reps": ("w1",), "--worlds": ("cpu", "overhead"),
               "--max-world": ("cpu", "overhead"), "--impls": ("cpu", "overhead"),
               "--calls": ("overhead",), "--target-s": ("overhead",)}
    for flag, modes in applies.items():
        if flag in getattr(args, "given", ()) and args.mode not in modes:
            what = {"w1": "the w1 mode runs the plain loss, gather and ring in one process",
                    "cpu": "the cpu mode times one forward+backward per case, fp32 on CPU ranks",
                    "overhead": "the overhead mode runs fp32 on CPU ranks"}[args.mode]
            p.error(f"{flag} applies to --mode {' and '.join(modes)} only ({what})")
    if args.calls < 0 or not args.target_s > 0:
        p.error(f"--calls must be >= 0 and --target-s > 0, got {args.calls} and {args.target_s}")
    if args.mode != "w1":
        bad = [(N, w) for N in args.sizes for w in args.worlds if N % w]
        if bad:
            p.error(f"--sizes: N is the global batch, N/W rows per rank: N={bad[0][0]} is not a "
                    f"multiple of W={bad[0][1]}")
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: expected cpu, cuda or cuda:N")
    if args.mode == "w1" and dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--mode w1 --device cuda: no CUDA device here (--device cpu measures on the CPU)")
    if args.backend != "auto":
        b = all_backends().get(args.backend)
        if b is None:
            p.error(f"--backend {args.backend!r}: unknown; expected auto or one of "
                    f"{', '.join(sorted(all_backends()))}")
        where = dev.type if args.mode == "w1" else "cpu"      # the other modes run on CPU ranks
        if where not in b.devices:
            p.error(f"--backend {args.backend!r} runs on {' or '.join(b.devices)}; this mode's "
                    f"ranks run on {where}")
        ok, why = b.availability()
        if not ok:
            p.error(f"--backend {args.backend!r} is not available here: {why}")
    big = _too_big(args, dev)
    if big:
        p.error(big)
    check_out_dir(p, args.out)
    try:
        check_replace([os.path.join(args.out, _stem(args) + e) for e in (".csv", ".md")],
                      args.out_given, args.overwrite)
    except BenchError as e:
        p.error(str(e))


def _case_bytes(args, N: int, world: int, dtype: torch.dtype) -> int:
    """A lower estimate of the memory one case takes on this machine, all ranks together: each
    rank's features, their gradients and clones (8·n·D), the gathered or travelling blocks
    (2·N·D), the fused loss's buffers; open_clip's sharded loss adds its n×N logits and their
    softmax (3·n·N, fp32)."""
    spec = M.get_loss(args.loss)
    n, e = N // world, max(4, torch.empty((), dtype=dtype).element_size())
    method = "cpu" if args.backend == "auto" else args.backend
    try:
        fused = M.extra_bytes_estimate(spec, method, n, args.dim, dtype, device="cpu")
    except (KeyError, ValueError):
        fused = 0
    per_rank = (8 * n + 2 * N) * args.dim * e + fused
    if args.mode != "w1" and PEER in args.impls:
        per_rank += 3 * n * N * 4
    return world * per_rank


def _too_big(args, dev) -> str:
    """Why a case would not fit this machine's available memory (it was killed by the system,
    or failed after the smaller sizes had run), or ""; CUDA memory is not estimated here."""
    if args.mode == "w1" and dev.type != "cpu":
        return ""
    avail = meminfo_bytes("MemAvailable")
    worlds = [1] if args.mode == "w1" else args.worlds
    dtypes = [DTYPES[d] for d in args.dtypes] if args.mode == "w1" else [torch.float32]
    for N in args.sizes:
        for w in worlds:
            need = max(_case_bytes(args, N, w, dt) for dt in dtypes)
            if need > 0.8 * avail:
                return (f"--sizes {N}: needs at least {gb(need)} of memory"
                        + (f" at W = {w}" if args.mode != "w1" else "")
                        + f", this machine has {gb(avail)} available; choose smaller sizes")
    return ""


def main(argv: list[str] | None = None, prog: str = "fastclip bench distributed") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser(prog)
    args = p.parse_args(argv)
    if args.worlds is None:
        args.worlds = [2] if args.mode == "overhead" else [2, 4]
    if args.sizes is None:
        args.sizes = {"cpu": [2048, 8192, 16384], "overhead": [32, 256, 1024],
                      "w1": [16384, 65536]}[args.mode]
    # Each list once, in the order given (a repeated size made rows the markdown hid).
    args.worlds, args.sizes, args.impls, args.dtypes = (list(dict.fromkeys(v)) for v in
                                                        (args.worlds, args.sizes, args.impls, args.dtypes))
    args.out_given = args.out is not None
    args.given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}     # (no abbreviations)
    if args.out is None:
        args.out = default_out_dir()
    _check_args(p, args)
    info = env_info("cpu")
    t0 = time.perf_counter()
    rows, impls = [], {}
    try:
        if args.mode == "w1":
            rows, desc = run_w1(args, rows, impls)
        else:
            rows, desc = {"cpu": run_cpu, "overhead": run_overhead}[args.mode](args, rows, impls)
    except (RankFailed, RuntimeError, MemoryError) as e:
        # A rank (or the w1 process) failed, e.g. out of memory at a large N: the cases measured
        # before are written, and the error is one line.
        desc = _by_world(impls) if args.mode != "w1" else impls
        prefix = write(rows, desc, args, argv, time.perf_counter() - t0, info) if rows else ""
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not isinstance(e, RankFailed):
            first = f"{type(e).__name__}: {first}"
        print(f"{prog}: error: {first}"
              + (f" (the cases measured before are in {prefix}.csv and .md)" if prefix else ""), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        # The world sizes that finished are written (the ranks leave quietly on Ctrl-C).
        from ..cli import stopped  # noqa: PLC0415
        desc = _by_world(impls) if args.mode != "w1" else impls
        prefix = write(rows, desc, args, argv, time.perf_counter() - t0, info) if rows else ""
        return stopped(e, f"the finished world sizes are in {prefix}.csv and .md" if prefix
                       else "nothing finished, nothing written")
    write(rows, desc, args, argv, time.perf_counter() - t0, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
