"""L2 on Hopper as a warp-specialised Gluon kernel, the counterpart of `l1_gluon`.

Built 2026-12-07 (seventh session); first run on an H100 in the tenth: y equal to the Triton
kernel's at 128 (+ 16) and 16 rows (`tests/test_gemm_gpu.py -k gluon_l2`); taken by default where
it measured faster (`DEFAULT_LAUNCHES`: the 16-row decode tiles, 4-bit and FP8 weights; `wanted`,
`ENABLED`).

Scope (`applies`): the streamed FP8 mainloop (h rebased to E4M3 after L1, `h_rebased`), weights
"mxfp4" (fragment words decoded into the MMA's register operand, "imad" tables) or "fp8_rebased",
bf16 combine (the FP8 combine's 128-column groups span two of this kernel's items: not covered),
tile maps of 128 pairs (plus 0 or 16 rows past) or of 32 / 16. Items are 64 rows of w2 (64
columns of y) x the tile's pairs; K = I in 128-K steps, summed as the Triton kernel sums
(`gemm_heuristics`): with FP8 weights chained through all of K, each step's MMA in flight while
the next step waits for its stage (both operands in shared memory); with 4-bit words promoted
every 128 K (prefill) or 256 K (decode) as L1 is (`l1_gluon._promoted_mainloop`), each step's MMA
waited for before the next decode rewrites the registers it reads (the other CTAs on the SM keep
the tensor pipe busy meanwhile).

Partitions (per CTA; `l1_gluon.launch_plan` residency: two CTAs per SM at prefill, four at decode):
- a producer warp: TMA for the step's 64 weight rows and the tile's h rows (pair-ordered: one box,
  no gather; rows past the pairs are other experts' or zero-filled, and their outputs are not
  stored) and the 16 rows past block_m when the plan has them;
- the MMA warpgroup: the L1 kernel's step (`l1_gluon._step_operand`), then the epilogue of
  `l2_gemm._l2_epilogue` for bf16: row factors, bf16, each pair's 64 values stored to its
  destination row (absolute addresses; 0 = no destination) as 16-byte vectors after an exchange
  through shared memory.
The same sums and the same rounding as the Triton kernel: y must equal its (up to the sign of
zero sums).
"""
from __future__ import annotations

from typing import Optional

import torch

from .l1_gemm import _exp2_ue8m0, _round_bf16
from .l1_gluon import (BLOCK_K, BLOCK_MS, HAVE_GLUON, decodes_ahead, descriptor_signature, launch_extras,
                       launch_plan, tensordesc_signature, weight_descriptor)
from .sync import pdl_enter

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait
    from .l1_gluon import (_WORDS_LAYOUT, TensorDescriptor, _barrier, _item, _mma_layout, _now, _promoted_mainloop,
                           _since, _step_operand, _store_prof, _tma_load, _zero)

__all__ = ["DEFAULT_LAUNCHES", "ENABLED", "PROFILE", "applies", "l2_gluon_launch", "wanted"]

#: Whether L2's launches take this kernel (where it `applies`): None (default) at the launches
#: where it measured faster than the Triton kernel (`DEFAULT_LAUNCHES`), True at every one, False
#: never (`scripts/bench.py --gluon-l2 on|off|auto`).
ENABLED: Optional[bool] = None
#: (weight kind, tile height) of the launches it is taken at by default (docs/PERF.md, H100s):
#: - 4-bit weights at the 16-row decode tiles: 1024 uniform pairs 711.0 us against the Triton
#:   kernel's 727.6; the layer at T = 1 / 128 112.5 / 2207.3 us against 116.7 / 2222.3 (tenth
#:   session). At the 128-row prefill tiles (32768 pairs) it was slower: 2320.2 against 2142.0.
#: - FP8 weights ("fp8_rebased") at the 16-row decode tiles, with L1's: the layer at T = 128 / 1
#:   3747.1 / 158.9 us against 3866.4 / 161.4 on the Triton kernels (eleventh session; with them at
#:   every tile height T = 4096 was slower, 5879.6 against 5689.5).
#: The 32-row tiles are not taken: never timed.
DEFAULT_LAUNCHES = (("mxfp4", 16), ("fp8_rebased", 16))


#: `l1_gluon.DECODE_AHEAD` for L2's 4-bit launches (promoted every 128 or 256 K, an even number of
#: steps): every odd step's words decoded while the even step's MMAs run, the same sums. On: the L2
#: at the 16-row decode tiles 708.5 -> 702.1 us (1024 pairs, H100, thirteenth session), y equal to
#: the Triton kernel's (`test_gemm_gpu.py::test_gluon_l2_decode_ahead_matches_triton`);
#: `scripts/bench.py --no-decode-ahead` turns both off.
DECODE_AHEAD = True

#: A measuring switch as `l1_gluon.PROFILE` (the same columns, `l1_gluon.profile_split`): an int64
#: CUDA tensor of >= grid x 8 elements makes the launches built while it is set count cycles there.
PROFILE: Optional[torch.Tensor] = None


def wanted(w_kind: str, block_m: int) -> bool:
    """Whether a launch (weight kind, tile height) takes this kernel where it `applies` (`ENABLED`)."""
    return (w_kind, block_m) in DEFAULT_LAUNCHES if ENABLED is None else bool(ENABLED)

#: Rows of w2 (columns of y) per item: one warpgroup's 64-row MMA.
BLOCK_N = 64


def applies(w_kind: str, act_format: str, combine_format: str, streamed: bool, block_m: int, over_m: int,
            fp4_table: str, arch: int, promote_k: int, inter: int) -> bool:
    """Whether a launch is one this kernel covers (see the module docstring). promote_k: the K the
    Triton kernel promotes after (block_k x PROMOTE; >= inter: all of K chained, as it does for FP8
    weights); this kernel sums the same way: chained (FP8 weights only: the MMA stays in flight
    across steps, which a register operand decoded per step cannot), or promoted every 128 K, or
    every 256 K (two 128-K MMAs chained; not with rows past block_m), as `l1_gluon.applies`."""
    chained = promote_k >= inter
    return (HAVE_GLUON and arch == 90 and streamed and act_format == "fp8" and combine_format == "bf16"
            and w_kind in ("mxfp4", "fp8_rebased") and block_m in BLOCK_MS
            and over_m in ((0, 16) if block_m == 128 else (0,)) and (w_kind != "mxfp4" or fp4_table in ("imad", "imad_lane"))
            and ((chained and w_kind == "fp8_rebased")
                 or (not chained and promote_k in (BLOCK_K, 2 * BLOCK_K) and (promote_k == BLOCK_K or over_m == 0))))


def promote_steps(promote_k: int, inter: int) -> int:
    """The kernel's PROMOTE_STEPS for the Triton kernel's promote_k: 0 (chained) or 128-K steps."""
    return 0 if promote_k >= inter else promote_k // BLOCK_K


if HAVE_GLUON:
    _BK = gl.constexpr(BLOCK_K)
    _BN2 = gl.constexpr(BLOCK_N)

    @gluon.jit
    def _l2_producer(w_desc, h_desc, o_desc, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, max_tiles,
                     w_bufs, x_bufs, o_bufs, ready, empty, HIDDEN: gl.constexpr, INTER: gl.constexpr,
                     KW: gl.constexpr, STAGES_: gl.constexpr, STAGE_BYTES: gl.constexpr, GROUP_M: gl.constexpr,
                     BM: gl.constexpr, OVER_M: gl.constexpr, OVER_LIMIT: gl.constexpr, prof_ptr, PROF: gl.constexpr):
        """The producer warp: the step's weight rows, h rows and (OVER_M) the rows past block_m,
        all by TMA on one barrier per stage."""
        NUM_N: gl.constexpr = HIDDEN // _BN2
        NK: gl.constexpr = INTER // _BK
        num_tiles = gl.minimum(gl.load(num_tiles_ptr), max_tiles)
        t_start = _now(PROF)
        t_empty = _zero(PROF)
        it = 0
        for work in range(gl.program_id(0), num_tiles * NUM_N, gl.num_programs(0)):
            expert, row_start, row_end, pid_n, has_over = _item(work, num_tiles, offsets_ptr, tile_expert_ptr,
                                                                 tile_row_ptr, NUM_N, GROUP_M, BM, OVER_M, OVER_LIMIT)
            w_row = expert * HIDDEN + pid_n * _BN2
            for k in range(NK):
                s = it % STAGES_
                t0 = _now(PROF)
                mbarrier.wait(empty.index(s), ((it // STAGES_) & 1) ^ 1)
                t_empty += _since(t0, PROF)
                mbarrier.expect(ready.index(s), STAGE_BYTES)
                _tma_load(w_desc, [w_row, k * KW], ready.index(s), w_bufs.index(s))
                _tma_load(h_desc, [row_start, k * _BK], ready.index(s), x_bufs.index(s))
                if OVER_M > 0:
                    _tma_load(o_desc, [row_start + BM, k * _BK], ready.index(s), o_bufs.index(s))
                it += 1
        _store_prof(prof_ptr, 5, _since(t_start, PROF), t_empty, PROF)

    @gluon.jit
    def _l2_store(acc, mma: gl.constexpr, ROWS: gl.constexpr, row0, row_end, expert, pid_n, h_exp_ptr, w_row_ptr,
                  dst_ptr, epi, HIDDEN: gl.constexpr, HW_CVT: gl.constexpr = False):
        """`l2_gemm._l2_epilogue` (bf16 combine) for the [64 rows of w2, ROWS pairs] accumulator of
        pairs row0 .. row0 + ROWS - 1 below row_end: row factors, bf16, then through shared memory
        (`epi`) into per-pair vectors of 8 columns, stored to each pair's destination row. HW_CVT:
        bf16 by the store's RNE conversion alone (`l1_gemm.EPILOGUE_HW_CVT`; the same bytes)."""
        rows = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, mma))
        row_ok = rows < row_end
        e_row = gl.load(h_exp_ptr + rows, mask=row_ok, other=0)
        a_f = _exp2_ue8m0(gl.maximum(e_row, 1))
        n = pid_n * _BN2 + gl.arange(0, _BN2, layout=gl.SliceLayout(1, mma))
        w_f = gl.load(w_row_ptr + expert.to(gl.int64) * HIDDEN + n)
        y = acc * w_f[:, None] * a_f[None, :]
        if not HW_CVT:
            y = _round_bf16(y)
        TPW1: gl.constexpr = 4 if ROWS >= 4 else ROWS
        el: gl.constexpr = gl.BlockedLayout(size_per_thread=[8, 1], threads_per_warp=[32 // TPW1, TPW1],
                                            warps_per_cta=[1, 4], order=[0, 1])
        e_s = epi.slice(0, ROWS, dim=1)
        _barrier()                  # (this warpgroup) the previous item's reads of `epi` are done
        e_s.store(y.to(gl.bfloat16))
        _barrier()
        yb = e_s.load(el)
        cols = row0 + gl.arange(0, ROWS, layout=gl.SliceLayout(0, el))
        col_ok = cols < row_end
        dst = gl.load(dst_ptr + cols, mask=col_ok, other=0)
        st_ok = col_ok & (dst != 0)
        nn = pid_n * _BN2 + gl.arange(0, _BN2, layout=gl.SliceLayout(1, el))
        # as `l2_gemm._addr_rows`: anchor + (address - anchor) elements from a 16-byte aligned kernel
        # argument, so the stores are 16-byte vectors (a pointer cast from an int would not be)
        base = dst_ptr.to(gl.pointer_type(gl.int16), bitcast=True)
        delta = gl.multiple_of(dst - dst_ptr.to(gl.int64), 16) // 2
        out = base + delta[None, :] + nn[:, None]
        gl.store(out, yb.to(gl.int16, bitcast=True), mask=st_ok[None, :])

    @gluon.jit
    def _l2_mma_partition(h_exp_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, max_tiles, aux_ptr,
                          w_row_ptr, dst_ptr, w_bufs, x_bufs, o_bufs, epi, ready, empty,
                          HIDDEN: gl.constexpr, INTER: gl.constexpr, W_KIND: gl.constexpr, STAGES_: gl.constexpr,
                          GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr,
                          OVER_LIMIT: gl.constexpr, PROMOTE_STEPS: gl.constexpr, prof_ptr, PROF: gl.constexpr,
                          AHEAD: gl.constexpr, LANE: gl.constexpr = False, EPI_CVT: gl.constexpr = False):
        """The MMA warpgroup, summing K as the Triton L2 does: PROMOTE_STEPS 0, all of K chained
        into one accumulator (FP8 weights, both operands in shared memory; step k - 1's stage handed
        back once only step k's MMA is left in flight); else promoted every PROMOTE_STEPS 128-K
        steps (4-bit weights, `l1_gluon._promoted_mainloop`: each step's MMA waited for before the
        next decode rewrites its register operand, `_compile.wgmma_register_hazards`). PROF: its cycles
        into prof_ptr (`PROFILE`, `l1_gluon.PROFILE_COLUMNS`); AHEAD: the 4-bit decode of every odd
        step under the even step's MMAs (`DECODE_AHEAD`, `l1_gluon._ahead_loop`); LANE: the words in
        the "lane" K order (`l1_gluon._mma_partition`); EPI_CVT: `l1_gemm.EPILOGUE_HW_CVT`."""
        NUM_N: gl.constexpr = HIDDEN // _BN2
        NK: gl.constexpr = INTER // _BK
        OM: gl.constexpr = OVER_M if OVER_M > 0 else 16
        mma: gl.constexpr = _mma_layout(BM)
        mma_o: gl.constexpr = _mma_layout(OM)
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        wl: gl.constexpr = _WORDS_LAYOUT
        r = gl.arange(0, _BN2, layout=gl.SliceLayout(1, wl))
        if LANE:
            g8 = (gl.arange(0, _BK // 8, layout=gl.SliceLayout(0, wl)) // 4) * 8
        else:
            g8 = (gl.arange(0, _BK // 8, layout=gl.SliceLayout(0, wl)) % 4) * 8
        zero = gl.zeros([_BN2, BM], gl.float32, layout=mma)
        zero_o = gl.zeros([_BN2, OM], gl.float32, layout=mma_o)
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
            d_base = aux_ptr + expert.to(gl.int64) * (HIDDEN * (INTER // 128))
            d_offs = (pid_n * _BN2 + r) * (INTER // 128)
            d_next = gl.zeros([_BN2], gl.int32, layout=gl.SliceLayout(1, wl))
            if W_KIND == "mxfp4":
                d_next = gl.load(d_base + d_offs)
            if PROMOTE_STEPS > 0:
                # promoted as the Triton L2 is on 4-bit weights (each step's MMA waited for)
                acc, acc_o, it, waited, in_mma = _promoted_mainloop(it, d_next, d_base, d_offs, g8, has_over, w_bufs,
                                                                    x_bufs, o_bufs, ready, ready, empty, zero, zero_o,
                                                                    NK, STAGES_, W_KIND, OVER_M, PROMOTE_STEPS,
                                                                    a_layout, wl, PROF, AHEAD)
                t_wait += waited
                t_mma += in_mma
            else:
                acc = zero
                acc_o = zero_o
                for k in range(NK):
                    a, s, d_next, waited = _step_operand(it, k, d_next, d_base, d_offs, g8, w_bufs, ready, ready, NK,
                                                         STAGES_, W_KIND, a_layout, wl, PROF)
                    t_wait += waited
                    # (zero-initialised accumulators chained from the first step, as the Triton kernel's
                    # `tl.dot(w, h, acc)`)
                    tok = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), acc, is_async=True)
                    if OVER_M > 0:
                        if has_over:
                            tok_o = warpgroup_mma(a, o_bufs.index(s).permute((1, 0)), acc_o, is_async=True)
                            acc, acc_o = warpgroup_mma_wait(2, deps=[tok, tok_o])
                        else:
                            acc = warpgroup_mma_wait(1, deps=[tok])
                    else:
                        acc = warpgroup_mma_wait(1, deps=[tok])
                    # all but step k's MMA(s) are done: step k - 1's stage is free
                    mbarrier.arrive(empty.index((it + STAGES_ - 1) % STAGES_), pred=k > 0)
                    it += 1
                if OVER_M > 0:
                    if has_over:
                        acc, acc_o = warpgroup_mma_wait(0, deps=[acc, acc_o])
                    else:
                        acc = warpgroup_mma_wait(0, deps=[acc])
                else:
                    acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(empty.index((it + STAGES_ - 1) % STAGES_))
            t0 = _now(PROF)
            _l2_store(acc, mma, BM, row_start, gl.minimum(row_end, row_start + BM), expert, pid_n, h_exp_ptr,
                      w_row_ptr, dst_ptr, epi, HIDDEN, EPI_CVT)
            if OVER_M > 0:
                if has_over:
                    _l2_store(acc_o, mma_o, OM, row_start + BM, row_end, expert, pid_n, h_exp_ptr, w_row_ptr,
                              dst_ptr, epi, HIDDEN, EPI_CVT)
            t_epi += _since(t0, PROF)
            items += 1
        # per CTA as `l1_gluon.PROFILE_COLUMNS` (the chained path's MMA waits are not timed: 0)
        _store_prof(prof_ptr, 0, _since(t_start, PROF), t_wait, PROF)
        _store_prof(prof_ptr, 2, t_mma, t_epi, PROF)
        if PROF:
            gl.store(prof_ptr + gl.program_id(0) * 8 + 4, items.to(gl.int64))

    @gluon.jit(do_not_specialize=["max_tiles"])
    def _l2_ws_kernel(h_desc, o_desc, h_exp_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, w_desc,
                      aux_ptr, w_row_ptr, dst_ptr, max_tiles,
                      HIDDEN: gl.constexpr, INTER: gl.constexpr, W_KIND: gl.constexpr, STAGES_: gl.constexpr,
                      GROUP_M: gl.constexpr, BM: gl.constexpr, OVER_M: gl.constexpr, OVER_LIMIT: gl.constexpr,
                      PROMOTE_STEPS: gl.constexpr = 0, PDL: gl.constexpr = False, prof_ptr=None,
                      PROF: gl.constexpr = False, AHEAD: gl.constexpr = False, LANE: gl.constexpr = False,
                      EPI_CVT: gl.constexpr = False):
        """L2, warp-specialised (module docstring). h_desc / o_desc: TMA descriptors of the rebased h
        [P, I] (E4M3) with boxes of BM and of 16 rows; h_exp_ptr: its int32 row exponents [P];
        w_desc: w2's rows (`l1_gluon.weight_descriptor`, 64-row boxes); aux_ptr: the offset indices
        as int32 [E, H, I / 128] ("mxfp4"); w_row_ptr: float32 [E, H]; dst_ptr: int64 [P] pair
        destination addresses (bf16 rows of H, 0 = none); LANE: 4-bit words and h in the "lane" K
        order (`gemm_operands.LANE_K_ORDER`); EPI_CVT: `l1_gemm.EPILOGUE_HW_CVT`; the rest as
        `l2_gemm._l2_kernel`'s."""
        if PDL:
            pdl_enter()
        KW: gl.constexpr = _BK // 8 if W_KIND == "mxfp4" else _BK
        OM: gl.constexpr = OVER_M if OVER_M > 0 else 16
        STAGE_BYTES: gl.constexpr = (_BN2 * _BK // (2 if W_KIND == "mxfp4" else 1) + BM * _BK
                                     + (OM * _BK if OVER_M > 0 else 0))
        w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES_, _BN2, KW], w_desc.layout)
        x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES_, BM, _BK], h_desc.layout)
        if OVER_M > 0:
            o_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES_, OM, _BK], o_desc.layout)
        else:                       # unused
            o_bufs = gl.allocate_shared_memory(gl.float8e4nv, [1, 16, _BK], o_desc.layout)
        epi_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0])
        epi = gl.allocate_shared_memory(gl.bfloat16, [_BN2, BM], epi_layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES_, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES_):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        gl.warp_specialize([
            (_l2_mma_partition, (h_exp_ptr, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr, max_tiles,
                                 aux_ptr, w_row_ptr, dst_ptr, w_bufs, x_bufs, o_bufs, epi, ready, empty,
                                 HIDDEN, INTER, W_KIND, STAGES_, GROUP_M, BM, OVER_M, OVER_LIMIT, PROMOTE_STEPS,
                                 prof_ptr, PROF, AHEAD, LANE, EPI_CVT)),
            (_l2_producer, (w_desc, h_desc, o_desc, offsets_ptr, tile_expert_ptr, tile_row_ptr, num_tiles_ptr,
                            max_tiles, w_bufs, x_bufs, o_bufs, ready, empty, HIDDEN, INTER, KW, STAGES_, STAGE_BYTES,
                            GROUP_M, BM, OVER_M, OVER_LIMIT, prof_ptr, PROF)),
        ], [1], [24])


def _h_layout(rows: int):
    return gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], gl.float8e4nv)


def compile_args(w_kind: str, hidden: int, inter: int, block_m: int = 128, over_m: int = 16, over_limit: int = 32,
                 group_m: int = 8, promote_k: Optional[int] = None, pdl: bool = False, prof: bool = False,
                 decode_ahead: bool = False, lane: bool = False, epi_cvt: bool = False):
    """(kernel, signature, constexprs, options) for `_compile.compile_kernel` (tests); pdl, prof,
    decode_ahead, lane, epi_cvt: as `l1_gluon.compile_args`."""
    if decode_ahead and not decodes_ahead(True, w_kind, promote_k or inter, inter):
        raise ValueError("decode_ahead: for 4-bit words promoted every 128 or 256 K over an even number of steps")
    # `l1_gluon.launch_plan`'s residency and stages: L2's stage holds 64 weight rows, as L1's two boxes
    stages, maxnreg, _ = launch_plan(w_kind, block_m, over_m)
    sig = dict(h_desc=tensordesc_signature("fp8e4nv", [block_m, BLOCK_K], _h_layout(block_m)),
               o_desc=tensordesc_signature("fp8e4nv", [16, BLOCK_K], _h_layout(16)),
               h_exp_ptr="*i32", offsets_ptr="*i32", tile_expert_ptr="*i32", tile_row_ptr="*i32",
               num_tiles_ptr="*i32", w_desc=descriptor_signature(w_kind, BLOCK_N), aux_ptr="*i32", w_row_ptr="*fp32",
               dst_ptr="*i64", max_tiles="i32")
    ce = dict(HIDDEN=hidden, INTER=inter, W_KIND=w_kind, STAGES_=stages, GROUP_M=group_m, BM=block_m,
              OVER_M=over_m, OVER_LIMIT=over_limit, PROMOTE_STEPS=promote_steps(promote_k or inter, inter), PDL=pdl,
              AHEAD=decode_ahead)
    if lane:
        ce["LANE"] = True
    if epi_cvt:
        ce["EPI_CVT"] = True
    if prof:
        sig["prof_ptr"], ce["PROF"] = "*i64", True
    else:
        ce["prof_ptr"] = None
    return _l2_ws_kernel, sig, ce, dict(num_warps=4, maxnreg=maxnreg, enable_fp_fusion=False)


def l2_gluon_launch(h8: torch.Tensor, h_exp: torch.Tensor, expert_offsets: torch.Tensor, tile_expert: torch.Tensor,
                    tile_row_start: torch.Tensor, num_tiles: torch.Tensor, w_kind: str, w_data: torch.Tensor,
                    w_aux: Optional[torch.Tensor], w_row: torch.Tensor, pair_dst: torch.Tensor, *, hidden: int,
                    inter: int, block_m: int, over_m: int, over_limit: int, group_m: int, num_sms: int,
                    max_tiles: int, promote_k: int, lane: bool = False):
    """Launch `_l2_ws_kernel` on arguments `l2_gemm.l2_grouped_gemm` has validated (it calls this
    where `applies`; promote_k as there); returns (kernel, grid, args, kwargs) for `_launch_or_bind`.
    lane: w2's words and h in the "lane" K order (`WeightOperand.lane`)."""
    stages, maxnreg, ctas = launch_plan(w_kind, block_m, over_m)
    h_desc = TensorDescriptor.from_tensor(h8, [block_m, BLOCK_K], _h_layout(block_m))
    o_desc = TensorDescriptor.from_tensor(h8, [16, BLOCK_K], _h_layout(16))
    w_desc = weight_descriptor(w_kind, w_data, inter, BLOCK_N)
    total = max_tiles * (hidden // BLOCK_N)
    grid = (max(1, min(total, ctas * num_sms)),)
    args = (h_desc, o_desc, h_exp, expert_offsets, tile_expert, tile_row_start, num_tiles, w_desc,
            (w_aux if w_aux is not None else w_row).view(torch.int32), w_row, pair_dst, max_tiles)
    extra = launch_extras("l2_gluon.PROFILE", PROFILE, grid, pair_dst.device, lane and w_kind == "mxfp4")
    kwargs = dict(**extra, AHEAD=decodes_ahead(DECODE_AHEAD, w_kind, promote_k, inter), HIDDEN=hidden, INTER=inter,
                  W_KIND=w_kind, STAGES_=stages, GROUP_M=group_m, BM=block_m, OVER_M=over_m, OVER_LIMIT=over_limit,
                  PROMOTE_STEPS=promote_steps(promote_k, inter), num_warps=4, maxnreg=maxnreg,
                  enable_fp_fusion=False)      # as the Triton kernel: no FMA contraction
    return _l2_ws_kernel, grid, args, kwargs
