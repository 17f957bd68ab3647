"""Probe: how fast can a Hopper FP8 mainloop run that promotes every K step?

The layer's L1 promotes the FP8 MMA's partial sum to a float32 accumulator after every 128-K step
(Hopper's FP8 MMA accumulates with ~14 mantissa bits, truncating: docs/PERF.md). This script times
one R-rows x 128-token tile per CTA (weights on the MMA's M side, tokens on its N side from shared
memory, as L1's prefill tile), E4M3 x E4M3, K 7168, R 64 (one warpgroup) or 128 (two), in Gluon
(Triton's lower-level dialect, `triton.experimental.gluon`), several ways (MODE):
  0 "sync": cp.async stages and CTA barriers, every step's MMA waited for, then added (the
    scheme of the layer's Triton L1);
  1 "delayed": as sync, step k - 1's partial sum added while step k's MMA runs;
  2 "chained": as sync, one accumulator through K (no promotion: the truncating error);
  3 "ws": warp-specialised: a TMA producer warp and mbarriers, the MMA warpgroup(s) promote as
    "delayed" and never wait on a CTA barrier for their operands;
  4 "ws4": ws with 4-bit weights (random words in natural order, `l1_gemm._fp4_word_asm`, offset indices
    0..11 loaded from global memory one step ahead) decoded by the MMA warpgroup into shared memory;
  5 "ws4d": ws4 with the decode in a warpgroup of its own;
  6 "ws4r": ws4 with the layer's fragment words (`gemm_operands.fragment_words`) decoded straight
    into the MMA's register operand (128 rows: two warpgroups sharing the token tile);
  7 "ws4g": ws4r with the token rows gathered through a permutation by a producer warpgroup
    (cp.async arriving on mbarriers), as L1 gathers each pair's pool row (128 rows: the gathered
    tile feeds two warpgroups, half the gather per MMA).
Every mode multiplies the same values (the FP8 modes take the 4-bit words' E4M3 decode) and every
promoted mode adds the same partial sums in the same order: outputs bitwise equal to sync's
(checked; chained differs).

    python scripts/probe_gluon_promote.py [--rows 4096 --tokens 4096 --k 7168 --iters 20 --block-r 64|128
                                           --modes sync,delayed,chained,ws,ws4,ws4d,ws4r,ws4g]

Measured on H100s in the seventh session (docs/PERF.md): ws 780-795 TFLOP/s against sync's 353-362,
ws4 626-637, ws4d 440-551; ws4r and ws4g built after the last call, not yet run. Compiled for sm_90a on the
CPU by tests/test_probe_gluon.py.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from mega_moe_layer.kernels.l1_gemm import _fp4_word_asm  # noqa: E402  (the layer's 4-bit decode)

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, warpgroup_mma,
                                                                  warpgroup_mma_init, warpgroup_mma_wait)
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    # Triton 3.6 names the TMA load `async_copy_global_to_shared`, later versions `async_load`
    _tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared
    # ... and a shared-memory view of another dtype `_reinterpret`, later versions `reinterpret`
    _NEW_REINTERPRET = gl.constexpr(hasattr(gl.shared_memory_descriptor, "reinterpret"))
    from mega_moe_layer.kernels.l1_gluon import _split_bytes  # noqa: E402  (int32 -> its 4 bytes)
    # Triton 3.6 names the cp.async copy `async_copy_global_to_shared`, later versions `async_load`
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # ... and the CTA barrier `thread_barrier`, later versions `barrier`
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GLUON = True
except ImportError:            # a Triton without Gluon's Hopper ops
    HAVE_GLUON = False

BLOCK_M, BLOCK_K = 128, 128
MODES = {"sync": 0, "delayed": 1, "chained": 2, "ws": 3, "ws4": 4, "ws4d": 5, "ws4r": 6, "ws4g": 7}

if HAVE_GLUON:
    @gluon.jit
    def _store_tile(out_ptr, acc, row0, col0, N_TOK, BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr,
                    mma: gl.constexpr):
        """out[row0 + r, col0 + c] = acc (float32 [BLOCK_R, BLOCK_M] in the MMA layout)."""
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, mma))
        c = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
        gl.store(out_ptr + (row0 + r)[:, None].to(gl.int64) * N_TOK + (col0 + c)[None, :], acc)

    @gluon.jit
    def _alloc_barriers(N: gl.constexpr):
        """N mbarriers, each expecting one arrival per phase."""
        bars = gl.allocate_shared_memory(gl.int64, [N, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(N):
            mbarrier.init(bars.index(i), count=1)
        return bars

    @gluon.jit
    def _load_a(w_ptr, row0, k0, K: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_K: gl.constexpr,
                a_layout: gl.constexpr):
        """The weight tile [BLOCK_R, BLOCK_K] straight into the MMA's register-operand layout."""
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, a_layout))
        c = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, a_layout))
        return gl.load(w_ptr + (row0 + r)[:, None].to(gl.int64) * K + (k0 + c)[None, :])

    @gluon.jit
    def _copy_b(x_ptr, smem, col0, k0, K: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                ld_layout: gl.constexpr):
        """cp.async of the token tile [BLOCK_M, BLOCK_K] (K contiguous) into one shared stage."""
        m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld_layout))
        c = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, ld_layout))
        _cp_async(smem, x_ptr + (col0 + m)[:, None].to(gl.int64) * K + (k0 + c)[None, :])
        async_copy.commit_group()

    @gluon.jit
    def _probe_kernel(w_ptr, x_ptr, out_ptr, N_TOK, K: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_K: gl.constexpr, STAGES: gl.constexpr, MODE: gl.constexpr):
        """out[R, N_TOK] (float32) = W[R, K] . X[N_TOK, K]^T for one [BLOCK_R, BLOCK_M] tile per program."""
        row0 = gl.program_id(0) * BLOCK_R
        col0 = gl.program_id(1) * BLOCK_M
        WARPS: gl.constexpr = BLOCK_R // 16          # one warpgroup per 64 weight rows
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 32])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[4, 8],
                                            warps_per_cta=[WARPS, 1], order=[1, 0])
        s_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gl.float8e4nv)
        b_smem = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], s_layout)
        NK: gl.constexpr = K // BLOCK_K
        for s in gl.static_range(STAGES - 1):
            _copy_b(x_ptr, b_smem.index(s), col0, s * BLOCK_K, K, BLOCK_M, BLOCK_K, ld)
        zero = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        acc = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        a = _load_a(w_ptr, row0, 0, K, BLOCK_R, BLOCK_K, a_layout)
        prev = warpgroup_mma_init(zero)                 # MODE 1: step k - 1's MMA (none before step 0)
        for k in range(NK):
            async_copy.wait_group(STAGES - 2)           # this step's stage has landed (own copies)
            _cta_barrier()                              # ... and every thread's
            fence_async_shared()                        # cp.async's writes before the MMA reads them
            b = b_smem.index(k % STAGES).permute((1, 0))
            if MODE == 0:
                part = warpgroup_mma(a, b, zero, use_acc=False)
                acc = acc + part
            elif MODE == 1:
                tok = warpgroup_mma(a, b, zero, use_acc=False, is_async=True)
                # only this step's MMA left in flight: step k - 1's partial sum is final, add it
                # while this one runs
                acc = acc + warpgroup_mma_wait(1, deps=[prev])
                prev = tok
            else:
                tok = warpgroup_mma(a, b, acc, is_async=True)
                acc = warpgroup_mma_wait(1, deps=[tok])
            # the next copy overwrites the stage of step k - 1, whose MMA has completed above
            nk = k + STAGES - 1
            if nk < NK:
                _copy_b(x_ptr, b_smem.index(nk % STAGES), col0, nk * BLOCK_K, K, BLOCK_M, BLOCK_K, ld)
            else:
                async_copy.commit_group()               # an empty group keeps the wait count
            if k + 1 < NK:
                a = _load_a(w_ptr, row0, (k + 1) * BLOCK_K, K, BLOCK_R, BLOCK_K, a_layout)
        if MODE == 1:
            acc = acc + warpgroup_mma_wait(0, deps=[prev])
        elif MODE == 2:
            acc = warpgroup_mma_wait(0, deps=[acc])
        async_copy.wait_group(0)
        _store_tile(out_ptr, acc, row0, col0, N_TOK, BLOCK_R, BLOCK_M, mma)

    @gluon.jit
    def _ws_loader(w_desc, x_desc, w_bufs, x_bufs, ready, empty, row0, col0, NK: gl.constexpr,
                   BLOCK_K: gl.constexpr, STAGES: gl.constexpr, STAGE_BYTES: gl.constexpr):
        """The producer warp: TMA loads of the weight and token tiles into the stages, one ahead of
        the consumers by at most STAGES steps (`empty` released by the consumers, `ready` by TMA)."""
        for k in range(NK):
            s = k % STAGES
            mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), STAGE_BYTES)
            _tma_load(w_desc, [row0, k * BLOCK_K], ready.index(s), w_bufs.index(s))
            _tma_load(x_desc, [col0, k * BLOCK_K], ready.index(s), x_bufs.index(s))

    @gluon.jit
    def _ws_consumer(w_bufs, x_bufs, ready, empty, out_ptr, row0, col0, N_TOK, NK: gl.constexpr,
                     BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """The MMA warpgroup(s): both operands from shared memory, step k's MMA in flight while step
        k - 1's partial sum is promoted, then step k - 1's stage handed back to the loader."""
        WARPS: gl.constexpr = BLOCK_R // 16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 32])
        zero = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        acc = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        prev = warpgroup_mma_init(zero)
        for k in range(NK):
            s = k % STAGES
            mbarrier.wait(ready.index(s), (k // STAGES) & 1)
            tok = warpgroup_mma(w_bufs.index(s), x_bufs.index(s).permute((1, 0)), zero, use_acc=False,
                                is_async=True)
            acc = acc + warpgroup_mma_wait(1, deps=[prev])
            if WARPS > 4:
                _cta_barrier()                      # every warpgroup is done with step k - 1's stage
            mbarrier.arrive(empty.index((k + STAGES - 1) % STAGES), pred=k > 0)
            prev = tok
        acc = acc + warpgroup_mma_wait(0, deps=[prev])
        _store_tile(out_ptr, acc, row0, col0, N_TOK, BLOCK_R, BLOCK_M, mma)

    @gluon.jit
    def _ws_kernel(w_desc, x_desc, out_ptr, N_TOK, K: gl.constexpr, BLOCK_R: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """MODE 3 "ws": warp-specialised, as DeepGEMM's SM90 kernels are (a TMA producer warp, MMA
        consumer warpgroups that never wait on a CTA barrier for their operands)."""
        row0 = gl.program_id(0) * BLOCK_R
        col0 = gl.program_id(1) * BLOCK_M
        NK: gl.constexpr = K // BLOCK_K
        w_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_R, BLOCK_K], w_desc.layout)
        x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        ready = _alloc_barriers(STAGES)
        empty = _alloc_barriers(STAGES)
        STAGE_BYTES: gl.constexpr = (BLOCK_R + BLOCK_M) * BLOCK_K
        gl.warp_specialize([
            (_ws_consumer, (w_bufs, x_bufs, ready, empty, out_ptr, row0, col0, N_TOK, NK, BLOCK_R, BLOCK_M,
                            STAGES)),
            (_ws_loader, (w_desc, x_desc, w_bufs, x_bufs, ready, empty, row0, col0, NK, BLOCK_K, STAGES,
                          STAGE_BYTES)),
        ], [1], [24])

    @gluon.jit
    def _d_offsets(d_ptr, row0, NK: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_K: gl.constexpr, ld: gl.constexpr):
        """Pointers of a tile's offset indices at step 0, uint8 [BLOCK_R, BLOCK_K / 32] in layout ld.
        (The indices come from global memory, one step ahead: a TMA box of them, uint8 [R, 16] or
        [R, 32], stopped the kernel with an illegal instruction on an H100, seventh session.)"""
        d_rows = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, ld))
        d_cols = gl.arange(0, BLOCK_K // 32, layout=gl.SliceLayout(0, ld))
        return d_ptr + (row0 + d_rows)[:, None].to(gl.int64) * (NK * (BLOCK_K // 32)) + d_cols[None, :]

    @gluon.jit
    def _decode_store(wq_smem, a_smem, d_cur, BLOCK_R: gl.constexpr, BLOCK_K: gl.constexpr, WARPS: gl.constexpr):
        """One step's words [R, BLOCK_K / 8] (shared) and offset indices d_cur [R, BLOCK_K / 32] ->
        E4M3 [R, BLOCK_K] in a_smem (natural K order: word j -> k 8 j .. 8 j + 7)."""
        # a thread holds one 32-group's 4 words (words [R, 4 groups, 4]) and that group's offset index
        l3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 4], threads_per_warp=[8, 4, 1],
                                            warps_per_cta=[WARPS, 1, 1], order=[2, 1, 0])
        l2: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[8, 4],
                                            warps_per_cta=[WARPS, 1], order=[1, 0])
        w_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
        wd = gl.convert_layout(gl.reshape(wq_smem.load(l2), [BLOCK_R, BLOCK_K // 32, 4]), l3)
        d3 = gl.expand_dims(d_cur, 2) + gl.zeros([BLOCK_R, BLOCK_K // 32, 4], gl.int32, layout=l3)
        # E4M3 bytes of the magnitudes x 2**(6 - d) (normal for d <= 11): 0x60 + 8 (e - d)
        lo, hi = _fp4_word_asm(wd, 0x6C686000 - d3 * 0x08080800, 0x7C787470 - d3 * 0x08080808)
        if _NEW_REINTERPRET:
            a_w = a_smem.reinterpret(gl.int32, [BLOCK_R, BLOCK_K // 4], w_layout)
        else:
            a_w = a_smem._reinterpret(gl.int32, [BLOCK_R, BLOCK_K // 4], w_layout)
        a_w.store(gl.reshape(gl.join(lo, hi), [BLOCK_R, BLOCK_K // 4]))
        fence_async_shared()

    @gluon.jit
    def _ws4_loader(wq_desc, x_desc, wq_bufs, x_bufs, ready, empty, row0, col0, NK: gl.constexpr,
                    BLOCK_K: gl.constexpr, STAGES: gl.constexpr, STAGE_BYTES: gl.constexpr):
        """The producer warp of "ws4": the step's 4-bit words [R, BLOCK_K / 8] (int32) and token tile."""
        for k in range(NK):
            s = k % STAGES
            mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), STAGE_BYTES)
            _tma_load(wq_desc, [row0, k * (BLOCK_K // 8)], ready.index(s), wq_bufs.index(s))
            _tma_load(x_desc, [col0, k * BLOCK_K], ready.index(s), x_bufs.index(s))

    @gluon.jit
    def _ws4_consumer(wq_bufs, x_bufs, a_bufs, ready, empty, out_ptr, d_ptr, row0, col0, N_TOK,
                      NK: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                      STAGES: gl.constexpr):
        """The MMA warpgroup(s) of "ws4": each step's words are decoded to E4M3 into one of two shared
        buffers (the other still feeds step k - 1's MMA), then as "ws"."""
        WARPS: gl.constexpr = BLOCK_R // 16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 32])
        l3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 4], threads_per_warp=[8, 4, 1],
                                            warps_per_cta=[WARPS, 1, 1], order=[2, 1, 0])
        d_ptrs = _d_offsets(d_ptr, row0, NK, BLOCK_R, BLOCK_K, gl.SliceLayout(2, l3))
        zero = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        acc = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        prev = warpgroup_mma_init(zero)
        d_next = gl.load(d_ptrs).to(gl.int32)
        for k in range(NK):
            s = k % STAGES
            d_cur = d_next
            if k + 1 < NK:
                d_next = gl.load(d_ptrs + (k + 1) * (BLOCK_K // 32)).to(gl.int32)
            mbarrier.wait(ready.index(s), (k // STAGES) & 1)
            a_s = a_bufs.index(k % 2)
            _decode_store(wq_bufs.index(s), a_s, d_cur, BLOCK_R, BLOCK_K, WARPS)
            tok = warpgroup_mma(a_s, x_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
            acc = acc + warpgroup_mma_wait(1, deps=[prev])
            if WARPS > 4:
                _cta_barrier()
            mbarrier.arrive(empty.index((k + STAGES - 1) % STAGES), pred=k > 0)
            prev = tok
        acc = acc + warpgroup_mma_wait(0, deps=[prev])
        _store_tile(out_ptr, acc, row0, col0, N_TOK, BLOCK_R, BLOCK_M, mma)

    @gluon.jit
    def _ws4_kernel(wq_desc, x_desc, out_ptr, d_ptr, N_TOK, K: gl.constexpr, BLOCK_R: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """MODE 4 "ws4": "ws" with 4-bit weights (the layer's MXFP4 words and per-group offset
        indices, decoded by the MMA warpgroups into shared memory), FP8 tokens."""
        row0 = gl.program_id(0) * BLOCK_R
        col0 = gl.program_id(1) * BLOCK_M
        NK: gl.constexpr = K // BLOCK_K
        wq_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_R, BLOCK_K // 8], wq_desc.layout)
        x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, BLOCK_R, BLOCK_K], a_layout)
        ready = _alloc_barriers(STAGES)
        empty = _alloc_barriers(STAGES)
        STAGE_BYTES: gl.constexpr = BLOCK_R * (BLOCK_K // 2) + BLOCK_M * BLOCK_K
        gl.warp_specialize([
            (_ws4_consumer, (wq_bufs, x_bufs, a_bufs, ready, empty, out_ptr, d_ptr, row0, col0, N_TOK, NK,
                             BLOCK_R, BLOCK_M, BLOCK_K, STAGES)),
            (_ws4_loader, (wq_desc, x_desc, wq_bufs, x_bufs, ready, empty, row0, col0, NK, BLOCK_K, STAGES,
                           STAGE_BYTES)),
        ], [1], [24])

    @gluon.jit
    def _ws4d_loader(wq_desc, x_desc, d_ptr, wq_bufs, x_bufs, a_bufs, w_ready, w_empty, x_ready, x_empty,
                     a_ready, a_empty, row0, col0, NK: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr,
                     BLOCK_K: gl.constexpr, STAGES: gl.constexpr, W_BYTES: gl.constexpr, X_BYTES: gl.constexpr):
        """The producer warp of "ws4d": words and tokens on separate barriers (the words are freed by
        the decoder, the tokens by the MMA)."""
        for k in range(NK):
            s = k % STAGES
            ph = ((k // STAGES) & 1) ^ 1
            mbarrier.wait(w_empty.index(s), ph)
            mbarrier.expect(w_ready.index(s), W_BYTES)
            _tma_load(wq_desc, [row0, k * (BLOCK_K // 8)], w_ready.index(s), wq_bufs.index(s))
            mbarrier.wait(x_empty.index(s), ph)
            mbarrier.expect(x_ready.index(s), X_BYTES)
            _tma_load(x_desc, [col0, k * BLOCK_K], x_ready.index(s), x_bufs.index(s))

    @gluon.jit
    def _ws4d_decoder(wq_desc, x_desc, d_ptr, wq_bufs, x_bufs, a_bufs, w_ready, w_empty, x_ready, x_empty,
                      a_ready, a_empty, row0, col0, NK: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr,
                      BLOCK_K: gl.constexpr, STAGES: gl.constexpr, W_BYTES: gl.constexpr, X_BYTES: gl.constexpr):
        """The decode warpgroup of "ws4d": words (shared) -> E4M3 (shared, two buffers), so the MMA
        warpgroup only issues MMAs and promotes."""
        l3: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1, 4], threads_per_warp=[8, 4, 1],
                                            warps_per_cta=[4, 1, 1], order=[2, 1, 0])
        d_ptrs = _d_offsets(d_ptr, row0, NK, BLOCK_R, BLOCK_K, gl.SliceLayout(2, l3))
        d_next = gl.load(d_ptrs).to(gl.int32)
        for k in range(NK):
            s = k % STAGES
            b = k % 2
            d_cur = d_next
            if k + 1 < NK:
                d_next = gl.load(d_ptrs + (k + 1) * (BLOCK_K // 32)).to(gl.int32)
            mbarrier.wait(w_ready.index(s), (k // STAGES) & 1)
            mbarrier.wait(a_empty.index(b), ((k // 2) & 1) ^ 1)
            _decode_store(wq_bufs.index(s), a_bufs.index(b), d_cur, BLOCK_R, BLOCK_K, 4)
            _cta_barrier()                          # (this partition's warps) every store is done
            mbarrier.arrive(w_empty.index(s))
            mbarrier.arrive(a_ready.index(b))

    @gluon.jit
    def _ws4d_mma(x_bufs, a_bufs, x_ready, x_empty, a_ready, a_empty, out_ptr, row0, col0, N_TOK,
                  NK: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
        """The MMA warpgroup(s) of "ws4d": both operands from shared memory, delayed promotion; step
        k - 1's token stage and decoded buffer handed back once its MMA is done."""
        WARPS: gl.constexpr = BLOCK_R // 16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 32])
        zero = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        acc = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        prev = warpgroup_mma_init(zero)
        for k in range(NK):
            s = k % STAGES
            b = k % 2
            mbarrier.wait(x_ready.index(s), (k // STAGES) & 1)
            mbarrier.wait(a_ready.index(b), (k // 2) & 1)
            tok = warpgroup_mma(a_bufs.index(b), x_bufs.index(s).permute((1, 0)), zero, use_acc=False,
                                is_async=True)
            acc = acc + warpgroup_mma_wait(1, deps=[prev])
            if WARPS > 4:
                _cta_barrier()
            mbarrier.arrive(x_empty.index((k + STAGES - 1) % STAGES), pred=k > 0)
            mbarrier.arrive(a_empty.index((k + 1) % 2), pred=k > 0)
            prev = tok
        acc = acc + warpgroup_mma_wait(0, deps=[prev])
        _store_tile(out_ptr, acc, row0, col0, N_TOK, BLOCK_R, BLOCK_M, mma)

    @gluon.jit
    def _ws4d_kernel(wq_desc, x_desc, out_ptr, d_ptr, N_TOK, K: gl.constexpr, BLOCK_R: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, DEC_REGS: gl.constexpr):
        """MODE 5 "ws4d": "ws4" with the decode in its own warpgroup (a loader warp, a decode
        warpgroup, the MMA warpgroup(s))."""
        row0 = gl.program_id(0) * BLOCK_R
        col0 = gl.program_id(1) * BLOCK_M
        NK: gl.constexpr = K // BLOCK_K
        wq_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_R, BLOCK_K // 8], wq_desc.layout)
        x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        a_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        a_bufs = gl.allocate_shared_memory(gl.float8e4nv, [2, BLOCK_R, BLOCK_K], a_layout)
        w_ready = _alloc_barriers(STAGES)
        w_empty = _alloc_barriers(STAGES)
        x_ready = _alloc_barriers(STAGES)
        x_empty = _alloc_barriers(STAGES)
        a_ready = _alloc_barriers(2)
        a_empty = _alloc_barriers(2)
        W_BYTES: gl.constexpr = BLOCK_R * (BLOCK_K // 2)
        X_BYTES: gl.constexpr = BLOCK_M * BLOCK_K
        gl.warp_specialize([
            (_ws4d_mma, (x_bufs, a_bufs, x_ready, x_empty, a_ready, a_empty, out_ptr, row0, col0, N_TOK, NK,
                         BLOCK_R, BLOCK_M, STAGES)),
            (_ws4d_loader, (wq_desc, x_desc, d_ptr, wq_bufs, x_bufs, a_bufs, w_ready, w_empty, x_ready, x_empty,
                            a_ready, a_empty, row0, col0, NK, BLOCK_R, BLOCK_M, BLOCK_K, STAGES, W_BYTES, X_BYTES)),
            (_ws4d_decoder, (wq_desc, x_desc, d_ptr, wq_bufs, x_bufs, a_bufs, w_ready, w_empty, x_ready, x_empty,
                             a_ready, a_empty, row0, col0, NK, BLOCK_R, BLOCK_M, BLOCK_K, STAGES, W_BYTES,
                             X_BYTES)),
        ], [1, 4], [24, DEC_REGS])

    @gluon.constexpr_function
    def _words_layout(block_r, block_k):
        """The fragment words of block_r rows, [block_r, block_k / 8] int32, in the MMA register
        operand's thread order (warp w holds rows 16 w .. 16 w + 15)."""
        warp_bases = [[16 << i, 0] for i in range((block_r // 16).bit_length() - 1)]
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [8, 0]], lane_bases=[[0, 4], [0, 8], [1, 0], [2, 0], [4, 0]],
            warp_bases=warp_bases, block_bases=[], shape=[block_r, block_k // 8])

    @gluon.jit
    def _ws4r_consumer(wq_bufs, x_bufs, ready, x_ready, empty, out_ptr, d_ptr, row0, col0, N_TOK,
                       NK: gl.constexpr, BLOCK_R: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                       STAGES: gl.constexpr, GATHER: gl.constexpr):
        """The MMA warpgroup of "ws4r": the step's fragment words (`gemm_operands.fragment_words`:
        word 4 c + g of a row holds k = 32 g + 4 c + (0..3, 16..19)) are read from shared memory in
        the MMA register operand's layout (thread = lane 4 r + c, rows r and r + 8 of its warp's 16),
        decoded, and fed to the MMA from registers: no shared-memory round trip of the E4M3 tile.
        BLOCK_R 128: two warpgroups, each its 64 rows, sharing the stage's token tile."""
        WARPS: gl.constexpr = BLOCK_R // 16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[WARPS, 1],
                                                      instr_shape=[16, BLOCK_M, 32])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        # words [R, 16]: registers = g (2 bits), row + 8; lanes = c (2 bits), row (3 bits); warps = row 16 w
        wl: gl.constexpr = _words_layout(BLOCK_R, BLOCK_K)
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, wl))
        col = gl.arange(0, BLOCK_K // 8, layout=gl.SliceLayout(0, wl))
        # int32 offsets (the pointer formed at each load): fewer live registers than int64 pointers
        d_offs = (row0 + r)[:, None] * (NK * (BLOCK_K // 32)) + (col % 4)[None, :]
        zero = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        acc = gl.zeros([BLOCK_R, BLOCK_M], gl.float32, layout=mma)
        prev = warpgroup_mma_init(zero)
        d_next = gl.load(d_ptr + d_offs).to(gl.int32)
        for k in range(NK):
            s = k % STAGES
            d_cur = d_next
            if k + 1 < NK:
                d_next = gl.load(d_ptr + (d_offs + (k + 1) * (BLOCK_K // 32))).to(gl.int32)
            mbarrier.wait(ready.index(s), (k // STAGES) & 1)
            if GATHER:                                  # the token rows: the gather warpgroup's copies
                mbarrier.wait(x_ready.index(s), (k // STAGES) & 1)
            wd = wq_bufs.index(s).load(wl)
            lo, hi = _fp4_word_asm(wd, 0x6C686000 - d_cur * 0x08080800, 0x7C787470 - d_cur * 0x08080808)
            t = gl.join(_split_bytes(lo), _split_bytes(hi))                       # [R, 4 c + g, b, h]
            t = gl.reshape(t, [BLOCK_R, 4, 4, 4, 2])                               # [R, c, g, b, h]
            t = gl.reshape(gl.permute(t, (0, 2, 4, 1, 3)), [BLOCK_R, BLOCK_K])     # k = 32 g + 16 h + 4 c + b
            a = gl.convert_layout(t.to(gl.float8e4nv, bitcast=True), a_layout, assert_trivial=True)
            tok = warpgroup_mma(a, x_bufs.index(s).permute((1, 0)), zero, use_acc=False, is_async=True)
            acc = acc + warpgroup_mma_wait(1, deps=[prev])
            if WARPS > 4:
                _cta_barrier()                      # every warpgroup is done with step k - 1's stage
            mbarrier.arrive(empty.index((k + STAGES - 1) % STAGES), pred=k > 0)
            prev = tok
        acc = acc + warpgroup_mma_wait(0, deps=[prev])
        _store_tile(out_ptr, acc, row0, col0, N_TOK, BLOCK_R, BLOCK_M, mma)

    @gluon.jit
    def _ws4r_kernel(wq_desc, x_desc, out_ptr, d_ptr, N_TOK, K: gl.constexpr, BLOCK_R: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
        """MODE 6 "ws4r": "ws4" with the layer's fragment words decoded straight into the MMA's
        register operand (one warpgroup per 64 rows)."""
        row0 = gl.program_id(0) * BLOCK_R
        col0 = gl.program_id(1) * BLOCK_M
        NK: gl.constexpr = K // BLOCK_K
        wq_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_R, BLOCK_K // 8], wq_desc.layout)
        x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
        ready = _alloc_barriers(STAGES)
        empty = _alloc_barriers(STAGES)
        STAGE_BYTES: gl.constexpr = BLOCK_R * (BLOCK_K // 2) + BLOCK_M * BLOCK_K
        gl.warp_specialize([
            (_ws4r_consumer, (wq_bufs, x_bufs, ready, ready, empty, out_ptr, d_ptr, row0, col0, N_TOK, NK,
                              BLOCK_R, BLOCK_M, BLOCK_K, STAGES, False)),
            (_ws4_loader, (wq_desc, x_desc, wq_bufs, x_bufs, ready, empty, row0, col0, NK, BLOCK_K, STAGES,
                           STAGE_BYTES)),
        ], [1], [24])

    @gluon.jit
    def _ws4g_loader(wq_desc, perm_ptr, x_ptr, wq_bufs, x_bufs, ready, x_ready, empty, row0, col0,
                     NK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr,
                     W_BYTES: gl.constexpr):
        """The producer warpgroup of "ws4g": TMA for the words; cp.async for the tile's token rows,
        gathered through `perm` (as L1 gathers each pair's pool row), each thread's copies arriving
        on the stage's x_ready barrier when they land (`cp.async.mbarrier.arrive.noinc`)."""
        ld: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[4, 8],
                                            warps_per_cta=[4, 1], order=[1, 0])
        m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, ld))
        c = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, ld))
        rows = gl.load(perm_ptr + col0 + m).to(gl.int64)
        x_rows = x_ptr + rows[:, None] * (NK * BLOCK_K) + c[None, :]
        for k in range(NK):
            s = k % STAGES
            mbarrier.wait(empty.index(s), ((k // STAGES) & 1) ^ 1)
            mbarrier.expect(ready.index(s), W_BYTES)
            _tma_load(wq_desc, [row0, k * (BLOCK_K // 8)], ready.index(s), wq_bufs.index(s))
            _cp_async(x_bufs.index(s), x_rows + k * BLOCK_K)
            async_copy.mbarrier_arrive(x_ready.index(s), increment_count=False)

    @gluon.jit
    def _ws4g_kernel(wq_desc, x_ptr, perm_ptr, out_ptr, d_ptr, N_TOK, K: gl.constexpr, BLOCK_R: gl.constexpr,
                     BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, LOAD_REGS: gl.constexpr):
        """MODE 7 "ws4g": "ws4r" with the token rows gathered (`perm`) by a producer warpgroup with
        cp.async, as the layer's L1 must (a pair's row is its token's pool row)."""
        row0 = gl.program_id(0) * BLOCK_R
        col0 = gl.program_id(1) * BLOCK_M
        NK: gl.constexpr = K // BLOCK_K
        wq_bufs = gl.allocate_shared_memory(gl.int32, [STAGES, BLOCK_R, BLOCK_K // 8], wq_desc.layout)
        x_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=8, rank=2)
        x_bufs = gl.allocate_shared_memory(gl.float8e4nv, [STAGES, BLOCK_M, BLOCK_K], x_layout)
        ready = _alloc_barriers(STAGES)
        empty = _alloc_barriers(STAGES)
        x_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(x_ready.index(i), count=128)          # one arrival per producer thread
        W_BYTES: gl.constexpr = BLOCK_R * (BLOCK_K // 2)
        gl.warp_specialize([
            (_ws4r_consumer, (wq_bufs, x_bufs, ready, x_ready, empty, out_ptr, d_ptr, row0, col0, N_TOK, NK,
                              BLOCK_R, BLOCK_M, BLOCK_K, STAGES, True)),
            (_ws4g_loader, (wq_desc, perm_ptr, x_ptr, wq_bufs, x_bufs, ready, x_ready, empty, row0, col0, NK,
                            BLOCK_M, BLOCK_K, STAGES, W_BYTES)),
        ], [4], [LOAD_REGS])


def _smem_layout(rows: int):
    return gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], gl.float8e4nv)


def ws4_descriptors(wq, x, block_r: int):
    """TMA descriptors of the 4-bit words [R, K / 8] int32 and the tokens [N, K] for `_ws4_kernel`
    and `_ws4d_kernel`."""
    lw = gl.NVMMASharedLayout.get_default_for([block_r, BLOCK_K // 8], gl.int32)
    return (TensorDescriptor.from_tensor(wq, [block_r, BLOCK_K // 8], lw),
            TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], _smem_layout(BLOCK_M)))


def pack_fp4_words(codes, fragment: bool):
    """E2M1 codes [R, K] (int64, bit 3 the sign) -> int32 words [R, K / 8] in `l1_gemm._fp4_word_asm`'s
    bit layout: natural order (word j: k 8 j .. 8 j + 3 in its low bytes, 8 j + 4 .. 8 j + 7 in its high)
    or the layer's fragment order (`gemm_operands.fragment_words`: word 4 c + g of a 128-K step:
    k = 32 g + 4 c + 0..3 low, + 16 .. 19 high)."""
    import torch
    R, K = codes.shape
    j = torch.arange(K // 8, device=codes.device)
    if fragment:
        t, w = j // 16, j % 16
        k_lo = 128 * t + 32 * (w % 4) + 4 * (w // 4)
        k_hi = k_lo + 16
    else:
        k_lo, k_hi = 8 * j, 8 * j + 4
    word = torch.zeros(R, K // 8, dtype=torch.int64, device=codes.device)
    for i in range(4):
        lo, hi = codes[:, k_lo + i], codes[:, k_hi + i]
        word |= ((lo & 7) << (4 * i)) | (((lo >> 3) & 1) << (8 * i + 7))
        word |= ((hi & 7) << (16 + 4 * i)) | (((hi >> 3) & 1) << (8 * i + 3))
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def fp4_words_reference(words, d):
    """The E4M3 weights [R, K] that "ws4" decodes from words [R, K / 8] (int32) and offset indices
    d [R, K / 32] (uint8, <= 11): word j holds k = 8 j .. 8 j + 7; its low 4 bytes from the
    magnitudes at bits 4 i (sign bit 8 i + 7), its high 4 from bits 16 + 4 i (sign 8 i + 3); magnitude
    m -> E2M1(m) x 2**(6 - d) (`l1_gemm._fp4_word_asm`)."""
    import torch
    w = words.to(torch.int64) & 0xFFFFFFFF
    dd = d.to(torch.int64).repeat_interleave(4, dim=1)                          # per word
    tab = ((0x7C787470 - dd * 0x08080808) << 32) | (0x6C686000 - dd * 0x08080800)
    out = []
    for half in range(2):
        for i in range(4):
            m = (w >> (4 * i + 16 * half)) & 7
            sign = (w >> (8 * i + (3 if half else 7))) & 1
            out.append(((tab >> (8 * m)) & 0xFF) | (sign << 7))
    b = torch.stack(out, dim=-1).reshape(words.shape[0], -1).to(torch.uint8)   # [R, K]
    return b.view(torch.float8_e4m3fn)


def ws_descriptors(w, x, block_r: int):
    """TMA descriptors of the weight [R, K] and token [N, K] tensors for `_ws_kernel`."""
    return (TensorDescriptor.from_tensor(w, [block_r, BLOCK_K], _smem_layout(block_r)),
            TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], _smem_layout(BLOCK_M)))


# registers per thread for the whole CTA under warp specialisation (the loader's warpgroup takes
# 24, the consumers the rest): 2 CTAs of 64 rows per SM, 1 of 128
WS_MAXNREG = {64: 128, 128: 168}
# "ws4d" adds a decode warpgroup: 12 warps per CTA (the loader's padded to a warpgroup)
WS4D_MAXNREG = {64: 96, 128: 128}
WS4D_DEC_REGS = {64: 56, 128: 80}
# "ws4g": the gather warpgroup's registers (8 row pointers per thread)
WS4G_LOAD_REGS = 24
WS_STAGES = 4


def compile_args(mode: str, K: int = 7168, stages: int = 3, block_r: int = 64):
    """(kernel, signature, constexprs, options) of a mode for `_compile.compile_kernel`; block_r
    weight rows per CTA: 64 (one warpgroup, L1's prefill tile) or 128 (two sharing the token tile)."""
    if mode == "ws4g":
        lw = gl.NVMMASharedLayout.get_default_for([block_r, BLOCK_K // 8], gl.int32)
        sig = dict(wq_desc=f"tensordesc<i32[{block_r}, {BLOCK_K // 8}],{lw!r}>", x_ptr="*fp8e4nv", perm_ptr="*i32",
                   out_ptr="*fp32", d_ptr="*u8", N_TOK="i32")
        ce = dict(K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, STAGES=WS_STAGES, LOAD_REGS=WS4G_LOAD_REGS)
        return _ws4g_kernel, sig, ce, dict(num_warps=block_r // 16, maxnreg=WS_MAXNREG[block_r])
    if mode in ("ws4", "ws4d", "ws4r"):
        lw = gl.NVMMASharedLayout.get_default_for([block_r, BLOCK_K // 8], gl.int32)
        sig = dict(wq_desc=f"tensordesc<i32[{block_r}, {BLOCK_K // 8}],{lw!r}>",
                   x_desc=f"tensordesc<fp8e4nv[{BLOCK_M}, {BLOCK_K}],{_smem_layout(BLOCK_M)!r}>",
                   out_ptr="*fp32", d_ptr="*u8", N_TOK="i32")
        ce = dict(K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, STAGES=WS_STAGES)
        if mode == "ws4r":
            return _ws4r_kernel, sig, ce, dict(num_warps=block_r // 16, maxnreg=WS_MAXNREG[block_r])
        if mode == "ws4d":
            ce["DEC_REGS"] = WS4D_DEC_REGS[block_r]
            return _ws4d_kernel, sig, ce, dict(num_warps=block_r // 16, maxnreg=WS4D_MAXNREG[block_r])
        return _ws4_kernel, sig, ce, dict(num_warps=block_r // 16, maxnreg=WS_MAXNREG[block_r])
    if mode == "ws":
        def desc(rows):
            return f"tensordesc<fp8e4nv[{rows}, {BLOCK_K}],{_smem_layout(rows)!r}>"
        sig = dict(w_desc=desc(block_r), x_desc=desc(BLOCK_M), out_ptr="*fp32", N_TOK="i32")
        ce = dict(K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, STAGES=WS_STAGES)
        return _ws_kernel, sig, ce, dict(num_warps=block_r // 16, maxnreg=WS_MAXNREG[block_r])
    sig = dict(w_ptr="*fp8e4nv", x_ptr="*fp8e4nv", out_ptr="*fp32", N_TOK="i32")
    ce = dict(K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, STAGES=stages, MODE=MODES[mode])
    return _probe_kernel, sig, ce, dict(num_warps=block_r // 16)


def main() -> None:
    import torch
    from mega_moe_layer.kernels.gemm_heuristics import resident_ctas
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--block-r", type=int, default=64, choices=(64, 128),
                   help="weight rows per CTA: one warpgroup (64, L1's tile) or two sharing the token tile")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of %s; sync always runs (the bitwise baseline)" % ", ".join(MODES))
    args = p.parse_args()
    if not HAVE_GLUON:
        raise SystemExit("this Triton has no Gluon Hopper ops")
    modes = ["sync"] + [m for m in args.modes.split(",") if m and m != "sync"]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: expected names from {list(MODES)}, got {m!r}")
    R, N, K = args.rows, args.tokens, args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    # 4-bit weights (random words, offset indices 0..11) decoded to E4M3 for the FP8 modes, so every
    # mode multiplies the same values and sync / delayed / ws / ws4 must agree bitwise
    codes = torch.randint(0, 16, (R, K), device="cuda", generator=g, dtype=torch.int64)
    words = pack_fp4_words(codes, fragment=False)
    words_frag = pack_fp4_words(codes, fragment=True)
    del codes
    d = torch.randint(0, 12, (R, K // 32), device="cuda", generator=g, dtype=torch.int64).to(torch.uint8)
    w = fp4_words_reference(words, d)
    x = (torch.randn(N, K, device="cuda", generator=g) * 4).to(torch.float8_e4m3fn)
    ref = w.double() @ x.double().T
    perm = torch.randperm(N, device="cuda", generator=g).to(torch.int32)      # ws4g's gathered token rows
    block_r, warps = args.block_r, args.block_r // 16
    grid = (R // block_r, N // BLOCK_M)
    outs = {}
    print(f"{torch.cuda.get_device_name()}, R {R} x tokens {N} x K {K}, {args.stages} stages, {block_r} x 128 tiles")
    for name in modes:
        mode = MODES[name]
        out = torch.full((R, N), float("nan"), device="cuda", dtype=torch.float32)
        if name == "ws":
            w_desc, x_desc = ws_descriptors(w, x, block_r)

            def run():
                return _ws_kernel[grid](w_desc, x_desc, out, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M,
                                        BLOCK_K=BLOCK_K, STAGES=WS_STAGES, num_warps=warps,
                                        maxnreg=WS_MAXNREG[block_r])
        elif name == "ws4g":
            wq_desc = ws4_descriptors(words_frag, x, block_r)[0]

            def run():
                return _ws4g_kernel[grid](wq_desc, x, perm, out, d, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M,
                                          BLOCK_K=BLOCK_K, STAGES=WS_STAGES, LOAD_REGS=WS4G_LOAD_REGS,
                                          num_warps=warps, maxnreg=WS_MAXNREG[block_r])
        elif name in ("ws4", "ws4d", "ws4r"):
            descs = ws4_descriptors(words_frag if name == "ws4r" else words, x, block_r)
            if name == "ws4r":
                def run():
                    return _ws4r_kernel[grid](*descs, out, d, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M,
                                              BLOCK_K=BLOCK_K, STAGES=WS_STAGES, num_warps=warps,
                                              maxnreg=WS_MAXNREG[block_r])
            elif name == "ws4":
                def run():
                    return _ws4_kernel[grid](*descs, out, d, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M,
                                             BLOCK_K=BLOCK_K, STAGES=WS_STAGES, num_warps=warps,
                                             maxnreg=WS_MAXNREG[block_r])
            else:
                def run():
                    return _ws4d_kernel[grid](*descs, out, d, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M,
                                              BLOCK_K=BLOCK_K, STAGES=WS_STAGES, DEC_REGS=WS4D_DEC_REGS[block_r],
                                              num_warps=warps, maxnreg=WS4D_MAXNREG[block_r])
        else:
            def run():
                return _probe_kernel[grid](w, x, out, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                                           STAGES=args.stages, MODE=mode, num_warps=warps)
        try:
            compiled = run()
            torch.cuda.synchronize()
        except Exception as exc:                    # report and go on with the other modes
            print(f"  {name:8s} failed: {type(exc).__name__}: {str(exc)[-2000:]}", flush=True)
            continue
        if hasattr(compiled, "result"):          # an async-compile future
            compiled = compiled.result()
        regs, smem = getattr(compiled, "n_regs", 0), compiled.metadata.shared
        per_sm = resident_ctas(regs, warps + 4 * name.startswith("ws") + 4 * (name == "ws4d"), smem) if regs else 0
        result = out
        if name == "ws4g":                      # column j is token perm[j]: back to token order
            result = torch.empty_like(out).index_copy_(1, perm.long(), out)
        err = ((result.double() - ref).norm() / ref.norm()).item()
        times = []
        for _ in range(3):
            run()
        for _ in range(args.iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            run()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e3)
        us = statistics.median(times)
        outs[name] = result
        same = "" if name in ("sync", "chained") else f"  bitwise = sync: {torch.equal(outs['sync'], result)}"
        print(f"  {name:8s} {us:9.1f} us  {2 * R * N * K / us / 1e6:7.1f} TFLOP/s  rel-err {err:.2e}  "
              f"({regs} registers, {smem} B shared: {per_sm} CTAs per SM){same}", flush=True)
    bad = [n for n in outs if n not in ("sync", "chained") and not torch.equal(outs["sync"], outs[n])]
    if bad:
        raise SystemExit(f"not bitwise equal to sync: {bad}")


if __name__ == "__main__":
    main()
