"""Combine reduce: y[t] = bf16(sum over k ascending of y_k), in float32 (DESIGN step 7).

The rows y_k were stored by the owners' L2 epilogues into this rank's `combine` slot at (t, k):
bf16 [T_max, K, H], or e4m3 [T_max, K, H] + packed UE8M0 int32 [T_max, K, H/128/4]. Slots whose id
is -1 (masked) or out of [0, E) add 0; out-of-range ids also bump the error counter (counted by
the programs of the first H block only, so each slot is counted once).

Worked example (K = 2, H = 2, bf16 combine): topk_idx[t] = [3, -1], combine[t] = [[1, 2], [9, 9]]
-> y[t] = [1, 2] (slot 1 is masked, its stale row is never read).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .sync import pdl_enter

__all__ = ["combine_reduce"]


@triton.jit
def _bf16_rne_bits(v):
    """float32 -> bfloat16 bit pattern (int16), round-to-nearest-even, by integer ops.

    NOTE: integer ops make the CPU interpreter (which mis-rounds float casts) bit-faithful; inputs
    are finite here.
    """
    b = v.to(tl.int32, bitcast=True)
    b = b + 0x7FFF + ((b >> 16) & 1)
    return (b >> 16).to(tl.int16)


@triton.jit
def _combine_row(comb_ptr, comb_sf_ptr, idx_ptr, y_ptr, err_ptr, t64, hb, num_experts,
                 H: tl.constexpr, K: tl.constexpr, FP8: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[t, hb-th BLOCK_H columns] (t64: int64 row)."""
    cols = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    cm = cols < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    num_bad = 0
    # NOTE: no atomic inside the loop: one would order every later load after it (a possibly
    # aliasing write), chaining the K row loads; counted here, added once below.
    for k in tl.static_range(K):
        e = tl.load(idx_ptr + t64 * K + k)
        valid = (e >= 0) & (e < num_experts)
        vm = cm & ((cols * 0 + valid.to(tl.int32)) > 0)                # [BLOCK_H] bool
        row = (t64 * K + k) * H
        if FP8:
            q = tl.load(comb_ptr + row + cols, mask=vm, other=0.0).to(tl.float32)
            # NOTE: ceil(H / 512) words per row: H need only be a multiple of 128.
            word = tl.load(comb_sf_ptr + (t64 * K + k) * ((H + 511) // 512) + cols // 512, mask=vm, other=0)
            ebits = (word >> ((cols // 128) % 4 * 8)) & 0xFF
            scale = (ebits << 23).to(tl.float32, bitcast=True)      # 2**(e-127), e in [1, 254]
            v = q * scale
        else:
            v = tl.load(comb_ptr + row + cols, mask=vm, other=0.0).to(tl.float32)
        acc += v
        num_bad += ((e < -1) | (e >= num_experts)).to(tl.int32)
    tl.store(y_ptr + t64 * H + cols, _bf16_rne_bits(acc), mask=cm)
    if hb == 0:
        tl.atomic_add(err_ptr, num_bad, mask=num_bad > 0, sem="relaxed")


@triton.jit(do_not_specialize=["T"])
def _combine_kernel(comb_ptr, comb_sf_ptr, idx_ptr, y_ptr, err_ptr, T, num_experts, info_ptr,
                    H: tl.constexpr, K: tl.constexpr, FP8: tl.constexpr, BLOCK_H: tl.constexpr,
                    INFO_ON_DEVICE: tl.constexpr, PDL: tl.constexpr = False):
    """Program (t, hb): row t, columns of H block hb. INFO_ON_DEVICE: y's address and T are read
    from info_ptr (int64 [2], written by this call's pre-dispatch; y_ptr and T unused) and the
    programs stride over the rows: one launch (or one CUDA-graph node) serves every token count."""
    if PDL:
        pdl_enter()
    hb = tl.program_id(1)
    if INFO_ON_DEVICE:
        y_dev = tl.load(info_ptr).to(tl.pointer_type(tl.int16))
        n = tl.load(info_ptr + 1)
        for t in range(tl.program_id(0), n, tl.num_programs(0)):
            _combine_row(comb_ptr, comb_sf_ptr, idx_ptr, y_dev, err_ptr, tl.cast(t, tl.int64), hb, num_experts,
                         H, K, FP8, BLOCK_H)
    else:
        _combine_row(comb_ptr, comb_sf_ptr, idx_ptr, y_ptr, err_ptr, tl.program_id(0).to(tl.int64), hb,
                     num_experts, H, K, FP8, BLOCK_H)


def combine_reduce(combine: torch.Tensor, combine_sf, topk_idx: torch.Tensor, y: torch.Tensor,
                   error_counter: torch.Tensor, num_experts: int, block_h: int = 1024) -> None:
    """y bf16 [T, H] <- reduce of combine [>=T, K, H] (bf16 or e4m3) by topk_idx int32 [>=T, K].

    combine_sf: int32 [>=T, K, ceil(H/512)] for an e4m3 combine, else None. error_counter int32 [1].
    """
    T, H = y.shape
    if T == 0:
        return
    grid, args, kwargs = combine_args(combine, combine_sf, topk_idx, y, error_counter, num_experts,
                                      block_h)
    _combine_kernel[grid](*args, **kwargs)


def combine_args(combine: torch.Tensor, combine_sf, topk_idx: torch.Tensor, y: torch.Tensor,
                 error_counter: torch.Tensor, num_experts: int, block_h: int = 1024,
                 call_info: Optional[torch.Tensor] = None, row_programs: int = 0):
    """(grid, args, kwargs) of one `_combine_kernel` launch (arguments as `combine_reduce`, T > 0).
    The kernel's `y_ptr` is y viewed as int16 (bf16 bits).

    call_info: int64 [2] (y address, T) written on the device by the call's pre-dispatch; then y
    only gives H and the grid has `row_programs` rows of programs striding over the tokens.
    """
    T, H = y.shape
    K = topk_idx.shape[1]
    fp8 = combine.dtype == torch.float8_e4m3fn
    on_dev = call_info is not None
    grid = (row_programs if on_dev else T, triton.cdiv(H, block_h))
    args = (combine, combine_sf if fp8 else combine, topk_idx, y.view(torch.int16), error_counter, T,
            num_experts, call_info)
    return grid, args, dict(H=H, K=K, FP8=fp8, BLOCK_H=block_h, INFO_ON_DEVICE=on_dev, num_warps=4)
