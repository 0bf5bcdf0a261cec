"""Test-wide setup: no CUDA calls at import or collection time.

Triton kernels run under the interpreter when this machine has no NVIDIA device.
TRITON_INTERPRET must be in the environment before any ``@triton.jit`` runs, so it is
set here, before a test module imports fastclip's Triton kernels (pitfalls.md). The
check looks for the device file; it does not touch the CUDA driver.
"""

import os

if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
