"""The loss microbenchmark: every fastclip backend, its peers, the floor; or per-call overhead.

One run times, on one device and for one loss (``--loss``, default ``clip``; the
methods per loss are in :mod:`fastclip.bench.methods`), for each (dtype, D, N): the
floor, the naive peer (open_clip's own class, else the formula), every fastclip
backend of the device from the registry, and the loss's extra peers. Measured per
row: forward and forward+backward median times (the forward timed inside the same
training step: autograd on, as training pays it) and peak extra memory (beyond the
inputs and their gradients); on the CPU each measurement runs in a fresh subprocess
so that its resident-set peak is its own (:mod:`fastclip.bench.measure`).

Methods whose estimated memory exceeds ``--max-mem-gb`` (default: 80% of the GPU's
memory, or of the RAM available at start) are recorded as skipped ("would need X GB"),
never run; so are those whose time, extrapolated from the previous N as N², exceeds
``--max-time-s``, and every measurement left when ``--time-budget-s`` is spent.

``--overhead``: per-call wall time at small N (default 32, 256, 1024; D 512, fp32),
where dispatch, validation and allocation dominate: ``auto`` (the fused loss with
``backend="auto"``), each backend of the device, the naive peer and the floor, one
forward and one forward+backward per call, median of many calls, in microseconds.

Results go to ``<out>/<device>-<device slug>[-<loss>][-<tag>]`` + ``.csv`` (a row per
measurement), ``.md`` (tables) and ``-time.png`` / ``-memory.png``; the overhead mode
writes ``…-overhead.csv`` and ``…-overhead.md``. ``<out>`` defaults to
``./benchmarks/results`` when the current directory has one (existing files there are
replaced only with ``--overwrite``, merged with ``--append``), else the current directory.

Examples::

    python -m fastclip.bench.contrastive_loss --device cpu --quick --out /tmp/bench
    python -m fastclip.bench.contrastive_loss --device cpu            # N 1024..65536, D 512, fp32
    python -m fastclip.bench.contrastive_loss --device cpu --overhead
    python -m fastclip.bench.contrastive_loss --device cuda --dtypes bf16 --dims 512,1024
    python -m fastclip.bench.contrastive_loss --device cuda --huge --methods floor,triton,cuda
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from .._machine import MAX_THREADS
from . import methods as M
from .env import cpu_count, env_info, gb, meminfo_bytes, slug, threads_warning
from .measure import clear_grads, esize, per_call_times, run_worker, time_step, worker_reply
from .report import (
    CSV_FIELDS,
    OVERHEAD_FIELDS,
    BenchError,
    ListArg,
    add_out_args,
    check_out_dir,
    check_replace,
    default_out_dir,
    derive,
    derive_overhead,
    num,
    output_prefix,
    overhead_table,
    parse_size,
    processor_notes,
    read_csv,
    read_table,
    summary_table,
    table_names,
    table_problem,
    threads_text,
    write_csv,
    write_markdown,
    write_overhead_markdown,
)

__all__ = ["main", "Config", "parse_args", "run_benchmark", "run_overhead", "measure", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}

CPU_SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
CPU_QUICK = [256, 512]
GPU_SIZES = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
GPU_QUICK = [4096, 16384]
GPU_HUGE = [1 << 20, 1 << 22]
OVERHEAD_SIZES = [32, 256, 1024]
OVERHEAD_QUICK = [32, 256]

# Timing targets: reps = target / (time of one call), clamped; --reps overrides.
_TARGET_S = {"cpu": 4.0, "cuda": 1.0}
_REPS_RANGE = {"cpu": (1, 10), "cuda": (3, 100)}
_DEFAULT_MAX_TIME_S = {"cpu": 360.0, "cuda": 60.0}
# Overhead mode: seconds of timed calls per N (3 s: >= 30 calls at N = 1024 on 2 cores).
_OVERHEAD_S = 3.0
_WORKER_FLAG = "--_worker"


@dataclass
class Config:
    """Everything a run needs; built by :func:`parse_args`."""
    loss: str = "clip"
    device: str = "cpu"
    sizes: list[int] = field(default_factory=list)
    dims: list[int] = field(default_factory=list)
    dtypes: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)     # empty: all
    reps: int = 0                                        # 0: adaptive
    target_s: float = 0.0                                # 0: the device's default
    max_mem_bytes: int = 0
    max_time_s: float = 0.0                              # 0: no limit
    time_budget_s: float = 0.0                           # 0: no limit
    out: str = "."
    tag: str = ""
    isolate: bool = True
    threads: int = 0
    naive: str = "auto"
    plot: bool = True
    seed: int = 0
    allow_tf32: bool = False
    huge: bool = False
    append: bool = False
    overhead: bool = False
    out_given: bool = False                              # --out given: its files may be replaced
    overwrite: bool = False

    @property
    def spec(self) -> M.BenchLoss:
        return M.get_loss(self.loss)


def _positive_int(s: str) -> int:
    """--threads: a count, as ``fastclip train --threads`` takes it (0 and negatives are
    refused there too, so the two commands read the same value the same way), at most
    ``MAX_THREADS`` (100000 crashed in OpenMP's thread creation)."""
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_THREADS} threads, got {s!r}")
    return v


def build_parser(prog: str = "fastclip bench") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Time a fused loss (every fastclip backend) against open_clip's loss, the "
                    "loss's other peers and the matmul floor; write CSV, markdown and PNG plots. "
                    "--overhead: per-call times at small N instead.",
        epilog="Other benchmarks: fastclip bench distributed --help; fastclip bench tokenizer "
               "--help.")
    p.add_argument("--loss", choices=list(M.LOSSES), default="clip",
                   help="which loss (default clip)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", action=ListArg, convert=parse_size, default=None,
                   help="batch sizes N, comma- or space-separated (64k = 65536). Default: CPU "
                        f"{','.join(map(str, CPU_SIZES))}; CUDA {','.join(map(str, GPU_SIZES))}; "
                        f"--overhead {','.join(map(str, OVERHEAD_SIZES))}")
    p.add_argument("--dims", action=ListArg, convert=parse_size, default=None,
                   help="feature sizes D (default: CPU 512; CUDA 512,768,1024; --overhead 512)")
    p.add_argument("--dtypes", action=ListArg, default=None,
                   help=f"any of {','.join(DTYPES)} (default: CPU fp32; CUDA bf16,fp16,fp32; "
                        "--overhead fp32)")
    p.add_argument("--methods", action=ListArg, default=None,
                   help="subset of the methods: floor, naive, the fastclip backends, the "
                        "loss's peers (default: all that exist here)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes for a check (CPU 256,512; CUDA 4096,16384 at D=512 bf16; "
                        "--overhead 32,256)")
    p.add_argument("--overhead", action="store_true",
                   help="per-call overhead at small N: auto, each backend, naive and floor, "
                        "one forward and one forward+backward per call, median µs per call")
    p.add_argument("--huge", action="store_true",
                   help="CUDA: add N = 1M and 4M for the floor and fastclip's backends only")
    p.add_argument("--reps", type=int, default=0,
                   help="timed repetitions per measurement (default 0: adaptive, "
                        "CPU 1-10 over ~4 s, CUDA 3-100 over ~1 s)")
    p.add_argument("--target-s", type=float, default=None,
                   help="adaptive reps aim at this many seconds of timed steps per "
                        f"measurement (default CPU 4, CUDA 1; --quick: CPU 0.5); --overhead: "
                        f"seconds of timed calls per N (default {_OVERHEAD_S:g}; --quick 0.5)")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip a method whose estimated memory (inputs, gradients and its own "
                        "buffers) exceeds this (default: 80%% of GPU memory / available RAM; "
                        "0: no limit)")
    p.add_argument("--max-time-s", type=float, default=None,
                   help="skip a method whose fwd+bwd, extrapolated from the previous N as N^2, "
                        "would exceed this many seconds (default CPU 360, CUDA 60; 0: no limit)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop starting measurements after this many seconds; the rest are "
                        "recorded as skipped (default 0: no budget)")
    add_out_args(p)
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in the output CSV (those this run does not "
                        "measure again, those it skips, and those of other --threads, shown "
                        "per thread count) and add this run's")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="CPU: measure in this process instead of a fresh subprocess per "
                        "measurement (faster; peak memory then relies on /proc/self/clear_refs)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: every core this process may use)")
    p.add_argument("--naive", choices=["auto", "open_clip", "formula"], default="auto",
                   help="naive peer: open_clip's loss.py if importable (auto), or the formula")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG plots")
    p.add_argument("--allow-tf32", action="store_true",
                   help="CUDA: let every fp32 matrix product use TF32, torch's (floor, naive, peers) and "
                        "fastclip's fp32 kernels alike, which follow torch's setting; their fp32 rows then "
                        "no longer meet 1e-5 (default off: true fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summarize", metavar="CSV", default=None,
                   help="print the summary table of an existing result CSV and exit")
    p.add_argument(_WORKER_FLAG, dest="worker", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None,
               prog: str = "fastclip bench") -> tuple[Config, argparse.Namespace]:
    """Command line -> :class:`Config` (defaults filled in per device and mode)."""
    p = build_parser(prog)
    a = p.parse_args(argv)
    dev = a.device
    spec = M.get_loss(a.loss)
    if a.overhead and a.append:
        p.error("--append merges into the sweep's table; --overhead writes its own table whole")
    if a.append and a.overwrite:
        p.error("--append merges into the earlier files, --overwrite replaces them: pass one")
    if a.allow_tf32 and dev != "cuda":
        p.error("--allow-tf32 is for --device cuda (TF32 matrix products of NVIDIA GPUs)")
    if a.overhead and a.huge:
        p.error("--overhead measures small N; --huge is for the full sweep")
    if a.sizes is not None:
        sizes = list(a.sizes)
    elif a.overhead:
        sizes = OVERHEAD_QUICK if a.quick else OVERHEAD_SIZES
    elif dev == "cpu":
        sizes = CPU_QUICK if a.quick else CPU_SIZES
    else:
        sizes = GPU_QUICK if a.quick else GPU_SIZES
    if a.huge:
        if dev != "cuda":
            p.error("--huge is for --device cuda (N = 1M and 4M)")
        sizes += [n for n in GPU_HUGE if n not in sizes]
    dims = a.dims or ([512] if dev == "cpu" or a.quick or a.overhead else [512, 768, 1024])
    dtypes = a.dtypes or (["fp32"] if dev == "cpu" or a.overhead else
                          (["bf16"] if a.quick else ["bf16", "fp16", "fp32"]))
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; expected some of {','.join(DTYPES)}")
    methods = a.methods or []
    known = M.known_methods(spec) + ([M.AUTO] if a.overhead else [])
    for m in methods:
        if m not in known:
            p.error(f"--methods: unknown method {m!r}; expected some of {','.join(known)}")
    if a.reps < 0:
        p.error(f"--reps must be >= 0 (0: adaptive), got {a.reps}")
    for flag, v in (("--max-mem-gb", a.max_mem_gb), ("--max-time-s", a.max_time_s),
                    ("--time-budget-s", a.time_budget_s)):
        if v is not None and not (v >= 0 and math.isfinite(v)):
            p.error(f"{flag} must be a finite number >= 0 (0: no limit), got {v}")
    if a.target_s is not None and not (a.target_s > 0 and math.isfinite(a.target_s)):
        p.error(f"--target-s must be a finite number of seconds > 0, got {a.target_s}")
    threads = a.threads if a.threads is not None else cpu_count()
    if a.max_mem_gb is not None:
        max_mem = int(a.max_mem_gb * 1e9)
    elif dev == "cuda":
        max_mem = 0  # filled in once CUDA is known to work (see _check_device)
    else:
        max_mem = int(0.8 * meminfo_bytes("MemAvailable"))
    max_time = _DEFAULT_MAX_TIME_S[dev] if a.max_time_s is None else a.max_time_s
    if a.target_s is not None:
        target = a.target_s
    elif a.overhead:
        target = 0.5 if a.quick else _OVERHEAD_S
    else:
        target = 0.5 if a.quick and dev == "cpu" else 0.0
    here = M.overhead_methods(spec, dev) if a.overhead else M.methods_for(spec, dev)
    if methods and not a.summarize and not any(m in methods for m, _ in here):
        p.error(f"--methods {','.join(methods)}: none of them runs on --device {dev} (there: "
                f"{','.join(m for m, _ in here)})")
    if a.tag and slug(a.tag) in {slug(n) for n in M.LOSSES}:
        # The loss names the file stem too: --tag siglip wrote a clip run into the SigLIP files.
        p.error(f"--tag {a.tag!r}: the name of a loss, which the file names carry already (--loss); "
                f"choose another tag")
    out = a.out if a.out is not None else default_out_dir()
    if not a.summarize and a.worker is None:
        check_out_dir(p, out)
    cfg = Config(loss=a.loss, device=dev, sizes=sorted(set(sizes)), dims=dims, dtypes=dtypes,
                 methods=methods, reps=a.reps, target_s=target, max_mem_bytes=max_mem,
                 max_time_s=max_time, time_budget_s=a.time_budget_s,
                 out=out, tag=a.tag,
                 isolate=a.isolate and dev == "cpu" and not a.overhead, threads=threads,
                 naive=a.naive, plot=a.plot, seed=a.seed, allow_tf32=a.allow_tf32,
                 huge=a.huge, append=a.append, overhead=a.overhead,
                 out_given=a.out is not None, overwrite=a.overwrite)
    return cfg, a


# ------------------------------------------------------------------ measurement
def _opts(cfg: Config) -> dict:
    return {"device": cfg.device, "naive": cfg.naive, "max_mem_bytes": cfg.max_mem_bytes}


def skip_reason(method: str, n: int, d: int, dtype: torch.dtype, cfg: Config) -> str:
    """Why ``method`` must not run at this size ("" when it may)."""
    if cfg.huge and n in GPU_HUGE and (method == M.NAIVE
                                       or any(p.name == method for p in cfg.spec.peers)):
        return "--huge sizes run only the floor and fastclip's backends"
    return M.skip_reason(cfg.spec, method, n, d, dtype, **_opts(cfg))


def measure(method: str, n: int, d: int, dtype_name: str, cfg: Config, inputs=None) -> dict:
    """Time and peak memory of one (method, N, D, dtype) in this process.

    Returns {fwd_ms, fwd_bwd_ms, peak_extra_mb, reps, impl, status}. Warm-up at full
    size on CUDA (Triton specialises and autotunes per shape), on a problem of at most
    256 rows on the CPU (a large N costs seconds to minutes per call)."""
    dtype = DTYPES[dtype_name]
    cuda = cfg.device == "cuda"
    spec = cfg.spec
    if inputs is None:
        inputs = M.make_inputs(spec, n, d, dtype, cfg.device, cfg.seed)
    warm = inputs if cuda else M.make_inputs(spec, min(n, 256), d, dtype, cfg.device,
                                             cfg.seed + 1)
    return time_step(lambda inp: M.build_step(spec, method, inp, **_opts(cfg)), inputs, warm,
                     cuda=cuda, reps=cfg.reps, target_s=cfg.target_s or _TARGET_S[cfg.device],
                     reps_range=_REPS_RANGE[cfg.device], grad_bytes=2 * n * d * esize(dtype))


def _measure_isolated(method: str, n: int, d: int, dtype_name: str, cfg: Config) -> dict:
    """:func:`measure` in a fresh Python process (CPU): a clean resident-set peak."""
    spec = {"method": method, "n": n, "d": d, "dtype": dtype_name, "cfg": asdict(cfg)}
    timeout = None if not cfg.max_time_s else 4 * cfg.max_time_s + 300
    return run_worker("fastclip.bench.contrastive_loss", _WORKER_FLAG, spec,
                      threads=cfg.threads, timeout=timeout)


def _worker(spec_json: str) -> int:
    import json  # noqa: PLC0415
    spec = json.loads(spec_json)
    cfg = Config(**spec["cfg"])
    torch.set_num_threads(cfg.threads)
    try:
        res = measure(spec["method"], spec["n"], spec["d"], spec["dtype"], cfg)
    except Exception as e:  # noqa: BLE001 - reported as a failed row, the run goes on
        res = {"status": f"failed: {_why(e)}"}
    worker_reply(res)
    return 0


def _why(e: BaseException) -> str:
    if isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e):
        return "out of memory"
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def _measure_here(method, n, d, dt, cfg, inputs):
    """In-process measurement; the inputs are shared by the methods of one (N, D, dtype)."""
    try:
        if inputs is None:
            inputs = M.make_inputs(cfg.spec, n, d, DTYPES[dt], cfg.device, cfg.seed)
        res = measure(method, n, d, dt, cfg, inputs)
    except Exception as e:  # noqa: BLE001 - reported as a failed row, the run goes on
        res = {"status": f"failed: {_why(e)}"}
        if inputs is not None:
            clear_grads(*inputs)
        gc.collect()
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    res["_inputs"] = inputs
    return res


# -------------------------------------------------------------------------- run
def _check_device(cfg: Config) -> None:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise BenchError("--device cuda: torch sees no CUDA device here "
                             f"(torch {torch.__version__}); use --device cpu")
        if not cfg.max_mem_bytes:
            cfg.max_mem_bytes = int(0.8 * torch.cuda.get_device_properties(0).total_memory)
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    else:
        torch.set_num_threads(cfg.threads)


def _warn_load(cfg: Config, log) -> None:
    if cfg.device != "cpu":
        return
    if w := threads_warning(cfg.threads):
        log(f"warning: {w}")
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if load > 0.5 * (os.cpu_count() or 1):
        log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work "
            f"competes for the CPU and inflates these times")


def _now() -> str:
    return _dt.datetime.now().isoformat(timespec="seconds")


def run_benchmark(cfg: Config, log=print) -> tuple[list[dict], str]:
    """Run every (dtype, D, N, method) of ``cfg``; returns (rows, output path prefix)."""
    _check_device(cfg)
    info = env_info(cfg.device, cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    prefix = output_prefix(cfg.out, cfg.device, info["device_name"], cfg.loss, cfg.tag)
    check_replace([prefix + e for e in (".csv", ".md", "-time.png", "-memory.png")], cfg.out_given,
                  cfg.overwrite, cfg.append)
    started = _now()
    t_start = time.monotonic()
    methods = M.methods_for(cfg.spec, cfg.device, cfg.methods)
    rows: list[dict] = []
    kept: dict[tuple, dict] = {}        # --append: earlier measured rows this run may redo
    # --append: the earlier rows of the cases this run redoes stay in the files until each is
    # redone (an interrupted run deleted the ones it had not reached).
    earlier: dict[tuple, dict] = {}
    done: set = set()
    if cfg.append and os.path.exists(prefix + ".csv"):
        _check_appendable(prefix + ".csv", cfg.loss)
        # Keyed with the thread count: a row measured with other --threads is another case
        # (kept beside this run's, its ratios paired within its thread count by derive()).
        planned = {(cfg.loss, m, str(n), str(d), dt, info["threads"]) for m, _ in methods
                   for n in cfg.sizes for d in cfg.dims for dt in cfg.dtypes}
        for r in read_csv(prefix + ".csv"):
            key = (r["loss"], r["method"], r["N"], r["D"], r["dtype"], str(r.get("threads") or ""))
            if key not in planned:
                rows.append(r)
            else:
                earlier[key] = r
                if r.get("status") == "ok":
                    kept[key] = r
    last: dict[tuple[str, int, str], tuple[int, float]] = {}   # (method, D, dtype) -> (N, s)
    log(f"fastclip bench: {cfg.loss} loss on {cfg.device} ({info['device_name']}), commit "
        f"{info['commit']}, torch {info['torch']}; methods {', '.join(m for m, _ in methods)}; "
        f"sizes {cfg.sizes}, D {cfg.dims}, {cfg.dtypes}; memory budget "
        f"{gb(cfg.max_mem_bytes)} -> {prefix}.*")
    _warn_load(cfg, log)

    def flush():
        out = rows + [r for k, r in earlier.items() if k not in done]
        derive(out)
        write_csv(out, prefix + ".csv")
        write_markdown(out, info, cfg, prefix + ".md", started)
        return out

    interrupted = None
    try:
        for dt in cfg.dtypes:
            dtype = DTYPES[dt]
            for d in cfg.dims:
                for n in cfg.sizes:
                    inputs = None
                    for method, unavailable in methods:
                        row = dict(info, loss=cfg.loss, method=method, impl="", N=n, D=d, dtype=dt,
                                   fwd_ms="", fwd_bwd_ms="", peak_extra_mb="", reps="",
                                   timestamp=_now())
                        why = unavailable or skip_reason(method, n, d, dtype, cfg)
                        why = why or _time_skip(last.get((method, d, dt)), n, cfg, t_start)
                        if why:
                            row["status"] = f"skipped: {why}"
                        else:
                            if cfg.isolate:
                                res = _measure_isolated(method, n, d, dt, cfg)
                            else:
                                res = _measure_here(method, n, d, dt, cfg, inputs)
                                inputs = res.pop("_inputs", inputs)
                            row.update({k: v for k, v in res.items() if k in CSV_FIELDS})
                            if row["status"] == "ok":
                                last[(method, d, dt)] = (n, row["fwd_bwd_ms"] / 1e3)
                                for k in ("fwd_ms", "fwd_bwd_ms"):
                                    row[k] = f"{row[k]:.6g}"
                                pk = row["peak_extra_mb"]
                                row["peak_extra_mb"] = "" if pk is None else f"{pk:.2f}"
                        measured = row
                        case = (cfg.loss, method, str(n), str(d), dt, info["threads"])
                        old = kept.get(case)
                        if row["status"].startswith("skipped") and old is not None:
                            row = old       # a case this run skipped keeps its earlier measurement
                            # (one that failed is recorded failed: a regression must show)
                        rows.append(row)
                        done.add(case)
                        flush()             # derive() fills GFLOP/s and the ratios before the line
                        log(_progress_line(measured, cfg))
                        if row is not measured:
                            log(f"  (kept the earlier measurement, commit {old.get('commit', '?')})")
                    del inputs
                    if cfg.device == "cuda":
                        torch.cuda.empty_cache()
    except KeyboardInterrupt as e:  # the rows so far are in the CSV; the plots follow them
        interrupted = e            # (re-raised as it came: Ctrl-C or SIGTERM)
    rows = flush()
    paths = []
    if cfg.plot:
        from .plot import plot_rows  # noqa: PLC0415
        paths = plot_rows(rows, prefix, log=log)
        if paths:
            log("plots: " + ", ".join(paths))
    # Plots of an earlier run at this name that this run did not redraw (--no-plot, no
    # matplotlib) would show other numbers than the CSV beside them.
    stale = [f for f in (prefix + "-time.png", prefix + "-memory.png") if f not in paths and os.path.isfile(f)]
    for f in stale:
        os.unlink(f)
    if stale:
        log(f"removed the earlier plots, which this run did not redraw: {', '.join(stale)}")
    log(f"wrote {prefix}.csv and {prefix}.md in {time.monotonic() - t_start:.0f} s")
    if interrupted is not None:
        raise interrupted
    return rows, prefix


def _check_appendable(path: str, loss: str) -> None:
    """``--append``: the file at the output name must be a sweep's table that ``derive`` reads
    (an --overhead table, another CSV or a truncated one failed with a traceback after the
    whole sweep had run). Raises ``BenchError`` before anything is measured."""
    try:
        columns, rows = read_table(path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BenchError(f"--append: cannot read {path} as a results CSV "
                         f"({e.strerror if isinstance(e, OSError) and e.strerror else e})") from None
    why, overhead = table_problem(columns, rows)
    if overhead:
        why = f"it is an --overhead table (its columns {table_names(columns)}), not a sweep's"
    if why and rows:
        raise BenchError(f"--append: {path}: {why}; pass --overwrite to replace it or --out elsewhere")
    other = sorted({r["loss"] for r in rows} - {loss})
    if other:
        # (one table then mixed two losses, its FLOP rates counted with this loss's formula)
        raise BenchError(f"--append: {path} holds {', '.join(other)} loss rows, this run measures {loss}; "
                         f"pass --overwrite to replace it or --out elsewhere")
    try:
        derive([dict(r) for r in read_csv(path)])
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"--append: {path}: a value the table cannot read ({type(e).__name__}: {e}), "
                         f"a truncated or edited file?; pass --overwrite to replace it") from None


def _time_skip(prev, n: int, cfg: Config, t_start: float) -> str:
    """Why the time limits forbid a measurement: --max-time-s from the previous N as N²,
    or --time-budget-s spent / not enough of it left."""
    if prev and cfg.max_time_s:
        pred = prev[1] * (n / prev[0]) ** 2
        if pred > cfg.max_time_s:
            return (f"would take ~{pred:.3g} s per fwd+bwd (limit --max-time-s "
                    f"{cfg.max_time_s:g})")
    if cfg.time_budget_s:
        left = cfg.time_budget_s - (time.monotonic() - t_start)
        # CUDA: warm-up, the memory step and >= 3 timed steps; CPU: one step.
        calls = 2 + _REPS_RANGE["cuda"][0] if cfg.device == "cuda" else 1
        if left <= 0:
            return f"time budget spent (--time-budget-s {cfg.time_budget_s:g})"
        if prev and prev[1] * (n / prev[0]) ** 2 * calls > left:
            return f"would not finish in the {left:.0f} s left of --time-budget-s " \
                   f"{cfg.time_budget_s:g}"
    return ""


def _progress_line(r: dict, cfg: Config) -> str:
    head = f"  {r['dtype']:<4} D={r['D']:<5} N={r['N']:<8} {r['method']:<9}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    unit, div = ("TFLOP/s", 1e3) if cfg.device == "cuda" else ("GFLOP/s", 1.0)
    gf = float(r.get("fwd_bwd_gflops") or "nan")
    mb = num(r["peak_extra_mb"], ".1f") or "?"
    xf = r.get("x_floor_fwd_bwd") or "-"
    return (f"{head} fwd {float(r['fwd_ms']):9.4g} ms  fwd+bwd {float(r['fwd_bwd_ms']):9.4g} ms  "
            f"peak +{mb} MiB  {gf / div:.4g} {unit}  x floor {xf}  ({r['reps']} reps)")


# --------------------------------------------------------------------- overhead
def run_overhead(cfg: Config, log=print) -> tuple[list[dict], str]:
    """Per-call times of every overhead method at each (dtype, D, N) of ``cfg``, in this
    process; writes ``<prefix>-overhead.csv`` and ``.md``. Returns (rows, prefix)."""
    _check_device(cfg)
    info = env_info(cfg.device, cfg.threads)
    os.makedirs(cfg.out, exist_ok=True)
    prefix = output_prefix(cfg.out, cfg.device, info["device_name"], cfg.loss,
                           "-".join(t for t in (cfg.tag, "overhead") if t))
    check_replace([prefix + ".csv", prefix + ".md"], cfg.out_given, cfg.overwrite)
    spec = cfg.spec
    methods = M.overhead_methods(spec, cfg.device)
    if cfg.methods:
        methods = [t for t in methods if t[0] in cfg.methods]
    cuda = cfg.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    log(f"fastclip bench --overhead: {cfg.loss} loss on {cfg.device} ({info['device_name']}), "
        f"commit {info['commit']}; methods {', '.join(m for m, _ in methods)}; sizes "
        f"{cfg.sizes}, D {cfg.dims}, {cfg.dtypes}; ~{cfg.target_s:g} s of calls per size "
        f"-> {prefix}.*")
    _warn_load(cfg, log)
    rows: list[dict] = []
    t0 = time.monotonic()
    for dt in cfg.dtypes:
        for d in cfg.dims:
            for n in cfg.sizes:
                inputs = M.make_inputs(spec, n, d, DTYPES[dt], cfg.device, cfg.seed)
                base = dict(info, loss=cfg.loss, N=n, D=d, dtype=dt, fwd_us="",
                            fwd_bwd_us="", calls="", impl="", timestamp=_now())
                steps, here = {}, []
                for method, unavailable in methods:
                    row = dict(base, method=method, status="")
                    why = unavailable or skip_reason(method, n, d, DTYPES[dt], cfg)
                    if why:
                        row["status"] = f"skipped: {why}"
                    else:
                        try:
                            steps[method] = M.build_step(spec, method, inputs, **_opts(cfg))
                            row["impl"] = steps[method].impl
                        except Exception as e:  # noqa: BLE001 - a failed row, the run goes on
                            row["status"] = f"failed: {_why(e)}"
                    here.append(row)
                times = per_call_times(steps, inputs, sync=sync, budget_s=cfg.target_s,
                                       rounds=cfg.reps) if steps else {}
                for row in here:
                    if row["method"] in times:
                        fwd, tot = times[row["method"]]
                        row.update(fwd_us=f"{statistics.median(fwd) * 1e6:.1f}",
                                   fwd_bwd_us=f"{statistics.median(tot) * 1e6:.1f}",
                                   fwd_us_min=f"{min(fwd) * 1e6:.1f}",
                                   fwd_bwd_us_min=f"{min(tot) * 1e6:.1f}",
                                   calls=len(tot), status="ok")
                rows += here
                derive_overhead(rows)
                _write_overhead(rows, info, cfg, prefix)
                log(overhead_table(here, md=False))
                del inputs, steps
    log(f"wrote {prefix}.csv and {prefix}.md in {time.monotonic() - t0:.0f} s")
    return rows, prefix


def _write_overhead(rows, info, cfg: Config, prefix: str) -> None:
    write_csv(rows, prefix + ".csv", OVERHEAD_FIELDS)
    dims = sorted({int(r["D"]) for r in rows})
    dts = sorted({r["dtype"] for r in rows})
    notes = [
        f"fastclip {info['fastclip']} (commit {info['commit']}), torch {info['torch']}; "
        + (f"{threads_text(cfg.threads).replace('thread', 'CPU thread')}, load average at start {info['load']}."
           if cfg.device == "cpu" else "CUDA, synchronised around every call."),
        *(n[2:] for n in processor_notes(rows, info, cfg.device, cfg.threads)),
        f"D = {', '.join(map(str, dims))}, {', '.join(dts)}; inputs require grad (a training "
        "step's forward).",
        "per call: one forward (the loss is dropped), or one forward+backward; each call "
        "timed alone with time.perf_counter, the methods interleaved call by call so that a "
        "change of load hits them alike; median (and minimum) over `calls` calls, after 10 "
        "warm-up steps. On a machine shared with other work the medians carry its "
        "interference; the minima show the cost without it.",
        "auto: the fused loss with backend=\"auto\" (what `ClipLoss()` runs); a backend "
        "name: that backend; naive: " + (next((r["impl"] for r in rows if r["method"] == M.NAIVE
                                             and r["impl"]), "the naive peer")) + "; floor: "
        f"the loss's {cfg.spec.floor_products} matmuls alone.",
    ]
    write_overhead_markdown(rows, f"fastclip {cfg.loss} loss: per-call overhead, {cfg.device} "
                            f"({info['device_name']})", notes, prefix + ".md")


def main(argv: list[str] | None = None, prog: str = "fastclip bench") -> int:
    """Entry point of ``fastclip bench`` and ``benchmarks/bench_contrastive_loss.py``
    (``prog``: the command named in usage and error lines)."""
    if argv is None:
        argv = sys.argv[1:]
    cfg, a = parse_args(argv, prog)
    from ..cli import PipeSafeLog  # noqa: PLC0415
    log = PipeSafeLog()            # `fastclip bench | head`: the sweep goes on, its files too
    try:
        code = _main(cfg, a, log, prog)
    except BenchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        from ..cli import stopped  # noqa: PLC0415
        return stopped(e, "the rows measured so far are in the CSV and markdown")
    return 141 if code == 0 and log.broken else code


def _main(cfg: Config, a: argparse.Namespace, log=print, prog: str = "fastclip bench") -> int:
    if a.worker is not None:
        return _worker(a.worker)
    if a.summarize:
        try:
            columns, rows = read_table(a.summarize)
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            print(f"{prog}: error: --summarize {a.summarize!r}: cannot read it as a "
                  f"results CSV ({e.strerror if isinstance(e, OSError) and e.strerror else e})",
                  file=sys.stderr)
            return 2
        why, overhead = table_problem(columns, rows)
        if why:
            print(f"{prog}: error: --summarize {a.summarize!r}: {why}", file=sys.stderr)
            return 2
        try:
            if overhead:                                              # an --overhead table
                derive_overhead(rows)
                log(overhead_table(rows, md=False))
            else:                                                     # a sweep's table
                derive(rows)
                log(summary_table(rows))
        except (ValueError, KeyError, TypeError) as e:
            print(f"{prog}: error: --summarize {a.summarize!r}: a value the table cannot "
                  f"read ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        return 0
    if cfg.overhead:
        rows, _ = run_overhead(cfg, log)
        log("")
        log(overhead_table(rows, md=False))
        return 0
    rows, _ = run_benchmark(cfg, log)
    log("")
    log(summary_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
