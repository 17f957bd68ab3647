"""Dispatch (pull) and combine-reduce kernels, with R ranks simulated in one process.

Each simulated rank has its own workspace (`CPUWorkspace`, same layout as the symmetric one);
`peer_bases` holds their addresses, exactly as the NVSHMEM peer table does on GPUs. Under the
Triton interpreter (CPU) or on one GPU, the kernels move bytes between those buffers. The experts
are replaced by a fixed function of the received row, so every check is bitwise.
"""
import re

import pytest
import torch

import mega_moe_layer as mml
from mega_moe_layer.comm.workspace import CPUWorkspace
from mega_moe_layer.kernels import combine as combine_k
from mega_moe_layer.kernels import dispatch as dispatch_k
from mega_moe_layer.kernels import reference as ref
from utils import assert_bitwise, make_inputs


def _setup(R, cfg, Ts, seed, dev):
    wss = [CPUWorkspace(cfg, R) for _ in range(R)]
    if dev.type == "cuda":
        for w in wss:
            w.buffer.data = w.buffer.data.to(dev)   # same layout on the device
            w._views.clear()
    bases = torch.tensor([w.buffer.data_ptr() for w in wss], dtype=torch.int64, device=dev)
    inputs = []
    for r, w in enumerate(wss):
        x, idx, wt = make_inputs(cfg, Ts[r], seed=seed + r, mask_frac=0.15)
        xq, xsf = ref.quantize_act(x, cfg.act_format, cfg.act_group_size)
        T = Ts[r]
        w.view("x")[:T].copy_(xq.to(dev))
        if xsf is not None:
            w.view("x_sf")[:T].copy_(xsf.to(dev))
        w.view("topk_idx").fill_(-1)
        w.view("topk_idx")[:T].copy_(idx.to(dev))
        w.view("topk_weights").zero_()
        w.view("topk_weights")[:T].copy_(wt.to(dev))
        inputs.append((x, idx, wt, xq, xsf))
    return wss, bases, inputs


def _fake_expert(xq_row, xsf_row, cfg, e):
    """y_k of a fake expert: the dequantised row times (e + 1), in bf16 (a bitwise-checkable map)."""
    x = ref.dequantize_act(xq_row, xsf_row, cfg.act_format, cfg.act_group_size)
    return (x * (e + 1)).to(torch.bfloat16)


@pytest.mark.parametrize("R,act,comb,H", [(2, "fp8", "bf16", 512), (3, "fp4", "fp8", 512), (2, "bf16", "bf16", 512),
                                          (1, "fp8", "fp8", 512), (2, "fp8", "fp8", 640)])
def test_dispatch_then_combine_bitwise(R, act, comb, H):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = mml.MegaMoEConfig(hidden=H, intermediate=128, num_experts=6 * R, topk=4,
                            max_tokens_per_rank=12, act_format=act, combine_format=comb)
    Ts = [12, 0, 5][:R] if R > 1 else [7]
    wss, bases, inputs = _setup(R, cfg, Ts, seed=10, dev=dev)
    El, K, H, Tmax = cfg.num_experts // R, cfg.topk, cfg.hidden, cfg.max_tokens_per_rank
    off = {s.name: s.offset for s in wss[0].layout}
    x_bytes = {"fp8": H, "fp4": H // 2, "bf16": 2 * H}[act]
    sf_bytes = 0 if act == "bf16" else H // cfg.act_group_size
    comb_bytes = H * (1 if comb == "fp8" else 2)
    comb_sf_bytes = 4 * (-(-H // 512)) if comb == "fp8" else 0   # padded to whole int32 words
    P = R * Tmax * min(K, El)
    for d in range(R):
        kw = dict(rank=d, num_ranks=R, num_local_experts=El, max_tokens=Tmax, topk=K)
        counts = torch.zeros(El, dtype=torch.int32, device=dev)
        dispatch_k.dispatch_count(bases, off["topk_idx"], counts, **kw)
        expect = torch.zeros(El, dtype=torch.int64)
        for (_, idx, _, _, _) in inputs:
            loc = idx[(idx >= d * El) & (idx < (d + 1) * El)] - d * El
            expect += torch.bincount(loc, minlength=El)
        assert torch.equal(counts.cpu().long(), expect), f"rank {d} counts"
        offsets = torch.zeros(El + 1, dtype=torch.int32, device=dev)
        offsets[1:] = torch.cumsum(counts, 0)
        cursor = torch.zeros(El, dtype=torch.int32, device=dev)
        pair_rows = wss[d].view("pair_rows")
        pw = torch.zeros(P, dtype=torch.float32, device=dev)
        pdst = torch.zeros(P, dtype=torch.int64, device=dev)
        pdst_sf = torch.zeros(P, dtype=torch.int64, device=dev)
        recv_rows = torch.full((R * Tmax,), -1, dtype=torch.int32, device=dev)
        recv_count = torch.zeros(1, dtype=torch.int32, device=dev)
        dispatch_k.dispatch_fill(bases, off, offsets, cursor, pair_rows, pw, pdst, pdst_sf,
                                 my_base=int(bases[d]), x_row_bytes=x_bytes, sf_row_bytes=sf_bytes,
                                 comb_row_bytes=comb_bytes, comb_sf_row_bytes=comb_sf_bytes,
                                 recv_rows=recv_rows, recv_count=recv_count, **kw)
        n = int(offsets[-1])
        assert torch.equal(cursor.cpu(), counts.cpu()), "every pair placed"
        # The fill's list of received rows: every pool row a pair uses, exactly once.
        nr = int(recv_count)
        listed = recv_rows[:nr].cpu().long()
        assert torch.equal(listed.sort().values, pair_rows[:n].cpu().long().unique()), "received-row list"
        assert bool((recv_rows[nr:].cpu() == -1).all())
        # Fake L2: for every pair, write y_k of the fake expert at the pair's destination address.
        rows = pair_rows[:n].cpu().long()
        recv_x = wss[d].view("recv_x").cpu()
        recv_sf = wss[d].view("recv_x_sf").cpu() if sf_bytes else None
        for p in range(n):
            e = int(torch.searchsorted(offsets[1:].cpu(), torch.tensor(p), right=True))
            s, t = divmod(int(rows[p]), Tmax)
            # the pulled row is the source's quantised row, bitwise
            assert_bitwise(recv_x[rows[p]], inputs[s][3][t], f"pool row of ({s}, {t})")
            if sf_bytes:
                assert_bitwise(recv_sf[rows[p]], inputs[s][4][t], f"pool scales of ({s}, {t})")
            y = _fake_expert(recv_x[rows[p]:rows[p] + 1], None if recv_sf is None else
                             recv_sf[rows[p]:rows[p] + 1], cfg, e + d * El)
            addr = int(pdst[p]) - int(bases[s])
            k = (addr - off["combine"]) // comb_bytes - t * K
            assert 0 <= k < K and int(inputs[s][1][t, k]) == e + d * El, "destination row (t, k)"
            assert float(pw[p]) == float(inputs[s][2][t, k]), "top-k weight of the pair"
            buf = wss[s].buffer
            if comb == "fp8":
                q, sf = ref.combine_quantize(y)
                buf[addr:addr + H] = q.view(torch.uint8)[0].to(dev)
                a_sf = int(pdst_sf[p]) - int(bases[s])
                buf[a_sf:a_sf + comb_sf_bytes] = sf.view(torch.uint8)[0].to(dev)
            else:
                buf[addr:addr + 2 * H] = y.view(torch.uint8)[0].to(dev)
    # Combine reduce on every rank vs the reference reduce of the same fake-expert rows.
    for s in range(R):
        x, idx, wt, xq, xsf = inputs[s]
        T = Ts[s]
        y = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=dev)
        err = torch.zeros(1, dtype=torch.int32, device=dev)
        combine_k.combine_reduce(wss[s].view("combine"),
                                 wss[s].view("combine_sf") if comb == "fp8" else None,
                                 wss[s].view("topk_idx"), y, err, cfg.num_experts)
        y_slots = torch.zeros(T, K, H)
        for t in range(T):
            for k in range(K):
                e = int(idx[t, k])
                if e >= 0:
                    yk = _fake_expert(xq[t:t + 1], None if xsf is None else xsf[t:t + 1], cfg, e)
                    y_slots[t, k] = (ref.combine_dequantize(*ref.combine_quantize(yk))
                                     if comb == "fp8" else yk.float())[0]
        assert_bitwise(y.cpu(), ref.combine_reduce(y_slots, idx), f"rank {s} combine")
        assert int(err) == 0


def test_combine_counts_out_of_range_ids():
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    K, H = 3, 512
    comb = torch.randn(4, K, H).to(torch.bfloat16).to(dev)
    idx = torch.tensor([[0, -1, 7], [9, 1, -3], [2, 2, 2], [-1, -1, -1]], dtype=torch.int32, device=dev)
    y = torch.empty(4, H, dtype=torch.bfloat16, device=dev)
    err = torch.zeros(1, dtype=torch.int32, device=dev)
    combine_k.combine_reduce(comb, None, idx, y, err, num_experts=8)
    assert int(err) == 2                                        # 9 and -3
    c = comb.float().cpu()
    exp = torch.stack([c[0, 0] + c[0, 2], c[1, 1], c[2, 0] + c[2, 1] + c[2, 2], torch.zeros(H)])
    # ascending-k float32 sum, one bf16 rounding
    exp[2] = (c[2, 0] + c[2, 1]) + c[2, 2]
    assert_bitwise(y.cpu(), exp.to(torch.bfloat16), "combine with masked / bad ids")
    # The layer's form: y's address and T read from the device (written by the pre-dispatch),
    # fewer row programs than rows (they stride); stale rows past T are never written.
    for rows in (1, 3, 8):
        y2 = torch.full((6, H), 7.0, dtype=torch.bfloat16, device=dev)
        info = torch.tensor([y2.data_ptr(), 4], dtype=torch.int64, device=dev)
        err.zero_()
        grid, args, kwargs = combine_k.combine_args(comb, None, idx, y2[:1], err, 8, call_info=info,
                                                    row_programs=rows)
        assert grid[0] == rows and kwargs["INFO_ON_DEVICE"]
        combine_k._combine_kernel[grid](*args, **kwargs)
        assert int(err) == 2
        assert_bitwise(y2[:4].cpu(), y.cpu(), f"combine, T and y on the device, {rows} row programs")
        assert torch.all(y2[4:].float() == 7.0), "rows past T untouched"


@pytest.fixture(scope="module")
def comm_ptx():
    """PTX of the dispatch, combine and barrier kernels for sm_90a and sm_100a (one batch)."""
    from mega_moe_layer.kernels import _compile
    from mega_moe_layer.kernels import sync as sync_k
    ptr64, i32 = "*i64", "i32"
    specs = {
        "count": (dispatch_k._count_kernel,
                  dict(peer_bases_ptr=ptr64, idx_off="i64", counts_ptr="*i32", rank=i32, El=i32, Tmax=i32),
                  dict(K=8, KP=8, BLOCK_T=64)),
        "fill": (dispatch_k._fill_kernel,
                 dict(peer_bases_ptr=ptr64, idx_off="i64", w_off="i64", x_off="i64", xsf_off="i64",
                      comb_off="i64", combsf_off="i64", my_base="i64", pool_off="i64", pool_sf_off="i64",
                      offsets_ptr="*i32", cursor_ptr="*i32", pair_rows_ptr="*i32", pair_w_ptr="*fp32",
                      pair_dst_ptr=ptr64, pair_dst_sf_ptr=ptr64, recv_rows_ptr="*i32", recv_count_ptr="*i32",
                      rank=i32, El=i32, Tmax=i32),
                 dict(X_WORDS=1792, SF_WORDS=56, COMB_ROW_BYTES=14336, COMB_SF_ROW_BYTES=0, K=8, KP=8,
                      BLOCK_T=4, CHUNK=2048, SF_CHUNK=64, RECV_LIST=True)),
        "combine": (combine_k._combine_kernel,
                    dict(comb_ptr="*fp8e4nv", comb_sf_ptr="*i32", idx_ptr="*i32", y_ptr="*i16",
                         err_ptr="*i32", T=i32, num_experts=i32),
                    dict(H=7168, K=8, FP8=True, BLOCK_H=1024, INFO_ON_DEVICE=False, info_ptr=None)),
        "combine_dev": (combine_k._combine_kernel,
                        dict(comb_ptr="*bf16", comb_sf_ptr="*bf16", idx_ptr="*i32", y_ptr="*i16",
                             err_ptr="*i32", T=i32, num_experts=i32, info_ptr=ptr64),
                        dict(H=7168, K=8, FP8=False, BLOCK_H=1024, INFO_ON_DEVICE=True)),
        "barrier": (sync_k._barrier_kernel,
                    dict(peer_bases_ptr=ptr64, signals_off="i64", info_ptr="*i32", rank=i32,
                         num_ranks=i32, timeout_ns="i64", phase=i32),
                    dict(ARRIVE=True)),
    }
    keys, jobs = [], []
    for name, (fn, sig, cx) in specs.items():
        for arch in (90, 100):
            keys.append((name, arch))
            jobs.append(_compile.CompileJob(fn, sig, cx, arch))
    return dict(zip(keys, _compile.compile_ptx_batch(jobs)))


@pytest.mark.parametrize("arch", [90, 100], ids=["sm_90a", "sm_100a"])
@pytest.mark.parametrize("name", ["count", "fill", "combine", "combine_dev", "barrier"])
def test_comm_kernels_compile(comm_ptx, name, arch):
    from mega_moe_layer.kernels._compile import ptx_target
    ptx = comm_ptx[(name, arch)]
    assert ptx_target(ptx) == f"sm_{arch}a"
    if name == "barrier":
        # cross-GPU ordering: system-scope release adds to the peers, acquire reads, bounded by
        # %globaltimer, and a trap on timeout
        assert re.search(r"(red|atom)\.global\.sys\.release\.add", ptx), "release.sys arrival"
        assert re.search(r"ld\.global\.sys\.acquire|atom\.global\.sys\.acquire", ptx), "acquire.sys wait"
        assert "%globaltimer" in ptx and "trap;" in ptx
    if name in ("combine", "combine_dev"):
        assert "atom.global" in ptx or "red.global" in ptx, "error counter update"
    if name == "combine":
        # the error count is added once, after every load of the K rows: an atomic between them
        # would chain the K loads one memory round trip each
        atomics = [m.start() for m in re.finditer(r"(atom|red)\.global", ptx)]
        assert len(atomics) == 1 and ptx.rfind("ld.global") < atomics[0], "one atomic, after the loads"
