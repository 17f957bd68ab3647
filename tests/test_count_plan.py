"""`dispatch._count_plan_kernel`: count + offsets + tile map + statistics in one launch, checked
against the torch ops it replaces (`l1_gemm.build_tile_map`, cumsum, stats.record), over
repeated calls (it must leave counts / cursor / ticket at zero and clear stale tile rows).
CPU: Triton's interpreter (integer-only kernel: faithful); GPU with `-m gpu` too."""
import pytest
import torch

import mega_moe_layer as mml
from mega_moe_layer.comm.workspace import CPUWorkspace
from mega_moe_layer.kernels import dispatch as dispatch_k
from mega_moe_layer.kernels import gemm_api
from mega_moe_layer.kernels._launch import Launcher
from utils import covered_once


def _run(dev, launcher_too, block_j=0):
    R, El, K, Tmax = 2, 5, 3, 40
    cfg = mml.MegaMoEConfig(hidden=128, intermediate=128, num_experts=El * R, topk=K,
                            max_tokens_per_rank=Tmax)
    wss = [CPUWorkspace(cfg, R) for _ in range(R)]
    if dev.type == "cuda":
        for w in wss:
            w.buffer.data = w.buffer.data.to(dev)
            w._views.clear()
    bases = torch.tensor([w.buffer.data_ptr() for w in wss], dtype=torch.int64, device=dev)
    off = wss[0].layout["topk_idx"].offset
    i32 = dict(dtype=torch.int32, device=dev)
    max_tiles = gemm_api.max_tiles(R * Tmax * K + 128 * El, El, gemm_api.SMALLEST_BLOCK_M)
    st = dict(counts=torch.zeros(El, **i32), ticket=torch.zeros(1, **i32),
              offsets=torch.zeros(El + 1, **i32), cursor=torch.zeros(El, **i32),
              te=torch.full((max_tiles,), -1, **i32), trs=torch.zeros(max_tiles, **i32),
              nt=torch.zeros(1, **i32), last=torch.zeros(El, **i32), cum=torch.zeros(El, **i32),
              recv=torch.zeros(1, **i32), te2=torch.full((max_tiles,), -1, **i32),
              trs2=torch.zeros(max_tiles, **i32), nt2=torch.zeros(1, **i32))
    g = torch.Generator().manual_seed(0)
    cum_expect = torch.zeros(El, dtype=torch.int64)
    rank = 1
    launchers = {}
    # calls with shrinking / growing tile counts, skew, an empty call, two-height plans
    # (bm, tail height, tail_max): the tail map grows, shrinks and is left out between calls, and
    # plans whose last full tile takes rows of the remainder (over: `TilePlan.over`)
    for call, (Ts, (bm, tbm, tmax, over), skew) in enumerate([
            ((40, 7), (16, 16, 0, 0), False), ((3, 0), (16, 16, 0, 0), False), ((40, 40), (32, 32, 0, 0), True),
            ((40, 40), (32, 16, 16, 0), False), ((40, 40), (64, 16, 32, 0), True), ((0, 0), (16, 16, 0, 0), False),
            ((25, 9), (16, 16, 0, 0), True), ((33, 20), (128, 32, 64, 0), False), ((40, 40), (32, 16, 16, 0), True),
            ((40, 40), (16, 8, 12, 4), False), ((40, 40), (8, 8, 0, 4), True), ((40, 33), (16, 4, 12, 2), False)]):
        all_idx = []
        for r in range(R):
            idx = torch.rand(Tmax, El * R, generator=g).argsort(dim=1)[:, :K].to(torch.int32)
            if skew:
                idx[:, 0] = rank * El + 2
                idx[:, 1:] = torch.where(idx[:, 1:] == rank * El + 2, -1, idx[:, 1:])
            idx[torch.rand(Tmax, K, generator=g) < 0.2] = -1
            idx[Ts[r]:] = -1
            wss[r].view("topk_idx").copy_(idx.to(dev))
            all_idx.append(idx)
        kw = dict(rank=rank, num_ranks=R, num_local_experts=El, max_tokens=Tmax, topk=K, block_m=bm,
                  block_t=16, block_tiles=8, recv_count=st["recv"], block_j=block_j)
        if tmax:
            kw.update(tail_block_m=tbm, tail_max=tmax, tail_maps=(st["te2"], st["trs2"], st["nt2"]))
        if over:
            kw.update(over=over)
        st["recv"].fill_(17)          # the previous call's received-row count: zeroed here
        a = (bases, off, st["counts"], st["ticket"], st["offsets"], st["cursor"], st["te"], st["trs"],
             st["nt"], st["last"], st["cum"])
        if launcher_too:
            if (bm, tbm, tmax, over) not in launchers:
                grid, args, kwargs = dispatch_k.count_plan_args(*a, **kw)
                launchers[bm, tbm, tmax, over] = Launcher(dispatch_k._count_plan_kernel, grid, args, kwargs)
            launchers[bm, tbm, tmax, over]()
        else:
            dispatch_k.dispatch_count_plan(*a, **kw)
        full = torch.cat(all_idx).long()
        mine = full[(full >= rank * El) & (full < (rank + 1) * El)] - rank * El
        counts = torch.bincount(mine, minlength=El)
        cum_expect += counts
        offsets = torch.zeros(El + 1, dtype=torch.int32)
        offsets[1:] = torch.cumsum(counts, 0)
        te = torch.empty(max_tiles, dtype=torch.int32)
        trs = torch.empty(max_tiles, dtype=torch.int32)
        nt = torch.empty(1, dtype=torch.int32)
        te2, trs2, nt2 = (torch.empty_like(t) for t in (te, trs, nt))
        gemm_api.build_tile_map(offsets, bm, max_tiles, te, trs, nt, tail_block_m=tbm, tail_max=tmax,
                                tail_out=(te2, trs2, nt2), over=over)
        what = f"call {call}"
        assert torch.equal(st["offsets"].cpu(), offsets), what
        assert torch.equal(st["nt"].cpu(), nt), what
        assert torch.equal(st["te"].cpu(), te), what
        assert torch.equal(st["trs"].cpu(), trs), what
        if tmax:           # the tail map (left as it was by one-height calls: only tails read it)
            assert torch.equal(st["nt2"].cpu(), nt2), what
            assert torch.equal(st["te2"].cpu(), te2), what
            assert torch.equal(st["trs2"].cpu(), trs2), what
            assert int(nt2) > 0 or call == 7, f"{what}: the case has no tail tiles"
        if tmax or over:
            # every pair in exactly one tile of either map, a main tile's rows past bm included
            assert covered_once(offsets, (te, trs, nt, bm), (te2, trs2, nt2, tbm) if tmax else None, over,
                                max(over, tmax)), f"{what}: pairs not covered exactly once"
            assert not over or any(int(c) > bm and 0 < int(c) % bm <= max(over, tmax) for c in counts), \
                f"{what}: no expert uses the over rows"
        assert torch.equal(st["last"].cpu().long(), counts), what
        assert torch.equal(st["cum"].cpu().long(), cum_expect), what
        for name in ("counts", "cursor", "ticket", "recv"):
            assert int(st[name].abs().sum()) == 0, f"{what}: {name} not reset"


@pytest.mark.parametrize("block_j", [0, 2])
def test_count_plan_matches_torch_ops(block_j):
    """block_j 2: experts with more than two tiles (the skewed calls: 80 pairs on one expert) are
    written over several rounds; 0: the default (one round here)."""
    _run(torch.device("cuda" if torch.cuda.is_available() else "cpu"), launcher_too=False, block_j=block_j)


def test_count_plan_through_launcher():
    _run(torch.device("cuda" if torch.cuda.is_available() else "cpu"), launcher_too=True)


def test_new_kernel_variants_compile_for_hopper_and_blackwell():
    """The count+plan kernel and the pre-dispatch's id-check / bf16-copy branches build (PTX)."""
    from mega_moe_layer.kernels import _compile, heuristics
    from mega_moe_layer.kernels.pre_dispatch import _pre_dispatch_kernel
    i32 = "i32"
    cp_sig = dict(peer_bases_ptr="*i64", idx_off="i64", counts_ptr="*i32", ticket_ptr="*i32",
                  offsets_ptr="*i32", cursor_ptr="*i32", tile_expert_ptr="*i32",
                  tile_row_start_ptr="*i32", num_tiles_ptr="*i32", stats_last_ptr="*i32",
                  stats_cum_ptr="*i32", recv_count_ptr="*i32", rank=i32, El=i32, Tmax=i32, block_m=i32,
                  tail_expert_ptr="*i32", tail_row_start_ptr="*i32", tail_num_ptr="*i32",
                  max_tiles=i32, tail_block_m=i32, tail_max=i32, tail_max_tiles=i32, over=i32, over_limit=i32)
    cp_cx = dict(K=8, KP=8, BLOCK_T=64, EP=256, BLOCK_J=8, BLOCK_TILES=64, STATS=True, RECV_LIST=True, TAIL=True, PDL=True)
    pcfg = heuristics.pre_dispatch_config(1, 7168, 32)
    pd_sig = {"x_ptr": "*i32", "topk_idx_ptr": "*i64", "topk_w_ptr": "*i32", "out_x_ptr": "*i32",
              "out_sf_ptr": "*i8", "out_idx_ptr": "*i32", "out_w_ptr": "*i32", "num_tokens": i32,
              "max_tokens": i32, "num_topk_rows": i32, "num_topk_programs": i32,
              "bad_row_ptr": "*i32", "num_experts": i32, "call_info_ptr": "*i64", "y_addr": "i64"}
    pd_cx = dict(HIDDEN=7168, GROUP=32, TOPK=8, TOPK_PAD=8, USE_FP4=False, HW_CVT=True,
                 NUM_TOKENS_ON_DEVICE=False, BLOCK_M=pcfg.block_m, BLOCK_W=pcfg.block_w,
                 TOPK_BLOCK_ROWS=pcfg.topk_block_rows, CHECK_IDS=True, COPY_BF16=True,
                 WRITE_CALL_INFO=True, num_tokens_ptr=None, out_e_ptr=None)
    jobs = [_compile.CompileJob(dispatch_k._count_plan_kernel, cp_sig, cp_cx, a) for a in (90, 100)]
    jobs += [_compile.CompileJob(_pre_dispatch_kernel, pd_sig, pd_cx, a, enable_fp_fusion=False)
             for a in (90, 100)]
    try:
        ptxs = _compile.compile_ptx_batch(jobs)
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    for ptx, arch in zip(ptxs, (90, 100, 90, 100)):
        assert _compile.ptx_target(ptx) == f"sm_{arch}a"
    assert all("atom.global" in p for p in ptxs[:2]), "ticket / count atomics"
    assert all("griddepcontrol.wait" in p for p in ptxs[:2]), "PDL: waits for the previous grid"
    assert all("atom.global" in p or "red.global" in p for p in ptxs[2:]), "bad-row atomic min"
