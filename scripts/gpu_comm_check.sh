#!/usr/bin/env bash
# GPU checks of mega_moe_layer/comm (NVSHMEM bootstrap + symmetric workspace).
#
# Run from the repository root on the GPU machine, with the nvshmem4py wheels carried in .whl/:
#     bash scripts/gpu_comm_check.sh
# Steps (each under `timeout`; logs in $OUT, default ./out):
#   0. environment report + CPU workspace tests            -> $OUT/comm_env.log, $OUT/comm_cpu.log
#   1. 1-GPU tests:  pytest -m gpu                          -> $OUT/comm_gpu1.log
#   2. 2-GPU tests:  torchrun --nproc-per-node=2 pytest -m multigpu (when >= 2 GPUs)
#                                                           -> $OUT/comm_gpu2.log, $OUT/torchrun_comm/
# Exit status: non-zero when any step failed or timed out (124 = timeout).
set -u -o pipefail

OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"

# We never use NVLink multicast (NVLS): keep it off in NVSHMEM, NCCL and torch symmetric memory.
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1

python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONPATH="${PYTHONPATH:-/tmp/site:$PWD}"

status=0
step() {  # step NAME TIMEOUT_S CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name: $*" | tee "$OUT/$name.log"
    timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc" | tee -a "$OUT/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi -L
    nvidia-smi topo -m
    python3 - <<'PY'
import torch, nvshmem, nvshmem.core
from mega_moe_layer.comm import bootstrap
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count())
print("nvshmem4py", nvshmem.__version__, nvshmem.__file__)
print("cuda.core Device", bootstrap.import_cuda_core_device())
try:
    print(nvshmem.core.get_version())
except Exception as e:
    print("get_version failed:", repr(e))
PY
} > "$OUT/comm_env.log" 2>&1

step comm_cpu 120 python3 -m pytest -q -p no:cacheprovider tests/test_workspace.py
step comm_gpu1 300 python3 -m pytest -v -s -p no:cacheprovider -m gpu tests/test_comm_gpu.py

ngpu=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$ngpu" -ge 2 ]; then
    step comm_gpu2 300 python3 -m torch.distributed.run --standalone --nproc-per-node=2 \
        --log-dir "$OUT/torchrun_comm" --tee 3 \
        -m pytest -v -s -p no:cacheprovider -m multigpu tests/test_comm_gpu.py
else
    echo "=== comm_gpu2: skipped, $ngpu GPU(s)" | tee "$OUT/comm_gpu2.log"
fi
exit $status
