"""L1's prefill tiles on Hopper as a warp-specialised Gluon kernel.

Built 2026-12-07 (seventh session); first run on an H100 in the tenth: h equal to the Triton
kernel's at every tile height (`tests/test_gemm_gpu.py -k gluon_l1`); taken by default where it
measured faster (`DEFAULT_LAUNCHES`: 4-bit weights at the 128-row prefill tiles, FP8 weights at the
16-row decode tiles; `wanted`, `ENABLED`).

Why (docs/PERF.md, seventh session): the Triton L1 runs a promoted FP8 mainloop whose warps wait
for every MMA and meet a CTA barrier at every K step (tensor pipe ~32% busy at T = 4096). The same
tile warp-specialised in Gluon (`scripts/probe_gluon_promote.py`) ran 780-795 TFLOP/s on an H100
against 353-362 for the unspecialised scheme; this kernel is that pattern with L1's operands.

Scope (`applies`): the streamed FP8 mainloop: x rebased to E4M3 where it landed (`x_rebased`),
weights "mxfp4" (fragment words decoded into the MMA's register operand; offset indices d <= 11,
the "imad" table) or "fp8_rebased" (E4M3 rows, the MMA reads them from shared memory), FP8 h; tile
maps of 128 pairs (prefill, plus `over_m` 0 or 16 rows past them; two CTAs per SM) or of 32 / 16
(decode: four CTAs per SM, up to 8 stages of 4-bit words in flight per CTA); 32 columns of gate and
of up per item (64 stacked rows: one warpgroup), 128 K per step (`launch_plan`).

Partitions (per CTA, two CTAs per SM):
- a producer warpgroup (4 warps, few registers): per K step the two TMA boxes of the weight rows
  (gate rows, up rows) and the tile's 128 (+ 16) token rows gathered by cp.async (a pair's row is
  its token's pool row), each thread's copies arriving on the stage's barrier as they land;
- the MMA warpgroup: waits for a stage, decodes the words (mxfp4), issues step k's MMA(s), adds step
  k - 1's partial sum to the float32 accumulator while they run, hands step k - 1's stage back;
  after the last step, the epilogue of `l1_gemm._l1_epilogue` (row factors, bf16, clamp, SwiGLU x
  weight, requantise per 32), gate and up rows exchanged through shared memory.
Both partitions walk the same persistent sequence of (tile, N block) items as `l1_gemm._l1_kernel`.

Numerics: the same partial sums as `l1_gemm._fp8_mainloop` with PROMOTE 1 (one 128-K MMA from
zero per step), added in the same order into float32, and the same epilogue helpers: h and its
scales must equal the Triton kernel's (up to the sign of zero sums).
"""
from __future__ import annotations

from typing import Optional

import torch

from .l1_gemm import (_e4m3_code, _exp2_neg_ue8m0, _exp2_ue8m0, _fp4_word_asm, _round_bf16, _swiglu_h,
                      _tile_coords, _ue8m0_exponent)
from .sync import pdl_enter


def _triton_at_least(major: int, minor: int) -> bool:
    import re

    import triton
    m = re.match(r"(\d+)\.(\d+)", triton.__version__)
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Triton 3.6 names: `async_copy_global_to_shared` (cp.async and TMA), `thread_barrier`; later
    # versions `async_load`, `barrier`
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    _barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    # Gluon's API changed from release to release (`warp_specialize`'s arguments among others): take
    # these kernels only on the releases they were built and checked with (3.6 on the GPU, 3.6 and
    # 3.9 compiled on the CPU) and later ones; an older Triton keeps the Triton kernels
    HAVE_GLUON = _triton_at_least(3, 6)
except (ImportError, AttributeError):          # a Triton without Gluon's Hopper ops
    HAVE_GLUON = False

__all__ = ["DEFAULT_LAUNCHES", "ENABLED", "HAVE_GLUON", "PROFILE", "applies", "l1_gluon_launch", "profile_split",
           "wanted"]

#: Whether L1's launches take this kernel (where it `applies`): None (default) at the launches
#: where it measured faster than the Triton kernel (`DEFAULT_LAUNCHES`), True at every one, False
#: never (`scripts/bench.py --gluon-l1 on|off|auto`).
ENABLED: Optional[bool] = None
#: (weight kind, tile height) of the launches it is taken at by default (docs/PERF.md, H100s):
#: - 4-bit weights at the prefill tiles: 32768 uniform pairs 3963.2 us against the Triton kernel's
#:   4191.1 (tenth session); the layer at T = 4096 5388.5 us against 5745.0 with both Gluon kernels
#:   off (eleventh). At the 16-row decode tiles, 1024 pairs, it was slower: 1466.5 against 1428.6.
#: - FP8 weights ("fp8_rebased") at the 16-row decode tiles, with L2's: the layer at T = 128 / 1
#:   3747.1 / 158.9 us against 3866.4 / 161.4 on the Triton kernels (eleventh session; with them at
#:   every tile height T = 4096 was slower, 5879.6 against 5689.5).
DEFAULT_LAUNCHES = (("mxfp4", 128), ("fp8_rebased", 16))


#: Decode every odd K step's 4-bit words while the even step's MMAs run (`_ahead_loop`: the same
#: sums in the same order, a second register operand; at the 256-K promoted decode tiles the pair's
#: MMAs chained with one wait). On: measured on an H100 (docs/PERF.md, thirteenth session, one call):
#: L1 at 32768 pairs 4063.9 -> 3910.6 us, the layer at T = 4096 5641.5 -> 5468.0 us (-3.1%), T = 512
#: unchanged; h equal to the Triton kernel's bit for bit (`test_gemm_gpu.py::test_gluon_l1_decode_ahead_matches_triton`).
#: `scripts/bench.py --no-decode-ahead` turns it off.
DECODE_AHEAD = True

#: The K of each partial sum at the 128-row prefill tiles with 4-bit words where it decodes ahead
#: (`DECODE_AHEAD`): 128 (default: the Triton kernel's, the same h bit for bit) or 256 (the decode
#: tiles' promotion: the pair's MMAs chained, half the promotion adds and MMA waits; h then differs
#: from the Triton kernel's within the GEMM tolerance; the Triton kernel does not take it: with
#: Triton 3.6, the GPU machine's, its 4-bit loop promoting every two steps rewrites registers of a
#: running wgmma, `l1_gemm.chained_fp4_hazards`). Measured on an H100 (thirteenth session): L1 at
#: 32768 pairs 3910.6 -> 3614.4 us, the layer -1.1% at T = 4096, within the reference's tolerance;
#: left at 128 until its accuracy is decided (`scripts/bench.py --l1-prefill-promote 2`).
PREFILL_PROMOTE_K = 128          # (BLOCK_K)

#: Warps gathering the token rows at the 16- and 32-row decode tiles (1 or 4; the 128-row tiles keep
#: 4). The producer's loop is ~64 instructions a step on each of its warps (stage wait, TMA issue,
#: barriers, addresses), and at those tiles one warp's 4 cp.async a step cover the 16 rows: with
#: 4 warps the producer is ~30% of a CTA's issue slots there (Triton 3.6 SASS: 4 x 64 against the
#: MMA warpgroup's 4 x 156 per 128-K step). 1: correct on an H100, 1464.8 -> 1451.2 us at 1024 pairs,
#: still slower than the Triton L1 there (1428.3; thirteenth session), so 4 stays.
DECODE_GATHER_WARPS = 4

#: A measuring switch (`scripts/bench_gemm.py --gluon --profile`): an int64 CUDA tensor of >= grid x 8
#: elements makes the launches built while it is set a `PROF` build, each CTA writing its cycle
#: counts there (`profile_split`); None (default): the kernel as the layer runs it.
PROFILE: Optional[torch.Tensor] = None

#: `PROFILE`'s columns: the MMA warpgroup's cycles (all; waiting for a stage to land; waiting for
#: its MMAs; in the epilogues), its items, the producer's cycles (all; waiting for a stage to be
#: handed back).
PROFILE_COLUMNS = ("mma_all", "mma_stage_wait", "mma_mma_wait", "mma_epilogue", "items", "load_all",
                   "load_empty_wait")


def profile_split(prof: torch.Tensor) -> dict:
    """`PROFILE` (zeroed before the launch) summed over the CTAs that ran: each column of
    `PROFILE_COLUMNS` (cycles summed; items counted), "ctas", and the MMA warpgroup's shares of its
    cycles (`*_share`): waiting for stages, for MMAs, in epilogues, and the rest (decode, promotion
    adds, item set-up)."""
    rows = prof.reshape(-1, 8)[:, :len(PROFILE_COLUMNS)].double()
    out = dict(zip(PROFILE_COLUMNS, rows.sum(0).tolist()))
    out["ctas"] = int((rows[:, 0] > 0).sum())
    all_ = max(out["mma_all"], 1.0)
    for k in ("mma_stage_wait", "mma_mma_wait", "mma_epilogue"):
        out[k + "_share"] = out[k] / all_
    out["mma_rest_share"] = 1.0 - sum(out[k + "_share"] for k in ("mma_stage_wait", "mma_mma_wait", "mma_epilogue"))
    out["load_empty_wait_share"] = out["load_empty_wait"] / max(out["load_all"], 1.0)
    return out


def wanted(w_kind: str, block_m: int) -> bool:
    """Whether a launch (weight kind, tile height) takes this kernel where it `applies` (`ENABLED`)."""
    return (w_kind, block_m) in DEFAULT_LAUNCHES if ENABLED is None else bool(ENABLED)

BLOCK_N, BLOCK_K = 32, 128
#: Tile heights (pairs per tile) it takes: the prefill tiles and the decode ones.
BLOCK_MS = (16, 32, 128)
#: Registers per thread of the producer warpgroup (a single gathering warp: `LOAD_REGS_ONE_WARP`,
#: its rows' addresses in registers: with 32, 20 bytes spilled at 32 rows; 40: none; Triton 3.6).
LOAD_REGS = 32
LOAD_REGS_ONE_WARP = 40
_SMEM_PER_SM, _SMEM_RESERVED = 233472, 1024


def launch_plan(w_kind: str, block_m: int, over_m: int) -> tuple:
    """(stages, maxnreg, CTAs per SM) of a launch: two CTAs per SM at prefill (a 64 x 128 float32
    accumulator per MMA warpgroup), four at decode; the registers of 8 warps per CTA shared out at
    that residency, and as many K-step stages (<= 8) as the shared memory leaves room for."""
    ctas = 2 if block_m == 128 else 4
    maxnreg = 65536 // (ctas * 8 * 32) // 8 * 8
    stage = 2 * BLOCK_N * BLOCK_K // (2 if w_kind == "mxfp4" else 1) + (block_m + over_m) * BLOCK_K
    # the gate / up exchange, the barriers, and the one stage of rows past block_m allocated unused
    fixed = _SMEM_RESERVED + 2 * BLOCK_N * block_m * 2 + 512 + (16 * BLOCK_K if over_m == 0 else 0)
    stages = min(8, (_SMEM_PER_SM // ctas - fixed) // stage)
    return stages, maxnreg, ctas


def applies(w_kind: str, act_format: str, streamed: bool, block_m: int, over_m: int, fp4_table: str,
            arch: int, promote_k: int = BLOCK_K) -> bool:
    """Whether a launch is one this kernel covers (see the module docstring): the tile map's height
    and rows past it matter, and the K the Triton kernel promotes after (promote_k: 128, or 256 for its
    4-bit decode tiles; this kernel chains two 128-K steps then, so that the partial sums are the
    same); its block_n / block_k do not (this kernel's items are 32 columns of gate and up, 128 K per
    step, at every height)."""
    return (HAVE_GLUON and arch == 90 and streamed and act_format == "fp8" and w_kind in ("mxfp4", "fp8_rebased")
            and block_m in BLOCK_MS and over_m in ((0, 16) if block_m == 128 else (0,))
            and (w_kind != "mxfp4" or fp4_table in ("imad", "imad_lane")) and promote_k in (BLOCK_K, 2 * BLOCK_K)
            and (promote_k == BLOCK_K or over_m == 0))


if HAVE_GLUON:
    _BN, _BK = gl.constexpr(BLOCK_N), gl.constexpr(BLOCK_K)
    #: One step's fragment words of 64 weight rows, [64, 16] int32, in the MMA register operand's
    #: thread order: registers = g (2 bits), row + 8; lanes = c (2 bits), row (3 bits); warps = row
    #: 16 w (the operand's thread = lane 4 r + c; `_decode_a`)
    _WORDS_LAYOUT = gl.constexpr(gl.DistributedLinearLayout(
        reg_bases=[[0, 1], [0, 2], [8, 0]], lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
        warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[2 * BLOCK_N, BLOCK_K // 8]))

    @gluon.constexpr_function
    def _mma_layout(n):
        """The accumulator layout of one warpgroup's 64 x n MMA."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 32])

    @gluon.jit
    def _item(work, num_tiles, offsets_ptr, tile_expert_ptr, tile_row_ptr, NUM_N: gl.constexpr,
              GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr, OVER_LIMIT: gl.constexpr):
        """(expert, first pair row, row end, N block, has_over) of work item `work` (`_l1_kernel`'s
        order and its rows-past-block_m rule)."""
        tile, pid_n = _tile_coords(work, num_tiles, NUM_N, GROUP_M)
        expert = gl.load(tile_expert_ptr + tile)
        row_start = gl.load(tile_row_ptr + tile)
        row_end = gl.load(offsets_ptr + expert + 1)
        rem = row_end - row_start
        has_over = (OVER_M > 0) & (rem > BM) & (rem <= BM + OVER_LIMIT)
        return expert, row_start, row_end, pid_n, has_over

    @gluon.jit
    def _clock():
        """The SM's cycle counter (`PROF` only)."""
        return gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l", [], dtype=gl.int64, is_pure=False, pack=1)

    @gluon.jit
    def _since(t0, PROF: gl.constexpr):
        """Cycles since t0 (`_clock`) where PROF, else 0."""
        if PROF:
            dt = _clock() - t0
        else:
            dt = 0
        return dt

    @gluon.jit
    def _now(PROF: gl.constexpr):
        """`_clock()` where PROF, else 0."""
        if PROF:
            t = _clock()
        else:
            t = 0
        return t

    @gluon.jit
    def _zero(PROF: gl.constexpr):
        """A cycle count's start: int64 0 where PROF, else 0."""
        if PROF:
            z = gl.program_id(0).to(gl.int64) * 0
        else:
            z = 0
        return z

    @gluon.jit
    def _weight_step(it, k, w_row, w_desc, w_bufs, w_ready, empty, INTER: gl.constexpr, KW: gl.constexpr,
                     STAGES_: gl.constexpr, W_BYTES: gl.constexpr, PROF: gl.constexpr = False):
        """A producer's step `it` (K step k of its item): wait for the stage to be handed back, then
        its weight boxes by TMA (32 gate rows, 32 up rows from w_row); returns (the stage, the cycles
        waited for it where PROF, else 0)."""
        s = it % STAGES_
        t0 = _now(PROF)
        mbarrier.wait(empty.index(s), ((it // STAGES_) & 1) ^ 1)
        waited = _since(t0, PROF)
        # the MMA warpgroup read the stage's words with ordinary loads; the TMA below writes
        # through the async proxy
        fence_async_shared()
        mbarrier.expect(w_ready.index(s), W_BYTES)
        w_s = w_bufs.index(s)
        _tma_load(w_desc, [w_row, k * KW], w_ready.index(s), w_s.slice(0, _BN, dim=0))
        _tma_load(w_desc, [w_row + INTER, k * KW], w_ready.index(s), w_s.slice(_BN, _BN, dim=0))
        return s, waited

    @gluon.jit
    def _producer_pairs(xp_desc, xo_desc, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, max_tiles,
                        w_desc, w_bufs, x_bufs, o_bufs, w_ready, x_ready, empty,
                        HIDDEN: gl.constexpr, INTER: gl.constexpr, KW: gl.constexpr, STAGES_: gl.constexpr,
                        W_BYTES: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr,
                        OVER_LIMIT: gl.constexpr, prof_ptr, PROF: gl.constexpr):
        """The producer with the token rows in pair order (`PAIR_X`): per step one TMA box of the
        tile's BM pair rows (and one of the OVER_M rows past them) beside the weight boxes. Rows
        past the expert's pairs land as whatever the next pairs hold (zeros past the buffer): their
        columns of the product are never stored (`_epilogue`'s row mask), as with the gather's
        zeros."""
        NUM_N: gl.constexpr = INTER // _BN
        NK: gl.constexpr = HIDDEN // _BK
        X_BYTES: gl.constexpr = (BM + OVER_M) * _BK
        num_tiles = gl.minimum(gl.load(num_tiles_ptr), max_tiles)
        t_start = _now(PROF)
        t_empty = _zero(PROF)
        it = 0
        for work in range(gl.program_id(0), num_tiles * NUM_N, gl.num_programs(0)):
            expert, row_start, row_end, pid_n, has_over = _item(work, num_tiles, offsets_ptr, tile_expert_ptr,
                                                                 tile_row_ptr, NUM_N, GROUP_M, BM, OVER_M, OVER_LIMIT)
            w_row = expert * (2 * INTER) + pid_n * _BN
            for k in range(NK):
                s, waited = _weight_step(it, k, w_row, w_desc, w_bufs, w_ready, empty, INTER, KW, STAGES_, W_BYTES,
                                         PROF)
                t_empty += waited
                mbarrier.expect(x_ready.index(s), X_BYTES)
                _tma_load(xp_desc, [row_start, k * _BK], x_ready.index(s), x_bufs.index(s))
                if OVER_M > 0:
                    _tma_load(xo_desc, [row_start + BM, k * _BK], x_ready.index(s), o_bufs.index(s))
                it += 1
        _store_prof(prof_ptr, 5, _since(t_start, PROF), t_empty, PROF)

    @gluon.jit
    def _load_partition(x_ptr, pair_rows_ptr, xp_desc, xo_desc, offsets_ptr, tile_expert_ptr, tile_row_ptr,
                        num_tiles_ptr, max_tiles, w_desc, w_bufs, x_bufs, o_bufs, w_ready, x_ready, empty,
                        HIDDEN: gl.constexpr, INTER: gl.constexpr, KW: gl.constexpr, STAGES_: gl.constexpr,
                        W_BYTES: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr,
                        OVER_LIMIT: gl.constexpr, PAIR_X: gl.constexpr, prof_ptr, PROF: gl.constexpr,
                        GATHER_WARPS: gl.constexpr = 4):
        """The loading partition: `_producer_pairs` (PAIR_X) or `_producer` (GATHER_WARPS warps)."""
        if PAIR_X:
            _producer_pairs(xp_desc, xo_desc, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, max_tiles,
                            w_desc, w_bufs, x_bufs, o_bufs, w_ready, x_ready, empty, HIDDEN, INTER, KW, STAGES_,
                            W_BYTES, GROUP_M, BM, OVER_M, OVER_LIMIT, prof_ptr, PROF)
        else:
            _producer(x_ptr, pair_rows_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, max_tiles,
                      w_desc, w_bufs, x_bufs, o_bufs, w_ready, x_ready, empty, HIDDEN, INTER, KW, STAGES_, W_BYTES,
                      GROUP_M, BM, OVER_M, OVER_LIMIT, prof_ptr, PROF, GATHER_WARPS)

    @gluon.jit
    def _store_prof(prof_ptr, slot: gl.constexpr, a, b, PROF: gl.constexpr):
        """Where PROF: this CTA's counters a, b into prof_ptr[program, slot], [program, slot + 1]
        (int64 [grid, 8], `PROFILE`)."""
        if PROF:
            base = prof_ptr + gl.program_id(0) * 8 + slot
            gl.store(base, a)
            gl.store(base + 1, b)

    @gluon.jit
    def _producer(x_ptr, pair_rows_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, max_tiles,
                  w_desc, w_bufs, x_bufs, o_bufs, w_ready, x_ready, empty,
                  HIDDEN: gl.constexpr, INTER: gl.constexpr, KW: gl.constexpr, STAGES_: gl.constexpr,
                  W_BYTES: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr,
                  OVER_LIMIT: gl.constexpr, prof_ptr, PROF: gl.constexpr, GATHER_WARPS: gl.constexpr = 4):
        """The producer warpgroup (or GATHER_WARPS warps): weight boxes by TMA, token rows by cp.async
        (see the module doc; each thread arrives on the stage's x barrier once its copies are in)."""
        NUM_N: gl.constexpr = INTER // _BN
        NK: gl.constexpr = HIDDEN // _BK
        OM: gl.constexpr = OVER_M if OVER_M > 0 else 16
        ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[4, 8],
                                            warps_per_cta=[GATHER_WARPS, 1], order=[1, 0])
        c = gl.arange(0, _BK, layout=gl.SliceLayout(0, ld))
        num_tiles = gl.minimum(gl.load(num_tiles_ptr), max_tiles)
        t_start = _now(PROF)
        t_empty = _zero(PROF)
        it = 0
        for work in range(gl.program_id(0), num_tiles * NUM_N, gl.num_programs(0)):
            expert, row_start, row_end, pid_n, has_over = _item(work, num_tiles, offsets_ptr, tile_expert_ptr,
                                                                 tile_row_ptr, NUM_N, GROUP_M, BM, OVER_M, OVER_LIMIT)
            rows = row_start + gl.arange(0, BM, layout=gl.SliceLayout(1, ld))
            ok = rows < row_end
            prow = gl.load(pair_rows_ptr + rows, mask=ok, other=0).to(gl.int64)
            x_rows = x_ptr + prow[:, None] * HIDDEN + c[None, :]
            x_mask = ok[:, None] & (c < _BK)[None, :]
            orows = row_start + BM + gl.arange(0, OM, layout=gl.SliceLayout(1, ld))
            o_ok = (orows < row_end) & has_over
            oprow = gl.load(pair_rows_ptr + orows, mask=o_ok, other=0).to(gl.int64)
            o_rows = x_ptr + oprow[:, None] * HIDDEN + c[None, :]
            o_mask = o_ok[:, None] & (c < _BK)[None, :]
            w_row = expert * (2 * INTER) + pid_n * _BN
            for k in range(NK):
                s, waited = _weight_step(it, k, w_row, w_desc, w_bufs, w_ready, empty, INTER, KW, STAGES_, W_BYTES,
                                         PROF)
                t_empty += waited
                # rows past the pairs read nothing and land as zeros (as the Triton kernel's masked loads)
                _cp_async(x_bufs.index(s), x_rows + k * _BK, mask=x_mask)
                if OVER_M > 0:
                    _cp_async(o_bufs.index(s), o_rows + k * _BK, mask=o_mask)
                async_copy.mbarrier_arrive(x_ready.index(s), increment_count=False)
                it += 1
        _store_prof(prof_ptr, 5, _since(t_start, PROF), t_empty, PROF)

    @gluon.jit
    def _split_bytes(w):
        """int32 [A, B] -> int8 [A, B, 4]: byte b of each word at index b."""
        j = gl.join(gl.join(w.to(gl.int8), (w >> 8).to(gl.int8)), gl.join((w >> 16).to(gl.int8), (w >> 24).to(gl.int8)))
        return gl.reshape(gl.permute(j, (0, 1, 3, 2)), [j.shape[0], j.shape[1], 4])

    @gluon.jit
    def _decode_a(w_smem, d, a_layout: gl.constexpr, wl: gl.constexpr):
        """A step's fragment words [64, 16] (shared) and offset indices d [64, 16] (per word, int32)
        -> E4M3 [64, 128] in the MMA's register-operand layout (natural K order)."""
        wd = w_smem.load(wl)
        # E4M3 bytes of the magnitudes x 2**(6 - d) while normal (d <= 11): 0x60 + 8 (e - d)
        lo, hi = _fp4_word_asm(wd, 0x6C686000 - d * 0x08080800, 0x7C787470 - d * 0x08080808)
        t = gl.join(_split_bytes(lo), _split_bytes(hi))                             # [64, 4 c + g, b, h]
        t = gl.reshape(t, [2 * _BN, 4, 4, 4, 2])                                 # [64, c, g, b, h]
        t = gl.reshape(gl.permute(t, (0, 2, 4, 1, 3)), [2 * _BN, _BK])       # k = 32 g + 16 h + 4 c + b
        return gl.convert_layout(t.to(gl.float8e4nv, bitcast=True), a_layout, assert_trivial=True)

    @gluon.jit
    def _epilogue(acc, mma: gl.constexpr, ROWS: gl.constexpr, row0, row_end, ok_all, expert, pid_n,
                  x_exp_ptr, pair_rows_ptr, pair_w_ptr, w_row_ptr, h_ptr, h_sf_ptr, clamp, epi,
                  INTER: gl.constexpr, HAS_CLAMP: gl.constexpr, HW_CVT: gl.constexpr = False):
        """`l1_gemm._l1_epilogue` for the [64 stacked rows, ROWS pairs] accumulator of pairs
        row0 .. row0 + ROWS - 1 (those below row_end, when ok_all): row factors, bf16, then gate and
        up through shared memory (`epi`, bf16 [64, 128]) into per-pair columns, clamp, SwiGLU x
        weight, E4M3 per 32 with its UE8M0 byte. HW_CVT: the bf16 and E4M3 roundings by the
        hardware's conversions (`l1_gemm.EPILOGUE_HW_CVT`; the same bytes)."""
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, mma))
        row_ok = (rows < row_end) & ok_all
        prow = gl.load(pair_rows_ptr + rows, mask=row_ok, other=0)
        e_row = gl.load(x_exp_ptr + prow, mask=row_ok, other=0)
        a_f = _exp2_ue8m0(gl.maximum(e_row, 1))
        r = gl.arange(0, 2 * _BN, layout=gl.SliceLayout(1, mma))
        n_rows = expert.to(gl.int64) * (2 * INTER) + gl.where(r < _BN, r, r - _BN + INTER) + pid_n * _BN
        w_f = gl.load(w_row_ptr + n_rows)
        if HW_CVT:
            g = acc * w_f[:, None] * a_f[None, :]       # (rounded to bf16 by the store's cvt.rn)
        else:
            g = _round_bf16(acc * w_f[:, None] * a_f[None, :])
        TPW1: gl.constexpr = 32 if ROWS >= 32 else ROWS
        el: gl.constexpr = gl.BlockedLayout(size_per_thread=[_BN * TPW1 // 32, 1],
                                            threads_per_warp=[32 // TPW1, TPW1], warps_per_cta=[1, 4], order=[0, 1])
        e_s = epi.slice(0, ROWS, dim=1)
        _barrier()                  # (this warpgroup) the previous item's reads of `epi` are done
        e_s.store(g.to(gl.bfloat16))
        _barrier()
        gate = e_s.slice(0, _BN, dim=0).load(el).to(gl.float32)
        up = e_s.slice(_BN, _BN, dim=0).load(el).to(gl.float32)
        if HAS_CLAMP:
            gate = gl.minimum(gate, clamp)
            up = gl.minimum(gl.maximum(up, -clamp), clamp)
        cols = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, el))
        col_ok = (cols < row_end) & ok_all
        weight = gl.load(pair_w_ptr + cols, mask=col_ok, other=0.0)
        h = _swiglu_h(gate, up, weight[None, :])                                     # [32 n, ROWS]
        e = _ue8m0_exponent(gl.max(gl.abs(h), axis=0), False)
        if HW_CVT:
            code = (h * _exp2_neg_ue8m0(e)[None, :]).to(gl.float8e4nv).to(gl.int8, bitcast=True)
        else:
            code = _e4m3_code(h * _exp2_neg_ue8m0(e)[None, :])
        n = gl.arange(0, _BN, layout=gl.SliceLayout(1, el))
        cols64 = cols.to(gl.int64)
        gl.store(h_ptr + cols64[None, :] * INTER + (pid_n * _BN + n)[:, None], code.to(gl.int8),
                 mask=col_ok[None, :])
        gl.store(h_sf_ptr + cols64 * (INTER // 32) + pid_n, e.to(gl.uint8), mask=col_ok)

    @gluon.jit
    def _step_operand(it, k, d_next, d_base, d_offs, g8, w_bufs, w_ready, x_ready, NK: gl.constexpr,
                      STAGES_: gl.constexpr, W_KIND: gl.constexpr, a_layout: gl.constexpr, wl: gl.constexpr,
                      PROF: gl.constexpr = False):
        """Step k's weight operand once its stage has landed: (operand, stage, the next step's offset
        indices, loaded here one step ahead, the cycles waited for the stage where PROF, else 0).
        "mxfp4": the words decoded into the MMA's register operand; "fp8_rebased": the stage's
        shared-memory tile."""
        s = it % STAGES_
        ph = (it // STAGES_) & 1
        d_cur = d_next
        if W_KIND == "mxfp4":
            if k + 1 < NK:
                d_next = gl.load(d_base + (d_offs + (k + 1)))
        t0 = _now(PROF)
        mbarrier.wait(w_ready.index(s), ph)
        mbarrier.wait(x_ready.index(s), ph)
        waited = _since(t0, PROF)
        # cp.async writes through the generic proxy, the MMA reads through the async one
        fence_async_shared()
        if W_KIND == "mxfp4":
            a = _decode_a(w_bufs.index(s), (d_cur[:, None] >> g8[None, :]) & 0xFF, a_layout, wl)
        else:
            a = w_bufs.index(s)
        return a, s, d_next, waited

    @gluon.jit
    def _ahead_mma(a, s, x_bufs, o_bufs, zero, zero_o, OVER: gl.constexpr):
        """Issue a step's MMA (and, OVER, the rows past block_m's) on stage s: (token, token of the
        rows past, the same token when not OVER)."""
        tok = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
        if OVER:
            tok_o = warpgroup_mma(a, o_bufs.index(s).permute((1, 0)), zero_o, use_acc=False, is_async=True)
        else:
            tok_o = tok
        return tok, tok_o

    @gluon.jit
    def _ahead_chain(a, s, tok, tok_o, x_bufs, o_bufs, OVER: gl.constexpr):
        """Issue a step's MMA(s) on stage s chained onto the running ones (tok, tok_o: accumulate)."""
        tok = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), tok, use_acc=True, is_async=True)
        if OVER:
            tok_o = warpgroup_mma(a, o_bufs.index(s).permute((1, 0)), tok_o, use_acc=True, is_async=True)
        else:
            tok_o = tok
        return tok, tok_o

    @gluon.jit
    def _ahead_wait_add(tok, tok_o, acc, acc_o, OVER: gl.constexpr, PROF: gl.constexpr):
        """Wait for a step's MMA(s) and add the partial sums: (acc, acc_o, cycles waited where PROF)."""
        t0 = _now(PROF)
        if OVER:
            part, part_o = warpgroup_mma_wait(0, deps=[tok, tok_o])
            acc_o = acc_o + part_o
        else:
            part = warpgroup_mma_wait(0, deps=[tok])
        waited = _since(t0, PROF)
        acc = acc + part
        return acc, acc_o, waited

    @gluon.jit
    def _ahead_loop(it, d_next, d_base, d_offs, g8, w_bufs, x_bufs, o_bufs, w_ready, x_ready, empty, zero, zero_o,
                    NK: gl.constexpr, STAGES_: gl.constexpr, W_KIND: gl.constexpr, a_layout: gl.constexpr,
                    wl: gl.constexpr, OVER: gl.constexpr, PROF: gl.constexpr, PROMOTE_STEPS: gl.constexpr = 1):
        """`_promoted_mainloop` (4-bit words, NK even) with every odd step's decode ahead: steps in
        pairs, the odd step's stage waited for and its words decoded into a second register operand
        while the even step's MMAs run. PROMOTE_STEPS 1: then the even step's partial sums waited for
        and added, then the odd step's MMAs; 2 (256 K a partial sum, the decode tiles'): the odd
        step's MMAs chained onto the even one's in flight, one wait and one add per pair. The same
        partial sums added in the same order as the plain loop (so the same h); half the decodes
        (and with PROMOTE_STEPS 2 every wait between the steps of a pair) no longer sit between one
        MMA's end and the next one's start.

        Both operands are defined inside the loop body (no 8-bit tensor is loop-carried: carrying
        one cost ~90 instructions a step of byte unpacking and repacking), the odd one while the even
        step's MMA reads the even one, which stays unwritten until its wait
        (`_compile.wgmma_register_hazards`). OVER: this item has rows past block_m (their MMA beside
        each step's). Returns (acc, acc_o, it, cycles waited for stages, for MMAs)."""
        gl.static_assert(NK % 2 == 0, "the decode-ahead loop takes K steps in pairs")
        acc = zero
        acc_o = zero_o
        t_wait = _zero(PROF)
        t_mma = _zero(PROF)
        for j in range(NK // 2):
            a_e, s_e, d_next, waited = _step_operand(it, 2 * j, d_next, d_base, d_offs, g8, w_bufs, w_ready,
                                                     x_ready, NK, STAGES_, W_KIND, a_layout, wl, PROF)
            t_wait += waited
            tok, tok_o = _ahead_mma(a_e, s_e, x_bufs, o_bufs, zero, zero_o, OVER)
            a_o, s_o, d_next, waited = _step_operand(it + 1, 2 * j + 1, d_next, d_base, d_offs, g8, w_bufs, w_ready,
                                                     x_ready, NK, STAGES_, W_KIND, a_layout, wl, PROF)
            t_wait += waited
            if PROMOTE_STEPS == 1:
                acc, acc_o, waited = _ahead_wait_add(tok, tok_o, acc, acc_o, OVER, PROF)
                t_mma += waited
                mbarrier.arrive(empty.index(s_e))
                tok, tok_o = _ahead_mma(a_o, s_o, x_bufs, o_bufs, zero, zero_o, OVER)
                acc, acc_o, waited = _ahead_wait_add(tok, tok_o, acc, acc_o, OVER, PROF)
                t_mma += waited
                mbarrier.arrive(empty.index(s_o))
            else:
                tok, tok_o = _ahead_chain(a_o, s_o, tok, tok_o, x_bufs, o_bufs, OVER)
                acc, acc_o, waited = _ahead_wait_add(tok, tok_o, acc, acc_o, OVER, PROF)
                t_mma += waited
                mbarrier.arrive(empty.index(s_e))
                mbarrier.arrive(empty.index(s_o))
            it += 2
        return acc, acc_o, it, t_wait, t_mma

    @gluon.jit
    def _promoted_mainloop(it, d_next, d_base, d_offs, g8, has_over, w_bufs, x_bufs, o_bufs, w_ready, x_ready,
                           empty, zero, zero_o, NK: gl.constexpr, STAGES_: gl.constexpr, W_KIND: gl.constexpr,
                           OVER_M: gl.constexpr, PROMOTE_STEPS: gl.constexpr, a_layout: gl.constexpr,
                           wl: gl.constexpr, PROF: gl.constexpr = False, AHEAD: gl.constexpr = False):
        """One item's K loop promoted as `l1_gemm._fp8_mainloop` does (PROMOTE 1 of BLOCK_K 128 or
        256): every PROMOTE_STEPS 128-K steps an MMA chain from zero, waited for and added to the
        float32 accumulator (and the rows past block_m's, `has_over`); each stage handed back once
        its MMA is done, before the next step's decode rewrites the register operand. Returns
        (acc, acc_o, it, cycles waited for stages, cycles waited for MMAs); the cycles where PROF,
        else 0. AHEAD (4-bit words): `_ahead_loop`, the same sums."""
        # (the plain 256-K loop has no rows past block_m: `applies`)
        gl.static_assert(AHEAD or PROMOTE_STEPS == 1 or OVER_M == 0, "256 K with rows past block_m needs AHEAD")
        acc = zero
        acc_o = zero_o
        t_wait = _zero(PROF)
        t_mma = _zero(PROF)
        if AHEAD:
            if OVER_M > 0:
                if has_over:
                    acc, acc_o, it, t_wait, t_mma = _ahead_loop(it, d_next, d_base, d_offs, g8, w_bufs, x_bufs, o_bufs,
                                                                w_ready, x_ready, empty, zero, zero_o, NK, STAGES_,
                                                                W_KIND, a_layout, wl, True, PROF, PROMOTE_STEPS)
                else:
                    acc, acc_o, it, t_wait, t_mma = _ahead_loop(it, d_next, d_base, d_offs, g8, w_bufs, x_bufs, o_bufs,
                                                                w_ready, x_ready, empty, zero, zero_o, NK, STAGES_,
                                                                W_KIND, a_layout, wl, False, PROF, PROMOTE_STEPS)
            else:
                acc, acc_o, it, t_wait, t_mma = _ahead_loop(it, d_next, d_base, d_offs, g8, w_bufs, x_bufs, o_bufs,
                                                            w_ready, x_ready, empty, zero, zero_o, NK, STAGES_, W_KIND,
                                                            a_layout, wl, False, PROF, PROMOTE_STEPS)
        elif PROMOTE_STEPS == 1:
            for k in range(NK):
                a, s, d_next, waited = _step_operand(it, k, d_next, d_base, d_offs, g8, w_bufs, w_ready, x_ready,
                                                     NK, STAGES_, W_KIND, a_layout, wl, PROF)
                t_wait += waited
                # Each step's MMAs waited for, then added (ptxas serialises the wgmma pipeline of a
                # promoted accumulator anyway, C7514): the tensor pipe is kept busy by the other CTA
                # on the SM (two per SM), as in the probe's ws mode (780-795 TFLOP/s on an H100)
                tok = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
                if OVER_M > 0:
                    if has_over:
                        tok_o = warpgroup_mma(a, o_bufs.index(s).permute((1, 0)), zero_o, use_acc=False,
                                              is_async=True)
                        t0 = _now(PROF)
                        part, part_o = warpgroup_mma_wait(0, deps=[tok, tok_o])
                        t_mma += _since(t0, PROF)
                        acc = acc + part
                        acc_o = acc_o + part_o
                    else:
                        t0 = _now(PROF)
                        part = warpgroup_mma_wait(0, deps=[tok])
                        t_mma += _since(t0, PROF)
                        acc = acc + part
                else:
                    t0 = _now(PROF)
                    part = warpgroup_mma_wait(0, deps=[tok])
                    t_mma += _since(t0, PROF)
                    acc = acc + part
                mbarrier.arrive(empty.index(s))
                it += 1
        else:
            # the Triton kernel's 4-bit decode tiles take 256 K per step and promote after each:
            # two 128-K MMAs chained into one partial sum, then added (the same sums)
            for k2 in range(NK // 2):
                for j in gl.static_range(2):
                    a, s, d_next, waited = _step_operand(it, 2 * k2 + j, d_next, d_base, d_offs, g8, w_bufs, w_ready,
                                                         x_ready, NK, STAGES_, W_KIND, a_layout, wl, PROF)
                    t_wait += waited
                    if j == 0:
                        tok = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
                    else:
                        tok = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), part, use_acc=True, is_async=True)
                    t0 = _now(PROF)
                    part = warpgroup_mma_wait(0, deps=[tok])
                    t_mma += _since(t0, PROF)
                    mbarrier.arrive(empty.index(s))
                    it += 1
                acc = acc + part
        return acc, acc_o, it, t_wait, t_mma

    @gluon.jit
    def _mma_partition(x_exp_ptr, pair_rows_ptr, pair_w_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr,
                       num_tiles_ptr, max_tiles, aux_ptr, w_row_ptr, h_ptr, h_sf_ptr, clamp,
                       w_bufs, x_bufs, o_bufs, epi, w_ready, x_ready, empty,
                       HIDDEN: gl.constexpr, INTER: gl.constexpr, W_KIND: gl.constexpr, HAS_CLAMP: gl.constexpr,
                       STAGES_: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr,
                       OVER_LIMIT: gl.constexpr, PROMOTE_STEPS: gl.constexpr, prof_ptr, PROF: gl.constexpr,
                       AHEAD: gl.constexpr, LANE: gl.constexpr = False, EPI_CVT: gl.constexpr = False):
        """The MMA warpgroup (see the module doc). PROF: its cycles into prof_ptr (`PROFILE`);
        AHEAD: the decode one step ahead (`DECODE_AHEAD`); LANE: words in the "lane" K order
        (`gemm_operands.LANE_K_ORDER`: word 4 c + g of group c, one table per row and step);
        EPI_CVT: the epilogue's roundings by the hardware's conversions (`l1_gemm.EPILOGUE_HW_CVT`)."""
        NUM_N: gl.constexpr = INTER // _BN
        NK: gl.constexpr = HIDDEN // _BK
        OM: gl.constexpr = OVER_M if OVER_M > 0 else 16
        R: gl.constexpr = 2 * _BN
        mma: gl.constexpr = _mma_layout(BM)
        mma_o: gl.constexpr = _mma_layout(OM)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        wl: gl.constexpr = _WORDS_LAYOUT
        r = gl.arange(0, R, layout=gl.SliceLayout(1, wl))
        if LANE:
            g8 = (gl.arange(0, _BK // 8, layout=gl.SliceLayout(0, wl)) // 4) * 8    # a word's group byte
        else:
            g8 = (gl.arange(0, _BK // 8, layout=gl.SliceLayout(0, wl)) % 4) * 8
        zero = gl.zeros([R, BM], gl.float32, layout=mma)
        zero_o = gl.zeros([R, OM], gl.float32, layout=mma_o)
        num_tiles = gl.minimum(gl.load(num_tiles_ptr), max_tiles)
        t_start = _now(PROF)
        t_wait = _zero(PROF)
        t_mma = _zero(PROF)
        t_epi = _zero(PROF)
        items = 0
        it = 0
        for work in range(gl.program_id(0), num_tiles * NUM_N, gl.num_programs(0)):
            expert, row_start, row_end, pid_n, has_over = _item(work, num_tiles, offsets_ptr, tile_expert_ptr,
                                                                 tile_row_ptr, NUM_N, GROUP_M, BM, OVER_M, OVER_LIMIT)
            # the weight rows' offset indices (a step's 4 bytes = one int32 per row), one step ahead
            n_rows = gl.where(r < _BN, r, r - _BN + INTER) + pid_n * _BN
            d_base = aux_ptr + expert.to(gl.int64) * (2 * INTER * (HIDDEN // 128))
            d_offs = n_rows * (HIDDEN // 128)
            d_next = gl.zeros([R], gl.int32, layout=gl.SliceLayout(1, wl))
            if W_KIND == "mxfp4":
                d_next = gl.load(d_base + d_offs)
            acc, acc_o, it, waited, in_mma = _promoted_mainloop(it, d_next, d_base, d_offs, g8, has_over, w_bufs,
                                                                x_bufs, o_bufs, w_ready, x_ready, empty, zero, zero_o,
                                                                NK, STAGES_, W_KIND, OVER_M, PROMOTE_STEPS, a_layout,
                                                                wl, PROF, AHEAD)
            t_wait += waited
            t_mma += in_mma
            t0 = _now(PROF)
            _epilogue(acc, mma, BM, row_start, row_end, True, expert, pid_n, x_exp_ptr, pair_rows_ptr,
                      pair_w_ptr, w_row_ptr, h_ptr, h_sf_ptr, clamp, epi, INTER, HAS_CLAMP, EPI_CVT)
            if OVER_M > 0:
                if has_over:
                    _epilogue(acc_o, mma_o, OM, row_start + BM, row_end, True, expert, pid_n, x_exp_ptr,
                              pair_rows_ptr, pair_w_ptr, w_row_ptr, h_ptr, h_sf_ptr, clamp, epi, INTER, HAS_CLAMP,
                              EPI_CVT)
            t_epi += _since(t0, PROF)
            items += 1
        # per CTA: [0] all cycles, [1] waiting for stages, [2] waiting for MMAs, [3] epilogues, [4] items
        _store_prof(prof_ptr, 0, _since(t_start, PROF), t_wait, PROF)
        _store_prof(prof_ptr, 2, t_mma, t_epi, PROF)
        if PROF:
            gl.store(prof_ptr + gl.program_id(0) * 8 + 4, items.to(gl.int64))

    @gluon.jit(do_not_specialize=["max_tiles", "clamp"])
    def _l1_ws_kernel(x_ptr, x_exp_ptr, pair_rows_ptr, pair_w_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr,
                      num_tiles_ptr, w_desc, aux_ptr, w_row_ptr, h_ptr, h_sf_ptr, max_tiles, clamp,
                      xp_desc, xo_desc,
                      HIDDEN: gl.constexpr, INTER: gl.constexpr, W_KIND: gl.constexpr, HAS_CLAMP: gl.constexpr,
                      STAGES_: gl.constexpr, GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr,
                      OVER_LIMIT: gl.constexpr, LOAD_REGS_: gl.constexpr, PROMOTE_STEPS: gl.constexpr = 1,
                      PDL: gl.constexpr = False, PAIR_X: gl.constexpr = False, prof_ptr=None,
                      PROF: gl.constexpr = False, AHEAD: gl.constexpr = False, LANE: gl.constexpr = False,
                      GATHER_WARPS: gl.constexpr = 4, EPI_CVT: gl.constexpr = False):
        """L1's main launch, warp-specialised (module docstring). x_ptr: rebased E4M3 pool [Npool, H];
        x_exp_ptr: int32 row exponents [Npool]; w_desc: TMA descriptor of the weight rows
        ([E 2I, H / 8] int32 fragment words, or [E 2I, H] E4M3), boxes of 32 rows x one step;
        aux_ptr: the uint8 [E, 2I, H / 32] offset indices as int32 [E, 2I, H / 128] ("mxfp4"); h_ptr: int8 [P, I] E4M3;
        h_sf_ptr: uint8 [P, I / 32]; the other arguments as `l1_gemm._l1_kernel`'s. PAIR_X: the
        token rows come in pair order by TMA (`xp_desc`: boxes of BM rows of the rebased x copied per
        pair, `rebase.order_pair_rows`; `xo_desc`: OVER_M-row boxes of it) instead of gathered from
        the pool by cp.async (x_ptr then unused); both descriptors None otherwise. PROF: each CTA's
        cycle counts into prof_ptr (int64 [grid, 8], `PROFILE`; a measuring build, never the layer's).
        AHEAD: the MMA warpgroup decodes step k + 1's words while step k's MMAs run (`DECODE_AHEAD`;
        4-bit words promoted every step). LANE: 4-bit words (and so x) in the "lane" K order
        (`gemm_operands.LANE_K_ORDER`). GATHER_WARPS: the gathering producer's warps (4, or 1 at the
        decode tiles: `DECODE_GATHER_WARPS`). EPI_CVT: `l1_gemm.EPILOGUE_HW_CVT`."""
        if PDL:
            pdl_enter()
        KW: gl.constexpr = _BK // 8 if W_KIND == "mxfp4" else _BK
        W_BYTES: gl.constexpr = 2 * _BN * _BK // (2 if W_KIND == "mxfp4" else 1)
        OM: gl.constexpr = OVER_M if OVER_M > 0 else 16
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES_, 2 * _BN, KW], w_desc.layout)
        x_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES_, BM, _BK], x_layout)
        if OVER_M > 0:
            o_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES_, OM, _BK], x_layout)
        else:                       # unused
            o_bufs = gl.allocate_shared_memory(gl.float8e4nv, [1, 16, _BK], x_layout)
        epi_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
        epi = gl.allocate_shared_memory(gl.bfloat16, [2 * _BN, BM], epi_layout)
        w_ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        x_ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES_):
            mbarrier.init(w_ready.index(i), count=1)
            # one cp.async arrival per producer thread, or one TMA transaction count (PAIR_X)
            mbarrier.init(x_ready.index(i), count=1 if PAIR_X else 32 * GATHER_WARPS)
            mbarrier.init(empty.index(i), count=1)
        LOAD_WARPS: gl.constexpr = 1 if PAIR_X else GATHER_WARPS  # one warp issues every TMA, or warps gather
        gl.warp_specialize([
            (_mma_partition, (x_exp_ptr, pair_rows_ptr, pair_w_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr,
                              num_tiles_ptr, max_tiles, aux_ptr, w_row_ptr, h_ptr, h_sf_ptr, clamp,
                              w_bufs, x_bufs, o_bufs, epi, w_ready, x_ready, empty,
                              HIDDEN, INTER, W_KIND, HAS_CLAMP, STAGES_, GROUP_M, BM, OVER_M, OVER_LIMIT,
                              PROMOTE_STEPS, prof_ptr, PROF, AHEAD, LANE, EPI_CVT)),
            (_load_partition, (x_ptr, pair_rows_ptr, xp_desc, xo_desc, offsets_ptr, tile_expert_ptr, tile_row_ptr,
                               num_tiles_ptr, max_tiles, w_desc, w_bufs, x_bufs, o_bufs, w_ready, x_ready, empty,
                               HIDDEN, INTER, KW, STAGES_, W_BYTES, GROUP_M, BM, OVER_M, OVER_LIMIT, PAIR_X,
                               prof_ptr, PROF, GATHER_WARPS)),
        ], [LOAD_WARPS], [LOAD_REGS_])


def weight_descriptor(w_kind: str, w_data: torch.Tensor, k: int, box_rows: int = BLOCK_N):
    """The TMA descriptor of a weight's rows ([E, N, K] as [E N, K]): "mxfp4" fragment words (int8
    [E, N, K / 2] viewed as int32 [E N, K / 8]), "fp8_rebased" E4M3; boxes of `box_rows` rows x one
    128-K step (L1: 32 gate or up rows; L2, `l2_gluon`: 64 rows of w2)."""
    if not w_data.is_contiguous():
        # a reshaped copy would leave the descriptor pointing at a temporary
        raise ValueError("w_data: expected the contiguous weight operand (gemm_operands.prepare_weight_operand)")
    rows = w_data.shape[0] * w_data.shape[1]
    if w_kind == "mxfp4":
        t, block, dtype = w_data.reshape(rows, k // 2).view(torch.int32), [box_rows, BLOCK_K // 8], gl.int32
    else:
        t, block, dtype = w_data.reshape(rows, k), [box_rows, BLOCK_K], gl.float8e4nv
    return TensorDescriptor.from_tensor(t, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def pair_x_descriptors(x_pairs: torch.Tensor, block_m: int, over_m: int):
    """The TMA descriptors of the rebased x in pair order (E4M3 [P, H]) for `PAIR_X`: boxes of
    block_m rows x one 128-K step, and of over_m rows (16 when none: unused)."""
    if not x_pairs.is_contiguous():
        raise ValueError("x_pairs: expected a contiguous [P, H] tensor")
    lay = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    return (TensorDescriptor.from_tensor(x_pairs, [block_m, BLOCK_K], lay),
            TensorDescriptor.from_tensor(x_pairs, [over_m or 16, BLOCK_K], lay))


def pair_x_signatures(block_m: int, over_m: int) -> tuple:
    """The Triton type strings of `pair_x_descriptors`' results (compile-only checks)."""
    lay = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
    return (tensordesc_signature("fp8e4nv", [block_m, BLOCK_K], lay),
            tensordesc_signature("fp8e4nv", [over_m or 16, BLOCK_K], lay))


def descriptor_signature(w_kind: str, box_rows: int = BLOCK_N) -> str:
    """The Triton type string of `weight_descriptor`'s result (compile-only checks)."""
    if w_kind == "mxfp4":
        block, dtype, name = [box_rows, BLOCK_K // 8], gl.int32, "i32"
    else:
        block, dtype, name = [box_rows, BLOCK_K], gl.float8e4nv, "fp8e4nv"
    return tensordesc_signature(name, block, gl.NVMMASharedLayout.get_default_for(block, dtype))


def tensordesc_signature(name: str, block, layout) -> str:
    """Triton's type string of a Gluon TMA descriptor argument."""
    return f"tensordesc<{name}[{block[0]}, {block[1]}],{layout!r}>"


def decodes_ahead(on: bool, w_kind: str, promote_k: int, k: int) -> bool:
    """Whether a launch of this kernel or of `l2_gluon`'s, reducing k, decodes one step ahead
    (`_ahead_loop`) when asked to (`on`): 4-bit words promoted every 128 or 256 K (not chained
    through K), an even number of 128-K steps."""
    return (on and w_kind == "mxfp4" and promote_k in (BLOCK_K, 2 * BLOCK_K) and promote_k < k
            and k % (2 * BLOCK_K) == 0)


def ahead(w_kind: str, promote_k: int, hidden: int) -> bool:
    """Whether an L1 launch decodes one step ahead (`DECODE_AHEAD`, where `decodes_ahead`)."""
    return decodes_ahead(DECODE_AHEAD, w_kind, promote_k, hidden)


def launch_promote_k(w_kind: str, block_m: int, promote_k: int, hidden: int) -> int:
    """The K of a launch's partial sums: the Triton kernel's (promote_k), or 256 at the 4-bit
    128-row prefill tiles where `PREFILL_PROMOTE_K` asks for it and the kernel decodes ahead."""
    if (block_m == 128 and promote_k == BLOCK_K and PREFILL_PROMOTE_K == 2 * BLOCK_K
            and ahead(w_kind, 2 * BLOCK_K, hidden)):
        return 2 * BLOCK_K                  # (other sums than the Triton kernel's)
    return promote_k


def gather_warps(block_m: int, pair_x: bool = False) -> int:
    """The gathering producer's warps of a launch: `DECODE_GATHER_WARPS` at the decode tiles, else 4
    (1 issues the TMA boxes with the token rows in pair order)."""
    if DECODE_GATHER_WARPS not in (1, 4):
        raise ValueError(f"l1_gluon.DECODE_GATHER_WARPS: expected 1 or 4, got {DECODE_GATHER_WARPS!r}")
    return DECODE_GATHER_WARPS if block_m in (16, 32) and not pair_x else 4


def compile_args(w_kind: str, hidden: int, inter: int, has_clamp: bool = False, block_m: int = 128,
                 over_m: int = 16, over_limit: int = 32, group_m: int = 8, promote_k: int = BLOCK_K,
                 pdl: bool = False, pair_x: bool = False, prof: bool = False, decode_ahead: bool = False,
                 lane: bool = False, gather: int = 4, epi_cvt: bool = False):
    """(kernel, signature, constexprs, options) for `_compile.compile_kernel` (tests); pdl: as the
    layer's launches bind it (`_launch.Launcher.enable_pdl`); pair_x: the token rows in pair order
    by TMA (`PAIR_X`); prof: the measuring build (`PROFILE`); decode_ahead: `DECODE_AHEAD`'s build
    (4-bit words promoted every 128 K only); lane: 4-bit words in the "lane" K order (`LANE`);
    gather: the gathering producer's warps (`GATHER_WARPS`: 1 at the decode tiles only); epi_cvt:
    `EPI_CVT`."""
    if gather not in (1, 4) or (gather == 1 and (block_m not in (16, 32) or pair_x)):
        raise ValueError(f"gather: 4, or 1 at the 16- / 32-row tiles without pair_x, got {gather} at {block_m}")
    if decode_ahead and not decodes_ahead(True, w_kind, promote_k, hidden):
        raise ValueError("decode_ahead: for 4-bit words promoted every 128 or 256 K over an even number of steps")
    stages, maxnreg, _ = launch_plan(w_kind, block_m, over_m)
    sig = dict(x_ptr="*fp8e4nv", x_exp_ptr="*i32", pair_rows_ptr="*i32", pair_w_ptr="*fp32", offsets_ptr="*i32",
               tile_expert_ptr="*i32", tile_row_ptr="*i32", num_tiles_ptr="*i32", w_desc=descriptor_signature(w_kind),
               aux_ptr="*i32", w_row_ptr="*fp32", h_ptr="*i8", h_sf_ptr="*u8", max_tiles="i32", clamp="fp32")
    ce = dict(HIDDEN=hidden, INTER=inter, W_KIND=w_kind, HAS_CLAMP=has_clamp, STAGES_=stages, GROUP_M=group_m,
              BM=block_m, OVER_M=over_m, OVER_LIMIT=over_limit,
              LOAD_REGS_=LOAD_REGS_ONE_WARP if gather == 1 else LOAD_REGS, PROMOTE_STEPS=promote_k // BLOCK_K,
              PDL=pdl, PAIR_X=pair_x, AHEAD=decode_ahead)
    if lane:
        ce["LANE"] = True
    if gather != 4:
        ce["GATHER_WARPS"] = gather
    if epi_cvt:
        ce["EPI_CVT"] = True
    if pair_x:
        sig["xp_desc"], sig["xo_desc"] = pair_x_signatures(block_m, over_m)
    else:
        ce["xp_desc"] = ce["xo_desc"] = None
    if prof:
        sig["prof_ptr"], ce["PROF"] = "*i64", True
    else:
        ce["prof_ptr"] = None
    return _l1_ws_kernel, sig, ce, dict(num_warps=4, maxnreg=maxnreg, enable_fp_fusion=False)


def launch_extras(name: str, profile: Optional[torch.Tensor], grid: tuple, device, lane: bool) -> dict:
    """The constexprs of a Gluon L1 / L2 launch beyond the layer's build: the measuring build (`PROF`,
    `name` = the module's PROFILE switch, checked against the grid), the "lane" K order (`LANE`),
    the epilogues' conversions (`EPI_CVT`, `l1_gemm.EPILOGUE_HW_CVT`)."""
    from .l1_gemm import EPILOGUE_HW_CVT
    extra = {}
    if profile is not None:
        if profile.dtype != torch.int64 or profile.numel() < grid[0] * 8 or profile.device != device:
            raise ValueError(f"{name}: expected an int64 tensor of >= {grid[0] * 8} elements on {device}, got "
                             f"{profile.dtype} x {profile.numel()} on {profile.device}")
        extra.update(prof_ptr=profile, PROF=True)
    if lane:
        extra["LANE"] = True
    if EPILOGUE_HW_CVT:
        extra["EPI_CVT"] = True
    return extra


def l1_gluon_launch(x: torch.Tensor, x_exp: torch.Tensor, pair_rows: torch.Tensor, pair_weights: torch.Tensor,
                    expert_offsets: torch.Tensor, tile_expert: torch.Tensor, tile_row_start: torch.Tensor,
                    num_tiles: torch.Tensor, w_kind: str, w_data: torch.Tensor, w_aux: Optional[torch.Tensor],
                    w_row: torch.Tensor, h_out: torch.Tensor, h_sf_out: torch.Tensor, *, hidden: int, inter: int,
                    clamp: Optional[float], block_m: int, over_m: int, over_limit: int, group_m: int, num_sms: int,
                    max_tiles: int, promote_k: int = BLOCK_K, x_pairs: Optional[torch.Tensor] = None,
                    lane: bool = False):
    """Launch `_l1_ws_kernel` on arguments `l1_gemm.l1_grouped_gemm` has validated (it calls this
    where `applies`); returns (kernel, grid, args, kwargs) for `_launch_or_bind`. x_pairs: the
    rebased x in pair order (`PAIR_X`, 128-row tiles only), else None. lane: the 4-bit words (and
    x) in the "lane" K order (`WeightOperand.lane`)."""
    stages, maxnreg, ctas = launch_plan(w_kind, block_m, over_m)
    promote_k = launch_promote_k(w_kind, block_m, promote_k, hidden)
    w_desc = weight_descriptor(w_kind, w_data, hidden)
    total = max_tiles * (inter // BLOCK_N)
    grid = (max(1, min(total, ctas * num_sms)),)
    xp_desc = xo_desc = None
    if x_pairs is not None:
        if block_m != 128:
            raise ValueError(f"x_pairs: the pair-ordered token rows are for the 128-row tiles, got block_m {block_m}")
        xp_desc, xo_desc = pair_x_descriptors(x_pairs, block_m, over_m)
    args = (x, x_exp, pair_rows, pair_weights, expert_offsets, tile_expert, tile_row_start, num_tiles, w_desc,
            (w_aux if w_aux is not None else w_row).view(torch.int32), w_row, h_out.view(torch.int8),
            h_sf_out.view(torch.uint8), max_tiles, float(clamp) if clamp is not None else 0.0, xp_desc, xo_desc)
    extra = launch_extras("l1_gluon.PROFILE", PROFILE, grid, h_out.device, lane and w_kind == "mxfp4")
    load_regs = LOAD_REGS
    if gather_warps(block_m, x_pairs is not None) != 4:
        extra["GATHER_WARPS"] = gather_warps(block_m, x_pairs is not None)
        load_regs = LOAD_REGS_ONE_WARP
    kwargs = dict(**extra, AHEAD=ahead(w_kind, promote_k, hidden), HIDDEN=hidden, INTER=inter, W_KIND=w_kind,
                  HAS_CLAMP=clamp is not None, STAGES_=stages, GROUP_M=group_m, BM=block_m, OVER_M=over_m,
                  OVER_LIMIT=over_limit, LOAD_REGS_=load_regs, PROMOTE_STEPS=promote_k // BLOCK_K, PAIR_X=x_pairs is not None, num_warps=4, maxnreg=maxnreg,
                  enable_fp_fusion=False)   # as the Triton kernel: no FMA contraction
    return _l1_ws_kernel, grid, args, kwargs
