"""Loads the compiled extension ``fastclip._C`` once, remembering why it failed.

The extension is built without torch (docs/design.md §4): it takes raw pointers, sizes,
strides and, for CUDA, the caller's stream. Importing it makes no CUDA call.

OpenMP: built with GCC, ``_C`` is not linked to an OpenMP runtime (CMakeLists.txt). Its
``GOMP_*``/``omp_*`` references bind to the ``libgomp.so.1`` that torch has loaded (torch's
Linux wheels ship one in ``torch/lib``), so the process holds one OpenMP runtime and one
thread pool. That library is made global here before ``_C`` is imported.
"""

from __future__ import annotations

import ctypes
import os

import torch

_C = None
_ERROR = ""
_GOMP = "libgomp.so.1"


def _share_openmp_runtime() -> str:
    """Make the process's libgomp visible to later ``dlopen`` calls; '' or why it failed.

    First the copy already loaded (RTLD_NOLOAD: torch's, found by path or by soname),
    else the system's. RTLD_GLOBAL on an already loaded library only widens its scope.
    """
    flags = os.RTLD_GLOBAL | os.RTLD_NOW
    for name in (os.path.join(os.path.dirname(torch.__file__), "lib", _GOMP), _GOMP):
        try:
            ctypes.CDLL(name, mode=flags | os.RTLD_NOLOAD)
            return ""
        except OSError:
            pass
    try:
        ctypes.CDLL(_GOMP, mode=flags)
        return ""
    except OSError as e:
        return (f"the GNU OpenMP runtime {_GOMP} is not loaded by torch and not installed "
                f"({e})")


_OMP_ERROR = _share_openmp_runtime()

try:
    from . import _C  # type: ignore[attr-defined,no-redef]
except ImportError as e:  # pragma: no cover - depends on the build
    _ERROR = (f"the compiled extension fastclip._C did not import ({e}"
              f"{'; ' + _OMP_ERROR if _OMP_ERROR else ''}); reinstall the wheel "
              f"(`pip install --force-reinstall --no-deps fastclip-fused`; without --no-deps pip "
              f"also replaces torch with its newest build) or build it from a source checkout with "
              f"`pip install .` (needs a C++ compiler and CMake)")


def extension():
    """The ``_C`` module, or None when it is not built; see :func:`extension_error`."""
    return _C


def extension_error() -> str:
    return _ERROR
