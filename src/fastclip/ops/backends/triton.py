"""The ``triton`` backend (kernels in fastclip/ops/triton/): being written (issue 3)."""

from . import Backend, register_backend


def _availability():
    return False, "the triton backend is not built yet"


def _missing(*a, **k):
    raise RuntimeError("triton backend unavailable")


register_backend(Backend(name="triton", devices=("cuda",), availability=_availability,
                         fwd=_missing, bwd=_missing))
