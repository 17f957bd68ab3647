#!/usr/bin/env bash
# One device call for the next session (written 2026-12-07, seventh): DeepGEMM built in the
# background while the Gluon probe runs (`scripts/probe_gluon_promote.py`: ws, ws4, ws4r (the
# 4-bit decode into the MMA's register operand) and ws4g (its token rows gathered), neither yet run
# on a GPU; each group of modes in its own process, so a mode that faults or hangs loses only its
# own figures), then `ab_bench.sh` with the anchor: this tree at T = 1 / 128 / 512 / 4096 and FP8 weights at T = 128. ~6 minutes on a warm
# H100 / H200. Logs under $OUT.
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
# one process per group of modes: a warp-specialised mode that hangs loses only its own figures
for spec in "64 ws,ws4" "64 ws4r" "64 ws4g" "128 ws"; do
    set -- $spec
    PYTHONPATH=/tmp/site:$PWD timeout -k 5 ${PROBE_S-75} python3 scripts/probe_gluon_promote.py --block-r $1 \
        --modes $2 > "$OUT/probe_$1_${2//,/_}.log" 2>&1
    echo "=== probe, $1 rows per CTA, modes sync,$2 (rc $?)"; grep -v "^ *$" "$OUT/probe_$1_${2//,/_}.log" | tail -n 5
done
[ -n "$build_pid" ] && { wait "$build_pid"; tail -n 2 "$OUT/dg_build.log"; }
OUT="$OUT" BASE_TOKENS= NEW_TOKENS="${NEW_TOKENS-4096 512 128 1}" FP8_TOKENS="${FP8_TOKENS-128}" \
    timeout -k 5 ${AB_S-330} bash scripts/ab_bench.sh
exit 0
