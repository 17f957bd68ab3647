"""Grouped expert GEMMs on a CUDA GPU against `reference.expert_forward`.

    pytest -m gpu tests/test_gemm_gpu.py -q -s      # -s prints one metrics line per case

Every weight x act format, both combine formats, DeepSeek-V3's expert shape (H 7168, I 2048) and a
small one, 4 local experts with skewed counts (0, 1, > 256 pairs), pairs skipped through a zero
destination address, destination rows in scrambled order, poisoned buffers (rows without a live
pair must stay untouched), the decode / prefill tile heights, CUDA-graph capture and replay with
new counts, and no host synchronisation. Asserted: rel-RMSE <= 5e-3 on h (dequantised) and y, and
>= 99% of the quantised h bytes equal to the reference's (the metrics line reports the fraction).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import triton
import triton.language as tl

from mega_moe_layer.kernels import gemm_heuristics as gh
from mega_moe_layer.kernels import reference as ref
from mega_moe_layer.kernels.l1_gemm import (_fp4_pairs_bf16_asm, _fp4_pairs_bf16_lut_asm, build_tile_map,
                                            l1_grouped_gemm)
from utils import TOLERANCES, assert_rel_rmse, rel_rmse
from mega_moe_layer.kernels.rebase import rebase_act_rows
from test_gemm import (COMBOS, H_BYTES_MIN_FRACTION, H_BYTES_MIN_FRACTION_FP8_MMA, POISON, bytes_of, check_l1,
                       check_l2, h_buffers, make_destinations, make_problem, over_rows_chain, reference_h,
                       reference_y, run_l1, run_l1_into, run_l2)

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

DEV = "cuda"
#: (H, I, counts per local expert): DeepSeek-V3's expert shape with skewed counts, and a small one.
SHAPES = {"dsv3": (7168, 2048, [0, 1, 300, 37]), "small": (512, 256, [5, 0, 1, 40])}


def _report(tag: str, metrics: dict) -> None:
    print(f"\n[gemm-gpu] {tag}: " + ", ".join(f"{k}={v:.3e}" if "rmse" in k else f"{k}={v:.5f}"
                                             for k, v in metrics.items()))


def _run_case(H, I, counts, wf, af, block_m, seed, act_group_size=32, clamp=None):
    prob = make_problem(H, I, counts, wf, af, block_m=block_m, seed=seed, device=DEV,
                        act_group_size=act_group_size, clamp=clamp)
    h, h_sf = run_l1(prob)
    torch.cuda.synchronize()
    metrics = check_l1(prob, h, h_sf, f"{wf}x{af}")
    y_ref = reference_y(prob)
    n = prob.num_routed
    for comb in ("bf16", "fp8"):
        # Chain (kernel h -> L2) against expert_forward; a few pairs skipped (address 0).
        dest = make_destinations(prob, comb, skip=(0, n - 1), seed=seed)
        run_l2(prob, h, h_sf, comb, dest)
        torch.cuda.synchronize()
        m = check_l2(prob, dest, comb, y_ref, f"{wf}x{af} {comb} combine")
        metrics.update({f"{k}_{comb}": v for k, v in m.items()})
    # L2 alone on the reference's h: only its own accumulation order differs from the reference.
    _, hq, hsf = reference_h(prob)
    h2, h2_sf = h_buffers(prob, DEV)
    h2[:n].copy_(hq)
    if h2_sf is not None:
        h2_sf[:n].copy_(hsf)
    y_from_ref_h = torch.zeros(n, H, dtype=torch.bfloat16, device=DEV)
    hd = ref.dequantize_act(hq, hsf, af, 32).double()
    for e, s, t in prob.segments():
        y_from_ref_h[s:t] = (hd[s:t] @ prob.w2_f32[e].double().t()).to(torch.bfloat16)
    dest = make_destinations(prob, "bf16", seed=seed + 1)
    run_l2(prob, h2, h2_sf, "bf16", dest)
    torch.cuda.synchronize()
    m = check_l2(prob, dest, "bf16", y_from_ref_h, f"{wf}x{af} L2 alone")
    metrics.update({"l2_alone_y_rel_rmse": m["y_rel_rmse"], "l2_alone_y_bytes_equal": m["y_bytes_equal"]})
    return metrics


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("wf,af", COMBOS)
def test_every_format(wf, af, shape):
    H, I, counts = SHAPES[shape]
    block_m = gh.gemm_block_m(sum(counts) / len(counts))
    metrics = _run_case(H, I, counts, wf, af, block_m, seed=COMBOS.index((wf, af)))
    _report(f"{shape} {wf} x {af} bm{block_m}", metrics)


@pytest.mark.parametrize("block_m", gh.GEMM_BLOCK_MS)
@pytest.mark.parametrize("wf,af", [("mxfp4", "fp8"), ("fp8", "fp8"), ("mxfp4", "fp4")])
def test_every_tile_height(wf, af, block_m):
    H, I, counts = SHAPES["dsv3"]
    metrics = _run_case(H, I, counts, wf, af, block_m, seed=100 + block_m)
    _report(f"dsv3 {wf} x {af} bm{block_m}", metrics)


def test_clamp_and_group_128():
    metrics = _run_case(7168, 2048, [3, 0, 64, 290], "mxfp4", "fp8", 64, seed=7, act_group_size=128, clamp=0.5)
    _report("dsv3 mxfp4 x fp8 g128 clamp 0.5", metrics)


def test_cuda_graph_replay_with_new_counts_and_no_host_sync():
    """build_tile_map + L1 + L2 captured once; replayed after the device counts and pair rows
    change (as the dispatch would write them); no synchronising call inside."""
    H, I = 7168, 2048
    capacity = 400
    prob = make_problem(H, I, [0, 1, 300, 37], "mxfp4", "fp8", block_m=16, seed=21, device=DEV,
                        slack=capacity - 338)
    h, h_sf = h_buffers(prob, DEV)
    dest = make_destinations(prob, "bf16", seed=3)
    mt = prob.tile_expert.shape[0]

    def forward():
        build_tile_map(prob.expert_offsets, prob.block_m, mt, prob.tile_expert, prob.tile_row_start, prob.num_tiles)
        l1_grouped_gemm(prob.pool_x, prob.pool_x_sf, prob.pair_rows, prob.pair_weights, prob.expert_offsets,
                        prob.tile_expert, prob.tile_row_start, prob.num_tiles, prob.w13.data, prob.w13.scale, h, h_sf,
                        weight_format="mxfp4", act_format="fp8", act_group_size=32, activation_clamp=None,
                        block_m=prob.block_m, w13_operand=prob.w13_op)
        run_l2(prob, h, h_sf, "bf16", dest)

    forward()                                  # compile + warm up outside the capture
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        forward()                              # raises on any synchronising call
    finally:
        torch.cuda.set_sync_debug_mode(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph, stream=stream):
        forward()
    torch.cuda.current_stream().wait_stream(stream)

    for counts, seed in (([10, 0, 200, 190], 1), ([0, 0, 0, 0], 2), ([1, 1, 1, 397], 3), ([0, 1, 300, 37], 4)):
        g = torch.Generator(device=DEV).manual_seed(seed)
        prob.counts = list(counts)
        offs = torch.tensor([0] + list(torch.tensor(counts).cumsum(0)), dtype=torch.int32)
        prob.expert_offsets.copy_(offs)
        prob.pair_rows.copy_(torch.randint(0, prob.pool_x.shape[0], (capacity,), generator=g, device=DEV).int())
        for t in (h, h_sf, dest.out):
            bytes_of(t).fill_(POISON)
        graph.replay()
        torch.cuda.synchronize()
        if sum(counts) == 0:
            assert bool((bytes_of(h) == POISON).all()) and bool((bytes_of(dest.out) == POISON).all())
            continue
        m = check_l1(prob, h, h_sf, f"graph {counts}")
        m.update(check_l2(prob, dest, "bf16", reference_y(prob), f"graph {counts}"))
        _report(f"graph replay counts {counts}", m)


@pytest.mark.parametrize("wf,af", [(w, a) for w in ("mxfp4", "fp8") for a in ("fp8", "fp4")])
def test_fp8_mainloop_dsv3(wf, af):
    """The opt-in FP8 mainloop (`MegaMoEConfig.hopper_fp8_mainloop`) at DeepSeek-V3's expert shape:
    L1 -> L2 against `reference.expert_forward` within its own tolerance entry (Hopper's FP8 MMA
    accumulates in reduced precision), and against the reference of the rebased operands."""
    H, I, counts = SHAPES["dsv3"]
    prob = make_problem(H, I, counts, wf, af, block_m=gh.gemm_block_m(sum(counts) / len(counts)), seed=5,
                        device=DEV, fp8_mainloop=True)
    assert prob.w13_op.kind != "raw" and prob.w2_op.kind != "raw"
    h, h_sf = run_l1(prob)
    dest = make_destinations(prob, "bf16", seed=5)
    run_l2(prob, h, h_sf, "bf16", dest)
    torch.cuda.synchronize()
    n = prob.num_routed
    keep = (dest.dest_row[:n] >= 0)
    got = dest.out[dest.dest_row[:n][keep].to(DEV)].double()
    want = reference_y(prob)[keep.to(DEV)].double()
    err = assert_rel_rmse(got, want, TOLERANCES["gemm_fp8_mainloop_rel_rmse"], f"fp8 mainloop {wf}x{af} y")
    _report(f"fp8 mainloop {wf}x{af}", {"y_rel_rmse": err})


@pytest.mark.parametrize("block_m", [16, 128])
@pytest.mark.parametrize("af", ["fp8", "fp4"])
def test_fp4_lut_decoder_equals_default(af, block_m):
    """`GroupedGemmConfig(fp4_decoder="lut")` (MXFP4 weights, bf16 mainloop): h and y bitwise equal
    to the default decoder's, for both GEMMs, at a decode and a prefill tile."""
    H, I, counts = SHAPES["dsv3"]
    prob = make_problem(H, I, counts, "mxfp4", af, block_m=block_m, seed=7, device=DEV)
    prob.w13_op = prob.w2_op = None                      # the bf16 mainloop on the raw weights
    c1 = dataclasses.replace(gh.l1_gemm_config(block_m, H, I, "mxfp4", af), fp4_decoder="lut")
    c2 = dataclasses.replace(gh.l2_gemm_config(block_m, H, I, "mxfp4", af, "bf16"), fp4_decoder="lut")
    outs = []
    for l1_cfg, l2_cfg in ((None, None), (c1, c2)):
        h, h_sf = run_l1(prob, config=l1_cfg)
        dest = make_destinations(prob, "bf16", seed=3)
        run_l2(prob, h, h_sf, "bf16", dest, config=l2_cfg)
        torch.cuda.synchronize()
        n = prob.num_routed
        outs.append((h[:n].view(torch.uint8).clone(), dest.out.view(torch.int16).clone()))
    assert torch.equal(outs[0][0], outs[1][0]), "L1 h differs with the lut decoder"
    assert torch.equal(outs[0][1], outs[1][1]), "L2 y differs with the lut decoder"


@triton.jit
def _decode_kernel(p_ptr, s_ptr, o_ptr, BLOCK: tl.constexpr, NEW: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    p = tl.load(p_ptr + i)
    s = tl.load(s_ptr + i)
    if NEW:
        lo, hi = _fp4_pairs_bf16_lut_asm(p, s)
    else:
        lo, hi = _fp4_pairs_bf16_asm(p, s)
    tl.store(o_ptr + 2 * i, lo)
    tl.store(o_ptr + 2 * i + 1, hi)


def test_fp4_bf16_decoders_equal_on_gpu():
    """Both E2M1 -> bf16 decoders on every packed byte x every scale byte: bitwise equal to each
    other, and to the reference for scale bytes 0..254 (`test_ptx_decode` checks the new one's PTX
    on the CPU); byte 255 (not a scale the package writes) gives +-inf, NaN for the zero codes."""
    from test_ptx_decode import _reference_bits

    N = 256 * 256
    b = torch.arange(256, dtype=torch.int32).repeat(256)
    sc = torch.arange(256, dtype=torch.int32).repeat_interleave(256)
    p = b.to(torch.uint8).view(torch.int8).cuda()
    s = sc.to(torch.uint8).cuda()
    outs = []
    for new in (False, True):
        o = torch.empty(2 * N, dtype=torch.bfloat16, device="cuda")
        _decode_kernel[(N // 1024,)](p, s, o, BLOCK=1024, NEW=new, num_warps=4)
        outs.append(o.view(torch.int16).cpu())
    assert torch.equal(outs[0], outs[1]), "the two decoders differ"
    got = outs[1].to(torch.int32).view(N, 2) & 0xFFFF
    # Scale bytes 0..254 (the quantisers write 1..254): the reference's bits exactly.
    ok = sc < 255
    want = torch.tensor([_reference_bits(int(x), int(y)) for x, y in zip(b[ok], sc[ok])], dtype=torch.int32)
    bad = (got[ok] != want).any(dim=1).nonzero().flatten()
    assert bad.numel() == 0, "decode differs from the reference at (byte, scale, got, want): " + ", ".join(
        f"({int(b[ok][i])}, {int(sc[ok][i])}, {[hex(v) for v in got[ok][i].tolist()]}, "
        f"{[hex(v) for v in want[i].tolist()]})" for i in bad[:8])
    # Scale byte 255 (UE8M0 NaN; never written): bf16 inf times the code, so +-inf or a NaN for 0.
    last = got[~ok]
    codes = torch.stack([b[~ok] & 0xF, b[~ok] >> 4], dim=1)
    is_nan = ((last & 0x7F80) == 0x7F80) & ((last & 0x7F) != 0)
    assert torch.equal(is_nan, (codes & 7) == 0), "scale byte 255: NaN exactly for the zero codes"
    inf = torch.where(codes >= 8, 0xFF80, 0x7F80)
    assert torch.equal(torch.where(is_nan, inf, last), inf), "scale byte 255: +-inf for the nonzero codes"


@pytest.mark.parametrize("over", [16, 32])
@pytest.mark.parametrize("wf", ["mxfp4", "fp8"])
def test_over_rows_dsv3(wf, over, monkeypatch):
    """The prefill tiles with rows past block_m (`TilePlan.over`, the plan T 4096 gets: 128-row
    tiles, 16 rows past, 16-row tails up to 48) at DeepSeek-V3's expert shape, next to the tail
    launch: every pair's h and y against the reference (`test_gemm.over_rows_chain`). Counts: 138
    (10 past), 158 (16 past + a 14-row tail), 300 (2 full tiles, 16 past + 28 in tails), 20 (tails
    only), 128 (none past), 0. over 32 (the kernels' second height of rows past, `OVER_MS`): 158
    takes all 30 rows past, 300 takes 32 and leaves a 12-row tail."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the streamed FP8 mainloop is Hopper's")
    monkeypatch.setattr(gh, "OVER_MS", tuple(sorted(set(gh.OVER_MS) | {over})))
    plan = gh.TilePlan(128, 16, 48, over)
    _, _, _, metrics = over_rows_chain(7168, 2048, [138, 158, 300, 20, 128, 0], plan, wf, seed=31, device=DEV,
                                       num_sms=None)
    _report(f"over rows {wf}", metrics)


def _calls(monkeypatch, module, name):
    """A list that gets one entry per call of `module.name` (wrapped for the test's duration)."""
    calls, fn = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


def _mismatch(got, want, same):
    """A failure message's account of where `got` differs from `want` (`same`: the entries that
    agree): how many, which rows and columns (first few, and their residues mod 128 / 32, the
    kernels' tile heights and column groups), and the values' relative RMSE (the kernel's bug shows
    in the pattern: a whole tile, a K step's columns, one lane's rows)."""
    bad = (~same).nonzero()
    if bad.numel() == 0:
        return "no differences"
    g, w = got.float(), want.float()
    fin = torch.isfinite(g) & torch.isfinite(w)           # (the poison's NaN rows left out)
    err = rel_rmse(g[fin], w[fin])
    rows = torch.unique(bad[:, 0])
    msg = (f"{bad.shape[0]} of {same.numel()} entries in {rows.numel()} of {same.shape[0]} rows; rel-RMSE "
           f"{err:.3e}; first {bad[:6].tolist()}; rows {rows[:12].tolist()}")
    if bad.shape[1] > 1:
        cols = torch.unique(bad[:, 1])
        msg += (f"; {cols.numel()} columns, first {cols[:12].tolist()}; rows mod 128 "
                f"{torch.unique(bad[:, 0] % 128)[:16].tolist()}; columns mod 32 {torch.unique(bad[:, 1] % 32).tolist()}")
    return msg


def _gluon_l1_against_triton(prob, x_rebased, monkeypatch, **run_kw):
    """Run L1 into fresh poisoned buffers with the Triton kernel, then with the Gluon one
    (`l1_gluon.ENABLED`); assert the Gluon kernel was taken, the scale bytes equal and every h entry
    equal (as bytes, or as values: a zero sum may differ in sign). Returns the Gluon (h, h_sf) and
    the fraction of equal h bytes."""
    from mega_moe_layer.kernels import l1_gluon
    taken = _calls(monkeypatch, l1_gluon, "l1_gluon_launch")
    outs = []
    for enabled in (False, True):
        monkeypatch.setattr(l1_gluon, "ENABLED", enabled)
        h, h_sf = h_buffers(prob, DEV)
        run_l1_into(prob, h, h_sf, x_rebased=x_rebased, **run_kw)
        torch.cuda.synchronize()
        outs.append((h, h_sf))
    assert taken == [1], "the Gluon kernel was not taken"
    (h_t, sf_t), (h_g, sf_g) = outs
    same_bytes = bytes_of(h_g) == bytes_of(h_t)
    same = same_bytes | (h_g.float() == h_t.float())          # +0 == -0; the poison's NaN bytes as bytes
    sf_same = bytes_of(sf_g) == bytes_of(sf_t)
    assert bool(same.all()) and bool(sf_same.all()), (
        f"h differs from the Triton kernel's: {_mismatch(h_g, h_t, same)}; scale bytes: "
        f"{_mismatch(bytes_of(sf_g), bytes_of(sf_t), sf_same)}")
    return h_g, sf_g, float(same_bytes.float().mean())


def _gluon_problem(counts, wf, block_m, seed, clamp=None, lane=False):
    """A DeepSeek-V3-shaped L1 problem on the GPU and its x rebased (`rebase_act_rows`), or a skip
    where the Gluon L1 cannot run. lane: 4-bit words and x in the "lane" K order."""
    from mega_moe_layer.kernels import l1_gluon
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon L1 is Hopper's")
    if not l1_gluon.HAVE_GLUON:
        pytest.skip("this Triton has no Gluon Hopper ops")
    prob = make_problem(7168, 2048, counts, wf, "fp8", block_m=block_m, seed=seed, fp8_mainloop=True, device=DEV,
                        clamp=clamp, lane_k=lane)
    x8 = torch.empty(prob.pool_x.shape[0], 7168, dtype=torch.float8_e4m3fn, device=DEV)
    x_e = torch.empty(prob.pool_x.shape[0], dtype=torch.int32, device=DEV)
    rebase_act_rows(prob.pool_x, prob.pool_x_sf, x8, x_e, prob.expert_offsets[-1:], act_format="fp8", group=32,
                    rows=prob.pair_rows, lane_k=prob.w13_op.lane)
    return prob, (x8, x_e)


def _prefill_main_map(prob, counts):
    """`prob` with the main tile map of the T = 4096 plan (128-row tiles, 16 rows past them, 16-row
    tails up to 48 in a map not returned) and the launch keywords of its rows past block_m."""
    plan = gh.TilePlan(128, 16, 48, 16)
    mt = gh.max_tiles(prob.num_pairs, len(counts), 16)
    i32 = dict(dtype=torch.int32, device=DEV)
    main = (torch.empty(mt, **i32), torch.empty(mt, **i32), torch.empty(1, **i32))
    tail = (torch.empty(mt, **i32), torch.empty(mt, **i32), torch.empty(1, **i32))
    build_tile_map(prob.expert_offsets, 128, mt, *main, tail_block_m=16, tail_max=48, tail_out=tail, over=16)
    mp = dataclasses.replace(prob, tile_expert=main[0], tile_row_start=main[1], num_tiles=main[2])
    return mp, plan, dict(over_m=plan.over, over_limit=plan.over_limit)


# (the Gluon gates keep to few cases: each is a new compile of the Triton and Gluon kernels at
# DeepSeek-V3's shape on a machine whose cache starts empty)
@pytest.mark.parametrize("wf, clamp", [("mxfp4", None), ("mxfp4", 7.0), ("fp8", None)])
def test_gluon_l1_matches_triton(wf, clamp, monkeypatch):
    """The warp-specialised Gluon L1 (`kernels.l1_gluon`) against the Triton kernel
    on L1's main prefill launch at DeepSeek-V3's expert shape, 128-row tiles with 16 rows past them
    (counts 138, 158, 300, 20, 128, 0 as `test_over_rows_dsv3`): the same partial sums added in the
    same order and the same epilogue, so h must be the same values and its scale bytes the same
    (`_gluon_l1_against_triton`); the rows the launch does not own stay poisoned in both. Then the
    whole L1 -> L2 chain with it against the DESIGN reference (`over_rows_chain`)."""
    from mega_moe_layer.kernels import l1_gluon
    counts = [138, 158, 300, 20, 128, 0]
    prob, x_rebased = _gluon_problem(counts, wf, 128, 37, clamp)
    mp, plan, kw = _prefill_main_map(prob, counts)
    _, _, same = _gluon_l1_against_triton(mp, x_rebased, monkeypatch, **kw)
    _report(f"gluon l1 {wf} clamp {clamp}", {"h_bytes_equal": same})
    heights, fn = [], l1_gluon.l1_gluon_launch
    monkeypatch.setattr(l1_gluon, "l1_gluon_launch", lambda *a, **k: heights.append(k["block_m"]) or fn(*a, **k))
    monkeypatch.setattr(l1_gluon, "ENABLED", True)
    _, _, _, metrics = over_rows_chain(7168, 2048, counts, plan, wf, seed=41, device=DEV, num_sms=None)
    # the chain's two L1 launches: the main map's 128-row tiles, the tail map's 16-row ones
    assert heights == [128, 16], f"the Gluon kernel's launches in the chain: tile heights {heights}"
    _report(f"gluon l1 chain {wf}", metrics)


@pytest.mark.parametrize("wf", ["mxfp4", "fp8"])
def test_gluon_l1_pair_ordered_x_matches_triton(wf, monkeypatch):
    """The Gluon L1 reading each 128-row tile's token rows as one TMA box from x rebased in pair
    order (`rebase.order_pair_rows`, `l1_grouped_gemm(x_pairs=)`: the kernel's PAIR_X) instead of
    gathering them: the same operand values, so h must equal the Triton kernel's bit for bit
    (`test_gluon_l1_matches_triton`'s problem and map, 16 rows past the tiles; the rows past an
    expert's pairs inside a box hold the next expert's rows here, never stored)."""
    from mega_moe_layer.kernels import l1_gluon
    from mega_moe_layer.kernels.rebase import order_pair_rows
    counts = [138, 158, 300, 20, 128, 0]
    prob, x_rebased = _gluon_problem(counts, wf, 128, 59)
    mp, plan, kw = _prefill_main_map(prob, counts)
    xp = torch.empty(mp.pair_rows.numel(), 7168, dtype=torch.float8_e4m3fn, device=DEV)
    order_pair_rows(x_rebased[0], mp.pair_rows, mp.expert_offsets[-1:], xp)
    n = mp.num_routed
    assert torch.equal(xp[:n].view(torch.uint8), x_rebased[0][mp.pair_rows[:n].long()].view(torch.uint8))
    boxes = _calls(monkeypatch, l1_gluon, "pair_x_descriptors")
    _, _, same = _gluon_l1_against_triton(mp, x_rebased, monkeypatch, x_pairs=xp, **kw)
    assert boxes == [1], "the Gluon kernel did not take the pair-ordered rows"
    _report(f"gluon l1 pair-ordered x {wf}", {"h_bytes_equal": same})


@pytest.mark.parametrize("block_m, pair_x", [(128, False), (128, True), (16, False)])
def test_gluon_l1_decode_ahead_matches_triton(block_m, pair_x, monkeypatch):
    """The Gluon L1 decoding every odd K step's words while the even step's MMAs run
    (`l1_gluon.DECODE_AHEAD`, `_ahead_loop`): the same partial sums added in the same order, so h
    must equal the Triton kernel's bit for bit. 128-row tiles (promoted every 128 K;
    `test_gluon_l1_matches_triton`'s problem and map: items with and without rows past block_m),
    the token rows gathered or in pair order; 16-row decode tiles (promoted every 256 K: the pair's
    MMAs chained, `test_gluon_l1_decode_matches_triton`'s counts)."""
    from mega_moe_layer.kernels import l1_gluon
    from mega_moe_layer.kernels.rebase import order_pair_rows
    if block_m == 128:
        counts = [138, 158, 300, 20, 128, 0]
        prob, x_rebased = _gluon_problem(counts, "mxfp4", 128, 67)
        prob, plan, kw = _prefill_main_map(prob, counts)
    else:
        prob, x_rebased = _gluon_problem([1, 9, 16, 17, 40, 0, 3], "mxfp4", block_m, 71)
        kw = {}
    if pair_x:
        xp = torch.empty(prob.pair_rows.numel(), 7168, dtype=torch.float8_e4m3fn, device=DEV)
        order_pair_rows(x_rebased[0], prob.pair_rows, prob.expert_offsets[-1:], xp)
        kw["x_pairs"] = xp
    monkeypatch.setattr(l1_gluon, "DECODE_AHEAD", True)
    built, launch = [], l1_gluon.l1_gluon_launch
    monkeypatch.setattr(l1_gluon, "l1_gluon_launch",
                        lambda *a, **k: (lambda r: built.append(r[3]["AHEAD"]) or r)(launch(*a, **k)))
    _, _, same = _gluon_l1_against_triton(prob, x_rebased, monkeypatch, **kw)
    assert built == [True], f"the decode-ahead build was not launched: {built}"
    _report(f"gluon l1 decode ahead {block_m} pair_x {pair_x}", {"h_bytes_equal": same})


@pytest.mark.parametrize("block_m", [128, 16])
def test_gluon_l1_lane_k_order_matches_triton(block_m, monkeypatch):
    """4-bit words in the "lane" K order (`gemm_operands.LANE_K_ORDER`) and x rebased in it: the
    Gluon L1 (one table per row and step, `LANE`) and the Triton L1 ("imad_lane") sum the same
    products in the same MMAs, so h must be equal bit for bit; at 16 rows the whole h also against
    the DESIGN reference (a mismatched order is far off it)."""
    from mega_moe_layer.kernels import l1_gluon
    if block_m == 128:
        counts = [138, 158, 300, 20, 128, 0]
        prob, x_rebased = _gluon_problem(counts, "mxfp4", 128, 67, lane=True)
        prob, plan, kw = _prefill_main_map(prob, counts)
    else:
        prob, x_rebased = _gluon_problem([1, 9, 16, 17, 40, 0, 3], "mxfp4", block_m, 71, lane=True)
        kw = {}
    assert prob.w13_op.lane
    built, launch = [], l1_gluon.l1_gluon_launch
    monkeypatch.setattr(l1_gluon, "l1_gluon_launch",
                        lambda *a, **k: (lambda r: built.append(r[3].get("LANE")) or r)(launch(*a, **k)))
    h, h_sf, same = _gluon_l1_against_triton(prob, x_rebased, monkeypatch, **kw)
    assert built == [True], f"the lane build was not launched: {built}"
    if block_m == 16:
        check_l1(prob, h, h_sf, "gluon l1 lane order")
    _report(f"gluon l1 lane order {block_m}", {"h_bytes_equal": same})


@pytest.mark.parametrize("wf, block_m, comb", [("mxfp4", 128, "bf16"), ("mxfp4", 16, "bf16"), ("mxfp4", 16, "fp8"),
                                               ("fp8", 16, "bf16")])
def test_epilogue_hw_cvt_same_bytes(wf, block_m, comb, monkeypatch):
    """`l1_gemm.EPILOGUE_HW_CVT`: the epilogues' bf16 and E4M3 roundings by the GPU's RNE
    conversions give the bytes of the integer encoders: h and its scale bytes (L1), the
    destination rows (L2, bf16 or FP8 combine) equal with the switch off and on, at the kernels
    each launch takes by default (128 + 16 rows: the Gluon L1, the Triton L2; 16 rows: the Triton
    L1 for 4-bit words, the Gluon kernels for FP8 ones and the Gluon L2 with the bf16 combine); the
    switched launches built with EPI_CVT."""
    from mega_moe_layer.kernels import l1_gemm, l1_gluon, l2_gluon
    counts = [138, 158, 300, 20, 128, 0] if block_m == 128 else [1, 9, 16, 17, 40, 0, 3]
    prob, x_rebased = _gluon_problem(counts, wf, block_m, 59)
    kw = {}
    if block_m == 128:
        prob, plan, kw = _prefill_main_map(prob, counts)
    built = []
    for mod, name in ((l1_gluon, "l1_gluon_launch"), (l2_gluon, "l2_gluon_launch")):
        launch = getattr(mod, name)
        monkeypatch.setattr(mod, name, (lambda f: lambda *a, **k: (lambda r: built.append(r[3].get("EPI_CVT")) or r)(
            f(*a, **k)))(launch))
    outs = []
    for on in (False, True):
        monkeypatch.setattr(l1_gemm, "EPILOGUE_HW_CVT", on)
        assert l1_gemm.epilogue_cvt(l1_gemm._l1_kernel) == ({"EPI_CVT": True} if on else {})
        h, h_sf = h_buffers(prob, DEV)
        h.view(torch.uint8).zero_()              # rows of the tail tiles (not run here): zeros, not poison
        h_sf.zero_()
        run_l1_into(prob, h, h_sf, x_rebased=x_rebased, **kw)
        h8 = torch.empty(prob.num_pairs, 2048, dtype=torch.float8_e4m3fn, device=DEV)
        h_e = torch.empty(prob.num_pairs, dtype=torch.int32, device=DEV)
        rebase_act_rows(h, h_sf, h8, h_e, prob.expert_offsets[-1:], act_format="fp8", group=32)
        dest = make_destinations(prob, comb, skip=(2,))
        run_l2(prob, h, h_sf, comb, dest, h_rebased=(h8, h_e), **kw)
        torch.cuda.synchronize()
        outs.append((h, h_sf, dest))
    (h0, sf0, d0), (h1, sf1, d1) = outs
    assert torch.equal(bytes_of(h1), bytes_of(h0)) and torch.equal(bytes_of(sf1), bytes_of(sf0)), \
        f"h differs with the hardware conversions: {_mismatch(h1, h0, bytes_of(h1) == bytes_of(h0))}"
    assert torch.equal(bytes_of(d1.out), bytes_of(d0.out)), "the L2 destinations differ with the hardware conversions"
    if comb == "fp8":
        assert torch.equal(bytes_of(d1.out_sf), bytes_of(d0.out_sf))
    half = len(built) // 2
    assert not any(built[:half]) and all(built[half:]), f"Gluon launches' EPI_CVT (off, then on): {built}"


@pytest.mark.parametrize("wf, block_m", [("mxfp4", 16), ("mxfp4", 32), ("fp8", 16)])
def test_gluon_l1_one_gather_warp_matches_triton(wf, block_m, monkeypatch):
    """`l1_gluon.DECODE_GATHER_WARPS` 1: one warp gathers the decode tiles' token rows (4 or 8
    cp.async a step per thread, 32 arrivals on the stage's barrier): h equal to the Triton kernel's
    bit for bit (`test_gluon_l1_decode_matches_triton`'s problem), the one-warp build launched."""
    from mega_moe_layer.kernels import l1_gluon
    prob, x_rebased = _gluon_problem([1, 9, 16, 17, 40, 0, 3], wf, block_m, 43)
    monkeypatch.setattr(l1_gluon, "DECODE_GATHER_WARPS", 1)
    built, launch = [], l1_gluon.l1_gluon_launch
    monkeypatch.setattr(l1_gluon, "l1_gluon_launch",
                        lambda *a, **k: (lambda r: built.append(r[3].get("GATHER_WARPS")) or r)(launch(*a, **k)))
    h, h_sf, same = _gluon_l1_against_triton(prob, x_rebased, monkeypatch)
    assert built == [1], f"the one-warp gather was not launched: {built}"
    _report(f"gluon l1 one gather warp {wf} {block_m}", {"h_bytes_equal": same})


@pytest.mark.parametrize("block_m", [16, 128])
def test_gluon_l2_lane_k_order_matches_triton(block_m, monkeypatch):
    """`test_gluon_l2_matches_triton` with w2's words and h in the "lane" K order: y equal to the
    Triton kernel's, the chain against the reference, the lane build launched."""
    from mega_moe_layer.kernels import l2_gluon
    built, launch = [], l2_gluon.l2_gluon_launch
    monkeypatch.setattr(l2_gluon, "l2_gluon_launch",
                        lambda *a, **k: (lambda r: built.append(r[3].get("LANE")) or r)(launch(*a, **k)))
    test_gluon_l2_matches_triton("mxfp4", block_m, monkeypatch, lane=True)
    assert built and all(built), f"the lane build was not launched: {built}"


def test_gluon_l1_prefill_256k_promotion_vs_reference(monkeypatch):
    """`l1_gluon.PREFILL_PROMOTE_K` 256 with `DECODE_AHEAD`: the 128-row 4-bit launches sum 256 K per
    partial sum (other sums than the Triton kernel's, so no bitwise gate): the whole L1 -> L2 chain
    of `test_gluon_l1_matches_triton` (rows past block_m, tail tiles) against the DESIGN reference
    within the GEMM tolerances (`over_rows_chain`), the main launch built with two steps a
    promotion."""
    from mega_moe_layer.kernels import l1_gluon
    if torch.cuda.get_device_capability()[0] != 9 or not l1_gluon.HAVE_GLUON:
        pytest.skip("the Gluon L1 is Hopper's")
    counts = [138, 158, 300, 20, 128, 0]
    monkeypatch.setattr(l1_gluon, "ENABLED", True)
    monkeypatch.setattr(l1_gluon, "DECODE_AHEAD", True)
    monkeypatch.setattr(l1_gluon, "PREFILL_PROMOTE_K", 256)
    built, launch = [], l1_gluon.l1_gluon_launch
    monkeypatch.setattr(l1_gluon, "l1_gluon_launch", lambda *a, **k: (
        lambda r: built.append((k["block_m"], r[3]["PROMOTE_STEPS"], r[3]["AHEAD"])) or r)(launch(*a, **k)))
    _, _, _, metrics = over_rows_chain(7168, 2048, counts, gh.TilePlan(128, 16, 48, 16), "mxfp4", seed=73,
                                       device=DEV, num_sms=None)
    assert built[0] == (128, 2, True), built
    _report("gluon l1 prefill 256-K promotion chain", metrics)


@pytest.mark.parametrize("pair_x", [False, True])
def test_gluon_l1_profile_build(pair_x, monkeypatch):
    """The Gluon L1's measuring build (`l1_gluon.PROFILE`, `bench_gemm.py --profile`): its h equal
    to the Triton kernel's as the plain build's, and its counters whole: every work item of the
    launch counted once (tiles x N blocks), every CTA's MMA warpgroup and producer cycles counted,
    and the parts of the MMA warpgroup's cycles inside its total."""
    from mega_moe_layer.kernels import l1_gluon
    from mega_moe_layer.kernels.rebase import order_pair_rows
    counts = [138, 158, 300, 20, 128, 0]
    prob, x_rebased = _gluon_problem(counts, "mxfp4", 128, 61)
    mp, plan, kw = _prefill_main_map(prob, counts)
    if pair_x:
        xp = torch.empty(mp.pair_rows.numel(), 7168, dtype=torch.float8_e4m3fn, device=DEV)
        order_pair_rows(x_rebased[0], mp.pair_rows, mp.expert_offsets[-1:], xp)
        kw["x_pairs"] = xp
    prof = torch.zeros(8 * 4096, dtype=torch.int64, device=DEV)
    monkeypatch.setattr(l1_gluon, "PROFILE", prof)
    _gluon_l1_against_triton(mp, x_rebased, monkeypatch, **kw)
    split = l1_gluon.profile_split(prof.cpu())
    items = int(mp.num_tiles.item()) * (2048 // l1_gluon.BLOCK_N)
    _report(f"gluon l1 profile pair_x {pair_x}", split)
    assert split["items"] == items, (split["items"], items)
    # (every CTA of the grid writes its counters, those without an item too)
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count
    assert min(items, 2 * sms) <= split["ctas"] <= 2 * sms, (split["ctas"], items, sms)
    rows = prof.view(-1, 8)[:split["ctas"]].cpu()
    assert bool((rows[:, 0] > 0).all() and (rows[:, 5] > 0).all()), "a CTA's counters were not written"
    parts = rows[:, 1] + rows[:, 2] + rows[:, 3]
    assert bool((parts <= rows[:, 0]).all() and (rows[:, 6] <= rows[:, 5]).all()), rows[:4]


@pytest.mark.parametrize("wf, block_m", [("mxfp4", 16), ("mxfp4", 32), ("fp8", 16)])
def test_gluon_l1_decode_matches_triton(wf, block_m, monkeypatch):
    """The Gluon L1 at the decode tile heights (four CTAs per SM, deeper stages: `launch_plan`)
    against the Triton kernel, as `test_gluon_l1_matches_triton`: one tile map of `block_m` rows
    over counts 1, 9, 16, 17, 40, 0, 3 (partial and full tiles); then h against the reference."""
    prob, x_rebased = _gluon_problem([1, 9, 16, 17, 40, 0, 3], wf, block_m, 43)
    h, h_sf, _ = _gluon_l1_against_triton(prob, x_rebased, monkeypatch)
    check_l1(prob, h, h_sf, f"gluon l1 decode {wf} {block_m}",
             H_BYTES_MIN_FRACTION_FP8_MMA if wf == "fp8" else H_BYTES_MIN_FRACTION)


@pytest.mark.parametrize("block_m", [128, 16])
def test_gluon_l2_decode_ahead_matches_triton(block_m, monkeypatch):
    """`l2_gluon.DECODE_AHEAD` (4-bit words; 128 + 16 rows promoted every 128 K, 16 rows every 256 K
    with the pair's MMAs chained): the same sums, so `test_gluon_l2_matches_triton`'s gates hold (y
    equal to the Triton kernel's, the chain against the reference), with the ahead build launched."""
    from mega_moe_layer.kernels import l2_gluon
    monkeypatch.setattr(l2_gluon, "DECODE_AHEAD", True)
    built, launch = [], l2_gluon.l2_gluon_launch
    monkeypatch.setattr(l2_gluon, "l2_gluon_launch",
                        lambda *a, **k: (lambda r: built.append(r[3]["AHEAD"]) or r)(launch(*a, **k)))
    test_gluon_l2_matches_triton("mxfp4", block_m, monkeypatch)
    assert built and all(built), f"the decode-ahead build was not launched: {built}"


@pytest.mark.parametrize("wf, block_m", [("mxfp4", 128), ("mxfp4", 16), ("mxfp4", 32), ("fp8", 128)])
def test_gluon_l2_matches_triton(wf, block_m, monkeypatch, lane=False):
    """The warp-specialised Gluon L2 (`kernels.l2_gluon`) against the Triton kernel
    on the same rebased h (the Triton L1's) into destinations at scattered addresses, some pairs
    without one: the same sums (chained, or promoted as the Triton L2 is on 4-bit weights), so y must
    be the same values (bytes, or values for a zero sum's sign) and every other destination byte
    untouched in both. 128-row tiles with 16 rows past
    them (`test_gluon_l1_matches_triton`'s counts), then the whole chain with both Gluon kernels
    against the reference; 16- and 32-row tiles against the reference directly."""
    from mega_moe_layer.kernels import l1_gluon, l2_gluon
    counts = [138, 158, 300, 20, 128, 0] if block_m == 128 else [1, 9, 16, 17, 40, 0, 3]
    prob, x_rebased = _gluon_problem(counts, wf, block_m, 47, lane=lane)
    kw = {}
    if block_m == 128:
        prob, plan, kw = _prefill_main_map(prob, counts)
    h, h_sf = h_buffers(prob, DEV)
    h.view(torch.uint8).zero_()              # rows of the tail tiles (not run here): zeros, not poison
    h_sf.zero_()
    run_l1_into(prob, h, h_sf, x_rebased=x_rebased, **kw)
    n = prob.num_routed
    h8 = torch.empty(prob.num_pairs, 2048, dtype=torch.float8_e4m3fn, device=DEV)
    h_e = torch.empty(prob.num_pairs, dtype=torch.int32, device=DEV)
    rebase_act_rows(h, h_sf, h8, h_e, prob.expert_offsets[-1:], act_format="fp8", group=32, lane_k=prob.w2_op.lane)
    taken = _calls(monkeypatch, l2_gluon, "l2_gluon_launch")
    dests = []
    for enabled in (False, True):
        monkeypatch.setattr(l2_gluon, "ENABLED", enabled)
        dest = make_destinations(prob, "bf16", skip=(2, n - 1))
        run_l2(prob, h, h_sf, "bf16", dest, h_rebased=(h8, h_e), **kw)
        torch.cuda.synchronize()
        dests.append(dest)
    assert taken == [1], "the Gluon kernel was not taken"
    y_t, y_g = dests[0].out, dests[1].out
    same_bytes = bytes_of(y_g) == bytes_of(y_t)
    same = same_bytes.view(-1, 2).all(dim=1).view(y_g.shape) | (y_g.float() == y_t.float())
    assert bool(same.all()), f"y differs from the Triton kernel's: {_mismatch(y_g, y_t, same)}"
    _report(f"gluon l2 {wf} {block_m}", {"y_bytes_equal": float(same_bytes.float().mean())})
    if block_m != 128:
        check_l2(prob, dests[1], "bf16", reference_y(prob), f"gluon l2 {wf} {block_m}")
    else:
        monkeypatch.setattr(l1_gluon, "ENABLED", True)
        _, _, _, metrics = over_rows_chain(7168, 2048, counts, plan, wf, seed=53, device=DEV, num_sms=None,
                                           lane_k=lane)
        assert len(taken) == 3, "the Gluon L2 was not taken in the chain (main and tail launches)"
        _report(f"gluon l1 + l2 chain {wf}", metrics)
