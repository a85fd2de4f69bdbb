#!/usr/bin/env bash
# GPU check for a fresh CUDA machine with no network: build the extension (CUDA, all cores), run
# the CUDA tests, run the benchmarks, write everything to OUT_DIR and print a summary table last.
#   usage: benchmarks/gpu_check.sh OUT_DIR
# Uses the python3 on the PATH (it must have torch with CUDA, triton, pytest, pytest-benchmark).
# Stages can be skipped with GPU_CHECK_SKIP="build tests bench" (any subset). Each of the two pytest
# stages has a time limit (GPU_CHECK_TEST_S, default 240; GPU_CHECK_BENCH_S, default 240) after which
# it is interrupted with SIGINT, so pytest still writes its report and the summary; with pytest-xdist
# installed the tests run in GPU_CHECK_WORKERS processes (default 4), so a crashing test loses
# itself, not the run.
set -uo pipefail
OUT=${1:?usage: benchmarks/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SKIP=${GPU_CHECK_SKIP:-}
export PYTHONUNBUFFERED=1 DLA_FUSED_CUDA=1 MAX_JOBS=$(nproc)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
start=$(date +%s)
status=0
stamp() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} > "$OUT/environment.txt" 2>&1
cat "$OUT/environment.txt"

if [[ " $SKIP " != *" build "* ]]; then
  stamp "building dla_fused._C for sm ${TORCH_CUDA_ARCH_LIST} with $MAX_JOBS jobs"
  if ! $PY -m pip install --no-build-isolation --no-deps --no-index -v -e . > "$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; stamp "build failed"; exit 1
  fi
  grep '\[dla_fused\]' "$OUT/build.log"
  $PY -c "import dla_fused; dla_fused.backend_info()" | tee -a "$OUT/environment.txt"
fi

if [[ " $SKIP " != *" tests "* ]]; then
  stamp "CUDA tests"
  workers=()
  if $PY -c "import xdist" 2>/dev/null; then workers=(-n "${GPU_CHECK_WORKERS:-4}"); fi
  DLA_FUSED_TRITON_AUTOTUNE=0 timeout -s INT -k 30 "${GPU_CHECK_TEST_S:-240}" \
    $PY -m pytest tests/test_low_precision.py tests/test_kernels.py tests/test_triton_kernels.py ${workers[@]+"${workers[@]}"} \
    -q -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
  rc=$?
  tail -15 "$OUT/tests.log"
  if (( rc == 124 )); then stamp "tests STOPPED at the ${GPU_CHECK_TEST_S:-240} s limit: the counts above are partial"; fi
  (( rc == 0 )) || status=1
fi

if [[ " $SKIP " != *" bench "* ]]; then
  stamp "benchmarks"
  DLA_BENCH_OUT="$OUT" timeout -s INT -k 30 "${GPU_CHECK_BENCH_S:-240}" $PY -m pytest benchmarks -q -p no:cacheprovider --benchmark-disable-gc \
    --benchmark-json="$OUT/pytest_benchmark.json" > "$OUT/bench.log" 2>&1
  rc=$?
  tail -5 "$OUT/bench.log"
  if (( rc == 124 )); then stamp "benchmarks STOPPED at the ${GPU_CHECK_BENCH_S:-240} s limit: the summary is partial"; fi
  (( rc == 0 )) || status=1
fi

stamp "done (status $status)"
echo
cat "$OUT/summary.txt" 2>/dev/null || echo "(no benchmark summary)"
grep -E "passed|failed|error" "$OUT/tests.log" 2>/dev/null | tail -1
exit $status
