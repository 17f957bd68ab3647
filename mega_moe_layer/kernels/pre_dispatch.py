"""Pre-dispatch: quantise x per group (FP8 E4M3 or packed FP4 E2M1 + packed UE8M0 scales), copy the
top-k ids and weights and pad the unused top-k rows — one kernel launch.

Public entry point: `mega_moe_pre_dispatch` (destination passing: it writes into caller-owned
buffers, allocates nothing, never synchronises with the host, so it can be captured in a CUDA
graph). Bit-exact against `reference.per_token_cast_to_fp8` / `per_token_cast_to_fp4`.

No float division: the scales come from integer operations on the amax bits, and values are scaled
by exact power-of-two multiplies. Rounding to the target format: on a GPU, FP8 uses the hardware
conversion (cvt.rn.satfinite.e4m3x2.f32); FP4 (Hopper has no E2M1 conversion) and, in Triton's CPU
interpreter (which mis-rounds fp8 casts), FP8 too round with one exact float32 addition and a few
integer operations. CPU tensors run the kernel in that interpreter (slow: for tests at small shapes).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional, Union

import torch
import triton
import triton.language as tl

from .heuristics import PRE_DISPATCH_GROUP_SIZES, PreDispatchConfig, next_power_of_2, pre_dispatch_config
from .l1_gemm import _e4m3_code, _e4m3_value

__all__ = ["mega_moe_pre_dispatch"]

# float32 bit patterns of the DESIGN constants (the UE8M0 rule, reference.py).
#: float32(1e-4): the amax floor.
_AMAX_FLOOR_BITS = tl.constexpr(0x38D1B717)
#: 448 = 1.75 * 2**8 (FP8 E4M3 max): unbiased exponent and mantissa field.
_FP8_Q_EXP = tl.constexpr(8)
_FP8_Q_MANT = tl.constexpr(0x600000)
#: 6 = 1.5 * 2**2 (FP4 E2M1 max): unbiased exponent and mantissa field.
_FP4_Q_EXP = tl.constexpr(2)
_FP4_Q_MANT = tl.constexpr(0x400000)

# NOTE: Triton's own `tl.max` cannot run in an interpreter created after `import triton` without
# TRITON_INTERPRET=1 (it is itself a jit function). `tl.reduce` with this combine function is what
# `tl.max` does on the GPU, and the interpreter recognises it and reduces with numpy.
_MAX_COMBINE = tl.standard._elementwise_max


# NOTE: no specialisation on the row counts: one compiled kernel serves every count (no recompiles
# when num_tokens or the buffer size changes, e.g. between a warm-up and a graph capture).
@triton.jit(do_not_specialize=["num_tokens", "max_tokens", "num_topk_rows", "num_topk_programs", "y_addr"])
def _pre_dispatch_kernel(
    x_ptr,            # int32 [max_tokens, HIDDEN/2]: bf16 x, two columns per word (even column low)
    topk_idx_ptr,     # int32 | int64 [max_tokens, TOPK]
    topk_w_ptr,       # int32 [max_tokens, TOPK]: bit patterns of the float32 weights
    out_x_ptr,        # FP8: int16 [>=T, HIDDEN/2] (two e4m3 bytes); FP4: int8 [>=T, HIDDEN/2]
    out_sf_ptr,       # int8 [>=T, HIDDEN/GROUP]: UE8M0 bytes (the bytes of the packed int32 words)
    out_idx_ptr,      # int32 | int64 [num_topk_rows, TOPK]
    out_w_ptr,        # int32 [num_topk_rows, TOPK]: float32 bits
    num_tokens_ptr,   # int32 [1] when NUM_TOKENS_ON_DEVICE, else None
    num_tokens,       # rows to quantise / copy (ignored when NUM_TOKENS_ON_DEVICE)
    max_tokens,       # rows of x and topk inputs: clamp of the on-device count
    num_topk_rows,    # rows of the top-k buffers (copied below num_tokens, padded above)
    num_topk_programs,
    bad_row_ptr,      # int32 [1] when CHECK_IDS: atomic min of the rows holding an id outside [-1, E)
    num_experts,      # E (CHECK_IDS only)
    call_info_ptr,    # int64 [2] when WRITE_CALL_INFO: receives (y_addr, n) for the combine, else None
    y_addr,           # int64 address of this call's output y (WRITE_CALL_INFO only)
    out_e_ptr,        # int32 [>=T] when REBASE: each row's exponent (its largest scale byte), else None
    HIDDEN: tl.constexpr, GROUP: tl.constexpr, TOPK: tl.constexpr, TOPK_PAD: tl.constexpr,
    USE_FP4: tl.constexpr, HW_CVT: tl.constexpr, NUM_TOKENS_ON_DEVICE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, TOPK_BLOCK_ROWS: tl.constexpr,
    CHECK_IDS: tl.constexpr, COPY_BF16: tl.constexpr, WRITE_CALL_INFO: tl.constexpr,
    REBASE: tl.constexpr = False, LANE_K: tl.constexpr = False,
):
    """Programs [0, num_topk_programs) copy/pad top-k rows; the rest quantise x tiles.

    A quantisation program owns BLOCK_M rows x BLOCK_W scale words (each word = 4 groups of GROUP
    columns) as one [BLOCK_M, 4 * BLOCK_W, GROUP/2] tile of bf16 pairs: all of its loads are
    issued before any store (the compiler cannot reorder loads and stores that may alias). The
    scales are stored as bytes: byte j of a packed little-endian word is its group j.

    HW_CVT: round FP8 with the GPU's conversion instruction (False in the interpreter).
    CHECK_IDS: also record in bad_row_ptr the smallest row < n with an id outside [-1, num_experts)
    (the caller initialises it to 2**31 - 1 and reads it once: the layer's validation).
    COPY_BF16: copy the bf16 words of x unchanged into out_x (int32 words) and write no scales
    (the bf16 activation format: the same single launch stages x and the top-k rows).
    WRITE_CALL_INFO: program 0 also stores (y_addr, n) into call_info_ptr: the layer's combine,
    replayed from a CUDA graph, finds this call's output and token count there.
    REBASE (FP8, programs owning whole rows: BLOCK_W * 4 * GROUP >= HIDDEN): out_x receives each
    row rebased to one exponent (`reference.rebase_act` of the quantised row, bitwise: the FP8
    value of every group d = E - e below the row's largest scale byte E is multiplied by 2**-d and
    rounded to E4M3 again) and out_e_ptr[row] = E; no scale bytes are written. The layer's Hopper
    FP8 path stages x this way (`nvshmem_backend.STAGE_REBASE`, on by default), so the grouped
    GEMM reads it as it lands (no rebasing pass).
    LANE_K (REBASE only; HIDDEN a multiple of 128): each rebased row is written in the GEMMs' "lane"
    K order instead (`reference.to_lane_order`: out_row[p] = row[reference.lane_k_order(HIDDEN)[p]]),
    permuted in registers before the (unchanged) store: in each 128-column chunk, byte pair
    16 c + 4 g + 2 h + b2 (c, g in 0..3, h, b2 in 0..1) goes to pair position 16 g + 8 h + 2 c + b2.

    Worked example (one group, GROUP = 32), amax = 3.0 = 1.5 * 2**1, bits 0x40400000:
      FP8, Q = 448 = 1.75 * 2**8: e = 128 - 8 + (mant 0x400000 > 0x600000 = 0) = 120
          (reference: s = 3/448 = 0.0067 = 1.71 * 2**-8, mantissa != 0 -> e = 119 + 1 = 120);
          x is multiplied by 2**(127-120) = 128: 3.0 -> 384 = 1.5 * 2**8 -> E4M3 0x7C,
          -0.3 (bf16 -0.30078125) -> -38.5 -> -40 = -1.25 * 2**5 (nearest at 3 mantissa bits)
          -> sign | E 12 | m 2 = 0xE2; scale byte 120 (0x78).
      FP4, Q = 6 = 1.5 * 2**2: e = 128 - 2 + (0x400000 > 0x400000 = 0) = 126 (s = 0.5 exactly);
          x * 2: 3.0 -> 6.0 -> code 7, -0.3 -> -0.6016 -> 0.5 (nearest) -> code 1 | sign 8 = 0x9;
          the pair (3.0, -0.3) in columns (2i, 2i+1) packs to byte 0x97.
    """
    pid = tl.program_id(0)
    if LANE_K:
        tl.static_assert(REBASE and not USE_FP4 and not COPY_BF16, "LANE_K: with REBASE (FP8) only")
    if NUM_TOKENS_ON_DEVICE:
        n = tl.load(num_tokens_ptr)
        # NOTE: a count from the device cannot be validated on the host: clamp it so that a bad
        # value never reads or writes out of bounds.
        n = tl.minimum(tl.maximum(n, 0), max_tokens)
    else:
        n = num_tokens
    if WRITE_CALL_INFO:
        if pid == 0:
            tl.store(call_info_ptr, y_addr.to(tl.int64))
            tl.store(call_info_ptr + 1, n.to(tl.int64))

    if pid < num_topk_programs:
        # ---- top-k ids / weights: copy rows < n, pad rows [n, num_topk_rows) with -1 / 0.0 ----
        # NOTE: names here differ from the other branch's: Triton merges same-named variables of
        # both branches of a runtime `if`, which then must have the same type.
        t_rows = pid * TOPK_BLOCK_ROWS + tl.arange(0, TOPK_BLOCK_ROWS)
        t_cols = tl.arange(0, TOPK_PAD)
        t_offs = t_rows.to(tl.int64)[:, None] * TOPK + t_cols[None, :]
        t_col_ok = (t_cols < TOPK)[None, :]
        t_in = (t_rows < n)[:, None] & t_col_ok
        t_out = (t_rows < num_topk_rows)[:, None] & t_col_ok
        ids = tl.load(topk_idx_ptr + t_offs, mask=t_in, other=-1)
        wts = tl.load(topk_w_ptr + t_offs, mask=t_in, other=0)  # 0 bits == +0.0
        tl.store(out_idx_ptr + t_offs, ids.to(out_idx_ptr.dtype.element_ty), mask=t_out)
        tl.store(out_w_ptr + t_offs, wts, mask=t_out)
        if CHECK_IDS:
            t_bad = t_in & ((ids < -1) | (ids >= num_experts))
            t_row2 = t_rows[:, None] + 0 * t_cols[None, :]
            tl.atomic_min(bad_row_ptr + 0 * t_row2, t_row2, mask=t_bad, sem="relaxed")
    else:
        # ---- quantisation of a [BLOCK_M rows, BLOCK_W scale words] tile of x ----
        # NOTE: derived sizes are annotated constexpr: the interpreter turns a plain `//` into a
        # tensor op, and tl.arange needs compile-time bounds.
        GP: tl.constexpr = GROUP // 2                         # bf16 pairs (x words) per group
        NG: tl.constexpr = 4 * BLOCK_W                        # groups per program
        PAIRS_PER_ROW: tl.constexpr = HIDDEN // 2
        GROUPS_PER_ROW: tl.constexpr = HIDDEN // GROUP
        NUM_COL_BLOCKS: tl.constexpr = (GROUPS_PER_ROW + NG - 1) // NG
        # Target format: mantissa bits and float32 exponent field of its smallest normal.
        MB: tl.constexpr = 1 if USE_FP4 else 3
        EMIN: tl.constexpr = 127 if USE_FP4 else 121                  # 2**0 (E2M1), 2**-6 (E4M3)
        xp = pid - num_topk_programs
        pid_m = xp // NUM_COL_BLOCKS
        pid_c = xp - pid_m * NUM_COL_BLOCKS

        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        groups = pid_c * NG + tl.arange(0, NG)
        rows64 = rows.to(tl.int64)
        tile_ok = (rows < n)[:, None] & (groups < GROUPS_PER_ROW)[None, :]    # [BM, NG]
        mask = tile_ok[:, :, None]                                            # [BM, NG, 1]
        col = groups[:, None] * GP + tl.arange(0, GP)[None, :]                # [NG, GP] pair column
        offs = rows64[:, None, None] * PAIRS_PER_ROW + col[None, :, :]        # [BM, NG, GP]
        w = tl.load(x_ptr + offs, mask=mask, other=0)
        # bf16 -> float32 by shifting the bits (exact).
        lo = (w << 16).to(tl.float32, bitcast=True)           # even column
        hi = (w & -65536).to(tl.float32, bitcast=True)         # odd column (0xFFFF0000)

        if COPY_BF16:
            tl.store(out_x_ptr + offs, w, mask=mask)
        else:
            # UE8M0 exponent of each group's amax (a float max of |x|: exact).
            amax = tl.reduce(tl.maximum(tl.abs(lo), tl.abs(hi)), 2, _MAX_COMBINE).to(tl.int32, bitcast=True)
            amax = tl.maximum(amax, _AMAX_FLOOR_BITS)
            # NOTE: e = exponent(fl(amax / Q)) + (mantissa != 0) equals the smallest n with
            # amax <= Q * 2**(n-127), because for Q = 1.75 * 2**8 and 1.5 * 2**2 the next float
            # above Q * 2**m is more than Q * 2**m * (1 + 2**-24) away, so the rounded quotient
            # is <= 2**m exactly when amax <= Q * 2**m. With amax = M * 2**a (M in [1, 2)) that
            # is n = a + 127 - Q_EXP + (M > Q's mantissa): pure integer arithmetic, no division
            # (exhaustively checked against the reference over all bf16 values).
            if USE_FP4:
                e = (amax >> 23) - _FP4_Q_EXP + ((amax & 0x7FFFFF) > _FP4_Q_MANT).to(tl.int32)
            else:
                e = (amax >> 23) - _FP8_Q_EXP + ((amax & 0x7FFFFF) > _FP8_Q_MANT).to(tl.int32)
            e = tl.minimum(tl.maximum(e, 1), 254)
            if not REBASE:
                tl.store(out_sf_ptr + rows64[:, None] * GROUPS_PER_ROW + groups[None, :], e.to(tl.int8),
                         mask=tile_ok)
            # 2**(127 - e) as float32 bits (2**-127 is the subnormal 0x400000; unreachable for
            # finite bf16 input, kept for completeness).
            inv = tl.where(e < 254, (254 - e) << 23, 0x400000).to(tl.float32, bitcast=True)[:, :, None, None]
            x = tl.join(lo, hi)                                                    # [BM, NG, GP, 2]

            if USE_FP4 or not HW_CVT:
                # Round-to-nearest-even of |q| = |x| * 2**(127 - e) (<= Q) to the target format by one
                # exact fma: M is the power of two whose float32 ulp is the format's spacing in |q|'s
                # binade (binades below the smallest normal 2**(EMIN-127) share its spacing:
                # subnormals), so t = |x| * inv + M rounds |q| to that spacing, ties to even, and
                # bits(t) - bits(M) counts spacings; the code is that count plus the codes below the
                # binade, (binade - EMIN) << MB (a carry into the next binade comes out right).
                # M's exponent field: max(q's = x's + 127 - e, EMIN) + 23 - MB. A zero or subnormal x
                # (field 0) gives 127 - e < EMIN (e >= 105 as amax >= 1e-4), i.e. code 0, as it must.
                xb = x.to(tl.int32, bitcast=True)
                shift = ((127 - e + 23 - MB) << 23)[:, :, None, None]
                mb = tl.maximum((xb & 0x7F800000) + shift, (EMIN + 23 - MB) << 23)
                t = tl.fma(tl.abs(x), inv, mb.to(tl.float32, bitcast=True)).to(tl.int32, bitcast=True)
                code = t - mb + ((mb >> (23 - MB)) - ((EMIN + 23 - MB) << MB))
                if USE_FP4:
                    # Sign in bit 3 only for a non-zero code, i.e. q < -0.25 (the tie 0.25 goes to the
                    # even code 0): no -0 in the packed data. -0.25 * 2**(e - 127) is exact.
                    neg_thr = ((e << 23).to(tl.float32, bitcast=True) * -0.25)[:, :, None, None]
                    code = code | tl.where(x < neg_thr, 8, 0)
                else:
                    code = code | ((xb >> 24) & 0x80)                   # sign bit, -0 kept (as torch)
            else:
                # The GPU's cvt.rn.satfinite.e4m3x2.f32 of the exact product: round-to-nearest-even
                # (|q| <= 448, so saturation never applies), -0 kept.
                code = (x * inv).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
            if REBASE:
                tl.static_assert(NUM_COL_BLOCKS == 1 and not USE_FP4, "REBASE: FP8, whole rows per program")
                # The row exponent: the largest scale byte of the row's groups; each group's FP8
                # values times 2**-(E - e) (0 from d >= 127: an exact zero, sign kept), rounded again.
                e_row = tl.reduce(tl.where(tile_ok, e, 0), 1, _MAX_COMBINE)                 # [BM]
                d = e_row[:, None] - e
                f = tl.where(d < 127, (127 - d) << 23, 0).to(tl.float32, bitcast=True)[:, :, None, None]
                if HW_CVT:
                    q = code.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
                    code = (q * f).to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
                else:
                    code = _e4m3_code(_e4m3_value(code) * f)
                tl.store(out_e_ptr + rows64, e_row, mask=rows < n)
            c_lo, c_hi = tl.split(code)
            if USE_FP4:
                packed = (c_lo | (c_hi << 4)).to(tl.int8)               # even column in the low nibble
            else:
                packed = (c_lo | (c_hi << 8)).to(tl.int16)              # little endian: even column first
            if LANE_K:
                # The lane K order (`reference.lane_k_order`): position p = 32 g + 16 h + 4 c + b of a
                # 128-column chunk holds column 32 c + 8 g + 4 h + b. In byte pairs (b = 2 b2 + bit)
                # the chunk's pair 16 c + 4 g + 2 h + b2 moves to 16 g + 8 h + 2 c + b2: split the
                # row's pairs (col = group * GP + j, whole rows: pid_c = 0) into 64-pair chunks of
                # [c, g, h, b2] and swap c behind (g, h). NG * GP = 2 * BLOCK_W * GROUP pairs is a
                # whole number of chunks, each inside one 128-column chunk of the row; with HIDDEN a
                # multiple of 128 a chunk is wholly valid or wholly past the row (masked groups >=
                # GROUPS_PER_ROW, rows >= n), so `mask` stays right for the permuted tile.
                tl.static_assert(HIDDEN % 128 == 0, "LANE_K: HIDDEN must be a multiple of 128")
                LANE_CHUNKS: tl.constexpr = NG * GP // 64
                tl.static_assert(LANE_CHUNKS * 64 == NG * GP, "LANE_K: whole 128-column chunks per tile")
                packed = tl.reshape(packed, [BLOCK_M, LANE_CHUNKS, 4, 4, 2, 2])   # [.., c, g, h, b2]
                packed = tl.permute(packed, (0, 1, 3, 4, 2, 5))                  # [.., g, h, c, b2]
                packed = tl.reshape(packed, [BLOCK_M, NG, GP])
            tl.store(out_x_ptr + offs, packed, mask=mask)


@functools.lru_cache(maxsize=1)
def _interpreted_kernel():
    """The same kernel run by Triton's CPU interpreter (for CPU tensors)."""
    if isinstance(_pre_dispatch_kernel, triton.runtime.jit.JITFunction):
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(_pre_dispatch_kernel.fn)
    return _pre_dispatch_kernel  # already an interpreter object (TRITON_INTERPRET=1 at import)


@functools.lru_cache(maxsize=None)
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """SM count of a CUDA device (a cached host-side property query; no synchronisation)."""
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


# ------------------------------------------------------------------------------------------------
# Validation (host metadata only: no device access, no sync)
# ------------------------------------------------------------------------------------------------
def _need_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    return t


def _need_dtype(t: torch.Tensor, name: str, dtypes) -> None:
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name}: expected dtype {want}, got {t.dtype}")


def _need_shape(t: torch.Tensor, name: str, want: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"{name}: expected shape {want}, got {tuple(t.shape)}")


def _need_contiguous(t: torch.Tensor, name: str) -> None:
    if not t.is_contiguous():
        raise ValueError(f"{name}: expected a contiguous tensor (strides {tuple(t.stride())} for shape "
                         f"{tuple(t.shape)})")


def _launch_pre_dispatch(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                         num_tokens, group_size: int = 32, use_fp4_acts: bool = False,
                         config: Optional[PreDispatchConfig] = None,
                         rebase_out: Optional[torch.Tensor] = None, lane_k: bool = False) -> None:
    """`mega_moe_pre_dispatch` with an optional explicit launch config (benchmarks / tuning).
    rebase_out (FP8 only): int32 [rows] receiving each row's exponent; buf_x then receives the rows
    rebased to it (the kernel's REBASE: `reference.rebase_act`, bitwise) and buf_x_sf is not
    written; the config must own whole rows (`pre_dispatch_config(..., whole_rows=True)`, the
    default then).
    lane_k (with rebase_out only; H a multiple of 128): buf_x receives the rebased rows in the Hopper
    GEMMs' "lane" K order, `reference.to_lane_order(rebased rows)` (the kernel's LANE_K: permuted in
    registers, same stores); the exponents in rebase_out are unchanged."""
    # --- arguments ---
    if not isinstance(lane_k, bool):
        raise TypeError(f"lane_k: expected a bool, got {type(lane_k).__name__}")
    if lane_k and rebase_out is None:
        raise ValueError("lane_k: the lane K order is for rebased rows: pass rebase_out too")
    if not isinstance(use_fp4_acts, bool):
        raise TypeError(f"use_fp4_acts: expected a bool, got {type(use_fp4_acts).__name__}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in PRE_DISPATCH_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {PRE_DISPATCH_GROUP_SIZES}, got {group_size!r}")
    for t, name in ((x, "x"), (topk_idx, "topk_idx"), (topk_weights, "topk_weights"), (buf_x, "buf_x"),
                    (buf_x_sf, "buf_x_sf"), (buf_topk_idx, "buf_topk_idx"),
                    (buf_topk_weights, "buf_topk_weights")):
        _need_tensor(t, name)

    _need_dtype(x, "x", (torch.bfloat16,))
    _need_shape(x, "x", "[T, H] (2-D)", x.dim() == 2)
    T, H = x.shape
    if lane_k and H % 128 != 0:
        raise ValueError(f"x: hidden size H = {H} must be a multiple of 128 with lane_k (the lane K order "
                         f"permutes 128-column chunks)")
    if H <= 0 or H % (4 * group_size) != 0:
        raise ValueError(f"x: hidden size H = {H} must be a positive multiple of 4 * group_size = "
                         f"{4 * group_size} (4 UE8M0 scale bytes pack into one int32)")
    _need_dtype(topk_idx, "topk_idx", (torch.int32, torch.int64))
    _need_shape(topk_idx, "topk_idx", f"[T={T}, K] with K >= 1",
                topk_idx.dim() == 2 and topk_idx.shape[0] == T and topk_idx.shape[1] >= 1)
    K = topk_idx.shape[1]
    _need_dtype(topk_weights, "topk_weights", (torch.float32,))
    _need_shape(topk_weights, "topk_weights", f"[T={T}, K={K}]", tuple(topk_weights.shape) == (T, K))

    cols_x = H // 2 if use_fp4_acts else H
    _need_dtype(buf_x, "buf_x", (torch.int8,) if use_fp4_acts else (torch.float8_e4m3fn,))
    _need_shape(buf_x, "buf_x", f"[rows, {cols_x}] ({'H/2 packed FP4' if use_fp4_acts else 'H'} columns)",
                buf_x.dim() == 2 and buf_x.shape[1] == cols_x)
    words = H // (4 * group_size)
    _need_dtype(buf_x_sf, "buf_x_sf", (torch.int32,))
    _need_shape(buf_x_sf, "buf_x_sf", f"[rows, {words}] (H / group_size / 4 packed UE8M0 words)",
                buf_x_sf.dim() == 2 and buf_x_sf.shape[1] == words)
    _need_dtype(buf_topk_idx, "buf_topk_idx", (torch.int32, torch.int64))
    _need_shape(buf_topk_idx, "buf_topk_idx", f"[rows, K={K}]",
                buf_topk_idx.dim() == 2 and buf_topk_idx.shape[1] == K)
    R = buf_topk_idx.shape[0]
    _need_dtype(buf_topk_weights, "buf_topk_weights", (torch.float32,))
    _need_shape(buf_topk_weights, "buf_topk_weights", f"[rows={R}, K={K}] (same rows as buf_topk_idx)",
                tuple(buf_topk_weights.shape) == (R, K))

    device = buf_x.device
    for t, name in ((x, "x"), (topk_idx, "topk_idx"), (topk_weights, "topk_weights"),
                    (buf_x_sf, "buf_x_sf"), (buf_topk_idx, "buf_topk_idx"),
                    (buf_topk_weights, "buf_topk_weights")):
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (the device of buf_x), got {t.device}")
        _need_contiguous(t, name)
    _need_contiguous(buf_x, "buf_x")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"buf_x: expected a CUDA tensor (or CPU for Triton's interpreter), got {device}")

    # --- token count ---
    on_device = isinstance(num_tokens, torch.Tensor)
    if on_device:
        _need_dtype(num_tokens, "num_tokens", (torch.int32,))
        if num_tokens.numel() != 1:
            raise ValueError(f"num_tokens: expected a 1-element int32 tensor, got shape {tuple(num_tokens.shape)}")
        if num_tokens.device != device:
            raise ValueError(f"num_tokens: expected device {device}, got {num_tokens.device}")
        rows_needed = T        # the count is only known on the device: buffers must hold all of x
        count = 0
    else:
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int):
            raise TypeError(f"num_tokens: expected an int or a 1-element int32 tensor, got "
                            f"{type(num_tokens).__name__}")
        if not 0 <= num_tokens <= T:
            raise ValueError(f"num_tokens: expected 0 <= num_tokens <= T = {T} (rows of x), got {num_tokens}")
        rows_needed = count = num_tokens
    for t, name in ((buf_x, "buf_x"), (buf_x_sf, "buf_x_sf"), (buf_topk_idx, "buf_topk_idx")):
        if t.shape[0] < rows_needed:
            what = "rows of x (num_tokens is a device tensor)" if on_device else "num_tokens"
            raise ValueError(f"{name}: too small: {t.shape[0]} rows < {rows_needed} ({what})")
    if rows_needed >= 2**31 or R >= 2**31:
        raise ValueError(f"x: {rows_needed} rows exceed the kernel's int32 row index")

    rebase = rebase_out is not None
    if rebase:
        if use_fp4_acts:
            raise ValueError("rebase_out: rebasing in the pre-dispatch is for FP8 activations (use_fp4_acts=False)")
        _need_dtype(_need_tensor(rebase_out, "rebase_out"), "rebase_out", (torch.int32,))
        _need_shape(rebase_out, "rebase_out", f"[rows >= {rows_needed}] (1-D)",
                    rebase_out.dim() == 1 and rebase_out.shape[0] >= rows_needed)
        if rebase_out.device != device:
            raise ValueError(f"rebase_out: expected device {device}, got {rebase_out.device}")
    # --- launch ---
    if config is None:
        if device.type == "cuda":
            config = pre_dispatch_config(rows_needed, H, group_size, num_sms=_num_sms(device),
                                         use_fp4=use_fp4_acts, whole_rows=rebase)
        else:
            config = pre_dispatch_config(rows_needed, H, group_size, interpreter=True)
    if rebase and config.num_col_blocks != 1:
        raise ValueError(f"config: rebasing needs programs owning whole rows (num_col_blocks 1, got "
                         f"{config.num_col_blocks})")
    num_topk_programs = config.num_topk_programs(R)
    grid = (num_topk_programs + config.num_x_programs(rows_needed),)
    if grid[0] == 0:
        return
    if grid[0] >= 2**31:
        raise ValueError(f"x: {rows_needed} rows need {grid[0]} programs, over CUDA's grid limit")
    # Views only (no copies): bf16 pairs as int32 words, float32 weights as their bits, the FP8
    # buffer as int16 byte pairs, the packed scale words as their bytes.
    try:
        x_words = x.view(torch.int32)
    except RuntimeError as exc:  # e.g. a view starting at an odd element
        raise ValueError(f"x: cannot be read as bf16 pairs (int32 words): {exc}") from exc
    try:
        out_x = buf_x.view(torch.int8) if use_fp4_acts else buf_x.view(torch.int16)
    except RuntimeError as exc:
        raise ValueError(f"buf_x: cannot be written as byte pairs (int16 words): {exc}") from exc
    kernel = _interpreted_kernel() if device.type == "cpu" else _pre_dispatch_kernel
    hw_cvt = isinstance(kernel, triton.runtime.jit.JITFunction)   # not Triton's interpreter
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](
            x_words, topk_idx, topk_weights.view(torch.int32),
            out_x, buf_x_sf.view(torch.int8), buf_topk_idx, buf_topk_weights.view(torch.int32),
            num_tokens if on_device else None,
            count, T, R, num_topk_programs, None, 0, None, 0, rebase_out,
            HIDDEN=H, GROUP=group_size, TOPK=K, TOPK_PAD=next_power_of_2(K),
            USE_FP4=use_fp4_acts, HW_CVT=hw_cvt, NUM_TOKENS_ON_DEVICE=on_device,
            BLOCK_M=config.block_m, BLOCK_W=config.block_w, TOPK_BLOCK_ROWS=config.topk_block_rows,
            CHECK_IDS=False, COPY_BF16=False, WRITE_CALL_INFO=False, REBASE=rebase, LANE_K=lane_k,
            num_warps=config.num_warps,
            enable_fp_fusion=False,
        )


def mega_moe_pre_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                          buf_x: torch.Tensor, buf_x_sf: torch.Tensor, buf_topk_idx: torch.Tensor,
                          buf_topk_weights: torch.Tensor, num_tokens: Union[int, torch.Tensor],
                          group_size: int = 32, use_fp4_acts: bool = False) -> None:
    """Quantise x and stage the top-k arrays into the dispatch buffers, in one kernel launch.

    Args:
        x: bf16 [T, H], contiguous; H a multiple of 4 * group_size. Only the first num_tokens rows
            are read (x may be empty with a null data pointer when num_tokens is 0).
        topk_idx: int32 or int64 [T, K] expert ids (-1 = masked slot; copied as they are).
        topk_weights: float32 [T, K] (copied bit for bit).
        buf_x: FP8 (use_fp4_acts=False): float8_e4m3fn [R_x >= num_tokens, H];
            FP4 (use_fp4_acts=True): int8 [R_x >= num_tokens, H/2], two E2M1 codes per byte,
            even column in the low nibble. Rows >= num_tokens are left untouched.
        buf_x_sf: int32 [R_x' >= num_tokens, H/group_size/4]: UE8M0 scale bytes of 4 consecutive
            groups per little-endian word. Rows >= num_tokens are left untouched.
        buf_topk_idx: int32 or int64 [R >= num_tokens, K]: rows < num_tokens get topk_idx (converted
            to this dtype), rows [num_tokens, R) get -1.
        buf_topk_weights: float32 [R, K] (same R): rows < num_tokens get topk_weights, the rest 0.0.
        num_tokens: a Python int in [0, T]; or a 1-element int32 tensor on the buffers' device,
            read by the kernel, so that one captured CUDA graph can replay with varying counts.
            With a tensor the buffers must have >= T rows, the grid covers all T rows of x, and a
            count outside [0, T] is clamped into it on the device (it cannot be checked on the host).
        group_size: 32, 64 or 128 columns per UE8M0 scale.
        use_fp4_acts: packed E2M1 (Q = 6) instead of FP8 E4M3 (Q = 448).

    Numerics (bitwise equal to `reference.per_token_cast_to_fp8` / `per_token_cast_to_fp4`):
    amax per group floored at 1e-4, e = ceil-exponent of fl(amax / Q) clamped to [1, 254], values
    multiplied exactly by 2**(127 - e) and rounded to nearest even. Inputs must be finite.

    Raises TypeError / ValueError naming the argument for a wrong type, dtype, shape, device,
    layout, group size or too-small buffer, before anything is launched. Never synchronises with
    the host and allocates nothing (CUDA-graph capturable). CPU tensors run the same kernel in
    Triton's interpreter (for tests).
    """
    _launch_pre_dispatch(x, topk_idx, topk_weights, buf_x, buf_x_sf, buf_topk_idx, buf_topk_weights,
                         num_tokens, group_size=group_size, use_fp4_acts=use_fp4_acts)
