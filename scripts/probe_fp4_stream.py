"""Probe (GPU): 4-bit MXFP4 weights on the streamed FP8 mainloop — how should the per-group E4M3
table reach the decode? Measured against the same GEMM on 8-bit rebased E4M3 weights.

Orientation as the layer's grouped GEMMs (acc[weight rows, tokens] = W . X^T, tokens of one expert
gathered). Weights are fragment words (`gemm_operands.fragment_words`) decoded by
`l1_gemm._fp4_word_asm`; what differs is the table of each 32-group (offset index d):
  gather    d read 4 groups per int32 (pipelined), table[d] gathered from the 512-byte table
            (the words in the older (g, c) order, decoded in a blocked layout that Triton then
            moves through shared memory into the MMA's operand); Triton gives the gather's index
            load a distance of one K step only
  prefetch  d loaded two K steps ahead by hand (loop-carried), the gather a plain load
  arith     no gather: the table computed from d in registers (f16x2 products, cvt to e4m3x2;
            exact with subnormals, `l1_gemm._e2m1_table_f16`), d streamed like the words
  imad      d streamed, the table from two IMAD (exact for d <= 11, where every entry is normal;
            the load-time operand re-encodes groups beyond, `gemm_operands`); imad2: d read as [R, 4]
  frag      the library's path: the words stored (c, g) per 128-K chunk and decoded in the MMA
            register operand's layout (`l1_gemm._fp4_frag_e4m3`: no shared-memory round trip),
            f16x2 tables
  fragimad  frag with the two-IMAD tables (d <= 11; the library's default)
  arith2    arith with d read as [R, BK / 128] words (any K step)
  e4m3      8-bit rebased E4M3 weights, nothing to decode (the reference point)
Promotion: CHUNK 0 chains the whole K in the FP8 MMA, C > 0 promotes to float32 every C steps.

Prints us, weight GB/s, TFLOP/s and the rel-RMSE against a float64 GEMM of the same values. A
measuring tool for docs/PERF.md, not part of the library.
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
from mega_moe_layer.kernels import reference as ref  # noqa: E402
from mega_moe_layer.kernels.gemm_operands import e2m1_table, fragment_codes  # noqa: E402
from mega_moe_layer.kernels.l1_gemm import (_e2m1_table_f16 as _tab_f16, _fp4_frag_e4m3, _fp4_word_asm,  # noqa: E402
                                            _frag_rows)


@triton.jit
def _load_d(d_ptr, e64, rows, kt, N: tl.constexpr, K: tl.constexpr, BR: tl.constexpr, BK: tl.constexpr):
    """[BR, BK/32] int32 offset indices of K step kt (4 per int32 word)."""
    KB: tl.constexpr = BK // 32
    dw = tl.load(d_ptr + e64 * (N * K // 128) + rows[:, None] * (K // 128) + kt * (KB // 4)
                 + tl.arange(0, KB // 4)[None, :])
    return tl.reshape((dw[:, :, None] >> (8 * tl.arange(0, 4))[None, None, :]) & 0xFF, (BR, KB))


@triton.jit
def _expand(wd, tlo, thi, BR: tl.constexpr, BK: tl.constexpr):
    KB: tl.constexpr = BK // 32
    lo, hi = _fp4_word_asm(wd, tlo, thi)
    j = tl.permute(tl.join(tl.reshape(lo, (BR, KB, 4)), tl.reshape(hi, (BR, KB, 4))), (0, 1, 3, 2))
    b = tl.join(tl.join(j.to(tl.int8), (j >> 8).to(tl.int8)), tl.join((j >> 16).to(tl.int8), (j >> 24).to(tl.int8)))
    b = tl.permute(b, (0, 1, 2, 3, 5, 4))
    return tl.reshape(b, (BR, BK)).to(tl.float8e4nv, bitcast=True)


@triton.jit
def _bcast(t, BR: tl.constexpr, BK: tl.constexpr):
    return tl.reshape(tl.broadcast_to(t[:, :, None], (BR, BK // 32, 4)), (BR, BK // 8))


@triton.jit
def _words(w_ptr, e64, rows, kt, N: tl.constexpr, K: tl.constexpr, BK: tl.constexpr):
    return tl.load(w_ptr + e64 * (N * K // 8) + rows[:, None] * (K // 8) + kt * (BK // 8)
                   + tl.arange(0, BK // 8)[None, :])


@triton.jit
def _probe4_kernel(w_ptr, d_ptr, x_ptr, idx_ptr, tab_ptr, out_ptr, E, TOK_PER_E,
                   N: tl.constexpr, K: tl.constexpr, BR: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                   CHUNK: tl.constexpr, MODE: tl.constexpr, WARPS: tl.constexpr):
    NUM_R: tl.constexpr = N // BR
    NK: tl.constexpr = K // BK
    C: tl.constexpr = CHUNK if CHUNK > 0 else NK
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
        if MODE == "prefetch":
            d_a = _load_d(d_ptr, e64, rows, 0, N, K, BR, BK)
            d_b = _load_d(d_ptr, e64, rows, 1, N, K, BR, BK)
        for kq in range(0, NK // C):
            part = tl.zeros((BR, BT), dtype=tl.float32)
            for kk in range(0, C):
                kt = kq * C + kk
                if MODE == "frag" or MODE == "fragimad":
                    vrows, vq = _frag_rows(rb * BR, BR, BK, WARPS, BR, 0)
                    w = _fp4_frag_e4m3(w_ptr, d_ptr, tab_ptr, e64 * (N * K // 2), e64 * (N * K // 32), vrows, vq,
                                       kt, K, BR, BK, WARPS, "imad" if MODE == "fragimad" else "f16")
                elif MODE == "e4m3":
                    w = tl.load(w_ptr.to(tl.pointer_type(tl.float8e4nv)) + e64 * (N * K) + rows[:, None] * K
                                + kt * BK + tl.arange(0, BK)[None, :])
                else:
                    wd = _words(w_ptr, e64, rows, kt, N, K, BK)
                    if MODE == "arith2":
                        tlo, thi = _tab_f16(_bcast(_load_d(d_ptr, e64, rows, kt, N, K, BR, BK), BR, BK))
                    elif MODE == "imad" or MODE == "imad2":
                        # normal-range tables only (d <= 11): two IMAD per table
                        if MODE == "imad":
                            dw = tl.load(d_ptr + e64 * (N * K // 128) + rows * (K // 128) + kt)
                            dd = (tl.broadcast_to(dw[:, None], (BR, BK // 8))
                                  >> (8 * (tl.arange(0, BK // 8) // 4))[None, :]) & 0xFF
                        else:
                            dd = _bcast(_load_d(d_ptr, e64, rows, kt, N, K, BR, BK), BR, BK)
                        dd = tl.minimum(dd, 11)
                        tlo = 0x6C686000 - dd * 0x08080800
                        thi = 0x7C787470 - dd * 0x08080808
                    elif MODE == "arith":
                        dw = tl.load(d_ptr + e64 * (N * K // 128) + rows * (K // 128) + kt)
                        dd = (tl.broadcast_to(dw[:, None], (BR, BK // 8))
                              >> (8 * (tl.arange(0, BK // 8) // 4))[None, :]) & 0xFF
                        tlo, thi = _tab_f16(dd)
                    else:
                        if MODE == "prefetch":
                            d = d_a
                            d_a = d_b
                            d_b = _load_d(d_ptr, e64, rows, tl.minimum(kt + 2, NK - 1), N, K, BR, BK)
                        else:
                            d = _load_d(d_ptr, e64, rows, kt, N, K, BR, BK)
                        tab = _bcast(tl.load(tab_ptr + d), BR, BK)
                        tlo = tab.to(tl.int32)
                        thi = (tab >> 32).to(tl.int32)
                    w = _expand(wd, tlo, thi, BR, BK)
                x = tl.load(x_ptr + trow[:, None] * K + kt * BK + tl.arange(0, BK)[None, :])
                part = tl.dot(w, tl.trans(x), part)
            acc += part
        tl.store(out_ptr + trow[None, :] * N + rows[:, None], acc)


def make(E, tok, N, K, dev, g, dmax, imad=False):
    T = E * tok
    x = (torch.randn(T, K, device=dev, generator=g) * 2).to(torch.float8_e4m3fn)
    idx = torch.randperm(T, device=dev, generator=g).to(torch.int32)
    words = torch.randint(-2 ** 31, 2 ** 31, (E, N, K // 8), device=dev, generator=g, dtype=torch.int64).to(torch.int32)
    d = torch.randint(0, dmax + 1, (E, N, K // 32), device=dev, generator=g, dtype=torch.uint8)
    if imad:
        d = d.clamp(max=11)
    tab = e2m1_table(dev)
    # float64 weight values: table[d][mag] with the code's sign (what every MODE decodes)
    codes = fragment_codes(words.view(torch.int8)).to(torch.int64)                   # [E, N, K]
    dk = d.to(torch.int64).repeat_interleave(32, dim=-1)
    byte = (tab[dk] >> (8 * (codes & 7))) & 0xFF
    byte = byte | ((codes & 8) << 4)
    w8 = byte.to(torch.uint8).view(torch.float8_e4m3fn)                              # [E, N, K]
    return x, idx, words, d, tab, w8


def _loop_counts(compiled, out_dir: str, name: str) -> str:
    """Instruction counts of every backward-branch loop (> 20 instructions) of a compiled kernel's
    SASS (Triton's bundled nvdisasm), where the decode's shared-memory round trip shows (STS, LDSM,
    BAR); the SASS is written to `out_dir`."""
    import collections
    import os
    import re
    import subprocess
    import tempfile
    nvd = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([nvd, "-c", f.name], capture_output=True, text=True).stdout
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".sass"), "w") as f:
        f.write(text)
    labels, ins = {}, []
    for ln in text.splitlines():
        m = re.match(r"\s*\.(L_x_\d+):", ln)
        if m:
            labels[m.group(1)] = len(ins)
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", ln)
        if m:
            ins.append(m.group(1))
    out = []
    for i, s in enumerate(ins):
        m = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", s)
        if m and labels.get(m.group(1), i + 1) <= i and i + 1 - labels[m.group(1)] > 20:
            body = ins[labels[m.group(1)]:i + 1]
            c = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", s).split()[0].split(".")[0] for s in body)
            out.append(f"[{len(body)}: " + " ".join(f"{k} {c[k]}" for k in ("STS", "LDSM", "LDS", "BAR", "QGMMA",
                                                                              "PRMT")) + "]")
    return " ".join(out)


def run(args):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    results = []
    for case in args.cases.split():
        E, tok = (int(v) for v in case.split("x"))
        N, K = args.n, args.k
        x, idx, words, d, tab, w8 = make(E, tok, N, K, dev, g, args.dmax, 'imad' in args.modes)
        T = E * tok
        out = torch.empty(T, N, device=dev, dtype=torch.float32)
        ne = min(E, 2)
        ref_out = torch.empty(ne * tok, N, dtype=torch.float64, device=dev)
        for e in range(ne):
            rows = idx[e * tok:(e + 1) * tok].long()
            ref_out[e * tok:(e + 1) * tok] = x.double()[rows] @ w8[e].double().T
        configs = [tuple(int(v) for v in c.split(",")) for c in args.configs.split()]
        for bk, mode, chunk, (br, bt, warps, stages, ctas) in itertools.product(
                [int(b) for b in args.bks.split()], args.modes.split(), [int(c) for c in args.chunks.split()],
                configs):
            if bk != 128 and mode in ("gather", "imad", "arith", "prefetch"):
                continue                   # one int32 of d per row and step: 128-K steps only
            if tok % bt or N % br:
                continue
            work = E * (tok // bt) * (N // br)
            grid = (min(work, sms * ctas),)
            # `words` are the library's fragment words ((c, g) order per 128-K chunk, what the
            # reference decodes); the older modes read them (g, c), d as int32 words.
            wdata, dptr = words, d
            if mode == "e4m3":
                wdata = w8.view(torch.int8)
            elif not mode.startswith("frag"):
                wdata = words.view(E, N, K // 128, 4, 4).transpose(-1, -2).contiguous()
                dptr = d.view(torch.int32)
            name = (f"{case} {mode} {'chain' if chunk == 0 else f'p{chunk}'} bk{bk} br{br} bt{bt} w{warps} "
                    f"s{stages} c{ctas}")

            def launch():
                return _probe4_kernel[grid](wdata, dptr, x, idx, tab, out, E, tok, N, K, br, bt, bk,
                                     chunk, mode, warps, num_warps=warps, num_stages=stages)
            try:
                out.zero_()
                launch()
                torch.cuda.synchronize()
            except Exception as exc:  # noqa: BLE001 - a config that does not compile is reported
                print(f"{name}: failed {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            if args.sass:
                print(f"{name}: loops {_loop_counts(launch(), args.sass, name)}", flush=True)
            got = torch.empty_like(ref_out)
            for e in range(ne):
                rows = idx[e * tok:(e + 1) * tok].long()
                got[e * tok:(e + 1) * tok] = out[rows].double()
            err = float(((got - ref_out).pow(2).mean() / ref_out.pow(2).mean()).sqrt())
            ts = []
            for i in range(args.iters + 3):
                s, t = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                for _ in range(5):
                    launch()
                t.record()
                t.synchronize()
                if i >= 3:
                    ts.append(s.elapsed_time(t) * 1e3 / 5)
            us = statistics.median(ts)
            wbytes = E * N * K * (1.0 if mode == "e4m3" else 0.5 + 1 / 32)
            print(f"{name}: {us:9.1f} us weights {wbytes / us / 1e3:6.0f} GB/s "
                  f"{2 * T * N * K / us / 1e6:7.1f} TF/s rel-rmse {err:.2e}", flush=True)
            results.append(dict(name=name, us=us, err=err))
        del x, words, w8
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--cases", default="8x16 64x16 16x256", help="experts x tokens per expert")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=7168)
    p.add_argument("--modes", default="e4m3 gather imad imad2 arith prefetch")
    p.add_argument("--chunks", default="0 1", help="0 chain, C > 0 promote every C K steps")
    p.add_argument("--configs", default="128,16,4,4,2 128,16,8,4,2 64,16,4,4,4",
                   help="space-separated br,bt,warps,stages,ctas_per_sm")
    p.add_argument("--dmax", type=int, default=14, help="largest offset index d drawn")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--bks", default="128", help="K steps (256: twice the bytes per pipeline stage)")
    p.add_argument("--sass", default="", help="a folder: write each kernel's SASS there, print its loops")
    p.add_argument("--out", default="")
    run(p.parse_args())
