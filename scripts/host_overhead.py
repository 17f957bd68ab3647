"""Host time of one eager `MegaMoEExperts` forward (GPU idle before each call) and its launches.

    python scripts/host_overhead.py                # dsv3 shape on one GPU (nvshmem backend)
    python scripts/host_overhead.py --small        # a small shape (quick check)
    python scripts/host_overhead.py --breakdown    # + where the host time of one call goes

Prints, for validate False / True and T = 1, 128, 4096: the median over 200 calls of
perf_counter() around the call (after torch.cuda.synchronize()), the GPU time of the same call
replayed in a CUDA graph, and the kernel launches of one forward (torch.profiler).
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import mega_moe_layer as mml  # noqa: E402
from utils import make_inputs, make_weights  # noqa: E402

LAUNCH_NAMES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC",
                "cudaMemsetAsync", "cudaMemcpyAsync", "cudaGraphLaunch", "cuGraphLaunch")


def _host_us(fn, n=200):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(out)


def _graph_us(m, x, idx, w, n=20):
    m.validate = False
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        m(x, idx, w)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        m(x, idx, w)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / n


def _launches(m, x, idx, w):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        m(x, idx, w)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.name in LAUNCH_NAMES)


def _breakdown(m, x, idx, w, n=100, profile=True):
    """Host time of one eager call split into its launches (each `Launcher.__call__` timed) and
    the rest (Python around them), medians over n calls; then cProfile's top functions."""
    import cProfile
    import pstats
    from mega_moe_layer.kernels import _launch
    per = {}
    orig = _launch.Launcher.__call__

    plain = {}

    def timed(self):
        p0 = self.num_plain
        t0 = time.perf_counter()
        orig(self)
        name = getattr(self.kernel, "__name__", str(self.kernel))
        per.setdefault(name, []).append((time.perf_counter() - t0) * 1e6)
        plain[name] = plain.get(name, 0) + self.num_plain - p0
    _launch.Launcher.__call__ = timed
    g_orig = torch.cuda.CUDAGraph.replay

    def g_timed(self):
        t0 = time.perf_counter()
        g_orig(self)
        per.setdefault("(graph of kernels 2-8)", []).append((time.perf_counter() - t0) * 1e6)
    torch.cuda.CUDAGraph.replay = g_timed
    try:
        for _ in range(3):
            m(x, idx, w)
        per.clear()
        plain.clear()
        total = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            m(x, idx, w)
            total.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    finally:
        _launch.Launcher.__call__ = orig
        torch.cuda.CUDAGraph.replay = g_orig
    tot = statistics.median(total)
    launches = 0.0
    for name, v in sorted(per.items()):
        k = len(v) // n
        med = statistics.median(v) * k
        launches += med
        print(f"  launch {name:32s} x{k}: {med:7.1f} us  (plain path {plain.get(name, 0)} of {len(v)})")
    print(f"  all launches {launches:.1f} us of {tot:.1f} us per call; the rest {tot - launches:.1f} us")
    if not profile:
        return
    pr = cProfile.Profile()
    torch.cuda.synchronize()
    pr.enable()
    for _ in range(n):
        m(x, idx, w)
    pr.disable()
    torch.cuda.synchronize()
    pstats.Stats(pr).sort_stats("tottime").print_stats(25)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true")
    p.add_argument("--tokens", type=int, nargs="*", default=[1, 128, 4096])
    p.add_argument("--breakdown", action="store_true",
                   help="also split the host time of one call (T = the first --tokens) into launches")
    args = p.parse_args()
    torch.cuda.set_device(0)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    if args.small:
        cfg = mml.MegaMoEConfig(hidden=1024, intermediate=512, num_experts=8, topk=4, max_tokens_per_rank=4096)
    else:
        cfg = mml.MegaMoEConfig(hidden=7168, intermediate=2048, num_experts=256, topk=8,
                                max_tokens_per_rank=4096, weight_format="mxfp4", act_format="fp8",
                                combine_format="bf16")
    m = mml.MegaMoEExperts(cfg, backend="nvshmem")
    m.load_weights(*(t.cuda() for t in make_weights(cfg)))
    print(f"shape H={cfg.hidden} I={cfg.intermediate} E={cfg.num_experts} K={cfg.topk} "
          f"{cfg.weight_format}/{cfg.act_format}/{cfg.combine_format}, T_max {cfg.max_tokens_per_rank}")
    print("| T | validate | host us / eager call | host us, kernels 2-8 launched directly | GPU us (graph) "
          "| eager / graph | host launch calls |")
    print("|---|---|---|---|---|---|---|")
    gpu = m._gpu
    for T in args.tokens:
        x, idx, w = (t.cuda() for t in make_inputs(cfg, T, seed=T))
        gus = _graph_us(m, x, idx, w)
        for v in (False, True):
            m.validate = v
            hus = {}
            for use_graphs in (False, True):
                gpu.use_graphs = use_graphs
                for _ in range(3):
                    m(x, idx, w)
                hus[use_graphs] = _host_us(lambda: m(x, idx, w))
            n = _launches(m, x, idx, w)
            # eager wall time per call, back to back (what a user sees)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                m(x, idx, w)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) * 1e6 / 20
            print(f"| {T} | {v} | {hus[True]:.1f} | {hus[False]:.1f} | {gus:.1f} | {wall / gus:.2f} | {n} |")
    if args.breakdown:
        for T in args.tokens:
            for v in (False, True):
                m.validate = v
                x, idx, w = (t.cuda() for t in make_inputs(cfg, T, seed=1))
                print(f"breakdown T={T} validate={v}:")
                _breakdown(m, x, idx, w, profile=T == args.tokens[0] and not v)
    m.check_errors()
    from mega_moe_layer.comm import workspace as wsm
    wsm.destroy_all_workspaces()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
