"""The demo: `python -m mega_moe_layer [--ranks N] [--iters K] ...`.

Spawns N CPU ranks (gloo) and runs a small DeepSeek-style MoE layer (sigmoid group-limited router
with a correction bias, routed experts sharded over the ranks, a shared expert) with the last rank
idle (T = 0). Prints the routed output's max and RMS error against a float64 dense MoE computed
independently (`reference.dense_moe_float64` on the unquantised weights), the bound those formats
allow, the expert-load table, and the time per forward.
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .config import MegaMoEConfig
from .kernels import reference as ref
from .layer import MegaMoE
from .stats import format_table


def _progress(i: int, n: int, width: int = 30) -> None:
    done = int(width * i / n)
    sys.stdout.write(f"\r  [{'#' * done}{'.' * (width - done)}] {i}/{n}")
    if i == n:
        sys.stdout.write("\n")
    sys.stdout.flush()


def _rank_main(rank: int, args, port: int, queue) -> None:
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // args.ranks))
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=args.ranks)
        cfg = MegaMoEConfig(hidden=args.hidden, intermediate=args.intermediate,
                            num_experts=args.experts, topk=args.topk, max_tokens_per_rank=args.tokens,
                            weight_format=args.weight_format, act_format=args.act_format,
                            combine_format=args.combine_format)
        g = torch.Generator().manual_seed(0)   # every rank builds the same model
        router_kwargs = dict(scoring="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5,
                             use_correction_bias=True)
        moe = MegaMoE(cfg, device="cpu", backend="torch", router_kwargs=router_kwargs,
                      shared_intermediate=args.intermediate)
        with torch.no_grad():
            moe.router.weight.copy_(torch.randn(cfg.num_experts, cfg.hidden, generator=g) * cfg.hidden ** -0.5)
            moe.router.e_score_correction_bias.copy_(torch.randn(cfg.num_experts, generator=g) * 0.1)
        E, I, H = cfg.num_experts, cfg.intermediate, cfg.hidden
        w13 = (torch.randn(E, 2 * I, H, generator=g) * H ** -0.5).to(torch.bfloat16)
        w2 = (torch.randn(E, H, I, generator=g) * I ** -0.5).to(torch.bfloat16)
        moe.experts.load_weights(w13, w2)
        idle = rank == args.ranks - 1 and args.ranks > 1
        T = 0 if idle else args.tokens
        x = (torch.randn(T, H, generator=torch.Generator().manual_seed(100 + rank))).to(torch.bfloat16)
        times = []
        with torch.no_grad():
            for it in range(args.iters):
                dist.barrier()
                t0 = time.perf_counter()
                topk_idx, topk_weights = moe.router(x)
                y_routed = moe.experts(x, topk_idx, topk_weights)
                y = y_routed + moe.shared_experts(x)
                times.append(time.perf_counter() - t0)
                if rank == 0 and args.iters > 1:
                    _progress(it + 1, args.iters)
            y64 = ref.dense_moe_float64(x, topk_idx, topk_weights, w13, w2)
        err = (y_routed.double() - y64)
        stats = moe.experts.global_expert_counts(cumulative=True)
        queue.put((rank, dict(T=T, sq=float((err ** 2).sum()), ref_sq=float((y64 ** 2).sum()),
                              n=err.numel(), maxabs=float(err.abs().max()) if err.numel() else 0.0,
                              refmax=float(y64.abs().max()) if y64.numel() else 0.0,
                              finite=bool(torch.isfinite(y).all()),
                              times=times, stats=stats.tolist())))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as exc:  # report instead of hanging the parent
        import traceback
        queue.put((rank, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mega_moe_layer",
        description="Run a small DeepSeek-style MoE layer on N CPU ranks (gloo), one of them idle, "
                    "and check it against a float64 MoE.")
    p.add_argument("--ranks", type=int, default=2, help="number of CPU ranks to spawn (default 2)")
    p.add_argument("--iters", type=int, default=3, help="forward calls to time (default 3)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per busy rank (default 64)")
    p.add_argument("--hidden", type=int, default=512, help="H (default 512)")
    p.add_argument("--intermediate", type=int, default=256, help="I (default 256)")
    p.add_argument("--experts", type=int, default=16, help="E, divisible by --ranks and by 4 (default 16)")
    p.add_argument("--topk", type=int, default=4, help="K (default 4)")
    p.add_argument("--weight-format", default="mxfp4", choices=["mxfp4", "fp8", "bf16"])
    p.add_argument("--act-format", default="fp8", choices=["fp8", "fp4", "bf16"])
    p.add_argument("--combine-format", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--timeout", type=float, default=600, help="seconds before the demo gives up")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.ranks < 1 or args.experts % args.ranks or args.experts % 4:
        print("error: --experts must be divisible by --ranks and by 4 (n_group=4)", file=sys.stderr)
        return 2
    print(f"mega_moe_layer demo: {args.ranks} CPU ranks (gloo), rank {args.ranks - 1} idle"
          if args.ranks > 1 else "mega_moe_layer demo: 1 CPU rank")
    print(f"  H={args.hidden} I={args.intermediate} E={args.experts} K={args.topk} "
          f"T={args.tokens}/rank, weights {args.weight_format}, acts {args.act_format}, "
          f"combine {args.combine_format}")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, args, port, queue), daemon=True)
             for r in range(args.ranks)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in range(args.ranks):
            rank, res = queue.get(timeout=args.timeout)
            if isinstance(res, str):
                print(f"rank {rank} failed: {res}", file=sys.stderr)
                return 1
            results[rank] = res
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    sq = sum(r["sq"] for r in results.values())
    ref_sq = sum(r["ref_sq"] for r in results.values())
    n = sum(r["n"] for r in results.values())
    rel_rmse = (sq / ref_sq) ** 0.5 if ref_sq else 0.0
    bound = ref.quantisation_error_bound(args.weight_format, args.act_format, args.combine_format)
    maxabs = max(r["maxabs"] for r in results.values())
    refmax = max(r["refmax"] for r in results.values())
    ok = rel_rmse <= bound and all(r["finite"] for r in results.values())
    print(f"error of the routed output vs the float64 MoE ({n} values):")
    print(f"  max abs {maxabs:.4e} (max |y64| {refmax:.3f}), RMS {(sq / max(n, 1)) ** 0.5:.4e}, "
          f"rel-RMSE {rel_rmse:.4e} <= bound {bound:.4e}: {'OK' if ok else 'FAIL'}")
    stats = results[0]["stats"]
    print("expert load (pairs over all calls, all ranks):")
    print(format_table({"moe": stats}, per_expert=False))
    per_call = [max(r["times"][i] for r in results.values()) for i in range(args.iters)]
    per_call.sort()
    print(f"time per forward (slowest rank, median of {args.iters}): {per_call[len(per_call) // 2] * 1e3:.2f} ms")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
