"""Atomic file writes that leave files with the permissions of any other file the user creates.

``atomic_write(path, write)`` lets ``write`` fill a temporary file in the destination folder,
flushes it to disk and moves it into place with ``os.replace`` (atomic on POSIX): a process
killed at any moment leaves either the old file or the new one, never a torn one.

``tempfile.mkstemp`` creates its file with mode 0600, and ``safetensors``' own writer does the
same; renamed into place, such a file would be unreadable to the user's group where a plain
``open(path, "w")`` honours the umask (0644 under the common umask 022). The mode is therefore
set to ``0o666 & ~umask`` before the rename, and a file that is replaced keeps its own mode, as
it would under ``open(path, "w")`` (a private 0600 checkpoint stays private); a file the user
may not write is refused with the ``PermissionError`` that ``open`` would raise, where a rename
(which needs only the folder's permission) would replace it.
"""
from __future__ import annotations

import errno
import math
import os
import stat
import tempfile
from typing import Callable, Optional

TMP_PREFIX = ".tmp-"


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (``os.umask`` can only
    be read by setting it, which for a moment would apply to files other threads create)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666 & ~umask``."""
    return 0o666 & ~current_umask()


def names_folder(path: str) -> bool:
    """Whether ``path`` is a folder or a name ending in a path separator ("new/"): no file
    can be written under that name (``realpath`` would drop the separator)."""
    return os.path.isdir(path) or path.endswith(tuple(filter(None, (os.sep, os.altsep))))


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Write ``path`` atomically: ``write(tmp_path)`` fills a temporary file named
    ``.tmp-*<suffix>`` in the same folder (created with its missing parents), which is then fsync'ed, given the
    umask's mode (an existing file's own mode) and renamed to ``path``. The temporary file is removed if anything fails.

    A symbolic link is followed (its target is replaced, the link stays), and a path that
    exists but is not a regular file (``/dev/null``, a FIFO, ``/dev/stdout`` on a pipe) is
    written in place, as ``open(path, "w")`` would: a rename would replace the device node or
    the link itself. A folder, or a name ending in a separator, is an ``IsADirectoryError``."""
    if names_folder(path):
        # As open(path, "w") says; the folder was written into as a file (a safetensors
        # error naming no path), and "new/" became a file named "new" (realpath drops the "/").
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR) + " (a file name is needed)", path)
    if os.path.exists(path) and not os.path.isfile(path):
        # Through the given name: /dev/stdout on a pipe resolves to "/proc/…/fd/pipe:[…]",
        # which no open() can reach.
        write(path)
        return
    path = os.path.realpath(path)
    mode = default_file_mode()
    if os.path.isfile(path):
        if not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        mode = stat.S_IMODE(os.stat(path).st_mode)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=d)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# The safetensors metadata "format" of a training checkpoint (fastclip.train.checkpoint), which
# the model loaders recognise to say what such a file is.
TRAINING_FORMAT = "fastclip-training-state"


def checkpoint_file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as a checkpoint file ("no such checkpoint file", "cannot read
    the checkpoint file (Permission denied)"), or None. Readers check it first: safetensors
    reports every failure to open a file as "No such file or directory", which sent users
    looking for a file that is there."""
    if os.path.isdir(path):
        # (a run folder: "no such checkpoint file" sent users looking for a file that is there)
        return "a folder, not a checkpoint file"
    if not os.path.isfile(path):
        # a FIFO, device or socket exists: "no such file" sent users looking for it
        return "not a regular file (a device, pipe or socket)" if os.path.exists(path) else "no such checkpoint file"
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return f"cannot read the checkpoint file ({e.strerror or type(e).__name__})"


def path_inside(path: str, folder: Optional[str]) -> bool:
    """Whether ``path`` is the folder ``folder`` or lies under it, links resolved (False when
    ``folder`` is unset or not a folder)."""
    if not folder or not os.path.isdir(folder):
        return False
    folder = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), folder]) == folder


def writable_dir_problem(path: str) -> str:
    """Why ``path`` cannot serve as an output folder ("" when it can): it exists and is not a
    directory, or it cannot be created or written. Creates it, and writes and removes a probe
    file (which catches read-only file systems, where ``os.access`` may not)."""
    if os.path.exists(path) and not os.path.isdir(path):
        return "exists and is not a directory"
    if os.path.islink(path) and not os.path.exists(path):
        return f"a symbolic link to {os.readlink(path)!r}, which does not exist"
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        return f"cannot write there ({e.strerror or e})"
    return ""


def strict_json(obj):
    """``obj`` with every non-finite float (a NaN val loss, a diverged run's loss) as None, so
    that ``json.dumps`` writes ``null``: its default writes a bare ``NaN``, which is not JSON
    (Python's strict parsers, JavaScript's ``JSON.parse`` and Go refuse the file)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file`` with a reproducible header: the same tensors and
    metadata give the same bytes in every process. safetensors writes its header's JSON maps
    in hash-map order, which changes from process to process (two demo runs with bit-equal
    weights wrote files whose ``fastclip_step`` and ``format`` keys had swapped places, so a
    checksum told them apart). The header is rewritten in place, keys sorted, in the same
    compact form; the tensors' bytes and offsets are untouched (they are relative to the end of
    the header, whose length stays). A path that is not a regular file is written as it is."""
    import json  # noqa: PLC0415

    from safetensors.torch import save_file  # noqa: PLC0415
    save_file(tensors, path, metadata=metadata)
    if not os.path.isfile(path):
        return
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = f.read(n)
        canon = json.dumps(json.loads(header), sort_keys=True, separators=(",", ":"),
                           ensure_ascii=False).encode()
        if len(canon) <= n:     # (always, for safetensors' own compact JSON; else left as is)
            f.seek(8)
            f.write(canon + b" " * (n - len(canon)))   # the format pads its header with spaces
