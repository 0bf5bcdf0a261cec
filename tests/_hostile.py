"""Hostile files for the loader tests: each one, if executed, creates the file ``marker``.

A test passes one to a loader and then checks that ``marker`` does not exist; the files are
built so that executing them is certain to create it (tests/models/test_openai_weights.py runs
the TorchScript one through torch.jit.load to show that).
"""
import os
import pickle
import struct
import zipfile
from typing import Tuple

import torch


class _CreatesFile:
    """Unpickling this object calls ``open(path, "w")``, which creates ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def write_malicious_pickle(dest, marker, wrap=True):
    """A ``torch.save`` file whose unpickling creates ``marker``; ``wrap``: inside a dict shaped
    like a fastclip 0.1 training checkpoint, so that a loader reaches it the way it reaches
    real state."""
    obj = _CreatesFile(marker)
    torch.save({"step": 5, "model": obj, "optimizer": {}, "scheduler": {}, "rng": {}} if wrap else obj, str(dest))


class _SetstateWritesFile(torch.nn.Module):
    """A TorchScript module whose ``__setstate__`` (run by torch.jit.load) writes ``path``
    through ``torch.from_file(..., shared=True)``. The result feeds ``self.w`` so that the call
    is not removed as dead code."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.w = torch.nn.Parameter(torch.zeros(2))

    @torch.jit.export
    def __getstate__(self) -> Tuple[str, torch.Tensor, bool]:
        return (self.path, self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: Tuple[str, torch.Tensor, bool]) -> None:
        self.path = state[0]
        self.training = state[2]
        x = torch.from_file(self.path, shared=True, size=2)
        x.fill_(65.0)
        self.w = state[1] + x * 0.0

    def forward(self, x):
        return x + self.w


def write_malicious_torchscript(dest, marker):
    """A TorchScript archive that creates ``marker`` when ``torch.jit.load`` loads it."""
    torch.jit.save(torch.jit.script(_SetstateWritesFile(str(marker))), str(dest))


def write_torchscript_with_foreign_global(dest, marker):
    """A zip with a TorchScript archive's layout whose data.pkl calls ``os.system`` (``touch
    marker``): only an unpickler that resolves any global would run it."""
    payload = pickle.dumps(_Call(os.system, (f"touch {marker}",)), protocol=2)
    with zipfile.ZipFile(str(dest), "w") as z:
        z.writestr("evil/data.pkl", payload)
        z.writestr("evil/code/__torch__.py", "class Evil(Module):\n  __parameters__ = []\n  __buffers__ = []\n")
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/version", "3\n")


class _Call:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


# Raw pickle opcodes (protocol 2), for archives no torch API would write.
def _g(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _u(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _i(n):
    return b"J" + struct.pack("<i", n)


def _tensor(key, numel):
    """A 1-D float tensor over the storage record ``key`` (torch._utils._rebuild_tensor_v2)."""
    storage = b"(" + _u("storage") + _g("torch", "FloatStorage") + _u(key) + _u("cpu") + _i(numel) + b"tQ"
    return (_g("torch._utils", "_rebuild_tensor_v2") + b"(" + storage + _i(0) + b"(" + _i(numel) + b"t("
            + _i(1) + b"t\x88" + _g("collections", "OrderedDict") + b")Rt" + b"R")


def _module(qualname, items):
    """A TorchScript object of class ``qualname`` whose state dict holds the pickled ``items``."""
    module, _, name = qualname.rpartition(".")
    return _g(module, name) + b")\x81}(" + items + b"ub"


def _archive(dest, pkl, records):
    with zipfile.ZipFile(str(dest), "w") as z:
        z.writestr("evil/data.pkl", b"\x80\x02" + pkl + b".")
        for key, data in records.items():
            z.writestr(f"evil/data/{key}", data)
        z.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("evil/version", "3\n")


def write_torchscript_dag(dest, depth):
    """A few KB whose module tree has 2**depth paths: level k holds level k-1 twice (the pickle's
    memo), with one tensor at the bottom. A reader that walks it as a tree never finishes."""
    pkl = _module("__torch__.L0", _u("w") + _tensor("0", 1)) + b"q\x00"
    for k in range(1, depth + 1):
        pkl += _module(f"__torch__.L{k}", _u("a") + b"h" + bytes([k - 1]) + _u("b") + b"h" + bytes([k - 1]))
        pkl += b"q" + bytes([k])
    _archive(dest, pkl, {"0": struct.pack("<f", 1.0)})


def write_torchscript_tensor_build(dest):
    """An archive whose pickle sets the state of a tensor (BUILD): torch's ``Tensor.__setstate__``
    would resize the tensor's storage to whatever the file says."""
    pkl = _module("__torch__.M", _u("w") + _tensor("0", 1) + b"(" + b"t" + b"b")
    _archive(dest, pkl, {"0": struct.pack("<f", 1.0)})
