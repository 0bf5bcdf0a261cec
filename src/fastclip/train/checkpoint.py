"""Training checkpoints: everything needed to continue a run bit for bit, written atomically.

A checkpoint holds the model, optimizer, scheduler and grad-scaler states, the data position
(the step; the data order is a function of (seed, step), see ``fastclip.train.trainer``) and the
RNG states (python, numpy, torch CPU, torch CUDA). It is written to a temporary file in the same
directory and moved into place with ``os.replace`` (atomic on POSIX), so a run killed at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import glob
import os
import random
import re
import tempfile
from typing import Any, Dict, Optional

import numpy as np
import torch

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"step_(\d+)\.pt$")


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` through a temp file in the same directory + ``os.replace``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CKPT_DIR, f"step_{step:08d}.pt")


def save_training_state(output_dir: str, step: int, model: torch.nn.Module, optimizer, scheduler, scaler,
                        extra: Optional[Dict[str, Any]] = None, keep: int = 2) -> str:
    """Write ``checkpoints/step_<step>.pt`` under ``output_dir`` atomically; keep the newest ``keep``
    (older ones are removed after the new one is in place). Returns the path."""
    state = {"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
             "rng": rng_state(), "extra": extra or {}}
    path = checkpoint_path(output_dir, step)
    atomic_save(state, path)
    if keep > 0:
        for old in sorted(_list(output_dir))[:-keep]:
            os.unlink(old[1])
    return path


def _list(output_dir: str):
    out = []
    for p in glob.glob(os.path.join(output_dir, CKPT_DIR, "step_*.pt")):
        m = _NAME.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return out


def resolve_resume(resume: str, output_dir: str) -> Optional[str]:
    """``--resume``: ``"latest"`` -> the newest checkpoint under ``output_dir`` (None if there is
    none: a fresh start), or an explicit file path (must exist)."""
    if resume == "latest":
        found = sorted(_list(output_dir))
        return found[-1][1] if found else None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
    return resume


def load_training_state(path: str, model: torch.nn.Module, optimizer, scheduler, scaler,
                        map_location="cpu") -> Dict[str, Any]:
    """Restore the states saved by ``save_training_state`` (RNG included); returns the checkpoint
    dict (``step``, ``extra``). The file is fastclip's own (it holds numpy RNG state), hence
    ``weights_only=False``: load only checkpoints you wrote."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return state
