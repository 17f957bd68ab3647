"""L1 grouped expert GEMM: gate/up = x . w13[e]^T, SwiGLU, top-k weight, requantised h (DESIGN 1-5).

Public entry points:
  * `l1_grouped_gemm` — the kernel's wrapper (destination passing, no allocation, no host sync,
    CUDA-graph safe: a static grid of a few persistent CTAs per SM, never more than the upper
    bound of work items, whose programs loop over the items below the device tile count).
  * `build_tile_map` — the device tile map both grouped GEMMs read (pure torch, no host sync).
  * `max_tiles` — the static bound on the number of tiles (re-exported from `gemm_heuristics`).

Also the Triton helpers both grouped GEMMs share (`l2_gemm.py` imports them): exact dequantisation
of every operand format to bf16 and the DESIGN's bitwise UE8M0 / E4M3 / E2M1 / bf16 rounding done
with integer operations on float bit patterns (identical on the GPU and in Triton's interpreter).

Common input (both GEMMs): the routed (token, slot) pairs of this rank sorted by local expert.
Pairs of local expert e are the positions [expert_offsets[e], expert_offsets[e + 1]). The tile
map cuts every expert's segment into tiles of BLOCK_M positions:

    expert_offsets = [0, 3, 3, 40]     (E_local = 3; expert 1 has no pairs)   BLOCK_M = 16
    tile_expert    = [0, 2, 2, 2, -1, ...]     tile_row_start = [0, 3, 19, 35, 0, ...]
    num_tiles      = [4]

Orientation: a work item computes ``acc[R, BLOCK_M] = W[R, K] . X[BLOCK_M, K]^T`` (weight rows on
the MMA M side, pairs on its N side; see `gemm_heuristics`; R = 2 * BLOCK_N stacked gate + up rows
in L1, BLOCK_N in L2), then transposes in the epilogue. The weight is the left operand, as
KERNEL_NOTES recommends for an upcast operand (Hopper's wgmma takes it from registers), and a
decode-sized handful of pairs is the MMA's N (16), not a padded M of 64.

Hopper (sm_90): both operands are dequantised exactly to bf16 in registers and a bf16 `tl.dot`
accumulates in float32; FP8 weights multiply each per-128-K partial product by their float32
block scale (any positive value). Blackwell (sm_100 / 103 / 110): MXFP4 weights with FP8/FP4
activations go through `tl.dot_scaled` (native block-scaled tcgen05 MMA, uint8 UE8M0 scales per
32); the other combinations take the dequantising path. The path is a constexpr chosen from the
target arch (`gemm_heuristics.uses_dot_scaled`).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .gemm_heuristics import (GEMM_BLOCK_MS, GroupedGemmConfig, l1_gemm_config, max_tiles, resident_ctas,
                              uses_dot_scaled)
from ._launch import Launcher
from .gemm_operands import WeightOperand, e2m1_table, uses_fp8_mma
from .sync import pdl_enter

__all__ = ["l1_grouped_gemm", "build_tile_map", "max_tiles"]

# float32 bit patterns of the DESIGN constants (the UE8M0 rule, reference.py).
#: float32(1e-4): the amax floor.
_AMAX_FLOOR_BITS = tl.constexpr(0x38D1B717)


# =================================================================================================
# Shared Triton helpers (also used by l2_gemm.py)
# =================================================================================================
@triton.jit
def _or_combine(a, b):
    return a | b


@triton.jit
def _exp2_ue8m0(e):
    """int32 UE8M0 byte e (0..255) -> float32 2**(e - 127), exact (e = 0: the subnormal 2**-127)."""
    return tl.where(e > 0, e << 23, 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def _exp2_neg_ue8m0(e):
    """int32 e in [1, 254] -> float32 2**(127 - e), exact (e = 254: the subnormal 2**-127)."""
    return tl.where(e < 254, (254 - e) << 23, 0x400000).to(tl.float32, bitcast=True)


@triton.jit
def _ue8m0_exponent(amax, IS_FP4: tl.constexpr):
    """DESIGN scale rule: float32 group maxima (>= 0, finite) -> int32 e in [1, 254].

    NOTE: e = exponent(fl(amax / Q)) + (mantissa != 0) equals the smallest n with
    amax <= Q * 2**(n-127), because for Q = 448 = 1.75 * 2**8 and Q = 6 = 1.5 * 2**2 the rounded
    float32 quotient is a power of two exactly when amax's mantissa equals Q's and otherwise has a
    non-zero mantissa (the nearest float32 quotient never rounds onto a power of two: the first
    float above/below 1.75 or 1.5 divides to 1 +- ~0.6 ulp). With amax = M * 2**a that is
    n = a + 127 - Q_EXP + (M > Q's mantissa): integer arithmetic only (no float division, whose
    GPU lowering is not correctly rounded by default). Same rule as pre_dispatch.py.
    """
    b = tl.maximum(amax.to(tl.int32, bitcast=True), _AMAX_FLOOR_BITS)
    if IS_FP4:
        e = (b >> 23) - 2 + ((b & 0x7FFFFF) > 0x400000).to(tl.int32)   # Q = 6 = 1.5 * 2**2
    else:
        e = (b >> 23) - 8 + ((b & 0x7FFFFF) > 0x600000).to(tl.int32)   # Q = 448 = 1.75 * 2**8
    return tl.minimum(tl.maximum(e, 1), 254)


@triton.jit
def _e4m3_code(q):
    """float32 |q| <= 448 -> int32 E4M3 byte (0..255), round-to-nearest-even; -0 keeps its sign
    (as torch's cast). Integer-only, so the interpreter rounds exactly like the GPU."""
    qv = q.to(tl.int32, bitcast=True)
    absb = qv & 0x7FFFFFFF
    expf = absb >> 23
    mant24 = (absb & 0x7FFFFF) | 0x800000
    # Normals (|q| >= 2**-6): keep 3 mantissa bits with RNE; a carry bumps the exponent.
    norm = ((absb + 0x7FFFF + ((absb >> 20) & 1)) >> 20) - (120 << 3)
    # |q| < 2**-6: code = RNE(|q| * 2**9) in 0..8 (8 = 2**-6, the smallest normal).
    shift = tl.maximum(tl.minimum(141 - expf, 25), 1)
    sub = (mant24 + ((1 << (shift - 1)) - 1) + ((mant24 >> shift) & 1)) >> shift
    code = tl.where(expf >= 121, norm, sub)
    return code | ((qv >> 24) & 0x80)


@triton.jit
def _e2m1_code(q):
    """float32 |q| <= 6 -> int32 E2M1 code (0..15), round-to-nearest-even; the sign (bit 3) only
    for a non-zero magnitude (DESIGN)."""
    qv = q.to(tl.int32, bitcast=True)
    absb = qv & 0x7FFFFFFF
    expf = absb >> 23
    mant24 = (absb & 0x7FFFFF) | 0x800000
    # |q| >= 1: keep 1 mantissa bit (code = biased exp << 1 | m, bias 1).
    norm = ((absb + 0x1FFFFF + ((absb >> 22) & 1)) >> 22) - (126 << 1)
    # |q| < 1: code = RNE(|q| * 2) in {0, 1, 2}.
    shift = tl.maximum(tl.minimum(149 - expf, 25), 1)
    sub = (mant24 + ((1 << (shift - 1)) - 1) + ((mant24 >> shift) & 1)) >> shift
    code = tl.where(expf >= 127, norm, sub)
    return code | tl.where(code != 0, (qv >> 28) & 8, 0)


@triton.jit
def _e2m1_decode(codes):
    """int32 E2M1 codes (0..15) -> exact float32 values, built from bits (no lookup table):
    magnitude m >= 2 is (1 + (m & 1) / 2) * 2**((m >> 1) - 1), i.e. bits (m + 252) << 22."""
    mag = codes & 7
    bits = tl.where(mag >= 2, (mag + 252) << 22, tl.where(mag == 1, 0x3F000000, 0))
    return (bits | ((codes & 8) << 28)).to(tl.float32, bitcast=True)


@triton.jit
def _bf16_rne_bits(x):
    """float32 -> int32 bit pattern of bf16(x) widened to float32 (low 16 bits zero), RNE.
    Integer-only (the interpreter mis-rounds float -> bf16 casts). Finite inputs."""
    b = x.to(tl.int32, bitcast=True)
    return (b + 0x7FFF + ((b >> 16) & 1)) & -65536


@triton.jit
def _round_bf16(x):
    """float32 -> float32 value of bf16(x), round-to-nearest-even."""
    return _bf16_rne_bits(x).to(tl.float32, bitcast=True)



@triton.jit
def _unpack_e2m1(packed):
    """int8 [R, C/2] packed E2M1 (even column in the low nibble) -> int32 codes [R, C]."""
    b = packed.to(tl.int32) & 0xFF
    return tl.interleave(b & 0xF, b >> 4)


@triton.jit
def _fp4_pairs_bf16_asm(packed, sf):
    """GPU: int8 packed E2M1 bytes and uint8 UE8M0 scale bytes (same shape) -> exact bf16 values of
    (low nibble, high nibble) of each byte times 2**(scale - 127): two tensors of that shape.

    Four bytes per call (pack=4). Per pair of bytes: one PRMT puts them in the two 16-bit halves;
    a nibble's magnitude bits land on bf16 bits 6..8 and its sign on bit 15 (two shifts, two
    LOP3), i.e. the bf16 pattern of E2M1 * 2**-126 (code 1 = the subnormal 2**-127, exact); one
    bf16x2 FMA by 2**126 and one by the scale 2**(s - 127) (exponent field = s) give the value:
    ~4 instructions per weight instead of ~12 for the generic decode (_e2m1_decode).
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 x0, x1, t, u, c, s0, s1, z;
        mov.b32 c, 0x7E807E80;
        mov.b32 z, 0x80008000;
        prmt.b32 x0, $4, 0, 0x4140;
        prmt.b32 x1, $4, 0, 0x4342;
        prmt.b32 s0, $5, 0, 0x4140;
        prmt.b32 s1, $5, 0, 0x4342;
        shl.b32 s0, s0, 7;
        shl.b32 s1, s1, 7;
        shl.b32 t, x0, 6;
        shl.b32 u, x0, 12;
        and.b32 t, t, 0x01C001C0;
        and.b32 u, u, 0x80008000;
        or.b32 t, t, u;
        fma.rn.bf16x2 t, t, c, z;
        fma.rn.bf16x2 $0, t, s0, z;
        shl.b32 t, x0, 2;
        shl.b32 u, x0, 8;
        and.b32 t, t, 0x01C001C0;
        and.b32 u, u, 0x80008000;
        or.b32 t, t, u;
        fma.rn.bf16x2 t, t, c, z;
        fma.rn.bf16x2 $2, t, s0, z;
        shl.b32 t, x1, 6;
        shl.b32 u, x1, 12;
        and.b32 t, t, 0x01C001C0;
        and.b32 u, u, 0x80008000;
        or.b32 t, t, u;
        fma.rn.bf16x2 t, t, c, z;
        fma.rn.bf16x2 $1, t, s1, z;
        shl.b32 t, x1, 2;
        shl.b32 u, x1, 8;
        and.b32 t, t, 0x01C001C0;
        and.b32 u, u, 0x80008000;
        or.b32 t, t, u;
        fma.rn.bf16x2 t, t, c, z;
        fma.rn.bf16x2 $3, t, s1, z;
        }""",
        constraints="=r,=r,=r,=r,r,r", args=[packed, sf], dtype=(tl.bfloat16, tl.bfloat16),
        is_pure=True, pack=4)


#: PTX of `_fp4_pairs_bf16_lut_asm` (a module constant so that a CPU test can run it through a
#: small PTX emulator: `tests/test_gemm.py::test_fp4_bf16_decode_ptx_emulated`).
FP4_BF16_LUT_PTX = tl.constexpr("""{
        .reg .b32 m, m16, w4, lo0, lo1, hi0, hi1, pla, pha, plb, phb, sa, sb, s0, s1, ta, tb, tc, td, z;
        mov.b32 lo0, 0xC0800000;
        mov.b32 lo1, 0xC0804000;
        mov.b32 hi0, 0x3F3F3F00;
        mov.b32 hi1, 0x40404040;
        mov.b32 z, 0x80008000;
        and.b32 m, $4, 0x77777777;
        shr.u32 m16, m, 16;
        shl.b32 w4, $4, 4;
        prmt.b32 pla, lo0, lo1, m;
        prmt.b32 pha, hi0, hi1, m;
        prmt.b32 plb, lo0, lo1, m16;
        prmt.b32 phb, hi0, hi1, m16;
        prmt.b32 sa, w4, $4, 0xD9C8;
        prmt.b32 sb, w4, $4, 0xFBEA;
        lop3.b32 pha, pha, sa, 0x80808080, 0xF8;
        lop3.b32 phb, phb, sb, 0x80808080, 0xF8;
        prmt.b32 s0, $5, 0, 0x4140;
        prmt.b32 s1, $5, 0, 0x4342;
        shl.b32 s0, s0, 7;
        shl.b32 s1, s1, 7;
        prmt.b32 ta, pla, pha, 0x6240;
        prmt.b32 tb, pla, pha, 0x7351;
        prmt.b32 tc, plb, phb, 0x6240;
        prmt.b32 td, plb, phb, 0x7351;
        fma.rn.bf16x2 $0, ta, s0, z;
        fma.rn.bf16x2 $2, tb, s0, z;
        fma.rn.bf16x2 $1, tc, s1, z;
        fma.rn.bf16x2 $3, td, s1, z;
        }""")


@triton.jit
def _fp4_pairs_bf16_lut_asm(packed, sf):
    """`_fp4_pairs_bf16_asm`'s results (bitwise) with fewer instructions: ~2.6 per weight.

    Per 4 bytes (8 weights): one LOP3 clears the sign bits, leaving the 8 nibble magnitudes as PRMT
    selectors; four PRMT look up the low and the high byte of bf16(E2M1 magnitude) in two constant
    8-byte tables (0, 0.5, 1, 1.5, 2, 3, 4, 6 -> 0x0000, 0x3F00, 0x3F80, 0x3FC0, 0x4000, 0x4040,
    0x4080, 0x40C0); two PRMT in sign-replicate mode turn the nibbles' sign bits into byte masks
    that two LOP3 merge into the high bytes; four PRMT pair each value's two bytes into the four
    bf16x2 words; one bf16x2 FMA per word multiplies by the scale 2**(s - 127) (its exponent
    field = s; adding -0 keeps the sign of zero products): exact, as E2M1 x 2**k fits bf16.

    NOTE: opt-in (`GroupedGemmConfig(fp4_decoder="lut")`), not the default. On an H200 it equals
    `_fp4_pairs_bf16_asm` bitwise for every byte x scale byte (`test_fp4_bf16_decoders_equal_on_gpu`)
    and in the GEMMs, but is slower despite fewer instructions (decode L1 604 vs 663 SASS per K
    step; measured 80.4 vs 75.4 us at T 1, 606 vs 565 us at T 128; docs/PERF.md): the decode loop
    is bound by its integer work (PRMT included), not by its instruction count.
    """
    return tl.inline_asm_elementwise(
        asm=FP4_BF16_LUT_PTX, constraints="=r,=r,=r,=r,r,r", args=[packed, sf],
        dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4)


@triton.jit
def _fp4_perm_k(t, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """The K order of the MXFP4 weight tiles, applied to an operand [ROWS, BLOCK_K] of the other
    side (x or h, memory order): logical column c = 2 * (8 g + 4 h + j) + b holds K index
    32 j + 4 g + 2 h + b (j < 4: the 32-group; g < 8; h, b < 2). A dot product over K is the same
    in any order, as long as both operands use it (see `_weight_tile_bf16`)."""
    t5 = tl.reshape(t, (ROWS, BLOCK_K // 32, 8, 2, 2))                    # [R, j, g, h, b]
    return tl.reshape(tl.permute(t5, (0, 2, 3, 1, 4)), (ROWS, BLOCK_K))   # [R, g, h, j, b]


@triton.jit
def _weight_tile_bf16(w_ptr, w_sf_ptr, w_off, sf_off, rows, kt,
                      K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      WEIGHT_FORMAT: tl.constexpr, FAST_FP4: tl.constexpr, FP4_DECODER: tl.constexpr):
    """Rows `rows` (int64 [BLOCK_R], within one expert) x K tile `kt` (columns kt * BLOCK_K ...
    + BLOCK_K - 1) of a weight [N, K] -> bf16 [BLOCK_R, BLOCK_K].

    NOTE: K offsets are built as kt * constant (not k0 // 2): Triton's alignment analysis keeps
    the divisibility of a product, not of a quotient.

    w_off / sf_off: int64 element offsets of the expert's data / scales. mxfp4: data int8
    [N, K/2], scales uint8 [N, K/32] (exact: E2M1 x 2**k fits bf16); fp8: the raw E4M3 values
    (exact in bf16; the float32 block scale is applied by the caller after the dot); bf16: as is.

    NOTE (mxfp4): the tile comes back in the K order of `_fp4_perm_k` (the caller permutes the
    other operand the same way). Hopper's wgmma takes this operand from registers, where a thread
    holds, per row and per 16 K columns, columns 2t, 2t+1, 2t+8, 2t+9 (t = lane % 4): 32 columns
    per 128. In the permuted order those 32 columns are the 16 consecutive packed bytes
    16t .. 16t+15 of the row (one 32-group, one scale byte): each thread loads 16-byte vectors
    (not 4), and the in-register decode (`_fp4_pairs_bf16_asm` on the GPU, FAST_FP4) works on
    whole 32-bit words. The permutation is a reshape / permute of the loaded bytes, free in
    registers. FAST_FP4 False (Triton's interpreter: no inline assembly) decodes with
    `_e2m1_decode`: the same values.
    """
    if WEIGHT_FORMAT == "mxfp4":
        cols = kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_ptr + w_off + rows[:, None] * (K // 2) + cols[None, :])     # [R, BK/2]
        scols = kt * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
        sb = tl.load(w_sf_ptr + sf_off + rows[:, None] * (K // 32) + scols[None, :])   # uint8 [R, BK/32]
        # memory byte 16 j + 2 g + h -> logical byte 8 g + 4 h + j
        packed = tl.reshape(tl.permute(tl.reshape(packed, (BLOCK_R, BLOCK_K // 32, 8, 2)), (0, 2, 3, 1)),
                            (BLOCK_R, BLOCK_K // 2))
        sb = tl.reshape(tl.broadcast_to(sb[:, None, None, :], (BLOCK_R, 8, 2, BLOCK_K // 32)),
                        (BLOCK_R, BLOCK_K // 2))
        if FAST_FP4:
            if FP4_DECODER == "lut":
                lo, hi = _fp4_pairs_bf16_lut_asm(packed, sb)
            else:
                lo, hi = _fp4_pairs_bf16_asm(packed, sb)
        else:
            b = packed.to(tl.int32) & 0xFF
            s = _exp2_ue8m0(sb.to(tl.int32))
            lo = (_e2m1_decode(b & 0xF) * s).to(tl.bfloat16)
            hi = (_e2m1_decode(b >> 4) * s).to(tl.bfloat16)
        tile = tl.interleave(lo, hi)                                                  # [R, BK]
    elif WEIGHT_FORMAT == "fp8":
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        tile = tl.load(w_ptr + w_off + rows[:, None] * K + cols[None, :]).to(tl.bfloat16)
    else:
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        tile = tl.load(w_ptr + w_off + rows[:, None] * K + cols[None, :])
    return tile


@triton.jit
def _act_scales(sf_ptr, rows64, row_ok, kt, K: tl.constexpr, GROUP: tl.constexpr, NUM_GROUPS: tl.constexpr):
    """UE8M0 bytes (int32 [BLOCK_M, NUM_GROUPS]) of `NUM_GROUPS` consecutive groups of GROUP
    columns starting at group kt * NUM_GROUPS, from packed int32 scales [rows, K / GROUP / 4]
    (byte j of word i = group 4i + j). Masked rows read 0."""
    g = kt * NUM_GROUPS + tl.arange(0, NUM_GROUPS)
    words = tl.load(sf_ptr + rows64[:, None] * (K // GROUP // 4) + (g // 4)[None, :],
                    mask=row_ok[:, None], other=0)
    return (words >> (8 * (g % 4))[None, :]) & 0xFF


@triton.jit
def _act_tile_bf16(x_ptr, sf_ptr, rows64, row_ok, kt,
                   K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACT_FORMAT: tl.constexpr):
    """Activation rows `rows64` (int64 [BLOCK_M]; masked rows read 0) x K tile `kt`
    -> bf16 [BLOCK_M, BLOCK_K], dequantised exactly (E4M3 / E2M1 times 2**k fit bf16).

    fp8: x float8_e4m3fn [rows, K]; fp4: x int8 [rows, K/2] packed E2M1; scales int32 packed
    UE8M0 [rows, K / GROUP / 4]; bf16: x bf16 [rows, K], sf_ptr unused.
    """
    if ACT_FORMAT == "bf16":
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        tile = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None], other=0.0)
    else:
        if ACT_FORMAT == "fp8":
            cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            vals = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None],
                           other=0.0).to(tl.float32)
        else:
            cols = kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(x_ptr + rows64[:, None] * (K // 2) + cols[None, :], mask=row_ok[:, None], other=0)
            vals = _e2m1_decode(_unpack_e2m1(packed))
        s = _exp2_ue8m0(_act_scales(sf_ptr, rows64, row_ok, kt, K, GROUP, BLOCK_K // GROUP))
        vals = tl.reshape(tl.reshape(vals, (BLOCK_M, BLOCK_K // GROUP, GROUP)) * s[:, :, None], (BLOCK_M, BLOCK_K))
        tile = vals.to(tl.bfloat16)
    return tile


@triton.jit
def _act_tile_mx(x_ptr, sf_ptr, rows64, row_ok, kt,
                 K: tl.constexpr, GROUP: tl.constexpr, BLOCK_K: tl.constexpr, ACT_FORMAT: tl.constexpr):
    """`tl.dot_scaled` operands of activation rows: (raw tile, uint8 [BLOCK_M, BLOCK_K / 32] scales).

    fp8: float8_e4m3fn [BLOCK_M, BLOCK_K]; fp4: uint8 [BLOCK_M, BLOCK_K / 2] packed E2M1 (K-packed).
    A group of 128 repeats its byte over its four 32-column sub-groups (the MMA's scale block is 32).
    """
    if ACT_FORMAT == "fp8":
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        raw = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None], other=0.0)
    else:
        cols = kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        raw = tl.load(x_ptr + rows64[:, None] * (K // 2) + cols[None, :], mask=row_ok[:, None],
                      other=0).to(tl.uint8, bitcast=True)
    sub = (kt * BLOCK_K + 32 * tl.arange(0, BLOCK_K // 32)) // GROUP                # group of each 32-block
    words = tl.load(sf_ptr + rows64[:, None] * (K // GROUP // 4) + (sub // 4)[None, :],
                    mask=row_ok[:, None], other=0)
    # Masked rows: byte 127 (scale 1) times zero data. NOTE: never hand byte 0/255 to the MMA
    # (Triton 3.6 decodes them as 0 / inf).
    sf = tl.where(row_ok[:, None], (words >> (8 * (sub % 4))[None, :]) & 0xFF, 127)
    return raw, sf.to(tl.uint8)


@triton.jit
def _weight_tile_mx(w_ptr, w_sf_ptr, w_off, sf_off, rows, kt, K: tl.constexpr, BLOCK_K: tl.constexpr):
    """`tl.dot_scaled` operands of MXFP4 weight rows: uint8 [R, BLOCK_K/2] packed E2M1 (K-packed)
    and uint8 [R, BLOCK_K/32] UE8M0 scales."""
    cols = kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    packed = tl.load(w_ptr + w_off + rows[:, None] * (K // 2) + cols[None, :]).to(tl.uint8, bitcast=True)
    scols = kt * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    sf = tl.load(w_sf_ptr + sf_off + rows[:, None] * (K // 32) + scols[None, :])
    return packed, sf


@triton.jit
def _mma(a, b, acc, DOT_IN_F32: tl.constexpr):
    """acc + a . b (bf16 operands, float32 accumulator).

    NOTE: DOT_IN_F32 widens the operands to float32 first (exact) — only for Triton's CPU
    interpreter, whose tl.dot multiplies the raw bit patterns of bf16 tensors (Triton 3.9).
    """
    if DOT_IN_F32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _tile_coords(work, num_tiles, NUM_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Work item -> (tile, N block), bands of GROUP_M tiles sweeping all N blocks (the tiles of a
    band share x in L2; consecutive tiles of one expert share its weight slab). Requires
    work < num_tiles * NUM_N. Example: num_tiles 4, NUM_N 2, GROUP_M 8: items 0..7 ->
    (0,0) (1,0) (2,0) (3,0) (0,1) (1,1) (2,1) (3,1)."""
    per_group = GROUP_M * NUM_N
    group = work // per_group
    first = group * GROUP_M
    size = tl.minimum(num_tiles - first, GROUP_M)
    local = work % per_group
    return first + local % size, local // size


@triton.jit
def _prefetch_item(work, total, num_tiles, tile_expert_ptr, tile_row_ptr, NUM_N: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """(expert, first pair row, N block) of work item `work`: the persistent loops load them an
    item ahead (two loads with no dependency), and the expert's row end one item later, so no
    item starts with a chain of dependent metadata loads. Past `total` the loads are masked off
    (expert 0, row 0)."""
    ok = work < total
    tile, pid_n = _tile_coords(tl.where(ok, work, 0), tl.maximum(num_tiles, 1), NUM_N, GROUP_M)
    expert = tl.load(tile_expert_ptr + tile, mask=ok, other=0)
    row_start = tl.load(tile_row_ptr + tile, mask=ok, other=0)
    return expert, row_start, pid_n


@triton.jit
def _quant_store_rows(y, row_ok, col0, out_rows, sf_rows, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP: tl.constexpr, FORMAT: tl.constexpr, HW_CVT: tl.constexpr = False):
    """Quantise float32 y [BLOCK_M, BLOCK_N] (columns col0 ..) per GROUP columns and store it.

    out_rows: [BLOCK_M, 1] pointers to each row's element 0: int8 (FORMAT "fp8": E4M3 bytes at
    column c; "fp4": packed E2M1 at byte c / 2) or int16 ("bf16": bf16 bits, RNE).
    sf_rows: [BLOCK_M, 1] uint8 pointers to each row's scale byte 0 (byte g = group g, i.e. the
    little-endian packed int32 layout); unused for bf16. Rows with row_ok False are not written.
    HW_CVT (GPU only, `EPILOGUE_HW_CVT`): bf16 and E4M3 by the hardware's RNE conversions (two values
    an instruction) instead of the integer encoders; the same bytes for finite values.
    """
    mask = row_ok[:, None]
    cols = col0 + tl.arange(0, BLOCK_N)
    if FORMAT == "bf16":
        if HW_CVT:
            tl.store(out_rows + cols[None, :], y.to(tl.bfloat16).to(tl.int16, bitcast=True), mask=mask)
        else:
            bits = _bf16_rne_bits(y) >> 16
            tl.store(out_rows + cols[None, :], bits.to(tl.int16), mask=mask)
    else:
        NG: tl.constexpr = BLOCK_N // GROUP
        y3 = tl.reshape(y, (BLOCK_M, NG, GROUP))
        amax = tl.max(tl.abs(y3), axis=2)                                           # [BM, NG]
        e = _ue8m0_exponent(amax, FORMAT == "fp4")
        q3 = y3 * _exp2_neg_ue8m0(e)[:, :, None]                                    # exact
        q = tl.reshape(q3, (BLOCK_M, BLOCK_N))
        if FORMAT == "fp8" and HW_CVT:
            tl.store(out_rows + cols[None, :], q.to(tl.float8e4nv).to(tl.int8, bitcast=True), mask=mask)
        elif FORMAT == "fp8":
            tl.store(out_rows + cols[None, :], _e4m3_code(q).to(tl.int8), mask=mask)
        else:
            lo, hi = tl.split(tl.reshape(_e2m1_code(q), (BLOCK_M, BLOCK_N // 2, 2)))
            pcols = col0 // 2 + tl.arange(0, BLOCK_N // 2)
            tl.store(out_rows + pcols[None, :], (lo | (hi << 4)).to(tl.int8), mask=mask)
        gcols = col0 // GROUP + tl.arange(0, NG)
        # NOTE: bytes, not int32 words: a program may own fewer than 4 groups of a word, and the
        # bytes of a little-endian word are exactly the packed layout, so no read-modify-write.
        tl.store(sf_rows + gcols[None, :], e.to(tl.uint8), mask=mask)


# -------------------------------------------------------------------------------------------------
# The FP8 mainloop's operands (Hopper): rebased E4M3 tiles (see `gemm_operands`, `reference.rebase_rows`)
# -------------------------------------------------------------------------------------------------
@triton.jit
def _e4m3_value(b):
    """int32 E4M3 bytes (0..255) -> exact float32 values (integer operations: interpreter-safe)."""
    ex = (b >> 3) & 0xF
    mt = b & 7
    mag = tl.where(ex > 0, (((ex + 120) << 23) | (mt << 20)).to(tl.float32, bitcast=True),
                   mt.to(tl.float32) * 0.001953125)
    return tl.where((b & 0x80) != 0, -mag, mag)


@triton.jit
def _fp4_e4m3_asm(packed, tlo, thi):
    """GPU: packed E2M1 bytes (int8) and the 8-byte E4M3 table of each byte's 32-group (int32 low /
    high words: magnitude m -> byte m) -> int16 of packed's shape: low byte the E4M3 byte of the
    even (low-nibble) column, high byte the odd one's.

    Every element is decoded from its own byte and table (Triton may pack any 4 elements of a
    thread into one call). Per 4 bytes: one LOP3 masks the sign bits off, leaving each byte's two
    3-bit magnitudes as PRMT selectors (low nibble -> output byte 0, high -> 1); four PRMT table
    lookups, two PRMT gather the 16-bit results into two words, two PRMT in sign-replicate mode
    turn the nibbles' sign bits into byte masks, two LOP3 merge sign and magnitude, plus 4
    shifts: ~2 instructions per weight.
    """
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 s, s1, s2, s3, w4, p0, p1, p2, p3, m0, m1, a, b;
        and.b32 s, $2, 0x77777777;
        shr.u32 s1, s, 8;
        shr.u32 s2, s, 16;
        shr.u32 s3, s, 24;
        prmt.b32 p0, $3, $7, s;
        prmt.b32 p1, $4, $8, s1;
        prmt.b32 p2, $5, $9, s2;
        prmt.b32 p3, $6, $10, s3;
        prmt.b32 a, p0, p1, 0x5410;
        prmt.b32 b, p2, p3, 0x5410;
        shl.b32 w4, $2, 4;
        prmt.b32 m0, w4, $2, 0xD9C8;
        prmt.b32 m1, w4, $2, 0xFBEA;
        lop3.b32 $0, a, m0, 0x80808080, 0xF8;
        lop3.b32 $1, b, m1, 0x80808080, 0xF8;
        }""",
        constraints="=r,=r,r,r,r,r,r,r,r,r,r", args=[packed, tlo, thi], dtype=tl.int16,
        is_pure=True, pack=4)


@triton.jit
def _fp4_tile_e4m3(packed, tab, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr):
    """Packed E2M1 int8 [ROWS, BLOCK_K/2] + the int64 table entry of each 32-group [ROWS, BLOCK_K/32]
    -> float8e4nv [ROWS, BLOCK_K] (natural K order). FAST: the PRMT decode (GPU); else the same
    bytes from integer operations (Triton's interpreter has no inline assembly)."""
    tb = tl.reshape(tl.broadcast_to(tab[:, :, None], (ROWS, BLOCK_K // 32, 16)), (ROWS, BLOCK_K // 2))
    if FAST:
        pairs = _fp4_e4m3_asm(packed, tb.to(tl.int32), (tb >> 32).to(tl.int32))        # int16
        tile = tl.interleave(pairs.to(tl.int8), (pairs >> 8).to(tl.int8))
    else:
        b = packed.to(tl.int32) & 0xFF
        lo = ((tb >> ((b & 7) * 8).to(tl.int64)) & 0xFF).to(tl.int32) | ((b & 8) << 4)
        hi = ((tb >> (((b >> 4) & 7) * 8).to(tl.int64)) & 0xFF).to(tl.int32) | (b & 0x80)
        tile = tl.interleave(lo.to(tl.int8), hi.to(tl.int8))
    return tile.to(tl.float8e4nv, bitcast=True)


@triton.jit
def _fp4_word_asm(w, tlo, thi):
    """GPU: one fragment word (8 E2M1 codes, `gemm_operands.fragment_words`) and its group's 8-byte
    E4M3 table (int32 low / high words: magnitude m -> byte m) -> (lo, hi) int32 of 4 E4M3 bytes.
    7 instructions per 8 weights: one LOP3 masks the signs off (the magnitudes are PRMT selectors
    as they stand), one shift, two PRMT table lookups, one shift and two LOP3 merge the signs
    (lo's sit at its bytes' sign bits already, hi's 4 bits lower)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 s, s16, m0, m1, w4;
        and.b32 s, $2, 0x77777777;
        shr.u32 s16, s, 16;
        prmt.b32 m0, $3, $4, s;
        prmt.b32 m1, $3, $4, s16;
        shl.b32 w4, $2, 4;
        lop3.b32 $0, m0, $2, 0x80808080, 0xF8;
        lop3.b32 $1, m1, w4, 0x80808080, 0xF8;
        }""",
        constraints="=r,=r,r,r,r", args=[w, tlo, thi], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _fp4_word_int(w, tab):
    """`_fp4_word_asm` from integer operations (Triton's interpreter has no inline assembly):
    int32 word + int64 table -> (lo, hi) int32."""
    lo = tl.zeros_like(w)
    hi = tl.zeros_like(w)
    for i in tl.static_range(4):
        ml = ((w >> (4 * i)) & 7).to(tl.int64)
        mh = ((w >> (4 * i + 16)) & 7).to(tl.int64)
        bl = ((tab >> (ml * 8)) & 0xFF).to(tl.int32) | (((w >> (8 * i + 7)) & 1) << 7)
        bh = ((tab >> (mh * 8)) & 0xFF).to(tl.int32) | (((w >> (8 * i + 3)) & 1) << 7)
        lo = lo | (bl << (8 * i))
        hi = hi | (bh << (8 * i))
    return lo, hi


@triton.jit
def _e2m1_table_f16(d):
    """GPU: int32 offset index d -> (lo, hi) int32: the E4M3 bytes of the E2M1 magnitudes 0..3 /
    4..7 times 2**(6 - d), RNE with subnormals: `reference.e2m1_to_e4m3_tables`, bitwise. Four
    f16x2 products (exact: d is clamped to 20, from where every entry rounds to zero) and four
    cvt.rn.satfinite.e4m3x2.f16x2; no table in memory, so d streams like the weights (a table
    gathered at d made d's load a gather index, which Triton pipelines one K step ahead only:
    20% slower on the H200, `scripts/probe_fp4_stream.py`)."""
    s = 0x54005400 - tl.minimum(d, 20) * 0x04000400           # f16x2 2**(6 - d) in both halves
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b32 p0, p1, p2, p3, c0, c1, c2, c3;
        .reg .b16 q0, q1, q2, q3;
        mov.b32 c0, 0x38000000;
        mov.b32 c1, 0x3E003C00;
        mov.b32 c2, 0x42004000;
        mov.b32 c3, 0x46004400;
        mul.rn.f16x2 p0, $2, c0;
        mul.rn.f16x2 p1, $2, c1;
        mul.rn.f16x2 p2, $2, c2;
        mul.rn.f16x2 p3, $2, c3;
        cvt.rn.satfinite.e4m3x2.f16x2 q0, p0;
        cvt.rn.satfinite.e4m3x2.f16x2 q1, p1;
        cvt.rn.satfinite.e4m3x2.f16x2 q2, p2;
        cvt.rn.satfinite.e4m3x2.f16x2 q3, p3;
        mov.b32 $0, {q0, q1};
        mov.b32 $1, {q2, q3};
        }""",
        constraints="=r,=r,r", args=[s], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)


@triton.jit
def _frag_rows(row0, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, WARPS: tl.constexpr, SPLIT: tl.constexpr,
               SHIFT):
    """Where each virtual row of `_fp4_frag_e4m3`'s [V, 16] word tile comes from: (weight row int64 [V],
    128-K chunk int32 [V]), V = BLOCK_R * BLOCK_K / 128. v = lane + 8 w + 8 W (r + 2 (q + Q m)):
    the coalesced layout of the tile gives bits 0-2 to the lanes (lane / 4 of the MMA fragment),
    the next log2(W) to the warps and the rest to registers; the MMA's register operand wants tile
    row t = lane + 8 r + 16 w + 16 W m (r: the thread's second row, m: the M repeat) and 128-K chunk
    q of the step in registers. Tile rows from SPLIT on are stored SHIFT rows further (L1's up
    rows); row0 is the first."""
    Q: tl.constexpr = BLOCK_K // 128
    v = tl.arange(0, BLOCK_R * Q)
    lane = v % 8
    w = (v // 8) % WARPS
    r = (v // (8 * WARPS)) % 2
    q = (v // (16 * WARPS)) % Q
    m = v // (16 * WARPS * Q)
    t = lane + 8 * r + 16 * w + 16 * WARPS * m
    return (tl.where(t < SPLIT, t, t + SHIFT) + row0).to(tl.int64), q


@triton.jit
def _fp4_frag_e4m3(w_ptr, aux_ptr, tab_ptr, w_off, aux_off, vrows, vq, kt,
                   K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, WARPS: tl.constexpr,
                   TABLE: tl.constexpr):
    """MXFP4 fragment words -> float8e4nv [BLOCK_R, BLOCK_K] (natural K order), decoded in the MMA's
    register-operand layout: no shared-memory round trip of the expanded tile.

    Per row, each 128-K chunk's 16 words are stored (c, g) (`gemm_operands.fragment_words`): word
    4 c + g holds the codes of k = 32 g + 4 c + (0..3, 16..19). The step's words are loaded as a
    [V, 16] tile of virtual rows (`_frag_rows`: vrows, vq): its coalesced layout (16 bytes = 4 g per
    thread, c on lanes 0-1, the rows on lanes 2-4 and the warps) is the wgmma register operand's
    (lane = 4 x row + c, k = 32 g + 16 h + 4 c + byte), so the reshape / join / permute below only
    rename registers. Each thread's d bytes (uint8 per row and group) are loaded in the same
    layout (c broadcast). TABLE: "imad" (two IMAD, exact while every entry is normal: d <= 11,
    which the caller guarantees), "f16" (`_e2m1_table_f16`, exact for every d), "int" (the
    interpreter: gathered from `tab_ptr`); with "_lane" (`WeightOperand.lane`): the words are in the
    "lane" K order, word 4 c + g of group c (not g), so a thread's 4 words of a row share its table
    (the row's 4 offset bytes loaded as one int32, byte c taken: one table per row and chunk)."""
    Q: tl.constexpr = BLOCK_K // 128
    MR: tl.constexpr = BLOCK_R // (16 * WARPS)
    col = tl.arange(0, 16)
    wd = tl.load(w_ptr.to(tl.pointer_type(tl.int32)) + w_off // 4 + vrows[:, None] * (K // 8)
                 + (kt * (BLOCK_K // 128) + vq)[:, None] * 16 + col[None, :])
    if TABLE == "imad_lane" or TABLE == "f16_lane" or TABLE == "int_lane":
        # (an int32 per row in the words' row layout: loading the bytes at col // 4 instead makes
        # Triton pick another layout for them and shuffle through shared memory)
        dw = tl.load((aux_ptr + aux_off).to(tl.pointer_type(tl.int32), bitcast=True) + vrows * (K // 128)
                     + (kt * (BLOCK_K // 128) + vq))
        d = (dw[:, None] >> (8 * (col // 4))[None, :]) & 0xFF
    else:
        d = tl.load(aux_ptr + aux_off + vrows[:, None] * (K // 32) + (kt * (BLOCK_K // 128) + vq)[:, None] * 4
                    + (col % 4)[None, :]).to(tl.int32)
    if TABLE == "int" or TABLE == "int_lane":
        lo, hi = _fp4_word_int(wd, tl.load(tab_ptr + d))
    else:
        if TABLE == "imad" or TABLE == "imad_lane":
            # E4M3 bytes of the magnitudes x 2**(6 - d) while normal: 0x60 + 8 (e - d) per entry
            tlo = 0x6C686000 - d * 0x08080800
            thi = 0x7C787470 - d * 0x08080808
        else:
            tlo, thi = _e2m1_table_f16(d)
        lo, hi = _fp4_word_asm(wd, tlo, thi)
    j = tl.reshape(tl.join(lo, hi), (MR, Q, 2, WARPS, 8, 4, 4, 2))                # [m, q, r, w, lane, c, g, h]
    b = tl.join(tl.join(j.to(tl.int8), (j >> 8).to(tl.int8)),
                tl.join((j >> 16).to(tl.int8), (j >> 24).to(tl.int8)))          # [..., byte & 1, byte >> 1]
    b = tl.permute(b, (0, 3, 2, 4, 1, 6, 7, 5, 9, 8))              # [m, w, r, lane, q, g, h, c, byte >> 1, byte & 1]
    return tl.reshape(b, (BLOCK_R, BLOCK_K)).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _row_max_exponent(sf_ptr, rows64, row_ok, NUM_WORDS: tl.constexpr, NUM_WORDS_P2: tl.constexpr):
    """Largest UE8M0 byte of each row's packed int32 scales [rows, NUM_WORDS] -> int32 [BLOCK_M]
    (the row exponent of `reference.rebase_rows`); masked rows give 0."""
    w = tl.arange(0, NUM_WORDS_P2)
    words = tl.load(sf_ptr + rows64[:, None] * NUM_WORDS + w[None, :],
                    mask=row_ok[:, None] & (w < NUM_WORDS)[None, :], other=0)
    m = tl.maximum(tl.maximum(words & 0xFF, (words >> 8) & 0xFF),
                   tl.maximum((words >> 16) & 0xFF, (words >> 24) & 0xFF))
    return tl.max(m, axis=1)


@triton.jit
def _act_tile_e4m3(x_ptr, sf_ptr, tab_ptr, rows64, row_ok, kt, e_row,
                   K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACT_FORMAT: tl.constexpr, FAST: tl.constexpr):
    """Rebased activation rows x K tile `kt` -> float8e4nv [BLOCK_M, BLOCK_K], bitwise `reference.rebase_act` given the row exponents `e_row` [BLOCK_M]:
    value * 2**(headroom - (e_row - e_group)) rounded to E4M3 (RNE, subnormals)."""
    e = _act_scales(sf_ptr, rows64, row_ok, kt, K, GROUP, BLOCK_K // GROUP)       # [BM, BK/G]
    d = tl.maximum(e_row[:, None] - e, 0)
    if ACT_FORMAT == "fp8":
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        raw = tl.load(x_ptr + rows64[:, None] * K + cols[None, :], mask=row_ok[:, None], other=0.0)
        f = tl.where(d < 127, (127 - d) << 23, 0).to(tl.float32, bitcast=True)     # 2**-d
        if FAST:
            v = raw.to(tl.float32)
        else:
            v = _e4m3_value(raw.to(tl.int8, bitcast=True).to(tl.int32) & 0xFF)
        q = tl.reshape(tl.reshape(v, (BLOCK_M, BLOCK_K // GROUP, GROUP)) * f[:, :, None], (BLOCK_M, BLOCK_K))
        if FAST:
            tile = q.to(tl.float8e4nv)           # cvt.rn.satfinite: RNE with subnormals
        else:
            tile = _e4m3_code(q).to(tl.int8).to(tl.float8e4nv, bitcast=True)
    else:
        cols = kt * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(x_ptr + rows64[:, None] * (K // 2) + cols[None, :], mask=row_ok[:, None], other=0)
        d32 = tl.reshape(tl.broadcast_to(d[:, :, None], (BLOCK_M, BLOCK_K // GROUP, GROUP // 32)),
                         (BLOCK_M, BLOCK_K // 32))
        tab = tl.load(tab_ptr + tl.minimum(d32, 63))
        tile = _fp4_tile_e4m3(packed, tab, BLOCK_M, BLOCK_K, FAST)
    return tile


@triton.jit
def _weight_tile_e4m3(w_ptr, aux_ptr, tab_ptr, w_off, aux_off, rows, vrows, vq, kt,
                      K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
                      W_KIND: tl.constexpr, WARPS: tl.constexpr, FP4_TABLE: tl.constexpr):
    """Weight rows x K tile `kt` -> float8e4nv [BLOCK_R, BLOCK_K]: "mxfp4" expands the fragment
    words of virtual rows (vrows, vq) (`_frag_rows`, `_fp4_frag_e4m3`; aux = uint8 offset index per
    32-group); "fp8_rebased" / "fp8_block" load the stored E4M3 bytes of `rows` (natural order)."""
    if W_KIND == "mxfp4":
        tile = _fp4_frag_e4m3(w_ptr, aux_ptr, tab_ptr, w_off, aux_off, vrows, vq, kt, K, BLOCK_R, BLOCK_K, WARPS,
                              FP4_TABLE)
    else:
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        tile = tl.load(w_ptr + w_off + rows[:, None] * K + cols[None, :])
    return tile


@triton.jit
def _mma8(a, b, acc, DOT_IN_F32: tl.constexpr):
    """acc + a . b with E4M3 operands (float32 accumulator). DOT_IN_F32: the interpreter's path
    (exact float32 values, IEEE dot)."""
    if DOT_IN_F32:
        af = _e4m3_value(a.to(tl.int8, bitcast=True).to(tl.int32) & 0xFF)
        bf = _e4m3_value(b.to(tl.int8, bitcast=True).to(tl.int32) & 0xFF)
        out = tl.dot(af, bf, acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _fp8_mainloop(w_ptr, w_sf_ptr, tab_ptr, w_off, sf_off, w_rows, w_row0, w_shift, a_ptr, a_sf_ptr, a_rows64, a_ok,
                  e_row, K: tl.constexpr, A_GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_K: tl.constexpr, W_SPLIT: tl.constexpr, W_KIND: tl.constexpr, ACT_FORMAT: tl.constexpr,
                  WARPS: tl.constexpr, FP4_TABLE: tl.constexpr, PROMOTE: tl.constexpr, DOT_IN_F32: tl.constexpr,
                  STREAMED: tl.constexpr, OVER_M: tl.constexpr = 0, o_rows64=None, o_ok=None):
    """(acc, acc_o): acc[BLOCK_R, BLOCK_M] = W[w_rows, :K] . A[a_rows, :K]^T in units of the
    operands' row bases (`_apply_row_factors` applies them): the FP8 mainloop.

    OVER_M > 0 (STREAMED only): also acc_o[BLOCK_R, OVER_M] = W . A[o_rows]^T, a second, narrow MMA
    on each K step's decoded weight tile (the tile's rows past BLOCK_M, `TilePlan.over`), promoted
    like acc; OVER_M 0: acc_o is an unused [BLOCK_R, 16] zero tile.

    STREAMED: the act rows were rebased to E4M3 where they landed (`rebase.py`; a_sf_ptr, A_GROUP
    and e_row unused), so both operands come straight from memory ("fp8_rebased" weights; "mxfp4"
    is expanded in registers), Triton pipelines the loads and keeps the wgmma in flight across K
    steps (`warp_group_dot_wait {pendings = 1}`) as long as only the MMA touches its accumulator.
    Else the act groups of A_GROUP are rebased to the row exponent e_row in registers
    (`_act_tile_e4m3`).
    NOTE: Hopper's FP8 MMA keeps ~14 mantissa bits while it accumulates (truncating): the partial
    sum of every PROMOTE steps (a pipelined inner loop) is added to a float32 accumulator; PROMOTE
    = K / BLOCK_K chains the whole K (H200, N 4096 K 7168, Gaussian data: rel-RMSE 1.9e-3 chained,
    5.4e-4 every 8 steps, 1.3e-4 every step; `scripts/probe_fp8_stream.py`). Only a chained loop
    keeps the MMA in flight; promoting after every step still measured as fast in the layer's L1
    (`gemm_heuristics.STREAM_PROMOTE_L1`), where two CTAs per SM overlap each other's waits.
    "fp8_block" (block scales that are not powers of two) multiplies each 128-K partial product
    by its scale. "mxfp4" reads the rows `_frag_rows(w_row0, ..., W_SPLIT, w_shift)` (= w_rows)
    in the MMA register operand's order, 128 or 256 K per step.
    """
    OM: tl.constexpr = OVER_M if OVER_M > 0 else 16
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    acc_o = tl.zeros((BLOCK_R, OM), dtype=tl.float32)
    vrows, vq = _frag_rows(w_row0, BLOCK_R, BLOCK_K, WARPS, W_SPLIT, w_shift)
    if STREAMED and PROMOTE * BLOCK_K >= K and W_KIND != "fp8_block":
        for kt in range(0, K // BLOCK_K):
            w8 = _weight_tile_e4m3(w_ptr, w_sf_ptr, tab_ptr, w_off, sf_off, w_rows, vrows, vq, kt, K, BLOCK_R,
                                   BLOCK_K, W_KIND, WARPS, FP4_TABLE)
            cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            a8 = tl.load(a_ptr + a_rows64[:, None] * K + cols[None, :], mask=a_ok[:, None], other=0.0)
            acc = _mma8(w8, tl.trans(a8), acc, DOT_IN_F32)
            if OVER_M > 0:
                o8 = tl.load(a_ptr + o_rows64[:, None] * K + cols[None, :], mask=o_ok[:, None], other=0.0)
                acc_o = _mma8(w8, tl.trans(o8), acc_o, DOT_IN_F32)
    else:
        for kc in range(0, K // BLOCK_K // PROMOTE):
            part = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
            part_o = tl.zeros((BLOCK_R, OM), dtype=tl.float32)
            for kk in range(0, PROMOTE):
                kt = kc * PROMOTE + kk
                w8 = _weight_tile_e4m3(w_ptr, w_sf_ptr, tab_ptr, w_off, sf_off, w_rows, vrows, vq, kt, K,
                                       BLOCK_R, BLOCK_K, W_KIND, WARPS, FP4_TABLE)
                if STREAMED:
                    cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
                    a8 = tl.load(a_ptr + a_rows64[:, None] * K + cols[None, :], mask=a_ok[:, None], other=0.0)
                    if OVER_M > 0:
                        o8 = tl.load(a_ptr + o_rows64[:, None] * K + cols[None, :], mask=o_ok[:, None], other=0.0)
                else:
                    a8 = _act_tile_e4m3(a_ptr, a_sf_ptr, tab_ptr, a_rows64, a_ok, kt, e_row, K, A_GROUP, BLOCK_M,
                                        BLOCK_K, ACT_FORMAT, not DOT_IN_F32)
                if W_KIND == "fp8_block":
                    s_w = tl.load(w_sf_ptr + sf_off + (w_rows // 128) * (K // 128) + kt * BLOCK_K // 128)
                    part += _mma8(w8, tl.trans(a8), tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32),
                                  DOT_IN_F32) * s_w[:, None]
                    if OVER_M > 0:
                        part_o += _mma8(w8, tl.trans(o8), tl.zeros((BLOCK_R, OM), dtype=tl.float32),
                                        DOT_IN_F32) * s_w[:, None]
                else:
                    part = _mma8(w8, tl.trans(a8), part, DOT_IN_F32)
                    if OVER_M > 0:
                        part_o = _mma8(w8, tl.trans(o8), part_o, DOT_IN_F32)
            acc += part
            if OVER_M > 0:
                acc_o += part_o
    return acc, acc_o


@triton.jit
def _apply_row_factors(acc, e_row, w_row_ptr, w_idx, ACT_FORMAT: tl.constexpr, W_KIND: tl.constexpr):
    """The FP8 mainloop's result times its operands' row factors, exact powers of two: the
    activation rows' 2**(e_row - 127 - headroom) and the weight rows' w_row_ptr[w_idx] ("fp8_block"
    weights have none: their block scales were applied per K step)."""
    a_f = _exp2_ue8m0(tl.maximum(e_row - (0 if ACT_FORMAT == "fp8" else 6), 1))
    if W_KIND == "fp8_block":
        acc = acc * a_f[None, :]
    else:
        w_f = tl.load(w_row_ptr + w_idx)
        acc = acc * w_f[:, None] * a_f[None, :]
    return acc


@triton.jit
def _swiglu_h(gate, up, weight):
    """DESIGN step 4 in float32: silu(gate) * up * weight, the operations of `_l1_epilogue`'s line
    (kept inline there: calling this from it changed the Triton kernel's SASS) for the Gluon L1
    (`l1_gluon`), whose h must equal the Triton kernel's."""
    return gate * tl.sigmoid(gate) * up * weight


@triton.jit
def _l1_epilogue(acc, e_row, rows, row_ok, e64, n_rows, pid_n, w_row_ptr, pair_w_ptr, h_ptr, h_sf_ptr, clamp,
                 INTER: tl.constexpr, ACT_FORMAT: tl.constexpr, HAS_CLAMP: tl.constexpr, W_KIND: tl.constexpr,
                 ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HW_CVT: tl.constexpr = False):
    """The transposed [2 BLOCK_N, ROWS] accumulator of pairs `rows` -> their h columns: the FP8
    mainloop's row factors, then DESIGN steps 2 (bf16), 3 (clamp), 4 (SwiGLU x weight), 5
    (requantise). HW_CVT: the roundings by the hardware's conversions (`EPILOGUE_HW_CVT`)."""
    if W_KIND != "raw":
        acc = _apply_row_factors(acc, e_row, w_row_ptr, e64 * (2 * INTER) + n_rows, ACT_FORMAT, W_KIND)
    # [2BN, R] -> [R, 2, BN] -> [R, BN, 2] -> gate, up [R, BN]
    if HW_CVT:
        gate, up = tl.split(tl.permute(tl.reshape(tl.trans(acc.to(tl.bfloat16).to(tl.float32)), (ROWS, 2, BLOCK_N)),
                                       (0, 2, 1)))
    else:
        gate, up = tl.split(tl.permute(tl.reshape(tl.trans(_round_bf16(acc)), (ROWS, 2, BLOCK_N)), (0, 2, 1)))
    if HAS_CLAMP:
        gate = tl.minimum(gate, clamp)
        up = tl.minimum(tl.maximum(up, -clamp), clamp)
    weight = tl.load(pair_w_ptr + rows, mask=row_ok, other=0.0)
    h = gate * tl.sigmoid(gate) * up * weight[:, None]                               # [R, BN] f32
    rows64 = rows.to(tl.int64)
    if ACT_FORMAT == "fp4":
        h_rows = h_ptr + rows64[:, None] * (INTER // 2)
    else:
        h_rows = h_ptr + rows64[:, None] * INTER
    if ACT_FORMAT == "bf16":
        sf_rows = h_rows  # unused
    else:
        sf_rows = h_sf_ptr + rows64[:, None] * (INTER // 32)
    _quant_store_rows(h, row_ok, pid_n * BLOCK_N, h_rows, sf_rows, ROWS, BLOCK_N, 32, ACT_FORMAT, HW_CVT)


@triton.jit
def _l1_item(x_ptr, x_sf_ptr, pair_rows_ptr, pair_w_ptr, w_ptr, w_sf_ptr, w_row_ptr, tab_ptr, h_ptr, h_sf_ptr, clamp,
             expert, row_start, row_end, pid_n,
             HIDDEN: tl.constexpr, INTER: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, ACT_FORMAT: tl.constexpr,
             ACT_GROUP: tl.constexpr, HAS_CLAMP: tl.constexpr, USE_DOT_SCALED: tl.constexpr,
             DOT_IN_F32: tl.constexpr, W_KIND: tl.constexpr, SF_WORDS_P2: tl.constexpr, PROMOTE: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP4_DECODER: tl.constexpr,
             ACT_REBASED: tl.constexpr, WARPS: tl.constexpr, FP4_TABLE: tl.constexpr,
             OVER_M: tl.constexpr, OVER_LIMIT: tl.constexpr, EPI_CVT: tl.constexpr = False):
    """One L1 work item (`_l1_kernel`): pairs [row_start, min(row_start + BLOCK_M, row_end)) of
    `expert` x N block `pid_n` (BLOCK_N columns of gate and of up) -> their h columns. OVER_M > 0:
    when BLOCK_M < row_end - row_start <= BLOCK_M + OVER_LIMIT (the expert's last full tile, its
    remainder within the plan's limit: `TilePlan.over`), also the pairs [row_start + BLOCK_M,
    min(row_start + BLOCK_M + OVER_M, row_end)) in the same K loop."""
    tl.static_assert(OVER_M == 0 or (ACT_REBASED and W_KIND != "raw"), "rows past BLOCK_M: streamed FP8 mainloop only")
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    prow = tl.load(pair_rows_ptr + rows, mask=row_ok, other=0).to(tl.int64)

    e64 = expert.to(tl.int64)
    # NOTE: gate and up rows are stacked into ONE operand of 2 * BLOCK_N rows (gate rows
    # n0..n0+BN-1, then up rows I+n0..): one MMA of M = 2 * BLOCK_N per K step (128 rows = one
    # Blackwell block-scaled MMA at BLOCK_N 64), one accumulator, and no operand shared between
    # two MMAs (Triton 3.6's Blackwell warp specialisation asserts on a shared scale operand).
    r = tl.arange(0, 2 * BLOCK_N)
    n_rows = (tl.where(r < BLOCK_N, r, r - BLOCK_N + INTER) + pid_n * BLOCK_N).to(tl.int64)
    if WEIGHT_FORMAT == "mxfp4":
        w_off = e64 * (2 * INTER * (HIDDEN // 2))
        sf_off = e64 * (2 * INTER * (HIDDEN // 32))
    elif WEIGHT_FORMAT == "fp8":
        w_off = e64 * (2 * INTER * HIDDEN)
        sf_off = e64 * ((2 * INTER // 128) * (HIDDEN // 128))
    else:
        w_off = e64 * (2 * INTER * HIDDEN)
        sf_off = e64 * 0

    if ACT_REBASED:
        e_row = tl.load(x_sf_ptr + prow, mask=row_ok, other=0)
    elif W_KIND != "raw":
        e_row = _row_max_exponent(x_sf_ptr, prow, row_ok, HIDDEN // ACT_GROUP // 4, SF_WORDS_P2)
    else:
        e_row = row_ok.to(tl.int32)  # unused
    acc = tl.zeros((2 * BLOCK_N, BLOCK_M), dtype=tl.float32)
    rem = row_end - row_start
    if OVER_M > 0 and (rem > BLOCK_M) & (rem <= BLOCK_M + OVER_LIMIT):
        # the expert's last full tile and (part of) its remainder: one weight stream, two MMAs
        orows = row_start + BLOCK_M + tl.arange(0, OVER_M)
        o_ok = orows < row_end
        oprow = tl.load(pair_rows_ptr + orows, mask=o_ok, other=0).to(tl.int64)
        acc, acc_o = _fp8_mainloop(w_ptr, w_sf_ptr, tab_ptr, w_off, sf_off, n_rows, pid_n * BLOCK_N, INTER - BLOCK_N,
                                   x_ptr, x_sf_ptr, prow, row_ok, e_row, HIDDEN, ACT_GROUP, 2 * BLOCK_N, BLOCK_M,
                                   BLOCK_K, BLOCK_N, W_KIND, ACT_FORMAT, WARPS, FP4_TABLE, PROMOTE, DOT_IN_F32,
                                   ACT_REBASED, OVER_M, oprow, o_ok)
        o_e_row = tl.load(x_sf_ptr + oprow, mask=o_ok, other=0)
        _l1_epilogue(acc_o, o_e_row, orows, o_ok, e64, n_rows, pid_n, w_row_ptr, pair_w_ptr, h_ptr, h_sf_ptr, clamp,
                     INTER, ACT_FORMAT, HAS_CLAMP, W_KIND, OVER_M, BLOCK_N, EPI_CVT)
    elif ACT_REBASED or (W_KIND != "raw" and not USE_DOT_SCALED):
        # Hopper: the FP8 mainloop (x rebased where it landed, or here in registers)
        acc, _ = _fp8_mainloop(w_ptr, w_sf_ptr, tab_ptr, w_off, sf_off, n_rows, pid_n * BLOCK_N, INTER - BLOCK_N,
                               x_ptr, x_sf_ptr, prow, row_ok, e_row, HIDDEN, ACT_GROUP, 2 * BLOCK_N, BLOCK_M, BLOCK_K,
                               BLOCK_N, W_KIND, ACT_FORMAT, WARPS, FP4_TABLE, PROMOTE, DOT_IN_F32, ACT_REBASED)
    else:
        for kt in range(0, HIDDEN // BLOCK_K):
            if USE_DOT_SCALED:
                # Blackwell: native block-scaled MMA (MXFP4 weights x FP8/FP4 activations).
                x_raw, x_sf = _act_tile_mx(x_ptr, x_sf_ptr, prow, row_ok, kt, HIDDEN, ACT_GROUP, BLOCK_K, ACT_FORMAT)
                w, w_sf = _weight_tile_mx(w_ptr, w_sf_ptr, w_off, sf_off, n_rows, kt, HIDDEN, BLOCK_K)
                acc = tl.dot_scaled(w, w_sf, "e2m1", tl.trans(x_raw), x_sf,
                                    "e4m3" if ACT_FORMAT == "fp8" else "e2m1", acc)
            else:
                x_tile = _act_tile_bf16(x_ptr, x_sf_ptr, prow, row_ok, kt, HIDDEN, ACT_GROUP, BLOCK_M, BLOCK_K,
                                        ACT_FORMAT)                                             # [BM, BK]
                if WEIGHT_FORMAT == "mxfp4":
                    x_tile = _fp4_perm_k(x_tile, BLOCK_M, BLOCK_K)        # the weight tile's K order
                x_t = tl.trans(x_tile)                                                          # [BK, BM]
                w = _weight_tile_bf16(w_ptr, w_sf_ptr, w_off, sf_off, n_rows, kt, HIDDEN, 2 * BLOCK_N, BLOCK_K,
                                      WEIGHT_FORMAT, not DOT_IN_F32, FP4_DECODER)                   # [2BN, BK]
                if WEIGHT_FORMAT == "fp8":
                    # Block scales (any positive float32) multiply the per-128-K partial products.
                    s_w = tl.load(w_sf_ptr + sf_off + (n_rows // 128) * (HIDDEN // 128) + kt * BLOCK_K // 128)
                    acc += _mma(w, x_t, tl.zeros((2 * BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_IN_F32) * s_w[:, None]
                else:
                    acc = _mma(w, x_t, acc, DOT_IN_F32)
    _l1_epilogue(acc, e_row, rows, row_ok, e64, n_rows, pid_n, w_row_ptr, pair_w_ptr, h_ptr, h_sf_ptr, clamp,
                 INTER, ACT_FORMAT, HAS_CLAMP, W_KIND, BLOCK_M, BLOCK_N, EPI_CVT)


# =================================================================================================
# The L1 kernel
# =================================================================================================
@triton.jit(do_not_specialize=["max_tiles", "clamp"])
def _l1_kernel(
    x_ptr,            # fp8: float8_e4m3fn [Npool, H]; fp4: int8 [Npool, H/2]; bf16: bf16 [Npool, H]
    x_sf_ptr,         # int32 [Npool, H/ACT_GROUP/4] packed UE8M0 (None for bf16)
    pair_rows_ptr,    # int32 [P]: pool row of each pair
    pair_w_ptr,       # float32 [P]: top-k weight of each pair
    offsets_ptr,      # int32 [E_local + 1]
    tile_expert_ptr,  # int32 [max_tiles]
    tile_row_ptr,     # int32 [max_tiles]
    num_tiles_ptr,    # int32 [1]
    w_ptr,            # mxfp4: int8 [E_local, 2I, H/2]; fp8: float8_e4m3fn [E_local, 2I, H]; bf16 [E_local, 2I, H]
    w_sf_ptr,         # mxfp4: uint8 [E_local, 2I, H/32]; fp8: float32 [E_local, 2I/128, H/128]; bf16: None
                      # (W_KIND "mxfp4": the uint8 offset index per 32-group instead of the scale)
    w_row_ptr,        # float32 [E_local, 2I] row factors (W_KIND "mxfp4" / "fp8_rebased"; else None)
    tab_ptr,          # int64 [64] E2M1 -> E4M3 tables (FP8 mainloop with MXFP4 weights or FP4 acts)
    h_ptr,            # fp8: int8 [P, I]; fp4: int8 [P, I/2]; bf16: int16 [P, I] (bf16 bits)
    h_sf_ptr,         # uint8 [P, I/32] (= int32 [P, I/128] packed); None for bf16
    max_tiles,        # rows of the tile map (bounds the device count)
    clamp,            # float32 SwiGLU clamp C (unused unless HAS_CLAMP)
    HIDDEN: tl.constexpr, INTER: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, ACT_FORMAT: tl.constexpr, ACT_GROUP: tl.constexpr,
    HAS_CLAMP: tl.constexpr, USE_DOT_SCALED: tl.constexpr, DOT_IN_F32: tl.constexpr,
    W_KIND: tl.constexpr, SF_WORDS_P2: tl.constexpr, PROMOTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP4_DECODER: tl.constexpr, ACT_REBASED: tl.constexpr, WARPS: tl.constexpr, FP4_TABLE: tl.constexpr,
    PDL: tl.constexpr = False, OVER_M: tl.constexpr = 0, OVER_LIMIT: tl.constexpr = 0,
    EPI_CVT: tl.constexpr = False,
):
    """Work item: BLOCK_M pairs of one expert x BLOCK_N columns of gate AND of up -> h
    (`_l1_item`; OVER_M / OVER_LIMIT: an expert's last full tile also computes up to OVER_M rows
    of its remainder, `TilePlan.over`; EPI_CVT: the epilogue rounds by the hardware's conversions,
    `EPILOGUE_HW_CVT`).

    ACT_REBASED (with W_KIND != "raw"): x_ptr is the rebased E4M3 pool [Npool, H] and x_sf_ptr the
    int32 row exponents [Npool] (`rebase.rebase_act_rows`): the streamed FP8 mainloop
    (`_fp8_mainloop`).

    W_KIND != "raw" (Hopper, FP8/MXFP4 weights x FP8/FP4 acts): the FP8 mainloop — rebased E4M3
    operands, plain `tl.dot` accumulation, the weight rows' and x rows' power-of-two factors
    applied once in the epilogue ("fp8_block": non-power-of-two block scales multiply each
    128-K partial product instead).

    Persistent: program p handles work items p, p + num_programs, ... below num_tiles * I / BLOCK_N.

    Worked example (HIDDEN 256, INTER 128, BLOCK_M 16, BLOCK_N 64, GROUP_M 8, fp8 x and h; the
    tile map of the module docstring, num_tiles = 4, so 4 x 2 = 8 work items; 4 programs):
      program 1 takes items 1 and 5 = tile 1 (expert 2, pair rows [3, 19)) x N blocks 0 and 1.
      Item 5 stacks w13[2] rows 64..127 (gate) and 192..255 (up) into one [128, 128] operand per
      K step, two steps over K = 256, accumulating the transposed [128, 16] tile; the epilogue
      rounds to bf16, transposes to [16, 128], splits gate / up [16, 64], clamps, forms
      h = silu(gate) * up * pair_weight and quantises each row's two groups of 32 columns: a group
      with amax 3.0 gets e = 120 (scale 2**-7), its values times 128 round to E4M3 (3.0 -> 384 =
      0x7C). It writes h columns 64..127 of rows 3..18 and bytes 2, 3 of each row's first scale
      word (groups 2, 3); item 1 writes bytes 0, 1.
    """
    if PDL:     # programmatic dependent launch (`sync.pdl_enter`)
        pdl_enter()
    NUM_N: tl.constexpr = INTER // BLOCK_N
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    # NOTE: the count comes from the device; clamp it so a bad value never reads past the map.
    num_tiles = tl.minimum(tl.load(num_tiles_ptr), max_tiles)
    total = num_tiles * NUM_N
    # Persistent loop over (tile, N block) work items: a grid of a few CTAs per SM serves any
    # count, so a map sized for the worst case costs no empty CTAs at decode sizes. An item's
    # metadata (tile -> expert -> its row end) is loaded one and two items ahead (`_prefetch_item`).
    expert, row_start, pid_n = _prefetch_item(pid, total, num_tiles, tile_expert_ptr, tile_row_ptr, NUM_N, GROUP_M)
    row_end = tl.load(offsets_ptr + expert + 1)
    n_expert, n_row_start, n_pid_n = _prefetch_item(pid + nprog, total, num_tiles, tile_expert_ptr, tile_row_ptr,
                                                    NUM_N, GROUP_M)
    for work in range(pid, total, nprog):
        n_row_end = tl.load(offsets_ptr + n_expert + 1)
        nn_expert, nn_row_start, nn_pid_n = _prefetch_item(work + 2 * nprog, total, num_tiles, tile_expert_ptr,
                                                           tile_row_ptr, NUM_N, GROUP_M)
        _l1_item(x_ptr, x_sf_ptr, pair_rows_ptr, pair_w_ptr, w_ptr, w_sf_ptr, w_row_ptr, tab_ptr, h_ptr, h_sf_ptr,
                 clamp, expert, row_start, row_end, pid_n, HIDDEN, INTER, WEIGHT_FORMAT, ACT_FORMAT, ACT_GROUP,
                 HAS_CLAMP, USE_DOT_SCALED, DOT_IN_F32, W_KIND, SF_WORDS_P2, PROMOTE, BLOCK_M, BLOCK_N, BLOCK_K,
                 FP4_DECODER, ACT_REBASED, WARPS, FP4_TABLE, OVER_M, OVER_LIMIT, EPI_CVT)
        expert, row_start, row_end, pid_n = n_expert, n_row_start, n_row_end, n_pid_n
        n_expert, n_row_start, n_pid_n = nn_expert, nn_row_start, nn_pid_n


# =================================================================================================
# Host side
# =================================================================================================
def build_tile_map(expert_offsets: torch.Tensor, block_m: int, max_tiles: int,
                   out_tile_expert: torch.Tensor, out_tile_row_start: torch.Tensor,
                   out_num_tiles: torch.Tensor, *, tail_block_m: Optional[int] = None, tail_max: int = 0,
                   tail_out: Optional[tuple] = None, over: int = 0) -> None:
    """Cut each local expert's pair segment into tiles of `block_m` positions (device ops only).

    Args:
        expert_offsets: int32/int64 [E_local + 1] non-decreasing prefix sums, offsets[0] = 0.
        block_m: tile height (the kernels' BLOCK_M).
        max_tiles: rows of the outputs, >= `max_tiles(max_pairs, E_local, block_m)`.
        out_tile_expert: int32 [max_tiles]: local expert of tile t, -1 for t >= num_tiles.
        out_tile_row_start: int32 [max_tiles]: position of tile t's first pair, 0 for t >= num_tiles.
        out_num_tiles: int32 [1]: sum_e ceil(n_e / block_m) (with a tail: the main map's count),
            clamped to max_tiles.
        tail_block_m, tail_max, tail_out: a two-height plan (`gemm_heuristics.TilePlan`): an
            expert's remainder r = n_e % block_m with 0 < r <= tail_max goes to ceil(r /
            tail_block_m) tiles of `tail_block_m` positions in a second map, tail_out = (tile_expert,
            tile_row_start, num_tiles) with its own capacity (len(tile_expert)); the main map then
            holds n_e // block_m tiles of that expert. tail_max 0 (default): one map.
        over: rows past block_m that an expert's last full tile computes (`TilePlan.over`, the
            kernels' OVER_M): of a remainder r <= max(over, tail_max) it takes min(r, over) rows
            and only the rest is tiled (`gemm_heuristics.split_counts`). 0 (default): none.

    Tiles are in expert order; within an expert, in row order. No host synchronisation (the
    counts are read by torch ops on the device; temporaries come from the caching allocator, so
    the call is CUDA-graph capturable).

    Example: offsets [0, 3, 3, 40], block_m 16, max_tiles 6 -> tile_expert [0, 2, 2, 2, -1, -1],
    tile_row_start [0, 3, 19, 35, 0, 0], num_tiles [4]. Two heights: offsets [0, 150], block_m
    128, tail_block_m 16, tail_max 32 -> main map [0] / [0] / [1], tail map [0, 0] / [128, 144] / [2];
    with over 16: the same main map (its tile computes rows 0-143), tail map [0] / [144] / [1].
    """
    if not isinstance(expert_offsets, torch.Tensor) or expert_offsets.dim() != 1 or expert_offsets.numel() < 2:
        raise ValueError("expert_offsets: expected a 1-D tensor [E_local + 1] with E_local >= 1")
    if expert_offsets.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_offsets: expected int32 or int64, got {expert_offsets.dtype}")
    if isinstance(block_m, bool) or not isinstance(block_m, int) or block_m < 1:
        raise ValueError(f"block_m: expected a positive int, got {block_m!r}")
    if isinstance(max_tiles, bool) or not isinstance(max_tiles, int) or max_tiles < 0:
        raise ValueError(f"max_tiles: expected an int >= 0, got {max_tiles!r}")
    if isinstance(tail_max, bool) or not isinstance(tail_max, int) or not 0 <= tail_max < block_m:
        raise ValueError(f"tail_max: expected an int in [0, block_m = {block_m}), got {tail_max!r}")
    if tail_max:
        if isinstance(tail_block_m, bool) or not isinstance(tail_block_m, int) or not 1 <= tail_block_m <= block_m:
            raise ValueError(f"tail_block_m: expected an int in [1, block_m = {block_m}], got {tail_block_m!r}")
        if not isinstance(tail_out, tuple) or len(tail_out) != 3 or not isinstance(tail_out[0], torch.Tensor):
            raise ValueError("tail_out: expected (tile_expert, tile_row_start, num_tiles) tensors for tail_max > 0")
    if isinstance(over, bool) or not isinstance(over, int) or not 0 <= over < block_m:
        raise ValueError(f"over: expected an int in [0, block_m = {block_m}), got {over!r}")
    maps = [(max_tiles, (out_tile_expert, out_tile_row_start, out_num_tiles), "out_")]
    if tail_max:
        maps.append((tail_out[0].numel(), tail_out, "tail_out "))
    for n, arrays, prefix in maps:
        for t, name, rows in zip(arrays, ("tile_expert", "tile_row_start", "num_tiles"), (n, n, 1)):
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (rows,):
                raise ValueError(f"{prefix}{name}: expected int32 [{rows}], got "
                                 f"{(t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.device != expert_offsets.device:
                raise ValueError(f"{prefix}{name}: expected device {expert_offsets.device}, got {t.device}")
    off = expert_offsets.to(torch.int64)
    counts = (off[1:] - off[:-1]).clamp_min(0)
    full, r = counts // block_m, counts % block_m
    ov = torch.where((full > 0) & (r <= max(over, tail_max)), r.clamp_max(over), 0) if over else torch.zeros_like(r)
    r = r - ov
    use_tail = (r > 0) & (r <= tail_max)
    main = full + ((r > 0) & ~use_tail).to(torch.int64)
    _fill_tile_map(off[:-1], main, block_m, max_tiles, out_tile_expert, out_tile_row_start, out_num_tiles)
    if tail_max:
        tail = torch.where(use_tail, (r + tail_block_m - 1) // tail_block_m, 0)
        _fill_tile_map(off[:-1] + full * block_m + ov, tail, tail_block_m, tail_out[0].numel(), *tail_out)


def _fill_tile_map(base, tiles, block_m, max_tiles, out_te, out_trs, out_nt) -> None:
    """Tile t of expert e (tiles [E], in order) starts at base[e] + j block_m, j its index there."""
    num_experts = tiles.numel()
    ends = torch.cumsum(tiles, 0)                                             # inclusive
    t = torch.arange(max_tiles, device=tiles.device, dtype=torch.int64)
    expert = torch.searchsorted(ends, t, right=True)                          # first e with ends[e] > t
    valid = expert < num_experts
    e_c = expert.clamp_max(num_experts - 1)
    row_start = base[e_c] + (t - (ends - tiles)[e_c]) * block_m
    out_te.copy_(torch.where(valid, e_c, -1))
    out_trs.copy_(torch.where(valid, row_start, 0))
    out_nt.copy_(ends[-1:].clamp_max(max_tiles))


def _is_interpreted(kernel) -> bool:
    return not isinstance(kernel, triton.runtime.jit.JITFunction)


@functools.lru_cache(maxsize=None)
def _device_arch(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@functools.lru_cache(maxsize=None)
def _device_num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _check_tensor(t, name: str, dtype, shape, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    if t.dtype not in dtypes:
        raise TypeError(f"{name}: expected dtype {' or '.join(map(str, dtypes))}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor")


def _check_launch_device(device: torch.device, kernel) -> None:
    if device.type == "cuda":
        return
    if device.type == "cpu" and _is_interpreted(kernel):
        return
    raise ValueError(f"tensors on {device}: expected CUDA tensors (CPU tensors only run in Triton's "
                     "interpreter, TRITON_INTERPRET=1 set before the package is imported)")


def _check_tile_map(expert_offsets, tile_expert, tile_row_start, num_tiles, num_experts, device,
                    num_pairs, block_m):
    """Validate the tile map; returns (rows of the map, block_m) with block_m inferred if None."""
    _check_tensor(expert_offsets, "expert_offsets", torch.int32, (num_experts + 1,), device)
    _check_tensor(tile_expert, "tile_expert", torch.int32, None, device)
    if tile_expert.dim() != 1:
        raise ValueError(f"tile_expert: expected a 1-D tensor [max_tiles], got {list(tile_expert.shape)}")
    n_tiles = tile_expert.shape[0]
    _check_tensor(tile_row_start, "tile_row_start", torch.int32, (n_tiles,), device)
    _check_tensor(num_tiles, "num_tiles", torch.int32, (1,), device)
    if block_m is None:
        # NOTE: the map's length identifies the block_m it was sized for when exactly one tile
        # height gives max_tiles(P, E_local, bm) == len(map); otherwise the caller must say.
        fits = [bm for bm in GEMM_BLOCK_MS if max_tiles(num_pairs, num_experts, bm) == n_tiles]
        if len(fits) != 1:
            raise ValueError(f"block_m: cannot infer the tile height from a map of {n_tiles} tiles for "
                             f"P={num_pairs}, E_local={num_experts} (candidates {fits}); pass block_m=")
        block_m = fits[0]
    if block_m not in GEMM_BLOCK_MS:
        raise ValueError(f"block_m: expected one of {GEMM_BLOCK_MS}, got {block_m!r}")
    need = max_tiles(num_pairs, num_experts, block_m)
    if n_tiles < need:
        raise ValueError(f"tile_expert: {n_tiles} tiles < max_tiles({num_pairs}, {num_experts}, {block_m}) = "
                         f"{need}; build the tile map with the kernels' block_m")
    return n_tiles, block_m


def _weight_shapes(weight_format: str, num_experts: int, n: int, k: int):
    """(data dtype, data shape, scale dtype, scale shape) of a [E, N, K] weight (formats.py)."""
    if weight_format == "mxfp4":
        return torch.int8, (num_experts, n, k // 2), torch.uint8, (num_experts, n, k // 32)
    if weight_format == "fp8":
        return torch.float8_e4m3fn, (num_experts, n, k), torch.float32, (num_experts, n // 128, k // 128)
    if weight_format == "bf16":
        return torch.bfloat16, (num_experts, n, k), None, None
    raise ValueError(f"weight_format: expected 'mxfp4', 'fp8' or 'bf16', got {weight_format!r}")


def _act_shapes(act_format: str, rows: int, k: int, group: int):
    """(data dtype, data shape, scale shape or None) of quantised activations [rows, K]."""
    if act_format == "fp8":
        return torch.float8_e4m3fn, (rows, k), (rows, k // group // 4)
    if act_format == "fp4":
        return torch.int8, (rows, k // 2), (rows, k // group // 4)
    if act_format == "bf16":
        return torch.bfloat16, (rows, k), None
    raise ValueError(f"act_format: expected 'fp8', 'fp4' or 'bf16', got {act_format!r}")


def _call_args(*args, **kwargs):
    return args, kwargs


def _resident_grid(kernel, grid, num_sms: int, device, args, kwargs):
    """The persistent grid capped at the CTAs that fit on the SMs at once
    (`gemm_heuristics.resident_ctas` of the compiled kernel's registers and shared memory): the
    config's ctas_per_sm assumes register counts that another Triton version or kernel variant
    may exceed, and CTAs beyond what is resident wait for a whole earlier CTA (a second, partial
    wave of a persistent grid). E.g. Triton 3.6 (ptxas -v, sm_90a) gave an L1 variant with a second
    item body 205 registers: 2 CTAs of 4 warps fit, not the 3 its config asked for. Compiles the
    kernel now (its first launch would). The interpreter, or a Triton without these fields,
    keeps the grid."""
    if device.type != "cuda" or _is_interpreted(kernel):
        return grid
    try:
        with torch.cuda.device(device):
            compiled = kernel.warmup(*args, grid=grid, **kwargs)
            compiled._init_handles()
            n_regs, shared, warps = compiled.n_regs, compiled.metadata.shared, compiled.metadata.num_warps
            props = torch.cuda.get_device_properties(device)
    except (AttributeError, TypeError):
        return grid
    per_sm = resident_ctas(n_regs, warps, shared, getattr(props, "regs_per_multiprocessor", 65536),
                           getattr(props, "shared_memory_per_multiprocessor", 233472),
                           getattr(props, "max_threads_per_multi_processor", 2048))
    return (max(1, min(grid[0], num_sms * per_sm)),)


def _launch_or_bind(kernel, grid, device, bind: bool, args, kwargs) -> Optional[Launcher]:
    """Launch now, or (bind=True) return a `Launcher` with everything bound: the caller relaunches
    it with no validation and little Python work (its tensors must keep their storage)."""
    if bind:
        return Launcher(kernel, grid, args, kwargs)
    with torch.cuda.device(device) if device.type == "cuda" else _nullcontext():
        kernel[grid](*args, **kwargs)
    return None


def sf_words_p2(k: int, group: int) -> int:
    """The next power of two >= the packed scale words of a row of K columns (>= 1)."""
    return triton.next_power_of_2(max(1, k // group // 4))


#: Round the GEMM epilogues' bf16 values (DESIGN steps 2 and 6) and E4M3 codes (h, the FP8 combine)
#: with the GPU's RNE conversions (`cvt.rn.bf16x2.f32`, `cvt.rn.satfinite.e4m3x2.f32`: two values an
#: instruction) instead of the integer encoders the interpreter needs (~4 and ~15 instructions a
#: value): the same bytes for finite values (|q| <= 448 before E4M3), in the Triton L1 / L2 and the
#: Gluon ones alike (`EPI_CVT`). sm_90a SASS, Triton 3.6: the Gluon L1's item loop at 128 + 16 rows
#: 3698 -> 2302 instructions (its K-step loop 239 of them, 56 steps an item: -8% of the MMA
#: warpgroup's instructions at prefill); the Triton L2's at 128 rows 1008 -> 816 (-4%). On: measured on
#: an H100 (docs/PERF.md, thirteenth session): the layer at T = 4096 5641.5 -> 5462.7 us (-3.2%), FP8
#: weights 5703.6 -> 5656.8 (T = 4096) and 3740.4 -> 3663.3 (T = 128); the same bytes
#: (`test_gemm_gpu.py::test_epilogue_hw_cvt_same_bytes`). `scripts/bench.py --no-epilogue-hw-cvt` turns it off.
EPILOGUE_HW_CVT = True


def epilogue_cvt(kernel) -> dict:
    """The launch keywords of `EPILOGUE_HW_CVT` for `kernel` (none in the interpreter or when off,
    so that the default launch is the build the layer always ran)."""
    return dict(EPI_CVT=True) if EPILOGUE_HW_CVT and not _is_interpreted(kernel) else {}


def fp4_table(operand: Optional[WeightOperand], interpreted: bool) -> str:
    """FP4_TABLE of a launch (`_fp4_frag_e4m3`): "int" in the interpreter; "imad" (two IMAD per
    table, exact while every entry is normal) unless the operand has groups more than 11 below
    their row's largest scale that hold a nonzero value (`WeightOperand.far_groups`), which take
    the f16x2 tables, exact at every offset ("f16"; docs/PERF.md: 1.2x slower at decode). "_lane"
    appended for an operand in the "lane" K order (`WeightOperand.lane`)."""
    if interpreted:
        base = "int"
    else:
        base = "f16" if operand is not None and operand.far_groups else "imad"
    return base + "_lane" if operand is not None and operand.lane else base


def _check_block_k(config: GroupedGemmConfig, w_kind: str, streamed: bool, k: int, rows: int) -> None:
    """block_k 128, or 256 / 512 for 4-bit MXFP4 on the streamed mainloop (K a multiple of it); the
    register-operand layout of `_frag_rows` needs 16 x num_warps to divide the weight rows."""
    if config.block_k not in (128, 256, 512):
        raise ValueError(f"config: block_k must be 128 (or 256 / 512, see gemm_heuristics), got {config.block_k}")
    if config.block_k > 128 and not (w_kind == "mxfp4" and streamed and k % config.block_k == 0):
        raise ValueError(f"config: block_k {config.block_k} needs 4-bit MXFP4 weights on the streamed FP8 mainloop "
                         f"and K (= {k}) a multiple of {config.block_k}, got weight kind {w_kind!r}"
                         f"{'' if streamed else ' without rebased activations'}")
    if w_kind == "mxfp4" and rows % (16 * config.num_warps) != 0:
        raise ValueError(f"config: {rows} weight rows per program must be a multiple of 16 x num_warps "
                         f"(= {16 * config.num_warps}) for MXFP4 fragment words")


def chained_fp4_hazards() -> bool:
    """Whether this Triton compiles the 4-bit register-operand loop with K steps chained into code
    that rewrites registers of a running wgmma: Triton 3.6 does (12 to 28 places in L1's sm_90a PTX
    with promote_steps 2, `_compile.wgmma_register_hazards`), 3.9 does not; 3.7 and 3.8 unchecked,
    counted with 3.6."""
    import re
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return m is None or (int(m.group(1)), int(m.group(2))) < (3, 9)


def _check_promote(config: GroupedGemmConfig, w_kind: str, k: int, device: torch.device) -> None:
    """On the GPU, with a Triton that miscompiles it (`chained_fp4_hazards`), 4-bit MXFP4 words
    decoded into the MMA's register operand promote after every K step: chained K steps would sum
    wrongly without an error. The interpreter has no such registers and runs any promotion."""
    if w_kind == "mxfp4" and device.type == "cuda" and config.promote_for(k) > 1 and chained_fp4_hazards():
        raise ValueError(f"config: 4-bit MXFP4 weights on the GPU promote after every K step (promote_steps 1): "
                         f"chaining {config.promote_for(k)} steps leaves wgmma register hazards, got promote_steps "
                         f"{config.promote_steps}")


def _check_over(over_m, over_limit, block_m: int, streamed: bool, w_kind: str) -> None:
    """over_m / over_limit of a launch (`TilePlan.over` / `over_limit`): 0 / 0, or over_m 16 or 32
    with over_m <= over_limit < block_m, on the streamed FP8 mainloop only."""
    for v, name in ((over_m, "over_m"), (over_limit, "over_limit")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if over_m == 0:
        if over_limit != 0:
            raise ValueError(f"over_limit: expected 0 with over_m 0, got {over_limit}")
        return
    if over_m not in (16, 32) or not over_m <= over_limit < block_m:
        raise ValueError(f"over_m / over_limit: expected over_m 16 or 32 and over_m <= over_limit < block_m "
                         f"(= {block_m}), got {over_m} / {over_limit}")
    if not streamed or w_kind == "raw":
        raise ValueError("over_m: rows past block_m need the streamed FP8 mainloop (rebased activations and an "
                         f"FP8-mainloop weight operand), got weight kind {w_kind!r}"
                         f"{'' if streamed else ' without rebased activations'}")


def _fp4_decoder(operand: Optional[WeightOperand], config: GroupedGemmConfig) -> str:
    """FP4_DECODER of a launch: the config's choice."""
    return config.fp4_decoder


def _weight_launch_args(name: str, operand: Optional[WeightOperand], weight_format: str, act_format: str,
                        arch: int, data: torch.Tensor, scale: Optional[torch.Tensor], shape, device):
    """(W_KIND, data, aux, row factors, table) the kernels get for a weight."""
    if not uses_fp8_mma(arch, weight_format, act_format):
        if data is None:
            raise ValueError(f"{name}: the weight's data is needed on sm_{arch} (no FP8 mainloop for "
                             f"{weight_format} x {act_format} there), got data None")
        return "raw", data, scale, None, None
    if operand is None or operand.kind == "raw":           # the bf16 mainloop
        if operand is not None and operand.data is not data:
            raise ValueError(f"{name}: a raw operand must wrap the weight passed as data")
        return "raw", data, scale, None, None
    if not isinstance(operand, WeightOperand) or operand.format != weight_format or \
            tuple(operand.shape) != tuple(shape) or operand.data.device != device or not operand.is_fp8_mma:
        raise ValueError(f"{name}: expected the FP8-mainloop operand of a {weight_format} weight "
                         f"{list(shape)} on {device} (gemm_operands.prepare_weight_operand with arch={arch})")
    tab = operand.table if operand.table is not None else (e2m1_table(device) if act_format == "fp4" else None)
    return operand.kind, operand.data, operand.aux, operand.row_factor, tab


def _check_operand_only(name: str, operand, scale) -> None:
    """{name}_data None: only an FP8-mainloop operand (which holds all the kernel reads) allows it."""
    if operand is None or not getattr(operand, "is_fp8_mma", False):
        raise ValueError(f"{name}_data: None needs an FP8-mainloop {name}_operand "
                         f"(gemm_operands.prepare_weight_operand), got "
                         f"{'none' if operand is None else repr(getattr(operand, 'kind', operand))}")
    if scale is not None:
        raise ValueError(f"{name}_scale: expected None with {name}_data None")


def _check_lane(name: str, operand: Optional[WeightOperand], streamed: bool) -> None:
    """A "lane" K-order operand (`WeightOperand.lane`) multiplies act rows stored in that order:
    only the rebased rows of the streamed mainloop are (their writers permute them); the
    in-kernel rebase of the other path reads rows in column order."""
    if operand is not None and getattr(operand, "lane", False) and not streamed:
        raise ValueError(f"{name}: an operand in the lane K order (prepare_weight_operand(lane_k=True)) needs the "
                         "rebased activations of the streamed FP8 mainloop, written in that order "
                         "(rebase_act_rows(lane_k=True)); got none")


def _kernel_weight_format(w_kind: str, weight_format: str) -> str:
    """WEIGHT_FORMAT the kernels get: the layout of the bytes they read. An "fp8_rebased" operand
    holds E4M3 bytes [E, N, K] whatever the weight's format (MXFP4 expanded at load time)."""
    return "fp8" if w_kind in ("fp8_rebased", "fp8_block") else weight_format


def _check_rebased(name: str, pair, rows: int, k: int, act_format: str, operand, device) -> None:
    """Validate a (rebased E4M3 rows, int32 row exponents) pair for the streamed FP8 mainloop."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ValueError(f"{name}: expected (float8_e4m3fn [{rows}, {k}], int32 [{rows}]), got {type(pair).__name__}")
    if act_format not in ("fp8", "fp4"):
        raise ValueError(f"{name}: rebased activations need act_format 'fp8' or 'fp4', got {act_format!r}")
    if operand is None or not getattr(operand, "is_fp8_mma", False):
        raise ValueError(f"{name}: the streamed FP8 mainloop needs an FP8-mainloop weight operand "
                         f"(gemm_operands.prepare_weight_operand), got "
                         f"{'none' if operand is None else repr(operand.kind)}")
    _check_tensor(pair[0], f"{name}[0]", torch.float8_e4m3fn, (rows, k), device)
    _check_tensor(pair[1], f"{name}[1]", torch.int32, (rows,), device)


def l1_grouped_gemm(pool_x: torch.Tensor, pool_x_sf: Optional[torch.Tensor], pair_rows: torch.Tensor,
                    pair_weights: torch.Tensor, expert_offsets: torch.Tensor, tile_expert: torch.Tensor,
                    tile_row_start: torch.Tensor, num_tiles: torch.Tensor, w13_data: torch.Tensor,
                    w13_scale: Optional[torch.Tensor], h_out: torch.Tensor, h_sf_out: Optional[torch.Tensor], *,
                    weight_format: str, act_format: str, act_group_size: int,
                    activation_clamp: Optional[float], block_m: Optional[int] = None,
                    config: Optional[GroupedGemmConfig] = None, arch: Optional[int] = None,
                    num_sms: Optional[int] = None, w13_operand: Optional[WeightOperand] = None,
                    x_rebased: Optional[tuple] = None, over_m: int = 0, over_limit: int = 0,
                    bind: bool = False, x_pairs: Optional[torch.Tensor] = None) -> Optional[Launcher]:
    """L1 of the routed pairs: h = requant(silu(gate) * up * weight), gate/up = x . w13[e]^T.

    Args (P = pairs capacity, H = hidden, I = intermediate, g = act_group_size):
        pool_x: receive pool [Npool, H] float8_e4m3fn (fp8) | int8 [Npool, H/2] packed E2M1 (fp4)
            | bfloat16 [Npool, H] (bf16).
        pool_x_sf: int32 [Npool, H/g/4] packed UE8M0 (byte j of word i = group 4i + j); None for bf16.
        pair_rows: int32 [P] pool row of each pair (pairs sorted by local expert).
        pair_weights: float32 [P] top-k weight of each pair.
        expert_offsets: int32 [E_local + 1] prefix sums: pairs of expert e are [off[e], off[e+1]).
        tile_expert, tile_row_start: int32 [max_tiles]; num_tiles: int32 [1] (`build_tile_map`
            with this `block_m`).
        w13_data / w13_scale: local experts [E_local, 2I, H] (gate rows then up rows):
            mxfp4 int8 [E_local, 2I, H/2] + uint8 [E_local, 2I, H/32];
            fp8 float8_e4m3fn [E_local, 2I, H] + float32 [E_local, 2I/128, H/128];
            bf16 bfloat16 [E_local, 2I, H] + None.
        h_out: written rows [off[0], off[E_local]): float8_e4m3fn [P, I] (act fp8) | int8 [P, I/2]
            (act fp4) | bfloat16 [P, I] (act bf16); row p is pair p.
        h_sf_out: int32 [P, I/128] packed UE8M0 of h per 32 columns; None for bf16.
        weight_format: "mxfp4" | "fp8" | "bf16"; act_format: "fp8" | "fp4" | "bf16" (x and h).
        act_group_size: g, 32 or 128 (scale granularity of x; h always uses 32).
        activation_clamp: SwiGLU clamp C or None.
        block_m: tile height the tile map was built with (`gemm_heuristics.gemm_block_m`); None
            infers it from len(tile_expert) == max_tiles(P, E_local, block_m) when that is unique
            (ValueError otherwise).
        config: explicit tiles (block_m must match); default `gemm_heuristics.l1_gemm_config`.
        arch: compute capability as 90 / 100 (default: the tensors' device).
        num_sms: SMs the persistent grid covers (default: the device's; 4 in the interpreter).
        w13_operand: the weight as the kernel reads it (`gemm_operands.prepare_weight_operand` of
            w13_data / w13_scale, prepared once at load time). An FP8-mainloop operand selects the
            FP8 mainloop (Hopper, FP8 / MXFP4 weights, FP8 / FP4 acts): streamed with x_rebased
            (what the layer runs: 2-3x faster than the bf16 mainloop, docs/PERF.md), else on
            operands rebased in registers (slower than the bf16 mainloop); None or a "raw"
            operand the bf16 mainloop. With an FP8-mainloop operand w13_data / w13_scale may be
            None (the operand holds everything the kernel reads).
        x_rebased: (float8_e4m3fn [Npool, H], int32 [Npool]): the pool's rows rebased to one
            exponent each (`rebase.rebase_act_rows` of pool_x / pool_x_sf, for at least the rows
            the pairs use), which the kernel then reads instead of pool_x / pool_x_sf: the
            streamed FP8 mainloop. Needs an FP8-mainloop w13_operand.
        over_m, over_limit: the tile plan's rows past block_m (`gemm_heuristics.TilePlan.over` /
            `over_limit`, `build_tile_map(over=)`): a tile with block_m < (its expert's row end - its
            first row) <= block_m + over_limit also computes the next min(over_m, ...) rows, as a
            second MMA on each K step's weight tile. Streamed FP8 mainloop only; 0 / 0: none.
        x_pairs: optional float8_e4m3fn [P, H]: x_rebased's rows in pair order (row p = the row of
            pair p, for the pairs below the count: `rebase.order_pair_rows`). Where the Gluon
            kernel takes a 128-row launch (`l1_gluon`), it loads each tile's token rows from here
            as one TMA box instead of gathering them; elsewhere it is not read. The same values
            either way, so h is the same. Needs x_rebased.
        bind: validate, then return a `_launch.Launcher` with every argument bound instead of
            launching (None when there is nothing to launch: no pairs capacity); calling it
            relaunches the kernel with no checks and little host work (the GPU forward binds
            one per tile height).

    Hopper with FP8 / MXFP4 weights and FP8 / FP4 activations: the FP8 mainloop on rebased
    operands (`reference.rebase_weight` / `rebase_act`): the result differs from the DESIGN's
    exact dequantisation only where rebasing rounds (values far below their row's largest group
    scale, by at most 2**-10 of that scale), plus accumulation order.

    Numerics: DESIGN steps 2-5: float32 accumulation of exact bf16 operands (FP8 weights: per-128-K
    partial products times the float32 block scale), gate/up rounded to bf16 (RNE), clamp,
    h = silu(gate) * up * weight in float32, quantised per 32 with the UE8M0 rule (bitwise the
    reference's quantiser given the same float32 h).

    No allocation, no host synchronisation (the pair count lives on the device): a static
    persistent grid (a few CTAs per SM, never more than max_tiles * I / block_n) whose programs
    loop over the (tile, N block) items below the device count. Rows of h beyond the pairs are
    untouched. CPU tensors run in Triton's interpreter (tests) when TRITON_INTERPRET=1 was set at
    import.
    """
    if weight_format not in ("mxfp4", "fp8", "bf16"):
        raise ValueError(f"weight_format: expected 'mxfp4', 'fp8' or 'bf16', got {weight_format!r}")
    if act_format not in ("fp8", "fp4", "bf16"):
        raise ValueError(f"act_format: expected 'fp8', 'fp4' or 'bf16', got {act_format!r}")
    if act_group_size not in (32, 128):
        raise ValueError(f"act_group_size: expected 32 or 128, got {act_group_size!r}")
    if activation_clamp is not None and not (isinstance(activation_clamp, (int, float)) and activation_clamp > 0):
        raise ValueError(f"activation_clamp: expected a positive float or None, got {activation_clamp!r}")
    if w13_data is None:
        # The FP8 mainloop reads only its operand: the loaded weight need not be on the device.
        _check_operand_only("w13", w13_operand, w13_scale)
    elif not isinstance(w13_data, torch.Tensor) or w13_data.dim() != 3:
        raise ValueError("w13_data: expected a 3-D tensor [E_local, 2I, H (or H/2)]")
    if not isinstance(pool_x, torch.Tensor) or pool_x.dim() != 2:
        raise ValueError("pool_x: expected a 2-D tensor [Npool, H (or H/2)]")
    device = pool_x.device
    num_experts, two_i = (w13_data if w13_data is not None else w13_operand).shape[:2]
    hidden = pool_x.shape[1] * (2 if act_format == "fp4" else 1)
    inter = two_i // 2
    if two_i % 2 != 0 or inter % 128 != 0 or hidden % 128 != 0 or hidden % (4 * act_group_size) != 0:
        raise ValueError(f"shapes: expected I (= {two_i}/2) and H (= {hidden}) multiples of 128 and H a "
                         f"multiple of 4 * act_group_size")
    wd, wshape, sd, sshape = _weight_shapes(weight_format, num_experts, two_i, hidden)
    if w13_data is not None:
        _check_tensor(w13_data, "w13_data", wd, wshape, device)
        if sd is None:
            if w13_scale is not None:
                raise ValueError("w13_scale: expected None for bf16 weights")
        else:
            _check_tensor(w13_scale, "w13_scale", sd, sshape, device)
    npool = pool_x.shape[0]
    xd, xshape, xsshape = _act_shapes(act_format, npool, hidden, act_group_size)
    _check_tensor(pool_x, "pool_x", xd, xshape, device)
    if xsshape is None:
        if pool_x_sf is not None:
            raise ValueError("pool_x_sf: expected None for bf16 activations")
    else:
        _check_tensor(pool_x_sf, "pool_x_sf", torch.int32, xsshape, device)
    if not isinstance(pair_rows, torch.Tensor) or pair_rows.dim() != 1:
        raise ValueError("pair_rows: expected a 1-D int32 tensor [P]")
    num_pairs = pair_rows.shape[0]
    _check_tensor(pair_rows, "pair_rows", torch.int32, (num_pairs,), device)
    _check_tensor(pair_weights, "pair_weights", torch.float32, (num_pairs,), device)
    n_tiles, block_m = _check_tile_map(expert_offsets, tile_expert, tile_row_start, num_tiles, num_experts,
                                       device, num_pairs, block_m)
    hd, hshape, hsshape = _act_shapes(act_format, num_pairs, inter, 32)
    _check_tensor(h_out, "h_out", hd, hshape, device)
    if hsshape is None:
        if h_sf_out is not None:
            raise ValueError("h_sf_out: expected None for bf16 activations")
    else:
        _check_tensor(h_sf_out, "h_sf_out", torch.int32, hsshape, device)

    if arch is None:
        arch = _device_arch(device) if device.type == "cuda" else 90
    if x_rebased is not None:
        _check_rebased("x_rebased", x_rebased, npool, hidden, act_format, w13_operand, device)
    if x_pairs is not None:
        if x_rebased is None:
            raise ValueError("x_pairs: the pair-ordered rows are x_rebased's; pass x_rebased too")
        _check_tensor(x_pairs, "x_pairs", torch.float8_e4m3fn, (pair_rows.numel(), hidden), device)
    if config is None:
        config = l1_gemm_config(block_m, hidden, inter, weight_format, act_format, arch,
                                fp8_mainloop=w13_operand is not None and w13_operand.kind != "raw",
                                act_rebased=x_rebased is not None,
                                weight_kind=None if w13_operand is None else w13_operand.kind)
    if config.block_m != block_m:
        raise ValueError(f"config.block_m = {config.block_m} differs from block_m = {block_m} (the tile map's)")
    if inter % config.block_n != 0 or config.block_n % 32 != 0:
        raise ValueError(f"config: block_n {config.block_n} must divide I = {inter} and be a multiple of 32")
    _check_launch_device(device, _l1_kernel)
    w_kind, w_data, w_aux, w_row, tab = _weight_launch_args(
        "w13_operand", w13_operand, weight_format, act_format, arch, w13_data, w13_scale,
        (num_experts, two_i, hidden), device)
    _check_block_k(config, w_kind, x_rebased is not None, hidden, 2 * config.block_n)
    _check_lane("w13_operand", w13_operand, x_rebased is not None)
    _check_promote(config, w_kind, hidden, device)
    _check_over(over_m, over_limit, block_m, x_rebased is not None, w_kind)
    fp4_decoder = _fp4_decoder(w13_operand, config)
    if num_sms is None:
        num_sms = _device_num_sms(device) if device.type == "cuda" else 4
    grid = (config.grid(n_tiles * (inter // config.block_n), num_sms),)
    if grid[0] == 0 or num_pairs == 0:
        return None
    h_view = h_out.view(torch.int16) if act_format == "bf16" else h_out.view(torch.int8)
    h_sf_view = None if h_sf_out is None else h_sf_out.view(torch.uint8)
    x_src, x_sf_src = (pool_x, pool_x_sf) if x_rebased is None else x_rebased
    from . import l1_gluon
    promote_k = config.block_k * config.promote_for(hidden)
    if l1_gluon.wanted(w_kind, config.block_m) and device.type == "cuda" and l1_gluon.applies(
            w_kind, act_format, x_rebased is not None, config.block_m, over_m, fp4_table(w13_operand, False), arch,
            promote_k):
        # the warp-specialised Gluon kernel (`l1_gluon.wanted`: by default where it measured faster)
        kernel, grid, args, kwargs = l1_gluon.l1_gluon_launch(
            x_src, x_sf_src, pair_rows, pair_weights, expert_offsets, tile_expert, tile_row_start, num_tiles,
            w_kind, w_data, w_aux, w_row, h_out, h_sf_out, hidden=hidden, inter=inter, clamp=activation_clamp,
            block_m=config.block_m, over_m=over_m, over_limit=over_limit, group_m=config.group_m, num_sms=num_sms,
            max_tiles=n_tiles, promote_k=promote_k, x_pairs=x_pairs if config.block_m == 128 else None,
            lane=bool(getattr(w13_operand, "lane", False)))
        return _launch_or_bind(kernel, grid, device, bind, args, kwargs)
    args, kwargs = _call_args(
            x_src, x_sf_src, pair_rows, pair_weights, expert_offsets, tile_expert, tile_row_start,
            num_tiles, w_data, w_aux, w_row, tab, h_view, h_sf_view, n_tiles,
            float(activation_clamp) if activation_clamp is not None else 0.0,
            HIDDEN=hidden, INTER=inter, WEIGHT_FORMAT=_kernel_weight_format(w_kind, weight_format),
            ACT_FORMAT=act_format, ACT_GROUP=act_group_size, HAS_CLAMP=activation_clamp is not None,
            USE_DOT_SCALED=uses_dot_scaled(arch, weight_format, act_format),
            DOT_IN_F32=_is_interpreted(_l1_kernel), W_KIND=w_kind,
            SF_WORDS_P2=sf_words_p2(hidden, act_group_size), PROMOTE=config.promote_for(hidden),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            FP4_DECODER=fp4_decoder, ACT_REBASED=x_rebased is not None, WARPS=config.num_warps,
            FP4_TABLE=fp4_table(w13_operand, _is_interpreted(_l1_kernel)), OVER_M=over_m, OVER_LIMIT=over_limit,
            enable_fp_fusion=False, **epilogue_cvt(_l1_kernel), **config.launch_options(),
        )
    grid = _resident_grid(_l1_kernel, grid, num_sms, device, args, kwargs)
    return _launch_or_bind(_l1_kernel, grid, device, bind, args, kwargs)
