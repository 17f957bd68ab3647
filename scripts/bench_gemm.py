"""Micro-benchmark of the grouped expert GEMMs (L1, L2) at DeepSeek-V3's expert shape.

    python scripts/bench_gemm.py --out bench_gemm.json [--tokens 1,8,64,512] [--formats mxfp4/fp8,fp8/fp8]
    python scripts/bench_gemm.py --out sweep.json --tokens 1,512 --sweep     # + other tile configs

H 7168, I 2048, 128 local experts, the same number of routed pairs per expert (--tokens), weights
and activations per --formats (weight/act). For each case: the GPU time of one L1 launch and one
L2 launch (CUDA events, the GPU kept busy by a sleep kernel before the start event so host launch
latency is not timed; warm-up, median of --iters >= 20), their TFLOP/s and weight bytes per second
(and its fraction of a large copy's read+write bandwidth measured in the same run), next to
bf16 baselines of the same FLOPs in the same run: one dense `torch.matmul` ([E*t, K] x [K, N]:
the tensor-core rate with one weight) and `torch.bmm` over the experts ([E, t, K] x [E, K, N]:
the same per-expert weights in bf16, the plain-PyTorch grouped GEMM). Every timed configuration
is first checked against `reference.expert_forward` on two experts. `--sweep` also times the
configurations of `SWEEP_L1` / `SWEEP_L2` and reports the best next to the heuristic's choice.

Prints a markdown table; writes everything as JSON to --out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import triton  # noqa: E402

from bench_pre_dispatch import gpu_time_us, hbm_copy_gbps  # noqa: E402  (the one timing helper)
from mega_moe_layer import formats  # noqa: E402
from mega_moe_layer.kernels import gemm_heuristics as gh  # noqa: E402
from mega_moe_layer.kernels import reference as ref  # noqa: E402
from mega_moe_layer.kernels.l1_gemm import build_tile_map, l1_grouped_gemm  # noqa: E402
from mega_moe_layer.kernels.l2_gemm import l2_grouped_gemm  # noqa: E402

DEV = "cuda"
#: (block_n, num_warps, num_stages, ctas_per_sm) tried by --sweep, besides the heuristic's choice.
SWEEP_L1 = [(64, 4, 4, 2), (64, 4, 3, 3), (32, 4, 4, 3), (64, 8, 3, 1), (128, 8, 3, 1), (128, 8, 4, 1)]
SWEEP_L2 = [(64, 4, 4, 2), (64, 4, 3, 3), (128, 4, 4, 2), (64, 8, 3, 1), (128, 8, 3, 1), (128, 8, 4, 1)]


def quantized_weights(E: int, N: int, K: int, fmt: str, seed: int, chunk: int = 8) -> formats.QuantizedWeight:
    """Random bf16 [E, N, K] (std K**-0.5) quantised to `fmt`, `chunk` experts at a time (the
    quantiser's float32 temporaries of all 128 experts would not fit)."""
    parts = []
    gen = torch.Generator(device=DEV).manual_seed(seed)
    for e0 in range(0, E, chunk):
        w = (torch.randn(min(chunk, E - e0), N, K, generator=gen, device=DEV) * K ** -0.5).to(torch.bfloat16)
        parts.append(formats.quantize_weight(w, fmt))
        del w
    data = torch.cat([p.data for p in parts])
    scale = None if parts[0].scale is None else torch.cat([p.scale for p in parts])
    torch.cuda.empty_cache()
    return formats.QuantizedWeight(fmt, data, scale, (E, N, K))


def weight_bytes(qw: formats.QuantizedWeight) -> int:
    return qw.data.numel() * qw.data.element_size() + (0 if qw.scale is None else
                                                       qw.scale.numel() * qw.scale.element_size())


class Case:
    """Routed pairs (t per expert), the tile map, h, destinations: everything one L1 + L2 needs."""

    def __init__(self, w13, w2, t: int, act_format: str, seed: int):
        E, two_i, H = w13.shape
        I = two_i // 2
        P = E * t
        self.E, self.H, self.I, self.t, self.P, self.act_format = E, H, I, t, P, act_format
        self.w13, self.w2 = w13, w2
        gen = torch.Generator(device=DEV).manual_seed(seed)
        x = torch.randn(P, H, generator=gen, device=DEV).to(torch.bfloat16)
        self.pool_x, self.pool_x_sf = ref.quantize_act(x, act_format, 32)
        del x
        self.pair_rows = torch.randperm(P, generator=gen, device=DEV).to(torch.int32)
        self.pair_weights = torch.rand(P, generator=gen, device=DEV) + 0.1
        self.offsets = torch.arange(0, P + 1, t, dtype=torch.int32, device=DEV)
        self.block_m = gh.gemm_block_m(t)
        mt = gh.max_tiles(P, E, self.block_m)
        i32 = dict(dtype=torch.int32, device=DEV)
        self.tile_expert, self.tile_row_start, self.num_tiles = (torch.empty(mt, **i32), torch.empty(mt, **i32),
                                                                 torch.empty(1, **i32))
        build_tile_map(self.offsets, self.block_m, mt, self.tile_expert, self.tile_row_start, self.num_tiles)
        if act_format == "fp8":
            self.h = torch.empty(P, I, dtype=torch.float8_e4m3fn, device=DEV)
        elif act_format == "fp4":
            self.h = torch.empty(P, I // 2, dtype=torch.int8, device=DEV)
        else:
            self.h = torch.empty(P, I, dtype=torch.bfloat16, device=DEV)
        self.h_sf = None if act_format == "bf16" else torch.empty(P, I // 128, dtype=torch.int32, device=DEV)
        # Destinations in scrambled order, as the combine slots of the source ranks would be.
        self.out = torch.empty(P, H, dtype=torch.bfloat16, device=DEV)
        perm = torch.randperm(P, generator=gen, device=DEV)
        self.pair_dst = self.out.data_ptr() + perm.to(torch.int64) * (2 * H)
        self.perm = perm

    def l1(self, config=None):
        l1_grouped_gemm(self.pool_x, self.pool_x_sf, self.pair_rows, self.pair_weights, self.offsets,
                        self.tile_expert, self.tile_row_start, self.num_tiles, self.w13.data, self.w13.scale,
                        self.h, self.h_sf, weight_format=self.w13.format, act_format=self.act_format,
                        act_group_size=32, activation_clamp=None, block_m=self.block_m, config=config)

    def l2(self, config=None):
        l2_grouped_gemm(self.h, self.h_sf, self.offsets, self.tile_expert, self.tile_row_start, self.num_tiles,
                        self.w2.data, self.w2.scale, self.pair_dst, None, weight_format=self.w2.format,
                        act_format=self.act_format, combine_format="bf16", hidden=self.H, block_m=self.block_m,
                        config=config)

    def check(self, tol: float = 5e-3) -> float:
        """rel-RMSE of y against `reference.expert_forward` on the first and last expert."""
        worst = 0.0
        for e in (0, self.E - 1):
            s, t = e * self.t, (e + 1) * self.t
            rows = self.pair_rows[s:t].long()
            want = ref.expert_forward(self.pool_x[rows], None if self.pool_x_sf is None else self.pool_x_sf[rows],
                                      self.pair_weights[s:t], self.w13.dequantize(slice(e, e + 1))[0],
                                      self.w2.dequantize(slice(e, e + 1))[0], act_format=self.act_format,
                                      act_group_size=32, activation_clamp=None).double()
            got = self.out[self.perm[s:t]].double()
            err = float((got - want).norm() / want.norm())
            worst = max(worst, err)
        if not worst <= tol:
            raise SystemExit(f"grouped GEMM result off: rel-RMSE {worst:.3e} > {tol} "
                             f"({self.w13.format}/{self.act_format}, {self.t} tokens per expert)")
        return worst


def bf16_baselines(E: int, t: int, K: int, N: int, iters: int, with_bmm: bool):
    """(dense matmul us, bmm us or None) of [E*t, K] x [K, N] and [E, t, K] x [E, K, N] in bf16."""
    a = torch.randn(E * t, K, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(K, N, device=DEV, dtype=torch.bfloat16)
    dense = gpu_time_us(lambda: torch.matmul(a, b), iters, warmup=3)
    bmm = None
    if with_bmm:
        wb = torch.randn(E, K, N, device=DEV, dtype=torch.bfloat16)
        a3 = a.view(E, t, K)
        bmm = gpu_time_us(lambda: torch.bmm(a3, wb), iters, warmup=3)
        del wb
    del a, b
    torch.cuda.empty_cache()
    return dense, bmm


def _cfg_txt(cfg) -> str:
    return f"m{cfg.block_m} n{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} c{cfg.ctas_per_sm}"


def sweep(case: Case, kern: str, base, iters: int, base_us: float):
    """(best us, its config) over the heuristic's config (base_us) and SWEEP_L1 / SWEEP_L2; each
    configuration is checked against the reference before it is timed."""
    best = (base_us, base)
    for bn, warps, stages, ctas in (SWEEP_L1 if kern == "l1" else SWEEP_L2):
        cfg = dataclasses.replace(base, block_n=bn, num_warps=warps, num_stages=stages, ctas_per_sm=ctas)
        try:
            if kern == "l1":
                fn = lambda c=cfg: case.l1(c)  # noqa: E731
                fn()
                case.l2()
            else:
                case.l1()
                fn = lambda c=cfg: case.l2(c)  # noqa: E731
                fn()
            torch.cuda.synchronize()
            case.check()
        except Exception as exc:  # e.g. out of shared memory for this tile: report, go on
            print(f"sweep: {kern} {_cfg_txt(cfg)} failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        us = gpu_time_us(fn, iters)
        if us < best[0]:
            best = (us, cfg)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--tokens", default="1,8,64,512", help="routed pairs per local expert")
    p.add_argument("--formats", default="mxfp4/fp8,fp8/fp8", help="weight/act pairs")
    p.add_argument("--experts", type=int, default=128, help="local experts")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--no-bmm", action="store_true", help="skip the bf16 bmm baseline (needs 11 GB)")
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP_L1 / SWEEP_L2 tile configs")
    args = p.parse_args()
    if args.iters < 20:
        raise SystemExit("--iters: use at least 20 runs for a stable median")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    E, H, I = args.experts, args.hidden, args.intermediate
    tokens = [int(v) for v in args.tokens.split(",")]
    copy_bw = hbm_copy_gbps(args.iters)

    baselines = {}
    for t in tokens:
        baselines[("l1", t)] = bf16_baselines(E, t, H, 2 * I, args.iters, not args.no_bmm)
        baselines[("l2", t)] = bf16_baselines(E, t, I, H, args.iters, not args.no_bmm)

    rows, table = [], []
    for fmt in args.formats.split(","):
        wf, af = fmt.split("/")
        w13 = quantized_weights(E, 2 * I, H, wf, seed=1)
        w2 = quantized_weights(E, H, I, wf, seed=2)
        wbytes = {"l1": weight_bytes(w13), "l2": weight_bytes(w2)}
        for t in tokens:
            case = Case(w13, w2, t, af, seed=t)
            case.l1()
            case.l2()
            torch.cuda.synchronize()
            err = case.check()
            for kern, fn, flops in (("l1", case.l1, 2.0 * E * t * 2 * I * H), ("l2", case.l2, 2.0 * E * t * H * I)):
                us = gpu_time_us(fn, args.iters)
                dense_us, bmm_us = baselines[(kern, t)]
                cfg = (gh.l1_gemm_config(case.block_m, H, I, wf, af) if kern == "l1"
                       else gh.l2_gemm_config(case.block_m, H, I, wf, af, "bf16"))
                wgbps = wbytes[kern] / (us * 1e-6) / 1e9
                row = dict(weight_format=wf, act_format=af, tokens_per_expert=t, kernel=kern, us=us,
                           tflops=flops / (us * 1e-6) / 1e12, weight_bytes=wbytes[kern], weight_GBps=wgbps,
                           weight_frac_of_copy=wgbps / copy_bw, bf16_matmul_us=dense_us,
                           bf16_matmul_tflops=flops / (dense_us * 1e-6) / 1e12, bf16_bmm_us=bmm_us,
                           check_rel_rmse=err, config=cfg.__dict__)
                rows.append(row)
                bmm_txt = "- | -" if bmm_us is None else f"{bmm_us:.1f} | {bmm_us / us:.2f}x"
                line = (f"| {wf}/{af} | {t} | {kern.upper()} | {us:.1f} | {row['tflops']:.1f} | {wgbps:.0f} | "
                        f"{100 * wgbps / copy_bw:.0f}% | {dense_us:.1f} | {row['bf16_matmul_tflops']:.1f} | "
                        f"{bmm_txt} | {_cfg_txt(cfg)} |")
                if args.sweep:
                    best_us, best_cfg = sweep(case, kern, cfg, args.iters, us)
                    row.update(best_sweep_us=best_us, best_sweep_config=best_cfg.__dict__)
                    line += f" {best_us:.1f} ({_cfg_txt(best_cfg)}) |"
                table.append(line)
            del case
            torch.cuda.empty_cache()
        del w13, w2
        torch.cuda.empty_cache()

    name = torch.cuda.get_device_name(0)
    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}; HBM copy (read+write) "
          f"{copy_bw:.0f} GB/s; H={H}, I={I}, {E} local experts; median of {args.iters}\n")
    head = ("| weights/acts | tokens/expert | kernel | us | TFLOP/s | weight GB/s | of copy BW | bf16 matmul us "
            "| bf16 matmul TFLOP/s | bf16 bmm us | speed-up vs bmm | config |")
    if args.sweep:
        head += " best sweep us (config) |"
    print("\n".join([head, "|" + "---|" * (13 if args.sweep else 12)] + table))
    with open(args.out, "w") as f:
        json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__, hbm_copy_GBps=copy_bw,
                       iters=args.iters, hidden=H, intermediate=I, experts=E, rows=rows), f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
