"""What this machine can run: a ``device`` and a ``loss_backend`` value checked before any work,
by the command line (``--device``, ``--loss-backend``) and by ``TrainConfig`` alike, so that a
config built in Python is refused with the same words instead of failing at the first step."""
from __future__ import annotations

import os
from typing import Optional

# torch CPU threads: more than any machine has cores, and few enough to start. 100000 made
# libgomp fail to create its threads (16384 already, on a 2-core machine with 24 GB) or crash.
MAX_THREADS = 1024


def device_problem(device: str) -> Optional[str]:
    """What is wrong with a ``device`` value on this machine ("'cuda': CUDA is not
    available ..."), or None when it is usable (``auto`` always is)."""
    import torch  # noqa: PLC0415  (the CLI imports this module: `fastclip --help` imports no torch)
    if device == "auto":
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        return f"{device!r}: not a device; expected auto, cpu, cuda or cuda:N"
    if dev.type not in ("cpu", "cuda"):
        return f"{device!r}: expected auto, cpu, cuda or cuda:N"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is a CPU-only build" if torch.version.cuda is None
                   else "no CUDA device is visible (driver missing or CUDA_VISIBLE_DEVICES empty)")
            return f"{device}: CUDA is not available ({why}); use cpu or auto"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    return None


def backend_problem(backend: str) -> Optional[str]:
    """What is wrong with a ``loss_backend`` value on this machine, or None. ``auto`` takes
    ``FASTCLIP_BACKEND`` when it is set, so a bad value there is the value's problem too (it
    failed with a traceback at the first training step, after the run folder was written)."""
    if backend == "auto":
        env = os.environ.get("FASTCLIP_BACKEND", "").strip()
        why = backend_problem(env) if env and env != "auto" else None
        return f"auto takes FASTCLIP_BACKEND={why}" if why else None
    from .ops import all_backends, available_backends  # noqa: PLC0415  (as torch above)
    if backend not in all_backends():
        return f"{backend!r}: unknown; expected auto or one of {', '.join(sorted(all_backends()))}"
    if backend not in available_backends():
        return f"{backend!r}: not available on this machine; available: auto, {', '.join(available_backends())}"
    return None


__all__ = ["MAX_THREADS", "backend_problem", "device_problem"]
