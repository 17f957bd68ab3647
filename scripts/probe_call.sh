#!/usr/bin/env bash
# One device call (eleventh session, second): after the fixes of the first two calls.
#   1. the layer tests the fast-path int bug broke (a layer's first call with no tokens bound y's
#      address 0 as a 32-bit int: every later call raised OverflowError), the new regression test,
#      FP8 weights through the Gluon kernels at 16-row tiles (now their default), graph replay, and
#      `test_launch.py`, while DeepGEMM builds;
#   2. `ab_bench.sh`: MXFP4 and FP8 weights (defaults) with the anchor at T = 4096 / 128 / 1; FP8
#      with L1 back on the Triton kernel (`--gluon-l1 off`) and with both off, at T = 128 / 1.
# ~5 minutes on a warm H100 / H200 (every step bounded). Logs under $OUT.
#   OUT=... bash scripts/probe_call.sh          (carry .whl and .dg)
# Shorter: NEW_TOKENS / FP8_TOKENS / DEC_TOKENS (the layer's T; empty skips), ANCHOR= (no DeepGEMM).
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
nvidia-smi -L
export PYTHONPATH=/tmp/site:$PWD
if [ -n "${ANCHOR-deepgemm}" ] && [ -d .dg ] && ! [ -d /tmp/dg/dgpkg/deep_gemm ]; then
    (timeout -k 5 420 bash .dg/build.sh || echo "DeepGEMM build failed") > "$OUT/dg_build.log" 2>&1 &
fi
L=tests/test_layer_gpu.py
timeout -k 5 ${TEST_S-150} python3 -m pytest -v -rA -p no:cacheprovider -m "not multigpu" --timeout 90 \
    $L::test_first_call_with_no_tokens $L::test_skewed_to_other_rank_and_full_capacity $L::test_masked_slots \
    $L::test_repeated_calls_no_drift $L::test_two_layers_share_workspace "$L::test_formats_vs_reference[fp8-fp8-bf16]" \
    "$L::test_streamed_fp8_path_vs_reference[fp8-fp8-bf16-False]" $L::test_cuda_graph_replay \
    tests/test_launch.py > "$OUT/layer_test.log" 2>&1
echo "=== GPU tests (rc $?)"; grep -E "^(FAILED|ERROR)|passed|failed|Timeout" "$OUT/layer_test.log" | tail -n 12
wait
tail -n 1 "$OUT/dg_build.log" 2>/dev/null
DEC="${DEC_TOKENS-128 1}"
env OUT="$OUT" BASE_TOKENS= NEW_TOKENS="${NEW_TOKENS-4096 128 1}" FP8_TOKENS="${FP8_TOKENS-4096 128 1}" \
    NEW2_ARGS="--weight-format fp8 --gluon-l1 off" NEW2_TOKENS="$DEC" \
    NEW3_ARGS="--weight-format fp8 --gluon-l1 off --gluon-l2 off" NEW3_TOKENS="$DEC" \
    timeout -k 5 ${AB_S-280} bash scripts/ab_bench.sh
exit 0
