#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer over the C++ CPU kernels (fastclip._C), the
# CPU counterpart of sanitize_cuda.sh: builds the extension with -fsanitize=address,undefined
# (CPU sources only) into a temporary folder, puts that build in front of the installed one
# in an overlay environment (a venv whose only path entries are a copy of src/fastclip with
# the sanitized module, then the project venv's site-packages), and runs the tests that
# call the CPU kernels: the CPU backend's own file, the conformance suite's cpu cases, the
# open_clip drop-ins and the distributed forms (their gloo ranks inherit the sanitizers).
# Any sanitizer report stops the process that made it, so it fails the run. Only fastclip's
# code is instrumented (torch is not). About 2 minutes on 2 cores.
#   usage: scripts/sanitize_cpu.sh        (after scripts/setup_env.sh --test; `make sanitize`)
#   environment: FASTCLIP_VENV (default .venv), PYTEST_ARGS (default -q -x), KEEP=1 keeps the
#   temporary folder.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${FASTCLIP_VENV:-.venv}
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
[ -x "$PY" ] || { echo "sanitize_cpu: no $PY (run scripts/setup_env.sh --test first)" >&2; exit 2; }
CXX_BIN=${CXX:-g++}
ASAN=$("$CXX_BIN" -print-file-name=libasan.so)
UBSAN=$("$CXX_BIN" -print-file-name=libubsan.so)
for lib in "$ASAN" "$UBSAN"; do
  [ -f "$lib" ] || { echo "sanitize_cpu: $CXX_BIN has no $(basename "$lib") (install the compiler's sanitizer runtimes)" >&2; exit 2; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/fastclip-sanitize.XXXXXX")
[ "${KEEP:-0}" = 1 ] && echo "[sanitize] working in $WORK" || trap 'rm -rf "$WORK"' EXIT

echo "[sanitize] building fastclip._C with -fsanitize=address,undefined (CPU kernels only)"
PYBIND11_DIR=$("$PY" -c "import pybind11; print(pybind11.get_cmake_dir())")
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
cmake -S "$ROOT" -B "$WORK/build" "${GEN[@]}" -DFASTCLIP_CUDA=OFF -DCMAKE_BUILD_TYPE=Debug \
  -Dpybind11_DIR="$PYBIND11_DIR" -DPython_EXECUTABLE="$PY" \
  "-DCMAKE_CXX_FLAGS=-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g" \
  "-DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address,undefined" >"$WORK/cmake.log" 2>&1 \
  || { cat "$WORK/cmake.log"; exit 1; }
cmake --build "$WORK/build" -j "${JOBS:-2}" >"$WORK/build.log" 2>&1 || { cat "$WORK/build.log"; exit 1; }

# The overlay: the package's Python files with the sanitized module beside them, first on the
# path (the project venv's editable install would otherwise import its own build), then every
# site-packages folder the project venv sees (torch, pytest, numpy, open_clip).
mkdir -p "$WORK/pkg"
cp -r "$ROOT/src/fastclip" "$WORK/pkg/"
rm -f "$WORK"/pkg/fastclip/_C*.so
cp "$WORK"/build/_C*.so "$WORK/pkg/fastclip/"
BASE=$("$PY" -c "import sys; print(sys.base_prefix)")/bin/python3
"$BASE" -m venv --without-pip "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
{ echo "$WORK/pkg"; "$PY" -c "import site, sys; print('\n'.join(p for p in sys.path if p.endswith('-packages')))"; } >"$SITE/fastclip_sanitize.pth"

export LD_PRELOAD="$ASAN:$UBSAN${LD_PRELOAD:+:$LD_PRELOAD}"
# detect_leaks=0: CPython and torch keep allocations for the life of the process by design.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:verify_asan_link_order=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
got=$("$WORK/venv/bin/python" -c "import fastclip._C as c; print(c.__file__)")
case "$got" in "$WORK"/*) ;; *) echo "sanitize_cpu: the overlay imported $got, not the sanitized build" >&2; exit 1 ;; esac
echo "[sanitize] running the CPU kernels' tests against $got"
cd "$ROOT"
# shellcheck disable=SC2086
"$WORK/venv/bin/python" -m pytest ${PYTEST_ARGS:--q -x} -p no:cacheprovider tests/ops/test_contrastive_loss.py -k cpu
# shellcheck disable=SC2086
"$WORK/venv/bin/python" -m pytest ${PYTEST_ARGS:--q -x} -p no:cacheprovider \
  tests/ops/test_contrastive_loss_cpu.py tests/test_loss.py tests/distributed
echo "[sanitize] no sanitizer report"
