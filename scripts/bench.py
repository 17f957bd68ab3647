"""The layer vs the PyTorch EP baseline vs the hardware floor, side by side in one run.

    torchrun --nproc-per-node=2 scripts/bench.py --preset dsv3 --out $OUT/bench
    torchrun --nproc-per-node=1 scripts/bench.py --preset dsv3 --tokens 1 128 --out $OUT/bench

Ours: `MegaMoEExperts(backend="nvshmem")`. Baseline, what a user assembles today: the torch
backend on GPUs (NCCL `all_to_all_single` dispatch and combine) with `torch._scaled_grouped_mm`
(FP8 rowwise weights) or `torch._grouped_mm` (BF16), `--baseline-weights`. Floors from ceilings
measured at start-up in the same run: HBM copy bandwidth, NVLink peer-write bandwidth into the
symmetric workspace, FP8 and BF16 matmul rates. Per shape the floor is the largest of
weight bytes touched / HBM, FLOPs / matmul rate and remote bytes / NVLink.

Timing: CUDA events around one layer call, L2 flushed before each, warm-up, all ranks lined up
by a barrier; per iteration the slowest rank's time; median and spread (p10-p90) of --iters.
Outputs: a markdown table on stdout, JSON (with the card name) and a log-log PNG under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

import mega_moe_layer as mml
from mega_moe_layer.stats import write_png

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


def build(cfg, rank, R, backend, **kw):
    m = mml.MegaMoEExperts(cfg, group=dist.group.WORLD, device=torch.device("cuda", rank),
                           backend=backend, **kw)
    El = cfg.num_experts // R
    g = torch.Generator(device="cuda").manual_seed(1234 + rank)
    H, I = cfg.hidden, cfg.intermediate
    w13 = torch.empty(El, 2 * I, H, device="cuda", dtype=torch.bfloat16)
    w2 = torch.empty(El, H, I, device="cuda", dtype=torch.bfloat16)
    for e in range(El):
        w13[e] = (torch.randn(2 * I, H, device="cuda", generator=g) * H ** -0.5).to(torch.bfloat16)
        w2[e] = (torch.randn(H, I, device="cuda", generator=g) * I ** -0.5).to(torch.bfloat16)
    m.load_weights(w13, w2)
    del w13, w2
    torch.cuda.empty_cache()
    return m


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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dsv3", choices=sorted(PRESETS))
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 128, 512, 2048, 4096])
    p.add_argument("--routing", nargs="+", default=["uniform", "skewed"])
    p.add_argument("--weight-format", default="mxfp4")
    p.add_argument("--act-format", default="fp8")
    p.add_argument("--combine-format", default="bf16")
    p.add_argument("--baseline-weights", default="fp8", choices=["fp8", "bf16"])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--graph", action=argparse.BooleanOptionalAction, default=True,
                   help="also time our forward captured in a CUDA graph (default on)")
    p.add_argument("--out", default="bench_out")
    args = p.parse_args()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    rank, R = dist.get_rank(), dist.get_world_size()
    os.makedirs(args.out, exist_ok=True)
    card = torch.cuda.get_device_name()
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")     # > L2 (50-60 MB)
    Tmax = max(args.tokens)
    base = PRESETS[args.preset]
    cfg = mml.MegaMoEConfig(**base, max_tokens_per_rank=Tmax, weight_format=args.weight_format,
                            act_format=args.act_format, combine_format=args.combine_format)
    from mega_moe_layer.comm import workspace as wsm
    wsm.reserve([cfg, NVLINK_CFG(R)], dist.group.WORLD)   # one shared workspace fits both
    ceil = measure_ceilings(rank, R, flush)
    log(f"# {card} x {R}: ceilings {json.dumps({k: (round(v, 1) if v else v) for k, v in ceil.items()})}")
    ours = build(cfg, rank, R, "nvshmem", validate=False)
    baseline = None
    if not args.no_baseline:
        bcfg = mml.MegaMoEConfig(**base, max_tokens_per_rank=Tmax, weight_format=args.baseline_weights,
                                 act_format="bf16" if args.baseline_weights == "bf16" else "fp8")
        baseline = build(bcfg, rank, R, "torch", torch_experts="grouped_mm", validate=False)
    rows = []
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
        rows.append(dict(routing=routing, tokens=T, ours=t_ours, ours_graph=t_graph, baseline=t_base,
                         floor=floor,
                         floors=floors, limit=max(floors, key=floors.get),
                         tflops=flops / tm / 1e12, hbm_GBps=wbytes / tm / 1e9,
                         nvlink_GBps=remote / tm / 1e9,
                         speedup=(t_base["median"] / tm) if t_base else None, frac_floor=floor / tm))
    progress(len(todo), len(todo), "done")
    if rank == 0:
        hdr = ("| routing | T/rank | ours eager us (p10-p90) | ours graph us | baseline us | speed-up | "
               "TFLOP/s | HBM GB/s | NVLink GB/s | floor us (limit) | floor/ours |")
        print(f"\n{card} x {R}, preset {args.preset}, weights {cfg.weight_format}, acts {cfg.act_format}, "
              f"combine {cfg.combine_format}; baseline: torch backend + NCCL, {args.baseline_weights} "
              f"grouped GEMMs\n")
        print(hdr)
        print("|---" * 11 + "|")
        for r in rows:
            o = r["ours"]
            b = f"{r['baseline']['median'] * 1e6:.1f}" if r["baseline"] else "-"
            sp = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
            gr = f"{r['ours_graph']['median'] * 1e6:.1f}" if r["ours_graph"] else "-"
            print(f"| {r['routing']} | {r['tokens']} | {o['median'] * 1e6:.1f} ({o['p10'] * 1e6:.1f}-"
                  f"{o['p90'] * 1e6:.1f}) | {gr} | {b} | {sp} | {r['tflops']:.1f} | {r['hbm_GBps']:.0f} | "
                  f"{r['nvlink_GBps']:.0f} | {r['floor'] * 1e6:.1f} ({r['limit']}) | {r['frac_floor']:.2f} |")
        res = dict(card=card, ranks=R, preset=args.preset, cfg=str(cfg), ceilings=ceil, rows=rows,
                   date=time.strftime("%Y-%m-%d"), baseline_weights=args.baseline_weights)
        tag = f"{args.preset}_ep{R}_{cfg.weight_format}_{cfg.act_format}_{cfg.combine_format}"
        with open(os.path.join(args.out, f"bench_{tag}.json"), "w") as f:
            json.dump(res, f, indent=1)
        for routing in args.routing:
            sel = [r for r in rows if r["routing"] == routing]
            series = {"ours": [(r["tokens"], min(r["ours"]["median"], (r["ours_graph"] or r["ours"])["median"]))
                               for r in sel],
                      "floor": [(r["tokens"], r["floor"]) for r in sel]}
            if baseline:
                series["baseline"] = [(r["tokens"], r["baseline"]["median"]) for r in sel]
            write_plot(os.path.join(args.out, f"bench_{tag}_{routing}.png"), series)
    wsm.destroy_all_workspaces()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
