#!/usr/bin/env bash
# One call on a machine with an NVIDIA GPU: build, test, benchmark, collect.
#
#   1. installs the wheels carried in .whl/ (inf-cl, open_clip: the GPU machine has no
#      package index) into /tmp/site, when there are any;
#   2. builds fastclip with its CUDA kernels for this GPU only (editable install); if that
#      fails, builds without CUDA so the Triton backend and the peers are still measured;
#   3. runs the GPU tests (pytest -m gpu over tests/, or $GPU_TESTS);
#   4. runs the benchmark (fastclip.bench.contrastive_loss --device cuda) in the time left,
#      bf16 first, then fp32 (where inf-cl runs), into one CSV;
#   5. leaves in $OUT: build.log, tests.log, bench.log, the CSV, the markdown and two PNGs
#      (7 files, flat), and prints a short summary table last.
#
# The whole script keeps within $GPU_CHECK_SECONDS (default 540 s: one 10-minute call).
# Usage, from the repository root (see benchmarks/README.md, "On a GPU machine"):
#   bash scripts/gpu_check.sh
#   FASTCLIP_COMMIT=abc1234 BENCH_A="--dtypes fp16 --dims 768 --sizes 4096,65536" \
#       BENCH_B="" bash scripts/gpu_check.sh
# Environment: OUT (default /tmp/fastclip-gpu-check), PYTHON (default python3),
# GPU_TESTS (pytest targets, default "tests"), BENCH_A / BENCH_B (the two benchmark
# runs' arguments; empty skips one), GPU_CHECK_SECONDS, CUDA_ARCH (e.g. 90a).
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$(date +%s)
TOTAL=${GPU_CHECK_SECONDS:-540}
OUT=${OUT:-/tmp/fastclip-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
left() { echo $(( TOTAL - ($(date +%s) - T0) )); }
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
# Logs come back only up to 16 MiB each: keep their ends.
trim() { [[ -f "$1" ]] && tail -c 4000000 "$1" > "$1.t" && mv "$1.t" "$1"; }

# ------------------------------------------------------------------ 0. machine
say "$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo 'nvidia-smi: none')"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  say "torch sees no CUDA device: nothing to check here"; exit 1
fi
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
if [[ -z "${FASTCLIP_COMMIT:-}" ]] && git rev-parse --short HEAD >/dev/null 2>&1; then
  export FASTCLIP_COMMIT=$(git rev-parse --short HEAD)
fi

# ------------------------------------------------------- 1. carried wheels (.whl/)
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    say "carried wheels installed: $(cd .whl && ls *.whl | tr '\n' ' ')"
  else
    say "carried wheels did not install (see above); going on without them"
  fi
else
  say "no .whl/ wheels carried: inf-cl and open_clip rows will say 'not importable'"
fi

# ------------------------------------------------------------------ 2. build
ARCH=${CUDA_ARCH:-$("$PY" -c "import torch; M,m=torch.cuda.get_device_capability(); print(f'{M}{m}' + ('a' if M == 9 else ''))")}
export CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
BUILD=cuda
say "building fastclip with CUDA kernels for sm_${ARCH} (log: build.log)"
if ! FASTCLIP_CUDA=ON SKBUILD_CMAKE_ARGS="-DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real" \
     timeout $(( $(left) > 420 ? 300 : $(left) / 2 )) \
     "$PY" -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1; then
  grep -n -m 20 -E "error|Error" "$OUT/build.log" | tail -n 20
  say "CUDA build FAILED; building without CUDA so triton and the peers can still be measured"
  BUILD=cpu-only
  if ! FASTCLIP_CUDA=OFF timeout 180 "$PY" -m pip install -v --no-build-isolation --no-deps \
       --no-index -e . >> "$OUT/build.log" 2>&1; then
    say "the CPU-only build failed too: using the Python sources (reference/triton only)"
    BUILD=none
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
trim "$OUT/build.log"
BACKENDS=$("$PY" -c "import fastclip; print(','.join(fastclip.available_backends('cuda')))" 2>&1 | tail -n 1)
say "build: $BUILD; cuda backends available: $BACKENDS"
"$PY" - <<'EOF'
from fastclip.ops.backends import all_backends
for name, b in all_backends().items():
    ok, why = b.availability()
    if "cuda" in b.devices and not ok:
        print(f"  {name}: unavailable: {why}")
EOF

# ------------------------------------------------------------------ 3. GPU tests
TESTS_RC=skipped
TB=$(( $(left) - 300 ))
(( TB > 200 )) && TB=200
if (( TB >= 30 )); then
  say "GPU tests: pytest -m gpu ${GPU_TESTS:-tests} (at most ${TB}s; log: tests.log)"
  timeout "$TB" "$PY" -m pytest -q -rfEs -m gpu -p no:cacheprovider \
      --continue-on-collection-errors ${GPU_TESTS:-tests} > "$OUT/tests.log" 2>&1
  TESTS_RC=$?
  tail -n 15 "$OUT/tests.log"
  (( TESTS_RC == 124 )) && say "GPU tests stopped at their ${TB}s limit"
  (( TESTS_RC == 5 )) && say "no test is marked gpu"
else
  say "GPU tests skipped: too little time left"
fi
trim "$OUT/tests.log"

# ------------------------------------------------------------------ 4. benchmark
# A: bf16 at D 512 and 1024 up to N = 256k (naive skipped where its logits won't fit);
# B: fp32 up to 64k (true fp32 is ~16x slower per FLOP; inf-cl runs only in fp32).
BENCH_A=${BENCH_A-"--dtypes bf16 --dims 512,1024 --sizes 4096,16384,65536,262144"}
BENCH_B=${BENCH_B-"--dtypes fp32 --dims 512,1024 --sizes 4096,16384,65536"}
COMMON="--device cuda --out $OUT --tag gpu-check --no-plot"
: > "$OUT/bench.log"
APPEND=""
for ARGS in "$BENCH_A" "$BENCH_B"; do
  [[ -z "$ARGS" ]] && continue
  L=$(( $(left) - 40 ))
  if [[ -z "$APPEND" && -n "$BENCH_B" ]]; then B=$(( L * 3 / 5 )); else B=$L; fi
  if (( B < 20 )); then say "benchmark '$ARGS' skipped: no time left"; continue; fi
  say "benchmark: $ARGS (budget ${B}s; log: bench.log)"
  timeout $(( B + 60 )) "$PY" -m fastclip.bench.contrastive_loss $COMMON $APPEND \
      --time-budget-s "$B" $ARGS 2>&1 | grep -v "^ *$" >> "$OUT/bench.log"
  (( ${PIPESTATUS[0]} == 124 )) && say "benchmark stopped at its limit; the CSV keeps what it measured"
  APPEND="--append"
done
trim "$OUT/bench.log"
CSV=$(ls "$OUT"/cuda-*gpu-check.csv 2>/dev/null | head -n 1)
if [[ -n "$CSV" ]]; then
  timeout 60 "$PY" -m fastclip.bench.plot "$CSV" >/dev/null 2>&1 || say "plots skipped (matplotlib?)"
fi

# ------------------------------------------------------------------ 5. summary
echo
say "done: build $BUILD | cuda backends: $BACKENDS | GPU tests: rc=$TESTS_RC ($(grep -E '(passed|failed|error|no tests ran)' "$OUT/tests.log" 2>/dev/null | tail -n 1))"
ls -1 "$OUT"
if [[ -n "$CSV" ]]; then
  echo
  "$PY" -m fastclip.bench.contrastive_loss --summarize "$CSV"
else
  say "no benchmark CSV was written (see bench.log)"
fi
