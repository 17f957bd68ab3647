#!/usr/bin/env bash
# The next device call (written in the eleventh session, reordered in the twelfth): the pair-ordered
# token rows for the Gluon L1's prefill tiles (`rebase.order_pair_rows`, `l1_grouped_gemm(x_pairs=)`,
# `nvshmem_backend.PAIR_ORDER_X`) and the Gluon kernels' cycle counters (`PROFILE`), built on the CPU:
#   1. (while DeepGEMM builds) the kernels alone at 32768 and 1024 uniform pairs (T = 4096, 128): the Gluon L1
#      gathering vs reading pair order, and the copy, vs decoding ahead (`bench_gemm.py --gluon`), each Gluon kernel's
#      cycle split (`--profile`);
#   2. `ab_bench.sh`: MXFP4 defaults with the anchor at T = 4096 / 512 / 128 / 1 (NEW_TOKENS), then
#      `--pair-x`, `--decode-ahead` (`l1_gluon.DECODE_AHEAD`) and `--decode-ahead --l1-prefill-promote 2`
#      (`PREFILL_PROMOTE_K`) at 4096;
#   3. in what time is left, the gates: the copy bitwise (`test_order_pair_rows_bitwise_gpu`), the
#      Gluon L1 with the rows in pair order equal to the Triton kernel's bit for bit
#      (`test_gluon_l1_pair_ordered_x_matches_triton`), its profile builds
#      (`test_gluon_l1_profile_build`), the layer with `PAIR_ORDER_X` against the reference
#      (`test_layer_gpu.py::test_pair_ordered_x`).
# <= ~590 s on a warm H100 / H200 (every step bounded: BG_S 210, AB_S 290, TEST_S 80; run it under `timeout 595`
# with the device call's 600 s). Logs under $OUT.
#   OUT=... bash scripts/probe_call.sh          (carry .whl and .dg)
# Shorter: BG_S=0 (no kernel timings), NEW_TOKENS / PAIR_TOKENS (the layer's T; empty skips), ANCHOR= (no DeepGEMM).
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
nvidia-smi -L
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${ANCHOR-deepgemm}" ] && [ -d .dg ] && ! [ -d /tmp/dg/dgpkg/deep_gemm ]; then
    (timeout -k 5 420 bash .dg/build.sh || echo "DeepGEMM build failed") > "$OUT/dg_build.log" 2>&1 &
fi
if [ "${BG_S-210}" != 0 ]; then
    timeout -k 5 ${BG_S-210} python3 scripts/bench_gemm.py --out "$OUT/bg.json" --cases u4096:256,u128:256 --stream \
        --stream-kinds mxfp4 --gluon --profile --iters 20 > "$OUT/bg.log" 2>&1
    echo "=== bench_gemm (rc $?)"; grep -E "Gluon|streamed fp8|cycle split" "$OUT/bg.log" | head -n 40
fi
wait
tail -n 1 "$OUT/dg_build.log" 2>/dev/null
env OUT="$OUT" BASE_TOKENS= NEW_TOKENS="${NEW_TOKENS-4096 512 128 1}" FP8_TOKENS= \
    NEW2_ARGS="--pair-x" NEW2_TOKENS="${PAIR_TOKENS-4096}" NEW3_ARGS="--decode-ahead" NEW3_TOKENS="${PAIR_TOKENS-4096}" \
    NEW4_ARGS="--decode-ahead --l1-prefill-promote 2" NEW4_TOKENS="${PAIR_TOKENS-4096}" timeout -k 5 ${AB_S-290} bash scripts/ab_bench.sh
timeout -k 5 ${TEST_S-80} python3 -m pytest -v -rA -p no:cacheprovider -m "not multigpu" --timeout 120 \
    tests/test_fp8_operands.py tests/test_gemm_gpu.py -k "pair_ordered or order_pair_rows_bitwise_gpu or profile_build or decode_ahead or 256k" \
    tests/test_layer_gpu.py > "$OUT/gates.log" 2>&1
echo "=== gates (rc $?)"; grep -E "^(FAILED|ERROR)|passed|failed|Timeout" "$OUT/gates.log" | tail -n 12
exit 0
