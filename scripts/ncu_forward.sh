#!/usr/bin/env bash
# Nsight Compute on the layer's own grouped GEMMs inside a forward (device machine, repository root,
# .whl carried): the second plain forward's L1 and L2 at each T of $TOKENS (dsv3, E 256, one GPU, no
# PDL, no CUDA graph), speed-of-light, memory, warp-state, scheduler, occupancy and launch sections.
# `profile_forward.py --ncu` runs three forwards per T; each has one L1 and one L2 per tile height.
#
#   OUT=/path TOKENS="128" [KERNELS="l1 l2"] [NCU_ARGS=--no-over] bash scripts/ncu_forward.sh
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD
for T in ${TOKENS:-128}; do
    for k in ${KERNELS:-l1 l2}; do
        timeout -k 5 "${NCU_S:-150}" ncu --clock-control none -k "regex:_${k}_kernel" --launch-skip 1 --launch-count 1 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
            --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis \
            python3 scripts/profile_forward.py --ncu --tokens "$T" --experts 256 --no-pdl ${NCU_ARGS:-} \
            > "$OUT/ncu_${k}_T$T.log" 2>&1; echo "=== ncu $k T=$T: exit $?"
        grep -E '_kernel|Throughput|Duration|Stall|Issued|Eligible|Active Warps|Registers|Achieved|Waves|Bandwidth|Hit Rate|No Eligible|Grid Size|Block Size|Shared Memory Config|Executed Ipc' \
            "$OUT/ncu_${k}_T$T.log" | head -60
    done
done
