#!/usr/bin/env bash
# One device call for the next session (written 2026-12-07, seventh): the Gluon L1 and L2
# (`kernels/l1_gluon.py`, `l2_gluon.py`, built and compiled on the CPU, never run) first: their GPU
# tests against the Triton kernels (prefill and decode tile heights) while DeepGEMM builds in the
# background; if they pass, the Triton and Gluon kernels alone at 32768 and 1024 uniform pairs
# (`bench_gemm.py --gluon`: outputs compared, then timed); then `ab_bench.sh`: this tree with the
# anchor at T = 4096 / 128 / 1, with the Gluon kernels whose tests passed (`--gluon-l1`,
# `--gluon-l2`) at the same T, and FP8 weights with the anchor at 4096 (plus those kernels). ~9
# minutes on a warm H100 / H200 (run it with the full 600 s; every step is bounded). Logs under $OUT.
#   OUT=... bash scripts/probe_call.sh          (carry .whl and .dg)
# The Gluon probe's unmeasured modes (ws4r, ws4g) are left out; run
#   python scripts/probe_gluon_promote.py --modes ws,ws4r,ws4g
# in a call of their own if the kernel's figures need explaining.
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
# one pytest process for both (the Triton kernels they compare against compile once; -v: each
# result is in the log as it comes, should the call run out of device time); a kernel is timed
# below only if every one of its tests passed
# one process per kernel, each bounded: a kernel that hangs (a barrier never completing) costs its
# own budget, not the other's
: > "$OUT/gluon_test.log"
for k in l1 l2; do
    PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${TEST_S-140} python3 -m pytest -v -rA -p no:cacheprovider \
        -m "not multigpu" tests/test_gemm_gpu.py -k "gluon_$k" >> "$OUT/gluon_test.log" 2>&1
    echo "=== Gluon $k GPU tests (rc $?)"
done
grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/gluon_test.log" | tail -n 14
gl_args=""
for k in l1 l2; do         # timing a kernel that computes something else would mean nothing
    if grep -q "^PASSED .*gluon_$k" "$OUT/gluon_test.log" && ! grep -qE "^(FAILED|ERROR) .*gluon_$k" "$OUT/gluon_test.log"; then
        gl_args="$gl_args --gluon-$k"
    fi
done
echo "timed with: ${gl_args:-(none)}"
new2=()
if [ -n "$gl_args" ]; then
    new2=(NEW2_ARGS="$gl_args" NEW2_TOKENS="${NEW2_TOKENS-4096 128 1}" NEW3_ARGS="$gl_args --weight-format fp8"
          NEW3_TOKENS="${NEW3_TOKENS-4096}")
fi
if [ -n "$gl_args" ]; then
    PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${BG_S-90} python3 scripts/bench_gemm.py --out "$OUT/bg.json" \
        --cases u4096:256,u128:256 --stream --stream-kinds mxfp4 --gluon --iters 20 > "$OUT/bg.log" 2>&1
    echo "=== bench_gemm (rc $?)"; grep -E "streamed|Gluon" "$OUT/bg.log" | head -n 8
fi
if [ -z "$gl_args" ] && nvidia-smi -L | grep -q H100 && [ -z "${AB_ALWAYS-}" ]; then
    # the layer and the anchor without the Gluon kernels were timed on an H100 in the seventh session
    echo "no Gluon kernel passed on an H100: ab_bench skipped (AB_ALWAYS=1 runs it)"
    [ -n "$build_pid" ] && kill -- "$build_pid" 2>/dev/null
    exit 0
fi
[ -n "$build_pid" ] && { wait "$build_pid"; tail -n 2 "$OUT/dg_build.log"; }
env OUT="$OUT" BASE_TOKENS= NEW_TOKENS="${NEW_TOKENS-4096 128 1}" FP8_TOKENS="${FP8_TOKENS-4096}" "${new2[@]}" \
    timeout -k 5 ${AB_S-200} bash scripts/ab_bench.sh
exit 0
