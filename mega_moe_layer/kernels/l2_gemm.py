"""L2 grouped expert GEMM: y_p = h_p . w2[e]^T, rounded to bf16, stored to a per-pair destination
row anywhere in (peer-mapped) device memory, optionally quantised for the FP8 combine (DESIGN 6).

Public entry point: `l2_grouped_gemm` (destination passing through absolute row addresses; no
allocation, no host sync, CUDA-graph safe: a static persistent grid whose programs loop over the
work items below the device tile count).

Reads the same tile map as L1 (`l1_gemm.build_tile_map`) and shares its Triton helpers (operand
dequantisation, bitwise rounding); see `l1_gemm`'s docstring for the layout of the pairs and the
orientation of the MMA (weight rows on the M side, pairs on the N side).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .gemm_heuristics import GroupedGemmConfig, l2_gemm_config, uses_dot_scaled
from ._launch import Launcher
from .gemm_operands import WeightOperand
from .sync import pdl_enter
from .l1_gemm import (_act_shapes, _act_tile_bf16, _act_tile_mx, _apply_row_factors, _call_args,
                      _check_block_k, _check_lane, _check_launch_device, _check_over, _check_operand_only, _check_promote,
                      _check_rebased, _check_tensor, _check_tile_map, _device_arch, _device_num_sms, _fp4_decoder, epilogue_cvt,
                      _fp4_perm_k, fp4_table, _fp8_mainloop, _is_interpreted, _kernel_weight_format, _launch_or_bind,
                      _mma,
                      _prefetch_item, _quant_store_rows, _resident_grid, _round_bf16, _row_max_exponent,
                      sf_words_p2, _weight_launch_args, _weight_shapes, _weight_tile_bf16,
                      _weight_tile_mx)

__all__ = ["l2_grouped_gemm"]

#: Columns per UE8M0 scale of the FP8 combine (config.COMBINE_FP8_GROUP).
_COMBINE_GROUP = 128
#: Columns per UE8M0 scale of h (config.H_GROUP).
_H_GROUP = 32


@triton.jit
def _addr_rows(anchor_ptr, addr, DTYPE: tl.constexpr):
    """int64 absolute addresses [BLOCK_M] -> [BLOCK_M, 1] pointers to DTYPE.

    NOTE: built as anchor + (addr - anchor) elements from a kernel argument (16-byte aligned)
    rather than by an int -> pointer cast, so Triton's alignment analysis sees 16-byte aligned
    rows (addresses are 16-byte aligned by contract) and the epilogue stores 16-byte vectors;
    a cast pointer would be stored one element at a time. Masked rows (addr 0) give wild
    pointers that are never dereferenced.
    """
    base = anchor_ptr.to(tl.pointer_type(DTYPE), bitcast=True)
    delta = tl.multiple_of(addr - anchor_ptr.to(tl.int64), 16)
    if DTYPE == tl.int16:
        delta = delta // 2
    return (base + delta)[:, None]


@triton.jit
def _l2_epilogue(acc, e_row, rows, row_ok, dst, dst_ptr, dst_sf_ptr, e64, n, pid_n, w_row_ptr, HIDDEN: tl.constexpr,
                 ACT_FORMAT: tl.constexpr, COMBINE_FORMAT: tl.constexpr, W_KIND: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_N: tl.constexpr, HW_CVT: tl.constexpr = False):
    """The transposed [BLOCK_N, ROWS] accumulator of pairs `rows` (destination addresses `dst`) ->
    their destination rows: the FP8 mainloop's row factors, DESIGN step 6 (bf16), then the
    destination format. A pair without a destination (address 0) is left out of the store.
    HW_CVT: the roundings by the hardware's conversions (`l1_gemm.EPILOGUE_HW_CVT`)."""
    if W_KIND != "raw":
        acc = _apply_row_factors(acc, e_row, w_row_ptr, e64 * HIDDEN + n, ACT_FORMAT, W_KIND)
    if HW_CVT:
        y = tl.trans(acc.to(tl.bfloat16).to(tl.float32))                        # cvt.rn: the same values
    else:
        y = tl.trans(_round_bf16(acc))                                          # [R, BN] f32
    st_ok = row_ok & (dst != 0)
    if COMBINE_FORMAT == "fp8":
        sf_dst = tl.load(dst_sf_ptr + rows, mask=st_ok, other=0)
        _quant_store_rows(y, st_ok, pid_n * BLOCK_N, _addr_rows(dst_ptr, dst, tl.int8),
                          sf_dst.to(tl.pointer_type(tl.uint8))[:, None], ROWS, BLOCK_N, 128, "fp8", HW_CVT)
    else:
        out_rows = _addr_rows(dst_ptr, dst, tl.int16)
        _quant_store_rows(y, st_ok, pid_n * BLOCK_N, out_rows, out_rows, ROWS, BLOCK_N, 128, "bf16", HW_CVT)


@triton.jit
def _l2_item(h_ptr, h_sf_ptr, w_ptr, w_sf_ptr, w_row_ptr, tab_ptr, dst_ptr, dst_sf_ptr,
             expert, row_start, row_end, pid_n,
             HIDDEN: tl.constexpr, INTER: tl.constexpr, WEIGHT_FORMAT: tl.constexpr, ACT_FORMAT: tl.constexpr,
             COMBINE_FORMAT: tl.constexpr, USE_DOT_SCALED: tl.constexpr, DOT_IN_F32: tl.constexpr,
             W_KIND: tl.constexpr, SF_WORDS_P2: tl.constexpr, PROMOTE: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP4_DECODER: tl.constexpr, ACT_REBASED: tl.constexpr,
             WARPS: tl.constexpr, FP4_TABLE: tl.constexpr, OVER_M: tl.constexpr, OVER_LIMIT: tl.constexpr,
             EPI_CVT: tl.constexpr = False):
    """One L2 work item (`_l2_kernel`): pairs [row_start, min(row_start + BLOCK_M, row_end)) of
    `expert` x N block `pid_n` (BLOCK_N columns of y) -> their destination rows; OVER_M > 0: the
    rows past BLOCK_M of an expert's last full tile too, as in `l1_gemm._l1_item`."""
    tl.static_assert(OVER_M == 0 or (ACT_REBASED and W_KIND != "raw"), "rows past BLOCK_M: streamed FP8 mainloop only")
    rows = row_start + tl.arange(0, BLOCK_M)
    row_ok = rows < row_end
    # NOTE: a pair without a destination (address 0) is only left out of the store, so that
    # nothing before the mainloop waits for the destination load.
    dst = tl.load(dst_ptr + rows, mask=row_ok, other=0)
    rows64 = rows.to(tl.int64)

    e64 = expert.to(tl.int64)
    n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)            # w2 rows = columns of y
    if WEIGHT_FORMAT == "mxfp4":
        w_off = e64 * (HIDDEN * (INTER // 2))
        sf_off = e64 * (HIDDEN * (INTER // 32))
    elif WEIGHT_FORMAT == "fp8":
        w_off = e64 * (HIDDEN * INTER)
        sf_off = e64 * ((HIDDEN // 128) * (INTER // 128))
    else:
        w_off = e64 * (HIDDEN * INTER)
        sf_off = e64 * 0

    if ACT_REBASED:
        e_row = tl.load(h_sf_ptr + rows64, mask=row_ok, other=0)
    elif W_KIND != "raw":
        # h's row exponent: the largest of its I / 32 group scales (L1 wrote them per 32).
        e_row = _row_max_exponent(h_sf_ptr, rows64, row_ok, INTER // 32 // 4, SF_WORDS_P2)
    else:
        e_row = row_ok.to(tl.int32)  # unused
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    rem = row_end - row_start
    if OVER_M > 0 and (rem > BLOCK_M) & (rem <= BLOCK_M + OVER_LIMIT):
        # the expert's last full tile and (part of) its remainder: one weight stream, two MMAs
        orows = row_start + BLOCK_M + tl.arange(0, OVER_M)
        o_ok = orows < row_end
        o_dst = tl.load(dst_ptr + orows, mask=o_ok, other=0)
        orows64 = orows.to(tl.int64)
        acc, acc_o = _fp8_mainloop(w_ptr, w_sf_ptr, tab_ptr, w_off, sf_off, n, pid_n * BLOCK_N, 0, h_ptr, h_sf_ptr,
                                   rows64, row_ok, e_row, INTER, 32, BLOCK_N, BLOCK_M, BLOCK_K, BLOCK_N, W_KIND,
                                   ACT_FORMAT, WARPS, FP4_TABLE, PROMOTE, DOT_IN_F32, ACT_REBASED, OVER_M, orows64,
                                   o_ok)
        o_e_row = tl.load(h_sf_ptr + orows64, mask=o_ok, other=0)
        _l2_epilogue(acc_o, o_e_row, orows, o_ok, o_dst, dst_ptr, dst_sf_ptr, e64, n, pid_n, w_row_ptr, HIDDEN,
                     ACT_FORMAT, COMBINE_FORMAT, W_KIND, OVER_M, BLOCK_N, EPI_CVT)
    elif ACT_REBASED or (W_KIND != "raw" and not USE_DOT_SCALED):
        # Hopper: the FP8 mainloop (h rebased after L1, or here in registers)
        acc, _ = _fp8_mainloop(w_ptr, w_sf_ptr, tab_ptr, w_off, sf_off, n, pid_n * BLOCK_N, 0, h_ptr, h_sf_ptr, rows64,
                               row_ok, e_row, INTER, 32, BLOCK_N, BLOCK_M, BLOCK_K, BLOCK_N, W_KIND, ACT_FORMAT, WARPS,
                               FP4_TABLE, PROMOTE, DOT_IN_F32, ACT_REBASED)
    else:
        for kt in range(0, INTER // BLOCK_K):
            if USE_DOT_SCALED:
                h_raw, h_sf = _act_tile_mx(h_ptr, h_sf_ptr, rows64, row_ok, kt, INTER, 32, BLOCK_K, ACT_FORMAT)
                w, w_sf = _weight_tile_mx(w_ptr, w_sf_ptr, w_off, sf_off, n, kt, INTER, BLOCK_K)
                acc = tl.dot_scaled(w, w_sf, "e2m1", tl.trans(h_raw), h_sf,
                                    "e4m3" if ACT_FORMAT == "fp8" else "e2m1", acc)
            else:
                h_tile = _act_tile_bf16(h_ptr, h_sf_ptr, rows64, row_ok, kt, INTER, 32, BLOCK_M, BLOCK_K,
                                        ACT_FORMAT)                                         # [BM, BK]
                if WEIGHT_FORMAT == "mxfp4":
                    h_tile = _fp4_perm_k(h_tile, BLOCK_M, BLOCK_K)        # the weight tile's K order
                h_t = tl.trans(h_tile)                                                      # [BK, BM]
                w = _weight_tile_bf16(w_ptr, w_sf_ptr, w_off, sf_off, n, kt, INTER, BLOCK_N, BLOCK_K, WEIGHT_FORMAT,
                                      not DOT_IN_F32, FP4_DECODER)
                if WEIGHT_FORMAT == "fp8":
                    s = tl.load(w_sf_ptr + sf_off + (n // 128) * (INTER // 128) + kt * BLOCK_K // 128)
                    acc += _mma(w, h_t, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), DOT_IN_F32) * s[:, None]
                else:
                    acc = _mma(w, h_t, acc, DOT_IN_F32)
    _l2_epilogue(acc, e_row, rows, row_ok, dst, dst_ptr, dst_sf_ptr, e64, n, pid_n, w_row_ptr, HIDDEN, ACT_FORMAT,
                 COMBINE_FORMAT, W_KIND, BLOCK_M, BLOCK_N, EPI_CVT)


@triton.jit(do_not_specialize=["max_tiles"])
def _l2_kernel(
    h_ptr,            # fp8: float8_e4m3fn [P, I]; fp4: int8 [P, I/2]; bf16: bf16 [P, I]
    h_sf_ptr,         # int32 [P, I/128] packed UE8M0 per 32 columns (None for bf16)
    offsets_ptr,      # int32 [E_local + 1]
    tile_expert_ptr,  # int32 [max_tiles]
    tile_row_ptr,     # int32 [max_tiles]
    num_tiles_ptr,    # int32 [1]
    w_ptr,            # mxfp4: int8 [E_local, H, I/2]; fp8: float8_e4m3fn [E_local, H, I]; bf16 [E_local, H, I]
    w_sf_ptr,         # mxfp4: uint8 [E_local, H, I/32]; fp8: float32 [E_local, H/128, I/128]; bf16: None
                      # (W_KIND "mxfp4": the uint8 offset index per 32-group instead of the scale)
    w_row_ptr,        # float32 [E_local, H] row factors (W_KIND "mxfp4" / "fp8_rebased"; else None)
    tab_ptr,          # int64 [64] E2M1 -> E4M3 tables (FP8 mainloop with MXFP4 weights or FP4 h)
    dst_ptr,          # int64 [P]: absolute address of pair p's destination row (0 = skip)
    dst_sf_ptr,       # int64 [P]: absolute address of its scale words (fp8 combine; else None)
    max_tiles,
    HIDDEN: tl.constexpr, INTER: tl.constexpr,
    WEIGHT_FORMAT: tl.constexpr, ACT_FORMAT: tl.constexpr, COMBINE_FORMAT: tl.constexpr,
    USE_DOT_SCALED: tl.constexpr, DOT_IN_F32: tl.constexpr,
    W_KIND: tl.constexpr, SF_WORDS_P2: tl.constexpr, PROMOTE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FP4_DECODER: tl.constexpr, ACT_REBASED: tl.constexpr, WARPS: tl.constexpr, FP4_TABLE: tl.constexpr,
    PDL: tl.constexpr = False, OVER_M: tl.constexpr = 0, OVER_LIMIT: tl.constexpr = 0,
    EPI_CVT: tl.constexpr = False,
):
    """Work item: BLOCK_M pairs of one expert x BLOCK_N output columns of H -> their rows
    (`_l2_item`; OVER_M / OVER_LIMIT as in `l1_gemm._l1_kernel`).

    ACT_REBASED (with W_KIND != "raw"): h_ptr is h rebased to E4M3 [P, I] and h_sf_ptr its int32
    row exponents [P] (`rebase.rebase_act_rows`): the streamed FP8 mainloop.

    Persistent: program p handles work items p, p + num_programs, ... below num_tiles * H / BLOCK_N.

    Worked example (HIDDEN 512, INTER 128, BLOCK_M 16, BLOCK_N 128, fp8 h, fp8 combine):
      num_tiles * 4 work items. Item (tile 0 = expert 0 rows [0, 3), N block 2) loads h rows 0..2
      (13 masked) for K = 128 in one step, dequantises each 32-column group exactly
      (E4M3 x 2**(e-127)), multiplies by w2[0] rows 256..383 as a transposed [128, 16] tile,
      rounds y to bf16, and quantises each row's 128 columns with Q = 448: amax 0.75 gives
      e = 127 - 9 = 118 (0.75 / 448 = 1.67e-3 -> next power of two 2**-9), values times 2**9.
      Bytes 256..383 of each destination row get the E4M3 codes and byte 2 of its scale row the
      exponent 118 (word 0, little-endian byte 2); a pair whose address is 0 is skipped.
    """
    if PDL:     # programmatic dependent launch (`sync.pdl_enter`)
        pdl_enter()
    NUM_N: tl.constexpr = HIDDEN // BLOCK_N
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    num_tiles = tl.minimum(tl.load(num_tiles_ptr), max_tiles)
    total = num_tiles * NUM_N
    # Persistent loop over (tile, N block) work items: a grid of a few CTAs per SM serves any
    # count, so a map sized for the worst case costs no empty CTAs at decode sizes.
    # NOTE: an item's metadata is a chain of dependent loads (tile -> expert -> its row end); they
    # are issued one and two items ahead (`_prefetch_item`), so an item's mainloop starts at once
    # (at decode a program runs ~50 short items of 8 K steps at T = 128).
    expert, row_start, pid_n = _prefetch_item(pid, total, num_tiles, tile_expert_ptr, tile_row_ptr, NUM_N, GROUP_M)
    row_end = tl.load(offsets_ptr + expert + 1)
    n_expert, n_row_start, n_pid_n = _prefetch_item(pid + nprog, total, num_tiles, tile_expert_ptr, tile_row_ptr,
                                                    NUM_N, GROUP_M)
    for work in range(pid, total, nprog):
        n_row_end = tl.load(offsets_ptr + n_expert + 1)
        nn_expert, nn_row_start, nn_pid_n = _prefetch_item(work + 2 * nprog, total, num_tiles, tile_expert_ptr,
                                                           tile_row_ptr, NUM_N, GROUP_M)
        _l2_item(h_ptr, h_sf_ptr, w_ptr, w_sf_ptr, w_row_ptr, tab_ptr, dst_ptr, dst_sf_ptr, expert, row_start,
                 row_end, pid_n, HIDDEN, INTER, WEIGHT_FORMAT, ACT_FORMAT, COMBINE_FORMAT, USE_DOT_SCALED,
                 DOT_IN_F32, W_KIND, SF_WORDS_P2, PROMOTE, BLOCK_M, BLOCK_N, BLOCK_K, FP4_DECODER, ACT_REBASED,
                 WARPS, FP4_TABLE, OVER_M, OVER_LIMIT, EPI_CVT)
        expert, row_start, row_end, pid_n = n_expert, n_row_start, n_row_end, n_pid_n
        n_expert, n_row_start, n_pid_n = nn_expert, nn_row_start, nn_pid_n


def l2_grouped_gemm(h: torch.Tensor, h_sf: Optional[torch.Tensor], expert_offsets: torch.Tensor,
                    tile_expert: torch.Tensor, tile_row_start: torch.Tensor, num_tiles: torch.Tensor,
                    w2_data: torch.Tensor, w2_scale: Optional[torch.Tensor], pair_dst: torch.Tensor,
                    pair_dst_sf: Optional[torch.Tensor], *, weight_format: str, act_format: str,
                    combine_format: str, hidden: int, block_m: Optional[int] = None,
                    config: Optional[GroupedGemmConfig] = None, arch: Optional[int] = None,
                    num_sms: Optional[int] = None, w2_operand: Optional[WeightOperand] = None,
                    h_rebased: Optional[tuple] = None, over_m: int = 0, over_limit: int = 0,
                    bind: bool = False) -> Optional[Launcher]:
    """L2 of the routed pairs: y_p = bf16(h_p . w2[e]^T), stored at the address pair_dst[p].

    Args (P = pairs capacity, H = hidden, I = intermediate):
        h: L1's output, float8_e4m3fn [P, I] | int8 [P, I/2] packed E2M1 | bfloat16 [P, I].
        h_sf: int32 [P, I/128] packed UE8M0 per 32 columns; None for bf16.
        expert_offsets: int32 [E_local + 1]; tile_expert, tile_row_start: int32 [max_tiles];
            num_tiles: int32 [1] — the tile map L1 used (same `block_m`).
        w2_data / w2_scale: local experts [E_local, H, I]: mxfp4 int8 [E_local, H, I/2] + uint8
            [E_local, H, I/32]; fp8 float8_e4m3fn [E_local, H, I] + float32 [E_local, H/128, I/128];
            bf16 bfloat16 [E_local, H, I] + None. Both may be None with an FP8-mainloop
            w2_operand (it holds everything the kernel reads).
        pair_dst: int64 [P] absolute device address of pair p's destination row: bfloat16 [H]
            (combine bf16) or float8_e4m3fn [H] (combine fp8), 16-byte aligned; 0 = skip the pair.
            May point into a peer GPU's memory (NVLink), e.g. `tensor.data_ptr() + row * row_bytes`.
        pair_dst_sf: int64 [P] (fp8 combine) address of the pair's scales, int32 [ceil(H/512)] words
            (UE8M0 per 128 columns, 4 per little-endian word); None for bf16.
        weight_format, act_format: as in L1 (act_format is h's format); combine_format "bf16" | "fp8".
        hidden: H.
        block_m, config, arch, num_sms: as in `l1_grouped_gemm` (default config
            `gemm_heuristics.l2_gemm_config`).
        bind: as in `l1_grouped_gemm` (a bound `Launcher` instead of a launch).
        w2_operand: as `l1_grouped_gemm`'s w13_operand (Hopper FP8 mainloop: h is rebased per row
            in the operand load, its row exponent the largest of the row's group scales).
        h_rebased: (float8_e4m3fn [P, I], int32 [P]): h rebased to one exponent per row
            (`rebase.rebase_act_rows` of h / h_sf after L1), read instead of h / h_sf: the streamed
            FP8 mainloop. Needs an FP8-mainloop w2_operand.
        over_m, over_limit: as in `l1_grouped_gemm` (the same tile map's).

    Numerics: float32 accumulation of exact bf16 operands (FP8 weights: per-128-K partial products
    times the float32 block scale), y rounded to bf16 (RNE); FP8 combine: y quantised per 128
    columns with Q = 448 (bitwise `reference.combine_quantize` given the same bf16 y).

    No allocation, no host synchronisation; a static persistent grid (a few CTAs per SM) whose
    programs loop over the (tile, N block) items below the device count.
    """
    if weight_format not in ("mxfp4", "fp8", "bf16"):
        raise ValueError(f"weight_format: expected 'mxfp4', 'fp8' or 'bf16', got {weight_format!r}")
    if act_format not in ("fp8", "fp4", "bf16"):
        raise ValueError(f"act_format: expected 'fp8', 'fp4' or 'bf16', got {act_format!r}")
    if combine_format not in ("bf16", "fp8"):
        raise ValueError(f"combine_format: expected 'bf16' or 'fp8', got {combine_format!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0 or hidden % 128 != 0:
        raise ValueError(f"hidden: expected a positive multiple of 128, got {hidden!r}")
    if not isinstance(h, torch.Tensor) or h.dim() != 2:
        raise ValueError("h: expected a 2-D tensor [P, I (or I/2)]")
    if w2_data is None:
        # The FP8 mainloop reads only its operand: the loaded weight need not be on the device.
        _check_operand_only("w2", w2_operand, w2_scale)
    elif not isinstance(w2_data, torch.Tensor) or w2_data.dim() != 3:
        raise ValueError("w2_data: expected a 3-D tensor [E_local, H, I (or I/2)]")
    device = h.device
    num_pairs = h.shape[0]
    inter = h.shape[1] * (2 if act_format == "fp4" else 1)
    if inter % 128 != 0:
        raise ValueError(f"h: I = {inter} must be a multiple of 128")
    hd, hshape, hsshape = _act_shapes(act_format, num_pairs, inter, _H_GROUP)
    _check_tensor(h, "h", hd, hshape, device)
    if hsshape is None:
        if h_sf is not None:
            raise ValueError("h_sf: expected None for bf16 activations")
    else:
        _check_tensor(h_sf, "h_sf", torch.int32, hsshape, device)
    num_experts = (w2_data if w2_data is not None else w2_operand).shape[0]
    wd, wshape, sd, sshape = _weight_shapes(weight_format, num_experts, hidden, inter)
    if w2_data is not None:
        _check_tensor(w2_data, "w2_data", wd, wshape, device)
        if sd is None:
            if w2_scale is not None:
                raise ValueError("w2_scale: expected None for bf16 weights")
        else:
            _check_tensor(w2_scale, "w2_scale", sd, sshape, device)
    n_tiles, block_m = _check_tile_map(expert_offsets, tile_expert, tile_row_start, num_tiles, num_experts,
                                       device, num_pairs, block_m)
    _check_tensor(pair_dst, "pair_dst", torch.int64, (num_pairs,), device)
    if pair_dst.data_ptr() % 16 != 0:
        # NOTE: the kernel forms destination pointers relative to pair_dst's own (16-byte aligned)
        # address so that its stores vectorise; see `_addr_rows`.
        raise ValueError(f"pair_dst: expected a 16-byte aligned tensor, got address {pair_dst.data_ptr():#x}")
    if combine_format == "fp8":
        _check_tensor(pair_dst_sf, "pair_dst_sf", torch.int64, (num_pairs,), device)
    elif pair_dst_sf is not None:
        raise ValueError("pair_dst_sf: expected None for the bf16 combine")

    if arch is None:
        arch = _device_arch(device) if device.type == "cuda" else 90
    if h_rebased is not None:
        _check_rebased("h_rebased", h_rebased, num_pairs, inter, act_format, w2_operand, device)
    if config is None:
        config = l2_gemm_config(block_m, hidden, inter, weight_format, act_format, combine_format, arch,
                                fp8_mainloop=w2_operand is not None and w2_operand.kind != "raw",
                                act_rebased=h_rebased is not None,
                                weight_kind=None if w2_operand is None else w2_operand.kind)
    if config.block_m != block_m:
        raise ValueError(f"config.block_m = {config.block_m} differs from block_m = {block_m} (the tile map's)")
    need_mult = _COMBINE_GROUP if combine_format == "fp8" else 32
    if hidden % config.block_n != 0 or config.block_n % need_mult != 0:
        raise ValueError(f"config: block_n {config.block_n} must divide H = {hidden} and be a multiple of "
                         f"{need_mult}")
    _check_launch_device(device, _l2_kernel)
    w_kind, w_data, w_aux, w_row, tab = _weight_launch_args(
        "w2_operand", w2_operand, weight_format, act_format, arch, w2_data, w2_scale,
        (num_experts, hidden, inter), device)
    _check_block_k(config, w_kind, h_rebased is not None, inter, config.block_n)
    _check_lane("w2_operand", w2_operand, h_rebased is not None)
    _check_promote(config, w_kind, inter, device)
    _check_over(over_m, over_limit, block_m, h_rebased is not None, w_kind)
    if num_sms is None:
        num_sms = _device_num_sms(device) if device.type == "cuda" else 4
    grid = (config.grid(n_tiles * (hidden // config.block_n), num_sms),)
    if grid[0] == 0 or num_pairs == 0:
        return None
    h_src, h_sf_src = (h, h_sf) if h_rebased is None else h_rebased
    from . import l2_gluon
    promote_k = config.promote_for(inter) * config.block_k
    if l2_gluon.wanted(w_kind, config.block_m) and device.type == "cuda" and l2_gluon.applies(
            w_kind, act_format, combine_format, h_rebased is not None, config.block_m, over_m,
            fp4_table(w2_operand, False), arch, promote_k, inter):
        # the warp-specialised Gluon kernel (`l2_gluon.wanted`: by default where it measured faster)
        kernel, grid, args, kwargs = l2_gluon.l2_gluon_launch(
            h_src, h_sf_src, expert_offsets, tile_expert, tile_row_start, num_tiles, w_kind, w_data, w_aux, w_row,
            pair_dst, hidden=hidden, inter=inter, block_m=config.block_m, over_m=over_m, over_limit=over_limit,
            group_m=config.group_m, num_sms=num_sms, max_tiles=n_tiles, promote_k=promote_k,
            lane=bool(getattr(w2_operand, "lane", False)))
        return _launch_or_bind(kernel, grid, device, bind, args, kwargs)
    args, kwargs = _call_args(
            h_src, h_sf_src, expert_offsets, tile_expert, tile_row_start, num_tiles, w_data, w_aux, w_row, tab,
            pair_dst, pair_dst_sf, n_tiles,
            HIDDEN=hidden, INTER=inter, WEIGHT_FORMAT=_kernel_weight_format(w_kind, weight_format),
            ACT_FORMAT=act_format, COMBINE_FORMAT=combine_format, USE_DOT_SCALED=uses_dot_scaled(arch, weight_format, act_format),
            DOT_IN_F32=_is_interpreted(_l2_kernel), W_KIND=w_kind, SF_WORDS_P2=sf_words_p2(inter, 32),
            PROMOTE=config.promote_for(inter),
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            FP4_DECODER=_fp4_decoder(w2_operand, config), ACT_REBASED=h_rebased is not None,
            WARPS=config.num_warps, FP4_TABLE=fp4_table(w2_operand, _is_interpreted(_l2_kernel)),
            OVER_M=over_m, OVER_LIMIT=over_limit,
            enable_fp_fusion=False, **epilogue_cvt(_l2_kernel), **config.launch_options(),
        )
    grid = _resident_grid(_l2_kernel, grid, num_sms, device, args, kwargs)
    return _launch_or_bind(_l2_kernel, grid, device, bind, args, kwargs)
