"""The ``cuda`` backend (kernels in csrc/contrastive_loss/cuda): being written (issue 7)."""

from . import Backend, register_backend


def _availability():
    return False, "the cuda backend is not built yet"


def _missing(*a, **k):
    raise RuntimeError("cuda backend unavailable")


register_backend(Backend(name="cuda", devices=("cuda",), availability=_availability,
                         fwd=_missing, bwd=_missing))
