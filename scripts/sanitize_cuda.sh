#!/usr/bin/env bash
# compute-sanitizer over the cuda backend's kernels (needs a GPU and a CUDA build of
# fastclip._C), for every loss the backend implements: forward, backward and the one-pass
# forward+backward. Runs memcheck (out-of-bounds/misaligned accesses), racecheck
# (shared-memory hazards), initcheck (reads of uninitialised global memory: the workspace's
# first-write logic and the gradient pass's turnstiles) and synccheck (barrier misuse),
# each on a small and a large case of scripts/cuda_sanitize_driver.py. Only fastclip's
# kernels are instrumented.
#   usage: scripts/sanitize_cuda.sh [python]       (default: python on PATH)
#   environment: TOOLS (default "memcheck racecheck initcheck synccheck"), SIZES (default
#   "small large"): a subset, e.g. TOOLS=memcheck SIZES=small for a quick look.
set -euo pipefail
PY=${1:-python}
HERE=$(cd "$(dirname "$0")" && pwd)
SAN=${COMPUTE_SANITIZER:-compute-sanitizer}
command -v "$SAN" >/dev/null || { echo "compute-sanitizer not found (set COMPUTE_SANITIZER)"; exit 2; }
# Without torch's caching allocator every tensor is its own cudaMalloc, so memcheck sees
# exact bounds and initcheck sees fresh allocations.
export PYTORCH_NO_CUDA_MEMORY_CACHING=1
status=0
for tool in ${TOOLS:-memcheck racecheck initcheck synccheck}; do
  for size in ${SIZES:-small large}; do
    echo "=== $tool / $size"
    if ! "$SAN" --tool "$tool" --kernel-name kns=fastclip --error-exitcode 99 \
         "$PY" "$HERE/cuda_sanitize_driver.py" "$size"; then
      echo "!!! $tool / $size FAILED"
      status=1
    fi
  done
done
exit $status
