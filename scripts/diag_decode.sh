#!/usr/bin/env bash
# Where decode time goes (device machine, repository root, .whl carried): per-kernel times of one
# forward (torch.profiler, no PDL) at T = 1 / 128 / 512 on one GPU (E 256, dsv3), then Nsight
# Compute's speed-of-light, memory, warp-state and scheduler sections of the streamed 4-bit L1 and
# L2 at T = 128 (`bench_gemm.py --stream`, routed case u128:256). Logs under $OUT.
# NOTE: bench_gemm launches the default (bf16-mainloop) kernels and its reference checks first,
# under the same kernel names: with NCU_SKIP=6 (2026-12-07) ncu caught those, not the streamed
# ones; raise NCU_SKIP and check the grid / registers it reports (streamed 4-bit: 124 / 121 regs).
#
#   OUT=/path bash scripts/diag_decode.sh [tests] [profile] [ncu]
#
# tests: the GPU tests of the forward's launches, count+plan, dispatch / combine, the layer.
set -u -o pipefail
WHAT="${*:-profile ncu}"
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi -L
for w in $WHAT; do
    case $w in
        tests)
            timeout -k 5 420 python3 -m pytest -q -x -p no:cacheprovider -m "not multigpu" \
                tests/test_count_plan.py tests/test_dispatch_combine.py tests/test_compile_gpu.py \
                tests/test_layer_gpu.py > "$OUT/tests.log" 2>&1; echo "tests: exit $?"
            tail -n 15 "$OUT/tests.log" ;;
        profile)
            timeout -k 5 240 python3 scripts/profile_forward.py --tokens 1 128 512 --experts 256 --no-pdl \
                > "$OUT/profile.log" 2>&1; echo "profile: exit $?"
            grep -E '^T=|^===|_kernel' "$OUT/profile.log" | cut -c1-52,120-230 ;;
        ncu)
            timeout -k 5 300 ncu --clock-control none -k 'regex:_l[12]_kernel' --launch-skip "${NCU_SKIP:-40}" --launch-count 2 \
                --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
                --section SchedulerStats --section Occupancy --section LaunchStats \
                python3 scripts/bench_gemm.py --out "$OUT/ncu_bench.json" --cases u128:256 --formats mxfp4/fp8 \
                --stream --stream-kinds mxfp4 --iters 20 > "$OUT/ncu.log" 2>&1; echo "ncu: exit $?"
            grep -E '_kernel|Throughput|Duration|Stall|Issued|Eligible|Active Warps|Registers|Achieved|Waves|Bandwidth|Hit Rate|No Eligible' \
                "$OUT/ncu.log" | head -90 ;;
    esac
done
