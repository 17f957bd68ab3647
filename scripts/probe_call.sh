#!/usr/bin/env bash
# One device call for the next session (written 2026-12-07, seventh): the Gluon L1's GPU test
# (`kernels/l1_gluon.py`, built and compiled on the CPU, never run: it must equal the Triton L1)
# while DeepGEMM builds in the background, the Gluon probe's two unmeasured modes
# (`scripts/probe_gluon_promote.py`: ws4r, the 4-bit decode into the MMA's register operand, and
# ws4g, its token rows gathered; each in its own process, so a fault loses only its own figures),
# then `ab_bench.sh`: this tree with the anchor at T = 4096 / 512 / 128 / 1, the same with
# `--gluon-l1` at 4096 (MXFP4; the only T here whose plan has 128-row tiles), and FP8 weights with the
# anchor at 4096, plus `--gluon-l1`.
# ~8 minutes on a warm H100 / H200. Logs under $OUT.
#   OUT=... bash scripts/probe_call.sh          (carry .whl and .dg)
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
PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${TEST_S-240} python3 -m pytest -q -p no:cacheprovider -m "not multigpu" \
    tests/test_gemm_gpu.py -k "gluon_l1" > "$OUT/gluon_test.log" 2>&1
echo "=== Gluon L1 GPU test (rc $?)"; grep -E "passed|failed|Error|assert" "$OUT/gluon_test.log" | tail -n 8
for spec in "64 ws4r" "64 ws4g"; do
    set -- $spec
    PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${PROBE_S-60} python3 scripts/probe_gluon_promote.py --block-r $1 \
        --modes ws,$2 > "$OUT/probe_$2.log" 2>&1
    echo "=== probe, $1 rows per CTA, modes sync,ws,$2 (rc $?)"; grep -v "^ *$" "$OUT/probe_$2.log" | tail -n 4
done
[ -n "$build_pid" ] && { wait "$build_pid"; tail -n 2 "$OUT/dg_build.log"; }
OUT="$OUT" BASE_TOKENS= NEW_TOKENS="${NEW_TOKENS-4096 512 128 1}" NEW2_ARGS="--gluon-l1" \
    NEW2_TOKENS="${NEW2_TOKENS-4096}" NEW3_ARGS="--gluon-l1 --weight-format fp8" NEW3_TOKENS="${NEW3_TOKENS-4096}" \
    FP8_TOKENS="${FP8_TOKENS-4096}" timeout -k 5 ${AB_S-400} bash scripts/ab_bench.sh
exit 0
