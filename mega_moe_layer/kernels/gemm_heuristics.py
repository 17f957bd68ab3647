"""Pure functions choosing the tiles of the grouped expert GEMMs (`l1_gemm.py`, `l2_gemm.py`).

Nothing here touches a device, a tensor or the environment: every function is a plain function of
integers and format names, tested on the CPU.

Orientation (both kernels, see `l1_gemm.py`): a program computes the transposed tile
``acc[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] . X[BLOCK_M, K]^T`` — expert weight rows on the MMA's M
side, routed pairs (tokens) on its N side. The dequantised weight is then the register operand of
Hopper's wgmma (KERNEL_NOTES: the upcast operand belongs on the left) and a handful of tokens per
expert (decode) costs an MMA N of 16, not a padded M of 64.

Every config keeps:
  * ``block_k == 128``: one FP8 weight block (128 x 128) and one act group of 128 per K step, four
    groups of 32; the per-128 block scale of FP8 weights multiplies exactly one partial product.
  * ``block_n`` divides the output width (I for L1, H for L2) and is a multiple of 32 (L1: h
    groups) or 128 (L2 with the FP8 combine: groups of 128), so no weight load is masked.
  * ``block_m`` is the tile height of the tile map (`build_tile_map`): the caller builds the map
    with the same value the kernels get.
"""
from __future__ import annotations

import dataclasses

__all__ = ["GroupedGemmConfig", "max_tiles", "gemm_block_m", "l1_gemm_config", "l2_gemm_config",
           "uses_dot_scaled", "GEMM_BLOCK_MS", "GEMM_BLOCK_K"]

#: Tile heights the kernels are built for (the MMA N side: multiples of 16 up to 128).
GEMM_BLOCK_MS = (16, 32, 64, 128)
#: K step of both kernels (see the module docstring).
GEMM_BLOCK_K = 128
_WEIGHT_FORMATS = ("mxfp4", "fp8", "bf16")
_ACT_FORMATS = ("fp8", "fp4", "bf16")


@dataclasses.dataclass(frozen=True)
class GroupedGemmConfig:
    """Launch parameters of one grouped GEMM.

    Attributes:
        block_m: routed pairs per tile (the tile map's tile height; MMA N side).
        block_n: output columns per program (L1: columns of gate AND of up; MMA M side).
        block_k: reduction step (always 128).
        group_m: tiles that share a band of programs sweeping all N blocks (L2-cache reuse of the
            x tiles and of an expert's weight slab at prefill sizes; irrelevant at decode).
        num_warps, num_stages: Triton launch options.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def max_tiles(max_pairs: int, num_local_experts: int, block_m: int) -> int:
    """Upper bound on the tiles of `block_m` pairs over `num_local_experts` expert segments that
    hold `max_pairs` pairs in all: sum_e ceil(n_e / bm) <= ceil(sum n_e / bm) + E.

    Example: max_tiles(100, 3, 16) == 7 + 3 == 10.
    """
    for v, name in ((max_pairs, "max_pairs"), (num_local_experts, "num_local_experts"), (block_m, "block_m")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if max_pairs < 0 or num_local_experts < 1 or block_m < 1:
        raise ValueError(f"max_tiles: expected max_pairs >= 0, num_local_experts >= 1, block_m >= 1; got "
                         f"{max_pairs}, {num_local_experts}, {block_m}")
    return _cdiv(max_pairs, block_m) + num_local_experts


def gemm_block_m(expected_pairs_per_expert: float) -> int:
    """Tile height from the expected number of routed pairs per local expert.

    The true counts live on the device (the kernels never synchronise), so this is a hint the host
    knows, e.g. ``num_tokens * topk / num_experts`` of this rank's own batch.
    """
    if expected_pairs_per_expert < 0:
        raise ValueError(f"expected_pairs_per_expert: expected >= 0, got {expected_pairs_per_expert}")
    if expected_pairs_per_expert <= 16:
        # Decode: a few tokens per expert. 16 is the smallest MMA N that keeps the tensor cores
        # busy; the kernel is weight-bandwidth bound and padding rows cost nothing but registers.
        return 16
    if expected_pairs_per_expert <= 32:
        # Small-batch decode / speculative decoding (tens of tokens per expert).
        return 32
    if expected_pairs_per_expert <= 96:
        # Mixed / chunked prefill: a tile of 64 rows amortises each weight slab over more tokens.
        return 64
    # Prefill (hundreds of tokens per expert): compute bound; the largest tile the registers hold.
    return 128


def uses_dot_scaled(arch: int, weight_format: str, act_format: str) -> bool:
    """Whether the kernels take the native block-scaled MMA path (`tl.dot_scaled`).

    Blackwell datacenter parts (sm_100 / sm_103 / sm_110: tcgen05) with MXFP4 weights and FP8 or
    FP4 activations; every other combination dequantises to bf16 in registers (Hopper's only path:
    `tl.dot_scaled` has no FP8/FP4 MMA there and would upcast anyway).
    """
    return arch // 10 in (10, 11) and weight_format == "mxfp4" and act_format in ("fp8", "fp4")


def _check_common(block_m: int, hidden: int, intermediate: int, weight_format: str, act_format: str) -> None:
    if block_m not in GEMM_BLOCK_MS:
        raise ValueError(f"block_m: expected one of {GEMM_BLOCK_MS}, got {block_m!r}")
    if weight_format not in _WEIGHT_FORMATS:
        raise ValueError(f"weight_format: expected one of {_WEIGHT_FORMATS}, got {weight_format!r}")
    if act_format not in _ACT_FORMATS:
        raise ValueError(f"act_format: expected one of {_ACT_FORMATS}, got {act_format!r}")
    for v, name in ((hidden, "hidden"), (intermediate, "intermediate")):
        if v <= 0 or v % GEMM_BLOCK_K != 0:
            raise ValueError(f"{name}: expected a positive multiple of {GEMM_BLOCK_K}, got {v}")


def _largest_dividing(n: int, candidates) -> int:
    for c in candidates:
        if n % c == 0:
            return c
    raise ValueError(f"no block size in {tuple(candidates)} divides {n}")


def l1_gemm_config(block_m: int, hidden: int, intermediate: int, weight_format: str, act_format: str,
                   arch: int = 90) -> GroupedGemmConfig:
    """Tiles of the L1 kernel (x [., H] -> gate/up [., I] each, SwiGLU, requantised h).

    A program holds two accumulators (gate and up), 2 * block_n * block_m float32 values, plus the
    dequantised bf16 weight tiles of both (2 * block_n * 128 values per K step).
    """
    _check_common(block_m, hidden, intermediate, weight_format, act_format)
    if block_m <= 32:
        # Decode: weight-bandwidth bound. block_n 128 rows of gate + 128 of up per program, so each
        # (expert, 128-row) weight slab is read once per call; 8 warps give two warpgroups (64
        # MMA rows each) and keep the two dequantised 128 x 128 bf16 tiles out of spills.
        block_n = _largest_dividing(intermediate, (128, 64, 32))
        num_warps, num_stages = 8, 3
    else:
        # Prefill: compute bound. 64 rows of gate + 64 of up against 64-128 tokens keeps both
        # accumulators at 64 registers per thread with 8 warps.
        block_n = _largest_dividing(intermediate, (64, 32))
        num_warps, num_stages = 8, 3
    if weight_format == "bf16" and act_format == "bf16":
        # Raw bf16 operands are 4x the bytes of MXFP4 per stage: two stages fit shared memory.
        num_stages = 2
    return GroupedGemmConfig(block_m=block_m, block_n=block_n, block_k=GEMM_BLOCK_K, group_m=8,
                             num_warps=num_warps, num_stages=num_stages)


def l2_gemm_config(block_m: int, hidden: int, intermediate: int, weight_format: str, act_format: str,
                   combine_format: str = "bf16", arch: int = 90) -> GroupedGemmConfig:
    """Tiles of the L2 kernel (h [., I] -> y [., H], stored to per-pair destination rows).

    With the FP8 combine a program quantises whole groups of 128 output columns, so block_n is a
    multiple of 128 (H is one: the config requires H % 512 == 0 then).
    """
    _check_common(block_m, hidden, intermediate, weight_format, act_format)
    if combine_format not in ("bf16", "fp8"):
        raise ValueError(f"combine_format: expected 'bf16' or 'fp8', got {combine_format!r}")
    # Decode and prefill alike: 128 weight rows (output columns) per program, one accumulator of
    # 128 x block_m. Decode (block_m <= 32): 4 warps, deep pipeline (weight streaming, K = I is
    # short); prefill: 8 warps so a 128 x 128 accumulator is 64 registers per thread.
    block_n = _largest_dividing(hidden, (128,)) if combine_format == "fp8" else \
        _largest_dividing(hidden, (128, 64, 32))
    if block_m <= 32:
        num_warps, num_stages = 4, 4
    else:
        num_warps, num_stages = 8, 3
    if weight_format == "bf16" and act_format == "bf16":
        num_stages = min(num_stages, 3)
    return GroupedGemmConfig(block_m=block_m, block_n=block_n, block_k=GEMM_BLOCK_K, group_m=8,
                             num_warps=num_warps, num_stages=num_stages)
