#!/usr/bin/env bash
# Build, check and benchmark fastclip on a machine with an NVIDIA GPU, in one call.
#
#   1. build: fastclip with its CUDA kernels for this GPU (editable install); if that
#      fails, without CUDA, so that the Triton backend and the peers are still measured;
#   2. tests: pytest -m gpu (every GPU test of every backend);
#   3. benchmark: the loss benchmark on the GPU, bf16 then fp32, in the time left;
#   4. overhead: per-call times at small N (N = 32, 256, 1024), where dispatch dominates;
#   5. a summary: build, backends, test counts, benchmark files, the result tables.
# Exit status 1 when the CUDA build or a GPU test failed.
#
# Results go to benchmarks/results/cuda-<GPU name>.{csv,md} (+ -time.png, -memory.png,
# -overhead.{csv,md}), rows of earlier runs kept unless measured again; logs to
# build/gpu-check/. Every phase has its own time limit and the whole script keeps
# within GPU_CHECK_SECONDS (default 540). The peers run when importable (pip install
# open-clip-torch inf-cl): without open_clip the naive peer is the same formula in
# PyTorch, without inf-cl its rows are skipped.
#
# Usage, from anywhere:  bash scripts/gpu_check.sh
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS, CUDA_ARCH (e.g. 90a),
# GPU_TESTS (pytest targets, default tests), BENCH_A / BENCH_B (arguments of the two
# benchmark runs; empty skips one), RESULTS (default benchmarks/results), LOGS (default
# build/gpu-check), FASTCLIP_COMMIT (the commit recorded when the tree has no .git).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-540}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
LOGS=${LOGS:-build/gpu-check}
mkdir -p "$RESULTS" "$LOGS"
export PYTHONUNBUFFERED=1
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
# a phase's limit: min(its own, the time left), at least 1 s (timeout 0 would mean none)
limit() { local l; l=$(left); (( l < 1 )) && l=1; (( $1 < l )) && echo "$1" || echo "$l"; }
STATUS=0

# ------------------------------------------------------------------ 0. machine
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "torch sees no CUDA device: nothing to check here"; exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '|', torch.cuda.get_device_name())"
if [[ -z "${FASTCLIP_COMMIT:-}" ]] && git rev-parse --short HEAD >/dev/null 2>&1; then
  export FASTCLIP_COMMIT=$(git rev-parse --short HEAD)$([[ -n $(git status --porcelain --untracked-files=no) ]] && echo +dirty)
fi

# ------------------------------------------------------------------ 1. build (<= 300 s)
ARCH=${CUDA_ARCH:-$("$PY" -c "import torch; M,m=torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
BUILD=cuda
say "build: CUDA kernels for sm_${ARCH} (log: $LOGS/build.log)"
if ! FASTCLIP_CUDA=ON SKBUILD_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real" \
     timeout "$(limit 300)" "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
     > "$LOGS/build.log" 2>&1; then
  grep -n -m 20 -E "error|Error" "$LOGS/build.log" | tail -n 20
  say "CUDA build FAILED; building without CUDA so that triton and the peers are measured"
  BUILD=no-cuda
  STATUS=1
  if ! FASTCLIP_CUDA=OFF timeout "$(limit 180)" "$PY" -m pip install -v --no-build-isolation \
       --no-deps -e . >> "$LOGS/build.log" 2>&1; then
    say "the build without CUDA failed too: Python sources only (reference, triton)"
    BUILD=none
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
BACKENDS=$("$PY" -c "import fastclip; print(','.join(fastclip.available_backends('cuda')))" 2>&1 | tail -n 1)
"$PY" -c "
from fastclip.ops.backends import all_backends
for b in all_backends().values():
    ok, why = b.availability()
    if 'cuda' in b.devices and not ok:
        print(f'  {b.name}: unavailable: {why}')"

# ------------------------------------------------------------------ 2. GPU tests (<= 200 s)
TESTS="not run"
if (( $(left) > 240 )); then
  say "tests: pytest -m gpu ${GPU_TESTS:-tests} (log: $LOGS/tests.log)"
  timeout "$(limit 200)" "$PY" -m pytest -q -rfEs -m gpu -p no:cacheprovider \
      ${GPU_TESTS:-tests} > "$LOGS/tests.log" 2>&1
  RC=$?
  tail -n 15 "$LOGS/tests.log"
  TESTS="rc=$RC: $(grep -E '(passed|failed|error|no tests ran)' "$LOGS/tests.log" | tail -n 1)"
  (( RC == 124 )) && TESTS="stopped at its time limit; $TESTS"
  (( RC != 0 )) && STATUS=1
else
  say "tests skipped: too little time left"
fi

# ------------------------------------------------------------------ 3. benchmark
# A: bf16 at D 512 and 1024 up to N = 256k (naive skipped where its logits won't fit);
# B: fp32 up to 64k (true fp32 is ~16x slower per FLOP; inf-cl runs only in fp32).
BENCH_A=${BENCH_A-"--dtypes bf16 --dims 512,1024 --sizes 4096,16384,65536,262144"}
BENCH_B=${BENCH_B-"--dtypes fp32 --dims 512,1024 --sizes 4096,16384,65536"}
: > "$LOGS/bench.log"
for ARGS in "$BENCH_A" "$BENCH_B"; do
  [[ -z "$ARGS" ]] && continue
  L=$(( $(left) - 90 ))                       # keep time for the overhead and the summary
  [[ "$ARGS" == "$BENCH_A" && -n "$BENCH_B" ]] && L=$(( L * 3 / 5 ))
  if (( L < 20 )); then say "benchmark '$ARGS' skipped: no time left"; continue; fi
  say "benchmark: $ARGS (budget ${L}s; log: $LOGS/bench.log)"
  timeout $(( L + 60 )) "$PY" -m fastclip.bench.contrastive_loss --device cuda --append \
      --no-plot --out "$RESULTS" --time-budget-s "$L" $ARGS >> "$LOGS/bench.log" 2>&1
  (( $? == 124 )) && say "benchmark stopped at its limit; the CSV keeps what it measured"
done
NAME=$("$PY" -c "import torch; from fastclip.bench.env import slug; print('cuda-' + slug(torch.cuda.get_device_name()))")
CSV="$RESULTS/$NAME.csv"
[[ -f "$CSV" ]] && { timeout 60 "$PY" -m fastclip.bench.plot "$CSV" >/dev/null 2>&1 || say "plots skipped (matplotlib?)"; }

# ------------------------------------------------------------------ 4. overhead (<= 60 s)
if (( $(left) > 45 )); then
  say "overhead: N = 32, 256, 1024 (log: $LOGS/overhead.log)"
  timeout "$(limit 60)" "$PY" -m fastclip.bench.contrastive_loss --device cuda --overhead \
      --target-s 1 --out "$RESULTS" > "$LOGS/overhead.log" 2>&1 || say "overhead run failed (see the log)"
fi

# ------------------------------------------------------------------ 5. summary
echo
say "done: build $BUILD | cuda backends: $BACKENDS | GPU tests: $TESTS"
ls -1 "$RESULTS/$NAME"* 2>/dev/null
if [[ -f "$CSV" ]]; then
  echo; "$PY" -m fastclip.bench.contrastive_loss --summarize "$CSV"
else
  say "no benchmark CSV was written (see $LOGS/bench.log)"
fi
[[ -f "$RESULTS/$NAME-overhead.md" ]] && { echo; grep '^|' "$RESULTS/$NAME-overhead.md"; }
say "exit status $STATUS (1: a build or GPU-test failure)"
exit $STATUS
