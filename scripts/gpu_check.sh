#!/usr/bin/env bash
# Build, check and benchmark fastclip on a machine with an NVIDIA GPU, in one call.
#
#   0. machine: GPU, driver, torch, Triton; peers' wheels installed when GPU_CHECK_WHEELS
#      names a folder of them (pip install --no-deps --target, nothing fetched);
#   1. build: fastclip._C with its CUDA kernels for this GPU only (cmake + ninja straight
#      into build/gpu-check/cmake, the module copied next to the sources, src/ put first on
#      PYTHONPATH: the checkout is what gets checked); if that fails, without CUDA, so that
#      the Triton backend and the peers are still checked and measured;
#   2. correctness, in parallel (nothing here is timed): scripts/gpu_smoke.py once per
#      backend of SMOKE_BACKENDS, each in its own process (a kernel fault leaves the other
#      backend's result standing), and pytest -m gpu on GPU_TESTS (pytest-xdist workers
#      when it is installed): by default the gemm and cuda backends' tests;
#   3. benchmarks, alone on the GPU, most important first (SigLIP bf16 D=512 to N = 256k,
#      CLIP bf16, then CLIP/SigLIP fp32 with inf-cl), each with a share of the time left;
#      a backend that failed its smoke check is left out of them;
#   4. compute-sanitizer (memcheck, racecheck) on the cuda backend's kernels, small cases;
#   5. per-call overhead at small N (N = 32, 256, 1024), both losses;
#   6. more tests (MORE_TESTS, by default the Triton tests) in the time left;
#   7. a summary: build, smoke, tests, sanitizer, then every result table.
# PHASES (default "build correctness bench sanitize overhead moretests") picks phases and
# their order. Measured on an H200 (16 cores): build 20-25 s; the cuda smoke check 10 s;
# the cuda tests 50 s with 8 workers; compute-sanitizer 15 s; the Triton tests and the
# Triton smoke check are slow because every first call compiles and autotunes (2.5-30 s
# each; 99 Triton tests in ~250 s of 8 workers), hence last and in the time left.
# Exit status 1 when a build, a smoke check, a GPU test or the sanitizer failed.
#
# Results go to benchmarks/results/cuda-<GPU name>[-siglip].{csv,md} (+ -overhead.{csv,md}),
# rows of earlier runs kept unless measured again; logs to build/gpu-check/. Plots:
# python -m fastclip.bench.plot on the CSVs, here or later on any machine. The whole script
# keeps within GPU_CHECK_SECONDS (default 510); every phase has its own limit inside that.
# With GPU_CHECK_OUT set, results and logs are packed into $GPU_CHECK_OUT/gpu-check.tgz after
# every phase (what a stopped run measured is kept).
#
# Usage, from anywhere:  bash scripts/gpu_check.sh
# Environment: PYTHON (default python3), GPU_CHECK_SECONDS, CUDA_ARCH (e.g. 90a), GPU_TESTS
# (pytest targets and options, shell-quoted, default "tests -k 'cuda or gemm'"),
# SMOKE_BACKENDS (default "gemm cuda"), CORRECTNESS_SECONDS (190), MORE_TESTS (default
# "tests -k triton"), GPU_TEST_WORKERS (default 8), BENCH (benchmark runs, one
# per line: "<weight> <arguments>"; empty skips them), BENCH_METHODS (default: floor, naive,
# the healthy backends, inf-cl), BENCH_RESERVE (130 s), OVERHEAD_SECONDS (40), RESULTS (default benchmarks/results),
# LOGS (default build/gpu-check), GPU_CHECK_WHEELS, GPU_CHECK_OUT, FASTCLIP_COMMIT (the
# commit recorded when the tree has no .git). The peers run when importable (open_clip's
# loss.py, inf-cl): without open_clip the naive peer is the same formula in PyTorch,
# without inf-cl its rows are skipped.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-510}
PY=${PYTHON:-python3}
RESULTS=${RESULTS:-benchmarks/results}
LOGS=${LOGS:-build/gpu-check}
mkdir -p "$RESULTS" "$LOGS"
export PYTHONUNBUFFERED=1
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
# a phase's limit: min(its own, the time left), at least 1 s (timeout 0 would mean none)
limit() { local l; l=$(left); (( l < 1 )) && l=1; (( $1 < l )) && echo "$1" || echo "$l"; }
collect() {
  [[ -n "${GPU_CHECK_OUT:-}" ]] || return 0
  tar czf "$GPU_CHECK_OUT/gpu-check.tgz.part" "$LOGS"/*.log $(ls "$RESULTS"/cuda-* 2>/dev/null) \
    2>/dev/null && mv "$GPU_CHECK_OUT/gpu-check.tgz.part" "$GPU_CHECK_OUT/gpu-check.tgz"
}
# pytest -m gpu within $1 seconds, output to $2, on the targets and options of $3 (one
# string, split as the shell splits it: "-k 'a or b'" stays one expression); pytest-xdist
# workers when it is installed.
gpu_pytest() {
  local lim=$1 log=$2 xd=() targets=()
  eval "targets=($3)"
  "$PY" -c "import xdist" 2>/dev/null && xd=(-n "${GPU_TEST_WORKERS:-8}")
  timeout "$lim" "$PY" -m pytest -v -rfEs -m gpu -p no:cacheprovider --timeout 150 "${xd[@]}" \
      "${targets[@]}" > "$log" 2>&1
}
STATUS=0
PHASES=${PHASES:-build correctness bench sanitize overhead moretests}
SMOKE_BACKENDS=${SMOKE_BACKENDS-gemm cuda}
GPU_TESTS=${GPU_TESTS:-tests -k 'cuda or gemm'}
MORE_TESTS=${MORE_TESTS-tests -k triton}

# ------------------------------------------------------------------ 0. machine
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "torch sees no CUDA device: nothing to check here"; exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
  --format=csv,noheader 2>/dev/null | sed 's/^/  nvidia-smi: /'
"$PY" -c "
import torch, triton
p = torch.cuda.get_device_properties(0)
print(f'  torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}; '
      f'{p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB')"
command -v nvcc >/dev/null && nvcc --version | tail -n 2 | head -n 1 | sed 's/^/  nvcc: /'
if [[ -z "${FASTCLIP_COMMIT:-}" ]] && git rev-parse --short HEAD >/dev/null 2>&1; then
  export FASTCLIP_COMMIT=$(git rev-parse --short HEAD)$([[ -n $(git status --porcelain --untracked-files=no) ]] && echo +dirty)
fi
SITE=""
if [[ -n "${GPU_CHECK_WHEELS:-}" ]] && ls "$GPU_CHECK_WHEELS"/*.whl >/dev/null 2>&1; then
  SITE=$PWD/$LOGS/site
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$GPU_CHECK_WHEELS"/*.whl > "$LOGS/wheels.log" 2>&1 \
    && say "installed into $SITE: $(cd "$GPU_CHECK_WHEELS" && ls *.whl | tr '\n' ' ')" \
    || { say "wheel install failed (see $LOGS/wheels.log)"; SITE=""; }
fi
# src/ first: the checkout's Python sources with the module built below; the wheels last, so
# that nothing they hold shadows the machine's own packages.
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}${SITE:+:$SITE}

# ------------------------------------------------------------------ 1. build (<= 150 s)
phase_build() {
ARCH=${CUDA_ARCH:-$("$PY" -c "import torch; M,m=torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")}
BDIR=$LOGS/cmake
EXT=$("$PY" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
rm -f src/fastclip/_C*.so
build() {   # $1: ON or OFF
  rm -rf "$BDIR"
  timeout "$(limit "$2")" bash -c "cmake -S . -B '$BDIR' -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DFASTCLIP_CUDA=$1 -DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real \
      -DPython_EXECUTABLE=\$(command -v $PY) -Dpybind11_DIR=\$($PY -m pybind11 --cmakedir) \
      && ninja -C '$BDIR' -j $(nproc)" >> "$LOGS/build.log" 2>&1 \
    && cp "$BDIR/_C$EXT" src/fastclip/
}
BUILD=cuda
say "build: fastclip._C with CUDA kernels for sm_${ARCH} (log: $LOGS/build.log)"
: > "$LOGS/build.log"
if ! build ON 150; then
  grep -n -m 20 -E "error|Error" "$LOGS/build.log" | tail -n 20
  say "CUDA build FAILED; building without CUDA so that triton and the peers are measured"
  BUILD=no-cuda
  STATUS=1
  build OFF 90 || { say "the build without CUDA failed too: Python sources only"; BUILD=none; }
fi
say "build: $BUILD"
"$PY" -c "
from fastclip.ops.backends import all_backends
for b in all_backends().values():
    ok, why = b.availability()
    if 'cuda' in b.devices:
        print(f'  backend {b.name}: ' + ('available' if ok else f'unavailable: {why}'))"
collect
}

# ------------------------------------------------------------------ 2. correctness (<= 190 s)
# Smoke checks and the test suite at once: correctness only, nothing timed.
BUILD="not run"
SMOKE="not run"
TESTS="not run"
FAILED_SMOKE=()
phase_correctness() {
local PH; PH=$(limit "${CORRECTNESS_SECONDS:-190}")
say "correctness: smoke checks ($SMOKE_BACKENDS) and pytest -m gpu, in parallel, <= ${PH}s"
declare -A SMOKE_PID
for be in $SMOKE_BACKENDS; do
  timeout "$PH" "$PY" scripts/gpu_smoke.py "$be" > "$LOGS/smoke-$be.log" 2>&1 &
  SMOKE_PID[$be]=$!
done
gpu_pytest "$PH" "$LOGS/tests.log" "$GPU_TESTS" &
TEST_PID=$!
SMOKE=""
for be in $SMOKE_BACKENDS; do
  wait "${SMOKE_PID[$be]}"; rc=$?
  tail -n 1 "$LOGS/smoke-$be.log" | sed 's/^/  /'
  if (( rc == 0 )); then SMOKE+="$be ok, "
  else
    FAILED_SMOKE+=("$be")
    SMOKE+="$be FAILED (rc=$rc), "
    # a backend that is not built is not a failure of this check
    grep -q "unavailable" "$LOGS/smoke-$be.log" || STATUS=1
  fi
done
say "smoke: ${SMOKE%, }"
wait "$TEST_PID"; RC=$?
grep -E "^(FAILED|ERROR)" "$LOGS/tests.log" | head -n 20
TESTS="rc=$RC: $(grep -E '^=+ .* in [0-9.]+s' "$LOGS/tests.log" | tail -n 1 | tr -d '=' | xargs)"
(( RC == 124 )) && TESTS="stopped at its time limit ($(grep -cE ' PASSED| FAILED| SKIPPED| ERROR' "$LOGS/tests.log") results logged); $TESTS"
(( RC != 0 )) && STATUS=1
say "tests: $TESTS"
collect
}

# ------------------------------------------------------------------ 3. benchmarks
# "<weight> <arguments>": each run gets weight / (weights left) of the benchmark time left.
BENCH=${BENCH-"3 --loss siglip --dtypes bf16 --dims 512 --sizes 4096,8192,16384,32768,65536,131072,262144
3 --loss clip --dtypes bf16 --dims 512 --sizes 4096,8192,16384,32768,65536,131072,262144
1 --loss clip --dtypes fp32 --dims 512 --sizes 4096,16384,65536
1 --loss siglip --dtypes fp32 --dims 512 --sizes 4096,16384,65536"}
BENCH=${BENCH//;/$'\n'}                      # ';' separates runs too (one-line settings)
phase_bench() {
local RESERVE=${BENCH_RESERVE:-130}           # the phases after it and the summary
# floor, naive peer, the GPU backends that did not fail a smoke check (+ inf-cl for CLIP).
# The reference backend (chunked PyTorch, the last fallback) is left out: its time is
# better spent on the others.
local METHODS=${BENCH_METHODS:-floor,naive} be
if [[ -z "${BENCH_METHODS:-}" ]]; then
  for be in gemm triton cuda; do
    [[ " ${FAILED_SMOKE[*]} " == *" $be "* ]] || METHODS+=",$be"
  done
fi
local WLEFT=0 w args L m rc
: > "$LOGS/bench.log"
while read -r w _; do [[ -n "${w:-}" ]] && WLEFT=$(( WLEFT + w )); done <<< "$BENCH"
while read -r w args; do
  [[ -z "${w:-}" ]] && continue
  L=$(( ($(left) - RESERVE) * w / WLEFT ))
  WLEFT=$(( WLEFT - w ))
  if (( L < 15 )); then say "benchmark '$args' skipped: no time left"; continue; fi
  m=$METHODS; [[ "$args" == *"--loss clip"* && -z "${BENCH_METHODS:-}" ]] && m+=",inf-cl"
  say "benchmark: $args (methods $m; budget ${L}s; log: $LOGS/bench.log)"
  timeout $(( L + 45 )) "$PY" -m fastclip.bench.contrastive_loss --device cuda --append \
      --no-plot --out "$RESULTS" --time-budget-s "$L" --methods "$m" $args \
      >> "$LOGS/bench.log" 2>&1
  rc=$?
  (( rc == 124 )) && say "benchmark stopped at its limit; the CSV keeps what it measured"
  (( rc != 0 && rc != 124 )) && { say "benchmark failed (rc=$rc):"; tail -n 2 "$LOGS/bench.log"; }
  collect
done <<< "$BENCH"
}

# ------------------------------------------------------------------ 4. sanitizer (<= 40 s)
SAN="not run"
phase_sanitize() {
local rc
if [[ "$BUILD" == cuda ]] && command -v compute-sanitizer >/dev/null && (( $(left) > 50 )); then
  say "compute-sanitizer: memcheck, racecheck on small cases (log: $LOGS/sanitize.log)"
  TOOLS="memcheck racecheck" SIZES=small timeout "$(limit 40)" bash scripts/sanitize_cuda.sh "$PY" \
      > "$LOGS/sanitize.log" 2>&1
  rc=$?
  SAN="rc=$rc: $(grep -cE '^=== ' "$LOGS/sanitize.log") runs, $(grep -c 'FAILED' "$LOGS/sanitize.log") failed"
  (( rc == 124 )) && SAN="stopped at its limit; $SAN"
  (( rc != 0 && rc != 124 )) && { STATUS=1; grep -E "=========|FAILED" "$LOGS/sanitize.log" | head -n 20; }
  collect
fi
}

# ------------------------------------------------------------------ 5. overhead (<= 30 s)
phase_overhead() {
local loss
for loss in clip siglip; do
  if (( $(left) > 45 )); then
    say "overhead: $loss, N = 32, 256, 1024 (log: $LOGS/overhead.log)"
    timeout "$(limit "${OVERHEAD_SECONDS:-40}")" "$PY" -m fastclip.bench.contrastive_loss --device cuda --overhead \
        --loss "$loss" --target-s 1 --out "$RESULTS" >> "$LOGS/overhead.log" 2>&1 \
      || say "overhead run failed or stopped (see the log)"
  fi
done
collect
}

# ------------------------------------------------------------------ 6. more tests
# MORE_TESTS (pytest targets and options) in the time left: e.g. the Triton tests, whose
# first calls compile and autotune, after the benchmarks.
phase_moretests() {
local rc PH; PH=$(( $(left) - 10 ))
[[ -n "${MORE_TESTS:-}" ]] && (( PH > 20 )) || return 0
say "more tests: pytest -m gpu $MORE_TESTS, <= ${PH}s (log: $LOGS/tests-more.log)"
gpu_pytest "$PH" "$LOGS/tests-more.log" "$MORE_TESTS"
rc=$?
grep -E "^(FAILED|ERROR)" "$LOGS/tests-more.log" | head -n 20
TESTS+=" | more: rc=$rc, $(grep -c ' PASSED' "$LOGS/tests-more.log") passed, $(grep -c ' FAILED' "$LOGS/tests-more.log") failed"
(( rc != 0 && rc != 124 )) && STATUS=1
collect
}

for phase in $PHASES; do
  declare -F "phase_$phase" >/dev/null || { say "unknown phase '$phase'"; STATUS=1; continue; }
  phase_"$phase"
done

# ------------------------------------------------------------------ 7. summary
echo
say "build $BUILD | smoke: ${SMOKE%, } | GPU tests: $TESTS | sanitizer: $SAN"
for f in "$RESULTS"/cuda-*.csv; do
  [[ -f "$f" && "$f" != *overhead* ]] || continue
  echo; echo "== $f"; "$PY" -m fastclip.bench.contrastive_loss --summarize "$f"
done
for f in "$RESULTS"/cuda-*overhead.md; do
  [[ -f "$f" ]] && { echo; echo "== $f"; grep '^|' "$f"; }
done
say "exit status $STATUS (1: a build, smoke, GPU-test or sanitizer failure)"
collect
exit $STATUS
