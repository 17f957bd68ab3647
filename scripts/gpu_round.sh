#!/usr/bin/env bash
# One device call on 1 GPU: the GEMM + layer GPU tests, then the GEMM micro-benchmark; logs under $OUT.
#   bash scripts/gpu_round.sh [tests...]   (default: tests/test_gemm_gpu.py tests/test_layer_gpu.py)
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
status=0
TESTS=${*:-tests/test_gemm_gpu.py tests/test_layer_gpu.py}
timeout -k 10 ${TEST_LIMIT:-300} python3 -m pytest -q -rs ${PYTEST_X:--x} -p no:cacheprovider -m gpu $TESTS 2>&1 | tee "$OUT/tests.log" | tail -n 40 || status=1
if [ -n "${BENCH_GEMM-1}" ]; then
  timeout -k 10 ${BENCH_LIMIT:-200} python3 scripts/bench_gemm.py --out "$OUT/bench_gemm.json" --iters 20 ${BENCH_GEMM_ARGS:-} 2>&1 | tee "$OUT/bench_gemm.log" | tail -n 30 || status=1
fi
exit $status
