"""Probe (GPU): how fast can a Triton 3.x FP8 grouped GEMM go on Hopper when both operands are
streamed from memory (activations already rebased to E4M3 where they land), and what do the
promotion variants cost?

Orientation as the layer's grouped GEMMs: acc[weight rows R, tokens T] = W[R, K] . X[T, K]^T, tokens
of one expert gathered through an index array. Modes:
  chain   acc = dot(w, x^T, acc) over all K (no promotion: Hopper's reduced-precision accumulation)
  p<C>    part = dot chained over C K-steps of 128 (a pipelined inner loop), then
          acc += part * sw[:, None] * sx[None, :]
  2acc    two chained accumulators (even / odd K steps), summed after the loop
          (the per-chunk scales of a rebased-per-128 operand: promotion and scaling in one FMA)
Weights "w8" (stored E4M3 bytes, streamed) or "w4" (packed E2M1 + a per-32 table index, expanded to
E4M3 in registers: the MMA's register operand).

Prints TFLOP/s (median of --iters CUDA-event timings) and the rel-RMSE against a float64 GEMM of the
same operand values. Not part of the library: a measuring tool for docs/PERF.md.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, ".")
from mega_moe_layer.kernels.l1_gemm import _fp4_tile_e4m3  # noqa: E402
from mega_moe_layer.kernels.gemm_operands import e2m1_table  # noqa: E402


@triton.jit
def _w_tile(w_ptr, wi_ptr, tab_ptr, e64, rows, kt, N: tl.constexpr, K: tl.constexpr, BR: tl.constexpr,
            BK: tl.constexpr, W4: tl.constexpr):
    if W4:
        pk = tl.load(w_ptr + e64 * (N * K // 2) + rows[:, None] * (K // 2) + kt * (BK // 2)
                     + tl.arange(0, BK // 2)[None, :])
        d = tl.load(wi_ptr + e64 * (N * K // 32) + rows[:, None] * (K // 32) + kt * (BK // 32)
                    + tl.arange(0, BK // 32)[None, :]).to(tl.int32)
        w = _fp4_tile_e4m3(pk, tl.load(tab_ptr + d), BR, BK, True)
    else:
        w = tl.load(w_ptr + e64 * (N * K) + rows[:, None] * K + kt * BK + tl.arange(0, BK)[None, :])
    return w


@triton.jit
def _probe_kernel(w_ptr, wi_ptr, x_ptr, idx_ptr, sw_ptr, sx_ptr, tab_ptr, out_ptr,
                  E, TOK_PER_E, N: tl.constexpr, K: tl.constexpr,
                  BR: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, CHUNK: tl.constexpr,
                  W4: tl.constexpr):
    NUM_R: tl.constexpr = N // BR
    NQ: tl.constexpr = K // BK // (CHUNK if CHUNK > 0 else 1)
    num_t = TOK_PER_E // BT
    total = E * num_t * NUM_R
    for work in range(tl.program_id(0), total, tl.num_programs(0)):
        rb = work % NUM_R
        rest = work // NUM_R
        tb = rest % num_t
        e = rest // num_t
        rows = rb * BR + tl.arange(0, BR)
        toks = e * TOK_PER_E + tb * BT + tl.arange(0, BT)
        trow = tl.load(idx_ptr + toks).to(tl.int64)
        e64 = e.to(tl.int64)
        acc = tl.zeros((BR, BT), dtype=tl.float32)
        if CHUNK == 0:
            # one chained accumulator over all of K
            for kt in range(0, K // BK):
                w = _w_tile(w_ptr, wi_ptr, tab_ptr, e64, rows, kt, N, K, BR, BK, W4)
                x = tl.load(x_ptr + trow[:, None] * K + kt * BK + tl.arange(0, BK)[None, :])
                acc = tl.dot(w, tl.trans(x), acc)
        elif CHUNK < 0:
            # -CHUNK... two chained accumulators (even / odd K steps)
            acc2 = tl.zeros((BR, BT), dtype=tl.float32)
            for kp in range(0, K // BK // 2):
                w = _w_tile(w_ptr, wi_ptr, tab_ptr, e64, rows, 2 * kp, N, K, BR, BK, W4)
                x = tl.load(x_ptr + trow[:, None] * K + 2 * kp * BK + tl.arange(0, BK)[None, :])
                acc = tl.dot(w, tl.trans(x), acc)
                w2 = _w_tile(w_ptr, wi_ptr, tab_ptr, e64, rows, 2 * kp + 1, N, K, BR, BK, W4)
                x2 = tl.load(x_ptr + trow[:, None] * K + (2 * kp + 1) * BK + tl.arange(0, BK)[None, :])
                acc2 = tl.dot(w2, tl.trans(x2), acc2)
            acc += acc2
        else:
            # chunks of CHUNK K steps (a pipelined inner loop), promoted + scaled per chunk
            for kq in range(0, NQ):
                part = tl.zeros((BR, BT), dtype=tl.float32)
                for kk in range(0, CHUNK):
                    kt = kq * CHUNK + kk
                    w = _w_tile(w_ptr, wi_ptr, tab_ptr, e64, rows, kt, N, K, BR, BK, W4)
                    x = tl.load(x_ptr + trow[:, None] * K + kt * BK + tl.arange(0, BK)[None, :])
                    part = tl.dot(w, tl.trans(x), part)
                sw = tl.load(sw_ptr + e64 * N * NQ + rows * NQ + kq)
                sx = tl.load(sx_ptr + trow * NQ + kq)
                acc += part * (sw[:, None] * sx[None, :])
        o = out_ptr + trow[None, :] * N + rows[:, None]
        tl.store(o, acc)


def make(E, tok, N, K, w4, dev, g):
    T = E * tok
    x = (torch.randn(T, K, device=dev, generator=g) * 2).to(torch.float8_e4m3fn)
    idx = torch.randperm(T, device=dev, generator=g).to(torch.int32)
    if w4:
        w = torch.randint(0, 256, (E, N, K // 2), device=dev, generator=g, dtype=torch.uint8).view(torch.int8)
        wi = torch.zeros(E, N, K // 32, device=dev, dtype=torch.uint8)
        tab = e2m1_table(dev)
        # values: E2M1 * 2**6 (table 0), low nibble = even column
        mags = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6], device=dev, dtype=torch.float64) * 64
        b = w.view(torch.uint8).to(torch.int64)
        lo, hi = b & 15, b >> 4
        def val(c):
            return mags[c & 7] * torch.where((c & 8) != 0, -1.0, 1.0).double()
        wv = torch.stack([val(lo), val(hi)], dim=-1).reshape(E, N, K)
    else:
        w = (torch.randn(E, N, K, device=dev, generator=g)).to(torch.float8_e4m3fn)
        wi = torch.zeros(1, device=dev, dtype=torch.uint8)
        tab = e2m1_table(dev)
        wv = w.double()
    return x, idx, w, wi, tab, wv


def run(args):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    results = []
    for case in args.cases.split():
        if args.w in ("w8", "w4"):
            kinds = (args.w == "w4",)
        else:
            kinds = (False, True)
        E, tok = (int(v) for v in case.split("x"))
        N, K = args.n, args.k
        for w4 in kinds:
            x, idx, w, wi, tab, wv = make(E, tok, N, K, w4, dev, g)
            T = E * tok
            out = torch.empty(T, N, device=dev, dtype=torch.float32)
            # reference of a few experts (float64)
            ne = min(E, 2)
            xv = x.double()
            ref = torch.empty(ne * tok, N, dtype=torch.float64, device=dev)
            for e in range(ne):
                rows = idx[e * tok:(e + 1) * tok].long()
                ref_e = xv[rows] @ wv[e].T
                ref[e * tok:(e + 1) * tok] = ref_e
            configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split()]
            for chunk, (br, bt, warps, stages, ctas) in itertools.product(
                    [int(c) for c in args.chunks.split()], configs):
                if tok % bt or N % br:
                    continue
                nq = K // 128 // max(chunk, 1)
                sw = torch.ones(E, N, max(nq, 1), device=dev)
                sx = torch.ones(T, max(nq, 1), device=dev)
                work = E * (tok // bt) * (N // br)
                grid = (min(work, sms * ctas),)
                name = f"{case} {'w4' if w4 else 'w8'} {'chain' if chunk == 0 else ('2acc' if chunk < 0 else f'p{chunk}')} br{br} bt{bt} w{warps} s{stages} c{ctas}"
                try:
                    def launch():
                        _probe_kernel[grid](w, wi, x, idx, sw, sx, tab, out, E, tok, N, K, br, bt, 128, chunk, w4,
                                            num_warps=warps, num_stages=stages)
                    launch()
                    torch.cuda.synchronize()
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
                    print(f"{name}: failed {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                got = torch.empty_like(ref)
                for e in range(ne):
                    rows = idx[e * tok:(e + 1) * tok].long()
                    got[e * tok:(e + 1) * tok] = out[rows].double()
                err = float(((got - ref).pow(2).mean() / ref.pow(2).mean()).sqrt())
                ts = []
                for i in range(args.iters + 3):
                    s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    s.record()
                    for _ in range(5):       # back to back: the host's launch time stays hidden
                        launch()
                    t.record()
                    t.synchronize()
                    if i >= 3:
                        ts.append(s.elapsed_time(t) * 1e3 / 5)
                us = statistics.median(ts)
                tf = 2 * T * N * K / us / 1e6
                wbytes = E * N * K * (0.5 if w4 else 1.0)
                gbs = wbytes / us / 1e3
                print(f"{name}: {us:9.1f} us {tf:7.1f} TF/s weights {gbs:6.0f} GB/s rel-rmse {err:.2e}", flush=True)
                results.append(dict(name=name, us=us, tflops=tf, gbs=gbs, err=err))
            del x, w, wv
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="16x256 64x16")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--chunks", default="0 -1 1 2 4", help="0 chain, -1 two accumulators, C>0 promote per C steps")
    p.add_argument("--configs", default="128,128,4,4,1 128,128,4,3,2 128,256,8,3,1",
                   help="space-separated br,bt,warps,stages,ctas_per_sm")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--w", default="both", help="w8, w4 or both")
    p.add_argument("--out", default="")
    run(p.parse_args())
