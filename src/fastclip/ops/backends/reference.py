"""The ``reference`` backend: chunked plain PyTorch, any device, any float dtype, every loss.

The last fallback of ``auto`` (lowest priority) and, in float64, the oracle of the kernels.
"""

from .. import reference as _ref
from ..losses import LOSSES
from . import ALL_DTYPES, Backend, register_backend

register_backend(Backend(
    name="reference", code=0, devices=("cpu", "cuda", "meta"), dtypes=ALL_DTYPES,
    priority=0,
    availability=lambda: (True, ""),
    fwd=_ref.block_fwd, bwd=_ref.block_bwd, fwd_bwd=_ref.block_fwd_bwd,
    losses=tuple(LOSSES),
    # its chunked form: at most six tiles of 2^24 accumulator elements at a time
    scratch_bytes=lambda n, m, d, acc: 6 * min(1 << 24, n * m) * acc,
))
