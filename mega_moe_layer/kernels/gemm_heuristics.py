"""Pure functions choosing the tiles of the grouped expert GEMMs (`l1_gemm.py`, `l2_gemm.py`).

Nothing here touches a device, a tensor or the environment: every function is a plain function of
integers and format names, tested on the CPU.

Orientation (both kernels, see `l1_gemm.py`): a work item computes the transposed tile
``acc[R, BLOCK_M] = W[R, K] . X[BLOCK_M, K]^T`` — expert weight rows on the MMA's M side (R =
2 * block_n stacked gate and up rows in L1, block_n in L2), routed pairs (tokens) on its N side. The dequantised weight is then the register operand of
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
import functools
import math
from typing import Optional

__all__ = ["GroupedGemmConfig", "max_tiles", "gemm_block_m", "l1_gemm_config", "l2_gemm_config",
           "uses_dot_scaled", "GEMM_BLOCK_MS", "GEMM_BLOCK_K", "expected_tiles", "TILE_COST",
           "TilePlan", "gemm_tile_plan", "split_counts", "TAIL_LAUNCH_COST", "resident_ctas", "register_cap"]

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
        block_k: reduction step: 128, or 256 for 4-bit MXFP4 decode tiles on the streamed mainloop.
        group_m: tiles that share a band of programs sweeping all N blocks (L2-cache reuse of the
            x tiles and of an expert's weight slab at prefill sizes; irrelevant at decode).
        num_warps, num_stages: Triton launch options.
        ctas_per_sm: persistent CTAs launched per SM (the grid is min(work items, SMs x this));
            what the registers / shared memory of one CTA let reside at once.
        fp4_decoder: see the field.
        promote_steps: FP8 mainloop only: K steps (of block_k) accumulated by the FP8 MMA before
            the partial sum is added to the float32 accumulator (Hopper's FP8 MMA accumulates with
            reduced precision; see `l1_gemm`). The kernels use the largest divisor of K / block_k
            not above it (`promote_for`).
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int = 1
    # H200, decode L1 (T 1 / 128): 104.7 / 801 us at 1, 130 / 1001 at 4, 161 at 8; 16 misses the
    # 5e-3 tolerance (rel-RMSE 1.1e-2): promote after every 128-K step.
    promote_steps: int = 1
    #: bf16 mainloop, MXFP4 weights, GPU: the in-register E2M1 -> bf16 decoder, "shift"
    #: (`l1_gemm._fp4_pairs_bf16_asm`) or "lut" (`_fp4_pairs_bf16_lut_asm`: the same values, bitwise
    #: on the H200, from PRMT tables, fewer instructions but slower there: decode L1 80.4 vs 75.4 us
    #: at T 1, 606 vs 565 at T 128; prefill within +-4%). "shift" stays the default.
    fp4_decoder: str = "shift"
    #: ptxas's register cap per thread (Triton's `maxnreg`), None (every default): ptxas chooses.
    #: For sweeps of configs where a kernel takes a few registers more than ctas_per_sm resident
    #: CTAs allow (`register_cap`): e.g. the 4-bit decode tile at 32 pairs, 151 registers (3 CTAs of
    #: 4 warps) uncapped, 126 and no spills at a cap of 128 (4 CTAs; Triton 3.6, sm_90a) - measured
    #: slower in the layer (FP4_STREAM_DECODE_M32).
    max_registers: Optional[int] = None

    def __post_init__(self):
        if self.fp4_decoder not in ("shift", "lut"):
            raise ValueError(f"fp4_decoder: expected 'shift' or 'lut', got {self.fp4_decoder!r}")
        r = self.max_registers
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or not 24 <= r <= 255 or r % 8):
            raise ValueError(f"max_registers: expected None or a multiple of 8 in [24, 255], got {r!r}")

    def launch_options(self) -> dict:
        """Triton launch options of this config (num_warps, num_stages, maxnreg when capped)."""
        opts = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_registers is not None:
            opts["maxnreg"] = self.max_registers
        return opts

    def promote_for(self, k: int) -> int:
        """PROMOTE for a reduction of k: the largest divisor of k / block_k <= promote_steps.
        Example: k 7168 (56 steps), promote_steps 4 -> 4; k 2560 (20 steps), 8 -> 5."""
        steps = max(1, int(k) // self.block_k)
        return max(d for d in range(1, max(1, min(self.promote_steps, steps)) + 1) if steps % d == 0)

    def grid(self, num_work_items: int, num_sms: int) -> int:
        """Programs of the persistent grid: every SM busy, never more programs than work items."""
        return max(0, min(int(num_work_items), max(1, int(num_sms)) * self.ctas_per_sm))


def resident_ctas(num_regs: int, num_warps: int, shared_bytes: int, regs_per_sm: int = 65536,
                  smem_per_sm: int = 233472, max_threads_per_sm: int = 2048) -> int:
    """CTAs of one compiled kernel that fit on an SM at once (Hopper's limits by default): registers
    are allocated per warp in units of 256 (num_regs x 32 rounded up), shared memory per CTA with
    1 KB reserved. A persistent grid larger than SMs x this leaves CTAs waiting for a whole
    earlier CTA to finish (a second, partial wave). Example: 205 registers x 4 warps -> 2 (3 x 4 x
    6656 > 65536); 151 -> 3; 255 x 4 warps with 59 KB -> 2."""
    per_warp = -(-max(int(num_regs), 1) * 32 // 256) * 256
    by_regs = int(regs_per_sm) // (per_warp * int(num_warps))
    by_smem = int(smem_per_sm) // (int(shared_bytes) + 1024)
    by_threads = int(max_threads_per_sm) // (32 * int(num_warps))
    return max(1, min(by_regs, by_smem, by_threads, 32))


def register_cap(num_warps: int, ctas_per_sm: int, regs_per_sm: int = 65536) -> int:
    """The most registers per thread (a multiple of 8, <= 255) at which `ctas_per_sm` CTAs of
    `num_warps` warps fit an SM's register file (allocated per warp in units of 256, as
    `resident_ctas` counts them). Examples: 4 warps x 4 CTAs -> 128; x 5 -> 96; x 3 -> 168."""
    if num_warps < 1 or ctas_per_sm < 1:
        raise ValueError(f"register_cap: expected num_warps, ctas_per_sm >= 1, got {num_warps}, {ctas_per_sm}")
    per_warp = int(regs_per_sm) // (int(num_warps) * int(ctas_per_sm)) // 256 * 256
    return min(255 // 8 * 8, per_warp // 32 // 8 * 8)


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


#: Relative GPU time of one tile (one L1 + one L2 work column: a tile's pairs through all N
#: blocks) per tile height, at the heights' own configs. Measured on an H200 (dsv3 shape, MXFP4
#: weights x FP8 acts, bf16 mainloop; `scripts/bench_gemm.py --cases 16:64:64 --block-ms ...`,
#: 64 experts with 16 pairs each, so one tile per expert at every height): L1 + L2 = 895 / 1059 /
#: 1722 / 2154 us for 64 tiles. The uniformly routed cases of the same call (4096 - 32768 pairs
#: over 256 experts) agree within ~5% per tile. What a tile costs is mostly its weights' stream
#: and in-register decode (paid once per tile, whatever its height), plus MMA rows. 128: 33.6
#: measured, times 0.93 for the later L2 config (two CTAs per SM; L1 + L2 12413 vs 13333 us at
#: 32768 pairs).
TILE_COST = {16: 14.0, 32: 16.5, 64: 26.9, 128: 31.3}


@functools.lru_cache(maxsize=4096)
def expected_tiles(pairs_per_expert: float, block_m: int) -> float:
    """E[ceil(n / block_m)] for an expert's pair count n ~ Poisson(pairs_per_expert): the tiles one
    local expert is expected to need under uniform routing (an expert with no pairs needs none).

    Example: expected_tiles(16, 16) = 1.43 (about half the experts get > 16 pairs, so two tiles),
    expected_tiles(16, 32) = 1.00.
    """
    return _poisson_mean(float(pairs_per_expert), lambda n: -(-n // block_m))


def _poisson_mean(lam: float, f) -> float:
    """E[f(n)] for n ~ Poisson(lam) with f(0) = 0, summed over lam +- 12 sqrt(lam) + 12."""
    if lam <= 0:
        return 0.0
    width = 12.0 * math.sqrt(lam) + 12.0
    lo, hi = max(1, int(lam - width)), int(lam + width) + 1
    log_lam = math.log(lam)
    return sum(math.exp(n * log_lam - lam - math.lgamma(n + 1)) * f(n) for n in range(lo, hi + 1))


def gemm_block_m(expected_pairs_per_expert: float) -> int:
    """Tile height from the expected number of routed pairs per local expert.

    The true counts live on the device (the kernels never synchronise), so this is a hint the host
    knows, e.g. ``R * num_tokens * topk / num_experts`` (`gemm_api.block_m_for`). Both grouped
    GEMMs and `build_tile_map` must get the same value.

    The height with the least expected time: expected tiles (`expected_tiles`: per-expert counts
    spread around the mean, so a height just above the mean leaves many experts with a second,
    mostly empty tile) times the measured cost of one tile (`TILE_COST`). Ties go to the smaller
    height. H200, uniform routing over 256 experts, L1 + L2 (`bench_gemm.py --block-ms`): 16 pairs
    per expert on average: 4078 us at 32 vs 5041 at 16 (381 tiles instead of 256); 64: 8791 us at
    128 vs 9848 at 64 and 10146 at 32; 4 (decode): 16.

    Examples: 0 -> 16, 4 -> 16, 16 -> 32, 32 -> 32, 64 -> 128, 128 -> 128.
    """
    if not expected_pairs_per_expert >= 0:
        raise ValueError(f"expected_pairs_per_expert: expected >= 0, got {expected_pairs_per_expert}")
    lam = round(float(expected_pairs_per_expert), 3)
    if lam == 0:
        return GEMM_BLOCK_MS[0]
    cost = {bm: expected_tiles(lam, bm) * TILE_COST[bm] for bm in GEMM_BLOCK_MS}
    return min(GEMM_BLOCK_MS, key=lambda bm: (cost[bm], bm))


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """How a call cuts each local expert's pairs into GEMM tiles: two tile heights.

    An expert with n pairs gets n // block_m full tiles of `block_m` rows; its remainder
    r = n % block_m (if any) becomes ceil(r / tail_block_m) tiles of `tail_block_m` rows when
    r <= tail_max, else one more (partly empty) `block_m` tile (`split_counts`). The two kinds are
    two tile maps and two launches of each grouped GEMM (each launch's BLOCK_M is a compile-time
    constant). tail_max == 0: one height, one launch (`tail_block_m` is then `block_m`).

    Why: at T = 4096 over 256 experts (~128 +- 11 pairs each) one height of 128 computes 1.46x
    the rows routed (half the experts need a second, mostly empty tile), and a tile costs about
    the same whatever its height's fill; a 16-row tail tile costs under half a 128-row one.

    Example: TilePlan(128, 16, 32): 150 pairs -> one 128-row tile + two 16-row tiles (rows 128-143,
    144-149); 170 pairs -> two 128-row tiles (r = 42 > 32); 100 pairs -> one 128-row tile.

    over > 0 (the streamed FP8 mainloop only, `OVER_MS`; `gemm_tile_plan` proposes it at prefill
    heights, >= OVER_MIN_BLOCK_M): an expert's last full tile also computes the first min(r, over)
    rows of its remainder, when r <= max(over, tail_max), in the same K loop as a second, narrow MMA
    on the same decoded weights (the kernels' OVER_M / OVER_LIMIT), and the tail tiles (if any) take
    only the rest. A tail tile streams its expert's whole weight slab again for <= 16 rows; the
    extra MMA reads nothing more.
    Example: TilePlan(128, 16, 32, over=16): 140 pairs -> one 128-row tile computing rows 0-139;
    150 -> that tile computes rows 0-143 and one 16-row tail tile rows 144-149; 100 -> one tile;
    170 -> two 128-row tiles (r = 42 > 32).
    """

    block_m: int
    tail_block_m: int
    tail_max: int = 0
    over: int = 0

    def __post_init__(self):
        for v, name in ((self.block_m, "block_m"), (self.tail_block_m, "tail_block_m")):
            if v not in GEMM_BLOCK_MS:
                raise ValueError(f"TilePlan.{name}: expected one of {GEMM_BLOCK_MS}, got {v!r}")
        if self.tail_block_m > self.block_m:
            raise ValueError(f"TilePlan: tail_block_m ({self.tail_block_m}) must be <= block_m ({self.block_m})")
        if not 0 <= self.tail_max < self.block_m or (self.tail_max and self.tail_block_m == self.block_m):
            raise ValueError(f"TilePlan.tail_max: expected 0 <= tail_max < block_m ({self.block_m}) and 0 "
                             f"when tail_block_m == block_m; got {self.tail_max!r}")
        if self.over and (self.over not in OVER_MS or self.over >= self.block_m
                          or (self.tail_max and self.over >= self.tail_max)):
            raise ValueError(f"TilePlan.over: expected 0 or one of {OVER_MS} below block_m and below tail_max "
                             f"when there is a tail; got over {self.over!r} with block_m {self.block_m}, "
                             f"tail_max {self.tail_max}")

    @property
    def over_limit(self) -> int:
        """The largest remainder a last full tile takes rows of (the kernels' OVER_LIMIT)."""
        return max(self.over, self.tail_max) if self.over else 0

    @property
    def has_tail(self) -> bool:
        return self.tail_max > 0

    @classmethod
    def single(cls, block_m: int) -> "TilePlan":
        return cls(block_m, block_m, 0)


def over_rows(n: int, plan: TilePlan) -> int:
    """Rows of an expert with n pairs that its last full tile computes past block_m (`TilePlan.over`).
    Example: over_rows(150, TilePlan(128, 16, 32, over=16)) == 16; over_rows(100, ...) == 0."""
    full, r = divmod(int(n), plan.block_m)
    return min(r, plan.over) if full and r <= plan.over_limit else 0


def split_counts(n: int, plan: TilePlan):
    """(main tiles, tail tiles) of an expert with n pairs under `plan` (see `TilePlan`).
    Example: split_counts(150, TilePlan(128, 16, 32)) == (1, 2); with over=16: (1, 1)."""
    full, r = divmod(int(n), plan.block_m)
    r -= over_rows(n, plan)
    if r == 0:
        return full, 0
    if r <= plan.tail_max:
        return full, -(-r // plan.tail_block_m)
    return full + 1, 0


#: Expected cost (in `TILE_COST` units) of the tail launches themselves: two more kernels (the L1
#: and L2 tails) in the call's graph, each ~3-4 us of launch, ramp and last wave on an H200, where
#: the streamed mainloop's tiles cost about half their `TILE_COST` figure in us.
TAIL_LAUNCH_COST = 16.0

#: Rows past block_m a last full tile may compute (`TilePlan.over`), and the least block_m at which
#: `gemm_tile_plan` proposes it: prefill tiles, where a tail tile's second stream of the weights
#: costs most. 16: Triton 3.6's sm_90a build (ptxas -v) of L1's 128-row 4-bit tile with a 16-row
#: second MMA uses 255 registers (244 without) and no spills, L2's 252 (248); a 32-row second MMA
#: spilled 24 bytes in a first version.
#: 32 (the kernels take it; `bench.py --over-m 32`: 128-row tiles, no tail launches at T = 4096)
#: measured no faster on an H100: 5729.1 vs 5721.1 us with 16 (docs/PERF.md, sixth session).
OVER_MS = (16,)
OVER_MIN_BLOCK_M = 64
#: Expected extra cost (`TILE_COST` units) of a tile that computes `over` rows past block_m: its
#: second MMA. An estimate, not a measurement yet: the 128-row 4-bit K step has 13% more
#: instructions with the 16-row MMA (sm_90a SASS, Triton 3.6: L1 304 vs 269 per 128 K, L2 298 vs
#: 263; FP8 weights 206 vs 173) and 12.5% more MMA rows: ~0.13 x TILE_COST[128].
OVER_COST = {16: 4.4}


@functools.lru_cache(maxsize=4096)
def _expected_plan_cost(lam: float, plan: TilePlan) -> float:
    """E[tile cost] of one expert with Poisson(lam) pairs under `plan`."""
    cm, ct = TILE_COST[plan.block_m], TILE_COST[plan.tail_block_m]
    co = OVER_COST.get(plan.over, 0.0)

    def cost(n):
        main, tail = split_counts(n, plan)
        return main * cm + tail * ct + (co if over_rows(n, plan) else 0.0)
    return _poisson_mean(lam, cost)


def gemm_tile_plan(expected_pairs_per_expert: float, num_local_experts: int, over: bool = False) -> TilePlan:
    """The tile plan with the least expected GEMM time for a call (see `TilePlan`).

    Candidates: every height alone (`gemm_block_m`'s choice) and every (block_m, smaller tail
    height) pair, the tail taking remainders up to where its tiles stop being cheaper than one
    more `block_m` tile (r <= tail height x the largest k with k TILE_COST[tail] < TILE_COST[block_m]).
    over (the kernels run the streamed FP8 mainloop): each of those at block_m >= OVER_MIN_BLOCK_M
    also with `TilePlan.over` rows of the remainder in the last full tile.
    Cost: local experts x `_expected_plan_cost` (Poisson counts, as `expected_tiles`), plus
    `TAIL_LAUNCH_COST` for a plan with a tail. Ties go to one height, then to smaller heights, then
    to no over rows.

    Examples (256 local experts): 0.03 pairs per expert (T 1) -> one height 16; 4 (T 128) -> 16;
    16 (T 512) -> 32 with 16-row tails for experts of <= 16 pairs; 128 (T 4096) -> 128 with 16-row
    tails for remainders <= 32; with over: 128 whose last full tile takes remainders <= 16 and the
    first 16 rows of those <= 32, the rest in a 16-row tail tile.
    """
    if not expected_pairs_per_expert >= 0:
        raise ValueError(f"expected_pairs_per_expert: expected >= 0, got {expected_pairs_per_expert}")
    if isinstance(num_local_experts, bool) or not isinstance(num_local_experts, int) or num_local_experts < 1:
        raise ValueError(f"num_local_experts: expected a positive int, got {num_local_experts!r}")
    lam = round(float(expected_pairs_per_expert), 3)
    if lam == 0:
        return TilePlan.single(GEMM_BLOCK_MS[0])
    cands = [TilePlan.single(bm) for bm in GEMM_BLOCK_MS]
    for bm in GEMM_BLOCK_MS:
        for tb in GEMM_BLOCK_MS:
            if tb >= bm:
                continue
            k = max(0, math.ceil(TILE_COST[bm] / TILE_COST[tb]) - 1)     # k tail tiles < one main tile
            if k:
                cands.append(TilePlan(bm, tb, min(bm - 1, k * tb)))
                if over and bm >= OVER_MIN_BLOCK_M:
                    cands += [TilePlan(bm, tb, min(bm - 1, o + k * tb), o) for o in OVER_MS]
        if over and bm >= OVER_MIN_BLOCK_M:
            cands += [TilePlan(bm, bm, 0, o) for o in OVER_MS]

    def cost(p: TilePlan):
        return (num_local_experts * _expected_plan_cost(lam, p) + (TAIL_LAUNCH_COST if p.has_tail else 0.0),
                p.has_tail, p.block_m, p.tail_block_m, p.over)
    return min(cands, key=cost)


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


def _fp8_mainloop(fp8_mainloop: bool, arch: int, weight_format: str, act_format: str) -> bool:
    """Whether the config is for the FP8 mainloop (asked for, and applicable)."""
    from .gemm_operands import uses_fp8_mma
    return bool(fp8_mainloop) and uses_fp8_mma(arch, weight_format, act_format)


#: Streamed FP8 mainloop (activations rebased where they land): promote the FP8 MMA's partial sum
#: to float32 after every this many K steps in L1 (K = H); L2 (K = I) chains all of K. H200
#: (`bench_gemm.py --stream --stream-promotes 1,2,4`, FP8 acts): every step against every 8 steps,
#: FP8 weights at 8 pairs 60.5 vs 60.9 us with y rel-RMSE 5.4e-3 vs 6.2e-2; MXFP4 as E4M3 at 1024 /
#: 32768 pairs 441.6 / 3709.6 vs 434.4 / 3927.8 us, 2.4e-3 / 3.4e-3 vs 5.7e-3 / 5.6e-3; every 2
#: steps is slower (5064 us). L2's error did not move with its promotion (5.54e-3 every step,
#: 5.58e-3 chained) and chaining is faster (1767 vs 1986 us).
STREAM_PROMOTE_L1 = 1
_CHAIN = 1 << 20
#: (num_warps, num_stages, ctas_per_sm) of the streamed mainloop's decode tiles with 4-bit MXFP4
#: weights ("mxfp4" operand), L1 at 64 stacked rows and L2 at 64 rows, 256 K per step
#: (FP4_STREAM_DECODE_BLOCK_K). H200 (`scripts/probe_fp4_stream.py`, docs/PERF.md, fourth
#: session), N 4096 K 7168, 8 / 64 experts x 16 tokens: 46.1 / 318.2 us at 3 stages against 50.5 /
#: 327.3 at 4, 55.0 / 362.3 at 2 and 51.3 / 359.6 with 128 rows x 8 warps x 2 CTAs; 128 K per step
#: 57.4 / 405.6 (a 4 KB stage of 4-bit words carries half an E4M3 stage's bytes).
#: The layer's L1 / L2 (`bench_gemm.py --stream --stream-sweep`, same session): 8 pairs L1 43.9 /
#: L2 32.2 us (128 K per step 52.9 / 33.5); at 32 pairs per tile the 3-stage tile of 32 x 256
#: activations leaves room for 3 CTAs only (1024 pairs, 64 tiles: L1 356.4 us at 3 CTAs vs 401.9
#: asking for 4; L2 226.7 vs 274.7): FP4_STREAM_DECODE_M32. A 4th element True caps the registers
#: so that many CTAs fit (`register_cap`): measured slower on an H100 (sixth session): 32 pairs
#: at 4 CTAs (cap 128, no spills) T = 512 2527.3 vs 2463.1 us; 16 pairs at 5 CTAs (cap 96) L1 1514.3
#: vs 1467.7 us, L2 746.4 vs 741.7 at T = 128; L2 at 6 (cap 80) 824.3.
FP4_STREAM_DECODE_L1 = (4, 3, 4)
FP4_STREAM_DECODE_L2 = (4, 3, 4)
FP4_STREAM_DECODE_M32 = (4, 3, 3)
FP4_STREAM_DECODE_BLOCK_K = 256


def _stream_config(block_m: int, block_n: int, prefill: tuple, decode: tuple, promote: int,
                   block_k: int = GEMM_BLOCK_K) -> GroupedGemmConfig:
    """prefill / decode: (num_warps, num_stages, ctas_per_sm[, capped]); capped (decode tuples):
    cap the registers so that ctas_per_sm CTAs fit (`register_cap`)."""
    num_warps, num_stages, ctas, *capped = decode if block_m <= 32 else prefill
    return GroupedGemmConfig(block_m=block_m, block_n=block_n, block_k=block_k if block_m <= 32 else GEMM_BLOCK_K,
                             group_m=8, num_warps=num_warps, num_stages=num_stages, ctas_per_sm=ctas,
                             promote_steps=promote,
                             max_registers=register_cap(num_warps, ctas) if capped and capped[0] else None)


def _fp4_block_k(k: int) -> int:
    """K per step of 4-bit MXFP4 decode tiles: FP4_STREAM_DECODE_BLOCK_K where it divides K."""
    return FP4_STREAM_DECODE_BLOCK_K if k % FP4_STREAM_DECODE_BLOCK_K == 0 else GEMM_BLOCK_K


def l1_gemm_config(block_m: int, hidden: int, intermediate: int, weight_format: str, act_format: str,
                   arch: int = 90, fp8_mainloop: bool = False, act_rebased: bool = False,
                   weight_kind: Optional[str] = None) -> GroupedGemmConfig:
    """Tiles of the L1 kernel (x [., H] -> gate/up [., I] each, SwiGLU, requantised h).

    A program stacks block_n rows of gate and block_n rows of up into one MMA operand of
    2 * block_n rows. block_n = 64 makes that 128 rows: one Blackwell block-scaled MMA (its M must
    be 128; fewer rows silently fall back to an upcast kind::f16 MMA) and two Hopper warpgroups of
    64 rows. Register / shared-memory figures below are ptxas's for H 7168, I 2048 (Triton 3.9).
    """
    _check_common(block_m, hidden, intermediate, weight_format, act_format)
    if act_rebased and _fp8_mainloop(True, arch, weight_format, act_format):
        # Streamed FP8 mainloop. Decode: 128 stacked weight rows x 16-32 pairs, one warpgroup, 4
        # stages, 2 CTAs per SM (H200 probe: 3785-4102 GB/s of FP8 weights, 89-96% of HBM).
        # Prefill: 64 stacked rows (block_n 32) so the float32 accumulator and the chunk's partial
        # sum fit one warpgroup's registers; 2 CTAs per SM (probe, 64 x 128 tiles: 505 TFLOP/s
        # promoting every step, 836 chained; the layer's L1 at 32768 pairs: 518).
        if weight_kind == "mxfp4" and block_m <= 32:
            # 4-bit MXFP4 (fragment words decoded in registers): 64 stacked rows, one warpgroup,
            # 256 K per step at decode, 4 CTAs per SM at 16 pairs per tile (3 at 32: shared memory).
            return _stream_config(block_m, 32, prefill=(4, 3, 2),
                                  decode=FP4_STREAM_DECODE_L1 if block_m <= 16 else FP4_STREAM_DECODE_M32,
                                  promote=STREAM_PROMOTE_L1, block_k=_fp4_block_k(hidden))
        return _stream_config(block_m, 64 if block_m <= 32 else 32, prefill=(4, 3, 2), decode=(4, 4, 2),
                              promote=STREAM_PROMOTE_L1)
    block_n = 64  # I is a multiple of 128
    if block_m <= 32:
        # Decode: weight-bandwidth bound. 4 warps (~170 registers) leave room for 3 CTAs per SM,
        # and 4 stages keep ~3 x 8 KB of MXFP4 weights in flight per CTA; twice as many programs
        # as block_n 128 keeps small expert counts spread over all SMs. Each (expert, 64-row)
        # weight slab is read by exactly one program per call.
        num_warps, num_stages = 4, 4
    else:
        # Prefill: compute bound. A 128 x block_m accumulator over 8 warps: <= 250 registers
        # without spills at block_m 128 (shared memory <= 200 KB even with bf16 operands).
        num_warps, num_stages = 8, 3
        if weight_format == "mxfp4" and block_m >= 128 and not uses_dot_scaled(arch, weight_format, act_format):
            # 256 stacked weight rows (block_n 128) halve how often each x tile is dequantised
            # (once per N block). H200, T 4096 / EP2: 5.9 ms vs 6.7 ms at block_n 64; ptxas:
            # 255 registers, 12 bytes spilled. FP8 weights keep 64: their per-128 block scale
            # needs a second accumulator.
            block_n = 128
    if block_m > 32 and _fp8_mainloop(fp8_mainloop, arch, weight_format, act_format):
        # FP8 mainloop, prefill: both operands are rebuilt in registers and staged in shared
        # memory each K step; 64 stacked rows per gate/up and 2 stages fit (3 exceed 227 KB).
        block_n, num_stages = 64, 2
    return GroupedGemmConfig(block_m=block_m, block_n=block_n, block_k=GEMM_BLOCK_K, group_m=8,
                             num_warps=num_warps, num_stages=num_stages,
                             ctas_per_sm=2 if num_warps <= 4 else 1)


def l2_gemm_config(block_m: int, hidden: int, intermediate: int, weight_format: str, act_format: str,
                   combine_format: str = "bf16", arch: int = 90, fp8_mainloop: bool = False,
                   act_rebased: bool = False, weight_kind: Optional[str] = None) -> GroupedGemmConfig:
    """Tiles of the L2 kernel (h [., I] -> y [., H], stored to per-pair destination rows).

    With the FP8 combine a program quantises whole groups of 128 output columns, so block_n is a
    multiple of 128 (H is one: the config requires H % 512 == 0 then). The Blackwell
    block-scaled MMA needs 128 weight rows (block_n 128) too.
    """
    _check_common(block_m, hidden, intermediate, weight_format, act_format)
    if combine_format not in ("bf16", "fp8"):
        raise ValueError(f"combine_format: expected 'bf16' or 'fp8', got {combine_format!r}")
    need_128 = combine_format == "fp8" or uses_dot_scaled(arch, weight_format, act_format)
    if act_rebased and _fp8_mainloop(True, arch, weight_format, act_format):
        # Streamed FP8 mainloop over K = I (16 steps at I 2048): chained, no promotion (its error
        # did not move with promotion, see STREAM_PROMOTE_L1). Decode: 128 weight rows, one
        # warpgroup x 2 CTAs per SM. Prefill: 64 weight rows, one warpgroup x 2 CTAs per SM (H200,
        # 32768 pairs over 256 experts at 128-row tiles: 1626 us against 1855 with 128 rows x 8
        # warps x 1 CTA, 1693 with 256 rows); 128 rows where the FP8 combine needs them.
        if weight_kind == "mxfp4":
            # 4-bit MXFP4: promoted after every K step like L1 (Triton 3.9's sm_90a SASS: a chained
            # loop re-lays the decoded words through ~160 PRMT / ~116 shifts per step, promoted
            # 190), 64 rows x 256 K at decode (4 CTAs per SM, 3 at 32 pairs per tile); 128 rows
            # where the FP8 combine needs them.
            if need_128:
                # 128 rows x 256 K: 24 KB a stage at 16 pairs (3 CTAs fit), 28 KB at 32 (2 fit)
                return _stream_config(block_m, 128, prefill=(8, 4, 1), decode=(4, 3, 3 if block_m <= 16 else 2),
                                      promote=1, block_k=_fp4_block_k(intermediate))
            return _stream_config(block_m, 64, prefill=(4, 4, 2),
                                  decode=FP4_STREAM_DECODE_L2 if block_m <= 16 else FP4_STREAM_DECODE_M32, promote=1,
                                  block_k=_fp4_block_k(intermediate))
        if block_m > 32 and not need_128:
            return _stream_config(block_m, 64, prefill=(4, 4, 2), decode=(4, 4, 2), promote=_CHAIN)
        return _stream_config(block_m, 128, prefill=(8, 4, 1), decode=(4, 4, 2), promote=_CHAIN)
    if block_m <= 32:
        # Decode: weight streaming over a short K (= I). block_n 64 with 4 warps (~128
        # registers, several CTAs per SM), or 128 rows with 8 warps where 128 is required.
        block_n, num_warps, num_stages = (128, 8, 4) if need_128 else (64, 4, 4)
    elif block_m <= 64 or need_128:
        # Prefill, 64-row tiles (or 128 columns required): one 128 x block_m accumulator, 8 warps.
        # NOTE: at block_m 128 the FP8-combine epilogue spills ~150-400 bytes (ptxas, Hopper and
        # Blackwell); it runs once per program.
        block_n, num_warps, num_stages = 128, 8, 3
    elif weight_format == "mxfp4":
        # Hopper prefill, 128-row tiles, bf16 combine, MXFP4 weights: 128 weight rows (3.3 ms vs
        # 5.8 ms with 64 rows, H200, T 4096 / EP2), one warpgroup per CTA and two CTAs per SM (255
        # registers, 4 bytes spilled, 87 KB shared memory each): the two CTAs' decode and MMA
        # phases interleave, where one CTA of two warpgroups keeps them in step (barriers). H200,
        # uniform routing, 32768 pairs over 256 experts: 3862 us, against 4264 with 2 stages and
        # 4785 with 8 warps x 3 stages x 1 CTA (16384 pairs, 2 stages: 2838 vs 3207 us).
        block_n, num_warps, num_stages = 128, 4, 3
    else:
        # Hopper prefill, 128-row tiles, bf16 combine: 64 weight rows keep the accumulator and
        # the dequantised weights at <= 255 registers without spills.
        block_n, num_warps, num_stages = 64, 8, 3
    if block_m > 32 and _fp8_mainloop(fp8_mainloop, arch, weight_format, act_format):
        # FP8 mainloop, prefill: H200, 128 x 128 tiles with 3 stages need 256 KB of shared memory.
        num_stages = 2
    ctas = 2 if num_warps <= 4 else 1
    if block_m <= 32 and num_warps <= 4 and weight_format == "mxfp4":
        # ~90 registers (ptxas, Hopper): 3 resident CTAs per SM. H200: T 1 51.8 vs 57.9 us,
        # T 128 330 vs 375 us with 2.
        ctas = 3
    return GroupedGemmConfig(block_m=block_m, block_n=block_n, block_k=GEMM_BLOCK_K, group_m=8,
                             num_warps=num_warps, num_stages=num_stages, ctas_per_sm=ctas)
