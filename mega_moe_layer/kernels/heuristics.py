"""Pure functions choosing tile sizes, warps and grids from the problem shape.

Nothing here touches a device, a tensor or the environment: every function is a plain function of
integers, tested on the CPU. Each kernel family has its own clearly marked section; each branch says
which workload it serves.
"""
from __future__ import annotations

import dataclasses

__all__ = ["PreDispatchConfig", "pre_dispatch_config", "next_power_of_2", "cdiv"]

#: SM count of an H100 SXM; the default when the caller does not pass the device's count.
DEFAULT_NUM_SMS = 132


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of non-negative ints."""
    return -(-int(a) // int(b))


# =================================================================================================
# Pre-dispatch (kernels/pre_dispatch.py): quantise x per group + copy top-k + pad, one launch.
# =================================================================================================
#: Group sizes (elements of x sharing one UE8M0 scale) the pre-dispatch kernel supports.
PRE_DISPATCH_GROUP_SIZES = (32, 64, 128)
#: Elements of one row a program quantises at most (7 programs across H = 7168, no masked tail).
_PRE_DISPATCH_MAX_BLOCK_H = 1024
#: Rows of the top-k arrays one top-k program copies / pads.
_PRE_DISPATCH_TOPK_BLOCK_ROWS = 64
#: Interpreter programs: at most this many elements of x, and this many top-k rows, each.
_INTERPRETER_MAX_ELEMENTS = 1 << 16
_INTERPRETER_TOPK_BLOCK_ROWS = 1024


@dataclasses.dataclass(frozen=True)
class PreDispatchConfig:
    """Launch parameters of the pre-dispatch kernel.

    Attributes:
        block_m: token rows per quantisation program.
        block_w: packed scale words (4 groups each, i.e. 4 * group_size elements of x) per program
            along H; a power of two.
        num_col_blocks: quantisation programs across one row, cdiv(H / (4 * group_size), block_w).
        topk_block_rows: rows of topk_idx / topk_weights per top-k program.
        num_warps: warps per program.
    """

    block_m: int
    block_w: int
    num_col_blocks: int
    topk_block_rows: int
    num_warps: int

    def num_x_programs(self, num_rows: int) -> int:
        """Quantisation programs for `num_rows` token rows."""
        return cdiv(num_rows, self.block_m) * self.num_col_blocks

    def num_topk_programs(self, num_topk_rows: int) -> int:
        """Top-k copy / pad programs for `num_topk_rows` rows of the top-k buffers."""
        return cdiv(num_topk_rows, self.topk_block_rows)


def pre_dispatch_config(num_rows: int, hidden: int, group_size: int, num_sms: int = DEFAULT_NUM_SMS,
                        interpreter: bool = False, use_fp4: bool = False,
                        whole_rows: bool = False) -> PreDispatchConfig:
    """Tiles of the pre-dispatch kernel for `num_rows` tokens (an upper bound) of width `hidden`.

    The kernel is a pure streaming pass (read 2 bytes, write 1 or 0.5 + scales per element), so
    the goal is enough bytes in flight per SM with little masked waste:

    * Along H a program covers up to 1024 elements (a whole number of 4-group scale words), so
      H = 7168 splits into 7 full column blocks whatever the group size, and H = 1024 into one.
    * Along T, rows per program grow (1 -> 2 [-> 4]) only while the grid still has >= 4 programs
      per SM: decode-sized batches (T <= ~128 at H = 7168) keep one row per program so all SMs
      stream. FP8 (the hardware conversion: bandwidth-bound, as fast as a same-size `copy_`)
      stops at 2 rows (4 KB of bf16 per program: more, smaller programs in flight); FP4 (no
      hardware E2M1 conversion on Hopper: issue-bound) takes 4 rows (8 KB), so fewer, fatter
      programs amortise index math. Each was the fastest (within ~2% run-to-run noise) of 1/2/4/8
      rows and 4/8 warps on an H200 at T = 1024-8192, H = 7168 (bench_pre_dispatch.py --sweep).
    * `whole_rows=True` (the kernel's REBASE: each row rebased to its largest group scale, which
      one program must see): one row per program across all of H, 8 warps from 4096 elements
      (H = 7168: 8192 lanes, 32 elements a thread); at decode one program per row instead of
      H / 1024, each with a whole row's bytes in flight.
    * `interpreter=True` (CPU tensors, Triton's interpreter): the interpreter pays a fixed Python
      cost per program and vectorises within one, so programs are as large as possible (a whole
      row, up to 64 rows or 64K elements).
    """
    if group_size not in PRE_DISPATCH_GROUP_SIZES:
        raise ValueError(f"group_size: expected one of {PRE_DISPATCH_GROUP_SIZES}, got {group_size!r}")
    if hidden <= 0 or hidden % (4 * group_size) != 0:
        raise ValueError(f"hidden: expected a positive multiple of 4 * group_size = {4 * group_size}, "
                         f"got {hidden}")
    if num_rows < 0:
        raise ValueError(f"num_rows: expected >= 0, got {num_rows}")
    words_per_row = hidden // (4 * group_size)
    if interpreter:
        block_w = next_power_of_2(words_per_row)
        block_m = max(1, min(next_power_of_2(num_rows), 64, _INTERPRETER_MAX_ELEMENTS // (block_w * 4 * group_size)))
        block_m = 1 << (block_m.bit_length() - 1)  # a power of two
        return PreDispatchConfig(block_m=block_m, block_w=block_w, num_col_blocks=1,
                                 topk_block_rows=_INTERPRETER_TOPK_BLOCK_ROWS, num_warps=4)
    if whole_rows:
        block_w = next_power_of_2(words_per_row)
        return PreDispatchConfig(block_m=1, block_w=block_w, num_col_blocks=1,
                                 topk_block_rows=_PRE_DISPATCH_TOPK_BLOCK_ROWS,
                                 num_warps=8 if block_w * 4 * group_size >= 4096 else 4)
    block_w = min(next_power_of_2(words_per_row), max(1, _PRE_DISPATCH_MAX_BLOCK_H // (4 * group_size)))
    num_col_blocks = cdiv(words_per_row, block_w)

    target_programs = 4 * max(1, num_sms)
    block_m = 1
    for bm in (4, 2) if use_fp4 else (2,):  # the largest that still fills the machine
        if cdiv(num_rows, bm) * num_col_blocks >= target_programs:
            block_m = bm
            break
    return PreDispatchConfig(block_m=block_m, block_w=block_w, num_col_blocks=num_col_blocks,
                             topk_block_rows=_PRE_DISPATCH_TOPK_BLOCK_ROWS, num_warps=4)


# =================================================================================================
# (other kernels: add their sections below)
# =================================================================================================
