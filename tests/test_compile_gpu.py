"""The GPU forward under torch.compile, CUDA graphs, the profiler, and validation (one H200).

    pytest -m gpu -s tests/test_compile_gpu.py      # -s prints the launch count and host times
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import mega_moe_layer as mml
from utils import TOLERANCES, assert_bitwise, assert_rel_rmse, init_gpu_process_group, make_inputs, make_weights

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]


def _cfg(R, **kw):
    base = dict(hidden=1024, intermediate=512, num_experts=8 * R, topk=4, max_tokens_per_rank=128)
    return mml.MegaMoEConfig(**{**base, **kw})


CFGS = {"fp8": dict(), "bf16act": dict(act_format="bf16", weight_format="bf16"),
        # FP8 weights: Hopper's FP8 mainloop (two rebasing passes in the graph), as MXFP4's
        "fp8w": dict(weight_format="fp8"),
        "fp4comb8": dict(act_format="fp4", combine_format="fp8", weight_format="mxfp4")}


@pytest.fixture(scope="module")
def env():
    R = init_gpu_process_group()
    from mega_moe_layer.comm import workspace as wsm
    wsm.reserve([_cfg(R, **kw) for kw in CFGS.values()], dist.group.WORLD)
    yield dist.get_rank(), R
    wsm.destroy_all_workspaces()


class _Block(nn.Module):
    def __init__(self, moe):
        super().__init__()
        self.norm = nn.RMSNorm(moe.cfg.hidden, dtype=torch.bfloat16, device="cuda")
        self.moe = moe

    def forward(self, x):
        return x + self.moe(self.norm(x))


def _moe(cfg, validate):
    torch.manual_seed(0)
    moe = mml.MegaMoE(cfg, backend="nvshmem", shared_intermediate=256, validate=validate)
    moe.experts.load_weights(*(w.cuda() for w in make_weights(cfg)))
    return moe


@pytest.mark.parametrize("name", list(CFGS))
def test_compile_fullgraph_equal_to_eager_and_graph_replay(env, name):
    rank, R = env
    cfg = _cfg(R, **CFGS[name])
    block = _Block(_moe(cfg, validate=False))
    x = make_inputs(cfg, 48, seed=1 + rank)[0].cuda()
    torch._dynamo.reset()
    with torch.no_grad():
        explain = torch._dynamo.explain(block)(x)
        assert explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()
        y_eager = block(x)
        # aot_eager runs the same kernels as eager: bitwise
        y_aot = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
        torch.cuda.synchronize()
        assert_bitwise(y_aot, y_eager, f"{name}: compiled (aot_eager) vs eager")
        # inductor fuses the norm / router / shared expert differently: close, and the experts'
        # part is the same op
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True)
        y_comp = compiled(x)
        torch.cuda.synchronize()
        assert_rel_rmse(y_comp, y_eager, TOLERANCES["inductor_vs_eager"], f"{name}: compiled (inductor) vs eager")
        # capture the compiled model in a CUDA graph, replay with new inputs
        xs = x.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                compiled(xs)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_static = compiled(xs)
        for i in range(5):
            xi = make_inputs(cfg, 48, seed=100 + 10 * i + rank)[0].cuda()
            xs.copy_(xi)
            g.replay()
            torch.cuda.synchronize()
            assert_bitwise(y_static, compiled(xi), f"{name}: graph replay {i} vs compiled call")
            assert_rel_rmse(y_static, block(xi), TOLERANCES["inductor_vs_eager"], f"{name}: graph replay {i} vs eager")
    block.moe.experts.check_errors()


_LAUNCH_APIS = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                "cudaMemsetAsync", "cudaMemcpyAsync", "cudaGraphLaunch", "cuGraphLaunch")


def _profile_forward(m, x, idx, w):
    """(host launch API calls, GPU kernels run) of one forward."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m(x, idx, w)
        torch.cuda.synchronize()
    calls = [e.name for e in prof.events() if e.name in _LAUNCH_APIS]
    kernels = [e.name for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name
               and "Memset" not in e.name]
    return calls, kernels


def _check_launches(m, x, idx, w, n_kernels: int) -> None:
    """One forward runs n_kernels kernels: n_kernels host launches without the graphs, two with
    them (the stage kernel, then one graph of the rest)."""
    for use_graphs in (False, True):
        m._gpu.use_graphs = use_graphs
        for _ in range(3):
            m(x, idx, w)
        torch.cuda.synchronize()
        calls, kernels = _profile_forward(m, x, idx, w)
        print(f"\n[launches] one forward (validate=False, use_graphs={use_graphs}): {len(calls)} host "
              f"launch calls {sorted(set(calls))}, {len(kernels)} kernels")
        assert len(kernels) == n_kernels, kernels
        if use_graphs:
            assert len(calls) == 2 and calls.count("cudaGraphLaunch") + calls.count("cuGraphLaunch") == 1, calls
        else:
            assert len(calls) == n_kernels, calls


def test_launches_per_forward(env, monkeypatch):
    from mega_moe_layer import nvshmem_backend
    rank, R = env
    cfg = _cfg(R)
    hopper = torch.cuda.get_device_capability()[0] == 9
    # The streamed FP8 mainloop (MXFP4 / FP8 weights on Hopper, the default) adds h's rebasing
    # pass inside the graph (FP8 x is staged rebased, `STAGE_REBASE`, the default); the bf16
    # mainloop runs without it. A call whose tile plan has tails (`gemm_heuristics.TilePlan`)
    # launches L1 and L2 once more each. One rank launches no barrier (stream order suffices),
    # R > 1 ranks two.
    assert nvshmem_backend.STAGE_REBASE
    for T in (64, 2):
        x, idx, w = (t.cuda() for t in make_inputs(cfg, T, seed=3 + rank))
        for c, streamed in ((cfg, hopper), (_cfg(R, hopper_fp8_mainloop=False), False),
                            (_cfg(R, **CFGS["fp8w"]), hopper)):
            m = _moe(c, validate=False).experts
            tail = m._gpu._plan_T(T)[2].has_tail
            assert tail == (T == 64), "T 64 (32 pairs per expert) has tails, T 2 none"
            assert m._gpu.stage_rebase == streamed
            _check_launches(m, x, idx, w, 6 + 2 * (R > 1) + streamed + 2 * tail)
            assert (m._gpu._barrier_dispatch is None) == (R == 1)
    # Without the staged rebase, a pass rebases x after the dispatch too
    if hopper:
        monkeypatch.setattr(nvshmem_backend, "STAGE_REBASE", False)
        m = _moe(cfg, validate=False).experts
        assert not m._gpu.stage_rebase and m._gpu._rebase_x is not None
        x, idx, w = (t.cuda() for t in make_inputs(cfg, 2, seed=5 + rank))
        _check_launches(m, x, idx, w, 6 + 2 * (R > 1) + 2)


def test_eager_graphs_equal_direct_launches(env):
    """Kernels 2-8 replayed from the per-tile-height graphs give the same y, statistics and error
    counts as launching them directly, across token counts (tile heights), inputs, validation
    modes and a weight reload (which drops the graphs)."""
    rank, R = env
    cfg = _cfg(R)
    m = _moe(cfg, validate=True).experts
    gpu = m._gpu
    Ts = (1, 64, 128, 1, 7, 128)
    for reload in (False, True):
        if reload:
            w13, w2 = make_weights(cfg, seed=11)
            m.load_weights(w13.cuda(), w2.cuda())
            assert not gpu._middle_graphs
        for i, T in enumerate(Ts):
            x, idx, w = (t.cuda() for t in make_inputs(cfg, T, seed=50 + 7 * i + rank))
            if i % 2:
                idx[0, 0] = -1                     # a masked slot
            m.validate = bool(i % 3)
            outs = []
            for use_graphs in (False, True, True, True):
                gpu.use_graphs = use_graphs
                y = m(x, idx, w)
                torch.cuda.synchronize()
                outs.append((y, m.stats.last.clone()))
            for j, (y, last) in enumerate(outs[1:], 1):
                assert_bitwise(y, outs[0][0], f"T={T} reload={reload}: graph call {j} vs direct")
                assert torch.equal(last, outs[0][1]), f"T={T}: statistics differ"
        assert gpu._middle_graphs, "no graph was captured"
    gpu.use_graphs = True
    m.validate = True
    m.check_errors()


def test_launcher_fast_paths_taken(env):
    rank, R = env
    cfg = _cfg(R)
    m = _moe(cfg, validate=False).experts
    x, idx, w = (t.cuda() for t in make_inputs(cfg, 32, seed=4 + rank))
    for _ in range(3):
        m(x, idx, w)
    gpu = m._gpu
    launchers = [gpu._barrier_dispatch, gpu._barrier_combine, gpu._fill, gpu._combine,
                 *gpu._count_plan.values(), *gpu._stage.values()]
    slow = [l.kernel for l in launchers if l is not None and not l.is_fast]
    assert not slow, f"launchers without a fast path: {slow}"


def _host_us(fn, n=50):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(out)


def test_host_time_per_eager_call(env):
    rank, R = env
    cfg = _cfg(R)
    m = _moe(cfg, validate=True).experts
    for T in (1, 64, 128):
        x, idx, w = (t.cuda() for t in make_inputs(cfg, T, seed=5 + rank))
        for v in (False, True):
            m.validate = v
            for _ in range(3):
                m(x, idx, w)
            us = _host_us(lambda: m(x, idx, w))
            print(f"\n[host] T={T} validate={v}: {us:.1f} us per eager call (median of 50)")
    m.validate = True


def test_validation_raises_names_row_and_off_drops_counts(env):
    rank, R = env
    cfg = _cfg(R)
    m = _moe(cfg, validate=True).experts
    x, idx, w = (t.cuda() for t in make_inputs(cfg, 16, seed=6 + rank))
    y_ok = m(x, idx, w)
    bad = idx.clone()
    bad[5, 2] = cfg.num_experts + 3
    bad[9, 0] = -7
    if R == 1:   # raising skips the collective steps: a multi-rank run would strand the peers
        with pytest.raises(ValueError, match=r"topk_idx: row 5 has an expert id outside"):
            m(x, bad, w)
        y = m(x, idx, w)                    # the layer still works afterwards
        torch.cuda.synchronize()
        assert_bitwise(y, y_ok, "call after a rejected call")
    m.validate = False
    try:
        m.error_count.zero_()
        y = m(x, bad, w)
        torch.cuda.synchronize()
        assert int(m.error_count.item()) == 2
        with pytest.raises(RuntimeError, match="outside"):
            m.check_errors()
        # dropped pairs add nothing: equal to the call with those slots masked
        masked = bad.clone()
        masked[5, 2] = -1
        masked[9, 0] = -1
        m.error_count.zero_()
        assert_bitwise(y, m(x, masked, w), "dropped == masked")
    finally:
        m.validate = True
        m.error_count.zero_()
