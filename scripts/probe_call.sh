#!/usr/bin/env bash
# A device call (eleventh session, reordered in the twelfth, the thirteenth's variants added; ran in the thirteenth: docs/PERF.md): timings first, gates after:
#   1. (while DeepGEMM builds) the kernels alone at 32768 and 1024 uniform pairs (T = 4096, 128), 4-bit words in
#      column and in "lane" K order (`gemm_operands.LANE_K_ORDER`; Triton and Gluon kernels, their outputs
#      compared), the Gluon L1 gathering vs reading pair order, decoding ahead, gathering with one warp at the
#      decode tiles (`bench_gemm.py --gluon`), each Gluon kernel's cycle split (`--profile`);
#   2. `ab_bench.sh`: MXFP4 defaults with the anchor at T = 4096 / 512 / 128 / 1 (NEW_TOKENS), then (in the
#      order of what they may decide) `--lane-k` at 4096 and 128; everything at 4096 (`--lane-k --decode-ahead
#      --pair-x --l1-prefill-promote 2 --epilogue-hw-cvt`); `--epilogue-hw-cvt`, `--decode-ahead`
#      (`l1_gluon.DECODE_AHEAD`) and `--pair-x` alone at 4096; at 128 the lane order with the Gluon L1 at the
#      decode tiles gathering with one warp (`--gluon-l1 on --decode-gather-warps 1`);
#   3. in what time is left, the gates (`-k`): the lane order (`test_pre_dispatch_gpu.py`,
#      `test_fp8_operands.py`, `test_gemm_gpu.py`, `test_layer_gpu.py::test_lane_k_order`), the one-warp gather,
#      the epilogues' conversions (`test_epilogue_hw_cvt_same_bytes`), the pair order, profile build, decode
#      ahead and 256-K promotion gates;
#   4. `scripts/summarize_probe.py $OUT`: one table of it all.
# <= ~590 s on a warm H100 / H200 (every step bounded: BG_S 220, AB_S 280, TEST_S 70; run it under `timeout 595`
# with the device call's 600 s). Logs under $OUT.
#   OUT=... bash scripts/probe_call.sh          (carry .whl and .dg)
# Shorter: BG_S=0 / AB_S=0 / TEST_S=0 skip a step (the gates alone: BG_S=0 AB_S=0 TEST_S=560 ANCHOR=), NEW_TOKENS /
# PAIR_TOKENS / LANE_TOKENS (the layer's T; empty skips), ANCHOR= (no DeepGEMM).
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
nvidia-smi -L
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${ANCHOR-deepgemm}" ] && [ -d .dg ] && ! [ -d /tmp/dg/dgpkg/deep_gemm ]; then
    (timeout -k 5 420 bash .dg/build.sh || echo "DeepGEMM build failed") > "$OUT/dg_build.log" 2>&1 &
fi
if [ "${BG_S-220}" != 0 ]; then
    # decode first (both K orders, Triton and Gluon kernels), then prefill (column order, cycle splits)
    timeout -k 5 $(( ${BG_S-220} * 2 / 5 )) python3 scripts/bench_gemm.py --out "$OUT/bg_dec.json" --cases u128:256 \
        --stream --stream-kinds mxfp4,mxfp4_lane --gluon --iters 20 > "$OUT/bg_dec.log" 2>&1
    echo "=== bench_gemm decode (rc $?)"; grep -E "Gluon|streamed fp8" "$OUT/bg_dec.log" | head -n 30
    timeout -k 5 $(( ${BG_S-220} * 3 / 5 )) python3 scripts/bench_gemm.py --out "$OUT/bg.json" --cases u4096:256 \
        --stream --stream-kinds mxfp4 --gluon --profile --iters 20 > "$OUT/bg.log" 2>&1
    echo "=== bench_gemm prefill (rc $?)"; grep -E "Gluon|streamed fp8|cycle split" "$OUT/bg.log" | head -n 30
fi
wait
tail -n 1 "$OUT/dg_build.log" 2>/dev/null
if [ "${AB_S-280}" != 0 ]; then
    env OUT="$OUT" BASE_TOKENS= NEW_TOKENS="${NEW_TOKENS-4096 512 128 1}" FP8_TOKENS= \
        NEW2_ARGS="--lane-k" NEW2_TOKENS="${LANE_TOKENS-4096 128}" \
        NEW3_ARGS="--lane-k --decode-ahead --pair-x --l1-prefill-promote 2 --epilogue-hw-cvt" \
        NEW3_TOKENS="${PAIR_TOKENS-4096}" NEW4_ARGS="--epilogue-hw-cvt" NEW4_TOKENS="${PAIR_TOKENS-4096}" \
        NEW5_ARGS="--decode-ahead" NEW5_TOKENS="${PAIR_TOKENS-4096}" NEW6_ARGS="--pair-x" NEW6_TOKENS="${PAIR_TOKENS-4096}" \
        NEW7_ARGS="--lane-k --gluon-l1 on --decode-gather-warps 1" NEW7_TOKENS="${LANE_TOKENS-128}" \
        timeout -k 5 ${AB_S-280} bash scripts/ab_bench.sh
fi
if [ "${TEST_S-70}" != 0 ]; then
    timeout -k 5 ${TEST_S-70} python3 -m pytest -v -rA -p no:cacheprovider -m "not multigpu" --timeout 120 \
        tests/test_pre_dispatch_gpu.py tests/test_fp8_operands.py tests/test_gemm_gpu.py tests/test_layer_gpu.py \
        -k "lane or gather_warp or epilogue_hw_cvt or pair_ordered or order_pair_rows_bitwise_gpu or profile_build or decode_ahead or 256k" > "$OUT/gates.log" 2>&1
    echo "=== gates (rc $?)"; grep -E "^(FAILED|ERROR)|passed|failed|Timeout" "$OUT/gates.log" | tail -n 12
fi
python3 scripts/summarize_probe.py "$OUT" > "$OUT/summary.md" 2>&1; echo "=== summary"; cat "$OUT/summary.md"
exit 0
