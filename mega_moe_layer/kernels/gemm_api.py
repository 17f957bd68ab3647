"""The grouped-GEMM entry points the GPU forward uses (one import point for `nvshmem_backend`)."""
from __future__ import annotations

from .gemm_heuristics import TilePlan, gemm_block_m, gemm_tile_plan, max_tiles
from .l1_gemm import build_tile_map, l1_grouped_gemm
from .l2_gemm import l2_grouped_gemm

__all__ = ["build_tile_map", "l1_grouped_gemm", "l2_grouped_gemm", "max_tiles", "block_m_for",
           "tile_plan_for", "TilePlan", "SMALLEST_BLOCK_M"]

#: The smallest tile height `gemm_block_m` returns: tile-map arrays sized for it fit every call.
SMALLEST_BLOCK_M = 16


def block_m_for(num_tokens: int, topk: int, num_experts: int, num_ranks: int) -> int:
    """Tile height for a call, from what the host knows: this rank's T as a proxy for every
    rank's (the pairs reaching one local expert are about R * T * K / E)."""
    return gemm_block_m(num_ranks * num_tokens * topk / num_experts)


def tile_plan_for(num_tokens: int, topk: int, num_experts: int, num_ranks: int, over: bool = False) -> TilePlan:
    """Tile plan (one or two heights, `gemm_heuristics.gemm_tile_plan`) for a call, from the same
    proxy as `block_m_for`; over: the GEMMs can compute rows past block_m (`TilePlan.over`: the
    streamed FP8 mainloop)."""
    return gemm_tile_plan(num_ranks * num_tokens * topk / num_experts, num_experts // num_ranks, over=over)
