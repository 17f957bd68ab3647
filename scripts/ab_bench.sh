#!/usr/bin/env bash
# This tree against a base tree and DeepGEMM's fused SM90 mega MoE, in one device call (one card):
# optional GPU tests with DeepGEMM's build (~2 min, skipped when built) beside them, then `scripts/bench.py` (dsv3,
# E 256 on one GPU, uniform routing, CUDA graph, no NCCL baseline): the base tree first (MXFP4),
# this tree with the anchor (MXFP4), then this tree with FP8 weights and the anchor.
#
#   git archive REV mega_moe_layer scripts | tar -x -C .base     # here, once (.base/ ignored)
#   OUT=/path TESTS="tests/test_x.py" [TESTS_S=300] BASE_TOKENS="1 128 512" NEW_TOKENS="1 128 512 4096" \
#       FP8_TOKENS="1 128 512 4096" [ANCHOR=] bash scripts/ab_bench.sh
#
# Carry .whl (nvshmem4py), .dg (shared/tools/deepgemm/stage.sh) and .base. An empty *_TOKENS
# skips that run. BASE_DIR=. with NEW_ARGS=--no-stage-rebase (say) compares a switch of this tree;
# BASE_ARGS go to the base run; NEW2_ARGS adds a second run of this tree with those arguments (no anchor; at NEW2_TOKENS if set), NEW3_ARGS / NEW3_TOKENS a third, ... up to NEW8_ARGS / NEW8_TOKENS; FP8_ARGS go to the FP8-weights run. Logs and JSON under $OUT; every step under `timeout`.
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
TESTS="${TESTS:-}"
BASE_TOKENS="${BASE_TOKENS-1 128 512}"; NEW_TOKENS="${NEW_TOKENS-1 128 512 4096}"; FP8_TOKENS="${FP8_TOKENS-}"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
nvidia-smi -L
status=0
ANCHOR="${ANCHOR-deepgemm}"      # ANCHOR= (empty): no DeepGEMM build, no anchor columns
build_pid=
if [ -n "$ANCHOR" ] && ! { [ -d /tmp/dg/dgpkg/deep_gemm ] && [ -d /tmp/site/tvm_ffi ]; }; then
    # the build is host work (nvcc): it runs beside the GPU tests
    (timeout -k 5 420 bash .dg/build.sh || echo "DeepGEMM build failed: no anchor") > "$OUT/dg_build.log" 2>&1 &
    build_pid=$!
fi
if [ -n "$TESTS" ]; then
    PYTHONPATH=/tmp/site:$PWD timeout -k 5 "${TESTS_S:-300}" python3 -m pytest -q -x -p no:cacheprovider -m "not multigpu" \
        $TESTS > "$OUT/tests.log" 2>&1 || status=1
    echo "=== tests"; tail -n 3 "$OUT/tests.log"
fi
if [ -z "$ANCHOR" ]; then
    echo "no anchor"
elif [ -n "$build_pid" ]; then
    wait "$build_pid"; cat "$OUT/dg_build.log"
else
    echo "deep_gemm already unpacked and built"
fi
COMMON=(--preset dsv3 --routing uniform --no-baseline --iters 20)
run() {  # run NAME DIR TOKENS ARGS...: bench.py in DIR
    local name=$1 dir=$2 tokens=$3; shift 3
    [ -n "$tokens" ] || return 0
    (cd "$dir" && PYTHONPATH=/tmp/site:/tmp/dg/dgpkg:$PWD timeout -k 5 280 python3 scripts/bench.py "${COMMON[@]}" \
        --tokens $tokens --json "$OUT/$name.json" --out "$OUT/$name" "$@") > "$OUT/$name.log" 2>&1 || status=1
    echo "=== $name ($dir)"; grep '^|' "$OUT/$name.log" | cut -d'|' -f3-12
}
BASE_DIR="${BASE_DIR:-.base}"
[ -d "$BASE_DIR/mega_moe_layer" ] && run base "$BASE_DIR" "$BASE_TOKENS" --anchor none ${BASE_ARGS:-}
run new . "$NEW_TOKENS" --anchor "${ANCHOR:-none}" ${NEW_ARGS:-}
for i in 2 3 4 5 6 7 8; do        # NEW<i>_ARGS / NEW<i>_TOKENS: more runs of this tree, no anchor
    a="NEW${i}_ARGS"; t="NEW${i}_TOKENS"
    [ -n "${!a:-}" ] && run "new$i" . "${!t-$NEW_TOKENS}" --anchor none ${!a}
done
run fp8 . "$FP8_TOKENS" --anchor "${ANCHOR:-none}" --weight-format fp8 ${FP8_ARGS:-}
exit $status
