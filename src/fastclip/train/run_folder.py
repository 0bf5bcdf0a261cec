"""A run folder (``--output``) holds one run.

Two runs in one folder mix: the checkpoint pruning of one deletes the other's checkpoints,
``--resume latest`` picks whichever step number is higher, and ``metrics.jsonl`` interleaves
both. ``prepare_run_folder`` therefore refuses a folder that already holds a run unless the run
is continued (``--resume``) or explicitly replaced (``--overwrite``: fastclip's files of the old
run are deleted, ``fastclip eval`` results about its model included, nothing else), refuses a
folder inside another run's checkpoints folder, and removes the temporary files that a run killed while writing
a checkpoint or the model left behind (``.tmp-*``, as large as a checkpoint). On resume,
``truncate_metrics`` drops the ``metrics.jsonl`` rows of the steps after the checkpoint, which
the resumed run trains (and logs) again.
"""
from __future__ import annotations

import glob
import json
import os
import re
import time
from typing import Callable, List, Optional

from .._fileio import TMP_PREFIX, atomic_write, path_inside
from .checkpoint import CKPT_DIR

# The files a run writes into its folder (plus checkpoints/step_*).
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.json", "model.safetensors", "curves.png")


class RunFolderError(ValueError):
    """``--output`` holds another run and neither ``--resume`` nor ``--overwrite`` was given."""


SUPERSEDED = "superseded-after-"


def run_files(output_dir: str) -> List[str]:
    """The files of a fastclip run in ``output_dir`` (its outputs and checkpoints, old-format
    ``step_*.pt`` included)."""
    found = [os.path.join(output_dir, n) for n in RUN_FILES if os.path.isfile(os.path.join(output_dir, n))]
    ck = os.path.join(glob.escape(output_dir), CKPT_DIR)
    found += sorted(glob.glob(os.path.join(ck, "step_*.safetensors")) + glob.glob(os.path.join(ck, "step_*.pt")))
    # What a resume from an earlier step set aside (set_aside_later_steps).
    aside = os.path.join(ck, SUPERSEDED + "*")
    found += sorted(glob.glob(os.path.join(aside, "step_*.safetensors"))
                    + [p for n in RUN_FILES for p in glob.glob(os.path.join(aside, n))])
    return found


def fresh_run_folder(root: str = "runs") -> str:
    """The default ``--output``: ``<root>/<date>-<time>``, or ``-2``, ``-3``, ... after it when
    that is taken; claimed by creating it, so that runs started in the same second (a sweep
    launched in a loop) get one folder each."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(root, exist_ok=True)
    k = 1
    while True:
        path = os.path.join(root, stamp if k == 1 else f"{stamp}-{k}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            k += 1


def finished_steps(output_dir: str) -> Optional[int]:
    """The ``steps`` a finished run's ``metrics.json`` records; None when there is none (only a
    regular file is read: a FIFO of that name would block) or it does not say."""
    steps = _json_object(os.path.join(output_dir, "metrics.json")).get("steps")
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def _json_object(path: str) -> dict:
    """The JSON object in the regular file ``path`` (a FIFO of that name would block);
    empty when there is none, it does not parse, or it is not an object."""
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError, RecursionError):
        pass
    return {}


# safetensors' save_file writes its own ``.tmpXXXXXX`` beside the file and renames it: a kill
# during a checkpoint or model write left one, as large as the file, that ``.tmp-*`` missed.
_SAFETENSORS_TMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def stale_temporaries(output_dir: str) -> List[str]:
    """Temporary files of interrupted atomic writes: ``checkpoints/.tmp-*``, the model's and
    ``config.json``'s ``.tmp-*`` in the folder itself, and safetensors' own ``.tmpXXXXXX`` in
    either."""
    d = glob.escape(output_dir)
    found = (glob.glob(os.path.join(d, CKPT_DIR, TMP_PREFIX + "*"))
             + glob.glob(os.path.join(d, TMP_PREFIX + "*.safetensors"))
             + glob.glob(os.path.join(d, TMP_PREFIX + "*.json")))
    for folder in (output_dir, os.path.join(output_dir, CKPT_DIR)):
        found += [os.path.join(folder, n) for n in _listdir(folder)
                  if _SAFETENSORS_TMP.fullmatch(n) and os.path.isfile(os.path.join(folder, n))]
    return sorted(set(found))


def _listdir(folder: str) -> List[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


class RunFolderLock:
    """An exclusive lock on a run folder while a run writes into it (``flock`` on the folder
    itself, so that nothing is added to it; released when the process ends, however it ends).
    A second ``fastclip train --resume latest`` on a live run removed the first one's
    checkpoint in flight as a stale temporary, moved its newer checkpoints aside and
    interleaved both runs' metrics. Where ``fcntl`` is missing the lock is a no-op."""

    def __init__(self, output_dir: str):
        self.output_dir, self.fd = output_dir, None

    def acquire(self) -> "RunFolderLock":
        try:
            import fcntl
        except ImportError:     # (not a POSIX system)
            return self
        fd = os.open(self.output_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunFolderError(f"another fastclip train is running in {self.output_dir} (it holds the "
                                 f"folder): wait for it to end or stop it, or choose another --output") from None
        except OSError:         # a file system without locks: run as before
            os.close(fd)
            return self
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)       # (closing the descriptor releases the lock)
            self.fd = None

    def __enter__(self) -> "RunFolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_running(output_dir: str) -> None:
    """RunFolderError now, before anything is built, when another run holds ``output_dir``."""
    if os.path.isdir(output_dir):
        with RunFolderLock(output_dir):
            pass


def _is_run_config(path: str) -> bool:
    """``config.json`` as ``fastclip train`` writes it (a "train" section), not another tool's
    (a Hugging Face model folder has one too)."""
    return isinstance(_json_object(path).get("train"), dict)


def _holds_run(folder: str) -> bool:
    """Whether ``folder`` is a run's folder: a ``config.json`` of ``fastclip train``, or a
    training checkpoint of fastclip's (its metadata says so: another tool's
    ``checkpoints/step_*`` in a folder above does not make every run below it refused)."""
    if _is_run_config(os.path.join(folder, "config.json")):
        return True
    from .checkpoint import saved_run_config
    ck = os.path.join(glob.escape(folder), CKPT_DIR)
    return any(saved_run_config(p) is not None for p in sorted(glob.glob(os.path.join(ck, "step_*.safetensors")))[:3])


def enclosing_run(output_dir: str) -> Optional[str]:
    """The run whose ``checkpoints`` folder ``output_dir`` is or lies inside (links resolved),
    or None. A run there mixes with it: the outer run's ``--overwrite``, checkpoint pruning and
    ``--resume latest`` reach the files in its checkpoints folder (the inner run's
    ``checkpoints/step_*`` and the run files a resume sets aside there). Elsewhere below a run
    folder nothing of the outer run reaches (and a project's own ``config.json`` above is no
    reason to refuse)."""
    path = os.path.realpath(output_dir)
    while True:
        parent = os.path.dirname(path)
        if parent == path:
            return None
        if os.path.basename(path) == CKPT_DIR and _holds_run(parent):
            return parent
        path = parent


def _evaluations_of(output_dir: str, models: Optional[List[str]] = None) -> List[str]:
    """The JSON files ``fastclip eval --output`` wrote into ``output_dir`` (top level) about a
    model of this folder: its ``model.safetensors`` or a checkpoint (or only those in ``models``).
    The recorded path is resolved from the current folder; a relative one that names no file
    from there (it was recorded elsewhere) still counts when it names this folder's file from
    inside it or by the folder's name (``model.safetensors``, ``checkpoints/step_*``,
    ``<name>/model.safetensors``, ``<name>/checkpoints/step_*``; the name as given or with
    links resolved)."""
    here = os.path.realpath(output_dir)
    wanted = None if models is None else {os.path.realpath(m) for m in models}
    found = []
    for p, src in _evaluations_in(output_dir):
        real = os.path.realpath(src)
        if not real.startswith(here + os.sep) and not os.path.isabs(src) and not os.path.exists(real):
            # Recorded from another folder: it names this run's file only as <this folder's
            # name>/model.safetensors or <name>/checkpoints/step_* (runs/b/model.safetensors
            # is run b's, whatever folder it was typed in).
            # A path typed inside the folder (model.safetensors, checkpoints/step_*) is its own.
            tail = os.path.normpath(src).split(os.sep)
            names = {os.path.basename(here), os.path.basename(os.path.normpath(os.path.abspath(output_dir)))}
            if tail[-1] == "model.safetensors" and (len(tail) == 1 or tail[-2] in names):
                real = os.path.join(here, tail[-1])
            elif len(tail) >= 2 and tail[-2] == CKPT_DIR and (len(tail) == 2 or tail[-3] in names):
                real = os.path.join(here, *tail[-2:])
        if real.startswith(here + os.sep) and (wanted is None or real in wanted):
            found.append(p)
    return found


def _evaluations_in(folder: str) -> List[tuple]:
    """``(path, recorded model file)`` of each ``fastclip eval --output`` JSON in ``folder``."""
    found = []
    for name in sorted(_listdir(folder)):
        p = os.path.join(folder, name)
        if not name.endswith(".json") or name in RUN_FILES or not os.path.isfile(p):
            continue
        d = _json_object(p)
        src = d.get("model_file")
        if isinstance(src, str) and src and isinstance(d.get("metrics"), dict) and "config" in d:
            found.append((p, src))
    return found


def check_run_folder(output_dir: str, resume: Optional[str], overwrite: bool) -> List[str]:
    """Whether a run may start in ``output_dir``; deletes nothing. Raises ``RunFolderError``
    when it holds a run and neither ``resume`` nor ``overwrite`` is set (or both are), or
    when it lies inside another run's folder. Returns the old run's files that ``overwrite``
    will replace (none otherwise), the evaluations of its model included."""
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite exclude each other: --resume continues the run in "
                             f"{output_dir}, --overwrite deletes it")
    outer = enclosing_run(output_dir)
    if outer is not None:
        raise RunFolderError(f"--output {output_dir} is inside the checkpoints folder of another run, {outer}: "
                             f"the two runs' files would mix (that run's --overwrite, checkpoint pruning and "
                             f"--resume latest reach the files there); choose a folder outside it")
    existing = run_files(output_dir) if os.path.isdir(output_dir) else []
    names = ", ".join(os.path.relpath(p, output_dir) for p in existing[:4]) + (", ..." if len(existing) > 4 else "")
    if existing and not resume and not overwrite:
        raise RunFolderError(f"{output_dir} already holds a run ({names}); "
                             f"pass --resume latest to continue it, --overwrite to replace it, or choose "
                             f"another --output")
    cfg = os.path.join(output_dir, "config.json")
    if existing and overwrite and os.path.isfile(cfg) and not _is_run_config(cfg):
        raise RunFolderError(f"--overwrite: {cfg} is not a fastclip run's (no \"train\" section): "
                             f"{output_dir} holds something else, which --overwrite would delete; "
                             f"choose another --output")
    if existing and resume:
        # --resume continues the run in this folder: from one of its own checkpoints.
        own = os.path.realpath(os.path.join(output_dir, CKPT_DIR))
        if resume == "latest" and not any(os.path.realpath(os.path.dirname(p)) == own for p in existing):
            train = _json_object(cfg).get("train")
            every = train.get("save_every") if isinstance(train, dict) else None
            why = (f"it stopped before its first checkpoint, due at step {every}"
                   if isinstance(every, int) and not isinstance(every, bool) and every > 0
                   else "it was trained without --save-every")
            raise RunFolderError(f"--resume latest: {output_dir} holds a run ({names}) but no checkpoint to "
                                 f"continue it from ({why}); choose another --output, or --overwrite to "
                                 f"replace it")
        here = os.path.realpath(os.path.dirname(resume))
        if resume != "latest" and here == os.path.realpath(output_dir):
            # (it was called "a checkpoint of another run", and an empty --output then got the
            # real reason)
            raise RunFolderError(f"--resume {resume}: a file of the run in {output_dir} itself, not one of its "
                                 f"training checkpoints (those are in {os.path.join(output_dir, CKPT_DIR)}); "
                                 f"--resume latest continues the run from its newest one, and --pretrained "
                                 f"{resume} with another --output starts a new run from the model")
        if (resume != "latest" and here != own
                and not (os.path.dirname(here) == own and os.path.basename(here).startswith(SUPERSEDED))):
            raise RunFolderError(f"--resume {resume}: a checkpoint of another run, while {output_dir} already "
                                 f"holds a run ({names}); resuming there would mix the two runs' files: "
                                 f"choose an empty --output")
    if existing and not resume:
        # `fastclip eval RUN --output RUN/eval.json` results about the old model would stay
        # beside the new one, describing a model that no longer exists.
        # Those a resume set aside with the checkpoints they describe go too.
        aside = glob.glob(os.path.join(glob.escape(output_dir), CKPT_DIR, SUPERSEDED + "*"))
        return existing + _evaluations_of(output_dir) + [p for d in sorted(aside) for p, _ in _evaluations_in(d)]
    return []


def prepare_run_folder(output_dir: str, resume: Optional[str], overwrite: bool,
                       log: Callable[[str], None] = print) -> None:
    """Check and tidy ``output_dir`` right before a run starts writing (main rank only).

    Raises as :func:`check_run_folder`. With ``overwrite`` (and no ``resume``) the old run's
    files are deleted: the trainer calls this only once everything that can fail on the
    user's input (data, evaluation sets, model, checkpoint) has been built, and
    :func:`check_run_folder` first, so that a failing command leaves the old run as it was.
    Stale temporaries are removed in every case.
    """
    existing = check_run_folder(output_dir, resume, overwrite)
    if existing:
        for p in existing:
            os.unlink(p)
        # The checkpoint folders the deleted files leave empty go too, innermost first (a
        # folder holding anything else stays, and so does a link to a folder).
        ck = os.path.join(output_dir, CKPT_DIR)
        for d in sorted({os.path.dirname(p) for p in existing}, key=len, reverse=True) + [ck]:
            if (path_inside(d, ck) and os.path.isdir(d) and not os.path.islink(d)
                    and not os.listdir(d)):
                os.rmdir(d)
        log(f"--overwrite: deleted the previous run's {len(existing)} file(s) in {output_dir}")
    stale = stale_temporaries(output_dir) if os.path.isdir(output_dir) else []
    if stale:
        size = sum(os.path.getsize(p) for p in stale)
        for p in stale:
            os.unlink(p)
        log(f"removed {len(stale)} temporary file(s) ({size / 2 ** 20:.1f} MiB) left by an interrupted write "
            f"in {output_dir}")


# What a finished run leaves beside its checkpoints: its final model and results.
FINAL_FILES = ("model.safetensors", "metrics.json", "curves.png")


def set_aside_later_steps(output_dir: str, step: int) -> Optional[str]:
    """A run resumed from an earlier checkpoint than its newest starts a new timeline: move
    what the abandoned one made after ``step`` into ``checkpoints/superseded-after-<step>[-k]/``,
    kept, not deleted: its later checkpoints (so that a later ``--resume latest`` continues
    this timeline rather than jumping back onto the old one) and, when it had finished past
    ``step``, its final model and results (so that ``fastclip eval`` of the folder does not
    take the abandoned run's model for this one's). Returns that folder, or None when there
    was nothing to move."""
    from .checkpoint import list_checkpoints
    later = [p for k, p in list_checkpoints(output_dir) if k > step]
    done = finished_steps(output_dir)
    if done is not None and done > step:
        later += [p for p in (os.path.join(output_dir, n) for n in FINAL_FILES) if os.path.isfile(p)]
    later += _evaluations_of(output_dir, later)     # results about what goes aside go with it
    if not later:
        return None
    base = os.path.join(output_dir, CKPT_DIR, f"{SUPERSEDED}{step:08d}")
    dest, k = base, 1
    while os.path.exists(dest):
        k += 1
        dest = f"{base}-{k}"
    os.makedirs(dest)
    for p in later:
        os.replace(p, os.path.join(dest, os.path.basename(p)))
    return dest


def truncate_metrics(path: str, step: int, evals_at_step: bool = True) -> int:
    """Keep the rows of ``metrics.jsonl`` at ``path`` up to ``step`` (train and eval rows with
    ``"step" <= step``; eval rows at ``step`` itself only with ``evals_at_step``, False when the
    run evaluates that step again); drop later rows, ``final`` rows and torn lines (a kill
    mid-write). Returns the number of rows dropped; the file is rewritten atomically."""
    if not os.path.isfile(path):
        return 0
    kept, dropped = [], 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                dropped += 1
                continue
            s = row.get("step") if isinstance(row, dict) else None
            again = not evals_at_step and s == step and row.get("type") == "eval"
            if isinstance(s, int) and s <= step and row.get("type") != "final" and not again:
                kept.append(line if line.endswith("\n") else line + "\n")
            else:
                dropped += 1
    if dropped:
        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(kept)
        atomic_write(path, write)
    return dropped
