"""Loads the compiled extension ``fastclip._C`` once, remembering why it failed.

The extension is built without torch (design.md §4): it takes raw pointers, sizes,
strides and, for CUDA, the caller's stream. Importing it makes no CUDA call.
"""

from __future__ import annotations

_C = None
_ERROR = ""

try:
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as e:  # pragma: no cover - depends on the build
    _ERROR = (f"the compiled extension fastclip._C did not import ({e}); build it with "
              f"`pip install .` from a source checkout (needs a C++ compiler and CMake)")


def extension():
    """The ``_C`` module, or None when it is not built; see :func:`extension_error`."""
    return _C


def extension_error() -> str:
    return _ERROR
