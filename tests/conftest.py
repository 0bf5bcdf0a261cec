"""Test-wide setup: no CUDA calls at import or collection time.

Triton kernels run under the interpreter when this machine has no NVIDIA device.
TRITON_INTERPRET must be in the environment before any ``@triton.jit`` runs, so it is set
here, before a test module imports fastclip's Triton kernels. The check looks for the
device file; it does not touch the CUDA driver.

GPU tests are marked ``gpu`` at collection, whatever way they ask for a GPU: a ``gpu``
fixture, or a ``backend`` parameter naming a backend of the registry that cannot run on
the CPU here (``pytest -m gpu`` then selects every GPU test of every backend). They skip
at run time, cleanly, where no GPU is usable.
"""

import os

import pytest

if not os.path.exists("/dev/nvidia0") and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _gpu_only_backends() -> set:
    from fastclip.ops.backends import all_backends  # imports no CUDA

    return {name for name, b in all_backends().items() if "cpu" not in b.devices}


def pytest_collection_modifyitems(config, items):
    gpu_only = _gpu_only_backends()
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "gpu" in getattr(item, "fixturenames", ()) or params.get("backend") in gpu_only:
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def matmul_flags():
    """``torch.backends.cuda.matmul`` for the test to set flags on (``allow_tf32``,
    ``allow_fp16_accumulation``), each restored afterwards. Not monkeypatch.setattr: pytest
    9.2 undoes an instance attribute by deleting it from the instance's ``__dict__``, and
    these flags live in PyTorch's C++ state, not there (the teardown fails)."""
    import torch  # noqa: PLC0415  (no torch import at collection)

    flags = torch.backends.cuda.matmul
    names = [k for k in ("allow_tf32", "allow_fp16_accumulation") if hasattr(flags, k)]
    saved = {k: getattr(flags, k) for k in names}
    try:
        yield flags
    finally:
        for k, v in saved.items():
            setattr(flags, k, v)
