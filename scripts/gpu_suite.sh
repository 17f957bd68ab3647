#!/usr/bin/env bash
# The GPU test suite and benchmarks in one call (device machine, repository root, .whl carried).
#
#   bash scripts/gpu_suite.sh 1 [bench]   # 1 GPU: CPU suite on CUDA, every -m gpu file, micro-benches
#   bash scripts/gpu_suite.sh 2 [bench]   # N GPUs: torchrun -m multigpu per file, scripts/bench.py
#                                         # (BENCH_ARGS="--tokens 1 128" passes options to bench.py)
#
# Logs under $OUT (default ./out). Every step runs under `timeout`, so a hang costs minutes.
set -u -o pipefail
N=${1:-1}; BENCH=${2:-}
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
status=0
step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi -L
PYT="python3 -m pytest -q -rs -p no:cacheprovider"
if [ "$N" = 1 ]; then
    for f in tests/test_*_gpu.py; do
        step "gpu_$(basename "$f" .py)" 400 $PYT -s -m gpu "$f"
    done
    step cpu_suite_on_cuda 300 $PYT -x tests/test_dispatch_combine.py tests/test_codecs.py
    if [ -n "$BENCH" ]; then
        step bench_pre_dispatch 200 python3 scripts/bench_pre_dispatch.py --out "$OUT/bench_pre_dispatch.json"
        step bench_gemm 300 python3 scripts/bench_gemm.py --out "$OUT/bench_gemm.json"
    fi
else
    TR="python3 -m torch.distributed.run --standalone --nproc-per-node=$N"
    for f in tests/test_comm_gpu.py tests/test_layer_gpu.py tests/test_transformers_gpu.py; do
        step "multigpu_$(basename "$f" .py)" 400 $TR -m pytest -q -rs -p no:cacheprovider -s -m multigpu "$f"
    done
    if [ -n "$BENCH" ]; then
        step bench_ep$N 500 $TR scripts/bench.py --preset dsv3 --out "$OUT" ${BENCH_ARGS:-}
    fi
fi
exit $status
