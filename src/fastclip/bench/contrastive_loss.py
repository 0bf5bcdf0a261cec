"""Microbenchmark of the fused contrastive loss: every backend, its peers, the floor.

One run times, on one device, for each (dtype, D, N):

* ``floor``: four ``torch.matmul`` of the loss's shapes (X·Yᵀ [N,N] twice, G·Y and
  Gᵀ·X [N,D]), 8N²D FLOP; its forward is the first product alone (2N²D). No loss
  can beat it by much (design.md §2). Where one N×N buffer would not fit comfortably,
  the same products run on row chunks of the same total FLOP (the ``impl`` column
  says so).
* ``naive``: open_clip's ``ClipLoss`` (materialised logits, two cross-entropies),
  loaded from open_clip's own ``loss.py`` by file path when ``open_clip`` is importable
  (its package ``__init__`` imports torchvision, so it is not run); otherwise the
  same formula from :func:`fastclip.ops.reference.clip_loss_naive`. The ``impl``
  column records which.
* every fastclip backend of the device through ``fastclip.clip_loss(x, y, s,
  backend=name)`` + backward: ``reference`` (the chunked PyTorch form), ``cpu``,
  ``triton``, ``cuda``; a backend that exists for the device but cannot run is
  recorded as skipped with its reason.
* ``inf-cl`` on CUDA when the package is importable: the symmetric loss
  ``(cal_inf_loss(s·x, y) + cal_inf_loss(s·y, x)) / 2``. inf-cl's own ``scale=``
  argument passes through a ``GradientGather`` whose backward calls
  ``dist.all_reduce``, which fails without a process group, so the scale is applied
  to the row features here: that is exactly what ``cal_inf_loss`` does with it.
  inf-cl takes float32 features with D a multiple of its head_dim (256); other
  cases are skipped with that reason.

Measured per row: forward and forward+backward median times (the forward is timed
inside the same training step: autograd on, as training pays it); CPU by
``time.perf_counter``, CUDA by events after a full-size warm-up; peak extra memory
(beyond the inputs and their gradients): on CUDA ``torch.cuda.max_memory_allocated``,
on the CPU the peak resident set (VmHWM, reset through /proc/self/clear_refs) of a
fresh subprocess per (method, N, D, dtype), minus its resident set once the inputs
exist. Throughput is effective: 2N²D FLOP for the forward and 8N²D for
forward+backward whatever the method does (the naive formula does 6N²D but moves
the logits through memory many times). Ratios: time over the floor's and over the
naive formula's for the same (N, D, dtype).

Methods whose estimated memory exceeds ``--max-mem-gb`` (default: 80% of the GPU's
memory, or of the RAM available at start) are recorded as skipped ("would need X GB"),
never run; so are those whose time, extrapolated from the previous N as N², exceeds
``--max-time-s``, and every measurement left when ``--time-budget-s`` is spent.

Results go to ``<out>/<device>-<model slug>[-<tag>].csv`` (a row per measurement),
``.md`` (tables) and ``-time.png`` / ``-memory.png`` (log-log, one line per method),
rewritten after every measurement so that an interrupted run keeps what it measured.

Examples::

    python -m fastclip.bench.contrastive_loss --device cpu --quick
    python -m fastclip.bench.contrastive_loss --device cpu            # N 1024..65536, D 512, fp32
    python -m fastclip.bench.contrastive_loss --device cuda --dtypes bf16 --dims 512,1024
    python -m fastclip.bench.contrastive_loss --device cuda --huge --methods floor,triton,cuda
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["main", "Config", "parse_args", "run_benchmark", "measure", "read_csv",
           "summary_table", "METHODS", "DTYPES"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
# Column order of every table and plot.
METHODS = ("floor", "naive", "reference", "cpu", "triton", "cuda", "inf-cl")
FUSED = ("cpu", "triton", "cuda")

CPU_SIZES = [1024, 2048, 4096, 8192, 16384, 32768, 65536]
CPU_QUICK = [256, 512]
GPU_SIZES = [4096, 8192, 16384, 32768, 65536, 131072, 262144]
GPU_QUICK = [4096, 16384]
GPU_HUGE = [1 << 20, 1 << 22]
# At the --huge sizes only the O(N·D) kernels and the floor (on row chunks) run.
HUGE_METHODS = ("floor", "triton", "cuda")

# Largest single N×N floor buffer: above it the floor runs on row chunks of this size.
# Chunks of >= 2 GiB keep BLAS / cuBLAS at full speed (a chunk is >= 4096 rows at
# N = 131072 fp32), so chunking changes the memory, not the time.
_FLOOR_CAP = {"cpu": 2 << 30, "cuda": 8 << 30}
# Timing targets: reps = target / (time of one call), clamped; --reps overrides.
_TARGET_S = {"cpu": 4.0, "cuda": 1.0}
_REPS_RANGE = {"cpu": (1, 10), "cuda": (3, 100)}
_DEFAULT_MAX_TIME_S = {"cpu": 360.0, "cuda": 60.0}
_WORKER_FLAG = "--_worker"
_RESULT_TAG = "@@fastclip-bench-result "

CSV_FIELDS = ["device", "device_name", "torch", "triton", "fastclip", "commit", "threads",
              "method", "impl", "N", "D", "dtype", "fwd_ms", "fwd_bwd_ms", "peak_extra_mb",
              "fwd_gflops", "fwd_bwd_gflops", "x_floor_fwd", "x_floor_fwd_bwd",
              "x_naive_fwd", "x_naive_fwd_bwd", "reps", "status", "timestamp"]


# ------------------------------------------------------------------------ config
@dataclass
class Config:
    """Everything a run needs; built by :func:`parse_args`."""
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
    out: str = "benchmarks/results"
    tag: str = ""
    isolate: bool = True
    threads: int = 0
    naive: str = "auto"
    plot: bool = True
    seed: int = 0
    allow_tf32: bool = False
    huge: bool = False
    append: bool = False


def _parse_size(tok: str) -> int:
    tok = tok.strip().lower()
    mult = 1
    if tok.endswith("k"):
        tok, mult = tok[:-1], 1024
    elif tok.endswith("m"):
        tok, mult = tok[:-1], 1 << 20
    try:
        v = int(tok) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {tok!r} (expected e.g. 4096, 64k, 1m)")
    if v < 1:
        raise argparse.ArgumentTypeError(f"sizes must be >= 1, got {v}")
    return v


def _int_list(s: str) -> list[int]:
    return [_parse_size(t) for t in s.split(",") if t.strip()]


def _str_list(s: str) -> list[str]:
    return [t.strip() for t in s.split(",") if t.strip()]


def _meminfo_bytes(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastclip bench",
        description="Time the fused contrastive loss (every backend) against the naive formula, "
                    "the chunked PyTorch form, inf-cl (GPU) and the 4-GEMM floor; write CSV, "
                    "markdown and PNG plots.")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--sizes", type=_int_list, default=None,
                   help="batch sizes N, comma-separated (64k = 65536). Default: CPU "
                        f"{','.join(map(str, CPU_SIZES))}; CUDA {','.join(map(str, GPU_SIZES))}")
    p.add_argument("--dims", type=_int_list, default=None,
                   help="feature sizes D (default: CPU 512; CUDA 512,768,1024)")
    p.add_argument("--dtypes", type=_str_list, default=None,
                   help=f"any of {','.join(DTYPES)} (default: CPU fp32; CUDA bf16,fp16,fp32)")
    p.add_argument("--methods", type=_str_list, default=None,
                   help=f"subset of {','.join(METHODS)} (default: all that exist here)")
    p.add_argument("--quick", action="store_true",
                   help="small sizes (CPU 256,512; CUDA 4096,16384 at D=512 bf16) for a check")
    p.add_argument("--huge", action="store_true",
                   help="CUDA: add N = 1M and 4M for the fused backends and the floor only")
    p.add_argument("--reps", type=int, default=0,
                   help="timed repetitions per measurement (default: adaptive, "
                        "CPU 1-10 over ~4 s, CUDA 3-100 over ~1 s)")
    p.add_argument("--target-s", type=float, default=None,
                   help="adaptive reps aim at this many seconds of timed steps per "
                        "measurement (default CPU 4, CUDA 1; --quick: CPU 0.5)")
    p.add_argument("--max-mem-gb", type=float, default=None,
                   help="skip a method whose estimated memory (inputs, gradients and its own "
                        "buffers) exceeds this (default: 80%% of GPU memory / available RAM)")
    p.add_argument("--max-time-s", type=float, default=None,
                   help="skip a method whose fwd+bwd, extrapolated from the previous N as N^2, "
                        "would exceed this many seconds (default CPU 360, CUDA 60; 0: no limit)")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop starting measurements after this many seconds; the rest are "
                        "recorded as skipped (default 0: no budget)")
    p.add_argument("--out", default="benchmarks/results", help="output folder")
    p.add_argument("--tag", default="", help="suffix of the output file names")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in the output CSV (those this run does not "
                        "measure again) and add this run's")
    p.add_argument("--no-isolate", dest="isolate", action="store_false",
                   help="CPU: measure in this process instead of a fresh subprocess per "
                        "measurement (faster; peak memory then relies on /proc/self/clear_refs)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads (default: every core this process may use)")
    p.add_argument("--naive", choices=["auto", "open_clip", "formula"], default="auto",
                   help="naive peer: open_clip's loss.py if importable (auto), or the formula")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG plots")
    p.add_argument("--allow-tf32", action="store_true",
                   help="CUDA: let fp32 matmuls of the floor/naive/reference use TF32 "
                        "(default off: fastclip's fp32 kernels meet 1e-5, which TF32 cannot)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summarize", metavar="CSV", default=None,
                   help="print the summary table of an existing result CSV and exit")
    p.add_argument(_WORKER_FLAG, dest="worker", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Command line -> :class:`Config` (defaults filled in per device)."""
    p = build_parser()
    a = p.parse_args(argv)
    dev = a.device
    if a.sizes is None:
        if dev == "cpu":
            sizes = CPU_QUICK if a.quick else CPU_SIZES
        else:
            sizes = GPU_QUICK if a.quick else GPU_SIZES
    else:
        sizes = a.sizes
    sizes = list(sizes)
    if a.huge:
        if dev != "cuda":
            p.error("--huge is for --device cuda (N = 1M and 4M)")
        sizes += [n for n in GPU_HUGE if n not in sizes]
    dims = a.dims or ([512] if dev == "cpu" or a.quick else [512, 768, 1024])
    dtypes = a.dtypes or (["fp32"] if dev == "cpu" else (["bf16"] if a.quick
                                                         else ["bf16", "fp16", "fp32"]))
    for d in dtypes:
        if d not in DTYPES:
            p.error(f"--dtypes: unknown dtype {d!r}; expected some of {','.join(DTYPES)}")
    methods = a.methods or []
    for m in methods:
        if m not in METHODS:
            p.error(f"--methods: unknown method {m!r}; expected some of {','.join(METHODS)}")
    if a.reps < 0:
        p.error(f"--reps must be >= 0 (0: adaptive), got {a.reps}")
    threads = a.threads or _cpu_count()
    if a.max_mem_gb is not None:
        max_mem = int(a.max_mem_gb * 1e9)
    elif dev == "cuda":
        max_mem = 0  # filled in once CUDA is known to work (see _check_device)
    else:
        max_mem = int(0.8 * _meminfo_bytes("MemAvailable"))
    max_time = _DEFAULT_MAX_TIME_S[dev] if a.max_time_s is None else a.max_time_s
    cfg = Config(device=dev, sizes=sorted(set(sizes)), dims=dims, dtypes=dtypes, methods=methods,
                 reps=a.reps, target_s=(a.target_s if a.target_s is not None else
                                        (0.5 if a.quick and dev == "cpu" else 0.0)),
                 max_mem_bytes=max_mem, max_time_s=max_time,
                 time_budget_s=a.time_budget_s, out=a.out, tag=a.tag,
                 isolate=a.isolate and dev == "cpu", threads=threads, naive=a.naive,
                 plot=a.plot, seed=a.seed, allow_tf32=a.allow_tf32, huge=a.huge,
                 append=a.append)
    return cfg, a


# ------------------------------------------------------------------- environment
def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))))


def _commit() -> str:
    env = os.environ.get("FASTCLIP_COMMIT")
    if env:
        return env
    root = _repo_root()
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def env_info(cfg: Config) -> dict:
    """Device name and versions recorded in every CSV row and in the markdown header."""
    import fastclip  # noqa: PLC0415
    if cfg.device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = _cpu_model()
    try:
        load = f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        load = "unknown"
    return {"device": cfg.device, "device_name": name, "torch": torch.__version__,
            "triton": _version("triton"), "fastclip": fastclip.__version__,
            "commit": _commit(), "threads": str(cfg.threads if cfg.device == "cpu" else ""),
            "load": load}


def _slug(s: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-") or "unknown"


def output_prefix(cfg: Config, info: dict) -> str:
    """``<out>/<device>-<model slug>[-<tag>]``: the stem of every file of the run."""
    stem = f"{cfg.device}-{_slug(info['device_name'])}"
    if cfg.tag:
        stem += f"-{_slug(cfg.tag)}"
    return os.path.join(cfg.out, stem)


# ---------------------------------------------------------------------- methods
def _esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _floor_rows(n: int, dtype: torch.dtype, cfg: Config) -> int:
    """Rows of the floor's logits buffer: all N, or a chunk where N×N would be too big."""
    cap = _FLOOR_CAP[cfg.device]
    if cfg.max_mem_bytes:
        cap = min(cap, cfg.max_mem_bytes // 4)
    row_bytes = n * _esize(dtype)
    if n * row_bytes <= cap:
        return n
    rows = max(1, cap // row_bytes)
    return max(min(n, 256), rows // 256 * 256)


def _load_open_clip_loss():
    """open_clip's ``ClipLoss`` from its ``loss.py`` by file path, or (None, why)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError) as e:
        return None, f"open_clip not importable ({e})"
    if spec is None or not spec.submodule_search_locations:
        return None, "open_clip not importable"
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.isfile(path):
        return None, f"open_clip has no loss.py at {path}"
    mspec = importlib.util.spec_from_file_location("_fastclip_bench_open_clip_loss", path)
    mod = importlib.util.module_from_spec(mspec)
    try:
        mspec.loader.exec_module(mod)
        cls = mod.ClipLoss
    except Exception as e:  # noqa: BLE001 - any failure means: use the formula
        return None, f"open_clip's loss.py did not load ({type(e).__name__}: {e})"
    ver = _version("open_clip_torch") or _version("open-clip-torch") or "?"
    return cls, f"open_clip {ver} loss.ClipLoss"


_NAIVE_CACHE: dict[str, tuple] = {}


def naive_impl(cfg: Config):
    """(callable loss(x, y, s), description) of the naive peer, per ``cfg.naive``."""
    if cfg.naive not in _NAIVE_CACHE:
        from fastclip.ops.reference import clip_loss_naive  # noqa: PLC0415
        fn, desc = None, ""
        if cfg.naive in ("auto", "open_clip"):
            cls, desc = _load_open_clip_loss()
            if cls is not None:
                fn = cls()
            elif cfg.naive == "open_clip":
                raise RuntimeError(f"--naive open_clip: {desc}")
        if fn is None:
            why = f" ({desc})" if desc else ""
            fn, desc = clip_loss_naive, "formula fastclip.ops.reference.clip_loss_naive" + why
        _NAIVE_CACHE[cfg.naive] = (fn, desc)
    return _NAIVE_CACHE[cfg.naive]


def _inf_cl():
    try:
        import inf_cl  # noqa: PLC0415
    except Exception as e:  # noqa: BLE001 - a broken install is as good as none
        return None, f"inf-cl not importable ({type(e).__name__}: {e}); pip install inf-cl"
    return inf_cl.cal_inf_loss, f"inf-cl {_version('inf-cl') or _version('inf_cl') or '?'}"


def methods_for(cfg: Config) -> list[tuple[str, str]]:
    """[(method, reason it cannot run here or "")] in table order, filtered by --methods."""
    from fastclip.ops.backends import all_backends  # noqa: PLC0415
    out = [("floor", ""), ("naive", "")]
    for name, b in all_backends().items():
        if cfg.device not in b.devices:
            continue
        ok, why = b.availability()
        out.append((name, "" if ok else f"backend unavailable: {why}"))
    if cfg.device == "cuda":
        out.append(("inf-cl", ""))
    order = {m: i for i, m in enumerate(METHODS)}
    out.sort(key=lambda t: order.get(t[0], len(order)))
    if cfg.methods:
        out = [t for t in out if t[0] in cfg.methods]
    return out


def skip_reason(method: str, n: int, d: int, dtype: torch.dtype, cfg: Config) -> str:
    """Why ``method`` must not run at this size ("" when it may): capability or memory."""
    if method == "inf-cl":
        if dtype != torch.float32:
            return "inf-cl takes float32 features only"
        if d % 256:
            return f"inf-cl needs D a multiple of its head_dim 256 (D={d})"
        fn, desc = _inf_cl()
        if fn is None:
            return desc
    if method == "naive" and cfg.naive == "open_clip" and _load_open_clip_loss()[0] is None:
        return _load_open_clip_loss()[1]
    if cfg.huge and n in GPU_HUGE and method not in HUGE_METHODS:
        return "--huge sizes run only the fused backends and the floor"
    need = 4 * n * d * _esize(dtype) + extra_bytes_estimate(method, n, d, dtype, cfg)
    if cfg.max_mem_bytes and need > cfg.max_mem_bytes:
        return (f"would need {need / 1e9:.1f} GB (budget {cfg.max_mem_bytes / 1e9:.1f} GB, "
                f"--max-mem-gb)")
    return ""


def extra_bytes_estimate(method: str, n: int, d: int, dtype: torch.dtype, cfg: Config) -> int:
    """Memory a method needs beyond the inputs and their gradients (an upper estimate).

    naive: open_clip holds two N×N logit matrices (it computes both directions), their
    two log-softmax outputs and, in the backward, their gradients: ~6 N×N of the input
    dtype (7 budgeted); the one-matmul formula measured 5.3 N×N fp32 on this CPU
    (pitfalls.md; 6 budgeted). reference: ~6 chunks of 2^24 fp32 logits plus fp32
    copies of the features. Fused kernels: O(N·D).
    """
    e = _esize(dtype)
    acc = 8 if dtype == torch.float64 else 4
    nd = n * d
    if method == "floor":
        return _floor_rows(n, dtype, cfg) * n * e
    if method == "naive":
        k = 6 if (cfg.naive == "formula" or naive_impl(cfg)[1].startswith("formula")) else 7
        return k * n * n * e
    if method == "reference":
        return 6 * (1 << 24) * acc + 8 * nd * acc
    if method == "inf-cl":
        return 12 * nd * 4 + 64 * n
    return 4 * nd * acc + 64 * n       # fused: upcast copies / fp32 gradient buffers at most


@dataclass
class _Step:
    """One training step of a method, split at the forward: ``bwd(fwd())``.

    ``outputs``: the floor's (dX, dY) buffers, so that a test can check the chunked
    products against the full ones."""
    fwd: object
    bwd: object
    impl: str
    outputs: tuple = ()


def build_step(method: str, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor,
               cfg: Config) -> _Step:
    """The timed callables of ``method`` on features x, y [N, D] and scale s (0-dim)."""
    import fastclip  # noqa: PLC0415
    n, d = x.shape
    if method == "floor":
        rows = _floor_rows(n, x.dtype, cfg)
        xd, yd = x.detach(), y.detach()
        buf = torch.empty((rows, n), dtype=x.dtype, device=x.device)   # logits, then G
        gx, gy = torch.empty_like(xd), torch.empty_like(yd)
        if rows >= n:
            def fwd():
                torch.matmul(xd, yd.T, out=buf)

            def bwd(_):
                torch.matmul(xd, yd.T, out=buf)       # recompute
                torch.matmul(buf, yd, out=gx)         # G·Y
                torch.matmul(buf.T, xd, out=gy)       # Gᵀ·X
            return _Step(fwd, bwd, "4 x torch.matmul, one N x N buffer", (gx, gy))
        chunks = [(a, min(n, a + rows)) for a in range(0, n, rows)]

        def fwd():
            for a, b in chunks:
                torch.matmul(xd[a:b], yd.T, out=buf[:b - a])

        def bwd(_):
            for i, (a, b) in enumerate(chunks):
                g = buf[:b - a]
                torch.matmul(xd[a:b], yd.T, out=g)
                torch.matmul(g, yd, out=gx[a:b])
                if i == 0:
                    torch.matmul(g.T, xd[a:b], out=gy)
                else:
                    gy.addmm_(g.T, xd[a:b])
        return _Step(fwd, bwd, f"4 x torch.matmul on row chunks of {rows} (N x N would not fit)",
                     (gx, gy))
    if method == "naive":
        fn, desc = naive_impl(cfg)
        return _Step(lambda: fn(x, y, s), lambda loss: loss.backward(), desc)
    if method == "inf-cl":
        cal, desc = _inf_cl()
        if cal is None:
            raise RuntimeError(desc)
        return _Step(lambda: 0.5 * (cal(s * x, y) + cal(s * y, x)),
                     lambda loss: loss.backward(), desc + " (s applied to the row features)")
    return _Step(lambda: fastclip.clip_loss(x, y, s, backend=method),
                 lambda loss: loss.backward(),
                 f"fastclip.clip_loss(backend={method!r})"
                 + (": the chunked PyTorch form" if method == "reference" else ""))


def make_inputs(n: int, d: int, dtype: torch.dtype, device: str, seed: int):
    """Unit-norm random features [n, d] (as CLIP models return them) and s = 1/0.07, all
    leaves requiring grad. Never zeros: they hide unwritten outputs and can run faster.
    Drawn on ``device`` in row chunks, so N = 4M at D = 1024 needs no host copy and only
    a chunk of fp32 temporaries."""
    g = torch.Generator(device=device)
    g.manual_seed(seed * 1_000_003 + n * 131 + d)
    step = max(1, (1 << 26) // d)                  # 256 MB of fp32 per chunk
    xs = []
    for _ in range(2):
        t = torch.empty((n, d), dtype=dtype, device=device)
        for a in range(0, n, step):
            b = min(n, a + step)
            c = torch.randn((b - a, d), generator=g, dtype=torch.float32, device=device)
            t[a:b].copy_(torch.nn.functional.normalize(c, dim=1))
        xs.append(t.requires_grad_())
    s = torch.tensor(1 / 0.07, dtype=torch.float32, device=device, requires_grad=True)
    return xs[0], xs[1], s


# ------------------------------------------------------------------ measurement
class _Clock:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


class _Memory:
    """Peak-memory probe: CUDA allocator statistics, or the resident set on the CPU."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.base = 0
        self.valid = True

    def start(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        try:
            self.base = _proc_status_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:   # resets VmHWM to VmRSS
                f.write("5")
        except OSError:
            # Without the reset the high-water mark includes whatever ran earlier in the
            # process: right only in a fresh subprocess that ran nothing bigger before.
            self.valid = False

    def peak_extra(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _proc_status_kb("VmHWM") * 1024 - self.base


def _clear_grads(*ts):
    for t in ts:
        t.grad = None


def measure(method: str, n: int, d: int, dtype_name: str, cfg: Config, inputs=None) -> dict:
    """Time and peak memory of one (method, N, D, dtype) in this process.

    Returns {fwd_ms, fwd_bwd_ms, peak_extra_mb, reps, impl, status}. Peak extra memory
    is the peak during the first measured step minus the memory held before it (the
    inputs) minus the inputs' gradients (2·N·D elements).
    """
    dtype = DTYPES[dtype_name]
    cuda = cfg.device == "cuda"
    clock, mem = _Clock(cuda), _Memory(cuda)
    x, y, s = inputs if inputs is not None else make_inputs(n, d, dtype, cfg.device, cfg.seed)
    grad_bytes = 2 * n * d * _esize(dtype)

    # Warm-up: module loading, kernel compilation and autotuning, thread pools. On CUDA
    # at full size (Triton specialises and autotunes per shape); on the CPU a small
    # problem suffices, since a large N costs seconds to minutes per call.
    if cuda:
        wx, wy, ws = x, y, s
    else:
        nw = min(n, 256)
        wx, wy, ws = make_inputs(nw, d, dtype, cfg.device, cfg.seed + 1)
    st = build_step(method, wx, wy, ws, cfg)
    st.bwd(st.fwd())
    clock.sync()
    _clear_grads(x, y, s, wx, wy, ws)
    impl = st.impl
    del st, wx, wy, ws

    # First measured step: peak memory (buffers a method allocates count from here).
    mem.start()
    st = build_step(method, x, y, s, cfg)
    t0 = clock.mark()
    out = st.fwd()
    t1 = clock.mark()
    st.bwd(out)
    t2 = clock.mark()
    del out
    peak = mem.peak_extra() - grad_bytes
    if not cuda:
        # Gradients placed in heap freed by the warm-up do not raise the resident set, so
        # in a long-lived process (--no-isolate) this can dip below zero: it means zero.
        peak = max(0, peak)
    clock.sync()
    marks = [(t0, t1, t2)]
    first_s = clock.ms(t0, t2) / 1e3

    lo, hi = _REPS_RANGE[cfg.device]
    target = cfg.target_s or _TARGET_S[cfg.device]
    reps = cfg.reps if cfg.reps else max(lo, min(hi, round(target / max(first_s, 1e-6))))
    for _ in range(reps - 1):
        _clear_grads(x, y, s)
        t0 = clock.mark()
        out = st.fwd()
        t1 = clock.mark()
        st.bwd(out)
        t2 = clock.mark()
        del out
        marks.append((t0, t1, t2))
    clock.sync()
    _clear_grads(x, y, s)
    del st
    fwd = statistics.median(clock.ms(a, b) for a, b, _ in marks)
    tot = statistics.median(clock.ms(a, c) for a, _, c in marks)
    return {"fwd_ms": fwd, "fwd_bwd_ms": tot,
            "peak_extra_mb": (peak / 2**20) if mem.valid else None,
            "reps": len(marks), "impl": impl, "status": "ok"}


def _measure_isolated(method: str, n: int, d: int, dtype_name: str, cfg: Config) -> dict:
    """:func:`measure` in a fresh Python process (CPU): a clean resident-set peak."""
    spec = {"method": method, "n": n, "d": d, "dtype": dtype_name, "cfg": asdict(cfg)}
    cmd = [sys.executable, "-m", "fastclip.bench.contrastive_loss", _WORKER_FLAG, json.dumps(spec)]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(cfg.threads)
    # A fixed mmap threshold turns off glibc's dynamic one (which rises to 32 MB after the
    # first large free), so every buffer >= 128 KB is mapped fresh and shows in the
    # resident set instead of silently reusing heap freed by the warm-up.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    timeout = None if not cfg.max_time_s else 4 * cfg.max_time_s + 300
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: subprocess timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    err = (p.stderr.strip().splitlines() or [""])[-1][:300]
    why = f"killed by signal {-p.returncode} (out of memory?)" if p.returncode < 0 \
        else f"exit code {p.returncode}"
    return {"status": f"failed: subprocess {why}: {err}"}


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    cfg = Config(**spec["cfg"])
    torch.set_num_threads(cfg.threads)
    try:
        res = measure(spec["method"], spec["n"], spec["d"], spec["dtype"], cfg)
    except Exception as e:  # noqa: BLE001 - reported as a failed row, the run goes on
        res = {"status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    print(_RESULT_TAG + json.dumps(res), flush=True)
    return 0


# ----------------------------------------------------------------------- output
def _f(v) -> float | None:
    if v is None or v == "":
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def derive(rows: list[dict]) -> None:
    """Fill GFLOP/s and the ratios to the floor and to the naive formula, in place."""
    ok = {(r["method"], int(r["N"]), int(r["D"]), r["dtype"]): r for r in rows
          if str(r.get("status", "")) == "ok"}
    for r in rows:
        n, d = int(r["N"]), int(r["D"])
        for k in ("fwd_gflops", "fwd_bwd_gflops", "x_floor_fwd", "x_floor_fwd_bwd",
                  "x_naive_fwd", "x_naive_fwd_bwd"):
            r[k] = ""
        if r.get("status") != "ok":
            continue
        fwd, tot = _f(r["fwd_ms"]), _f(r["fwd_bwd_ms"])
        if fwd:
            r["fwd_gflops"] = f"{2 * n * n * d / (fwd * 1e-3) / 1e9:.4g}"
        if tot:
            r["fwd_bwd_gflops"] = f"{8 * n * n * d / (tot * 1e-3) / 1e9:.4g}"
        for peer, key in (("floor", "x_floor"), ("naive", "x_naive")):
            p = ok.get((peer, n, d, r["dtype"]))
            if p is None:
                continue
            pf, pt = _f(p["fwd_ms"]), _f(p["fwd_bwd_ms"])
            if fwd and pf:
                r[key + "_fwd"] = f"{fwd / pf:.3g}"
            if tot and pt:
                r[key + "_fwd_bwd"] = f"{tot / pt:.3g}"


def write_csv(rows: list[dict], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    os.replace(tmp, path)


def read_csv(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v, fmt: str) -> str:
    x = _f(v)
    return "" if x is None else format(x, fmt)


def _flops_unit(device: str) -> tuple[str, float]:
    return ("TFLOP/s", 1e3) if device == "cuda" else ("GFLOP/s", 1.0)


def _status_short(st: str) -> str:
    return "" if st == "ok" else st


def write_markdown(rows: list[dict], info: dict, cfg: Config, path: str,
                   started: str) -> None:
    """Header (device, versions, settings, FLOP model), then one table per (dtype, D)."""
    unit, div = _flops_unit(cfg.device)
    tf32 = ("on" if cfg.allow_tf32 else "off") if cfg.device == "cuda" else "n/a"
    naive_desc = next((r["impl"] for r in rows if r["method"] == "naive" and r.get("impl")), "")
    lines = [
        f"# fastclip contrastive loss: {cfg.device} ({info['device_name']})",
        "",
        f"- started {started}; fastclip {info['fastclip']} (commit {info['commit']}), "
        f"torch {info['torch']}, triton {info['triton'] or 'none'}"
        + (f", {cfg.threads} threads; load average at start {info['load']} (other work on "
           f"the machine inflates CPU times)" if cfg.device == "cpu" else "") + ".",
        f"- memory budget {cfg.max_mem_bytes / 1e9:.1f} GB (methods estimated above it are "
        f"skipped); fp32 matmul TF32: {tf32}.",
        "- time: median over `reps` training steps (forward timed inside the step, autograd on); "
        + ("CUDA events after a full-size warm-up." if cfg.device == "cuda" else
           "time.perf_counter after a small warm-up; each measurement in a fresh subprocess "
           "(peak memory = peak resident set minus the resident set once the inputs exist)."
           if cfg.isolate else "time.perf_counter after a small warm-up, in one process."),
        "- peak extra = peak memory during one forward+backward beyond the inputs and their "
        "gradients.",
        f"- {unit}: effective, 2N²D FLOP for fwd and 8N²D for fwd+bwd whatever the method does. "
        "× floor = time / floor's time (fwd: one X·Yᵀ; fwd+bwd: the four products); "
        "× naive = time / naive's time.",
        "- floor: four torch.matmul of the loss's shapes (X·Yᵀ twice, G·Y, Gᵀ·X); "
        "on row chunks of the same FLOP where one N×N buffer would not fit (see impl).",
    ]
    if naive_desc:
        lines.append(f"- naive: {naive_desc}.")
    impls = sorted({(r["method"], r["impl"]) for r in rows if r.get("impl")
                    and r["method"] not in ("naive", "floor")})
    for m, impl in impls:
        lines.append(f"- {m}: {impl}.")
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dtype"], int(r["D"])), []).append(r)
    order = {m: i for i, m in enumerate(METHODS)}
    for (dt, d), rs in groups.items():
        rs = sorted(rs, key=lambda r: (int(r["N"]), order.get(r["method"], 99)))
        lines += ["", f"## {dt}, D={d}", "",
                  f"| N | method | fwd ms | fwd+bwd ms | peak extra MB | fwd+bwd {unit} "
                  "| × floor fwd | × floor fwd+bwd | × naive fwd+bwd | reps | status |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rs:
            gf = _f(r.get("fwd_bwd_gflops"))
            lines.append(
                f"| {r['N']} | {r['method']} | {_num(r['fwd_ms'], '.4g')} | "
                f"{_num(r['fwd_bwd_ms'], '.4g')} | {_num(r['peak_extra_mb'], '.1f')} | "
                f"{'' if gf is None else format(gf / div, '.4g')} | {r['x_floor_fwd']} | "
                f"{r['x_floor_fwd_bwd']} | {r['x_naive_fwd_bwd']} | {r.get('reps', '')} | "
                f"{_status_short(r['status'])} |")
    lines.append("")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def summary_table(rows: list[dict]) -> str:
    """A compact fixed-width table of every row (printed last by a run)."""
    device = rows[0]["device"] if rows else "cpu"
    unit, div = _flops_unit(device)
    hdr = (f"{'dtype':<5} {'D':>5} {'N':>8} {'method':<9} {'fwd ms':>10} {'fwd+bwd ms':>11} "
           f"{'peak MB':>9} {unit:>8} {'x floor':>8} {'x naive':>8}  status")
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        gf = _f(r.get("fwd_bwd_gflops"))
        st = r["status"]
        out.append(f"{r['dtype']:<5} {r['D']:>5} {r['N']:>8} {r['method']:<9} "
                   f"{_num(r['fwd_ms'], '.4g'):>10} {_num(r['fwd_bwd_ms'], '.4g'):>11} "
                   f"{_num(r['peak_extra_mb'], '.1f'):>9} "
                   f"{'' if gf is None else format(gf / div, '.4g'):>8} "
                   f"{r.get('x_floor_fwd_bwd', ''):>8} {r.get('x_naive_fwd_bwd', ''):>8}  "
                   f"{'ok' if st == 'ok' else st[:48]}")
    return "\n".join(out)


# -------------------------------------------------------------------------- run
def _check_device(cfg: Config) -> None:
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here "
                             f"(torch {torch.__version__}); use --device cpu")
        if not cfg.max_mem_bytes:
            cfg.max_mem_bytes = int(0.8 * torch.cuda.get_device_properties(0).total_memory)
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    else:
        torch.set_num_threads(cfg.threads)


def run_benchmark(cfg: Config, log=print) -> tuple[list[dict], str]:
    """Run every (dtype, D, N, method) of ``cfg``; returns (rows, output path prefix)."""
    _check_device(cfg)
    info = env_info(cfg)
    os.makedirs(cfg.out, exist_ok=True)
    prefix = output_prefix(cfg, info)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    t_start = time.monotonic()
    methods = methods_for(cfg)
    rows: list[dict] = []
    if cfg.append and os.path.exists(prefix + ".csv"):
        planned = {(m, str(n), str(d), dt) for m, _ in methods for n in cfg.sizes
                   for d in cfg.dims for dt in cfg.dtypes}
        rows = [r for r in read_csv(prefix + ".csv")
                if (r["method"], r["N"], r["D"], r["dtype"]) not in planned]
    last: dict[tuple[str, int, str], tuple[int, float]] = {}   # (method, D, dtype) -> (N, s)
    log(f"fastclip bench: {cfg.device} ({info['device_name']}), commit {info['commit']}, "
        f"torch {info['torch']}; methods {', '.join(m for m, _ in methods)}; "
        f"sizes {cfg.sizes}, D {cfg.dims}, {cfg.dtypes}; memory budget "
        f"{cfg.max_mem_bytes / 1e9:.1f} GB -> {prefix}.*")
    if cfg.device == "cpu":
        try:
            load = os.getloadavg()[0]
            if load > 0.5 * (os.cpu_count() or 1):
                log(f"warning: load average {load:.1f} on {os.cpu_count()} cores: other work "
                    f"competes for the CPU and inflates these times")
        except OSError:
            pass

    def flush():
        derive(rows)
        write_csv(rows, prefix + ".csv")
        write_markdown(rows, info, cfg, prefix + ".md", started)

    for dt in cfg.dtypes:
        dtype = DTYPES[dt]
        for d in cfg.dims:
            for n in cfg.sizes:
                inputs = None
                for method, unavailable in methods:
                    row = dict(info, method=method, impl="", N=n, D=d, dtype=dt, fwd_ms="",
                               fwd_bwd_ms="", peak_extra_mb="", reps="",
                               timestamp=_dt.datetime.now().isoformat(timespec="seconds"))
                    why = unavailable or skip_reason(method, n, d, dtype, cfg)
                    prev = last.get((method, d, dt))
                    if not why and prev and cfg.max_time_s:
                        pred = prev[1] * (n / prev[0]) ** 2
                        if pred > cfg.max_time_s:
                            why = (f"would take ~{pred:.0f} s per fwd+bwd (limit "
                                   f"--max-time-s {cfg.max_time_s:.0f})")
                    if not why and cfg.time_budget_s:
                        left = cfg.time_budget_s - (time.monotonic() - t_start)
                        # CUDA: warm-up, the memory step and >= 3 timed steps; CPU: one step.
                        calls = 2 + _REPS_RANGE["cuda"][0] if cfg.device == "cuda" else 1
                        if left <= 0:
                            why = f"time budget spent (--time-budget-s {cfg.time_budget_s:g})"
                        elif prev and prev[1] * (n / prev[0]) ** 2 * calls > left:
                            why = (f"would not finish in the {left:.0f} s left of "
                                   f"--time-budget-s {cfg.time_budget_s:g}")
                    if why:
                        row["status"] = f"skipped: {why}"
                    else:
                        if method == "naive":
                            row["impl"] = naive_impl(cfg)[1]
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
                            if row["peak_extra_mb"] is not None:
                                row["peak_extra_mb"] = f"{row['peak_extra_mb']:.2f}"
                            else:
                                row["peak_extra_mb"] = ""
                    rows.append(row)
                    flush()
                    log(_progress_line(row, cfg))
                del inputs
                if cfg.device == "cuda":
                    torch.cuda.empty_cache()
    flush()
    if cfg.plot:
        from .plot import plot_rows  # noqa: PLC0415
        paths = plot_rows(rows, prefix, log=log)
        if paths:
            log("plots: " + ", ".join(paths))
    log(f"wrote {prefix}.csv and {prefix}.md in {time.monotonic() - t_start:.0f} s")
    return rows, prefix


def _measure_here(method, n, d, dt, cfg, inputs):
    """In-process measurement; the inputs are shared by the methods of one (N, D, dtype)."""
    try:
        if inputs is None:
            inputs = make_inputs(n, d, DTYPES[dt], cfg.device, cfg.seed)
        res = measure(method, n, d, dt, cfg, inputs)
    except Exception as e:  # noqa: BLE001 - reported as a failed row, the run goes on
        oom = isinstance(e, torch.OutOfMemoryError) if hasattr(torch, "OutOfMemoryError") \
            else "out of memory" in str(e)
        msg = "out of memory" if oom else f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        res = {"status": f"failed: {msg}"}
        if inputs is not None:
            _clear_grads(*inputs)
        gc.collect()
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
    res["_inputs"] = inputs
    return res


def _progress_line(r: dict, cfg: Config) -> str:
    head = f"  {r['dtype']:<4} D={r['D']:<5} N={r['N']:<8} {r['method']:<9}"
    if r["status"] != "ok":
        return f"{head} {r['status']}"
    unit, div = _flops_unit(cfg.device)
    gf = _f(r.get("fwd_bwd_gflops"))
    mb = _num(r["peak_extra_mb"], ".1f") or "?"
    xf = r.get("x_floor_fwd_bwd") or "-"
    return (f"{head} fwd {float(r['fwd_ms']):9.4g} ms  fwd+bwd {float(r['fwd_bwd_ms']):9.4g} ms  "
            f"peak +{mb} MB  {gf / div:.4g} {unit}  x floor {xf}  ({r['reps']} reps)")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclip bench`` and ``benchmarks/bench_contrastive_loss.py``."""
    if argv is None:
        argv = sys.argv[1:]
    cfg, a = parse_args(argv)
    if a.worker is not None:
        return _worker(a.worker)
    if a.summarize:
        rows = read_csv(a.summarize)
        derive(rows)
        print(summary_table(rows))
        return 0
    rows, _ = run_benchmark(cfg)
    print()
    print(summary_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
