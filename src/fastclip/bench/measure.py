"""How the benchmarks measure: clocks, repetitions, peak memory, subprocesses, ports.

Time: ``time.perf_counter`` on the CPU, CUDA events on a GPU (after a warm-up; the
median of the repetitions is reported). Peak memory beyond what a measurement starts
with: ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak resident set
(VmHWM, reset to the current resident set through /proc/self/clear_refs), best in a
fresh subprocess per measurement (:func:`run_worker`). For the step whose memory is
measured glibc's mmap threshold is pinned low and freed heap returned first, so that no
buffer hides in heap freed earlier; the timed repetitions then run with the threshold
high, as a training process's allocator settles (pinned low for every step, each buffer
of 128 KB or more is mapped fresh and page-faulted: naive N=512, D=64 took 7.3 ms instead
of 4.3).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["Step", "Clock", "PeakMemory", "free_port", "proc_status_kb", "reset_peak_rss",
           "malloc_for_memory", "malloc_for_speed",
           "esize", "unit_features", "clear_grads", "time_step", "per_call_times",
           "run_worker", "worker_reply", "RESULT_TAG"]

RESULT_TAG = "@@fastclip-bench-result "
# glibc's mallopt parameters (malloc.h) and values. A fixed mmap threshold turns off the
# dynamic one (which rises to 32 MB after the first large free): at 128 KB every buffer of
# that size or more is mapped fresh and shows in the resident set; at 32 MB (the dynamic
# threshold's ceiling on 64-bit) buffers below it are reused from the heap as in a
# long-running trainer, and a trim threshold of twice that keeps the heap from being
# returned between steps (glibc's own rule for the dynamic threshold).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 128 * 1024
_SPEED_MMAP_THRESHOLD = 32 * 1024 * 1024


def _libc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def malloc_for_memory() -> bool:
    """glibc: map every buffer >= 128 KB fresh and return the free heap, so the next step's
    peak resident set counts all it allocates. False where the C library is not glibc."""
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    libc.malloc_trim(0)
    return ok


def malloc_for_speed() -> bool:
    """glibc: reuse heap for buffers below 32 MB and keep it between steps (see above)."""
    libc = _libc()
    if libc is None:
        return False
    return (libc.mallopt(_M_MMAP_THRESHOLD, _SPEED_MMAP_THRESHOLD) == 1
            and libc.mallopt(_M_TRIM_THRESHOLD, 2 * _SPEED_MMAP_THRESHOLD) == 1)


@dataclass
class Step:
    """One training step of a method, split at the forward: ``bwd(fwd())``.

    ``impl`` says what runs (recorded in the results); ``outputs`` holds buffers a
    test may check (the floor's dX, dY)."""
    fwd: Callable[[], Any]
    bwd: Callable[[Any], None]
    impl: str
    outputs: tuple = ()


class Clock:
    """Marks and elapsed milliseconds: CUDA events on a GPU, perf_counter on the CPU."""

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


def proc_status_kb(key: str) -> int:
    """A /proc/self/status field in kB (VmRSS, VmHWM), -1 when absent."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMemory:
    """Peak memory since :meth:`start`, beyond what was held at the start."""

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
        self.base = proc_status_kb("VmRSS") * 1024
        # Without the reset the high-water mark includes whatever ran earlier in the
        # process: right only in a fresh subprocess that ran nothing bigger before.
        self.valid = reset_peak_rss()

    def peak_extra(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return proc_status_kb("VmHWM") * 1024 - self.base


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def esize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def unit_features(n: int, d: int, dtype: torch.dtype, device: str, seed: int, count: int = 2):
    """``count`` tensors [n, d] of random unit-norm rows (as CLIP models return them),
    requiring grad. Never zeros: they hide unwritten outputs and can run faster. Drawn
    on ``device`` in row chunks, so N = 4M at D = 1024 needs no host copy and only a
    chunk of fp32 temporaries."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + n * 131 + d) % 2**64)     # any --seed: the generator takes 64 bits
    step = max(1, (1 << 26) // d)                  # 256 MB of fp32 per chunk
    out = []
    for _ in range(count):
        t = torch.empty((n, d), dtype=dtype, device=device)
        for a in range(0, n, step):
            b = min(n, a + step)
            c = torch.randn((b - a, d), generator=g, dtype=torch.float32, device=device)
            t[a:b].copy_(torch.nn.functional.normalize(c, dim=1))
        out.append(t.requires_grad_())
    return tuple(out)


def clear_grads(*ts):
    for t in ts:
        t.grad = None


def time_step(build: Callable[[tuple], Step], inputs: tuple, warm_inputs: tuple, *,
              cuda: bool, reps: int, target_s: float, reps_range: tuple[int, int],
              grad_bytes: int) -> dict:
    """Time and peak memory of the step ``build(inputs)``.

    A warm-up step on ``warm_inputs`` first (module loading, compilation, autotuning,
    thread pools). The first measured step gives the peak memory (beyond the memory
    held before it and ``grad_bytes``, the inputs' gradients) and sizes the
    repetitions: ``reps`` if > 0, else ``target_s`` / (its time) clamped to
    ``reps_range``. Returns {fwd_ms, fwd_bwd_ms, peak_extra_mb, reps, impl, status}:
    medians over the repetitions, the forward timed inside the step (autograd on, as
    training pays it)."""
    clock, mem = Clock(cuda), PeakMemory(cuda)
    st = build(warm_inputs)
    st.bwd(st.fwd())
    clock.sync()
    clear_grads(*inputs, *warm_inputs)
    del st

    if not cuda:
        malloc_for_memory()
    mem.start()
    st = build(inputs)
    impl = st.impl      # the measured step's layout (a smaller warm-up may differ: row chunks)
    t0 = clock.mark()
    out = st.fwd()
    t1 = clock.mark()
    st.bwd(out)
    t2 = clock.mark()
    del out
    peak = mem.peak_extra() - grad_bytes
    if not cuda:
        malloc_for_speed()
        # Gradients placed in heap freed by the warm-up do not raise the resident set, so
        # in a long-lived process this can dip below zero: it means zero.
        peak = max(0, peak)
    clock.sync()
    marks = [(t0, t1, t2)]
    first_s = clock.ms(t0, t2) / 1e3
    lo, hi = reps_range
    n_reps = reps if reps else max(lo, min(hi, round(target_s / max(first_s, 1e-6))))
    for _ in range(n_reps - 1):
        clear_grads(*inputs)
        t0 = clock.mark()
        out = st.fwd()
        t1 = clock.mark()
        st.bwd(out)
        t2 = clock.mark()
        del out
        marks.append((t0, t1, t2))
    clock.sync()
    clear_grads(*inputs)
    del st
    return {"fwd_ms": statistics.median(clock.ms(a, b) for a, b, _ in marks),
            "fwd_bwd_ms": statistics.median(clock.ms(a, c) for a, _, c in marks),
            "peak_extra_mb": (peak / 2**20) if mem.valid else None,
            "reps": len(marks), "impl": impl, "status": "ok"}


def per_call_times(steps: dict[str, Step], inputs: tuple, *, sync: Callable[[], None],
                   warmup: int = 10, min_calls: int = 30, max_calls: int = 5000,
                   budget_s: float = 2.0, rounds: int = 0,
                   agree: Callable[[int], int] | None = None) -> dict[str, tuple[list, list]]:
    """Wall time of single calls, for small problems where dispatch dominates.

    Every method runs ``warmup`` forward+backward steps, then rounds: in each round each
    method makes one forward call (the loss is dropped) and one forward+backward call,
    each timed alone (``sync`` before reading the clock). Round-robin, so that a change
    of machine load hits every method alike. Rounds: ``rounds`` if > 0; else, alone,
    until ``budget_s`` is spent (at least ``min_calls``, at most ``max_calls``); with
    ``agree`` (distributed runs, where every rank must make the same calls) as many as
    fit ``budget_s`` at the median pace of 5 rounds, mapped by ``agree`` to the count
    every rank uses. Returns {method: (forward seconds, forward+backward seconds)}.
    """
    def one_round(out):
        for name, st in steps.items():
            fwd_t, tot_t = out[name]
            clear_grads(*inputs)
            sync()
            a = time.perf_counter()
            loss = st.fwd()
            sync()
            fwd_t.append(time.perf_counter() - a)
            del loss
            clear_grads(*inputs)
            sync()
            a = time.perf_counter()
            st.bwd(st.fwd())
            sync()
            tot_t.append(time.perf_counter() - a)

    for st in steps.values():
        for _ in range(warmup):
            clear_grads(*inputs)
            st.bwd(st.fwd())
    sync()
    out = {name: ([], []) for name in steps}
    if rounds <= 0 and agree is not None:
        paces = []
        for _ in range(5):          # a median: one preempted round must not set the count
            t0 = time.perf_counter()
            one_round({name: ([], []) for name in steps})
            paces.append(time.perf_counter() - t0)
        pace = statistics.median(paces)
        rounds = max(min_calls, min(max_calls, int(budget_s / max(pace, 1e-7))))
    if agree is not None:
        rounds = agree(rounds)
    if rounds > 0:
        for _ in range(rounds):
            one_round(out)
    else:
        t0 = time.perf_counter()
        done = 0
        while done < max_calls and (done < min_calls or time.perf_counter() - t0 < budget_s):
            one_round(out)
            done += 1
    clear_grads(*inputs)
    return out


def run_worker(module: str, flag: str, payload: dict, *, threads: int,
               timeout: float | None) -> dict:
    """Run ``python -m <module> <flag> <json payload>`` in a fresh process and return the
    dict it printed with :func:`worker_reply` ({"status": "failed: ..."} otherwise)."""
    cmd = [sys.executable, "-m", module, flag, json.dumps(payload)]
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(threads)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"failed: subprocess timed out after {timeout:.0f} s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    err = (p.stderr.strip().splitlines() or [""])[-1][:300]
    why = f"killed by signal {-p.returncode} (out of memory?)" if p.returncode < 0 \
        else f"exit code {p.returncode}"
    return {"status": f"failed: subprocess {why}: {err}"}


def worker_reply(result: dict) -> None:
    """The worker side of :func:`run_worker`: print the result where the parent finds it."""
    print(RESULT_TAG + json.dumps(result), flush=True)
