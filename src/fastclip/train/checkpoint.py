"""Training checkpoints: everything needed to continue a run bit for bit, in a file that cannot
run code when it is loaded, written atomically.

A checkpoint (``checkpoints/step_<step>.safetensors`` in the run folder) holds the model,
optimizer, scheduler and grad-scaler states, the step, the RNG states (python, numpy, torch
CPU, torch CUDA) and the trainer's extra fields (the data position, i.e. batches drawn, see
``fastclip.train.data``; skipped samples and batches, wall time, config). Every
tensor (weights, optimizer moments, RNG states of torch) is a safetensors tensor; everything
else is JSON in the safetensors metadata. Loading parses JSON and copies tensor bytes: unlike a
pickle (``torch.load(weights_only=False)``, which fastclip used before), nothing in the file can
name a function to call, so a file planted in a run folder can at worst fail to load.

The JSON encodes Python values exactly: ints, floats (``repr`` round-trips every double, NaN and
infinities included), strings, booleans and None as themselves, lists as lists, and tuples,
dicts (their keys may be ints, as the optimizer's), tensors and numpy arrays as one-key tagged
objects (``{"tuple": [...]}``, ``{"dict": [[k, v], ...]}``, ``{"tensor": "<safetensors key>"}``,
``{"ndarray": [dtype, shape, values]}``).

The file is written to a temporary ``.tmp-*`` file in the same folder and moved into place with
``os.replace`` (atomic on POSIX), so a run killed at any moment leaves either the previous
checkpoint or the new one, never a torn file.
"""
from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .._fileio import TRAINING_FORMAT, atomic_write, checkpoint_file_problem, save_safetensors

CKPT_DIR = "checkpoints"
FORMAT = TRAINING_FORMAT
FORMAT_VERSION = 1
_NAME = re.compile(r"step_(\d+)\.safetensors$")
_LEGACY_NAME = re.compile(r"step_(\d+)\.pt$")
# numpy dtypes a checkpoint may hold in JSON (the numpy RNG state is uint32); never object.
_NDARRAY_KINDS = "biuf"


class CheckpointError(ValueError):
    """A training checkpoint that cannot be used: not a fastclip checkpoint, truncated or
    corrupt, in the old pickle format, or not matching the run's model. The message names
    the file."""


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
        # One state per device the saving process saw (all of its node's under torchrun): a node
        # with fewer devices restores those it has (set_rng_state_all indexed past them, and the
        # IndexError read as a corrupt checkpoint), a node with more leaves the others as seeded.
        for i, s in enumerate(list(state["cuda"])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ----------------------------------------------------------------------------- encoding


def _encode(obj: Any, path: str, tensors: Dict[str, torch.Tensor], storages: set) -> Any:
    """``obj`` as JSON-able data; its tensors go into ``tensors`` under keys derived from
    ``path`` (see the module docstring for the encoding)."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in storages:  # safetensors refuses tensors that share memory
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        key = path if path not in tensors else f"{path}#{len(tensors)}"
        tensors[key] = t
        return {"tensor": key}
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in _NDARRAY_KINDS:
            raise TypeError(f"{path}: numpy arrays of dtype {obj.dtype} cannot be stored in a checkpoint")
        return {"ndarray": [obj.dtype.str, list(obj.shape), obj.ravel().tolist()]}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, f"{path}/{i}", tensors, storages) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else {"tuple": items}
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"{path}: dict key {k!r} ({type(k).__name__}) cannot be stored in a checkpoint")
            out.append([k, _encode(v, f"{path}/{k}", tensors, storages)])
        return {"dict": out}
    raise TypeError(f"{path}: a {type(obj).__name__} cannot be stored in a checkpoint")


def _decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of ``_encode``. Builds only dicts, lists, tuples, numbers, strings, tensors and
    numeric numpy arrays; anything else is a ``ValueError``."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict) and len(obj) == 1:
        (tag, val), = obj.items()
        if tag == "tensor" and isinstance(val, str):
            if val not in tensors:
                raise ValueError(f"refers to tensor {val!r}, which the file does not hold")
            return tensors[val]
        if tag == "tuple" and isinstance(val, list):
            return tuple(_decode(v, tensors) for v in val)
        if tag == "dict" and isinstance(val, list):
            out = {}
            for item in val:
                if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], (str, int))):
                    raise ValueError(f"malformed dict entry {str(item)[:80]}")
                out[item[0]] = _decode(item[1], tensors)
            return out
        if tag == "ndarray" and isinstance(val, list) and len(val) == 3:
            dtype = np.dtype(val[0]) if isinstance(val[0], str) else None
            if dtype is None or dtype.kind not in _NDARRAY_KINDS:
                raise ValueError(f"unsupported array dtype {val[0]!r}")
            return np.array(val[2], dtype=dtype).reshape(val[1])
    raise ValueError(f"unexpected value {str(obj)[:80]}")


# ----------------------------------------------------------------------------- files


def checkpoint_path(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, CKPT_DIR, f"step_{step:08d}.safetensors")


def save_training_state(output_dir: str, step: int, model: torch.nn.Module, optimizer, scheduler, scaler,
                        extra: Optional[Dict[str, Any]] = None, keep: int = 2) -> str:
    """Write ``checkpoints/step_<step>.safetensors`` under ``output_dir`` atomically; keep the
    newest ``keep`` (older ones are removed after the new one is in place; 0 keeps all).
    ``extra``: JSON-able fields the trainer wants back (returned by ``load_training_state``).
    Returns the path."""
    from ..models.openai import unwrap_model
    # The model inside a torch.compile or DDP wrapper: its keys carry no "_orig_mod."/"module."
    # prefix, so a plain model loads it (and a wrapped one, see load_training_state). A loop
    # without a learning-rate schedule (scheduler None) or a grad scaler stores none.
    state = {"step": int(step), "model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "scaler": scaler.state_dict() if scaler is not None else None,
             "rng": rng_state(), "extra": extra or {}}
    tensors: Dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors, set())
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(encoded)}
    path = checkpoint_path(output_dir, step)
    from safetensors import SafetensorError
    try:
        atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, meta), suffix=".safetensors")
    except (OSError, SafetensorError) as e:     # a full disk, a checkpoints path that is a file
        raise CheckpointError(f"cannot write the checkpoint {path}: {e}") from None
    if keep > 0:
        for old in sorted(list_checkpoints(output_dir))[:-keep]:
            with contextlib.suppress(FileNotFoundError):    # removed by hand meanwhile (to free space)
                os.unlink(old[1])
    return path


def list_checkpoints(output_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of the checkpoints in ``output_dir/checkpoints``, unordered."""
    return _list(output_dir, _NAME, "step_*.safetensors")


def named_step(path: str) -> Optional[int]:
    """The step a checkpoint's file name gives (``step_00000014.safetensors``: 14), or None."""
    m = _NAME.search(os.path.basename(path))
    return int(m.group(1)) if m else None


def _list(output_dir: str, pattern, glob_pattern: str) -> List[Tuple[int, str]]:
    out = []
    for p in glob.glob(os.path.join(glob.escape(output_dir), CKPT_DIR, glob_pattern)):
        m = pattern.search(p)
        if m:
            out.append((int(m.group(1)), p))
    return out


def resolve_resume(resume: str, output_dir: Optional[str]) -> Optional[str]:
    """``--resume``: ``"latest"`` -> the newest checkpoint under ``output_dir`` (None if there is
    none: a fresh start), or an explicit file path (must exist).

    Raises ``CheckpointError`` when ``"latest"`` finds only checkpoints in the old pickle
    format (``step_*.pt``), which fastclip no longer loads (see ``load_training_state``).
    """
    if resume == "latest":
        found = sorted(list_checkpoints(output_dir)) if output_dir else []
        if found:
            return found[-1][1]
        legacy = sorted(_list(output_dir, _LEGACY_NAME, "step_*.pt")) if output_dir else []
        if legacy:
            raise CheckpointError(_legacy_message(legacy[-1][1]))
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"--resume {resume!r}: no such checkpoint file")
    return resume


def older_checkpoint(output_dir: str, path: str) -> Optional[str]:
    """The newest checkpoint under ``output_dir`` older than ``path`` (None if there is none)."""
    found = sorted(list_checkpoints(output_dir))
    steps = [s for s, p in found if os.path.realpath(p) == os.path.realpath(path)]
    older = [p for s, p in found if steps and s < steps[0]]
    return older[-1] if older else None


def readable_training_state(path: str) -> bool:
    """Whether ``read_training_state(path)`` succeeds (the file is a sound checkpoint, whether or
    not it fits a given model)."""
    try:
        read_training_state(path)
    except CheckpointError:
        return False
    return True


def _legacy_message(path: str) -> str:
    return (f"{path}: a training checkpoint in fastclip's earlier pickle format (or another .pt file); "
            f"fastclip no longer loads training state from pickles, because unpickling can run code "
            f"stored in the file. If you wrote this file and trust it, convert it with "
            f"python -c \"from fastclip.train.checkpoint import convert_legacy_checkpoint as c; "
            f"c('{path}')\" (it reads tensors and plain values only, with torch.load(weights_only=True)) "
            f"and resume from the .safetensors file it writes next to it; otherwise start a new run")


def _looks_like_pickle(path: str) -> bool:
    """A ``torch.save`` file: a zip archive (``PK``) or a bare pickle (protocol opcode 0x80). A
    safetensors file starts with its 8-byte header length, then the JSON header's ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return head[8:9] != b"{" and (head[:2] == b"PK" or head[:1] == b"\x80")


def read_training_state(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path`` as a dict (``step``, ``model``, ``optimizer``, ``scheduler``,
    ``scaler``, ``rng``, ``extra``), tensors on the CPU. Runs no code from the file.

    Raises ``CheckpointError`` naming ``path`` for a file that is missing, truncated or corrupt,
    not a fastclip training checkpoint, or an old pickle checkpoint (with how to convert it).
    """
    from safetensors import SafetensorError, safe_open
    why = checkpoint_file_problem(path)
    if why:
        raise CheckpointError(f"{path}: {why}")
    if _looks_like_pickle(path):
        raise CheckpointError(_legacy_message(path))
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise CheckpointError(f"{path}: not a fastclip training checkpoint (a safetensors file whose "
                                      f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}; a model "
                                      f"file such as model.safetensors cannot resume training)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a readable training checkpoint (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    version = meta.get("format_version")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(f"{path}: training checkpoint format version {version!r}; this fastclip reads "
                              f"version {FORMAT_VERSION}")
    try:
        state = _decode(json.loads(meta["state"]), tensors)
        if not isinstance(state, dict):
            raise ValueError("the state is not a mapping")
        missing = [k for k in ("step", "model", "optimizer", "scheduler", "rng", "extra") if k not in state]
        if missing:
            raise ValueError(f"missing entries {missing}")
        if not isinstance(state["step"], int) or state["step"] < 0:
            raise ValueError(f"step {state['step']!r} is not a non-negative integer")
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt training checkpoint metadata ({type(e).__name__}: {e})") from None
    return state


def saved_run_config(path: str) -> Optional[Dict[str, Any]]:
    """The run configuration (``TrainConfig`` fields) a training checkpoint saved, read from its
    metadata alone (no tensor is loaded); None when ``path`` is not such a checkpoint."""
    from safetensors import safe_open
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
        if meta.get("format") != FORMAT:
            return None
        node = json.loads(meta["state"])
        for key in ("extra", "config"):
            node = dict(node["dict"])[key]
        out = _decode(node, {})
        return out if isinstance(out, dict) else None
    except Exception:  # noqa: BLE001 - any unreadable or unexpected file: no configuration
        return None


def _number(v) -> bool:
    """A finite real number, or a one-element real tensor holding one (torch takes tensor lrs)."""
    if isinstance(v, torch.Tensor):
        return v.numel() == 1 and not v.is_complex() and v.dtype != torch.bool and bool(torch.isfinite(v).all())
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Per-element state the fused and foreach optimizer kernels walk with the parameter's own
# element count (Adam/AdamW/NAdam/RAdam/Adamax moments, SGD's momentum, RMSprop's, Adagrad's
# and Adadelta's averages, Rprop's steps): another shape is read and written out of bounds.
# Other state may be of any shape (NAdam's mu_product and ASGD's eta are scalars, Adafactor's
# factored row_var/col_var are not the parameter's shape).
_PER_ELEMENT = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "momentum_buffer", "square_avg",
                "grad_avg", "acc_delta", "sum", "prev", "step_size")


def _check_optimizer_state(optimizer) -> None:
    """ValueError for optimizer state a training step cannot use: a learning rate or weight
    decay that is not a finite number (a string lr failed inside the fused AdamW kernel with a
    traceback), betas or eps of the wrong kind, and per-element state whose shape is not its
    parameter's (a 0-dim moment for a [49408, 64] embedding was walked out of bounds by the
    fused CPU kernel)."""
    for gi, group in enumerate(optimizer.param_groups):
        for key in ("lr", "weight_decay"):      # (None: transformers' Adafactor derives its lr)
            if group.get(key) is not None and not _number(group[key]):
                raise ValueError(f"param group {gi}: {key} {group[key]!r} is not a finite number")
        eps = group.get("eps")       # a number (Adafactor's: a pair of numbers or None)
        if eps is not None and not (_number(eps) or (isinstance(eps, (tuple, list))
                                                     and all(e is None or _number(e) for e in eps))):
            raise ValueError(f"param group {gi}: eps {eps!r} is not a finite number")
        betas = group.get("betas")          # (two for torch's Adams; three for Adan, AdEMAMix)
        if betas is not None and not (isinstance(betas, (tuple, list)) and len(betas) >= 1
                                      and all(_number(b) for b in betas)):
            raise ValueError(f"param group {gi}: betas {betas!r} are not finite numbers")
        for p in group["params"]:
            for key, v in optimizer.state.get(p, {}).items():
                if key == "step":
                    if not _number(v):
                        raise ValueError(f"param group {gi}: a step count {v!r} that is not a number")
                elif key in _PER_ELEMENT and isinstance(v, torch.Tensor) and v.shape != p.shape:
                    raise ValueError(f"param group {gi}: {key} of shape {tuple(v.shape)} for a parameter "
                                     f"of shape {tuple(p.shape)}")


def _check_scheduler_state(scheduler) -> None:
    """ValueError for a schedule the steps cannot follow (strings where numbers go)."""
    base, last = getattr(scheduler, "base_lrs", []), getattr(scheduler, "last_epoch", 0)
    if not all(_number(b) for b in base):
        raise ValueError(f"scheduler base_lrs {base!r} are not finite numbers")
    if isinstance(last, bool) or not isinstance(last, int):
        raise ValueError(f"scheduler last_epoch {last!r} is not an int")


def _match_strides(optimizer) -> None:
    """Give each per-parameter optimizer tensor its parameter's memory layout again (Adam's moments
    are ``zeros_like(param)``: channels_last for the ResNet tower's convolutions), as in the run
    that saved it; safetensors stores contiguous tensors."""
    for p, st in optimizer.state.items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                st[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def load_training_state(path: str, model: torch.nn.Module, optimizer, scheduler, scaler,
                        map_location="cpu") -> Dict[str, Any]:
    """Restore the states saved by ``save_training_state`` (RNG included); returns the checkpoint
    dict (``step``, ``extra``, ...). Loading runs no code from the file (see the module
    docstring). ``map_location`` is accepted for callers written for ``torch.load`` and changes
    nothing: the file's tensors are read on the CPU and copied into the model's parameters on
    whatever device they live (the optimizer's state follows its parameters). Raises
    ``CheckpointError`` naming ``path`` for any file it cannot use."""
    from ..models.openai import strip_wrapper_prefixes, unwrap_model
    state = read_training_state(path)
    try:
        unwrap_model(model).load_state_dict(strip_wrapper_prefixes(state["model"]))
    except (RuntimeError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()
        why = (first[0] if first else type(e).__name__) + (" ..." if len(first) > 1 else "")
        saved = (state.get("extra") or {}).get("config") if isinstance(state.get("extra"), dict) else None
        theirs = ""
        if isinstance(saved, dict) and saved.get("pretrained"):
            theirs = (f": the checkpoint holds the model of a run started from --pretrained "
                      f"{saved['pretrained']!r} (pass it again to resume)")
        elif isinstance(saved, dict) and saved.get("model"):
            theirs = (f": the checkpoint holds model {saved['model']!r}"
                      + (f" with overrides {saved['model_overrides']}" if saved.get("model_overrides") else "")
                      + (f", loss {saved['loss']!r}" if saved.get("loss") else ""))
        raise CheckpointError(f"{path}: the checkpoint's model does not match this run's model{theirs} "
                              f"({why})") from None
    try:
        optimizer.load_state_dict(state["optimizer"])
        _check_optimizer_state(optimizer)
        _match_strides(optimizer)
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
            _check_scheduler_state(scheduler)
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
    except (KeyError, ValueError, TypeError, RuntimeError, AttributeError, IndexError, OverflowError) as e:
        raise CheckpointError(f"{path}: corrupt optimizer/scheduler/RNG state in the checkpoint "
                              f"({type(e).__name__}: {e})") from None
    return state


def convert_legacy_checkpoint(path: str, out: Optional[str] = None) -> str:
    """Convert a training checkpoint in fastclip's earlier format (``step_<N>.pt``, a
    ``torch.save`` pickle) to the current format, next to it (``step_<N>.safetensors``) or at ``out``; returns the new
    path. The old file is read with ``torch.load(weights_only=True)``, which builds tensors and
    plain containers only, with exactly the numpy types of the numpy RNG state allowed: a file
    that holds anything else fails to load instead of running code."""
    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the path
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{path}: cannot be read as a training checkpoint of the earlier pickle format "
                              f"({type(e).__name__}: {first[0] if first else ''})") from None
    need = ("step", "model", "optimizer", "scheduler", "rng")
    if not isinstance(state, dict) or any(k not in state for k in need):
        raise CheckpointError(f"{path}: not a training checkpoint of the earlier pickle format "
                              f"(expected the entries {list(need)})")
    state = {k: state.get(k) for k in (*need, "scaler", "extra")}
    state["extra"] = state["extra"] or {}
    tensors: Dict[str, torch.Tensor] = {}
    encoded = _encode(state, "", tensors, set())
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "state": json.dumps(encoded)}
    if out is None:
        out = re.sub(r"\.pt$", "", path) + ".safetensors"
    atomic_write(out, lambda tmp: save_safetensors(tensors, tmp, meta), suffix=".safetensors")
    return out
