"""Read the weights of a TorchScript archive without running any of its code.

``torch.jit.load`` executes an archive: it compiles the TorchScript in ``code/`` and calls the
``__setstate__`` methods the archive defines, which can do anything TorchScript can (e.g.
``torch.from_file(path, shared=True)`` writes files). The weights do not need any of that. An
archive (``torch.jit.save``, e.g. OpenAI's CLIP checkpoints) is a zip file::

    <name>/data.pkl            the module tree, pickled (protocol 2)
    <name>/data/<key>          one raw little-endian record per tensor storage
    <name>/code/__torch__/...  the TorchScript source of every class
    <name>/constants.pkl, <name>/version, ...

``read_torchscript_state_dict`` unpickles ``data.pkl`` with an unpickler whose globals are an
allow-list of data constructors: ``collections.OrderedDict``, tensors rebuilt from storage
records (fastclip's own rebuild function, not torch's), the storage dtype markers and the
TorchScript list builders. A TorchScript class (``__torch__.*``) becomes an inert record of its
pickled state; nothing it defines is called. Any other global fails the read. Which attributes
are parameters and buffers is read as text from the ``__parameters__`` / ``__buffers__`` lines
of the class source (``code/``), never compiled, so the result equals
``torch.jit.load(path).state_dict()`` (tests/models/test_openai_weights.py).
"""
from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile
from typing import Any, Dict, List, Optional, Tuple

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_MAX_DEPTH = 256  # module nesting; CLIP's deepest path is ~6
_MAX_MODULES = 100_000  # module paths walked; OpenAI's ViT-L/14 has ~650


class TorchScriptReadError(ValueError):
    """The archive cannot be read as weights (a global outside the allow-list, a missing or
    inconsistent record, a malformed pickle)."""


class _StorageType:
    """Stands for ``torch.<Type>Storage`` in a storage's persistent id: only its dtype is used."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class ScriptObject:
    """An object of a TorchScript class, as pickled: ``qualname`` and ``state`` (what its
    ``__getstate__`` returned, or the dict of its attributes). Inert: no method of the class
    is ever run."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:  # called by pickle's BUILD
        self.__dict__["state"] = state


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """``torch._utils._rebuild_tensor_v2`` for a storage given as a flat tensor: a view with the
    given geometry (checked against the storage bounds by ``as_strided``)."""
    if not isinstance(storage, torch.Tensor):
        raise TorchScriptReadError(f"a tensor refers to {type(storage).__name__}, not a storage record")
    if not (isinstance(storage_offset, int) and all(isinstance(v, int) for v in (*size, *stride))):
        raise TorchScriptReadError("malformed tensor geometry")
    try:
        return storage.as_strided(tuple(size), tuple(stride), storage_offset)
    except RuntimeError as e:
        raise TorchScriptReadError(f"tensor of size {tuple(size)} does not fit its storage: {e}") from None


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _identity(x, *_):
    return x


# (module, name) -> the safe callable the unpickler hands back; storage types are added below.
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    # TorchScript's typed containers: build_intlist([1, 2]) -> [1, 2]; restore_type_tag(x, "List[int]") -> x
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler (the pure-Python one, so that BUILD can be restricted: the C
    unpickler calls any ``__setstate__`` the object has, and a tensor's resizes its storage)
    with the allow-list above as its only globals."""

    def __init__(self, data: bytes, read_record):
        super().__init__(io.BytesIO(data))
        self._read_record = read_record
        self._classes: Dict[str, type] = {}

    def load_build(self):
        # BUILD sets an object's state: allowed only on the inert ScriptObject records.
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, ScriptObject):
            raise TorchScriptReadError(f"the archive's pickle sets the state of a {type(inst).__name__}; only "
                                       f"TorchScript objects carry state")
        inst.__setstate__(state)

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qual = f"{module}.{name}"
            cls = self._classes.get(qual)
            if cls is None:
                cls = self._classes[qual] = type("ScriptObject", (ScriptObject,), {"qualname": qual})
            return cls
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        fn = _ALLOWED.get((module, name))
        if fn is None:
            raise TorchScriptReadError(f"the archive's pickle refers to {module}.{name}, which is not a "
                                       f"tensor, storage or container type")
        return fn

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and isinstance(pid[4], int)):
            raise TorchScriptReadError(f"unsupported persistent id {str(pid)[:80]}")
        return self._read_record(pid[2], pid[1].dtype, pid[4])


def _archive_prefix(names: List[str]) -> Optional[str]:
    """The top folder of a TorchScript archive (it has ``data.pkl`` and ``code/`` or
    ``constants.pkl``), or None when the zip is something else (e.g. a ``torch.save`` file)."""
    for n in names:
        if n.endswith("/data.pkl") and n.count("/") == 1:
            prefix = n[: -len("data.pkl")]
            if prefix + "constants.pkl" in names or any(m.startswith(prefix + "code/") for m in names):
                return prefix
    return None


def is_torchscript_archive(path: str) -> bool:
    """True when ``path`` is a zip with a TorchScript archive's layout (nothing is unpickled)."""
    try:
        with zipfile.ZipFile(path) as z:
            return _archive_prefix(z.namelist()) is not None
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


_CLASS_LINE = re.compile(r"class\s+(\w+)\s*\(\s*([\w.]*)\s*\)\s*:")
_LIST_LINE = re.compile(r"\s+(__parameters__|__buffers__)\s*=\s*\[(.*)\]\s*$")
_STRING = re.compile(r'"([^"\\]*)"')


def _class_specs(source: str) -> Dict[str, Tuple[bool, List[str], List[str]]]:
    """``{class name: (is a Module, parameter names, buffer names)}`` from TorchScript source, read
    line by line as text (the serializer writes ``class X(Module):`` then the two lists)."""
    specs: Dict[str, Tuple[bool, List[str], List[str]]] = {}
    current = None
    for line in source.splitlines():
        m = _CLASS_LINE.match(line)
        if m:
            current = m.group(1)
            specs[current] = (m.group(2) == "Module", [], [])
            continue
        m = _LIST_LINE.match(line)
        if m and current is not None:
            is_module, params, buffers = specs[current]
            (params if m.group(1) == "__parameters__" else buffers).extend(_STRING.findall(m.group(2)))
    return specs


# A compressed record may inflate beyond this only at a ratio real weights never reach.
_MAX_INFLATED, _MAX_RATIO = 64 << 20, 1000


def read_torchscript_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """The parameters and buffers of the TorchScript archive at ``path``, keyed as
    ``torch.jit.load(path).state_dict()`` would key them, as CPU tensors of their stored dtype.
    Executes nothing from the archive (see the module docstring).

    Raises ``TorchScriptReadError`` (a ``ValueError``) for a file that is not a TorchScript
    archive or cannot be read as one; the message does not repeat ``path``.
    """
    try:
        z = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise TorchScriptReadError(f"not a zip archive ({e})") from None
    with z:
        names = z.namelist()
        prefix = _archive_prefix(names)
        if prefix is None:
            raise TorchScriptReadError("not a TorchScript archive (no <name>/data.pkl with code/ or constants.pkl)")
        name_set = set(names)
        if prefix + "byteorder" in name_set and z.read(prefix + "byteorder").strip() not in (b"little", b""):
            raise TorchScriptReadError("big-endian archives are not supported")

        records: Dict[str, torch.Tensor] = {}

        def read_record(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
            if key in records:
                return records[key]
            member = f"{prefix}data/{key}"
            if member not in name_set:
                raise TorchScriptReadError(f"missing tensor record {member}")
            itemsize = torch.empty((), dtype=dtype).element_size()
            info = z.getinfo(member)
            if numel < 0 or info.file_size != numel * itemsize:
                raise TorchScriptReadError(f"record {member} holds {info.file_size} bytes, expected "
                                           f"{numel} x {itemsize}")
            if (info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_INFLATED
                    and info.file_size > _MAX_RATIO * max(1, info.compress_size)):
                # torch stores records uncompressed; an 8 MB archive of such records asked for
                # 3 GB of memory before it was refused
                raise TorchScriptReadError(f"record {member} inflates {info.compress_size} bytes to "
                                           f"{info.file_size}: not an archive as torch writes them")
            raw = bytearray(z.read(member))
            t = torch.frombuffer(raw, dtype=dtype) if numel else torch.empty(0, dtype=dtype)
            records[key] = t
            return t

        try:
            root = _Unpickler(z.read(prefix + "data.pkl"), read_record).load()
        except TorchScriptReadError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError,
                KeyError, RecursionError, RuntimeError, MemoryError, OverflowError, zipfile.BadZipFile,
                OSError) as e:
            raise TorchScriptReadError(f"malformed data.pkl ({type(e).__name__}: {e})") from None

        spec_cache: Dict[str, Dict[str, Tuple[bool, List[str], List[str]]]] = {}

        def spec(qualname: str) -> Optional[Tuple[bool, List[str], List[str]]]:
            module, _, cls = qualname.rpartition(".")
            member = prefix + "code/" + module.replace(".", "/") + ".py"
            if member not in spec_cache:
                try:
                    spec_cache[member] = _class_specs(z.read(member).decode("utf-8", errors="replace"))
                except KeyError:
                    spec_cache[member] = {}
            return spec_cache[member].get(cls)

        out: Dict[str, torch.Tensor] = {}

        visits = [0]

        def visit(obj: ScriptObject, key_prefix: str, depth: int) -> None:
            if depth > _MAX_DEPTH:
                raise TorchScriptReadError(f"modules nested deeper than {_MAX_DEPTH} levels")
            # The pickle's memo lets one object appear under many names: a few KB can describe
            # a tree of 2^40 paths. Counting visits bounds the walk whatever the file says.
            visits[0] += 1
            if visits[0] > _MAX_MODULES:
                raise TorchScriptReadError(f"more than {_MAX_MODULES} module paths (objects referenced from "
                                           f"many places): not a model's module tree")
            state = obj.__dict__.get("state")
            if not isinstance(state, dict):
                return  # a class with its own __getstate__: not a module's attribute dict
            s = spec(obj.qualname)
            if s is not None and not s[0]:
                return  # a TorchScript class that is not a Module holds no state_dict entries
            keep = None if s is None else set(s[1]) | set(s[2])  # no source: every tensor attribute
            for name, value in state.items():
                if not isinstance(name, str):
                    continue
                if isinstance(value, torch.Tensor):
                    if keep is None or name in keep:
                        # detach: a fresh tensor, whatever a BUILD in the pickle set on this one
                        out[key_prefix + name] = value.detach()
                elif isinstance(value, ScriptObject):
                    visit(value, f"{key_prefix}{name}.", depth + 1)

        if not isinstance(root, ScriptObject):
            raise TorchScriptReadError(f"data.pkl holds a {type(root).__name__}, not a TorchScript module")
        visit(root, "", 0)
    return out
