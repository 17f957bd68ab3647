"""Micro-benchmark of the grouped expert GEMMs (L1, L2) at DeepSeek-V3's expert shape.

    python scripts/bench_gemm.py --out bench_gemm.json [--cases 1:64:8,16:64:64,256:128:128] [--formats mxfp4/fp8]
    python scripts/bench_gemm.py --out sweep.json --sweep     # + other tile configs

H 7168, I 2048. A case t:E:A puts t routed pairs on each of A experts (spread evenly) out of E
local ones: the defaults are decode at T = 1 and T = 128 tokens (top-8, 64 local experts) and
prefill at T = 4096 per rank at EP2 (128 local experts, 256 pairs each). A case uT:E routes T
tokens top-8 uniformly over E experts (bench.py's routing: uneven counts, partly filled tiles).
The kernels run what the layer runs by default (the bf16 mainloop; `--fp8-mainloop` adds the FP8
one, `--fp4-decoders` the 'lut' MXFP4 decoder, `--block-ms` other tile heights: each checked
first). For each case: the GPU
time of one L1 launch and one L2 launch (CUDA events, the GPU kept busy by a sleep kernel before
the start event so host launch latency is not timed; warm-up, median of --iters >= 20), their
TFLOP/s and the bytes per second of the weights of the active experts (and the fraction of a large
copy's read+write bandwidth), next to baselines measured in the same run: a `copy_` moving the
same weight bytes (the decode floor), one dense bf16 `torch.matmul` of the same FLOPs, and, from
64 pairs per expert, `torch._scaled_grouped_mm` with FP8 weights and activations (row-wise
scales) on the same groups (the prefill target: >= 1.5x faster). Every timed configuration is
first checked against `reference.expert_forward` on two experts. `--sweep` also times the
configurations of `SWEEP_L1` / `SWEEP_L2` and reports the best next to the heuristic's choice.

Prints a markdown table; writes everything as JSON to --out (after every row).
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

from bench_pre_dispatch import gpu_time_us, hbm_copy_gbps, same_bytes_copy_us  # noqa: E402
from mega_moe_layer import formats  # noqa: E402
from mega_moe_layer.kernels import gemm_heuristics as gh  # noqa: E402
from mega_moe_layer.kernels import reference as ref  # noqa: E402
from mega_moe_layer.kernels.gemm_operands import prepare_weight_operand  # noqa: E402
from mega_moe_layer.kernels.l1_gemm import build_tile_map, chained_fp4_hazards, l1_grouped_gemm  # noqa: E402
from mega_moe_layer.kernels.l2_gemm import l2_grouped_gemm  # noqa: E402

DEV = "cuda"
#: Default cases, t:E:A (t pairs on each of A active experts of E local; DeepSeek-V3 top-8): decode
#: T = 1 (8 pairs on 8 of 64 experts), decode T = 128 (1024 pairs, 16 on each of 64), prefill
#: T = 4096 per rank at EP2 (32768 pairs over 128 local experts: 256 each).
DEFAULT_CASES = "1:64:8,16:64:64,256:128:128"
#: Top-k of the routed cases ("uT:E": T tokens over E local experts, bench.py's uniform routing).
TOPK = 8
#: (block_m, block_n, num_warps, num_stages, ctas_per_sm) tried by --sweep besides the heuristic's
#: choice, in the case's regime only (decode: block_m <= 32; prefill: larger).
SWEEP_L1 = [(16, 64, 8, 4, 2), (16, 64, 8, 3, 2), (16, 32, 4, 3, 4), (16, 64, 4, 4, 3),
            (128, 64, 8, 3, 1), (128, 64, 4, 3, 2), (128, 64, 4, 2, 2), (128, 32, 4, 3, 2),
            # 64-row tiles as one warpgroup per CTA (ptxas, sm_90a: 201 / 255 registers, no spills)
            (64, 64, 4, 3, 2), (64, 64, 4, 4, 2), (64, 128, 4, 3, 2)]
SWEEP_PROMOTE = (1, 2, 8, 16)
SWEEP_L2 = [(16, 128, 8, 4, 2), (16, 64, 8, 4, 2), (16, 64, 4, 3, 4), (16, 64, 4, 4, 3),
            (128, 64, 8, 3, 1), (128, 64, 4, 3, 2), (128, 128, 8, 3, 1), (128, 128, 4, 3, 2),
            # 64-row tiles as one warpgroup per CTA (ptxas, sm_90a: 208 / 162 registers, no spills)
            (64, 128, 4, 3, 2), (64, 128, 4, 4, 2), (64, 64, 4, 3, 3)]


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

    def __init__(self, w13, w2, t: int, act_format: str, seed: int, active: int = 0, routed_tokens: int = 0):
        E, two_i, H = w13.shape
        I = two_i // 2
        if routed_tokens > 0:
            # `routed_tokens` tokens, each to TOPK distinct experts drawn uniformly (bench.py's
            # "uniform" routing): uneven counts per expert, so tiles are partly filled.
            g = torch.Generator().manual_seed(seed)
            idx = torch.rand(routed_tokens, E, generator=g).argsort(dim=1)[:, :TOPK]
            counts = torch.bincount(idx.flatten(), minlength=E)
        else:
            active = E if active <= 0 else min(active, E)
            # The experts with pairs: `active` of the E, spread evenly (decode touches a few).
            counts = torch.zeros(E, dtype=torch.int64)
            counts[[e * E // active for e in range(active)]] = t
        self.active = [e for e in range(E) if counts[e] > 0]
        active = len(self.active)
        P = int(counts.sum())
        t = P // max(1, active)   # mean pairs per active expert
        self.E, self.H, self.I, self.t, self.P, self.act_format = E, H, I, t, P, act_format
        self.w13, self.w2 = w13, w2
        # The weights as the kernels read them, prepared once (as `load_weights` does): the layer's
        # default (`MegaMoEConfig.hopper_fp8_mainloop` False: the bf16 mainloop on operands dequantised
        # in registers) and the FP8 mainloop's rebased operands (timed with --fp8-mainloop).
        arch = 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
        self.w13_op = prepare_weight_operand(w13.format, w13.data, w13.scale, arch=arch, act_format=act_format,
                                             fp8_mainloop=False)
        self.w2_op = prepare_weight_operand(w2.format, w2.data, w2.scale, arch=arch, act_format=act_format,
                                            fp8_mainloop=False)
        self.w13_fp8 = prepare_weight_operand(w13.format, w13.data, w13.scale, arch=arch, act_format=act_format)
        self.w2_fp8 = prepare_weight_operand(w2.format, w2.data, w2.scale, arch=arch, act_format=act_format)
        self.use_fp8 = False
        self.stream = None     # (w13 operand, w2 operand, x_rebased, h_rebased): the streamed FP8 path
        self.x_pairs = None    # the rebased x in pair order (`pairs_us`), else None
        gen = torch.Generator(device=DEV).manual_seed(seed)
        x = torch.randn(P, H, generator=gen, device=DEV).to(torch.bfloat16)
        self.pool_x, self.pool_x_sf = ref.quantize_act(x, act_format, 32)
        del x
        self.pair_rows = torch.randperm(P, generator=gen, device=DEV).to(torch.int32)
        self.pair_weights = torch.rand(P, generator=gen, device=DEV) + 0.1
        self.starts = [0] + torch.cumsum(counts, 0).tolist()
        self.offsets = torch.tensor(self.starts, dtype=torch.int32, device=DEV)
        # The layer's hint: pairs per local expert (`gemm_api.block_m_for`).
        self.retile(gh.gemm_block_m(P / E if routed_tokens > 0 else t))
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

    def retile(self, block_m: int) -> None:
        """(Re)build the tile map for tiles of `block_m` pairs."""
        self.block_m = block_m
        mt = gh.max_tiles(self.P, self.E, block_m)
        i32 = dict(dtype=torch.int32, device=DEV)
        self.tile_expert, self.tile_row_start, self.num_tiles = (torch.empty(mt, **i32), torch.empty(mt, **i32),
                                                                 torch.empty(1, **i32))
        build_tile_map(self.offsets, block_m, mt, self.tile_expert, self.tile_row_start, self.num_tiles)

    def label(self) -> str:
        return f"{self.P} pairs on {len(self.active)}/{self.E} experts"

    def tiles(self, block_m: int) -> int:
        """Tiles of `block_m` rows over this case's per-expert counts."""
        return sum(-(-(b - a) // block_m) for a, b in zip(self.starts[:-1], self.starts[1:]))

    def stream_setup(self, as_fp8: bool, lane: bool = False) -> bool:
        """Switch l1 / l2 to the streamed FP8 mainloop (x / h rebased first, as the layer does with
        `hopper_fp8_mainloop`); MXFP4 weights expanded to E4M3 at load when `as_fp8`; 4-bit words in
        the "lane" K order (x and h rebased in it) when `lane` (`gemm_operands.LANE_K_ORDER`). False
        when it does not apply."""
        from mega_moe_layer.kernels.rebase import rebase_act_rows
        arch = 10 * torch.cuda.get_device_capability()[0] + torch.cuda.get_device_capability()[1]
        ops = [prepare_weight_operand(q.format, q.data, q.scale, arch=arch, act_format=self.act_format,
                                      fp4_as_fp8=as_fp8, lane_k=lane) for q in (self.w13, self.w2)]
        if not all(o.is_fp8_mma for o in ops):
            return False
        f8, i32 = dict(dtype=torch.float8_e4m3fn, device=DEV), dict(dtype=torch.int32, device=DEV)
        xr = (torch.empty(self.pool_x.shape[0], self.H, **f8), torch.zeros(self.pool_x.shape[0], **i32))
        hr = (torch.empty(self.P, self.I, **f8), torch.zeros(self.P, **i32))
        count = self.offsets[-1:]
        self.rebase_x = lambda: rebase_act_rows(self.pool_x, self.pool_x_sf, *xr, count, act_format=self.act_format,  # noqa: E731
                                                group=32, rows=self.pair_rows, lane_k=ops[0].lane)
        self.rebase_h = lambda: rebase_act_rows(self.h, self.h_sf, *hr, count, act_format=self.act_format,  # noqa: E731
                                                group=32, lane_k=ops[1].lane)
        self.stream = (ops[0], ops[1], xr, hr)
        return True

    def l1(self, config=None):
        if self.stream is not None:
            l1_grouped_gemm(self.pool_x, self.pool_x_sf, self.pair_rows, self.pair_weights, self.offsets,
                            self.tile_expert, self.tile_row_start, self.num_tiles, self.w13.data, self.w13.scale,
                            self.h, self.h_sf, weight_format=self.w13.format, act_format=self.act_format,
                            act_group_size=32, activation_clamp=None, block_m=self.block_m, config=config,
                            w13_operand=self.stream[0], x_rebased=self.stream[2], x_pairs=self.x_pairs)
            return
        l1_grouped_gemm(self.pool_x, self.pool_x_sf, self.pair_rows, self.pair_weights, self.offsets,
                        self.tile_expert, self.tile_row_start, self.num_tiles, self.w13.data, self.w13.scale,
                        self.h, self.h_sf, weight_format=self.w13.format, act_format=self.act_format,
                        act_group_size=32, activation_clamp=None, block_m=self.block_m, config=config,
                        w13_operand=self.w13_fp8 if self.use_fp8 else self.w13_op)

    def l2(self, config=None):
        if self.stream is not None:
            l2_grouped_gemm(self.h, self.h_sf, self.offsets, self.tile_expert, self.tile_row_start, self.num_tiles,
                            self.w2.data, self.w2.scale, self.pair_dst, None, weight_format=self.w2.format,
                            act_format=self.act_format, combine_format="bf16", hidden=self.H,
                            block_m=self.block_m, config=config, w2_operand=self.stream[1], h_rebased=self.stream[3])
            return
        l2_grouped_gemm(self.h, self.h_sf, self.offsets, self.tile_expert, self.tile_row_start, self.num_tiles,
                        self.w2.data, self.w2.scale, self.pair_dst, None, weight_format=self.w2.format,
                        act_format=self.act_format, combine_format="bf16", hidden=self.H, block_m=self.block_m,
                        config=config, w2_operand=self.w2_fp8 if self.use_fp8 else self.w2_op)

    def check(self, tol: float = 5e-3) -> float:
        """rel-RMSE of y against `reference.expert_forward` on the first and last active expert."""
        worst = 0.0
        for e in (self.active[0], self.active[-1]):
            s, t = self.starts[e], self.starts[e + 1]
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


def _same_values(t: torch.Tensor, w: torch.Tensor) -> bool:
    """Every element equal as bits, or (floating point) as a value: a zero sum may differ in sign."""
    if not t.is_floating_point():
        return bool(torch.equal(t, w))
    iv = torch.int8 if t.element_size() == 1 else torch.int16
    return bool(((t.view(iv) == w.view(iv)) | (t.float() == w.float())).all())


def gluon_us(case: "Case", kern: str, name: str, iters: int, stream_us: dict) -> None:
    """The streamed L1 or L2 on its warp-specialised Gluon kernel (`kernels.l1_gluon` /
    `l2_gluon`) beside the Triton one just timed: its output (L1: h values, a zero sum may differ
    in sign, and scale bytes; L2: y values) compared with the Triton kernel's first, then timed;
    stream_us[name + " gluon"] = (us, None, equal)."""
    from mega_moe_layer.kernels import l1_gluon, l2_gluon
    mod = l1_gluon if kern == "l1" else l2_gluon
    launch_name = "l1_gluon_launch" if kern == "l1" else "l2_gluon_launch"
    run = case.l1 if kern == "l1" else case.l2
    outs = (case.h, case.h_sf) if kern == "l1" else (case.out,)
    case.rebase_x()
    case.l1()
    case.rebase_h()
    case.l2()
    torch.cuda.synchronize()
    want = [t.clone() for t in outs]
    taken = []
    launch = getattr(mod, launch_name)
    setattr(mod, launch_name, lambda *a, **k: taken.append(1) or launch(*a, **k))
    mod.ENABLED = True
    try:
        for t in outs:
            t.zero_()
        run()
        torch.cuda.synchronize()
        if not taken:
            print(f"    {kern} streamed ({name}): the Gluon kernel does not apply to this launch", flush=True)
            return
        same = all(_same_values(t, w) for t, w in zip(outs, want))
        us = gpu_time_us(run, iters)
    finally:
        mod.ENABLED = False            # (the Triton kernels: `main`)
        setattr(mod, launch_name, launch)
    stream_us[f"{name} gluon"] = (us, None, same)
    print(f"    {kern} streamed ({name}) on the Gluon kernel: {us:.1f} us against {stream_us[name][0]:.1f} (Triton); "
          f"output equal to the Triton kernel's: {same}", flush=True)
    if PROFILE_GLUON:
        mod.ENABLED = True
        try:
            profile_gluon(case, kern, f"{name} gluon", outs, want, stream_us)
        finally:
            mod.ENABLED = False
    if case.stream[0].kind == "mxfp4":    # (the 4-bit words: what it decodes)
        ahead_us(case, kern, name, iters, want, stream_us)
    if kern == "l1" and case.block_m in (16, 32):
        gather1_us(case, name, iters, want, stream_us)
    if kern == "l1" and case.block_m == 128:
        pairs_us(case, name, iters, want, stream_us)


#: `--profile`: the Gluon launches timed are followed by one `l1_gluon.PROFILE` / `l2_gluon.PROFILE`
#: launch each
PROFILE_GLUON = False


def profile_gluon(case: "Case", kern: str, name: str, outs, want, stream_us: dict) -> None:
    """One launch of the Gluon L1 or L2 as just timed, built with its cycle counters
    (`l1_gluon.PROFILE`, `l2_gluon.PROFILE`): where its MMA warpgroup's cycles go
    (`l1_gluon.profile_split`), its output checked against the Triton kernel's (`want`) as the timed
    build's; stream_us[name + " profile"] = the split."""
    from mega_moe_layer.kernels import l1_gluon, l2_gluon
    mod = l1_gluon if kern == "l1" else l2_gluon
    mod.PROFILE = prof = torch.zeros(8 * 4096, dtype=torch.int64, device=DEV)
    try:
        for t in outs:
            t.zero_()
        (case.l1 if kern == "l1" else case.l2)()
        torch.cuda.synchronize()
        split = l1_gluon.profile_split(prof.cpu())
    finally:
        mod.PROFILE = None
    split["equal"] = all(_same_values(t, w) for t, w in zip(outs, want))
    stream_us[f"{name} profile"] = split
    per = lambda k: split[k] / max(split["items"], 1)     # noqa: E731
    print(f"    {name} cycle split over {split['ctas']} CTAs, {split['items']:.0f} items: MMA warpgroup "
          f"{per('mma_all'):.0f} cycles per item = stage wait {100 * split['mma_stage_wait_share']:.1f}% + MMA wait "
          f"{100 * split['mma_mma_wait_share']:.1f}% + epilogue {100 * split['mma_epilogue_share']:.1f}% + rest "
          f"{100 * split['mma_rest_share']:.1f}%; producer waits for free stages "
          f"{100 * split['load_empty_wait_share']:.1f}% of its cycles; output equal: {split['equal']}", flush=True)


def ahead_us(case: "Case", kern: str, name: str, iters: int, want, stream_us: dict) -> None:
    """The Gluon L1 or L2 with every odd K step's decode under the even step's MMAs
    (`l1_gluon.DECODE_AHEAD`, `l2_gluon.DECODE_AHEAD`) against its plain loop: the output compared
    with the Triton kernel's (`want`), then timed (and with --profile its cycle split);
    stream_us[name + " gluon ahead"] = (us, None, equal). L1 at 128-row tiles: also 256 K a partial
    sum (`l1_gluon.PREFILL_PROMOTE_K`)."""
    from mega_moe_layer.kernels import l1_gluon, l2_gluon
    mod = l1_gluon if kern == "l1" else l2_gluon
    run = case.l1 if kern == "l1" else case.l2
    outs = (case.h, case.h_sf) if kern == "l1" else (case.out,)
    mod.ENABLED = mod.DECODE_AHEAD = True
    try:
        for t in outs:
            t.zero_()
        run()
        torch.cuda.synchronize()
        same = all(_same_values(t, w) for t, w in zip(outs, want))
        us = gpu_time_us(run, iters)
        if PROFILE_GLUON:
            profile_gluon(case, kern, f"{name} gluon ahead", outs, want, stream_us)
    finally:
        mod.ENABLED = mod.DECODE_AHEAD = False
    stream_us[f"{name} gluon ahead"] = (us, None, same)
    print(f"    {kern} streamed ({name}) on the Gluon kernel, decode ahead: {us:.1f} us against "
          f"{stream_us[name + ' gluon'][0]:.1f} (plain loop); output equal to the Triton kernel's: {same}", flush=True)
    if kern == "l1" and case.block_m == 128:
        # 256 K a partial sum at the prefill tiles (`l1_gluon.PREFILL_PROMOTE_K`): other sums, so h is
        # compared by its values' relative RMSE against the Triton kernel's
        l1_gluon.ENABLED = l1_gluon.DECODE_AHEAD = True
        l1_gluon.PREFILL_PROMOTE_K = 256
        try:
            case.h.zero_()
            case.l1()
            torch.cuda.synchronize()
            h_t = want[0].float()
            diff = float((case.h.float() - h_t).pow(2).mean().sqrt() / h_t.pow(2).mean().sqrt().clamp_min(1e-30))
            us256 = gpu_time_us(case.l1, iters)
            if PROFILE_GLUON:
                profile_gluon(case, "l1", f"{name} gluon ahead 256k", (case.h, case.h_sf), want, stream_us)
        finally:
            l1_gluon.ENABLED = l1_gluon.DECODE_AHEAD = False
            l1_gluon.PREFILL_PROMOTE_K = 128
        stream_us[f"{name} gluon ahead 256k"] = (us256, None, diff)
        print(f"    l1 streamed ({name}) on the Gluon kernel, decode ahead, 256 K a partial sum: {us256:.1f} us; "
              f"h rel-RMSE against the Triton kernel's {diff:.2e}", flush=True)


def _l1_checked_us(case: "Case", iters: int, want, prof_name: str, stream_us: dict):
    """L1 as the switches set now: (h and its scale bytes equal to `want`, the Triton kernel's; its
    GPU time); with --profile its cycle split under prof_name."""
    case.h.zero_()
    case.h_sf.zero_()
    case.l1()
    torch.cuda.synchronize()
    same = all(_same_values(t, w) for t, w in zip((case.h, case.h_sf), want))
    us = gpu_time_us(case.l1, iters)
    if PROFILE_GLUON:
        profile_gluon(case, "l1", prof_name, (case.h, case.h_sf), want, stream_us)
    return same, us


def gather1_us(case: "Case", name: str, iters: int, want, stream_us: dict) -> None:
    """The Gluon L1 at the decode tiles with one gathering warp (`l1_gluon.DECODE_GATHER_WARPS` 1)
    against four: h compared with the Triton kernel's (`want`), then timed (and with --profile its
    cycle split); stream_us[name + " gluon gather1"] = (us, None, equal)."""
    from mega_moe_layer.kernels import l1_gluon
    l1_gluon.ENABLED, l1_gluon.DECODE_GATHER_WARPS = True, 1
    try:
        same, us = _l1_checked_us(case, iters, want, f"{name} gluon gather1", stream_us)
    finally:
        l1_gluon.ENABLED, l1_gluon.DECODE_GATHER_WARPS = False, 4
    stream_us[f"{name} gluon gather1"] = (us, None, same)
    print(f"    l1 streamed ({name}) on the Gluon kernel, one gathering warp: {us:.1f} us against "
          f"{stream_us[name + ' gluon'][0]:.1f} (four); output equal to the Triton kernel's: {same}", flush=True)


def pairs_us(case: "Case", name: str, iters: int, want, stream_us: dict) -> None:
    """The Gluon L1 at 128-row tiles reading the token rows in pair order (`l1_grouped_gemm(x_pairs=)`,
    one TMA box per tile and step) against its gather: h compared with the Triton kernel's (`want`),
    then the L1 and the copy into pair order (`rebase.order_pair_rows`) timed;
    stream_us[name + " gluon pairs"] = (L1 us, copy us, equal)."""
    from mega_moe_layer.kernels import l1_gluon
    from mega_moe_layer.kernels.rebase import order_pair_rows
    xp = torch.empty(case.pair_rows.numel(), case.H, dtype=torch.float8_e4m3fn, device=DEV)

    def order():
        order_pair_rows(case.stream[2][0], case.pair_rows, case.offsets[-1:], xp)
    order()
    taken = []
    boxes = l1_gluon.pair_x_descriptors
    l1_gluon.pair_x_descriptors = lambda *a, **k: taken.append(1) or boxes(*a, **k)
    l1_gluon.ENABLED, case.x_pairs = True, xp
    try:
        same, us = _l1_checked_us(case, iters, want, f"{name} gluon pairs", stream_us)
        copy_us = gpu_time_us(order, iters)
    finally:
        l1_gluon.ENABLED, case.x_pairs = False, None
        l1_gluon.pair_x_descriptors = boxes
    if not taken:
        print(f"    l1 streamed ({name}): the pair-ordered rows were not taken", flush=True)
        return
    stream_us[f"{name} gluon pairs"] = (us, copy_us, same)
    print(f"    l1 streamed ({name}) on the Gluon kernel, token rows in pair order: {us:.1f} us + the copy "
          f"{copy_us:.1f} us, against {stream_us[name + ' gluon'][0]:.1f} gathered; output equal to the Triton "
          f"kernel's: {same}", flush=True)


def decoder_us(case: "Case", kern: str, iters: int, decoder: str) -> float:
    """GPU time of `kern` with another E2M1 decoder of the bf16 mainloop ("lut":
    `GroupedGemmConfig.fp4_decoder`), after checking that L1's h and L2's y equal the default
    decoder's bitwise."""
    H, I, af, bm = case.H, case.I, case.act_format, case.block_m
    c1 = dataclasses.replace(gh.l1_gemm_config(bm, H, I, "mxfp4", af), fp4_decoder=decoder)
    c2 = dataclasses.replace(gh.l2_gemm_config(bm, H, I, "mxfp4", af, "bf16"), fp4_decoder=decoder)
    case.l1()
    case.l2()
    torch.cuda.synchronize()
    h0, out0 = case.h.clone(), case.out.clone()
    case.l1(c1)
    case.l2(c2)
    torch.cuda.synchronize()
    same = (torch.equal(case.h.view(torch.uint8), h0.view(torch.uint8))
            and torch.equal(case.out.view(torch.int16), out0.view(torch.int16)))
    if not same:
        raise SystemExit(f"fp4 decoder {decoder!r} differs from the default decoder ({case.label()})")
    return gpu_time_us((lambda: case.l1(c1)) if kern == "l1" else (lambda: case.l2(c2)), iters)


def other_block_m_us(case: "Case", kern: str, bm: int, iters: int) -> float:
    """GPU time of `kern` at tile height `bm` (the heuristic's config for it), after checking L1 + L2
    at that height against the reference; the case's own tile map is restored afterwards."""
    own = case.block_m
    c1 = gh.l1_gemm_config(bm, case.H, case.I, case.w13.format, case.act_format)
    c2 = gh.l2_gemm_config(bm, case.H, case.I, case.w2.format, case.act_format, "bf16")
    try:
        case.retile(bm)
        case.l1(c1)
        case.l2(c2)
        torch.cuda.synchronize()
        case.check()
        return gpu_time_us((lambda: case.l1(c1)) if kern == "l1" else (lambda: case.l2(c2)), iters)
    finally:
        case.retile(own)


def bf16_matmul_us(M: int, K: int, N: int, iters: int) -> float:
    """GPU time of one dense bf16 [M, K] x [K, N] (the tensor-core rate of the same FLOPs)."""
    a = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(K, N, device=DEV, dtype=torch.bfloat16)
    us = gpu_time_us(lambda: torch.matmul(a, b), iters, warmup=3)
    del a, b
    torch.cuda.empty_cache()
    return us


def scaled_grouped_mm_us(case: "Case", kern: str, iters: int):
    """GPU time of `torch._scaled_grouped_mm` (FP8 e4m3 x FP8 e4m3 weights, row-wise float32 scales) on
    the same pairs per expert and the same shapes; None when this torch / GPU lacks it."""
    fn = getattr(torch, "_scaled_grouped_mm", None)
    if fn is None:
        return None
    E, H, I, P = case.E, case.H, case.I, case.P
    K, N = (H, 2 * I) if kern == "l1" else (I, H)
    try:
        a = torch.randn(P, K, device=DEV).to(torch.float8_e4m3fn)
        w = torch.randn(E, N, K, device=DEV).to(torch.float8_e4m3fn)
        sa = torch.rand(P, device=DEV) + 0.5
        sb = torch.rand(E, N, device=DEV) + 0.5
        offs = case.offsets[1:].contiguous()
        run = lambda: fn(a, w.transpose(-2, -1), sa, sb, offs=offs, out_dtype=torch.bfloat16)  # noqa: E731
        run()
        torch.cuda.synchronize()
        us = gpu_time_us(run, iters, warmup=3)
    except Exception as exc:  # an older torch, or not this GPU: report, go on
        print(f"_scaled_grouped_mm baseline failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
        us = None
    finally:
        a = w = None
        torch.cuda.empty_cache()
    return us


#: (block_m, block_n, num_warps, num_stages, ctas_per_sm) tried by --stream-sweep (streamed FP8 path).
STREAM_SWEEP_L1 = [(128, 32, 4, 4, 2), (128, 64, 8, 3, 1), (128, 64, 8, 4, 1), (64, 32, 4, 3, 2), (64, 64, 8, 4, 1),
                   (16, 64, 4, 3, 2), (16, 64, 4, 4, 3), (16, 128, 8, 4, 1), (32, 64, 4, 4, 2),
                   (16, 32, 4, 4, 4), (16, 32, 4, 6, 3), (16, 32, 4, 3, 4), (16, 32, 4, 5, 4), (16, 64, 4, 4, 3),
                   (128, 64, 8, 3, 2), (128, 32, 4, 4, 3),
                   # prefill with L1's K chained (an optional 6th element: promote_steps)
                   (128, 32, 4, 3, 2, gh._CHAIN), (128, 64, 8, 3, 1, gh._CHAIN), (128, 128, 8, 3, 1, gh._CHAIN)]
STREAM_SWEEP_L2 = [(128, 128, 8, 3, 1), (128, 64, 4, 4, 2), (128, 256, 8, 3, 1), (64, 128, 8, 4, 1), (64, 128, 4, 4, 2),
                   (16, 128, 4, 4, 3), (16, 64, 4, 4, 2), (16, 256, 8, 4, 1), (32, 128, 4, 4, 2),
                   (16, 64, 4, 4, 4), (16, 64, 4, 6, 3), (16, 128, 4, 3, 4), (16, 128, 4, 5, 3), (128, 128, 8, 3, 2)]


#: 4-bit MXFP4 ("mxfp4" operand): (block_m, block_n, num_warps, num_stages, ctas_per_sm, block_k).
FP4_STREAM_SWEEP_L1 = [(16, 32, 4, 3, 4, 256), (16, 32, 4, 4, 4, 256), (16, 64, 8, 3, 2, 256), (16, 32, 4, 4, 4, 128),
                       (32, 32, 4, 3, 4, 256), (32, 32, 4, 2, 4, 256),
                       (32, 32, 4, 3, 3, 256), (32, 32, 4, 4, 4, 128), (32, 32, 4, 3, 4, 128), (32, 64, 4, 3, 2, 256),
                       (128, 32, 4, 3, 2, 128), (128, 32, 4, 2, 2, 128), (128, 32, 4, 2, 2, 256), (128, 32, 4, 3, 2, 256),
                       # prefill with L1's K chained (no promotion): the MMA stays in flight across steps
                       (128, 32, 4, 3, 2, 128, gh._CHAIN), (128, 64, 8, 3, 1, 128, gh._CHAIN),
                       (128, 64, 8, 2, 1, 128, gh._CHAIN), (128, 64, 8, 3, 1, 128, 1), (128, 32, 4, 4, 2, 128, gh._CHAIN),
                       (16, 32, 4, 2, 4, 512),
                       # registers capped (8th element: maxnreg) so more CTAs fit: 5 x 16 pairs (96, 16 bytes
                       # spilled), 4 x 32 pairs (128, no spills; 151 uncapped: 3 CTAs)
                       (16, 32, 4, 3, 5, 256, None, 96), (32, 32, 4, 3, 4, 256, None, 128)]
FP4_STREAM_SWEEP_L2 = [(16, 64, 4, 3, 4, 256), (16, 64, 4, 4, 4, 256), (16, 128, 4, 3, 3, 256), (16, 128, 8, 3, 2, 256),
                       (16, 64, 4, 4, 4, 128), (32, 64, 4, 3, 4, 256), (32, 64, 4, 2, 4, 256),
                       (32, 64, 4, 3, 3, 256), (32, 64, 4, 4, 4, 128), (32, 64, 4, 3, 4, 128), (32, 128, 4, 3, 2, 256),
                       (128, 64, 4, 4, 2, 128), (128, 64, 4, 3, 2, 128), (128, 64, 4, 2, 2, 256), (128, 64, 4, 3, 2, 256),
                       # decode: 128 weight rows per item at 4 CTAs (T = 1: 448 items in 528 slots, one each)
                       (16, 128, 4, 2, 4, 256), (16, 128, 4, 3, 4, 128), (16, 128, 4, 4, 4, 128),
                       # decode: 512 K per step (twice the bytes per round trip; 4 steps per item)
                       (16, 64, 4, 2, 4, 512), (16, 64, 4, 3, 3, 512),
                       # registers capped (maxnreg; no spills, Triton 3.6): 5 / 6 x 16 pairs, 4 x 32 pairs
                       (16, 64, 4, 3, 5, 256, None, 96), (16, 64, 4, 3, 6, 256, None, 80),
                       (32, 64, 4, 3, 4, 256, None, 128)]


def stream_sweep(case: "Case", kern: str, iters: int, block_ms=None, capped_only: bool = False) -> None:
    """Time the STREAM_SWEEP configs of the case's regime on the streamed path (case.stream set),
    each run through L1 + L2 and checked against the reference (error printed) first.
    capped_only: only the entries with a register cap (their uncapped default is the case's own)."""
    H, I, wf, af = case.H, case.I, case.w13.format, case.act_format
    own = case.block_m
    kind = case.stream[0].kind
    if kind == "mxfp4":
        entries = FP4_STREAM_SWEEP_L1 if kern == "l1" else FP4_STREAM_SWEEP_L2
    else:
        entries = [e[:5] + (gh.GEMM_BLOCK_K,) + e[5:] for e in (STREAM_SWEEP_L1 if kern == "l1" else STREAM_SWEEP_L2)]
    for entry in entries:
        bm, bn, warps, stages, ctas, bk = entry[:6]
        if (bm <= 32) != (own <= 32) or (block_ms and bm not in block_ms) or (capped_only and len(entry) < 8):
            continue
        c1 = gh.l1_gemm_config(bm, H, I, wf, af, fp8_mainloop=True, act_rebased=True, weight_kind=kind)
        c2 = gh.l2_gemm_config(bm, H, I, wf, af, "bf16", fp8_mainloop=True, act_rebased=True, weight_kind=kind)
        var = dataclasses.replace(c1 if kern == "l1" else c2, block_n=bn, num_warps=warps, num_stages=stages,
                                  ctas_per_sm=ctas, block_k=bk)
        if len(entry) > 6 and entry[6] is not None:      # an entry's own promotion (L1: gh._CHAIN = none inside K)
            var = dataclasses.replace(var, promote_steps=entry[6])
        if len(entry) > 7:      # a register cap (maxnreg)
            var = dataclasses.replace(var, max_registers=entry[7])
        c1, c2 = (var, c2) if kern == "l1" else (c1, var)
        try:
            case.retile(bm)
            case.rebase_x()
            case.l1(c1)
            case.rebase_h()
            case.l2(c2)
            torch.cuda.synchronize()
            err = case.check(tol=1.0)
            us = gpu_time_us((lambda: case.l1(c1)) if kern == "l1" else (lambda: case.l2(c2)), iters)
            print(f"    stream sweep {kern} {_cfg_txt(var)}: {us:.1f} us, rel-RMSE {err:.2e} "
                  f"({case.tiles(bm)} tiles)", flush=True)
        except BaseException as exc:  # e.g. out of shared memory: report, go on
            if isinstance(exc, KeyboardInterrupt):
                raise
            print(f"    stream sweep {kern} {_cfg_txt(var)} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        finally:
            case.retile(own)


def _cfg_txt(cfg) -> str:
    return (f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages} c{cfg.ctas_per_sm} "
            f"p{cfg.promote_steps}" + (f" r{cfg.max_registers}" if cfg.max_registers else ""))


def sweep(case: Case, kern: str, base, iters: int, base_us: float):
    """(best us, its config) over the heuristic's config (base_us) and SWEEP_L1 / SWEEP_L2 entries of
    the case's regime (decode: block_m <= 32); each configuration is checked against the reference
    before it is timed. A different block_m rebuilds the tile map (restored afterwards)."""
    best = (base_us, base)
    own_bm = case.block_m
    decode = own_bm <= 32
    variants = [dataclasses.replace(base, block_m=bm, block_n=bn, num_warps=warps, num_stages=stages,
                                    ctas_per_sm=ctas)
                for bm, bn, warps, stages, ctas in (SWEEP_L1 if kern == "l1" else SWEEP_L2) if (bm <= 32) == decode]
    # FP8 mainloop: how often the FP8 MMA's partial sums are promoted to the float32 accumulator.
    if case.use_fp8:
        variants += [dataclasses.replace(base, promote_steps=p) for p in SWEEP_PROMOTE]
    for cfg in variants:
        bm = cfg.block_m
        if cfg == base:
            continue
        try:
            case.retile(bm)
            if kern == "l1":
                fn = lambda c=cfg: case.l1(c)  # noqa: E731
                fn()
                case.l2(dataclasses.replace(gh.l2_gemm_config(bm, case.H, case.I, case.w2.format, case.act_format,
                                                              "bf16")))
            else:
                case.l1(gh.l1_gemm_config(bm, case.H, case.I, case.w13.format, case.act_format))
                fn = lambda c=cfg: case.l2(c)  # noqa: E731
                fn()
            torch.cuda.synchronize()
            case.check()
            us = gpu_time_us(fn, iters)
        except BaseException as exc:  # e.g. out of shared memory for this tile: report, go on
            if isinstance(exc, KeyboardInterrupt):
                raise
            print(f"sweep: {kern} {_cfg_txt(cfg)} failed: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        finally:
            case.retile(own_bm)
        print(f"  sweep {kern} {_cfg_txt(cfg)}: {us:.1f} us", flush=True)
        if us < best[0]:
            best = (us, cfg)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON output path")
    p.add_argument("--cases", default=DEFAULT_CASES,
                   help="comma-separated t:E:A = t routed pairs on each of A active experts out of E local")
    p.add_argument("--formats", default="mxfp4/fp8", help="weight/act pairs")
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--sweep", action="store_true", help="also time the SWEEP_L1 / SWEEP_L2 tile configs")
    p.add_argument("--fp8-mainloop", action="store_true",
                   help="also time the Hopper FP8 mainloop (MegaMoEConfig.hopper_fp8_mainloop) on each case")
    p.add_argument("--stream", action="store_true",
                   help="also time the streamed FP8 mainloop (x / h rebased first; MXFP4 expanded to E4M3 at "
                        "load), checked against the reference first")
    p.add_argument("--fp8-block-scales", action="store_true",
                   help="FP8 weights with their block scales times 1.3 (not powers of two: the 'fp8_block' operand)")
    p.add_argument("--stream-kinds", default="mxfp4,fp4_as_fp8",
                   help="with --stream, MXFP4 weights: the operands timed (4-bit 'mxfp4', 8-bit 'fp4_as_fp8', 4-bit in "
                        "the \"lane\" K order 'mxfp4_lane': `gemm_operands.LANE_K_ORDER`)")
    p.add_argument("--gluon", action="store_true",
                   help="with --stream: also time L1 / L2 on the warp-specialised Gluon kernels (`kernels.l1_gluon`, "
                        "`l2_gluon`), their output compared with the Triton kernels' first; at 128-row tiles also "
                        "L1 with the token rows in pair order (one TMA box per tile) and the copy that orders them, "
                        "and with its decode ahead (`l1_gluon.DECODE_AHEAD`)")
    p.add_argument("--profile", action="store_true",
                   help="with --gluon: after each Gluon L1 / L2 timing, one launch built with its cycle counters "
                        "(`l1_gluon.PROFILE`, `l2_gluon.PROFILE`): where its MMA warpgroup's cycles go")
    p.add_argument("--stream-sweep", action="store_true",
                   help="with --stream: also time the STREAM_SWEEP_L1 / STREAM_SWEEP_L2 configs (each checked)")
    p.add_argument("--stream-sweep-bms", default="",
                   help="with --stream-sweep: only these tile heights' entries, e.g. 16")
    p.add_argument("--stream-sweep-capped", action="store_true",
                   help="with --stream-sweep: only the entries with a register cap (maxnreg)")
    p.add_argument("--stream-promotes", default="",
                   help="with --stream: also time promotion every N K steps, e.g. 1,2,4 (error reported)")
    p.add_argument("--block-ms", default="",
                   help="comma-separated tile heights also timed (each with its heuristic config, checked "
                        "against the reference first), e.g. 64,128")
    p.add_argument("--fp4-decoders", action="store_true",
                   help="MXFP4 weights, bf16 mainloop: also time the 'lut' decoder (checked bitwise "
                        "against the default decoder first)")
    args = p.parse_args()
    bad = set(args.stream_kinds.split(",")) - {"mxfp4", "fp4_as_fp8", "mxfp4_lane"}
    if bad:
        p.error(f"--stream-kinds: expected 'mxfp4', 'fp4_as_fp8' or 'mxfp4_lane', got {sorted(bad)}")
    global PROFILE_GLUON
    PROFILE_GLUON = args.profile
    from mega_moe_layer.kernels import l1_gluon, l2_gluon
    # the kernels timed are the Triton ones (each launch's config as the layer's); --gluon times the
    # Gluon kernels beside them, never in their place (`gluon_us`)
    l1_gluon.ENABLED = l2_gluon.ENABLED = False
    # the Gluon timings are of the plain loop; `ahead_us` times the decode-ahead one beside it
    l1_gluon.DECODE_AHEAD = l2_gluon.DECODE_AHEAD = False
    if args.iters < 20:
        raise SystemExit("--iters: use at least 20 runs for a stable median")
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    H, I = args.hidden, args.intermediate
    cases = []
    for c in args.cases.split(","):
        if c.startswith("u"):                    # uT:E -> T tokens routed uniformly over E experts
            T, E = (int(v) for v in c[1:].split(":"))
            cases.append((0, E, 0, T))
        else:
            t, E, A = (int(v) for v in c.split(":"))
            cases.append((t, E, A, 0))
    E_max = max(c[1] for c in cases)
    copy_bw = hbm_copy_gbps(args.iters)
    name = torch.cuda.get_device_name(0)
    print(f"{name}, torch {torch.__version__}, triton {triton.__version__}; HBM copy (read+write) "
          f"{copy_bw:.0f} GB/s", flush=True)

    rows, table = [], []
    for fmt in args.formats.split(","):
        wf, af = fmt.split("/")
        w13_all = quantized_weights(E_max, 2 * I, H, wf, seed=1)
        w2_all = quantized_weights(E_max, H, I, wf, seed=2)
        if args.fp8_block_scales and wf == "fp8":
            # block scales that are not powers of two (checkpoints from elsewhere: "fp8_block")
            w13_all, w2_all = (formats.QuantizedWeight("fp8", q.data, q.scale * 1.3, q.shape) for q in (w13_all, w2_all))
        for t, E, A, T_routed in cases:
            w13, w2 = (formats.QuantizedWeight(q.format, q.data[:E], None if q.scale is None else q.scale[:E],
                                               (E,) + tuple(q.shape[1:])) for q in (w13_all, w2_all))
            case = Case(w13, w2, t, af, seed=t + T_routed, active=A, routed_tokens=T_routed)
            t, A = case.t, len(case.active)
            case.l1()
            case.l2()
            torch.cuda.synchronize()
            err = case.check()
            for kern, fn, flops in (("l1", case.l1, 2.0 * case.P * 2 * I * H), ("l2", case.l2, 2.0 * case.P * H * I)):
                us = gpu_time_us(fn, args.iters)
                alt_us = None
                if args.fp8_mainloop and case.w13_fp8.kind != "raw":   # the FP8 mainloop, checked first
                    case.use_fp8 = True
                    try:
                        case.l1()
                        case.l2()
                        torch.cuda.synchronize()
                        case.check(tol=2e-2)   # its own tolerance entry (tests/utils.py)
                        alt_us = gpu_time_us(fn, args.iters)
                    finally:
                        case.use_fp8 = False
                        case.l1()
                        case.l2()
                    print(f"  {kern} {wf}/{af} {case.label()}: bf16 mainloop {us:.1f} us, fp8 mainloop {alt_us:.1f} us",
                          flush=True)
                stream_us = {}
                for skind in ((tuple(args.stream_kinds.split(",")) if wf == "mxfp4" else ("fp8",))
                              if args.stream else ()):
                    as_fp8, lane = skind == "fp4_as_fp8", skind == "mxfp4_lane"
                    if not case.stream_setup(as_fp8, lane):
                        break
                    name = "fp4_as_fp8" if as_fp8 else ("mxfp4_lane" if lane else case.stream[0].kind)
                    try:
                        case.rebase_x()
                        case.l1()
                        case.rebase_h()
                        case.l2()
                        torch.cuda.synchronize()
                        serr = case.check(tol=1.0)   # reported, not fatal
                        run = case.l1 if kern == "l1" else case.l2
                        rb = case.rebase_x if kern == "l1" else case.rebase_h
                        stream_us[name] = (gpu_time_us(run, args.iters), gpu_time_us(rb, args.iters), serr)
                        if args.gluon:
                            gluon_us(case, kern, name, args.iters, stream_us)
                        for prom in (int(v) for v in args.stream_promotes.split(",") if v):
                            if case.stream[0].kind == "mxfp4" and prom > 1 and chained_fp4_hazards():
                                print(f"    {kern} streamed ({name}) promote every {prom}: not for 4-bit words with "
                                      "this Triton (`l1_gemm._check_promote`)", flush=True)
                                continue
                            # the other kernel at its default; this one promoting every `prom` steps
                            cfg_of = gh.l1_gemm_config if kern == "l1" else gh.l2_gemm_config
                            extra = () if kern == "l1" else ("bf16",)
                            pc = dataclasses.replace(cfg_of(case.block_m, H, I, wf, af, *extra, fp8_mainloop=True,
                                                            act_rebased=True, weight_kind=case.stream[0].kind),
                                                     promote_steps=prom)
                            case.rebase_x()
                            case.l1(pc if kern == "l1" else None)
                            case.rebase_h()
                            case.l2(pc if kern == "l2" else None)
                            torch.cuda.synchronize()
                            perr = case.check(tol=1.0)
                            pus = gpu_time_us((lambda: case.l1(pc)) if kern == "l1" else (lambda: case.l2(pc)),
                                              args.iters)
                            stream_us[f"{name} promote {prom}"] = (pus, None, perr)
                            print(f"    {kern} streamed ({name}) promote every {prom}: {pus:.1f} us, rel-RMSE "
                                  f"{perr:.2e}", flush=True)
                        if args.stream_sweep:
                            stream_sweep(case, kern, args.iters,
                                         [int(v) for v in args.stream_sweep_bms.split(",") if v],
                                         capped_only=args.stream_sweep_capped)
                    finally:
                        case.stream = None
                        case.l1()
                        case.l2()
                    print(f"  {kern} {wf}/{af} {case.label()}: bf16 mainloop {us:.1f} us, streamed fp8 ({name}) "
                          f"{stream_us[name][0]:.1f} us + rebase pass {stream_us[name][1]:.1f} us, rel-RMSE "
                          f"{stream_us[name][2]:.2e}", flush=True)
                lut_us = None
                if args.fp4_decoders and wf == "mxfp4" and case.w13_op.kind == "raw":
                    lut_us = decoder_us(case, kern, args.iters, "lut")
                    print(f"  {kern} {wf}/{af} {case.label()}: fp4 decoder shift {us:.1f} us, lut {lut_us:.1f} us "
                          f"(outputs bitwise equal)", flush=True)
                # Weight bytes of the experts with pairs: what the kernel must read at least once.
                wq = w13 if kern == "l1" else w2
                wbytes = weight_bytes(wq) * A // E
                copy_us = same_bytes_copy_us(wbytes, args.iters)
                K, N = (H, 2 * I) if kern == "l1" else (I, H)
                dense_us = bf16_matmul_us(case.P, K, N, args.iters)
                sgmm_us = scaled_grouped_mm_us(case, kern, args.iters) if t >= 64 else None
                cfg = (gh.l1_gemm_config(case.block_m, H, I, wf, af) if kern == "l1"
                       else gh.l2_gemm_config(case.block_m, H, I, wf, af, "bf16"))
                wgbps = wbytes / (us * 1e-6) / 1e9
                row = dict(weight_format=wf, act_format=af, pairs_per_expert=t, local_experts=E, active_experts=A,
                           pairs=case.P, kernel=kern, us=us, tflops=flops / (us * 1e-6) / 1e12, weight_bytes=wbytes,
                           weight_GBps=wgbps, weight_frac_of_copy=wgbps / copy_bw, same_bytes_copy_us=copy_us,
                           bf16_matmul_us=dense_us, bf16_matmul_tflops=flops / (dense_us * 1e-6) / 1e12,
                           scaled_grouped_mm_us=sgmm_us, check_rel_rmse=err, config=cfg.__dict__,
                           mainloop=case.w13_op.kind, fp8_mainloop_us=alt_us, lut_decoder_us=lut_us,
                           streamed_us=stream_us)
                rows.append(row)
                sg_txt = "- | -" if sgmm_us is None else f"{sgmm_us:.1f} | {sgmm_us / us:.2f}x"
                line = (f"| {wf}/{af} | {t}x{A}/{E} | {kern.upper()} | {us:.1f} | {row['tflops']:.1f} | {wgbps:.0f} | "
                        f"{100 * wgbps / copy_bw:.0f}% | {copy_us:.1f} | {dense_us:.1f} | "
                        f"{row['bf16_matmul_tflops']:.1f} | {sg_txt} | {_cfg_txt(cfg)} |")
                print(line, flush=True)
                if args.block_ms:
                    row["block_m_us"] = block_m_us = {}
                    for bm in (int(v) for v in args.block_ms.split(",")):
                        if bm != case.block_m:
                            block_m_us[bm] = other_block_m_us(case, kern, bm, args.iters)
                            print(f"  {kern} {wf}/{af} {case.label()}: block_m {case.block_m} {us:.1f} us, "
                                  f"block_m {bm} {block_m_us[bm]:.1f} us ({case.tiles(bm)} vs "
                                  f"{case.tiles(case.block_m)} tiles)", flush=True)
                if args.sweep:
                    best_us, best_cfg = sweep(case, kern, cfg, args.iters, us)
                    row.update(best_sweep_us=best_us, best_sweep_config=best_cfg.__dict__)
                    line += f" {best_us:.1f} ({_cfg_txt(best_cfg)}) |"
                table.append(line)
                with open(args.out, "w") as f:   # after every row: a timeout keeps what was measured
                    json.dump(dict(device=name, torch=torch.__version__, triton=triton.__version__,
                                   hbm_copy_GBps=copy_bw, iters=args.iters, hidden=H, intermediate=I, rows=rows),
                              f, indent=2)
            del case, w13, w2
            torch.cuda.empty_cache()
        del w13_all, w2_all
        torch.cuda.empty_cache()

    print(f"\n{name}, torch {torch.__version__}, triton {triton.__version__}; HBM copy (read+write) "
          f"{copy_bw:.0f} GB/s; H={H}, I={I}; median of {args.iters}\n")
    head = ("| weights/acts | pairs x active/local experts | kernel | us | TFLOP/s | weight GB/s | of copy BW "
            "| same-bytes copy us | bf16 matmul us | bf16 matmul TFLOP/s | fp8 _scaled_grouped_mm us | its time / ours "
            "| config |")
    if args.sweep:
        head += " best sweep us (config) |"
    print("\n".join([head, "|" + "---|" * (14 if args.sweep else 13)] + table))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
