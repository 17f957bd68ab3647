#!/usr/bin/env bash
# The shortest useful device call after the Gluon kernels became defaults (tenth session, ~200 s on a
# warm H100 / H200): the Gluon gates at the heights they are taken by default (L1 prefill 128 + 16
# rows past, and the chain; L2 at 16 rows) and L2's untested 32 rows, the one-GPU layer tests (which
# now take them), then the layer at T = 4096 and 1 with the defaults and with both Gluon kernels off
# (no anchor: ab_bench.sh / probe_call.sh for that).
#   OUT=... bash scripts/lean_call.sh           (carry .whl)
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
nvidia-smi -L
export PYTHONPATH=/tmp/site:$PWD
PYT=(python3 -m pytest -v -rA -p no:cacheprovider -m "not multigpu")
timeout -k 5 ${TEST_S-70} "${PYT[@]}" tests/test_gemm_gpu.py \
    -k "gluon_l1_matches_triton or (gluon_l2_matches_triton and mxfp4-16) or (gluon_l2_matches_triton and mxfp4-32)" \
    > "$OUT/gluon_test.log" 2>&1
echo "=== Gluon gates (rc $?)"; grep -E "^(PASSED|FAILED|ERROR)|passed|failed" "$OUT/gluon_test.log" | tail -n 8
timeout -k 5 ${LAYER_S-80} "${PYT[@]}" tests/test_layer_gpu.py > "$OUT/layer_test.log" 2>&1
echo "=== layer GPU tests (rc $?)"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/layer_test.log" | tail -n 6
grep -cE "^PASSED" "$OUT/layer_test.log"
for g in auto off; do
    timeout -k 5 ${BENCH_S-40} python3 scripts/bench.py --preset dsv3 --routing uniform --no-baseline --iters 20 \
        --anchor none --tokens ${TOKENS-4096 1} --gluon-l1 $g --gluon-l2 $g --json "$OUT/layer_$g.json" \
        --out "$OUT/layer_$g" > "$OUT/layer_$g.log" 2>&1
    echo "=== layer, Gluon $g (rc $?)"; grep '^|' "$OUT/layer_$g.log" | cut -d'|' -f2-5
done
exit 0
