#!/usr/bin/env bash
# Tests the built wheel as a user gets it: a fresh virtual environment (no system site
# packages, nothing editable), a CPU torch installed first, then the wheel with its
# declared requirements, then the test suite run from a copy of tests/ outside the
# checkout, so `import fastclip` can only find the installed copy.
#
# Usage: scripts/test_wheel.sh [WHEEL] [-- PYTEST ARGS]
#   WHEEL defaults to the newest dist/fastclip_fused-*-manylinux_*.whl for $PYTHON.
# Environment:
#   PYTHON=python3               interpreter (must match the wheel's cpXY tag)
#   FASTCLIP_TEST_TORCH=torch==2.13.0
#   FASTCLIP_TORCH_INDEX=URL     index to take torch from; default: a wheel pip finds without
#                                an index (find-links, cache), else PyTorch's CPU index (the
#                                package index's default torch is the multi-GB CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH=${FASTCLIP_TEST_TORCH:-torch==2.13.0}
pytag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')

whl=""
if [[ $# -gt 0 && "$1" != "--" ]]; then whl=$1; shift; fi
[[ "${1:-}" == "--" ]] && shift
if [[ -z "$whl" ]]; then
  whl=$(ls -t dist/fastclip_fused-*-"$pytag"-"$pytag"-manylinux_*.whl 2>/dev/null | head -n1 || true)
fi
[[ -f "$whl" ]] || { echo "test_wheel.sh: no wheel for $pytag in dist/ (run make wheel)" >&2; exit 1; }
whl=$(realpath "$whl")

venv=$PWD/build/wheel-test-venv
rm -rf "$venv"
echo "[wheel-test] fresh venv $venv ($("$PYTHON" --version))"
"$PYTHON" -m venv "$venv"
PY=$venv/bin/python
pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [[ -n "${FASTCLIP_TORCH_INDEX:-}" ]]; then
  echo "[wheel-test] installing $TORCH first from $FASTCLIP_TORCH_INDEX"
  pip_install --index-url "$FASTCLIP_TORCH_INDEX" "$TORCH"
elif pip_install --no-index --no-deps "$TORCH" 2>/dev/null; then
  echo "[wheel-test] installed $TORCH first, from pip's local wheels"
  pip_install "$TORCH"      # its requirements, from pip's configured indexes
else
  echo "[wheel-test] installing $TORCH first (CPU build, from https://download.pytorch.org/whl/cpu)"
  pip_install --index-url https://download.pytorch.org/whl/cpu "$TORCH"
fi
torch_version=$("$PY" -c "import importlib.metadata as m; print(m.version('torch'))")
echo "torch==$torch_version" > "$venv/torch-constraint.txt"

# The wheel and what it declares (the test extra too), plus Triton for the interpreter
# tests of the Triton kernels: a CUDA build of torch brings the Triton it pins (kept), a
# CPU build none. The constraint makes any attempt to replace torch an error.
triton=()
if ! "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('triton') is None)"; then
  triton=("triton==3.9.0")
fi
echo "[wheel-test] installing $(basename "$whl")[test] ${triton[*]} (torch stays $torch_version)"
pip_install -c "$venv/torch-constraint.txt" "$whl[test]" "${triton[@]}"
# What the wheel declares is all installed and consistent.
"$PY" -m pip check --disable-pip-version-check
# open_clip's loss.py: the peer of the ClipLoss/SigLipLoss tests (pure Python; without its
# requirements, which would pull a CUDA torch and torchvision, so after the check above).
pip_install --no-deps open_clip_torch

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp -r tests "$work/"
cp pyproject.toml "$work/"   # pytest's settings (markers, timeout); nothing of src/ comes along
cd "$work"
"$PY" - <<'EOF'
import fastclip, fastclip._ext as ext, os, sys
path = os.path.realpath(fastclip.__file__)
assert path.startswith(os.path.realpath(sys.prefix)), f"fastclip imported from {path}, not the venv"
assert ext.extension() is not None, ext.extension_error()
print(f"[wheel-test] fastclip {fastclip.__version__} from {os.path.dirname(path)}; "
      f"backends {fastclip.available_backends()}")
EOF
"$PY" -m pytest -q -p no:cacheprovider "$@" tests
