"""Rebase quantised activation rows to one exponent per row, where they land (Hopper FP8 path).

`rebase_act_rows` turns rows of FP8 or FP4 activations with power-of-two (UE8M0) group scales into
E4M3 bytes against one exponent per row (`reference.rebase_act`, bitwise): the largest of the row's
group scales, every group's values shifted down by its distance from it. Then the grouped GEMMs
stream the act operand straight into the FP8 MMA with nothing to decode in the K loop
(`l1_gemm._fp8_mainloop`); the row factor 2**(E - 127 - headroom) is applied in the epilogue.

Uses per forward (`nvshmem_backend`): h after L1, over the pair positions; and FP4 x (or FP8 x
with `nvshmem_backend.STAGE_REBASE` off; by default the pre-dispatch kernel rebases FP8 x as it
quantises it) after the dispatch, over the pool rows this call received (the fill kernel lists
each once, `dispatch._fill_kernel`'s RECV_LIST). Both read their row count on the device (no
host sync, graph-safe): a static persistent grid whose programs loop over (block of rows, K
chunk) items below it. (With a `rows` list that repeats a row, e.g. the pairs' `pair_rows`, the
row is written repeatedly with the same bytes.)

Exact except where rebasing rounds: a value more than ~2**8 below its row's largest group scale
falls under E4M3's normal range there and rounds (by at most 2**-10 of the row's base scale,
`reference.rebase_rows`).

Example (fp8, group 32, a row of 64 values): group scales 2**-3 and 2**-6 -> E = 124 (2**-3); the
first group's bytes are copied, the second's values are multiplied by 2**-3 and rounded to E4M3
(1.5 -> 0.1875, exact), and the row exponent 124 is stored.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._launch import Launcher
from .gemm_operands import e2m1_table
from .sync import pdl_enter
from .l1_gemm import (_act_tile_e4m3, _check_tensor, _device_num_sms, _is_interpreted, _launch_or_bind,
                      _call_args, _row_max_exponent, sf_words_p2)

__all__ = ["order_pair_rows", "rebase_act_rows"]


@triton.jit(do_not_specialize=["max_rows"])
def _rebase_rows_kernel(src_ptr, sf_ptr, tab_ptr, dst_ptr, e_ptr, rows_ptr, count_ptr, max_rows,
                        K: tl.constexpr, GROUP: tl.constexpr, SF_WORDS: tl.constexpr, SF_WORDS_P2: tl.constexpr,
                        ACT_FORMAT: tl.constexpr, INDIRECT: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_K: tl.constexpr, FAST: tl.constexpr, PDL: tl.constexpr = False,
                        LANE_K: tl.constexpr = False):
    """Rows i < min(count, max_rows) (row = rows_ptr[i] if INDIRECT else i): dst[row] = the rebased
    E4M3 bytes of src[row] (scales sf[row]), e[row] = its row exponent. LANE_K: dst[row] in the
    "lane" K order (`reference.to_lane_order`)."""
    if PDL:
        pdl_enter()
    n = tl.minimum(tl.load(count_ptr), max_rows)
    NUM_K: tl.constexpr = K // BLOCK_K
    # Work items (block of BLOCK_R rows, one BLOCK_K chunk): a handful of rows (decode) still
    # spreads over K / BLOCK_K programs. Every item recomputes its rows' exponent from the scales
    # (K / GROUP bytes a row); the first chunk's item stores it.
    for work in range(tl.program_id(0), tl.cdiv(n, BLOCK_R) * NUM_K, tl.num_programs(0)):
        blk = work // NUM_K
        kt = work % NUM_K
        i = blk * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = i < n
        if INDIRECT:
            rows64 = tl.load(rows_ptr + i, mask=ok, other=0).to(tl.int64)
        else:
            rows64 = i.to(tl.int64)
        e_row = _row_max_exponent(sf_ptr, rows64, ok, SF_WORDS, SF_WORDS_P2)
        tile = _act_tile_e4m3(src_ptr, sf_ptr, tab_ptr, rows64, ok, kt, e_row, K, GROUP, BLOCK_R, BLOCK_K,
                              ACT_FORMAT, FAST)
        if LANE_K:
            # column 32 c + 8 g + 4 h + b of each 128 to position 32 g + 16 h + 4 c + b
            t6 = tl.reshape(tile, (BLOCK_R, BLOCK_K // 128, 4, 4, 2, 4))
            tile = tl.reshape(tl.permute(t6, (0, 1, 3, 4, 2, 5)), (BLOCK_R, BLOCK_K))
        cols = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(dst_ptr + rows64[:, None] * K + cols[None, :], tile, mask=ok[:, None])
        if kt == 0:
            tl.store(e_ptr + rows64, e_row, mask=ok)


@triton.jit(do_not_specialize=["max_rows"])
def _order_rows_kernel(src_ptr, rows_ptr, count_ptr, dst_ptr, max_rows, WORDS: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_W: tl.constexpr, PDL: tl.constexpr = False):
    """dst[i] = src[rows[i]] for i < min(count, max_rows): rows of WORDS int32 words."""
    if PDL:
        pdl_enter()
    n = tl.minimum(tl.load(count_ptr), max_rows)
    NUM_W: tl.constexpr = WORDS // BLOCK_W
    for work in range(tl.program_id(0), tl.cdiv(n, BLOCK_R) * NUM_W, tl.num_programs(0)):
        i = (work // NUM_W) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = i < n
        src_rows = tl.load(rows_ptr + i, mask=ok, other=0).to(tl.int64)
        w = (work % NUM_W) * BLOCK_W + tl.arange(0, BLOCK_W)
        v = tl.load(src_ptr + src_rows[:, None] * WORDS + w[None, :], mask=ok[:, None])
        tl.store(dst_ptr + i.to(tl.int64)[:, None] * WORDS + w[None, :], v, mask=ok[:, None])


def order_pair_rows(src: torch.Tensor, rows: torch.Tensor, count: torch.Tensor, dst: torch.Tensor, *,
                    num_sms: Optional[int] = None, bind: bool = False) -> Optional[Launcher]:
    """Copy rebased rows into pair order: dst[i] = src[rows[i]] for i < count[0] (clamped to
    rows' length), so that L1's prefill tiles read each tile's token rows as one TMA box
    (`l1_gluon`'s PAIR_X) instead of gathering them row by row.

    Args (N = rows of src, K = columns, P = pairs capacity):
        src: float8_e4m3fn [N, K] (`rebase_act_rows`' dst), K a multiple of 16.
        rows: int32 [P]: the pool row of each pair (`pair_rows`).
        count: int32 [>= 1] on the device: element 0 is the number of pairs.
        dst: float8_e4m3fn [P, K]; rows from count on are not written.
        bind: return a bound `Launcher` instead of launching.
    A byte copy: the values are src's, bit for bit.
    """
    if not isinstance(src, torch.Tensor) or src.dim() != 2:
        raise ValueError("src: expected a 2-D float8_e4m3fn tensor [N, K]")
    device = src.device
    n, k = src.shape
    if k % 16 != 0:
        raise ValueError(f"src: expected K (= {k}) a multiple of 16")
    _check_tensor(src, "src", torch.float8_e4m3fn, (n, k), device)
    _check_tensor(rows, "rows", torch.int32, (rows.numel(),), device)
    p = rows.numel()
    _check_tensor(dst, "dst", torch.float8_e4m3fn, (p, k), device)
    if not isinstance(count, torch.Tensor) or count.dtype != torch.int32 or count.numel() < 1 \
            or count.device != device:
        raise ValueError(f"count: expected an int32 tensor of >= 1 element on {device}")
    if p == 0 or n == 0:
        return None
    if num_sms is None:
        num_sms = _device_num_sms(device) if device.type == "cuda" else 4
    words = k // 4
    block_w = max(w for w in (512, 256, 128, 64, 32, 16, 8, 4) if words % w == 0)
    block_r = 4
    grid = (max(1, min(triton.cdiv(p, block_r) * (words // block_w), 8 * num_sms)),)
    return _launch_or_bind(_order_rows_kernel, grid, device, bind, *_call_args(
        src.view(torch.int32), rows, count, dst.view(torch.int32), p, WORDS=words, BLOCK_R=block_r, BLOCK_W=block_w,
        num_warps=4))


def rebase_act_rows(src: torch.Tensor, src_sf: torch.Tensor, dst: torch.Tensor, dst_e: torch.Tensor,
                    count: torch.Tensor, *, act_format: str, group: int, rows: Optional[torch.Tensor] = None,
                    num_sms: Optional[int] = None, bind: bool = False, lane_k: bool = False) -> Optional[Launcher]:
    """Rebase rows of quantised activations (see the module docstring).

    Args (N = rows of src, K = columns):
        src: float8_e4m3fn [N, K] (act_format "fp8") | int8 [N, K/2] packed E2M1 ("fp4").
        src_sf: int32 [N, K/group/4] packed UE8M0 (byte j of word i = group 4i + j).
        dst: float8_e4m3fn [N, K] rebased bytes; dst_e: int32 [N] row exponents (biased; the row
            factor is 2**(e - 127 - headroom), headroom 0 for fp8 and 6 for fp4).
        count: int32 [>= 1] on the device: element 0 is the number of rows to rebase, clamped to
            the capacity (rows' length if given, else N).
        rows: optional int32 [M]: rebase rows rows[0 .. count) (repeats allowed: they write the
            same bytes) instead of rows 0 .. count.
        bind: return a bound `Launcher` instead of launching (as the grouped GEMMs).
        lane_k: write dst's rows in the "lane" K order (`reference.to_lane_order`), the order a
            GEMM whose 4-bit weights are laid out so (`WeightOperand.lane`) multiplies.
    Only rows below the count are written.
    """
    if not isinstance(lane_k, bool):
        raise TypeError(f"lane_k: expected a bool, got {type(lane_k).__name__}")
    if act_format not in ("fp8", "fp4"):
        raise ValueError(f"act_format: expected 'fp8' or 'fp4', got {act_format!r}")
    if group not in (32, 128):
        raise ValueError(f"group: expected 32 or 128, got {group!r}")
    if not isinstance(src, torch.Tensor) or src.dim() != 2:
        raise ValueError("src: expected a 2-D tensor [N, K (or K/2)]")
    device = src.device
    n, k = src.shape[0], src.shape[1] * (2 if act_format == "fp4" else 1)
    if k % (4 * group) != 0 or k % 128 != 0:
        raise ValueError(f"src: expected K (= {k}) a multiple of 128 and of 4 * group")
    _check_tensor(src, "src", torch.float8_e4m3fn if act_format == "fp8" else (torch.int8, torch.uint8),
                  (n, k if act_format == "fp8" else k // 2), device)
    _check_tensor(src_sf, "src_sf", torch.int32, (n, k // group // 4), device)
    _check_tensor(dst, "dst", torch.float8_e4m3fn, (n, k), device)
    _check_tensor(dst_e, "dst_e", torch.int32, (n,), device)
    if not isinstance(count, torch.Tensor) or count.dtype != torch.int32 or count.numel() < 1 \
            or count.device != device:
        raise ValueError(f"count: expected an int32 tensor of >= 1 element on {device}")
    if rows is not None:
        _check_tensor(rows, "rows", torch.int32, (rows.numel(),), device)
        capacity = rows.numel()
    else:
        capacity = n
    if capacity == 0 or n == 0:
        return None
    if num_sms is None:
        num_sms = _device_num_sms(device) if device.type == "cuda" else 4
    block_r, block_k = 4, 512 if k % 512 == 0 else 128
    grid = (max(1, min(triton.cdiv(capacity, block_r) * (k // block_k), 8 * num_sms)),)
    tab = e2m1_table(device)
    src_view = src.view(torch.int8) if act_format == "fp4" else src
    return _launch_or_bind(_rebase_rows_kernel, grid, device, bind, *_call_args(
        src_view, src_sf, tab, dst, dst_e, rows if rows is not None else dst_e, count, capacity,
        K=k, GROUP=group, SF_WORDS=k // group // 4, SF_WORDS_P2=sf_words_p2(k, group), ACT_FORMAT=act_format,
        INDIRECT=rows is not None, BLOCK_R=block_r, BLOCK_K=block_k,
        FAST=not _is_interpreted(_rebase_rows_kernel), num_warps=4, **(dict(LANE_K=True) if lane_k else {})))
