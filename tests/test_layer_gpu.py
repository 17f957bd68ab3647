"""The GPU forward (`backend="nvshmem"`) against the reference, on 1 GPU and under torchrun.

    1 GPU : pytest -m gpu tests/test_layer_gpu.py
    2 GPUs: torchrun --nproc-per-node=2 -m pytest -m multigpu tests/test_layer_gpu.py

Every rank builds the same weights and every rank's inputs from seeds, so it can compute the
reference of its own tokens and recount the statistics of all ranks on the host.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import mega_moe_layer as mml
from mega_moe_layer.kernels import reference as ref
from utils import (TOLERANCES, assert_rel_rmse, init_gpu_process_group, make_inputs, make_weights,
                   rel_rmse)

WORLD_SIZE = int(os.environ.get("WORLD_SIZE", "1"))
_ok = torch.cuda.is_available()
if WORLD_SIZE > 1:
    MARKS = [pytest.mark.multigpu, pytest.mark.skipif(not _ok, reason="no CUDA")]
else:
    MARKS = [pytest.mark.gpu, pytest.mark.skipif(not _ok, reason="no CUDA")]
pytestmark = MARKS

FORMATS = [(w, a, c) for w in ("mxfp4", "fp8", "bf16") for a in ("fp8", "fp4", "bf16")
           for c in ("bf16", "fp8")]


@pytest.fixture(scope="module")
def env():
    R = init_gpu_process_group()
    from mega_moe_layer.comm import workspace as wsm
    wsm.reserve(_all_cfgs(R), dist.group.WORLD)     # one shared workspace fits every layer here
    yield dist.get_rank(), R
    wsm.destroy_all_workspaces()


def _cfg(R, **kw):
    base = dict(hidden=1024, intermediate=512, num_experts=8 * R, topk=4, max_tokens_per_rank=128)
    return mml.MegaMoEConfig(**{**base, **kw})


def _cfg_b(R):
    return _cfg(R, hidden=512, intermediate=256, max_tokens_per_rank=64, act_format="fp4",
                combine_format="fp8")


def _cfg_640(R):
    """H = 640: the FP8 combine's scale rows are not whole int32 words (5 groups of 128)."""
    return _cfg(R, hidden=640, combine_format="fp8")


#: The streamed FP8 path (hopper_fp8_mainloop): FP8 / MXFP4 weights (MXFP4 both kept at 4 bits and
#: expanded to E4M3 at load) x FP8 / FP4 acts, both combines.
STREAMED = [(w, a, c, e) for w, e in (("fp8", False), ("mxfp4", True), ("mxfp4", False))
            for a in ("fp8", "fp4") for c in ("bf16", "fp8")]


def _streamed_cfg(R, wf, af, cf, as_fp8):
    return _cfg(R, weight_format=wf, act_format=af, combine_format=cf, hopper_fp8_mainloop=True,
                hopper_fp4_as_fp8=as_fp8)


def _all_cfgs(R):
    return ([_cfg(R, weight_format=w, act_format=a, combine_format=c) for w, a, c in FORMATS]
            + [_streamed_cfg(R, *f) for f in STREAMED]
            + [_cfg(R, act_group_size=128, activation_clamp=0.5), _cfg_b(R), _cfg_640(R)])


_LAYERS = {}
_FULL = {}


def _layer(cfg):
    """One layer per config for the whole module (layers share the group's workspace)."""
    if cfg not in _LAYERS:
        m = mml.MegaMoEExperts(cfg, backend="nvshmem")
        w13, w2 = (w.cuda() for w in make_weights(cfg))
        m.load_weights(w13, w2)
        _LAYERS[cfg] = m
        # every expert's exact dequantised weights, for the single-process reference
        _FULL[cfg] = (mml.quantize_weight(w13, cfg.weight_format).dequantize(),
                      mml.quantize_weight(w2, cfg.weight_format).dequantize())
    return _LAYERS[cfg]


def _inputs_all_ranks(cfg, R, T_of_rank, seed, **kw):
    return [make_inputs(cfg, T_of_rank(r), seed=seed * 100 + r, **kw) for r in range(R)]


def _run_and_check(cfg, rank, R, T_of_rank, seed, tol=None, **kw):
    m = _layer(cfg)
    if tol is None:    # the streamed FP8 mainloop (the Hopper default for FP8 / MXFP4 weights) has its own entry
        tol = TOLERANCES["gemm_fp8_mainloop_rel_rmse" if m._backend.streamed else "gemm_rel_rmse"]
    before = m.cumulative_local_expert_recv_stats.clone()
    all_inp = _inputs_all_ranks(cfg, R, T_of_rank, seed, **kw)
    x, idx, w = (t.cuda() for t in all_inp[rank])
    y = m(x, idx, w)
    torch.cuda.synchronize()
    m.check_errors()
    assert y.shape == (x.shape[0], cfg.hidden) and y.dtype == torch.bfloat16
    # statistics: pairs of all ranks routed to my experts
    El = cfg.num_experts // R
    full = torch.cat([a[1] for a in all_inp])
    mine = full[(full >= rank * El) & (full < (rank + 1) * El)] - rank * El
    recount = torch.bincount(mine, minlength=El).to(torch.int32)
    assert torch.equal(m.last_local_expert_recv_stats.cpu(), recount), "last-call stats"
    assert torch.equal((m.cumulative_local_expert_recv_stats - before).cpu(), recount), "cumulative"
    err = None
    if x.shape[0] > 0:
        y_ref = ref.moe_reference(x, idx, w, *_FULL[cfg], act_format=cfg.act_format, combine_format=cfg.combine_format,
                                  act_group_size=cfg.act_group_size,
                                  activation_clamp=cfg.activation_clamp)
        err = assert_rel_rmse(y, y_ref, tol, f"rank {rank} {cfg.weight_format}/{cfg.act_format}/"
                                              f"{cfg.combine_format}")
    return y, err


@pytest.mark.parametrize("wf,af,cf", FORMATS)
def test_formats_vs_reference(env, wf, af, cf):
    rank, R = env
    cfg = _cfg(R, weight_format=wf, act_format=af, combine_format=cf)
    # FP8 weights take the streamed FP8 mainloop by default on Hopper (its own tolerance entry).
    streamed = getattr(_layer(cfg)._backend, "streamed", False)
    tol = TOLERANCES["gemm_fp8_mainloop_rel_rmse" if streamed else "gemm_rel_rmse"]
    y, err = _run_and_check(cfg, rank, R, lambda r: 100 + 7 * r, seed=1, mask_frac=0.1, tol=tol)
    _check_vs_float64(cfg, y, 100 + 7 * rank, 100 + rank, err, f"rank {rank} {wf}/{af}/{cf}")


def _check_vs_float64(cfg, y, T, seed, err, label):
    """y (this rank's T tokens, inputs `make_inputs(cfg, T, seed, mask_frac=0.1)`) against the
    unquantised float64 MoE, within the formats' quantisation bound; prints both errors
    (docs/PERF.md records them)."""
    wf, af, cf = cfg.weight_format, cfg.act_format, cfg.combine_format
    x, idx, w = make_inputs(cfg, T, seed=seed, mask_frac=0.1)
    w13, w2 = make_weights(cfg)
    y64 = ref.dense_moe_float64(x.cuda(), idx.cuda(), w.cuda(), w13.cuda(), w2.cuda())
    e64 = rel_rmse(y, y64)
    print(f"\n[accuracy] {label}: vs reference {err:.2e}, vs float64 {e64:.4f} "
          f"(bound {ref.quantisation_error_bound(wf, af, cf):.4f})")
    assert e64 <= ref.quantisation_error_bound(wf, af, cf)


@pytest.mark.parametrize("wf,af,cf,as_fp8", STREAMED)
def test_streamed_fp8_path_vs_reference(env, wf, af, cf, as_fp8):
    """The streamed FP8 mainloop end to end (x rebased after the dispatch, h after L1, FP8 wgmma):
    against the reference within the GEMM tolerance (Hopper's FP8 MMA accumulation and rebasing are
    the only differences), and against the float64 MoE within the formats' quantisation bound;
    a second call with other tokens (the captured graph replays the rebasing pass(es) too)."""
    rank, R = env
    cfg = _streamed_cfg(R, wf, af, cf, as_fp8)
    m = _layer(cfg)
    if torch.cuda.get_device_capability()[0] == 9:
        assert m._backend.x_rebased is not None, "the streamed path is not on"
        assert (m._backend._rebase_x is None) == m._backend.stage_rebase
        assert m._backend.w13_op.kind == ("fp8_rebased" if wf == "fp8" or as_fp8 else "mxfp4")
    for seed, T in ((2, 100 + 7 * rank), (3, 37 + rank)):
        y, err = _run_and_check(cfg, rank, R, lambda r: T if r == rank else 100 + 7 * r, seed=seed, mask_frac=0.1,
                                tol=TOLERANCES["gemm_fp8_mainloop_rel_rmse"])
    _check_vs_float64(cfg, y, 37 + rank, 300 + rank, err,
                      f"streamed rank {rank} {wf}{'->e4m3' if as_fp8 else ''}/{af}/{cf}")


@pytest.mark.parametrize("wf,cf", [("mxfp4", "bf16"), ("fp8", "fp8")])
def test_staged_rebase_vs_reference(env, wf, cf, monkeypatch):
    """`nvshmem_backend.STAGE_REBASE` (FP8 x rebased by the stage kernel as it is quantised, the
    fill moving one exponent word a row, no x rebasing pass): the same results as the streamed
    path's tolerance allows against the reference and the float64 bound, over two calls."""
    from mega_moe_layer import nvshmem_backend
    rank, R = env
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the FP8 mainloop is Hopper's")
    monkeypatch.setattr(nvshmem_backend, "STAGE_REBASE", True)
    cfg = _streamed_cfg(R, wf, "fp8", cf, False)
    # NOTE: a layer of its own (the module's cached layer of this config was bound without the
    # switch), dropped again afterwards so later tests get the default path.
    _LAYERS.pop(cfg, None)
    try:
        m = _layer(cfg)
        assert m._backend.stage_rebase and m._backend._rebase_x is None
        for seed, T in ((4, 90 + 5 * rank), (5, 1 + rank)):
            y, err = _run_and_check(cfg, rank, R, lambda r: T if r == rank else 90 + 5 * r, seed=seed,
                                    mask_frac=0.1, tol=TOLERANCES["gemm_fp8_mainloop_rel_rmse"])
        # the last call's inputs: seed 5 (`_inputs_all_ranks`: seed * 100 + rank)
        _check_vs_float64(cfg, y, 1 + rank, 500 + rank, err, f"staged rebase rank {rank} {wf}/fp8/{cf}")
    finally:
        _LAYERS.pop(cfg, None)


def test_fp8_combine_hidden_640(env):
    rank, R = env
    _run_and_check(_cfg_640(R), rank, R, lambda r: 29 + r, seed=9, mask_frac=0.1)


def test_group_128_and_clamp(env):
    rank, R = env
    cfg = _cfg(R, act_group_size=128, activation_clamp=0.5)
    _run_and_check(cfg, rank, R, lambda r: 33, seed=2)


def test_idle_ranks(env):
    rank, R = env
    cfg = _cfg(R)
    _run_and_check(cfg, rank, R, lambda r: 0 if r == R - 1 else 50, seed=3)   # one idle
    _run_and_check(cfg, rank, R, lambda r: 0, seed=4)                          # all idle


def test_first_call_with_no_tokens(env):
    """A layer whose first call holds no tokens on any rank, then full ones: the bound launches
    built by that first call (y's address 0 then) must take the later calls' values (this broke
    every call after it once: a fast-path int compiled as i32 handed an address)."""
    rank, R = env
    cfg = _cfg(R)
    saved = _LAYERS.pop(cfg, None)
    try:
        _run_and_check(cfg, rank, R, lambda r: 0, seed=40)
        _run_and_check(cfg, rank, R, lambda r: cfg.max_tokens_per_rank, seed=41)
        _run_and_check(cfg, rank, R, lambda r: 7 + r, seed=42)
    finally:
        if saved is not None:
            _LAYERS[cfg] = saved


def test_skewed_to_other_rank_and_full_capacity(env):
    rank, R = env
    cfg = _cfg(R)
    target = (cfg.num_experts // R) * (R - 1)        # the last rank's first expert
    _run_and_check(cfg, rank, R, lambda r: cfg.max_tokens_per_rank, seed=5, routing="skewed",
                   target_expert=target)


def test_masked_slots(env):
    rank, R = env
    _run_and_check(_cfg(R), rank, R, lambda r: 40, seed=6, mask_frac=0.6)


def test_repeated_calls_no_drift(env):
    rank, R = env
    cfg = _cfg(R)
    m = _layer(cfg)
    x, idx, w = (t.cuda() for t in make_inputs(cfg, 64, seed=7 + rank))
    y0 = m(x, idx, w)
    for _ in range(200):
        y = m(x, idx, w)
    torch.cuda.synchronize()
    assert torch.equal(y, y0), "200 back-to-back calls drifted"


#: Tile plans forced onto one call (`gemm_heuristics.TilePlan`): one height, and two heights with
#: tails of each smaller height (E 8, K 4, T ~100, 10% of slots masked: ~45 +- 7 pairs per
#: expert, so every two-height plan here gives most experts tail tiles); and plans whose last
#: full tile computes up to 16 rows past its 32 (`TilePlan.over`, the streamed FP8 mainloop: most
#: experts here), with and without tails.
PLANS = [(16, 16, 0), (128, 128, 0), (64, 16, 48), (128, 32, 64), (32, 16, 16), (128, 64, 127),
         (32, 16, 31, 16), (32, 32, 0, 16)]


@pytest.mark.parametrize("wf,af,cf,as_fp8", [("mxfp4", "fp8", "bf16", False), ("fp8", "fp4", "fp8", False),
                                             ("mxfp4", "fp8", "fp8", None)])
def test_two_height_tile_plans(env, wf, af, cf, as_fp8):
    """Every tile plan gives y within the GEMM tolerance of the reference (pairs in tail tiles
    are computed by the tail launches, none twice or dropped), the same statistics, and the tail
    map holds tiles where the plan has a tail. as_fp8 None: the bf16 mainloop (FP8 path off)."""
    rank, R = env
    if as_fp8 is None:
        cfg = _cfg(R, weight_format=wf, act_format=af, combine_format=cf, hopper_fp8_mainloop=False)
    else:
        cfg = _streamed_cfg(R, wf, af, cf, as_fp8)
    m = _layer(cfg)
    gpu = m._backend
    from mega_moe_layer.kernels.gemm_api import TilePlan
    T = 100 + 3 * rank
    for i, p in enumerate(PLANS):
        plan = TilePlan(*p)
        if plan.over and as_fp8 is None:
            continue            # rows past block_m: the streamed FP8 mainloop only
        for t in {T} | {100 + 3 * r for r in range(R)}:
            pcfg, grid, _ = gpu._plan_T(t)
            gpu._per_T[t] = (pcfg, grid, plan)
        for call in range(2):         # the second call replays the plan's graph
            _run_and_check(cfg, rank, R, lambda r: 100 + 3 * r, seed=60 + i + 10 * call, mask_frac=0.1)
        if plan.has_tail:
            assert int(gpu.tail_maps[2]) > 0, f"{p}: no tail tiles"
    gpu._per_T.clear()


@contextlib.contextmanager
def _own_layer(cfg):
    """A fresh layer of cfg for one test (built under its module switches): its backend; the
    module's shared layer of cfg, if any, restored after."""
    saved = _LAYERS.pop(cfg, None)
    try:
        yield _layer(cfg)._backend
    finally:
        _LAYERS.pop(cfg, None)
        if saved is not None:
            _LAYERS[cfg] = saved


def _force_plan(gpu, R, plan, tokens):
    """Calls of tokens(rank) rows on any rank take `plan` (the stage config and grid as planned)."""
    for t in {tokens(r) for r in range(R)}:
        pcfg, grid, _ = gpu._plan_T(t)
        gpu._per_T[t] = (pcfg, grid, plan)


def test_pair_ordered_x(env, monkeypatch):
    """`nvshmem_backend.PAIR_ORDER_X`: the rebased x copied into pair order before L1, whose 128-row
    tiles on the Gluon kernel then load each tile's token rows as one TMA box: y within the
    tolerance of the reference (a 128-row plan with 16 rows past the tiles and 16-row tails, both
    calls of it: direct, then the graph), the launch took the pair-ordered rows."""
    rank, R = env
    from mega_moe_layer import nvshmem_backend as nb
    from mega_moe_layer.kernels import l1_gluon
    from mega_moe_layer.kernels.gemm_api import TilePlan
    if torch.cuda.get_device_capability()[0] != 9 or not l1_gluon.HAVE_GLUON:
        pytest.skip("the Gluon L1 is Hopper's (Triton >= 3.6)")
    monkeypatch.setattr(nb, "PAIR_ORDER_X", True)
    monkeypatch.setattr(l1_gluon, "ENABLED", True)
    cfg = _streamed_cfg(R, "mxfp4", "fp8", "bf16", False)
    with _own_layer(cfg) as gpu:
        assert gpu.x_pairs is not None and gpu.x_pairs.shape == (gpu.max_pairs, cfg.hidden)
        plan = TilePlan(128, 16, 48, 16)
        _force_plan(gpu, R, plan, lambda r: 100 + 3 * r)
        for call in range(2):
            _run_and_check(cfg, rank, R, lambda r: 100 + 3 * r, seed=70 + call, mask_frac=0.1)
        assert [k for k, v in gpu._l1_launch.items() if v is not None and v.kwargs.get("PAIR_X")] == \
            [(128, False, (16, plan.over_limit))], "the 128-row L1 launch did not take the pair-ordered rows"
        gpu._per_T.clear()


@pytest.mark.parametrize("af", ["fp8", "fp4"])
def test_lane_k_order(env, monkeypatch, af):
    """`gemm_operands.LANE_K_ORDER`: MXFP4 words in the "lane" K order, x rebased in that order
    where it lands (FP8: the stage kernel's REBASE with LANE_K; FP4: `rebase_act_rows`) and h after
    L1: y within the tolerance of the reference at decode tiles (16 rows: the Triton L1, the Gluon
    L2) and at a 128-row plan (the Gluon L1 at 128 + 16 rows), direct and graph calls; the GEMM
    launches took the lane tables."""
    rank, R = env
    from mega_moe_layer.kernels import gemm_operands
    from mega_moe_layer.kernels.gemm_api import TilePlan
    monkeypatch.setattr(gemm_operands, "LANE_K_ORDER", True)
    cfg = _streamed_cfg(R, "mxfp4", af, "bf16", False)
    with _own_layer(cfg) as gpu:
        assert gpu.w13_op.lane and gpu.w2_op.lane
        for call in range(2):
            _run_and_check(cfg, rank, R, lambda r: 7 + r, seed=80 + call)
        _force_plan(gpu, R, TilePlan(128, 16, 48, 16), lambda r: 100 + 3 * r)
        for call in range(2):
            _run_and_check(cfg, rank, R, lambda r: 100 + 3 * r, seed=82 + call, mask_frac=0.1)
        gpu._per_T.clear()
        tables = {v.kwargs.get("FP4_TABLE") for v in list(gpu._l1_launch.values()) + list(gpu._l2_launch.values())
                  if v is not None and "FP4_TABLE" in v.kwargs}
        lanes = [v.kwargs.get("LANE") for v in list(gpu._l1_launch.values()) + list(gpu._l2_launch.values())
                 if v is not None and "FP4_TABLE" not in v.kwargs]
        assert tables <= {"imad_lane", "f16_lane"} and all(lanes), (tables, lanes)
        if af == "fp8":
            assert gpu.stage_rebase and all(ls.kwargs.get("LANE_K") for ls in gpu._stage.values())


def test_two_layers_share_workspace(env):
    rank, R = env
    a = _cfg(R)
    b = _cfg_b(R)
    la, lb = _layer(a), _layer(b)
    assert la._gpu.ws.shares_allocation(lb._gpu.ws)
    for i in range(3):   # interleaved calls: each leaves the workspace clean for the other
        _run_and_check(a, rank, R, lambda r: 20 + r, seed=20 + i)
        _run_and_check(b, rank, R, lambda r: 10 + 3 * r, seed=30 + i)


def test_streamed_layers_share_rebased_buffers(env):
    """Two layers of one config on the FP8 mainloop hold ONE rebased x / h between them
    (`workspace.shared_scratch`: per-forward data, like the workspace), and interleaved calls with
    different weights and tokens stay correct (each call rewrites what it reads)."""
    rank, R = env
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the FP8 mainloop is Hopper's")
    cfg = _streamed_cfg(R, "fp8", "fp8", "bf16", False)
    first = _layer(cfg)
    second = mml.MegaMoEExperts(cfg, backend="nvshmem")
    w13, w2 = (w.cuda() for w in make_weights(cfg, seed=77))
    second.load_weights(w13, w2)
    full2 = (mml.quantize_weight(w13, "fp8").dequantize(), mml.quantize_weight(w2, "fp8").dequantize())
    for a, b in zip(first._backend.x_rebased + first._backend.h_rebased,
                    second._backend.x_rebased + second._backend.h_rebased):
        assert a.data_ptr() == b.data_ptr()
    tol = TOLERANCES["gemm_fp8_mainloop_rel_rmse"]
    for i in range(2):
        _run_and_check(cfg, rank, R, lambda r: 30 + r, seed=40 + i, tol=tol)
        x, idx, w = (t.cuda() for t in make_inputs(cfg, 50 + rank, seed=500 + i))
        y = second(x, idx, w)
        y_ref = ref.moe_reference(x, idx, w, *full2, act_format=cfg.act_format, combine_format=cfg.combine_format,
                                  act_group_size=cfg.act_group_size, activation_clamp=cfg.activation_clamp)
        assert_rel_rmse(y, y_ref, tol, f"second layer, call {i}")


@pytest.mark.parametrize("wf,as_fp8", [("fp8", False), ("mxfp4", False), ("mxfp4", True)])
def test_streamed_weights_held_once(env, wf, as_fp8):
    """On the FP8 mainloop the device holds the experts once, as the GEMMs read them: the backend
    drops the loaded weights, the layer keeps its copy on the host (bitwise the quantiser's), and
    the memory a load adds is the operands' bytes (not twice them); the forward stays correct."""
    rank, R = env
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the FP8 mainloop is Hopper's")
    cfg = _cfg(R, weight_format=wf, hopper_fp4_as_fp8=as_fp8)
    m = mml.MegaMoEExperts(cfg, backend="nvshmem")
    w13, w2 = make_weights(cfg, seed=88)                     # host tensors
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    m.load_weights(w13, w2)
    torch.cuda.synchronize()
    added = torch.cuda.memory_allocated() - before
    b = m._backend
    assert b.w13 is None and b.w2 is None and not b.needs_loaded_weights
    assert m.w13.data.device.type == "cpu" and m.w2.data.device.type == "cpu"
    q13 = mml.quantize_weight(w13.cuda(), wf)
    assert torch.equal(m.w13.data.view(torch.uint8), q13.data.cpu().view(torch.uint8))
    held = sum(t.numel() * t.element_size() for op in (b.w13_op, b.w2_op)
               for t in (op.data, op.aux, op.row_factor) if t is not None)
    assert added <= held + (4 << 20), (added, held)
    loaded = sum(q.data.numel() * q.data.element_size() for q in (m.w13, m.w2))
    assert held < 2 * loaded if not as_fp8 else held < 3 * loaded
    full = (m.w13.dequantize().cuda(), m.w2.dequantize().cuda())
    x, idx, w = (t.cuda() for t in make_inputs(cfg, 40 + rank, seed=90))
    y = m(x, idx, w)
    y_ref = ref.moe_reference(x, idx, w, *full, act_format=cfg.act_format, combine_format=cfg.combine_format,
                              act_group_size=cfg.act_group_size, activation_clamp=cfg.activation_clamp)
    assert_rel_rmse(y, y_ref, TOLERANCES["gemm_fp8_mainloop_rel_rmse"], f"{wf} held once")


def test_cuda_graph_replay(env):
    rank, R = env
    cfg = _cfg(R)
    m = _layer(cfg)
    T = 48
    x, idx, w = (t.cuda() for t in make_inputs(cfg, T, seed=40 + rank))
    m.validate = False                         # validation syncs with the host
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                m(x, idx, w)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y_static = m(x, idx, w)
        for i in range(10):
            all_inp = _inputs_all_ranks(cfg, R, lambda r: T, seed=50 + i)
            nx, nidx, nw = all_inp[rank]
            x.copy_(nx.cuda()); idx.copy_(nidx.cuda()); w.copy_(nw.cuda())
            g.replay()
            torch.cuda.synchronize()
            y_ref = ref.moe_reference(x, idx, w, *_FULL[cfg])
            assert_rel_rmse(y_static, y_ref, TOLERANCES["gemm_fp8_mainloop_rel_rmse" if m._backend.streamed
                                                        else "gemm_rel_rmse"], f"graph replay {i}")
            El = cfg.num_experts // R
            full = torch.cat([a[1] for a in all_inp])
            mine = full[(full >= rank * El) & (full < (rank + 1) * El)] - rank * El
            assert torch.equal(m.last_local_expert_recv_stats.cpu(),
                               torch.bincount(mine, minlength=El).to(torch.int32))
    finally:
        m.validate = True


def test_validation_off_counts_bad_ids(env):
    rank, R = env
    cfg = _cfg(R)
    m = _layer(cfg)
    x, idx, w = (t.cuda() for t in make_inputs(cfg, 16, seed=60 + rank))
    idx[3, 1] = cfg.num_experts + 5
    m.validate = False
    try:
        m(x, idx, w)
        torch.cuda.synchronize()
        with pytest.raises(RuntimeError, match="outside"):
            m.check_errors()
    finally:
        m.validate = True
        m.error_count.zero_()


@pytest.mark.parametrize("wf", ["fp8", "bf16", "mxfp4"])
def test_torch_backend_grouped_mm_baseline(env, wf):
    """The benchmarks' baseline (NCCL all-to-all + torch grouped GEMMs) is a correct MoE."""
    rank, R = env
    cfg = _cfg(R, weight_format=wf, act_format="fp8")
    m = mml.MegaMoEExperts(cfg, backend="torch", torch_experts="grouped_mm")
    w13, w2 = make_weights(cfg)
    m.load_weights(w13.cuda(), w2.cuda())
    x, idx, w = (t.cuda() for t in make_inputs(cfg, 64 + rank, seed=70 + rank, mask_frac=0.1))
    y = m(x, idx, w)
    y64 = ref.dense_moe_float64(x, idx, w, w13.cuda(), w2.cuda())
    assert_rel_rmse(y, y64, ref.quantisation_error_bound(wf, "fp8", "bf16"), f"baseline {wf}")


_TIMEOUT_SCRIPT = r"""
import torch, mega_moe_layer.kernels.sync as sk
torch.cuda.set_device(0)
sig = torch.zeros(2 * 8 + 16, dtype=torch.int64, device="cuda")
bases = torch.tensor([sig.data_ptr(), sig.data_ptr()], dtype=torch.int64, device="cuda")
info = sk.TimeoutInfo()
sk.symmetric_barrier(bases, 0, 0, 2, info, 0.5, "combine", _arrive=False)
try:
    torch.cuda.synchronize()
except Exception as exc:
    print("CUDA error:", type(exc).__name__)
try:
    info.check()
except RuntimeError as exc:
    print("RAISED:", exc)
"""


@pytest.mark.skipif(WORLD_SIZE > 1, reason="single-process check")
def test_spin_wait_times_out_and_names_phase(env):
    out = subprocess.run([sys.executable, "-c", _TIMEOUT_SCRIPT], capture_output=True, text=True,
                         timeout=120)
    assert "RAISED: mega_moe_layer: rank 0 timed out in the combine barrier" in out.stdout, \
        out.stdout + out.stderr
