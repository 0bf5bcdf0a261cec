"""Where a benchmark ran: device name, versions, commit, threads, load.

Every result row and markdown header carries these, so that a number can be traced to
the machine and the code that produced it. Nothing here depends on where the package
is installed: the commit comes from ``FASTCLIP_COMMIT`` or from the current directory.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import subprocess

import torch

__all__ = ["commit", "cpu_name", "cpu_count", "device_name", "version", "load_average",
           "meminfo_bytes", "env_info", "slug", "gb", "cpu_detail", "threads_warning"]


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit(cwd: str | None = None) -> str:
    """The fastclip commit a run measures: ``FASTCLIP_COMMIT`` if set (a copy of the tree
    without ``.git``), else ``git rev-parse --short HEAD`` (``+dirty`` when tracked files
    changed) when ``cwd`` (default: the current directory) is inside a fastclip checkout,
    else ``"unknown"``. A checkout of another project is not asked: its commit would
    mislabel the results of an installed fastclip."""
    env = os.environ.get("FASTCLIP_COMMIT", "").strip()
    if env:
        return env
    cwd = cwd or os.getcwd()
    top = _git(["rev-parse", "--show-toplevel"], cwd)
    if not top or not os.path.isfile(os.path.join(top, "src", "fastclip", "__init__.py")):
        return "unknown"
    head = _git(["rev-parse", "--short", "HEAD"], top)
    if not head:
        return "unknown"
    dirty = _git(["status", "--porcelain", "--untracked-files=no"], top)
    return head + ("+dirty" if dirty else "")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (e.g. "AMD EPYC 9B14"), else what platform says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def cpu_detail() -> str:
    """What tells CPUs of one marketing name apart, from /proc/cpuinfo: vendor family and
    model numbers and the widest vector extension, e.g. "family 26 model 2, AVX-512 (BF16)".
    Virtual machines often report a bare "AMD EPYC" as the model name, which covers several
    generations with different kernels and speeds; "" where /proc/cpuinfo is unreadable."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break                          # the first processor's block is enough
                k, _, v = line.partition(":")
                fields.setdefault(k.strip().lower(), v.strip())
    except OSError:
        return ""
    flags = set(fields.get("flags", "").split())
    parts = [f"family {fields['cpu family']} model {fields['model']}"] if (
        "cpu family" in fields and "model" in fields) else []
    if "avx512f" in flags:
        parts.append("AVX-512" + (" (BF16)" if "avx512_bf16" in flags else ""))
    elif "avx2" in flags:
        parts.append("AVX2")
    return ", ".join(parts)


def threads_warning(threads: int | None) -> str:
    """A note when ``threads`` exceeds the cores this process may run on ("" otherwise):
    the threads then share cores and the times measure the sharing."""
    cores = cpu_count()
    if threads is None or threads <= cores:
        return ""
    return (f"{threads} threads on {cores} cores this process may run on: the threads share "
            f"cores, which inflates CPU times")


def cpu_count() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def device_name(device: str) -> str:
    """``torch.cuda.get_device_name()`` for "cuda", the CPU model for "cpu"."""
    return torch.cuda.get_device_name() if device == "cuda" else cpu_name()


def version(dist: str) -> str:
    """Installed version of the distribution ``dist``, "" when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def load_average() -> str:
    """1-minute load average and core count: other work inflates CPU times."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def meminfo_bytes(key: str) -> int:
    """A /proc/meminfo field in bytes (e.g. "MemAvailable"); total RAM where unreadable."""
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


def env_info(device: str, threads: int | None = None) -> dict:
    """The fields every result row starts with: device, its name, versions, commit,
    CPU threads (CPU runs only) and the load average at the start."""
    import fastclip  # noqa: PLC0415
    return {"device": device, "device_name": device_name(device), "torch": torch.__version__,
            "triton": version("triton"), "fastclip": fastclip.__version__,
            "python": platform.python_version(), "commit": commit(),
            "threads": str(threads) if device == "cpu" and threads else "",
            "load": load_average(), "cpu": cpu_detail() if device == "cpu" else ""}


def slug(s: str) -> str:
    """Lower-case file-name form of a device name: "AMD EPYC" -> "amd-epyc".

    Trademark marks and the words "processor" and "CPU" are dropped:
    "Intel(R) Xeon(R) Processor" -> "intel-xeon".
    """
    s = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b", " ", s.lower())
    return re.sub(r"[^a-z0-9]+", "-", s).strip("-") or "unknown"


def gb(nbytes: float) -> str:
    """A memory size or budget in decimal GB, three significant digits; 0: no limit."""
    return f"{nbytes / 1e9:.3g} GB" if nbytes else "none (--max-mem-gb 0)"
