"""Pre-dispatch kernel on a CUDA GPU: bytewise against the reference, CUDA-graph replay with a
device token count, no host synchronisation. Run with `pytest -m gpu tests/test_pre_dispatch_gpu.py`.

Inputs are fresh random data every session (the seed is printed and in every failure message),
with the special values of `test_pre_dispatch.make_x` (ties, zeros, Q after scaling, amax < 1e-4,
bf16 extremes). Output buffers start as 0x7F bytes everywhere.
"""
from __future__ import annotations

import os

import pytest
import torch

from mega_moe_layer.kernels import reference as ref
from mega_moe_layer.kernels.pre_dispatch import mega_moe_pre_dispatch
from test_pre_dispatch import (POISON, check_every_bf16_amax, check_every_bf16_value, check_outputs, make_buffers,
                               make_topk, make_x, run_rebased)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"


@pytest.fixture(scope="session")
def session_seed():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"\n[test_pre_dispatch_gpu] session seed {seed}")
    return seed


def _run_case(M, H, K, g, use_fp4, idx_in, idx_out, seed):
    quantum = ref.FP4_MAX if use_fp4 else ref.FP8_MAX
    x = make_x(M, H, g, quantum, seed=seed, device=DEV)
    if M == 0:
        x = torch.empty(0, H, dtype=torch.bfloat16, device=DEV)
        assert x.data_ptr() == 0, "test precondition: an empty CUDA tensor has a null data pointer"
    ids, w = make_topk(M, K, idx_in, seed=seed, num_experts=256, device=DEV)
    bufs = make_buffers(M + 5, M + 70, H, K, g, use_fp4, idx_out, device=DEV)
    mega_moe_pre_dispatch(x, ids, w, *bufs, M, group_size=g, use_fp4_acts=use_fp4)
    torch.cuda.synchronize()
    try:
        check_outputs(x, ids, w, M, g, use_fp4, *bufs)
    except AssertionError as exc:
        raise AssertionError(f"seed {seed}: {exc}") from exc


# (K, topk_idx dtype, buffer dtype): both K values and all four id dtype pairs
TOPK_CASES = [(6, torch.int32, torch.int32), (8, torch.int64, torch.int64),
              (8, torch.int32, torch.int64), (6, torch.int64, torch.int32)]


@pytest.mark.parametrize("topk", TOPK_CASES, ids=["K6-i32-i32", "K8-i64-i64", "K8-i32-i64", "K6-i64-i32"])
@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("H", [1024, 4096, 7168])
@pytest.mark.parametrize("M", [0, 1, 7, 512, 4096])
def test_bitwise_vs_reference(M, H, g, use_fp4, topk, session_seed):
    K, idx_in, idx_out = topk
    _run_case(M, H, K, g, use_fp4, idx_in, idx_out, seed=session_seed + M * 7 + H + g)


@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
def test_every_bf16_value_and_amax(use_fp4):
    """The GPU's encoder (FP8: the hardware conversion) on every bf16 value, and the scale rule on
    every bf16 amax (the interpreter tests' exhaustive inputs)."""
    check_every_bf16_value(use_fp4, device=DEV)
    check_every_bf16_amax(use_fp4, device=DEV)


def test_gpu_reference_equals_cpu_reference(session_seed):
    """The GPU tests compare against the reference run on the GPU: make sure it is the CPU's."""
    for use_fp4, quantum in ((False, ref.FP8_MAX), (True, ref.FP4_MAX)):
        x = make_x(64, 7168, 32, quantum, seed=session_seed, device=DEV)
        cast = ref.per_token_cast_to_fp4 if use_fp4 else ref.per_token_cast_to_fp8
        (qg, sg), (qc, sc) = cast(x, 32), cast(x.cpu(), 32)
        assert torch.equal(qg.cpu().view(torch.uint8), qc.view(torch.uint8)), f"seed {session_seed}"
        assert torch.equal(sg.cpu(), sc), f"seed {session_seed}"


@pytest.mark.parametrize("use_fp4", [False, True], ids=["fp8", "fp4"])
def test_cuda_graph_replay_with_device_token_count(use_fp4, session_seed):
    """One capture, replays with counts 0, 1, 37, T and a clamped out-of-range count."""
    T, H, K, g = 256, 7168, 8, 32
    quantum = ref.FP4_MAX if use_fp4 else ref.FP8_MAX
    x = make_x(T, H, g, quantum, seed=session_seed, device=DEV)
    ids, w = make_topk(T, K, torch.int64, seed=session_seed, device=DEV)
    bufs = make_buffers(T, T + 64, H, K, g, use_fp4, torch.int32, device=DEV)
    poison = [b.clone() for b in bufs]
    count = torch.tensor([T], dtype=torch.int32, device=DEV)

    def run():
        mega_moe_pre_dispatch(x, ids, w, *bufs, count, group_size=g, use_fp4_acts=use_fp4)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # compile + warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    for n, expect in ((0, 0), (1, 1), (37, 37), (T, T), (T + 1000, T), (-5, 0)):
        for b, p in zip(bufs, poison):
            b.copy_(p)
        count.fill_(n)
        graph.replay()
        torch.cuda.synchronize()
        try:
            check_outputs(x, ids, w, expect, g, use_fp4, *bufs)
        except AssertionError as exc:
            raise AssertionError(f"seed {session_seed}, count {n}: {exc}") from exc


@pytest.mark.parametrize("count_on_device", [False, True], ids=["int", "tensor"])
def test_no_host_synchronisation(count_on_device, session_seed):
    T, H, K, g = 33, 4096, 8, 128
    x = make_x(T, H, g, ref.FP8_MAX, seed=session_seed, device=DEV)
    ids, w = make_topk(T, K, torch.int32, seed=session_seed, device=DEV)
    bufs = make_buffers(T, T + 3, H, K, g, False, torch.int32, device=DEV)
    n = torch.tensor([T], dtype=torch.int32, device=DEV) if count_on_device else T
    mega_moe_pre_dispatch(x, ids, w, *bufs, n, group_size=g)  # compile first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mega_moe_pre_dispatch(x, ids, w, *bufs, n, group_size=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    check_outputs(x, ids, w, T, g, False, *bufs)


def test_runs_on_a_side_stream_and_leaves_poison_beyond_num_tokens(session_seed):
    T, H, K, g = 100, 7168, 8, 32
    x = make_x(T, H, g, ref.FP8_MAX, seed=session_seed, device=DEV)
    ids, w = make_topk(T, K, torch.int64, seed=session_seed, device=DEV)
    bufs = make_buffers(4096, 4096, H, K, g, False, torch.int64, device=DEV)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        mega_moe_pre_dispatch(x, ids, w, *bufs, 50, group_size=g)
    s.synchronize()
    check_outputs(x, ids, w, 50, g, False, *bufs)
    assert bool((bufs[0][50:].view(torch.uint8) == POISON).all())


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("M,H", [(1, 7168), (7, 1024), (512, 7168)])
def test_rebased_staging_bitwise(M, H, g, session_seed):
    """The layer's Hopper FP8 staging (REBASE, the hardware conversions) against
    `reference.rebase_act` of the reference quantisation, bitwise."""
    try:
        run_rebased(M, H, g, seed=session_seed + M, device=DEV)
    except AssertionError as exc:
        raise AssertionError(f"seed {session_seed}: {exc}") from exc


@pytest.mark.parametrize("g", [32, 128])
@pytest.mark.parametrize("M,H", [(7, 1024), (300, 7168)])
def test_rebased_staging_lane_order_bitwise(M, H, g, session_seed):
    """The staging with LANE_K (x for MXFP4 words in the "lane" K order, `gemm_operands.LANE_K_ORDER`):
    `reference.to_lane_order` of the rebased rows, bitwise."""
    try:
        run_rebased(M, H, g, seed=session_seed + M, device=DEV, lane_k=True)
    except AssertionError as exc:
        raise AssertionError(f"seed {session_seed}: {exc}") from exc
