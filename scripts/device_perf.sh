#!/usr/bin/env bash
# Ours vs DeepGEMM's SM90 fused mega MoE on one GPU (device machine, repository root).
#
#   OUT=/path/to/out bash scripts/device_perf.sh [all|build|mxfp4|fp8]
#
# (all: the three in a row, ~10 min at most; a device call is capped at 10 min, so when its budget is
# tight run `build mxfp4` and `build fp8` as two calls: the build is skipped when already there.)
# Needs, carried with the checkout: .whl/ (nvshmem4py and friends, as for gpu_suite.sh) and .dg/
# (DeepGEMM's kit, staged by shared/tools/deepgemm/stage.sh; when .dg/ is missing it is staged here
# from shared/tools/deepgemm or $DG_KIT). Builds DeepGEMM (~2 min), then runs scripts/bench.py
# single-process (E 256 all local): dsv3, MXFP4 weights at T = 1..4096, FP8 weights at 1/128/4096,
# uniform routing, anchor on, no NCCL baseline. Every step under `timeout`, logs and JSON under $OUT.
set -u -o pipefail
WHAT="${*:-all}"
case " $WHAT " in *" all "*) WHAT="build mxfp4 fp8" ;; esac
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
status=0
step() {  # step NAME TIMEOUT_S CMD...: output to the console and $OUT/NAME.log
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=$?
    echo "=== $name: exit $rc" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
    return "$rc"
}
nvidia-smi -L | tee "$OUT/gpu.txt"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
else
    echo "no .whl/ carried: relying on the machine's nvshmem4py / cuda-python" | tee -a "$OUT/gpu.txt"
fi
if [ ! -f .dg/build.sh ]; then   # stage the kit the way stage.sh does (without touching .git)
    kit="${DG_KIT:-shared/tools/deepgemm}"
    [ -f "$kit/dgpkg.tgz" ] || { echo "no .dg/ and no DeepGEMM kit at $kit (set DG_KIT)"; exit 1; }
    mkdir -p .dg && cp "$kit"/dgpkg.tgz "$kit"/apache_tvm_ffi-*.whl .dg/
    sed -n "/^cat > .dg\/build.sh <<'SH'$/,/^SH$/p" "$kit/stage.sh" | sed '1d;$d' > .dg/build.sh
fi
if [ -f /tmp/dg/dgpkg/deep_gemm/_C.so ] && [ -d /tmp/site/tvm_ffi ]; then
    echo "deep_gemm already built under /tmp/dg/dgpkg" | tee -a "$OUT/gpu.txt"
else
    step build_deepgemm 480 bash .dg/build.sh || exit 1
fi
export PYTHONPATH=/tmp/site:/tmp/dg/dgpkg:$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$OUT/gpu.txt"
COMMON=(--preset dsv3 --routing uniform --anchor deepgemm --no-baseline)
for w in $WHAT; do
    case $w in
        build) ;;
        mxfp4) step bench_mxfp4 570 python3 scripts/bench.py "${COMMON[@]}" --tokens 1 16 128 512 2048 4096 \
                   --json "$OUT/bench.json" --out "$OUT/bench" ;;
        fp8) step bench_fp8 450 python3 scripts/bench.py "${COMMON[@]}" --weight-format fp8 --tokens 1 128 4096 \
                 --json "$OUT/bench_fp8.json" --out "$OUT/bench_fp8" ;;
        *) echo "unknown step $w (all|build|mxfp4|fp8)"; status=1 ;;
    esac
done
exit $status
