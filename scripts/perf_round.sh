#!/usr/bin/env bash
# One device call on 1 GPU: GPU tests, the GEMM micro-benchmark, DeepGEMM built and the end-to-end
# bench beside it. Logs and JSON under $OUT. Needs .whl/ and .dg/ carried (see device_perf.sh).
#   TESTS="tests/test_gemm_gpu.py tests/test_layer_gpu.py" BENCH_GEMM_ARGS="--cases u4096:256 --sweep" \
#   TOKENS="1 128 512 2048 4096" bash scripts/perf_round.sh
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
status=0
bash scripts/device_perf.sh build > "$OUT/build.txt" 2>&1 || { tail -5 "$OUT/build.txt"; status=1; }
export PYTHONPATH=/tmp/site:/tmp/dg/dgpkg:$PWD
if [ -n "${TESTS-tests/test_gemm_gpu.py tests/test_layer_gpu.py}" ]; then
  timeout -k 10 ${TEST_LIMIT:-300} python3 -m pytest -q -x -rs -p no:cacheprovider -m gpu \
    ${TESTS-tests/test_gemm_gpu.py tests/test_layer_gpu.py} > "$OUT/tests.log" 2>&1 || status=1
  tail -n 5 "$OUT/tests.log"
fi
if [ -n "${BENCH_GEMM_ARGS-}" ]; then
  timeout -k 10 ${BENCH_GEMM_LIMIT:-200} python3 scripts/bench_gemm.py --out "$OUT/bench_gemm.json" --iters 20 \
    $BENCH_GEMM_ARGS > "$OUT/bench_gemm.log" 2>&1 || status=1
  grep -v "^|" "$OUT/bench_gemm.log" | tail -n 30
fi
if [ -n "${TOKENS-1 128 512 2048 4096}" ]; then
  timeout -k 10 ${BENCH_LIMIT:-330} python3 scripts/bench.py --preset dsv3 --tokens ${TOKENS-1 128 512 2048 4096} \
    --routing uniform --anchor deepgemm --no-baseline --iters 20 ${BENCH_ARGS:-} --json "$OUT/bench.json" \
    --out "$OUT/b" > "$OUT/bench.log" 2>&1 || status=1
  grep "^| uniform" "$OUT/bench.log"
fi
exit $status
