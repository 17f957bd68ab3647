"""Probe: can a Hopper FP8 mainloop promote every K step and still keep the MMA busy?

The layer's L1 promotes the FP8 MMA's partial sum to a float32 accumulator after every 128-K step
(Hopper's FP8 MMA accumulates with ~14 mantissa bits, truncating: docs/PERF.md), and Triton 3.6
then waits for every MMA before the add (`warp_group_dot_wait {pendings = 0}`), so the tensor pipe
idles while each warpgroup promotes (Nsight Compute at T = 4096: 32% busy, `wait` the largest
stall). Gluon (Triton's lower-level dialect, `triton.experimental.gluon`) exposes the asynchronous
wgmma and its wait directly, which allows a *delayed* promotion: issue step k's MMA, then wait
until only it is in flight and add step k - 1's partial sum while it runs.

This script times one 64 x 128 tile per CTA (one warpgroup: 64 weight rows on the MMA's M side
from registers, 128 tokens on its N side from shared memory, as L1's prefill tile), E4M3 x E4M3,
K 7168, three ways (MODE):
  0 "sync": every step's MMA waited for, then added (what the layer's Triton L1 does);
  1 "delayed": step k's MMA in flight while step k - 1's partial sum is added;
  2 "chained": one accumulator through K (no promotion: fastest, the truncating error).
Modes 0 and 1 add the same partial sums in the same order: bitwise equal outputs (checked).

    python scripts/probe_gluon_promote.py [--rows 4096 --tokens 4096 --k 7168 --iters 20 --block-r 64|128]

Built 2026-12-07 (sixth session) and compiled for sm_90a on the CPU (tests/test_probe_gluon.py);
not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

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
    # Triton 3.6 names the cp.async copy `async_copy_global_to_shared`, later versions `async_load`
    _cp_async = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared
    # ... and the CTA barrier `thread_barrier`, later versions `barrier`
    _cta_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
    HAVE_GLUON = True
except ImportError:            # a Triton without Gluon's Hopper ops
    HAVE_GLUON = False

BLOCK_M, BLOCK_K = 128, 128
MODES = {"sync": 0, "delayed": 1, "chained": 2, "ws": 3}

if HAVE_GLUON:
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
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, mma))
        c = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
        gl.store(out_ptr + (row0 + r)[:, None].to(gl.int64) * N_TOK + (col0 + c)[None, :], acc)

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
        r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, mma))
        c = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, mma))
        gl.store(out_ptr + (row0 + r)[:, None].to(gl.int64) * N_TOK + (col0 + c)[None, :], acc)

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
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        STAGE_BYTES: gl.constexpr = (BLOCK_R + BLOCK_M) * BLOCK_K
        gl.warp_specialize([
            (_ws_consumer, (w_bufs, x_bufs, ready, empty, out_ptr, row0, col0, N_TOK, NK, BLOCK_R, BLOCK_M,
                            STAGES)),
            (_ws_loader, (w_desc, x_desc, w_bufs, x_bufs, ready, empty, row0, col0, NK, BLOCK_K, STAGES,
                          STAGE_BYTES)),
        ], [1], [24])


def _smem_layout(rows: int):
    return gl.NVMMASharedLayout.get_default_for([rows, BLOCK_K], gl.float8e4nv)


def ws_descriptors(w, x, block_r: int):
    """TMA descriptors of the weight [R, K] and token [N, K] tensors for `_ws_kernel`."""
    return (TensorDescriptor.from_tensor(w, [block_r, BLOCK_K], _smem_layout(block_r)),
            TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], _smem_layout(BLOCK_M)))


# registers per thread for the whole CTA under warp specialisation (the loader's warpgroup takes
# 24, the consumers the rest): 2 CTAs of 64 rows per SM, 1 of 128
WS_MAXNREG = {64: 128, 128: 168}
WS_STAGES = 4


def compile_args(mode: str, K: int = 7168, stages: int = 3, block_r: int = 64):
    """(kernel, signature, constexprs, options) of a mode for `_compile.compile_kernel`; block_r
    weight rows per CTA: 64 (one warpgroup, L1's prefill tile) or 128 (two sharing the token tile)."""
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
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from mega_moe_layer.kernels.gemm_heuristics import resident_ctas
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--block-r", type=int, default=64, choices=(64, 128),
                   help="weight rows per CTA: one warpgroup (64, L1's tile) or two sharing the token tile")
    args = p.parse_args()
    if not HAVE_GLUON:
        raise SystemExit("this Triton has no Gluon Hopper ops")
    R, N, K = args.rows, args.tokens, args.k
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(R, K, device="cuda", generator=g) * 4).to(torch.float8_e4m3fn)
    x = (torch.randn(N, K, device="cuda", generator=g) * 4).to(torch.float8_e4m3fn)
    ref = w.double() @ x.double().T
    block_r, warps = args.block_r, args.block_r // 16
    grid = (R // block_r, N // BLOCK_M)
    outs = {}
    print(f"{torch.cuda.get_device_name()}, R {R} x tokens {N} x K {K}, {args.stages} stages, {block_r} x 128 tiles")
    for name, mode in MODES.items():
        out = torch.empty(R, N, device="cuda", dtype=torch.float32)

        if name == "ws":
            w_desc, x_desc = ws_descriptors(w, x, block_r)

            def run():
                return _ws_kernel[grid](w_desc, x_desc, out, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M,
                                        BLOCK_K=BLOCK_K, STAGES=WS_STAGES, num_warps=warps,
                                        maxnreg=WS_MAXNREG[block_r])
        else:
            def run():
                return _probe_kernel[grid](w, x, out, N, K=K, BLOCK_R=block_r, BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K,
                                           STAGES=args.stages, MODE=mode, num_warps=warps)
        compiled = run()
        torch.cuda.synchronize()
        if hasattr(compiled, "result"):          # an async-compile future
            compiled = compiled.result()
        regs, smem = getattr(compiled, "n_regs", 0), compiled.metadata.shared
        per_sm = resident_ctas(regs, warps + 4 * (name == "ws"), smem) if regs else 0
        err = ((out.double() - ref).norm() / ref.norm()).item()
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
        outs[name] = out
        print(f"  {name:8s} {us:9.1f} us  {2 * R * N * K / us / 1e6:7.1f} TFLOP/s  rel-err {err:.2e}  "
              f"({regs} registers, {smem} B shared: {per_sm} CTAs per SM)", flush=True)
    same = torch.equal(outs["sync"], outs["delayed"]) and torch.equal(outs["sync"], outs["ws"])
    print(f"  sync, delayed and ws bitwise equal: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
