"""The FP8 mainloop's operands (kernels/gemm_operands.py, the rebasing Triton helpers of l1_gemm.py).

* `reference.rebase_*`: the error of rebasing stays within its stated bound (2**-10 of the row's
  base scale per value) even for groups forced far below their row's largest scale, and is zero
  where the DESIGN says it is exact; the E2M1 -> E4M3 tables against exact arithmetic.
* `prepare_weight_operand`: kinds, the load-time report of changed values (0 for Gaussian MXFP4
  weights, > 0 and counted exactly when groups are forced far below their row's maximum).
* The Triton tile helpers (`_weight_tile_e4m3`, `_act_tile_e4m3`) bitwise against the reference's
  rebased bytes: in the interpreter here (integer path), and on a GPU with the PRMT decode
  (`-m gpu`: both E2M1 tables, "imad" without far groups and "f16" with them, at 128 and 256 K
  per step and 4 or 8 warps).
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from mega_moe_layer import formats
from mega_moe_layer.kernels import gemm_operands as go
from mega_moe_layer.kernels import reference as ref
from mega_moe_layer.kernels.l1_gemm import (_act_tile_e4m3, _frag_rows, _row_max_exponent, _weight_tile_e4m3, fp4_table,
                                            sf_words_p2)
from utils import TOLERANCES

INTERPRETED = not isinstance(_weight_tile_e4m3, triton.runtime.jit.JITFunction)


def _far_groups(x: torch.Tensor, group: int, shifts=(2.0 ** -13, 2.0 ** -20, 2.0 ** -40)) -> torch.Tensor:
    """x * 1000 with some groups scaled far below their row's largest (d = 13, 20, 40 binades).

    NOTE: the x1000 keeps the far groups above the UE8M0 rule's amax floor (1e-4), which would
    otherwise cap how far below its row a group's scale can be."""
    x = x * 1000.0
    for i, s in enumerate(shifts):
        x[:, (2 * i + 1) * group:(2 * i + 2) * group] *= s
    return x


# =================================================================================================
# Reference rebasing
# =================================================================================================
def test_e2m1_tables_exact():
    tab = ref.e2m1_to_e4m3_tables(6)
    for d in range(64):
        got = torch.tensor([(int(tab[d]) >> (8 * m)) & 0xFF for m in range(8)], dtype=torch.uint8)
        vals = got.view(torch.float8_e4m3fn).double()
        exact = ref._E2M1_VALUES.double() * 2.0 ** (6 - d)
        if d <= 14:
            assert torch.equal(vals, exact), d       # E2M1 * 2**(6-d) fits E4M3 exactly
        # Nearest E4M3 value: never farther than half its smallest subnormal step (2**-10).
        assert float((vals - exact).abs().max()) <= 2.0 ** -10, d


@pytest.mark.parametrize("fmt", ["fp8", "fp4"])
@pytest.mark.parametrize("group", [32, 128])
def test_rebase_act_error_bound(fmt, group):
    gen = torch.Generator().manual_seed(1)
    x = _far_groups(torch.randn(37, 1024, generator=gen), group).to(torch.bfloat16)
    q, sf = ref.quantize_act(x, fmt, group)
    r, row = ref.rebase_act(q, sf, fmt, group)
    exact = ref.dequantize_act(q, sf, fmt, group)
    got = ref.dequantize_rebased(r, row)
    # The stated bound: half E4M3's smallest subnormal step at the row's base scale.
    bound = 2.0 ** -10 * row
    err = (got - exact).abs().amax(dim=1)
    assert bool((err <= bound).all()), float((err / bound).max())
    assert bool((got != exact).any()), "far groups must round (else the test is empty)"
    # The relative size of the error against the row: tiny, the tolerance table's entry.
    rel = float(((got - exact).norm(dim=1) / exact.norm(dim=1)).max())
    assert rel <= TOLERANCES["rebase_rel"], rel
    # Without far groups, FP4 rebasing is exact (E2M1 * 2**(6-d) fits E4M3 for d <= 14).
    if fmt == "fp4":
        x2 = torch.randn(16, 1024, generator=gen).to(torch.bfloat16)
        q2, sf2 = ref.quantize_act(x2, fmt, group)
        assert torch.equal(ref.dequantize_rebased(*ref.rebase_act(q2, sf2, fmt, group)),
                           ref.dequantize_act(q2, sf2, fmt, group))


@pytest.mark.parametrize("fmt", ["mxfp4", "fp8"])
def test_prepare_weight_operand_report(fmt):
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(3, 256, 512, generator=gen) * 0.05).to(torch.bfloat16)
    qw = formats.quantize_weight(w, fmt)
    op = go.prepare_weight_operand(fmt, qw.data, qw.scale, arch=90, act_format="fp8")
    assert op.kind == ("mxfp4" if fmt == "mxfp4" else "fp8_rebased")
    r, row = ref.rebase_weight(fmt, qw.data, qw.scale)
    changed = int((ref.dequantize_rebased(r, row) != qw.dequantize()).sum())
    assert op.num_changed == changed
    if fmt == "mxfp4":
        assert op.num_changed == 0                   # Gaussian rows: every value exact
        # 4 bits per weight, re-laid: the same codes in fragment-word order
        assert op.data.shape == qw.data.shape and op.data.dtype == torch.int8
        assert torch.equal(go.fragment_codes(op.data), ref.unpack_fp4(qw.data.view(torch.uint8)))
    else:
        assert torch.equal(op.data.view(torch.uint8), r.view(torch.uint8))
    assert torch.equal(op.row_factor, row)
    # Far groups: values change, are counted, and stay within the bound.
    wf = _far_groups(w.reshape(-1, 512).float(), 128, (2.0 ** -12, 2.0 ** -17)).reshape(3, 256, 512)
    qf = formats.quantize_weight(wf.to(torch.bfloat16), fmt)
    opf = go.prepare_weight_operand(fmt, qf.data, qf.scale, arch=90, act_format="fp8")
    rf, rowf = ref.rebase_weight(fmt, qf.data, qf.scale)
    diff = ref.dequantize_rebased(rf, rowf) - qf.dequantize()
    assert opf.num_changed == int((diff != 0).sum()) > 0
    assert bool((diff.abs() <= 2.0 ** -10 * rowf.unsqueeze(-1)).all())
    if fmt == "mxfp4":
        # Expanded to E4M3 at load (`fp4_as_fp8`): the reference's rebased bytes, the same count.
        ope = go.prepare_weight_operand(fmt, qf.data, qf.scale, arch=90, act_format="fp8", fp4_as_fp8=True)
        assert ope.kind == "fp8_rebased" and ope.data.dtype == torch.float8_e4m3fn
        assert torch.equal(ope.data.view(torch.uint8), rf.view(torch.uint8))
        assert torch.equal(ope.row_factor, rowf) and ope.num_changed == opf.num_changed


def test_fragment_words_layout():
    """Word 16 j + 4 c + g of a row (128-K chunk j, group g of it): nibble p's magnitude is that of
    k = 128 j + 32 g + 4 c + (0,1,2,3,16,17,18,19)[p], its sign bit that of
    k = 128 j + 32 g + 4 c + (16,0,17,1,18,2,19,3)[p]: what `_fp4_word_asm` decodes, a thread's
    4 groups of a chunk in one 16-byte vector."""
    gen = torch.Generator().manual_seed(7)
    codes = torch.randint(0, 16, (3, 256), generator=gen, dtype=torch.uint8)
    words = go.fragment_words(ref.pack_fp4(codes)).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    assert words.shape == (3, 32)
    for r in range(3):
        for q in range(32):
            j, c, g = q // 16, (q // 4) % 4, q % 4
            for p in range(8):
                nib = (int(words[r, q]) >> (4 * p)) & 15
                mk = 128 * j + 32 * g + 4 * c + (0, 1, 2, 3, 16, 17, 18, 19)[p]
                sk = 128 * j + 32 * g + 4 * c + (16, 0, 17, 1, 18, 2, 19, 3)[p]
                assert nib & 7 == int(codes[r, mk]) & 7
                assert nib >> 3 == int(codes[r, sk]) >> 3
    assert torch.equal(go.fragment_codes(go.fragment_words(ref.pack_fp4(codes))), codes)
    with pytest.raises(ValueError, match="multiple of 128"):
        go.fragment_words(torch.zeros(2, 32, dtype=torch.int8))


def test_lane_k_order():
    """`reference.lane_k_order`: a permutation of each 128-K chunk moving runs of 4 columns; the 8
    positions a thread of a quad (c) holds in the MMA of step g (32 g + 16 h + 4 c + b) are
    columns 32 c + 8 g .. + 7: one 32-group per thread across the step's 4 MMAs."""
    perm = ref.lane_k_order(384)
    assert torch.equal(torch.sort(perm).values, torch.arange(384))
    assert bool(((perm // 128) == (torch.arange(384) // 128)).all())           # within each chunk
    assert bool((perm % 4 == torch.arange(384) % 4).all())                     # runs of 4 together
    for g in range(4):
        for c in range(4):
            pos = [128 + 32 * g + 16 * h + 4 * c + b for h in range(2) for b in range(4)]
            assert perm[pos].tolist() == [128 + 32 * c + 8 * g + i for i in range(8)]
    x = torch.arange(2 * 256).reshape(2, 256)
    assert torch.equal(ref.to_lane_order(x), x[:, ref.lane_k_order(256)])
    assert not torch.equal(ref.to_lane_order(x), x)
    with pytest.raises(ValueError, match="multiple of 128"):
        ref.lane_k_order(96)


def test_fragment_words_lane_order():
    """`fragment_words(lane=True)`: the words of the K-permuted codes, so word 4 c + g of a chunk
    holds the 8 codes of columns 32 c + 8 g .. + 7 (all of group c; lo = the first 4); round trip
    through `fragment_codes(lane=True)`; `prepare_weight_operand(lane_k=True)` marks the operand
    (`WeightOperand.lane`) and leaves FP8 weights alone."""
    gen = torch.Generator().manual_seed(9)
    codes = torch.randint(0, 16, (3, 256), generator=gen, dtype=torch.uint8)
    packed = ref.pack_fp4(codes)
    lane = go.fragment_words(packed, lane=True)
    assert torch.equal(lane, go.fragment_words(ref.pack_fp4(ref.to_lane_order(codes))))
    assert not torch.equal(lane, go.fragment_words(packed))
    assert torch.equal(go.fragment_codes(lane, lane=True), codes)
    words = lane.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    for r in range(3):
        for q in range(32):
            j, c, g = q // 16, (q // 4) % 4, q % 4
            for p in range(8):
                nib = (int(words[r, q]) >> (4 * p)) & 15
                col = 128 * j + 32 * c + 8 * g + (0, 1, 2, 3, 4, 5, 6, 7)[p]      # magnitude's column
                scol = 128 * j + 32 * c + 8 * g + (4, 0, 5, 1, 6, 2, 7, 3)[p]      # sign bit's column
                assert nib & 7 == int(codes[r, col]) & 7 and nib >> 3 == int(codes[r, scol]) >> 3
    w = (torch.randn(2, 128, 256, generator=gen) * 0.05).to(torch.bfloat16)
    qw = formats.quantize_weight(w, "mxfp4")
    op = go.prepare_weight_operand("mxfp4", qw.data, qw.scale, arch=90, act_format="fp8", lane_k=True)
    assert op.kind == "mxfp4" and op.lane
    assert torch.equal(go.fragment_codes(op.data, lane=True), ref.unpack_fp4(qw.data.view(torch.uint8)))
    assert not go.prepare_weight_operand("mxfp4", qw.data, qw.scale, arch=90, act_format="fp8").lane
    q8 = formats.quantize_weight(w, "fp8")
    op8 = go.prepare_weight_operand("fp8", q8.data, q8.scale, arch=90, act_format="fp8", lane_k=True)
    assert op8.kind == "fp8_rebased" and not op8.lane
    with pytest.raises(TypeError, match="lane_k"):
        go.prepare_weight_operand("mxfp4", qw.data, qw.scale, arch=90, act_format="fp8", lane_k=1)


def test_far_groups_count():
    """`WeightOperand.far_groups`: nonzero groups more than 11 binades below their row's largest
    (their tables have subnormal entries: the kernels switch to the exact f16x2 tables); an
    all-zero group does not count however far below it is; the table choice follows."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(1, 4, 256, generator=gen) * 1000
    q = formats.quantize_weight(w.to(torch.bfloat16), "mxfp4")
    op = go.prepare_weight_operand("mxfp4", q.data, q.scale, arch=90, act_format="fp8")
    assert op.far_groups == 0 and fp4_table(op, interpreted=False) == "imad"
    assert fp4_table(op, interpreted=True) == "int"
    w[0, 1, 32:64] *= 2.0 ** -12          # d = 12: one far group
    w[0, 2, 64:96] *= 2.0 ** -11          # d = 11: still normal tables
    w[0, 3, 96:128] = 0.0                 # an all-zero group: d = 63, no value to decode
    q = formats.quantize_weight(w.to(torch.bfloat16), "mxfp4")
    op = go.prepare_weight_operand("mxfp4", q.data, q.scale, arch=90, act_format="fp8")
    d = op.aux[0].to(torch.int64)
    assert int(d[1, 1]) == 12 and int(d[2, 2]) in (10, 11, 12) and int(d[3, 3]) > go.FP4_IMAD_MAX_D
    want = int(((d > go.FP4_IMAD_MAX_D) & (ref.unpack_fp4(q.data[0]).view(4, 8, 32) & 7).ne(0).any(-1)).sum())
    assert op.far_groups == want and want >= 1
    assert fp4_table(op, interpreted=False) == "f16"


def test_prepare_weight_operand_kinds():
    w = torch.randn(2, 128, 256).to(torch.bfloat16)
    q = formats.quantize_weight(w, "fp8")
    odd = formats.QuantizedWeight("fp8", q.data, q.scale * 1.3, q.shape)     # a checkpoint's scales
    assert go.prepare_weight_operand("fp8", odd.data, odd.scale, arch=90, act_format="fp8").kind == "fp8_block"
    assert go.prepare_weight_operand("fp8", q.data, q.scale, arch=90, act_format="bf16").kind == "raw"
    m = formats.quantize_weight(w, "mxfp4")
    assert go.prepare_weight_operand("mxfp4", m.data, m.scale, arch=100, act_format="fp8").kind == "raw"
    assert go.prepare_weight_operand("mxfp4", m.data, m.scale, arch=90, act_format="fp4").kind == "mxfp4"


# =================================================================================================
# The Triton tile helpers, bitwise against the reference's rebased bytes
# =================================================================================================
@triton.jit
def _weight_tiles_kernel(w_ptr, aux_ptr, tab_ptr, out_ptr, K: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_K: tl.constexpr, WARPS: tl.constexpr, TABLE: tl.constexpr):
    rows = tl.arange(0, ROWS).to(tl.int64)
    vrows, vq = _frag_rows(0, ROWS, BLOCK_K, WARPS, ROWS, 0)
    for kt in range(0, K // BLOCK_K):
        tile = _weight_tile_e4m3(w_ptr, aux_ptr, tab_ptr, 0, 0, rows, vrows, vq, kt, K, ROWS, BLOCK_K, "mxfp4",
                                 WARPS, TABLE)
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], tile.to(tl.int8, bitcast=True))


@triton.jit
def _act_tiles_kernel(x_ptr, sf_ptr, tab_ptr, out_ptr, K: tl.constexpr, GROUP: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_K: tl.constexpr, ACT_FORMAT: tl.constexpr, SF_WORDS_P2: tl.constexpr,
                      FAST: tl.constexpr):
    rows = tl.arange(0, ROWS).to(tl.int64)
    ok = rows >= 0
    e_row = _row_max_exponent(sf_ptr, rows, ok, K // GROUP // 4, SF_WORDS_P2)
    for kt in range(0, K // BLOCK_K):
        tile = _act_tile_e4m3(x_ptr, sf_ptr, tab_ptr, rows, ok, kt, e_row, K, GROUP, ROWS, BLOCK_K, ACT_FORMAT, FAST)
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows[:, None] * K + cols[None, :], tile.to(tl.int8, bitcast=True))


def _device_and_fast():
    if INTERPRETED:
        return "cpu", False
    if not torch.cuda.is_available():
        pytest.skip("Triton kernels need the interpreter (CPU) or a CUDA GPU")
    return "cuda", True


def _check_weight_tiles(device, table, block_k=128, warps=4, far=True):
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 512, generator=gen)
    if far:
        w = _far_groups(w, 32, (2.0 ** -5, 2.0 ** -13, 2.0 ** -16))
    q = formats.quantize_weight(w.unsqueeze(0).to(torch.bfloat16), "mxfp4").to(device)
    op = go.prepare_weight_operand("mxfp4", q.data, q.scale, arch=90, act_format="fp8")
    assert (op.far_groups > 0) == far
    out = torch.full((64, 512), 0x55, dtype=torch.int8, device=device)
    _weight_tiles_kernel[(1,)](op.data, op.aux, op.table, out, K=512, ROWS=64, BLOCK_K=block_k, WARPS=warps,
                               TABLE=table, num_warps=warps)
    want, _ = ref.rebase_weight("mxfp4", q.data.cpu(), q.scale.cpu())
    got = out.cpu().view(torch.uint8)
    want = want[0].view(torch.uint8)
    # -0 (code 8) and +0 are the same value; compare values where both are zero.
    same = (got == want) | ((got & 0x7F) == 0) & ((want & 0x7F) == 0)
    assert bool(same.all()), f"{int((~same).sum())} bytes differ, first at {(~same).nonzero()[0].tolist()}"


def _check_act_tiles(device, fast, fmt, group):
    gen = torch.Generator().manual_seed(4)
    x = _far_groups(torch.randn(32, 512, generator=gen), group, (2.0 ** -3, 2.0 ** -9, 2.0 ** -20)).to(torch.bfloat16)
    q, sf = ref.quantize_act(x, fmt, group)
    out = torch.full((32, 512), 0x55, dtype=torch.int8, device=device)
    _act_tiles_kernel[(1,)](q.to(device), sf.to(device), go.e2m1_table(device), out, K=512, GROUP=group, ROWS=32,
                            BLOCK_K=128, ACT_FORMAT=fmt, SF_WORDS_P2=sf_words_p2(512, group), FAST=fast)
    want, _ = ref.rebase_act(q, sf, fmt, group)
    got, want = out.cpu().view(torch.uint8), want.view(torch.uint8)
    same = (got == want) | ((got & 0x7F) == 0) & ((want & 0x7F) == 0)
    assert bool(same.all()), f"{int((~same).sum())} bytes differ, first at {(~same).nonzero()[0].tolist()}"


@pytest.mark.parametrize("block_k,warps", [(128, 4), (256, 4), (256, 2), (512, 4)])
def test_weight_tile_bitwise(block_k, warps):
    device, fast = _device_and_fast()
    _check_weight_tiles(device, "f16" if fast else "int", block_k, warps)


@pytest.mark.parametrize("fmt,group", [("fp8", 32), ("fp8", 128), ("fp4", 32), ("fp4", 128)])
def test_act_tile_bitwise(fmt, group):
    _check_act_tiles(*_device_and_fast(), fmt, group)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("table,far", [("f16", True), ("imad", False), ("f16", False)])
@pytest.mark.parametrize("block_k,warps", [(128, 4), (256, 4), (256, 2), (512, 4)])
def test_weight_tile_bitwise_gpu(table, far, block_k, warps):
    _check_weight_tiles("cuda", table, block_k, warps, far)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,group", [("fp8", 32), ("fp8", 128), ("fp4", 32), ("fp4", 128)])
def test_act_tile_bitwise_gpu(fmt, group):
    _check_act_tiles("cuda", True, fmt, group)


# =================================================================================================
# rebase_act_rows: the pass that rebases activations where they land (x after the dispatch, h after L1)
# =================================================================================================
def _check_rebase_rows(device, fmt, group, indirect, lane_k=False):
    from mega_moe_layer.kernels.rebase import rebase_act_rows
    gen = torch.Generator().manual_seed(5)
    n, k = 23, 1024
    x = _far_groups(torch.randn(n, k, generator=gen), group, (2.0 ** -3, 2.0 ** -9, 2.0 ** -20)).to(torch.bfloat16)
    q, sf = ref.quantize_act(x, fmt, group)
    want, _ = ref.rebase_act(q, sf, fmt, group)
    want_e = ref.unpack_ue8m0(sf).amax(dim=1).to(torch.int32)
    dst = torch.full((n, k), 0x55, dtype=torch.uint8, device=device).view(torch.float8_e4m3fn)
    dst_e = torch.full((n,), -7, dtype=torch.int32, device=device)
    if indirect:
        rows = torch.tensor([4, 9, 4, 0, 17, 22, 9, 3], dtype=torch.int32)      # repeats allowed
        count = torch.tensor([6], dtype=torch.int32)                          # rows[6:] not rebased
        done = torch.zeros(n, dtype=torch.bool)
        done[rows[:6].long()] = True
        rows = rows.to(device)
    else:
        rows, count = None, torch.tensor([15], dtype=torch.int32)
        done = torch.arange(n) < 15
    rebase_act_rows(q.to(device), sf.to(device), dst, dst_e, count.to(device), act_format=fmt, group=group, rows=rows,
                    lane_k=lane_k)
    if lane_k:
        want = ref.to_lane_order(want.view(torch.uint8)).contiguous().view(torch.float8_e4m3fn)
    got, want = dst.cpu().view(torch.uint8), want.view(torch.uint8)
    same = (got == want) | ((got & 0x7F) == 0) & ((want & 0x7F) == 0)
    assert bool(same[done].all()), f"{int((~same[done]).sum())} rebased bytes differ"
    assert torch.equal(dst_e.cpu()[done], want_e[done])
    assert bool((got[~done] == 0x55).all()) and bool((dst_e.cpu()[~done] == -7).all()), "rows beyond the count written"


@pytest.mark.parametrize("fmt,group,indirect", [("fp8", 32, False), ("fp8", 128, True), ("fp4", 32, True),
                                                ("fp4", 128, False)])
def test_rebase_act_rows_bitwise(fmt, group, indirect):
    _check_rebase_rows(*_device_and_fast()[:1], fmt, group, indirect)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,group,indirect", [("fp8", 32, True), ("fp8", 128, False), ("fp4", 32, False),
                                                ("fp4", 128, True)])
def test_rebase_act_rows_bitwise_gpu(fmt, group, indirect):
    _check_rebase_rows("cuda", fmt, group, indirect)


@pytest.mark.parametrize("fmt,group,indirect", [("fp8", 32, True), ("fp4", 128, False)])
def test_rebase_act_rows_lane_order(fmt, group, indirect):
    """lane_k=True: the reference's rebased rows in the "lane" K order (`reference.to_lane_order`),
    bit for bit, as the GEMMs of a lane-ordered 4-bit operand read them."""
    _check_rebase_rows(*_device_and_fast()[:1], fmt, group, indirect, lane_k=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fmt,group,indirect", [("fp8", 32, False), ("fp4", 32, True)])
def test_rebase_act_rows_lane_order_gpu(fmt, group, indirect):
    _check_rebase_rows("cuda", fmt, group, indirect, lane_k=True)


def test_rebase_act_rows_rejects_bad_arguments():
    from mega_moe_layer.kernels.rebase import rebase_act_rows
    q, sf = ref.quantize_act(torch.randn(4, 512).to(torch.bfloat16), "fp8", 32)
    dst, e = torch.empty(4, 512, dtype=torch.float8_e4m3fn), torch.empty(4, dtype=torch.int32)
    count = torch.tensor([4], dtype=torch.int32)
    with pytest.raises(ValueError, match="act_format"):
        rebase_act_rows(q, sf, dst, e, count, act_format="bf16", group=32)
    with pytest.raises(ValueError, match=r"src_sf: expected shape \[4, 1\]"):
        rebase_act_rows(q, sf, dst, e, count, act_format="fp8", group=128)
    with pytest.raises(ValueError, match=r"dst_e: expected shape"):
        rebase_act_rows(q, sf, dst, e[:3], count, act_format="fp8", group=32)
    with pytest.raises(ValueError, match="count: expected an int32 tensor"):
        rebase_act_rows(q, sf, dst, e, count.long(), act_format="fp8", group=32)
    with pytest.raises(TypeError, match="lane_k"):
        rebase_act_rows(q, sf, dst, e, count, act_format="fp8", group=32, lane_k="yes")


# =================================================================================================
# order_pair_rows: the rebased x copied into pair order (one TMA box per L1 prefill tile)
# =================================================================================================
def _check_order_pair_rows(device):
    from mega_moe_layer.kernels.rebase import order_pair_rows
    gen = torch.Generator().manual_seed(8)
    n, k = 19, 1040                       # K not a multiple of the widest word block: a narrower one
    src = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.int32).to(torch.uint8)
    rows = torch.tensor([3, 3, 18, 0, 7, 11, 3, 5, 2, 9, 1], dtype=torch.int32)      # a token in several pairs
    count = torch.tensor([9], dtype=torch.int32)                                     # pairs 9, 10 not copied
    dst = torch.full((rows.numel(), k), 0xA5, dtype=torch.uint8)
    d = dst.to(device)
    order_pair_rows(src.to(device).view(torch.float8_e4m3fn), rows.to(device), count.to(device),
                    d.view(torch.float8_e4m3fn))
    got = d.cpu()
    assert torch.equal(got[:9], src[rows[:9].long()]), "pair rows differ from their pool rows"
    assert bool((got[9:] == 0xA5).all()), "rows beyond the count written"


def test_order_pair_rows_bitwise():
    """dst[i] = src[rows[i]] byte for byte for i below the device count; nothing past it (the
    interpreter copies integers faithfully)."""
    _check_order_pair_rows(_device_and_fast()[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_order_pair_rows_bitwise_gpu():
    _check_order_pair_rows("cuda")


def test_order_pair_rows_rejects_bad_arguments():
    from mega_moe_layer.kernels.rebase import order_pair_rows
    src = torch.zeros(4, 512, dtype=torch.float8_e4m3fn)
    rows = torch.zeros(6, dtype=torch.int32)
    dst = torch.zeros(6, 512, dtype=torch.float8_e4m3fn)
    count = torch.tensor([6], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"dst: expected shape \[6, 512\]"):
        order_pair_rows(src, rows, count, dst[:5])
    with pytest.raises(TypeError, match="src: expected dtype torch.float8_e4m3fn"):
        order_pair_rows(src.view(torch.uint8), rows, count, dst)
    with pytest.raises(TypeError, match="rows: expected dtype torch.int32"):
        order_pair_rows(src, rows.long(), count, dst)
    with pytest.raises(ValueError, match="count: expected an int32 tensor"):
        order_pair_rows(src, rows, count.long(), dst)
    with pytest.raises(ValueError, match="multiple of 16"):
        order_pair_rows(src[:, :40], rows, count, dst[:, :40])
