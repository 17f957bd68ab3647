#!/usr/bin/env bash
# One device call on 1 GPU: the compile / launch / layer GPU tests, then the host-time breakdown.
#   bash scripts/host_round.sh            (logs under $OUT; HOST_SMALL= / HOST_DSV3= skip a shape)
set -u -o pipefail
OUT="${OUT:-$PWD/out}"; mkdir -p "$OUT"
export NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
status=0
if [ -n "${HOST_SMALL-1}" ]; then
  timeout -k 10 ${HOST_LIMIT:-150} python3 scripts/host_overhead.py --small --breakdown ${HOST_ARGS:-} 2>&1 | tee "$OUT/host_small.log" | tail -n 80 || status=1
fi
timeout -k 10 ${TEST_LIMIT:-300} python3 -m pytest -q -rs ${PYTEST_X:--x} -p no:cacheprovider -m gpu ${TESTS:-tests/test_launch.py tests/test_compile_gpu.py tests/test_layer_gpu.py} 2>&1 | tee "$OUT/tests.log" | tail -n 30 || status=1
if [ -n "${HOST_DSV3-1}" ]; then
  timeout -k 10 ${HOST_LIMIT:-150} python3 scripts/host_overhead.py --breakdown 2>&1 | tee "$OUT/host_dsv3.log" | tail -n 80 || status=1
fi
exit $status
