#!/usr/bin/env bash
# Sets up everything fastclip needs on a fresh machine, idempotently:
#   - a virtual environment (.venv, or $FASTCLIP_VENV) that also sees system packages,
#     so a torch already installed (e.g. a CUDA build on a GPU box) is reused;
#   - torch==2.13.0 only when no torch is importable: a wheel pip finds without an index
#     (its find-links or cache) first; else, on a machine without an NVIDIA GPU, the CPU
#     build from PyTorch's CPU index (the package index's default torch, pinned or not, is
#     the multi-GB CUDA build), and the default build where there is a GPU;
#   - fastclip itself (the distribution fastclip-fused), editable, with its compiled
#     extension (rebuilt only when csrc/, CMakeLists.txt or pyproject.toml change), with
#     torch pinned to the one found, so that pip never replaces it (fastclip declares
#     torch>=2.9.1; an older torch stops here with a message instead of a download);
#   - with --test: the test tools and Triton (its kernels run under TRITON_INTERPRET=1
#     on machines without a GPU).
# Without --test (make demo) on a machine without an NVIDIA GPU the CUDA kernels are not
# compiled (FASTCLIP_CUDA=OFF unless set): they cannot run there, and nvcc takes ~1.5 of
# the ~3 minutes of a first set-up on 2 cores. --test builds them (the suite checks them
# where nvcc is found), and any existing build serves the demo.
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
# pip's stderr without two known, harmless notes: find-links folders it cannot read as
# archives, and its resolver's report that open_clip_torch (installed below with --no-deps,
# for its loss.py only) lacks timm and torchvision. Any other conflict is still shown.
pip_notes() {
  awk '/is ignored: it is neither/ { next }
       /^ERROR: pip.s dependency resolver does not currently/ { head = $0; next }
       /^open-clip-torch [^ ]+ requires (timm|torchvision)/ { next }
       { if (head != "") { print head; head = "" } print; fflush() }'
}
has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(pip_notes >&2); }

TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
if ! "$PY" -c "import torch" 2>/dev/null; then
  # A torch wheel pip has without an index (find-links, cache) first, then its requirements
  # from pip's configured indexes (torch itself is then installed: nothing else is tried).
  if pip_install --no-index --no-deps torch==2.13.0 2>/dev/null; then
    echo "[setup] no importable torch: installed torch==2.13.0 from pip's local wheels"
    pip_install torch==2.13.0
  elif has_gpu; then
    echo "[setup] no importable torch: installing torch==2.13.0 (CUDA build: this machine has an NVIDIA GPU)"
    pip_install torch==2.13.0
  else
    echo "[setup] no importable torch: installing torch==2.13.0 (CPU build, from $TORCH_CPU_INDEX)"
    pip_install --index-url "$TORCH_CPU_INDEX" torch==2.13.0
  fi
fi

torch_version=$("$PY" -c "import torch; print(torch.__version__)")
at_least() {  # at_least VERSION MAJOR MINOR PATCH: release part only (2.13.0+cpu -> 2.13.0)
  "$PY" -c "import re, sys; v = re.match(r'(\d+)\.(\d+)(?:\.(\d+))?', sys.argv[1]).groups('0');
sys.exit(tuple(map(int, v)) < tuple(map(int, sys.argv[2:])))" "$@"
}
if ! at_least "$torch_version" 2 9 1; then
  echo "[setup] torch $torch_version is importable, fastclip needs torch>=2.9.1: upgrade it (a CPU" >&2
  echo "        build on CPU machines, see README), or use a venv without it (FASTCLIP_VENV)" >&2
  exit 1
fi
# pip keeps this exact torch while it installs fastclip's other requirements.
echo "torch==$torch_version" > "$VENV/torch-constraint.txt"

# Build requirements, installed into the venv so the editable build can reuse its
# CMake build folder (build/) and recompile only what changed.
if ! "$PY" -c "import ninja" 2>/dev/null \
   || ! at_least "$("$PY" -c "import scikit_build_core as m; print(m.__version__)" 2>/dev/null || echo 0.0)" 0 11 \
   || ! at_least "$("$PY" -c "import pybind11 as m; print(m.__version__)" 2>/dev/null || echo 0.0)" 2 13; then
  pip_install "scikit-build-core>=0.11" "pybind11>=2.13" ninja
fi

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

cuda_mode=${FASTCLIP_CUDA:-AUTO}
if [[ $want_test == 0 && -z "${FASTCLIP_CUDA:-}" ]] && ! has_gpu; then
  cuda_mode=OFF
fi
stamp="$VENV/.fastclip-build-stamp"
sources=$(cat pyproject.toml CMakeLists.txt src/fastclip/__init__.py $(find csrc -type f | sort) | sha256sum | cut -d' ' -f1)
digest="$sources $cuda_mode"
built=$(cat "$stamp" 2>/dev/null || true)
# The demo takes a build of these sources in any CUDA mode (one made by --test included).
[[ $want_test == 0 && -z "${FASTCLIP_CUDA:-}" && "${built%% *}" == "$sources" ]] && digest=$built
# The package was called `fastclip` before it took the free name fastclip-fused; an
# editable install under the old name would shadow the new one (same import name).
if "$PY" -m pip show -q fastclip >/dev/null 2>&1; then
  echo "[setup] removing the distribution 'fastclip' (this project's former name)"
  "$PY" -m pip uninstall -y -q fastclip
  rm -f "$stamp"
fi
if [[ "$built" != "$digest" ]] || ! "$PY" -c "import fastclip._ext as e; assert e.extension()" 2>/dev/null; then
  if [[ $cuda_mode == OFF && -z "${FASTCLIP_CUDA:-}" ]]; then
    echo "[setup] building fastclip (C++ kernels; no NVIDIA GPU here: the CUDA kernels are left to make test)"
  else
    echo "[setup] building fastclip (C++ kernels; CUDA kernels too when nvcc is found)"
  fi
  FASTCLIP_CUDA=$cuda_mode CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    pip_install --no-build-isolation -c "$VENV/torch-constraint.txt" -e .
  echo "$digest" > "$stamp"
fi
"$PY" -c "import fastclip; print('[setup] fastclip', fastclip.__version__, 'backends:', fastclip.available_backends())"
