"""The layer vs the PyTorch EP baseline vs the hardware floor, side by side in one run.

    torchrun --nproc-per-node=2 scripts/bench.py --preset dsv3 --out $OUT/bench
    torchrun --nproc-per-node=1 scripts/bench.py --preset dsv3 --tokens 1 128 --out $OUT/bench
    python scripts/bench.py --preset dsv3 --tokens 1 128 512 4096 --routing uniform \
        --anchor deepgemm --no-baseline --json $OUT/bench.json       # one GPU, no torchrun

Ours: `MegaMoEExperts(backend="nvshmem")`. Baseline, what a user assembles today: the torch
backend on GPUs (NCCL `all_to_all_single` dispatch and combine) with `torch._scaled_grouped_mm`
(FP8 rowwise weights) or `torch._grouped_mm` (BF16), `--baseline-weights`. Floors from ceilings
measured at start-up in the same run: HBM copy bandwidth, NVLink peer-write bandwidth into the
symmetric workspace, FP8 and BF16 matmul rates. Per shape the floor is the largest of
weight bytes touched / HBM, FLOPs / matmul rate and remote bytes / NVLink.

Timing: CUDA events around one layer call, L2 flushed before each, warm-up, all ranks lined up
by a barrier; per iteration the slowest rank's time; median and spread (p10-p90) of --iters.
Host time: perf_counter around one eager call of ours (validate=False; also validate=True with
--host-validate), GPU idle before it (synchronize + barrier), median of --host-iters (>= 30).
eager/graph is our eager GPU time over our graph time.

Anchor (`--anchor deepgemm`, scripts/deepgemm_anchor.py): DeepGEMM's SM90 fused mega MoE on the
same shapes, routing tensors, process group and bf16 expert weights, with FP8 (128x128 block)
and FP8 x FP4 (E2M1, UE8M0 per 32) weights, from bf16 x with its pre-dispatch in the timed call;
timed like ours, captured in a CUDA graph when that works (else eager; the table says which).
ours/DG uses our graph time. rel-RMSE of its output against ours is printed, never asserted.

Without torchrun (no RANK / WORLD_SIZE in the environment) it runs as one rank on GPU 0.
Outputs: a markdown table on stdout (one row per routing and T, printed last), JSON with every
number (--json, default under --out; rewritten after every row) and a log-log PNG under --out.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import mega_moe_layer as mml  # noqa: E402
from mega_moe_layer.stats import write_png  # noqa: E402

from deepgemm_anchor import (KINDS, AnchorUnavailable, DeepGEMMAnchor, import_deep_gemm,  # noqa: E402
                             ratio, rel_rmse)

PRESETS = {"dsv3": dict(hidden=7168, intermediate=2048, num_experts=256, topk=8),
           "v4flash": dict(hidden=4096, intermediate=2048, num_experts=256, topk=6)}


def NVLINK_CFG(R):
    """The config whose `recv_x` slot (bf16, 2 x 4096 x 7168 x R bytes) measures NVLink writes."""
    return mml.MegaMoEConfig(hidden=7168, intermediate=2048, num_experts=8 * R, topk=8,
                             max_tokens_per_rank=4096, act_format="bf16")


def log(msg):
    if dist.get_rank() == 0:
        print(msg, flush=True)


def progress(i, n, what):
    if dist.get_rank() == 0:
        done = int(30 * i / n)
        sys.stdout.write(f"\r[{'#' * done}{'.' * (30 - done)}] {i}/{n} {what:<40}")
        sys.stdout.flush()
        if i == n:
            sys.stdout.write("\n")


def cuda_time(fn, iters, flush=None, warmup=3):
    """Per-iteration times (s) of fn, slowest rank each iteration."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if flush is not None:
            flush.zero_()
        dist.barrier()
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    t = torch.tensor(times, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return sorted(t.tolist())


def capture(fn):
    """fn captured in a CUDA graph (warmed up on a side stream first, as torch requires)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    dist.barrier()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def stats(times):
    n = len(times)
    return dict(median=times[n // 2], p10=times[max(0, n // 10)], p90=times[min(n - 1, (9 * n) // 10)])


def measure_ceilings(rank, R, flush):
    """HBM copy (read+write), BF16 / FP8 matmul rates, NVLink peer write through nvshmem."""
    out = {}
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    t = stats(cuda_time(lambda: b.copy_(a), 10))["median"]
    out["hbm_GBps"] = 2 * a.numel() / t / 1e9
    del a, b
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = stats(cuda_time(lambda: x @ x, 10))["median"]
    out["bf16_TFLOPs"] = 2 * n ** 3 / t / 1e12
    xf = x.to(torch.float8_e4m3fn)
    sa = torch.ones(n, 1, device="cuda")
    sb = torch.ones(1, n, device="cuda")
    t = stats(cuda_time(lambda: torch._scaled_mm(xf, xf.t(), sa, sb, out_dtype=torch.bfloat16), 10))["median"]
    out["fp8_TFLOPs"] = 2 * n ** 3 / t / 1e12
    del x, xf
    out["nvlink_GBps"] = None
    if R > 1:
        from mega_moe_layer.comm import workspace as wsm
        ws = wsm.get_workspace(NVLINK_CFG(R), dist.group.WORLD, device=torch.device("cuda", rank))
        peer = ws.peer_view("recv_x", (rank + 1) % R)
        src = torch.randn_like(peer, dtype=torch.float32).to(peer.dtype)
        t = stats(cuda_time(lambda: peer.copy_(src), 10))["median"]
        out["nvlink_GBps"] = peer.numel() * peer.element_size() / t / 1e9
    return out


def weight_bytes_per_expert(cfg):
    per = {"mxfp4": 0.5 + 1 / 32, "fp8": 1 + 4 / 128 / 128, "bf16": 2}[cfg.weight_format]
    return 3 * cfg.hidden * cfg.intermediate * per


def model_costs(cfg, R, rank, all_idx):
    """Per-rank FLOPs, weight bytes touched, remote bytes (max over ranks taken by the caller)."""
    El = cfg.num_experts // R
    full = torch.cat(all_idx)
    mine = full[(full >= rank * El) & (full < (rank + 1) * El)]
    pairs = mine.numel()
    experts_touched = torch.unique(mine).numel()
    flops = pairs * 6 * cfg.hidden * cfg.intermediate
    wbytes = experts_touched * weight_bytes_per_expert(cfg)
    row = {"fp8": cfg.hidden * (1 + 1 / cfg.act_group_size), "fp4": cfg.hidden * (0.5 + 1 / cfg.act_group_size),
           "bf16": 2 * cfg.hidden}[cfg.act_format]
    back = cfg.hidden * (2 if cfg.combine_format == "bf16" else 1 + 1 / 128)
    remote = 0.0
    for s, idx in enumerate(all_idx):     # tokens of other ranks that hit my experts
        if s == rank:
            continue
        hit = ((idx >= rank * El) & (idx < (rank + 1) * El))
        remote += hit.any(dim=1).sum().item() * row + hit.sum().item() * back
    return flops, wbytes, remote


def make_inputs(cfg, R, T, seed, routing):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(R):
        x = torch.randn(T, cfg.hidden, generator=g).to(torch.bfloat16)
        if routing == "uniform":
            idx = torch.rand(T, cfg.num_experts, generator=g).argsort(dim=1)[:, :cfg.topk]
        else:  # skewed: a Zipf-like popularity, hot experts on rank 0
            pop = 1.0 / torch.arange(1, cfg.num_experts + 1).float() ** 1.2
            idx = torch.multinomial(pop.expand(T, -1), cfg.topk, replacement=False, generator=g) if T else \
                torch.empty(0, cfg.topk, dtype=torch.long)
        w = torch.rand(T, cfg.topk, generator=g) / cfg.topk
        out.append((x, idx.contiguous(), w.float()))
    return out


def make_weights(cfg, rank, R):
    """This rank's random bf16 experts: w13 [E_local, 2I, H], w2 [E_local, H, I] (std fan_in^-0.5),
    the same on every call with the same rank (ours, the baseline and the anchor share them)."""
    El = cfg.num_experts // R
    g = torch.Generator(device="cuda").manual_seed(1234 + rank)
    H, I = cfg.hidden, cfg.intermediate
    w13 = torch.empty(El, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    w2 = torch.empty(El, H, I, device="cuda", dtype=torch.bfloat16)
    for e in range(El):
        w13[e] = (torch.randn(2 * I, H, device="cuda", generator=g) * H ** -0.5).to(torch.bfloat16)
        w2[e] = (torch.randn(H, I, device="cuda", generator=g) * I ** -0.5).to(torch.bfloat16)
    return w13, w2


def build(cfg, rank, R, backend, weights, **kw):
    m = mml.MegaMoEExperts(cfg, group=dist.group.WORLD, device=torch.device("cuda", rank),
                           backend=backend, **kw)
    m.load_weights(*weights)
    torch.cuda.empty_cache()
    return m


def host_time(fn, iters):
    """Host seconds of one call of fn (perf_counter), the GPU idle and all ranks lined up before
    each; sorted, slowest rank each iteration."""
    fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    t = torch.tensor(times, dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return sorted(t.tolist())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_init_args(environ):
    """(local GPU index, init_process_group kwargs): torchrun's env:// when it set RANK and
    WORLD_SIZE, else one rank on GPU 0 over a local TCP rendezvous (plain `python bench.py`)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return int(environ.get("LOCAL_RANK", "0")), {}
    return 0, dict(init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)


def write_plot(path, series, width=640, height=420):
    """Log-log time vs tokens, one polyline per series (colors in the JSON/table legend)."""
    colors = {"ours": (200, 30, 30), "baseline": (30, 30, 200), "floor": (30, 150, 30)}
    xs = [x for s in series.values() for x, _ in s]
    ys = [y for s in series.values() for _, y in s if y > 0]
    if not xs or not ys:
        return
    lx0, lx1 = math.log10(min(xs)), math.log10(max(xs)) + 1e-9
    ly0, ly1 = math.log10(min(ys)) - 0.1, math.log10(max(ys)) + 0.1
    img = [[(255, 255, 255)] * width for _ in range(height)]
    m = 40

    def px(x, y):
        return (int(m + (math.log10(x) - lx0) / (lx1 - lx0) * (width - 2 * m)),
                int(height - m - (math.log10(y) - ly0) / (ly1 - ly0) * (height - 2 * m)))

    for i in range(m, width - m):
        img[height - m][i] = (0, 0, 0)
    for j in range(m, height - m):
        img[j][m] = (0, 0, 0)
    for name, pts in series.items():
        c = colors.get(name, (0, 0, 0))
        pts = [px(x, y) for x, y in sorted(pts) if y > 0]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            n = max(abs(x1 - x0), abs(y1 - y0), 1)
            for k in range(n + 1):
                x, y = round(x0 + (x1 - x0) * k / n), round(y0 + (y1 - y0) * k / n)
                for dx in (-1, 0, 1):
                    for dy in (-1, 0, 1):
                        if 0 <= y + dy < height and 0 <= x + dx < width:
                            img[y + dy][x + dx] = c
    write_png(path, img)


def fmt_us(t):
    """Seconds -> microseconds with one decimal, '-' when missing."""
    return "-" if t is None else f"{t * 1e6:.1f}"


def fmt_x(r, digits=2):
    return "-" if r is None else f"{r:.{digits}f}x"


def ours_best(row):
    """(seconds, which) of ours that ratios use: the graph time when measured, else eager."""
    if row.get("ours_graph"):
        return row["ours_graph"]["median"], "graph"
    return row["ours"]["median"], "eager"


def anchor_entry(t_stats, mode, rel, ours_t):
    """One anchor's JSON entry: its times (s), how it was timed, rel-RMSE vs ours, ours/anchor."""
    rel = rel if rel is not None and math.isfinite(rel) else None
    return dict(time=t_stats, mode=mode, rel_rmse_vs_ours=rel,
                ours_over_anchor=ratio(ours_t, t_stats["median"] if t_stats else None))


def format_table(rows, *, baseline=False, anchor=False, host_validate=False, nvlink=True):
    """The markdown table, one row per (routing, T). Columns that were not measured are left out."""
    cols = ["routing", "T/rank", "ours graph us", "ours eager us", "eager/graph", "host us"]
    if host_validate:
        cols.append("host us (validate)")
    if baseline:
        cols += ["baseline us", "speed-up"]
    if anchor:
        cols += ["DG fp8 us", "ours/DG fp8", "DG fp8xfp4 us", "ours/DG fp8xfp4", "DG timed as",
                 "rel-RMSE vs DG fp8 / fp8xfp4"]
    cols += ["TFLOP/s", "HBM GB/s"] + (["NVLink GB/s"] if nvlink else []) + ["floor us (limit)", "floor/ours"]
    out = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for r in rows:
        g = r.get("ours_graph")
        h = r.get("host") or {}
        cells = [r["routing"], str(r["tokens"]), fmt_us(g["median"] if g else None), fmt_us(r["ours"]["median"]),
                 fmt_x(r.get("eager_over_graph")),
                 fmt_us(h["validate_false"]["median"] if h.get("validate_false") else None)]
        if host_validate:
            cells.append(fmt_us(h["validate_true"]["median"] if h.get("validate_true") else None))
        if baseline:
            cells += [fmt_us(r["baseline"]["median"] if r.get("baseline") else None), fmt_x(r.get("speedup"))]
        if anchor:
            a = r.get("anchor") or {}
            modes, rels = [], []
            for kind in KINDS:
                e = a.get(kind)
                t = e["time"]["median"] if e and e.get("time") else None
                cells += [fmt_us(t), fmt_x(e["ours_over_anchor"] if e else None)]
                modes.append(e["mode"] if e else "-")
                rel = e.get("rel_rmse_vs_ours") if e else None
                rels.append("-" if rel is None or not math.isfinite(rel) else f"{rel:.3f}")
            cells += [modes[0] if len(set(modes)) == 1 else " / ".join(modes), " / ".join(rels)]
        cells += [f"{r['tflops']:.1f}", f"{r['hbm_GBps']:.0f}"] + ([f"{r['nvlink_GBps']:.0f}"] if nvlink else [])
        cells += [f"{r['floor'] * 1e6:.1f} ({r['limit']})", f"{r['frac_floor']:.2f}"]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dsv3", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048, 4096])
    p.add_argument("--routing", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    p.add_argument("--weight-format", default="mxfp4")
    p.add_argument("--act-format", default="fp8")
    p.add_argument("--combine-format", default="bf16")
    p.add_argument("--baseline-weights", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--fp8-mainloop", dest="fp8_mainloop", action="store_const", const=True, default=None,
                   help="our layer with MegaMoEConfig(hopper_fp8_mainloop=True): the streamed FP8 mainloop "
                        "(default: the config's auto choice)")
    p.add_argument("--bf16-mainloop", dest="fp8_mainloop", action="store_const", const=False,
                   help="our layer with hopper_fp8_mainloop=False (the bf16 mainloop)")
    p.add_argument("--fp4-as-fp8", action="store_true",
                   help="MXFP4 weights: hopper_fp4_as_fp8=True (expanded to E4M3 at load; the FP8 mainloop by default)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-baseline", action="store_true",
                   help="skip the PyTorch EP baseline (NCCL all-to-all + grouped GEMMs; slow)")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our forward captured in a CUDA graph (default on)")
    p.add_argument("--anchor", choices=["none", "deepgemm"], default="none",
                   help="deepgemm: also time DeepGEMM's SM90 fused mega MoE (FP8 and FP8 x FP4 "
                        "weights) on the same inputs; needs `import deep_gemm` to work")
    p.add_argument("--anchor-graph", action=argparse.BooleanOptionalAction, default=True,
                   help="try to capture the anchor in a CUDA graph (falls back to eager; default on)")
    p.add_argument("--host-iters", type=int, default=30, help="eager calls timed on the host (>= 30)")
    p.add_argument("--host-validate", action="store_true",
                   help="also time the host side of an eager call with validate=True")
    p.add_argument("--out", default="bench_out", help="folder of the PNGs (and the JSON without --json)")
    p.add_argument("--json", default=None, help="path of the JSON (default: under --out)")
    p.add_argument("--no-stage-rebase", action="store_true",
                   help="rebase FP8 x in a pass after the dispatch (`nvshmem_backend.STAGE_REBASE` = False)")
    p.add_argument("--no-pdl", action="store_true",
                   help="GPU layer: launch kernels 2-8 without programmatic dependent launch "
                        "(`nvshmem_backend.USE_PDL`), to measure what it gains")
    p.add_argument("--no-over", action="store_true",
                   help="GPU layer: no rows past block_m in an expert's last full tile "
                        "(`nvshmem_backend.USE_OVER` = False), to measure what they gain")
    p.add_argument("--gluon-l1", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="GPU layer: L1's launches on the warp-specialised Gluon kernel (`kernels.l1_gluon.ENABLED`): "
                        "auto (default) at the tile heights where it measured faster, on (the bare flag) at "
                        "every height it covers, off never")
    p.add_argument("--gluon-l2", nargs="?", const="on", default="auto", choices=("auto", "on", "off"),
                   help="GPU layer: L2's launches (bf16 combine) on the warp-specialised Gluon kernel "
                        "(`kernels.l2_gluon.ENABLED`): auto / on / off as --gluon-l1")
    p.add_argument("--pair-x", action="store_true",
                   help="GPU layer: copy the rebased x into pair order for L1's 128-row tiles on the Gluon kernel "
                        "(`nvshmem_backend.PAIR_ORDER_X`: one TMA box per tile instead of a row gather), to measure it")
    p.add_argument("--decode-ahead", dest="decode_ahead", action="store_true", default=None,
                   help="GPU layer: the Gluon L1 and L2 decode every odd K step's 4-bit words while the even step's "
                        "MMAs run (`kernels.l1_gluon.DECODE_AHEAD`, `l2_gluon.DECODE_AHEAD`; the same sums; the "
                        "default)")
    p.add_argument("--no-decode-ahead", dest="decode_ahead", action="store_false",
                   help="GPU layer: the Gluon kernels' plain loop (decode, then the MMAs), to measure what decoding "
                        "ahead gains")
    p.add_argument("--l1-prefill-promote", type=int, default=1, choices=(1, 2),
                   help="GPU layer: with --decode-ahead, the Gluon L1's 4-bit prefill tiles promote every this many "
                        "128-K steps (`kernels.l1_gluon.PREFILL_PROMOTE_K`; 2: 256 K a partial sum, other sums than "
                        "the Triton kernel's), to measure it")
    p.add_argument("--lane-k", action="store_true",
                   help="GPU layer: MXFP4 weights in the \"lane\" K order (`kernels.gemm_operands.LANE_K_ORDER`: one "
                        "E2M1 table per row and K step instead of one per 8 weights; x and h written in that order "
                        "where they are rebased), to measure it")
    p.add_argument("--decode-gather-warps", type=int, default=4, choices=(1, 4),
                   help="GPU layer: warps of the Gluon L1's token-row gather at the 16- / 32-row decode tiles "
                        "(`kernels.l1_gluon.DECODE_GATHER_WARPS`; with --gluon-l1 on for MXFP4 weights), to measure 1")
    p.add_argument("--epilogue-hw-cvt", dest="epilogue_hw_cvt", action="store_true", default=None,
                   help="GPU layer: the GEMM epilogues round bf16 and E4M3 with the GPU's conversions instead of "
                        "the integer encoders (`kernels.l1_gemm.EPILOGUE_HW_CVT`; the same bytes; the default)")
    p.add_argument("--no-epilogue-hw-cvt", dest="epilogue_hw_cvt", action="store_false",
                   help="GPU layer: the epilogues' integer encoders, to measure what the conversions gain")
    p.add_argument("--over-m", type=int, default=None, choices=(16, 32),
                   help="GPU layer: rows past block_m of this height only (`gemm_heuristics.OVER_MS`), at the "
                        "cost of 16 rows' (`OVER_COST`), to measure a height the plan does not choose")
    p.add_argument("--single-height", action="store_true",
                   help="GPU layer: one tile height per call (no tail tiles; `gemm_api.tile_plan_for` "
                        "replaced by its single-height choice), to measure what the two-height plans gain")
    p.add_argument("--heuristic", action="append", default=[], metavar="NAME=VALUE",
                   help="GPU layer: set `gemm_heuristics.NAME` (an existing constant) to the Python literal "
                        "VALUE for this run, e.g. FP4_STREAM_DECODE_M32='(4, 3, 4, True)' (repeatable), "
                        "to measure a tile config the defaults do not use")
    args = p.parse_args(argv)
    from mega_moe_layer.kernels import gemm_heuristics
    args.heuristic_values = {}
    for item in args.heuristic:
        name, sep, value = item.partition("=")
        if not sep or not name.isupper() or not hasattr(gemm_heuristics, name):
            p.error(f"--heuristic: expected NAME=VALUE with NAME a gemm_heuristics constant, got {item!r}")
        try:
            args.heuristic_values[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            p.error(f"--heuristic: {name}: VALUE must be a Python literal, got {value!r}")
    if args.host_iters < 30:
        p.error("--host-iters must be >= 30")
    if args.l1_prefill_promote != 1 and args.decode_ahead is False:
        p.error("--l1-prefill-promote 2: only the Gluon L1's decode-ahead loop takes it (drop --no-decode-ahead)")
    if min(args.tokens) < 0:
        p.error("--tokens must be >= 0")
    return args


def init_dist():
    """Process group (NCCL) of this run; returns the local GPU index."""
    local, kw = dist_init_args(os.environ)
    if "init_method" in kw:
        kw["init_method"] = kw["init_method"].format(port=_free_port())
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local), **kw)
    return local


def time_maybe_graph(fn, iters, flush, try_graph, out=None, ref=None):
    """(sorted times, "graph" | "eager"): fn captured in a CUDA graph if it captures and, when `out`
    (what fn writes) and `ref` (its eager result) are given, one replay reproduces `ref`; else eager."""
    if try_graph:
        try:
            g = capture(fn)
        except Exception as e:   # NOTE: a capture failure is the same on every rank (same host code)
            torch.cuda.synchronize()
            log(f"# anchor: CUDA-graph capture failed ({type(e).__name__}: {str(e)[:200]}); timing eager")
        else:
            bad = torch.zeros(1, device="cuda")
            if out is not None and ref is not None:
                out.fill_(float("nan"))
                g.replay()
                torch.cuda.synchronize()
                err = rel_rmse(out, ref)
                bad.fill_(0.0 if err <= 1e-3 else 1.0)   # nan (unwritten rows) counts as bad too
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            if bad.item() == 0:
                t = cuda_time(g.replay, iters, flush)
                del g
                return t, "graph"
            del g
            log("# anchor: graph replay did not reproduce the eager output; timing eager")
    return cuda_time(fn, iters, flush), "eager"


def main(argv=None):
    args = parse_args(argv)
    if args.single_height:
        from mega_moe_layer.kernels import gemm_api
        gemm_api.tile_plan_for = lambda T, K, E, R, over=False: gemm_api.TilePlan.single(
            gemm_api.block_m_for(T, K, E, R))
    if args.no_stage_rebase:
        from mega_moe_layer import nvshmem_backend
        nvshmem_backend.STAGE_REBASE = False
    if args.no_pdl:
        from mega_moe_layer import nvshmem_backend
        nvshmem_backend.USE_PDL = False
    if args.over_m is not None:
        from mega_moe_layer.kernels import gemm_heuristics
        gemm_heuristics.OVER_COST = {args.over_m: gemm_heuristics.OVER_COST[16]}
        gemm_heuristics.OVER_MS = (args.over_m,)
    if args.no_over:
        from mega_moe_layer import nvshmem_backend
        nvshmem_backend.USE_OVER = False
    if args.pair_x:
        from mega_moe_layer import nvshmem_backend
        nvshmem_backend.PAIR_ORDER_X = True
    from mega_moe_layer.kernels import gemm_operands, l1_gluon, l2_gluon
    gemm_operands.LANE_K_ORDER = args.lane_k
    l1_gluon.DECODE_GATHER_WARPS = args.decode_gather_warps
    from mega_moe_layer.kernels import l1_gemm
    if args.epilogue_hw_cvt is not None:
        l1_gemm.EPILOGUE_HW_CVT = args.epilogue_hw_cvt
    if args.decode_ahead is not None:
        l1_gluon.DECODE_AHEAD = l2_gluon.DECODE_AHEAD = args.decode_ahead
    l1_gluon.PREFILL_PROMOTE_K = l1_gluon.BLOCK_K * args.l1_prefill_promote
    for flag, mod in (("--gluon-l1", l1_gluon), ("--gluon-l2", l2_gluon)):
        value = getattr(args, flag[2:].replace("-", "_"))
        if value == "on" and not l1_gluon.HAVE_GLUON:
            p.error(f"{flag}: this Triton has no Gluon Hopper ops")
        mod.ENABLED = {"auto": None, "on": True, "off": False}[value]
    local = init_dist()
    from mega_moe_layer.kernels import gemm_heuristics
    for name, value in args.heuristic_values.items():
        log(f"# gemm_heuristics.{name} = {value!r} (was {getattr(gemm_heuristics, name)!r})")
        setattr(gemm_heuristics, name, value)
    rank, R = dist.get_rank(), dist.get_world_size()
    dg = None
    if args.anchor == "deepgemm":   # fail before anything slow is built
        try:
            dg = import_deep_gemm()
        except AnchorUnavailable as e:
            print(f"rank {rank}: {e}", file=sys.stderr, flush=True)
            dist.destroy_process_group()
            sys.exit(2)
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")     # > L2 (50-60 MB)
    Tmax = max(args.tokens)
    base = PRESETS[args.preset]
    cfg = mml.MegaMoEConfig(**base, max_tokens_per_rank=Tmax, weight_format=args.weight_format,
                            act_format=args.act_format, combine_format=args.combine_format,
                            hopper_fp8_mainloop=args.fp8_mainloop, hopper_fp4_as_fp8=args.fp4_as_fp8)
    from mega_moe_layer.comm import workspace as wsm
    wsm.reserve([cfg, NVLINK_CFG(R)], dist.group.WORLD)   # one shared workspace fits both
    ceil = measure_ceilings(rank, R, flush)
    log(f"# {card} x {R}: ceilings {json.dumps({k: (round(v, 1) if v else v) for k, v in ceil.items()})}")
    weights = make_weights(cfg, rank, R)
    ours = build(cfg, rank, R, "nvshmem", weights, validate=False)
    baseline = None
    if not args.no_baseline:
        bcfg = mml.MegaMoEConfig(**base, max_tokens_per_rank=Tmax, weight_format=args.baseline_weights,
                                 act_format="bf16" if args.baseline_weights == "bf16" else "fp8")
        baseline = build(bcfg, rank, R, "torch", weights, torch_experts="grouped_mm", validate=False)
    anchor = None
    if dg is not None:
        log("# anchor: quantising the same bf16 experts into DeepGEMM's FP8 and FP8 x FP4 formats")
        anchor = DeepGEMMAnchor(dg, dist.group.WORLD, cfg, weights[0], weights[1], Tmax)
    del weights
    torch.cuda.empty_cache()
    tag = f"{args.preset}_ep{R}_{cfg.weight_format}_{cfg.act_format}_{cfg.combine_format}"
    json_path = args.json or os.path.join(args.out, f"bench_{tag}.json")
    res = dict(card=card, ranks=R, preset=args.preset, cfg=str(cfg), ceilings=ceil, rows=[],
               date=time.strftime("%Y-%m-%d"), baseline_weights=None if args.no_baseline else args.baseline_weights,
               anchor=args.anchor, iters=args.iters, host_iters=args.host_iters,
               argv=sys.argv[1:] if argv is None else list(argv))
    rows = res["rows"]
    todo = [(r, T) for r in args.routing for T in args.tokens]
    for i, (routing, T) in enumerate(todo):
        progress(i, len(todo), f"{routing} T={T}")
        all_inp = make_inputs(cfg, R, T, seed=T, routing=routing)
        x, idx, w = (t.cuda() for t in all_inp[rank])
        t_ours = stats(cuda_time(lambda: ours(x, idx, w), args.iters, flush))
        t_graph = None
        if args.graph:   # what an inference engine runs at decode: the forward replayed as a graph
            graph = capture(lambda: ours(x, idx, w))
            t_graph = stats(cuda_time(graph.replay, args.iters, flush))
            del graph
        host = dict(validate_false=stats(host_time(lambda: ours(x, idx, w), args.host_iters)), validate_true=None)
        if args.host_validate:
            ours.validate = True
            try:
                host["validate_true"] = stats(host_time(lambda: ours(x, idx, w), args.host_iters))
            finally:
                ours.validate = False
        t_base = stats(cuda_time(lambda: baseline(x, idx, w), args.iters, flush)) if baseline else None
        flops, wbytes, remote = model_costs(cfg, R, rank, [a[1] for a in all_inp])
        cost = torch.tensor([flops, wbytes, remote], dtype=torch.float64, device="cuda")
        dist.all_reduce(cost, op=dist.ReduceOp.MAX)
        flops, wbytes, remote = cost.tolist()
        rate = ceil["fp8_TFLOPs"] if cfg.act_format != "bf16" else ceil["bf16_TFLOPs"]
        floors = dict(hbm=wbytes / (ceil["hbm_GBps"] * 1e9), mma=flops / (rate * 1e12),
                      nvlink=remote / (ceil["nvlink_GBps"] * 1e9) if ceil["nvlink_GBps"] else 0.0)
        floor = max(floors.values())
        tm = min(t_ours["median"], t_graph["median"]) if t_graph else t_ours["median"]
        row = dict(routing=routing, tokens=T, ours=t_ours, ours_graph=t_graph, baseline=t_base,
                   floor=floor,
                   floors=floors, limit=max(floors, key=floors.get),
                   tflops=flops / tm / 1e12, hbm_GBps=wbytes / tm / 1e9,
                   nvlink_GBps=remote / tm / 1e9,
                   speedup=(t_base["median"] / tm) if t_base else None, frac_floor=floor / tm,
                   host=host, eager_over_graph=ratio(t_ours["median"], t_graph["median"] if t_graph else None))
        if anchor is not None:
            ours_t, ours_which = ours_best(row)
            row["anchor"] = dict(ours_time_used=ours_which)
            if T == 0:
                row["anchor"].update({k: None for k in KINDS})
            else:
                y_ours = ours(x, idx, w).clone()
                for kind in KINDS:
                    y = torch.empty(T, cfg.hidden, dtype=torch.bfloat16, device="cuda")
                    call = anchor.make_call(kind, x, idx, w, y)
                    call()                      # JIT-compiles on first use of a shape
                    torch.cuda.synchronize()
                    y_eager = y.clone()
                    rel = torch.tensor([rel_rmse(y_eager, y_ours)], dtype=torch.float64, device="cuda")
                    dist.all_reduce(rel, op=dist.ReduceOp.MAX)
                    t_dg, mode = time_maybe_graph(call, args.iters, flush, args.anchor_graph, y, y_eager)
                    row["anchor"][kind] = anchor_entry(stats(t_dg), mode, rel.item(), ours_t)
                    del call, y, y_eager
                del y_ours
        rows.append(row)
        if rank == 0:   # after every row, so a crash later keeps what was measured
            with open(json_path, "w") as f:
                json.dump(res, f, indent=1)
    progress(len(todo), len(todo), "done")
    if anchor is not None:
        anchor.destroy()
    if rank == 0:
        for routing in args.routing:
            sel = [r for r in rows if r["routing"] == routing]
            series = {"ours": [(r["tokens"], min(r["ours"]["median"], (r["ours_graph"] or r["ours"])["median"]))
                               for r in sel],
                      "floor": [(r["tokens"], r["floor"]) for r in sel]}
            if baseline:
                series["baseline"] = [(r["tokens"], r["baseline"]["median"]) for r in sel]
            write_plot(os.path.join(args.out, f"bench_{tag}_{routing}.png"), series)
        with open(json_path, "w") as f:
            json.dump(res, f, indent=1)
        print(f"\n{card} x {R}, preset {args.preset}, weights {cfg.weight_format}, acts {cfg.act_format}, "
              f"combine {cfg.combine_format}; JSON {json_path}")
        if baseline:
            print(f"baseline: torch backend + NCCL, {args.baseline_weights} grouped GEMMs")
        if anchor is not None:
            print("DG: DeepGEMM SM90 fused mega MoE from bf16 x incl. its pre-dispatch, same routing and "
                  "experts; fp8 = FP8 weights 128x128 blocks, fp8xfp4 = E2M1 weights UE8M0/32; "
                  "ours/DG uses our graph time (>1: ours slower)")
        print("host us: perf_counter around one eager call, GPU idle before; eager/graph: our GPU times\n")
        print(format_table(rows, baseline=baseline is not None, anchor=anchor is not None,
                           host_validate=args.host_validate, nvlink=R > 1), flush=True)
    wsm.destroy_all_workspaces()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
