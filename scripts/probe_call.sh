#!/usr/bin/env bash
# One device call (tenth session, after the Gluon kernels' first run): the Gluon kernels are now taken
# by default where they measured faster (`l1_gluon.wanted`: L1 at 128-row tiles; `l2_gluon.wanted`:
# L2 at 16). Checks that default, then times it:
#   1. the Gluon L1 gates (`-k gluon_l1`) and the L2's at 32 rows, then the one-GPU layer tests
#      (`test_layer_gpu.py`), which now run through the Gluon kernels, while DeepGEMM builds;
#   2. the Triton and Gluon kernels alone at 32768, 1024 and 8 uniform pairs (T = 4096, 128, 1),
#      4-bit and 8-bit weight operands (`bench_gemm.py --gluon`: outputs compared, then timed);
#   3. `ab_bench.sh`: the layer (default) with the anchor at T = 4096 / 128 / 1 and with both Gluon
#      kernels off (`--gluon-l1 off --gluon-l2 off`) at the same T; FP8 weights likewise at 4096 / 128;
#   4. the Gluon probe's register-decode and gather modes (`probe_gluon_promote.py --modes
#      ws,ws4,ws4r,ws4g`), which say what holds the 4-bit L1 below the probe's FP8 rate.
# ~8 minutes on a warm H100 / H200 (every step bounded). Logs under $OUT.
#   OUT=... bash scripts/probe_call.sh          (carry .whl and .dg)
# Shorter: BG_CASES= (no kernel timings), PROBE_S=0 (no probe), NEW_TOKENS / FP8_TOKENS (the layer's T;
# FP8_TOKENS= skips FP8 weights), ANCHOR= (no DeepGEMM). The shortest useful call (~200 s: the gates,
# the layer tests, the layer with the Gluon kernels auto / off at T = 4096 and 1):
#   OUT=... BG_CASES= PROBE_S=0 NEW_TOKENS="4096 1" FP8_TOKENS= ANCHOR= LAYER_S=80 bash scripts/probe_call.sh
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
nvidia-smi -L
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${ANCHOR-deepgemm}" ] && [ -d .dg ] && ! [ -d /tmp/dg/dgpkg/deep_gemm ]; then
    (timeout -k 5 420 bash .dg/build.sh || echo "DeepGEMM build failed") > "$OUT/dg_build.log" 2>&1 &
fi
PYT=(python3 -m pytest -v -rA -p no:cacheprovider -m "not multigpu")
timeout -k 5 ${TEST_S-90} "${PYT[@]}" tests/test_gemm_gpu.py \
    -k "gluon_l1 or (gluon_l2_matches_triton and mxfp4-32)" > "$OUT/gluon_test.log" 2>&1
echo "=== Gluon GPU gates (rc $?)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gluon_test.log" | tail -n 8
timeout -k 5 ${LAYER_S-170} "${PYT[@]}" tests/test_layer_gpu.py > "$OUT/layer_test.log" 2>&1
echo "=== layer GPU tests (rc $?)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/layer_test.log" | tail -n 8
[ -n "${BG_CASES-x}" ] && timeout -k 5 ${BG_S-150} python3 scripts/bench_gemm.py --out "$OUT/bg.json" --cases "${BG_CASES-u4096:256,u128:256,u1:256}" --stream \
    --stream-kinds mxfp4,fp4_as_fp8 --gluon --iters 20 > "$OUT/bg.log" 2>&1
echo "=== bench_gemm (rc $?)"; grep -E "Gluon|streamed fp8" "$OUT/bg.log" | head -n 16
wait
tail -n 1 "$OUT/dg_build.log" 2>/dev/null
env OUT="$OUT" BASE_TOKENS= NEW_TOKENS="${NEW_TOKENS-4096 128 1}" NEW2_ARGS="--gluon-l1 off --gluon-l2 off" \
    FP8_TOKENS="${FP8_TOKENS-4096 128}" NEW3_ARGS="--weight-format fp8 --gluon-l1 off --gluon-l2 off" \
    NEW3_TOKENS="${FP8_TOKENS-4096 128}" timeout -k 5 ${AB_S-220} bash scripts/ab_bench.sh
[ "${PROBE_S-80}" != 0 ] && timeout -k 5 ${PROBE_S-80} python3 scripts/probe_gluon_promote.py --modes ws,ws4,ws4r,ws4g --iters 20 \
    > "$OUT/probe.log" 2>&1
echo "=== probe (rc $?)"; tail -n 8 "$OUT/probe.log"
exit 0
