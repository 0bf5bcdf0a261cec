#!/usr/bin/env bash
# Sets up everything fastclip needs on a fresh machine, idempotently:
#   - a virtual environment (.venv, or $FASTCLIP_VENV) that also sees system packages,
#     so a torch already installed (e.g. a CUDA build on a GPU box) is reused;
#   - torch==2.13.0 only when no torch is importable (never an unpinned torch, which
#     would pull a multi-GB CUDA build onto a CPU machine);
#   - fastclip itself, editable, with its compiled extension (rebuilt only when csrc/,
#     CMakeLists.txt or pyproject.toml change);
#   - with --test: the test tools and Triton (its kernels run under TRITON_INTERPRET=1
#     on machines without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

VENV=${FASTCLIP_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "[setup] no importable torch: installing torch==2.13.0"
  pip_install torch==2.13.0
fi

# Build requirements, installed into the venv so the editable build can reuse its
# CMake build folder (build/) and recompile only what changed.
"$PY" -c "import scikit_build_core, pybind11, ninja" 2>/dev/null \
  || pip_install "scikit-build-core>=0.10" "pybind11>=2.12" ninja

# matplotlib draws the demo's curves.png (part of the main job's output; ~7 s to install)
"$PY" -c "import matplotlib" 2>/dev/null || pip_install matplotlib

if [[ $want_test == 1 ]]; then
  "$PY" -c "import pytest, pytest_timeout, sklearn" 2>/dev/null \
    || pip_install "pytest>=7" pytest-timeout scikit-learn
  "$PY" -c "import triton" 2>/dev/null || pip_install "triton==3.9.0"
  # open_clip's own loss.py is the peer the tests compare ClipLoss/SigLipLoss with (loaded
  # by file path: its package __init__ imports torchvision). --no-deps: pure Python, and
  # its requirements would pull a CUDA torch and torchvision.
  "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('open_clip') is None)" \
    2>/dev/null || pip_install --no-deps open_clip_torch
fi

stamp="$VENV/.fastclip-build-stamp"
digest=$(cat pyproject.toml CMakeLists.txt $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
if [[ ! -f "$stamp" ]] || [[ "$(cat "$stamp")" != "$digest" ]] || ! "$PY" -c "import fastclip._C" 2>/dev/null; then
  echo "[setup] building fastclip (C++ kernels; CUDA kernels too when nvcc is found)"
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    pip_install --no-build-isolation -e .
  echo "$digest" > "$stamp"
fi
"$PY" -c "import fastclip; print('[setup] fastclip', fastclip.__version__, 'backends:', fastclip.available_backends())"
