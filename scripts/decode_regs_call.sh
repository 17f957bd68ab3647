#!/usr/bin/env bash
# One device call (2026-12-07, sixth session): DeepGEMM built in the background while the 4-bit
# decode tile sweep with capped registers runs (`bench_gemm.py --stream-sweep --stream-sweep-capped`,
# u128 / u512 at 16 and 32 pairs per tile), then `ab_bench.sh` with the anchor: rows past block_m
# of 32 at T = 4096 (base run), the defaults at every T with DeepGEMM beside them, 32-pair decode
# tiles at 4 CTAs (registers capped at 128) at T = 512 (with the tail tiles, and as one height), FP8 weights at T = 128. Logs under $OUT.
#   OUT=... bash scripts/decode_regs_call.sh
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
nvidia-smi -L
build_pid=
if [ -d .dg ] && ! [ -d /tmp/dg/dgpkg/deep_gemm ]; then
    (timeout -k 5 420 bash .dg/build.sh || echo "DeepGEMM build failed") > "$OUT/dg_build.log" 2>&1 &
    build_pid=$!
fi
PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${SWEEP_S-110} python3 scripts/bench_gemm.py --out "$OUT/sweep_decode.json" \
    --cases ${SWEEP_CASES-u128:256,u512:256} --formats mxfp4/fp8 --stream --stream-kinds mxfp4 --stream-sweep \
    --stream-sweep-bms 16,32 --stream-sweep-capped --iters 30 > "$OUT/sweep_decode.log" 2>&1
echo "=== decode sweep"; grep -E "stream|streamed" "$OUT/sweep_decode.log" | tail -n 40
[ -n "$build_pid" ] && { wait "$build_pid"; tail -n 2 "$OUT/dg_build.log"; }
OUT="$OUT" BASE_DIR=. BASE_ARGS="--over-m 32" BASE_TOKENS="${BASE_TOKENS-4096}" NEW_TOKENS="${NEW_TOKENS-4096 512 128 1}" \
    NEW2_TOKENS="${NEW2_TOKENS-512}" NEW2_ARGS="--heuristic FP4_STREAM_DECODE_M32=(4,3,4,True)" \
    NEW3_TOKENS="${NEW3_TOKENS-512}" NEW3_ARGS="--heuristic FP4_STREAM_DECODE_M32=(4,3,4,True) --single-height" FP8_TOKENS="${FP8_TOKENS-128}" \
    timeout -k 5 ${AB_S-400} bash scripts/ab_bench.sh
exit 0
