"""The ``reference`` backend: chunked plain PyTorch, any device, any float dtype."""

from .. import reference as _ref
from . import Backend, register_backend

register_backend(Backend(
    name="reference",
    devices=("cpu", "cuda"),
    availability=lambda: (True, ""),
    fwd=_ref.block_fwd,
    bwd=_ref.block_bwd,
))
