#!/usr/bin/env bash
# One device call: GPU tests (default: the staged-rebase ones), an A/B of a bench.py switch
# (NEW_ARGS) without the anchor, then the tile sweeps (prefill u4096 at bm 128, MXFP4 and FP8
# weights; 4-bit decode u1 / u128 at bm 16). Each step can be skipped (AB= PREFILL= DECODE=
# TESTS=). Logs under $OUT.
#   OUT=... [TESTS=...] [NEW_ARGS=--no-stage-rebase] bash scripts/sweep_call.sh
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
TESTS="${TESTS-tests/test_pre_dispatch_gpu.py::test_rebased_staging_bitwise tests/test_layer_gpu.py::test_staged_rebase_vs_reference tests/test_compile_gpu.py::test_launches_per_forward}"
if [ -n "$TESTS" ]; then
    timeout -k 5 240 python3 -m pytest -q -x -p no:cacheprovider -m "gpu and not multigpu" $TESTS > "$OUT/tests.log" 2>&1
    echo "=== tests"; tail -n 4 "$OUT/tests.log"
fi
if [ -n "${AB-1}" ]; then
    OUT="$OUT" ANCHOR= BASE_DIR="${BASE_DIR:-.}" NEW_ARGS="${NEW_ARGS---no-stage-rebase}" NEW2_ARGS="${NEW2_ARGS:-}" BASE_TOKENS="${AB_TOKENS-1 128 512 4096}" \
        NEW_TOKENS="${AB_TOKENS-1 128 512 4096}" FP8_TOKENS= timeout -k 5 ${AB_S-150} bash scripts/ab_bench.sh
fi
if [ -n "${PREFILL-1}" ]; then
    timeout -k 5 ${PREFILL_S-200} python3 scripts/bench_gemm.py --out "$OUT/sweep_prefill.json" --cases u4096:256 --formats ${PREFILL_FORMATS-mxfp4/fp8,fp8/fp8} --stream --stream-kinds mxfp4 \
        --stream-sweep --stream-sweep-bms 128 --iters 20 > "$OUT/sweep_prefill.log" 2>&1
    echo "=== prefill sweep"; grep -E "stream|streamed" "$OUT/sweep_prefill.log" | tail -n 40
fi
if [ -n "${DECODE-1}" ]; then
    timeout -k 5 ${DECODE_S-150} python3 scripts/bench_gemm.py --out "$OUT/sweep_decode.json" --cases u1:256,u128:256 --formats mxfp4/fp8 --stream --stream-kinds mxfp4 \
        --stream-sweep --stream-sweep-bms 16 --iters 30 > "$OUT/sweep_decode.log" 2>&1
    echo "=== decode sweep"; grep -E "stream|streamed" "$OUT/sweep_decode.log" | tail -n 30
fi
