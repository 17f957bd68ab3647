"""Benchmark of the pre-dispatch kernel against the HBM copy bandwidth measured in the same run.

    python scripts/bench_pre_dispatch.py --out pre_dispatch.json [--sweep]

For each token count T (default 128, 1024, 4096, 8192) at H = 7168, FP8 and FP4, group 32 and 128:
GPU time of one launch (CUDA events around the launch, the GPU kept busy by a sleep kernel before
the start event so the host's launch latency is not timed; warm-up, median of --iters >= 50 runs),
bytes moved (read x, ids, weights; write data, scales, ids, weights), the resulting GB/s and its
fraction of a large `copy_`'s read+write bandwidth, and the time of a `copy_` that moves the same
bytes (what a pure streaming kernel of that size can reach, launch and ramp included). Also the
host-side cost of one eager call (Python + Triton launcher) and the plain-PyTorch reference's time
for context. Every measured configuration is checked bitwise against the reference first.
`--sweep` also times other tile configurations and reports the best next to the heuristic's choice.

Prints a markdown table; writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402

from mega_moe_layer.kernels import reference as ref  # noqa: E402
from mega_moe_layer.kernels.heuristics import PreDispatchConfig, cdiv, pre_dispatch_config  # noqa: E402
from mega_moe_layer.kernels.pre_dispatch import _launch_pre_dispatch, _num_sms  # noqa: E402

SLEEP_CYCLES = 400_000   # ~0.2 ms: longer than a Python launch, so the timed region is GPU-only


def gpu_time_us(fn, iters: int, warmup: int = 10) -> float:
    """Median GPU time of `fn()` in microseconds (CUDA events, host launch latency hidden)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        torch.cuda._sleep(SLEEP_CYCLES)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def host_time_us(fn, iters: int) -> float:
    """Median host-side time of one eager call (no synchronisation inside the loop)."""
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    torch.cuda.synchronize()
    return statistics.median(times) * 1e6


def hbm_copy_gbps(iters: int, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.int32, device="cuda").random_()
    dst = torch.empty_like(src)
    t = gpu_time_us(lambda: dst.copy_(src), iters=max(20, iters // 5), warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (t * 1e-6) / 1e9


def same_bytes_copy_us(nbytes: int, iters: int) -> float:
    """GPU time of a `copy_` that reads and writes nbytes in total."""
    src = torch.empty(nbytes // 8, dtype=torch.int32, device="cuda").random_()
    dst = torch.empty_like(src)
    return gpu_time_us(lambda: dst.copy_(src), iters)


def bytes_moved(T: int, H: int, K: int, g: int, use_fp4: bool, idx_in_size: int, idx_out_size: int,
                topk_rows: int) -> int:
    read = T * H * 2 + T * K * (idx_in_size + 4)
    write = T * (H // 2 if use_fp4 else H) + T * (H // g) + topk_rows * K * (idx_out_size + 4)
    return read + write


def make_case(T, H, K, g, use_fp4):
    x = torch.randn(T, H, device="cuda").mul_(3).to(torch.bfloat16)
    ids = torch.randint(-1, 256, (T, K), device="cuda", dtype=torch.int64)
    w = torch.rand(T, K, device="cuda")
    buf_x = (torch.empty(T, H // 2, dtype=torch.int8, device="cuda") if use_fp4
             else torch.empty(T, H, dtype=torch.float8_e4m3fn, device="cuda"))
    buf_sf = torch.empty(T, H // g // 4, dtype=torch.int32, device="cuda")
    buf_idx = torch.empty(T, K, dtype=torch.int32, device="cuda")
    buf_w = torch.empty(T, K, dtype=torch.float32, device="cuda")
    return x, ids, w, buf_x, buf_sf, buf_idx, buf_w


def check(case, T, g, use_fp4):
    x, ids, w, buf_x, buf_sf, buf_idx, buf_w = case
    q, sf = (ref.per_token_cast_to_fp4 if use_fp4 else ref.per_token_cast_to_fp8)(x, g)
    ok = (torch.equal(buf_x.view(torch.uint8), q.view(torch.uint8)) and torch.equal(buf_sf, sf)
          and torch.equal(buf_idx, ids.to(torch.int32)) and torch.equal(buf_w, w))
    if not ok:
        raise SystemExit(f"pre-dispatch output differs from the reference (T={T}, g={g}, fp4={use_fp4})")


def sweep_configs(T, H, g, base: PreDispatchConfig):
    words = H // (4 * g)
    out = []
    for block_m in (1, 2, 4, 8):
        for block_w in sorted({base.block_w, max(1, base.block_w // 2)}):
            for num_warps in (4, 8):
                out.append(PreDispatchConfig(block_m=block_m, block_w=block_w, num_col_blocks=cdiv(words, block_w),
                                             topk_block_rows=base.topk_block_rows, num_warps=num_warps))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--tokens", default="128,1024,4096,8192")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--groups", default="32,128")
    p.add_argument("--formats", default="fp8,fp4")
    p.add_argument("--topk", type=int, default=8)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--sweep", action="store_true", help="also time other tile configurations")
    args = p.parse_args()
    if args.iters < 50:
        raise SystemExit("--iters: use at least 50 runs for a stable median")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")

    dev = torch.device("cuda")
    copy_bw = hbm_copy_gbps(args.iters)
    H, K = args.hidden, args.topk
    rows, table = [], []
    for fmt in args.formats.split(","):
        use_fp4 = fmt == "fp4"
        for g in (int(v) for v in args.groups.split(",")):
            for T in (int(v) for v in args.tokens.split(",")):
                case = make_case(T, H, K, g, use_fp4)
                cfg = pre_dispatch_config(T, H, g, num_sms=_num_sms(dev), use_fp4=use_fp4)

                def launch(c=cfg):
                    _launch_pre_dispatch(*case, T, group_size=g, use_fp4_acts=use_fp4, config=c)

                launch()
                torch.cuda.synchronize()
                check(case, T, g, use_fp4)
                t_us = gpu_time_us(launch, args.iters)
                host_us = host_time_us(launch, args.iters)
                if host_us > 100:
                    print(f"warning: a launch costs {host_us:.0f} us on the host, close to the sleep that hides "
                          "it: GPU times may include launch gaps", file=sys.stderr)
                x = case[0]
                cast = ref.per_token_cast_to_fp4 if use_fp4 else ref.per_token_cast_to_fp8
                ref_us = gpu_time_us(lambda: cast(x, g), max(50, args.iters // 2), warmup=3)
                nbytes = bytes_moved(T, H, K, g, use_fp4, 8, 4, T)
                gbps = nbytes / (t_us * 1e-6) / 1e9
                copy_us = same_bytes_copy_us(nbytes, args.iters)
                row = dict(T=T, H=H, K=K, group=g, format=fmt, kernel_us=t_us, host_us_per_call=host_us,
                           bytes=nbytes, GBps=gbps, frac_of_copy=gbps / copy_bw, same_bytes_copy_us=copy_us,
                           torch_reference_us=ref_us, config=cfg.__dict__)
                if args.sweep:
                    best = (t_us, cfg)
                    for c in sweep_configs(T, H, g, cfg):
                        launch(c)
                        torch.cuda.synchronize()
                        check(case, T, g, use_fp4)
                        tc = gpu_time_us(lambda: launch(c), args.iters)
                        if tc < best[0]:
                            best = (tc, c)
                    row.update(best_sweep_us=best[0], best_sweep_config=best[1].__dict__)
                rows.append(row)
                line = (f"| {T} | {fmt} | {g} | {t_us:.2f} | {nbytes / 1e6:.2f} | {gbps:.0f} | "
                        f"{100 * gbps / copy_bw:.0f}% | {copy_us:.2f} | {host_us:.1f} | {ref_us:.1f} | "
                        f"m{cfg.block_m} w{cfg.block_w} warps{cfg.num_warps} |")
                if args.sweep:
                    b = row["best_sweep_config"]
                    line += f" {row['best_sweep_us']:.2f} (m{b['block_m']} w{b['block_w']} warps{b['num_warps']}) |"
                table.append(line)
                del case
                torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(dev)
    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}; HBM copy (read+write) "
          f"{copy_bw:.0f} GB/s; H={H}, K={K}; median of {args.iters}\n")
    head = ("| T | format | group | kernel us | MB moved | GB/s | of copy BW | same-bytes copy us | host us/call "
            "| torch ref us | config |")
    sep = "|---|---|---|---|---|---|---|---|---|---|---|"
    if args.sweep:
        head += " best sweep us (config) |"
        sep += "---|"
    print("\n".join([head, sep] + table))
    with open(args.out, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                       hbm_copy_GBps=copy_bw, iters=args.iters, rows=rows), f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
