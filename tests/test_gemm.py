"""Grouped expert GEMMs (kernels/l1_gemm.py, l2_gemm.py, gemm_heuristics.py) on the CPU.

* The tile map, exactly, against a plain loop; the heuristics' invariants (pure functions).
* The kernels in Triton's interpreter (conftest sets TRITON_INTERPRET=1 on machines without a GPU;
  elsewhere one test reruns them in a child process with it set) against
  `reference.expert_forward`, at tiny shapes: every weight x act format, both combine formats,
  the Blackwell `tl.dot_scaled` path (arch=100 runs it in the interpreter), the clamp, group 128,
  an expert with 0 pairs, a partial tile, more work items than programs (persistent loop), rows
  and destinations that must stay untouched. The interpreter computes in float32 like the GPU and
  the kernels round with integer operations, so results match the reference almost bitwise; the
  asserted tolerance is still the DESIGN's GEMM rel-RMSE.
* Compile checks (one child process without the interpreter): sm_90a for every weight x act
  format (Hopper wgmma, no spills at the decode tiles of DeepSeek-V3's shape), sm_100a with the
  native block-scaled tcgen05 MMA for MXFP4 weights x FP4 / FP8 activations.

The problem builder and checkers are shared with tests/test_gemm_gpu.py.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import re
import subprocess
import sys
from typing import Dict, Optional, Sequence

import pytest
import torch
import triton

from mega_moe_layer import formats
from mega_moe_layer.kernels import gemm_heuristics as gh
from mega_moe_layer.kernels import reference as ref
from mega_moe_layer.kernels import gemm_operands as go
from mega_moe_layer.kernels.gemm_operands import uses_fp8_mma
from mega_moe_layer.kernels.l1_gemm import _l1_kernel, _resident_grid, build_tile_map, l1_grouped_gemm, sf_words_p2
from mega_moe_layer.kernels.l2_gemm import _l2_kernel, l2_grouped_gemm
from mega_moe_layer.kernels.rebase import rebase_act_rows
from utils import TOLERANCES, assert_rel_rmse, covered_once

WEIGHT_FORMATS = ("mxfp4", "fp8", "bf16")
ACT_FORMATS = ("fp8", "fp4", "bf16")
COMBOS = [(w, a) for w in WEIGHT_FORMATS for a in ACT_FORMATS]
POISON = 0x7F
#: Fraction of quantised h bytes that must equal the reference's. Only the float32 accumulation
#: order differs from the reference's float64 (DESIGN), which moves a value across a rounding
#: boundary of bf16 gate/up or of the h format in a small fraction of elements.
H_BYTES_MIN_FRACTION = 0.99
#: The same on the GPU's streamed FP8 mainloop with FP8 weights at K = 7168: Hopper's FP8 MMA keeps
#: ~14 mantissa bits (truncating) while it sums each promoted step, so more values cross a rounding
#: boundary. Measured 0.9874 (H100, 2026-12-07, `test_gemm_gpu.py::test_over_rows_dsv3[fp8]`;
#: MXFP4 weights, whose products carry fewer bits, pass 0.99).
H_BYTES_MIN_FRACTION_FP8_MMA = 0.98

INTERPRETED = not isinstance(_l1_kernel, triton.runtime.jit.JITFunction)


# =================================================================================================
# Problem builder and checks (shared with test_gemm_gpu.py)
# =================================================================================================
@dataclasses.dataclass
class GemmProblem:
    """One rank's routed pairs, sorted by local expert, with weights and the tile map.

    Pair positions [0, P) where P = sum(counts) + slack: positions >= sum(counts) belong to no
    expert (the kernels must not write their rows).
    """

    hidden: int
    inter: int
    counts: Sequence[int]
    weight_format: str
    act_format: str
    act_group_size: int
    clamp: Optional[float]
    block_m: int
    pool_x: torch.Tensor
    pool_x_sf: Optional[torch.Tensor]
    pair_rows: torch.Tensor          # int32 [P]
    pair_weights: torch.Tensor       # float32 [P]
    expert_offsets: torch.Tensor     # int32 [E + 1]
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor
    num_tiles: torch.Tensor
    w13: formats.QuantizedWeight     # [E, 2I, H]
    w2: formats.QuantizedWeight      # [E, H, I]
    w13_f32: torch.Tensor
    w2_f32: torch.Tensor
    w13_op: Optional[object] = None  # gemm_operands.WeightOperand, prepared once (as load_weights does)
    w2_op: Optional[object] = None

    @property
    def num_pairs(self) -> int:
        return self.pair_rows.shape[0]

    @property
    def num_routed(self) -> int:
        return int(sum(self.counts))

    def segments(self):
        """(expert, start, end) of every expert with pairs."""
        off = [0]
        for c in self.counts:
            off.append(off[-1] + c)
        return [(e, off[e], off[e + 1]) for e in range(len(self.counts)) if off[e + 1] > off[e]]


def make_problem(hidden: int, inter: int, counts: Sequence[int], weight_format: str, act_format: str, *,
                 act_group_size: int = 32, clamp: Optional[float] = None, block_m: int = 16, slack: int = 3,
                 seed: int = 0, device="cpu", fp8_mainloop: bool = False, fp4_as_fp8: bool = False,
                 lane_k: bool = False) -> GemmProblem:
    """Random problem: x ~ N(0, 1) in the pool (quantised by the reference codecs), weights scaled
    so gate/up/h/y are O(1), pair rows drawn with repeats from a pool larger than the pairs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    E = len(counts)
    P = int(sum(counts)) + slack
    npool = P + 5
    w13 = (torch.randn(E, 2 * inter, hidden, generator=gen, device=device) * hidden ** -0.5).to(torch.bfloat16)
    w2 = (torch.randn(E, hidden, inter, generator=gen, device=device) * inter ** -0.5).to(torch.bfloat16)
    q13, q2 = formats.quantize_weight(w13, weight_format), formats.quantize_weight(w2, weight_format)
    x = torch.randn(npool, hidden, generator=gen, device=device).to(torch.bfloat16)
    pool_x, pool_x_sf = ref.quantize_act(x, act_format, act_group_size)
    pair_rows = torch.randint(0, npool, (P,), generator=gen, device=device).to(torch.int32)
    pair_weights = (torch.rand(P, generator=gen, device=device) + 0.1).float()
    offsets = torch.zeros(E + 1, dtype=torch.int32, device=device)
    offsets[1:] = torch.cumsum(torch.tensor(list(counts), device=device), 0).to(torch.int32)
    mt = gh.max_tiles(P, E, block_m)
    i32 = dict(dtype=torch.int32, device=device)
    tile_expert, tile_row_start, num_tiles = torch.empty(mt, **i32), torch.empty(mt, **i32), torch.empty(1, **i32)
    build_tile_map(offsets, block_m, mt, tile_expert, tile_row_start, num_tiles)
    arch = 90
    if torch.device(device).type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        arch = 10 * major + minor
    ops = [go.prepare_weight_operand(q.format, q.data, q.scale, arch=arch, act_format=act_format,
                                     fp8_mainloop=fp8_mainloop, fp4_as_fp8=fp4_as_fp8, lane_k=lane_k)
           for q in (q13, q2)]
    return GemmProblem(hidden, inter, list(counts), weight_format, act_format, act_group_size, clamp, block_m,
                       pool_x, pool_x_sf, pair_rows, pair_weights, offsets, tile_expert, tile_row_start, num_tiles,
                       q13, q2, q13.dequantize(), q2.dequantize(), *ops)


def poisoned(shape, dtype, device) -> torch.Tensor:
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    return torch.full((nbytes,), POISON, dtype=torch.uint8, device=device).view(dtype).reshape(shape)


def h_buffers(prob: GemmProblem, device):
    """Poisoned (h [P, I or I/2], h_sf int32 [P, I/128] or None)."""
    P, I = prob.num_pairs, prob.inter
    if prob.act_format == "fp8":
        h = poisoned((P, I), torch.float8_e4m3fn, device)
    elif prob.act_format == "fp4":
        h = poisoned((P, I // 2), torch.int8, device)
    else:
        h = poisoned((P, I), torch.bfloat16, device)
    h_sf = None if prob.act_format == "bf16" else poisoned((P, I // 128), torch.int32, device)
    return h, h_sf


def run_l1(prob: GemmProblem, **kw):
    h, h_sf = h_buffers(prob, prob.pool_x.device)
    run_l1_into(prob, h, h_sf, **kw)
    return h, h_sf


def run_l1_into(prob: GemmProblem, h, h_sf, **kw) -> None:
    l1_grouped_gemm(prob.pool_x, prob.pool_x_sf, prob.pair_rows, prob.pair_weights, prob.expert_offsets,
                    prob.tile_expert, prob.tile_row_start, prob.num_tiles, *kw.pop("w13", (prob.w13.data, prob.w13.scale)),
                    h, h_sf, weight_format=prob.weight_format, act_format=prob.act_format,
                    act_group_size=prob.act_group_size, activation_clamp=prob.clamp, block_m=prob.block_m,
                    **{"w13_operand": prob.w13_op, **kw})


@dataclasses.dataclass
class Destinations:
    """Combine-like destination rows at scattered positions: pair p -> row dest_row[p] (-1 = skip)."""

    out: torch.Tensor                 # bf16 [R, H] or float8_e4m3fn [R, H], poisoned
    out_sf: Optional[torch.Tensor]    # int32 [R, H/512] (fp8), poisoned
    dest_row: torch.Tensor            # int64 [P] (cpu)
    pair_dst: torch.Tensor            # int64 [P] absolute addresses (0 = skip)
    pair_dst_sf: Optional[torch.Tensor]


def make_destinations(prob: GemmProblem, combine_format: str, skip: Sequence[int] = (),
                      seed: int = 0) -> Destinations:
    device = prob.pool_x.device
    P, H = prob.num_pairs, prob.hidden
    R = P + 4
    gen = torch.Generator().manual_seed(seed + 7)
    dest_row = torch.randperm(R, generator=gen)[:P].to(torch.int64)
    dest_row[list(skip)] = -1
    if combine_format == "fp8":
        nw = -(-H // 512)
        out, out_sf = poisoned((R, H), torch.float8_e4m3fn, device), poisoned((R, nw), torch.int32, device)
        row_bytes, sf_bytes = H, 4 * nw
    else:
        out, out_sf = poisoned((R, H), torch.bfloat16, device), None
        row_bytes = 2 * H
    keep = dest_row >= 0
    dst = torch.where(keep, out.data_ptr() + dest_row.clamp_min(0) * row_bytes, torch.zeros_like(dest_row))
    dst_sf = None
    if out_sf is not None:
        dst_sf = torch.where(keep, out_sf.data_ptr() + dest_row.clamp_min(0) * sf_bytes, torch.zeros_like(dest_row))
        dst_sf = dst_sf.to(device)
    return Destinations(out, out_sf, dest_row, dst.to(device), dst_sf)


def run_l2(prob: GemmProblem, h, h_sf, combine_format: str, dest: Destinations, **kw) -> None:
    l2_grouped_gemm(h, h_sf, prob.expert_offsets, prob.tile_expert, prob.tile_row_start, prob.num_tiles,
                    prob.w2.data, prob.w2.scale, dest.pair_dst, dest.pair_dst_sf, weight_format=prob.weight_format,
                    act_format=prob.act_format, combine_format=combine_format, hidden=prob.hidden,
                    block_m=prob.block_m, **{"w2_operand": prob.w2_op, **kw})


def reference_h(prob: GemmProblem):
    """DESIGN steps 2-5 per routed pair, as `reference.expert_forward` computes them:
    (float32 h [n, I] before quantisation, quantised data, packed scales or None) for positions
    [0, num_routed)."""
    x = ref.dequantize_act(prob.pool_x[prob.pair_rows.long()], None if prob.pool_x_sf is None else
                           prob.pool_x_sf[prob.pair_rows.long()], prob.act_format, prob.act_group_size).double()
    I = prob.inter
    h = torch.zeros(prob.num_routed, I, dtype=torch.float32, device=x.device)
    for e, s, t in prob.segments():
        gu = (x[s:t] @ prob.w13_f32[e].double().t()).to(torch.bfloat16).double()
        gate, up = gu[:, :I], gu[:, I:]
        if prob.clamp is not None:
            gate = torch.clamp(gate, max=float(prob.clamp))
            up = torch.clamp(up, -float(prob.clamp), float(prob.clamp))
        h[s:t] = (gate * torch.sigmoid(gate) * up * prob.pair_weights[s:t].double().unsqueeze(-1)).float()
    hq, hsf = ref.quantize_act(h, prob.act_format, 32)
    return h, hq, hsf


def reference_y(prob: GemmProblem) -> torch.Tensor:
    """`reference.expert_forward` per expert: bf16 [num_routed, H]."""
    rows = prob.pair_rows.long()
    y = torch.zeros(prob.num_routed, prob.hidden, dtype=torch.bfloat16, device=prob.pool_x.device)
    for e, s, t in prob.segments():
        y[s:t] = ref.expert_forward(prob.pool_x[rows[s:t]], None if prob.pool_x_sf is None else
                                    prob.pool_x_sf[rows[s:t]], prob.pair_weights[s:t], prob.w13_f32[e],
                                    prob.w2_f32[e], act_format=prob.act_format,
                                    act_group_size=prob.act_group_size, activation_clamp=prob.clamp)
    return y


def bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def check_l1(prob: GemmProblem, h, h_sf, what: str = "",
             min_same: float = H_BYTES_MIN_FRACTION) -> Dict[str, float]:
    """h rows of routed pairs vs the reference (dequantised rel-RMSE, fraction of equal bytes, at
    least min_same); rows beyond the routed pairs untouched. Returns the metrics."""
    n = prob.num_routed
    _, hq, hsf = reference_h(prob)
    got = ref.dequantize_act(h[:n], None if h_sf is None else h_sf[:n], prob.act_format, 32)
    want = ref.dequantize_act(hq, hsf, prob.act_format, 32)
    err = assert_rel_rmse(got, want, TOLERANCES["gemm_rel_rmse"], f"{what} h")
    same = float((bytes_of(h[:n]) == bytes_of(hq)).float().mean())
    sf_same = 1.0 if h_sf is None else float((bytes_of(h_sf[:n]) == bytes_of(hsf)).float().mean())
    assert same >= min_same, f"{what}: only {same:.4f} of the h bytes equal the reference's"
    assert sf_same >= min_same, f"{what}: only {sf_same:.4f} of the h scale bytes equal the reference's"
    assert bool((bytes_of(h[n:]) == POISON).all()), f"{what}: h rows beyond the routed pairs were written"
    if h_sf is not None:
        assert bool((bytes_of(h_sf[n:]) == POISON).all()), f"{what}: h_sf rows beyond the routed pairs were written"
    return {"h_rel_rmse": err, "h_bytes_equal": same, "h_sf_bytes_equal": sf_same}


def gather_y(dest: Destinations, combine_format: str, n: int) -> torch.Tensor:
    """float32 [n, H] of the first n pairs' destination rows (dequantised for fp8), NaN rows for
    skipped pairs."""
    rows = dest.dest_row[:n].clamp_min(0).to(dest.out.device)
    if combine_format == "fp8":
        y = ref.combine_dequantize(dest.out[rows], dest.out_sf[rows])
    else:
        y = dest.out[rows].float()
    return torch.where((dest.dest_row[:n] >= 0).to(y.device)[:, None], y, float("nan"))


def check_l2(prob: GemmProblem, dest: Destinations, combine_format: str, y_want: torch.Tensor,
             what: str = "") -> Dict[str, float]:
    """Destination rows of routed, non-skipped pairs vs y_want (bf16 [num_routed, H]; rounded
    through the FP8 combine codec when combine_format is fp8); every other byte untouched."""
    n = prob.num_routed
    keep = (dest.dest_row[:n] >= 0).to(y_want.device)
    got = gather_y(dest, combine_format, n)[keep]
    if combine_format == "fp8":
        q, s = ref.combine_quantize(y_want)
        want = ref.combine_dequantize(q, s)[keep]
        rows = dest.dest_row[:n][keep.cpu()].to(dest.out.device)
        same = float((bytes_of(dest.out[rows]) == bytes_of(q[keep])).float().mean())
    else:
        want = y_want.float()[keep]
        rows = dest.dest_row[:n][keep.cpu()].to(dest.out.device)
        same = float((bytes_of(dest.out[rows]) == bytes_of(y_want[keep])).float().mean())
    err = assert_rel_rmse(got, want, TOLERANCES["gemm_rel_rmse"], f"{what} y")
    written = torch.zeros(dest.out.shape[0], dtype=torch.bool)
    written[dest.dest_row[:n][keep.cpu()]] = True
    untouched = (~written).to(dest.out.device)
    assert bool((bytes_of(dest.out[untouched]) == POISON).all()), f"{what}: a row without a live pair was written"
    if dest.out_sf is not None:
        assert bool((bytes_of(dest.out_sf[untouched]) == POISON).all()), \
            f"{what}: a scale row without a live pair was written"
    return {"y_rel_rmse": err, "y_bytes_equal": same}


# =================================================================================================
# Tile map and heuristics (pure)
# =================================================================================================
def _tile_map_loop(offsets, block_m, mt):
    te, tr = [-1] * mt, [0] * mt
    t = 0
    for e in range(len(offsets) - 1):
        for start in range(offsets[e], offsets[e + 1], block_m):
            if t < mt:
                te[t], tr[t] = e, start
            t += 1
    return te, tr, min(t, mt)


@pytest.mark.parametrize("counts,block_m", [([3, 0, 37], 16), ([0, 0, 0], 16), ([1], 16), ([16, 16, 17, 0, 5], 16),
                                            ([300, 1, 0, 64], 64), ([0, 129, 0], 128), ([33, 31, 32], 32)])
def test_build_tile_map_matches_a_loop(counts, block_m):
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    for mt in (gh.max_tiles(offsets[-1], len(counts), block_m), gh.max_tiles(offsets[-1], len(counts), block_m) + 5):
        te, tr, nt = (torch.full((mt,), 99, dtype=torch.int32), torch.full((mt,), 99, dtype=torch.int32),
                      torch.zeros(1, dtype=torch.int32))
        build_tile_map(torch.tensor(offsets, dtype=torch.int32), block_m, mt, te, tr, nt)
        want_te, want_tr, want_nt = _tile_map_loop(offsets, block_m, mt)
        assert te.tolist() == want_te and tr.tolist() == want_tr and nt.tolist() == [want_nt]


def test_build_tile_map_docstring_example_and_clamp():
    te, tr, nt = (torch.empty(n, dtype=torch.int32) for n in (6, 6, 1))
    build_tile_map(torch.tensor([0, 3, 3, 40]), 16, 6, te, tr, nt)
    assert te.tolist() == [0, 2, 2, 2, -1, -1] and tr.tolist() == [0, 3, 19, 35, 0, 0] and nt.tolist() == [4]
    te, tr = torch.empty(2, dtype=torch.int32), torch.empty(2, dtype=torch.int32)
    build_tile_map(torch.tensor([0, 3, 3, 40]), 16, 2, te, tr, nt)   # map too small: count clamped
    assert te.tolist() == [0, 2] and tr.tolist() == [0, 3] and nt.tolist() == [2]


def test_build_tile_map_rejects_bad_outputs():
    off = torch.tensor([0, 3], dtype=torch.int32)
    with pytest.raises(ValueError, match="out_tile_expert"):
        build_tile_map(off, 16, 4, torch.empty(3, dtype=torch.int32), torch.empty(4, dtype=torch.int32),
                       torch.empty(1, dtype=torch.int32))
    with pytest.raises(ValueError, match="out_num_tiles"):
        build_tile_map(off, 16, 4, torch.empty(4, dtype=torch.int32), torch.empty(4, dtype=torch.int32),
                       torch.empty(1, dtype=torch.int64))
    with pytest.raises(TypeError, match="expert_offsets"):
        build_tile_map(off.float(), 16, 4, *(torch.empty(n, dtype=torch.int32) for n in (4, 4, 1)))


def test_max_tiles():
    assert gh.max_tiles(100, 3, 16) == 10
    assert gh.max_tiles(0, 4, 16) == 4
    for counts in ([15, 1, 16, 17], [1] * 9, [0, 0, 100]):
        for bm in gh.GEMM_BLOCK_MS:
            assert sum(-(-c // bm) for c in counts) <= gh.max_tiles(sum(counts), len(counts), bm)
    with pytest.raises(ValueError):
        gh.max_tiles(10, 0, 16)


def test_gemm_block_m_choices():
    # Decode sizes keep the 16-row tile; a mean of 16 pairs per expert takes 32 (half the experts
    # would need a second 16-row tile); 32-row tiles up to ~35, 64 up to ~57, then 128 (from the
    # per-tile costs measured on an H200, `TILE_COST`).
    got = [gh.gemm_block_m(v) for v in (0, 0.03, 1, 4, 8, 12, 16, 24, 32, 48, 64, 128, 1024, 4096)]
    assert got == [16, 16, 16, 16, 16, 16, 32, 32, 32, 64, 128, 128, 128, 128]
    assert all(bm in gh.GEMM_BLOCK_MS for bm in got)
    with pytest.raises(ValueError, match="expected_pairs_per_expert"):
        gh.gemm_block_m(-1)
    with pytest.raises(ValueError, match="expected_pairs_per_expert"):
        gh.gemm_block_m(float("nan"))


def test_gemm_tile_plan_choices():
    """Two-height plans where one height pads badly (E 256 local experts, `TILE_COST`): decode
    keeps one 16-row height; T 512 (16 per expert) adds 16-row tails to 32-row tiles; T 4096 (128)
    cuts remainders of <= 32 pairs into 16-row tiles; the chosen plan never costs more than the
    best single height."""
    P = gh.TilePlan
    got = {lam: gh.gemm_tile_plan(lam, 256) for lam in (0, 0.03, 4, 16, 128)}
    assert got == {0: P(16, 16, 0), 0.03: P(16, 16, 0), 4: P(16, 16, 0), 16: P(32, 16, 16), 128: P(128, 16, 32)}
    for lam in (0.5, 4, 12, 16, 24, 48, 64, 96, 128, 300):
        plan = gh.gemm_tile_plan(lam, 256)
        single = gh.gemm_block_m(lam)
        cost = 256 * gh._expected_plan_cost(round(lam, 3), plan) + (gh.TAIL_LAUNCH_COST if plan.has_tail else 0)
        assert cost <= 256 * gh._expected_plan_cost(round(lam, 3), P.single(single)) + 1e-9, (lam, plan)
        if plan.has_tail:        # a tail tile set is cheaper than the main tile it replaces
            k = -(-plan.tail_max // plan.tail_block_m)
            assert k * gh.TILE_COST[plan.tail_block_m] < gh.TILE_COST[plan.block_m], plan
    # one local expert: the launches cost more than the padding saves
    assert not gh.gemm_tile_plan(16, 1).has_tail
    assert gh.split_counts(150, P(128, 16, 32)) == (1, 2)
    assert gh.split_counts(170, P(128, 16, 32)) == (2, 0)
    assert gh.split_counts(100, P(128, 16, 32)) == (1, 0)
    assert gh.split_counts(256, P(128, 16, 32)) == (2, 0)
    assert gh.split_counts(0, P(128, 16, 32)) == (0, 0)
    for bad in (dict(block_m=48, tail_block_m=16), dict(block_m=32, tail_block_m=64),
                dict(block_m=32, tail_block_m=16, tail_max=32), dict(block_m=32, tail_block_m=32, tail_max=4)):
        with pytest.raises(ValueError, match="TilePlan"):
            P(**bad)
    with pytest.raises(ValueError, match="num_local_experts"):
        gh.gemm_tile_plan(4, 0)


def test_tile_plan_over_rows():
    """Plans whose last full tile takes rows of its expert's remainder (`TilePlan.over`, the
    streamed FP8 mainloop): only at prefill heights; at T 4096 (128 per expert) the 128-row plan
    takes remainders <= 16 whole and the first 16 rows of those <= 48 (the rest: one 16-row tail
    tile); the expected cost beats the plan without."""
    P = gh.TilePlan
    for lam in (0.03, 4, 16):
        assert gh.gemm_tile_plan(lam, 256, over=True) == gh.gemm_tile_plan(lam, 256), lam
    plan = gh.gemm_tile_plan(128, 256, over=True)
    assert plan == P(128, 16, 48, 16) and plan.over_limit == 48
    assert gh._expected_plan_cost(128, plan) < gh._expected_plan_cost(128, gh.gemm_tile_plan(128, 256))
    assert [gh.split_counts(n, plan) for n in (100, 128, 140, 144, 145, 160, 176, 177, 256, 300)] == \
        [(1, 0), (1, 0), (1, 0), (1, 0), (1, 1), (1, 1), (1, 2), (2, 0), (2, 0), (2, 2)]
    assert [gh.over_rows(n, plan) for n in (100, 128, 140, 144, 145, 176, 177, 300)] == [0, 0, 12, 16, 16, 16, 0, 16]
    one = P(64, 64, 0, 16)            # one height: r <= 16 in the last full tile, else one more tile
    assert [gh.split_counts(n, one) for n in (20, 70, 80, 81, 130)] == [(1, 0), (1, 0), (1, 0), (2, 0), (2, 0)]
    assert one.over_limit == 16 and P(64, 64).over_limit == 0
    for bad in (dict(block_m=16, tail_block_m=16, over=16), dict(block_m=128, tail_block_m=128, over=8),
                dict(block_m=128, tail_block_m=16, tail_max=16, over=16)):
        with pytest.raises(ValueError, match="TilePlan.over"):
            P(**bad)


def test_build_tile_map_two_heights():
    """The torch tile maps of a two-height plan against `split_counts`, expert by expert, and
    every pair in exactly one tile."""
    g = torch.Generator().manual_seed(3)
    i32 = dict(dtype=torch.int32)
    for plan in (gh.TilePlan(128, 16, 32), gh.TilePlan(32, 16, 16), gh.TilePlan(64, 32, 32),
                 gh.TilePlan(128, 16, 48, 16), gh.TilePlan(64, 16, 32, 16)):
        counts = torch.randint(0, 3 * plan.block_m, (13,), generator=g)
        counts[3] = 0
        counts[4] = plan.block_m + plan.tail_max
        counts[5] = plan.block_m + plan.over
        off = torch.zeros(14, dtype=torch.int64)
        off[1:] = counts.cumsum(0)
        mt = gh.max_tiles(int(off[-1]), 13, 16)
        main = (torch.empty(mt, **i32), torch.empty(mt, **i32), torch.empty(1, **i32))
        tail = (torch.empty(mt, **i32), torch.empty(mt, **i32), torch.empty(1, **i32))
        build_tile_map(off, plan.block_m, mt, *main, tail_block_m=plan.tail_block_m, tail_max=plan.tail_max,
                       tail_out=tail, over=plan.over)
        per_e = torch.zeros(13, 2, dtype=torch.int64)
        for k, (te, trs, nt) in enumerate((main, tail)):
            assert bool((te[int(nt):] == -1).all()) and bool((trs[int(nt):] == 0).all())
            for j in range(int(nt)):
                per_e[int(te[j]), k] += 1
        assert covered_once(off, (*main, plan.block_m), (*tail, plan.tail_block_m), plan.over, plan.over_limit)
        assert [tuple(r) for r in per_e.tolist()] == [gh.split_counts(int(c), plan) for c in counts]
    with pytest.raises(ValueError, match="tail_out"):
        build_tile_map(off, 64, mt, *main, tail_block_m=32, tail_max=32)
    with pytest.raises(ValueError, match="tail_max"):
        build_tile_map(off, 64, mt, *main, tail_block_m=32, tail_max=64, tail_out=tail)


def test_resident_ctas():
    """CTAs of a compiled kernel that fit on a Hopper SM (what caps the persistent grids,
    `l1_gemm._resident_grid`): registers per warp rounded up to 256, 1 KB of shared memory
    reserved per CTA, 2048 threads."""
    assert gh.resident_ctas(151, 4, 45056) == 3          # 3 x 4 x 4864 = 58368 registers
    assert gh.resident_ctas(205, 4, 45056) == 2          # 3 x 4 x 6656 > 65536
    assert gh.resident_ctas(128, 4, 32768) == 4
    assert gh.resident_ctas(255, 4, 59392) == 2
    assert gh.resident_ctas(64, 4, 120 * 1024) == 1      # shared memory bound
    assert gh.resident_ctas(32, 8, 0) == 8               # threads bound (2048 / 256)
    assert gh.resident_ctas(255, 8, 0) == 1
    # not a GPU launch: the grid is kept
    assert _resident_grid(_l1_kernel, (99,), 4, torch.device("cpu"), (), {}) == (99,)


def test_register_cap_fits_the_ctas():
    """`register_cap`: the largest cap (a multiple of 8) at which the asked CTAs fit by registers,
    as `resident_ctas` counts them; 8 more would not fit (unless at ptxas's 255 ceiling)."""
    assert (gh.register_cap(4, 4), gh.register_cap(4, 5), gh.register_cap(4, 6), gh.register_cap(4, 3)) == \
        (128, 96, 80, 168)
    for warps in (1, 2, 4, 8):
        for ctas in range(1, 9):
            r = gh.register_cap(warps, ctas)
            assert r % 8 == 0 and 24 <= r <= 248
            assert gh.resident_ctas(r, warps, 0) >= min(ctas, 2048 // (32 * warps)), (warps, ctas, r)
            if r < 248:
                assert gh.resident_ctas(r + 8, warps, 0) < ctas, (warps, ctas, r)


def test_max_registers_reaches_the_launch():
    """A config's register cap is Triton's `maxnreg` launch option; none without one; bad caps
    raise naming the field. A decode tuple with a 4th element True caps at `register_cap`."""
    cfg = gh.l1_gemm_config(16, 7168, 2048, "mxfp4", "fp8", 90, fp8_mainloop=True, act_rebased=True,
                            weight_kind="mxfp4")
    assert "maxnreg" not in cfg.launch_options()
    assert cfg.launch_options() == dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    capped = dataclasses.replace(cfg, max_registers=128)
    assert capped.launch_options()["maxnreg"] == 128
    for bad in (100, 256, 16, True, 128.0):
        with pytest.raises(ValueError, match="max_registers"):
            dataclasses.replace(cfg, max_registers=bad)
    c = gh._stream_config(32, 32, prefill=(4, 3, 2), decode=(4, 3, 4, True), promote=1, block_k=256)
    assert (c.ctas_per_sm, c.max_registers) == (4, 128)
    assert gh._stream_config(32, 32, prefill=(4, 3, 2), decode=(4, 3, 3), promote=1).max_registers is None


def test_expected_tiles_matches_uniform_routing():
    """The Poisson estimate against the tiles of real uniform top-8 routing (bench.py's), CPU."""
    assert gh.expected_tiles(0, 16) == 0.0
    g = torch.Generator().manual_seed(0)
    for T, E in ((128, 256), (512, 256), (2048, 256), (4096, 256), (64, 32)):
        idx = torch.rand(T, E, generator=g).argsort(dim=1)[:, :8]
        counts = torch.bincount(idx.flatten(), minlength=E)
        for bm in gh.GEMM_BLOCK_MS:
            real = int((-(-counts // bm)).sum())
            est = E * gh.expected_tiles(T * 8 / E, bm)
            assert abs(est - real) <= 0.06 * real + 3, (T, E, bm, est, real)
    # an expert never needs fewer tiles than its mean asks for, nor more than one extra per sqrt
    for lam in (3.0, 40.0, 500.0):
        for bm in gh.GEMM_BLOCK_MS:
            t = gh.expected_tiles(lam, bm)
            assert lam / bm <= t <= lam / bm + 1


@pytest.mark.parametrize("arch", [90, 100])
@pytest.mark.parametrize("block_m", gh.GEMM_BLOCK_MS)
@pytest.mark.parametrize("wf,af", COMBOS)
def test_gemm_config_invariants(wf, af, block_m, arch):
    for H, I in ((7168, 2048), (256, 128), (512, 384), (4096, 1536)):
        c1 = gh.l1_gemm_config(block_m, H, I, wf, af, arch)
        assert c1.block_m == block_m and c1.block_k == 128 and I % c1.block_n == 0 and c1.block_n % 32 == 0
        if gh.uses_dot_scaled(arch, wf, af):
            assert 2 * c1.block_n == 128, "the block-scaled MMA needs 128 stacked gate+up rows"
        for comb in ("bf16", "fp8"):
            if comb == "fp8" and H % 512:
                continue
            c2 = gh.l2_gemm_config(block_m, H, I, wf, af, comb, arch)
            assert c2.block_m == block_m and c2.block_k == 128 and H % c2.block_n == 0
            if comb == "fp8" or gh.uses_dot_scaled(arch, wf, af):
                assert c2.block_n % 128 == 0
            for c in (c1, c2):
                assert c.num_warps in (4, 8) and 1 <= c.ctas_per_sm <= 4 and c.group_m >= 1
                assert c.grid(0, 132) == 0 and c.grid(5, 132) == 5 and c.grid(10**6, 132) == 132 * c.ctas_per_sm


def test_uses_dot_scaled():
    assert gh.uses_dot_scaled(100, "mxfp4", "fp4") and gh.uses_dot_scaled(103, "mxfp4", "fp8")
    assert not gh.uses_dot_scaled(90, "mxfp4", "fp4") and not gh.uses_dot_scaled(100, "mxfp4", "bf16")
    assert not gh.uses_dot_scaled(100, "fp8", "fp8") and not gh.uses_dot_scaled(120, "mxfp4", "fp4")


# =================================================================================================
# Wrapper validation (host only: nothing launched)
# =================================================================================================
def _small(wf="mxfp4", af="fp8"):
    return make_problem(256, 128, [3, 0, 5], wf, af, slack=2)


def test_l1_rejects_bad_arguments():
    prob = _small()
    h, h_sf = h_buffers(prob, "cpu")
    args = [prob.pool_x, prob.pool_x_sf, prob.pair_rows, prob.pair_weights, prob.expert_offsets, prob.tile_expert,
            prob.tile_row_start, prob.num_tiles, prob.w13.data, prob.w13.scale, h, h_sf]
    kw = dict(weight_format="mxfp4", act_format="fp8", act_group_size=32, activation_clamp=None, block_m=16)

    def call(i=None, value=None, **over):
        a = list(args)
        if i is not None:
            a[i] = value
        l1_grouped_gemm(*a, **{**kw, **over})

    with pytest.raises(ValueError, match="weight_format"):
        call(weight_format="int4")
    with pytest.raises(ValueError, match="act_group_size"):
        call(act_group_size=64)
    with pytest.raises(TypeError, match="h_out"):
        call(10, h.view(torch.int8))
    with pytest.raises(ValueError, match="h_sf_out"):
        call(11, h_sf[:, :0])
    with pytest.raises(TypeError, match="w13_scale"):
        call(9, prob.w13.scale.float())
    with pytest.raises(ValueError, match="pair_weights"):
        call(3, prob.pair_weights[:-1])
    with pytest.raises(ValueError, match="tile_row_start"):
        call(5, prob.tile_expert[:2], block_m=16)
    with pytest.raises(ValueError, match="tile_expert: 2 tiles"):
        a = list(args)
        a[5], a[6] = prob.tile_expert[:2], prob.tile_row_start[:2]
        l1_grouped_gemm(*a, **kw)
    with pytest.raises(ValueError, match="block_m"):
        call(block_m=48)
    with pytest.raises(ValueError, match="config.block_m"):
        call(config=gh.l1_gemm_config(32, 256, 128, "mxfp4", "fp8"))
    with pytest.raises(ValueError, match="activation_clamp"):
        call(activation_clamp=-1.0)


def test_block_m_is_inferred_from_the_map_when_unique():
    prob = make_problem(256, 128, [40, 0, 50], "bf16", "bf16", slack=10, block_m=32)   # P = 100
    h, h_sf = h_buffers(prob, "cpu")
    args = [prob.pool_x, prob.pool_x_sf, prob.pair_rows, prob.pair_weights, prob.expert_offsets, prob.tile_expert,
            prob.tile_row_start, prob.num_tiles, prob.w13.data, None, h, h_sf]
    kw = dict(weight_format="bf16", act_format="bf16", act_group_size=32, activation_clamp=None)
    if INTERPRETED:
        l1_grouped_gemm(*args, **kw)            # max_tiles(100, 3, 32) = 7: only block_m 32 fits
        check_l1(prob, h, h_sf, "inferred block_m")
    small = make_problem(256, 128, [1, 0, 2], "bf16", "bf16", slack=0)          # P = 3: every block_m fits
    h2, _ = h_buffers(small, "cpu")
    with pytest.raises(ValueError, match="cannot infer"):
        l1_grouped_gemm(small.pool_x, None, small.pair_rows, small.pair_weights, small.expert_offsets,
                        small.tile_expert, small.tile_row_start, small.num_tiles, small.w13.data, None, h2, None,
                        **kw)


def test_l2_rejects_bad_arguments():
    prob = _small()
    h, h_sf = h_buffers(prob, "cpu")
    dest = make_destinations(prob, "bf16")
    base = dict(weight_format="mxfp4", act_format="fp8", combine_format="bf16", hidden=256, block_m=16)

    def call(**over):
        a = dict(h=h, h_sf=h_sf, pair_dst=dest.pair_dst, pair_dst_sf=None)
        kw = dict(base)
        for k, v in over.items():
            (a if k in a else kw)[k] = v
        l2_grouped_gemm(a["h"], a["h_sf"], prob.expert_offsets, prob.tile_expert, prob.tile_row_start, prob.num_tiles,
                        prob.w2.data, prob.w2.scale, a["pair_dst"], a["pair_dst_sf"], **kw)

    with pytest.raises(ValueError, match="combine_format"):
        call(combine_format="fp16")
    with pytest.raises(TypeError, match="pair_dst_sf"):
        call(combine_format="fp8", pair_dst_sf=None)                    # the fp8 combine needs scale addresses
    with pytest.raises(TypeError, match="pair_dst"):
        call(pair_dst=dest.pair_dst.int())
    with pytest.raises(ValueError, match="pair_dst_sf"):
        call(pair_dst_sf=dest.pair_dst)
    with pytest.raises(ValueError, match="w2_data"):
        call(hidden=384)
    with pytest.raises(TypeError, match="h_sf"):
        call(h_sf=h_sf.float())


@pytest.mark.skipif(INTERPRETED, reason="kernels are interpreted in this process: CPU tensors are accepted")
def test_cpu_tensors_without_the_interpreter_are_rejected():
    prob = _small()
    h, h_sf = h_buffers(prob, "cpu")
    with pytest.raises(ValueError, match="interpreter"):
        run_l1(prob)


# =================================================================================================
# Kernels in the interpreter
# =================================================================================================
_TRITON_VERSION = tuple(int(v) for v in re.findall(r"\d+", triton.__version__)[:2])
interp = pytest.mark.skipif(not INTERPRETED or _TRITON_VERSION < (3, 8),
                            reason="kernels not interpreted here (test_interpreter_tests_in_a_child_process runs "
                                   "them), or Triton < 3.8, whose interpreter lacks tl.dot_scaled and loops "
                                   "bounded by loaded values")


def _chain(prob: GemmProblem, combine_format: str, skip=(), arch=None, num_sms=None, what=""):
    """L1 then L2 on the kernels' own h; checks h and y (y against expert_forward)."""
    extra = {} if arch is None else {"arch": arch}
    if num_sms is not None:
        extra["num_sms"] = num_sms
    h, h_sf = run_l1(prob, **extra)
    m1 = check_l1(prob, h, h_sf, what)
    dest = make_destinations(prob, combine_format, skip=skip)
    run_l2(prob, h, h_sf, combine_format, dest, **extra)
    m2 = check_l2(prob, dest, combine_format, reference_y(prob), what)
    return {**m1, **m2}


@interp
def test_fp8_combine_hidden_640():
    """The FP8 combine at H = 640 (5 scale groups per row: a padded last int32 word)."""
    prob = make_problem(640, 128, [4, 9], "mxfp4", "fp8", block_m=16, seed=12)
    _chain(prob, "fp8", skip=(1,), what="H 640 fp8 combine")


@interp
@pytest.mark.parametrize("wf,af", [(w, a) for w in ("mxfp4", "fp8") for a in ("fp8", "fp4")])
def test_fp8_mainloop_chain(wf, af):
    """The FP8 mainloop (rebased operands) in the interpreter, whose dot is exact float32: L1 and L2
    against the DESIGN reference within the GEMM tolerance, both combines."""
    prob = make_problem(512, 128, [3, 0, 20], wf, af, block_m=16, seed=11, fp8_mainloop=True)
    assert prob.w13_op.kind != "raw"
    for comb in ("bf16", "fp8"):
        _chain(prob, comb, what=f"fp8 mainloop {wf}x{af} {comb}")


def stream_chain(prob: GemmProblem, combine_format: str, what: str = "", skip: Sequence[int] = (), **extra):
    """The streamed FP8 path as the GPU forward runs it: x rebased where it landed
    (`rebase_act_rows` over the pairs' pool rows), L1 reading it, h rebased after L1, L2 reading
    that; h and y checked against the DESIGN reference (`check_l1` / `check_l2`)."""
    device = prob.pool_x.device
    npool, H, I, P = prob.pool_x.shape[0], prob.hidden, prob.inter, prob.num_pairs
    count = prob.expert_offsets[-1:]
    x8 = poisoned((npool, H), torch.float8_e4m3fn, device)
    x_e = torch.full((npool,), -1, dtype=torch.int32, device=device)
    rebase_act_rows(prob.pool_x, prob.pool_x_sf, x8, x_e, count, act_format=prob.act_format,
                    group=prob.act_group_size, rows=prob.pair_rows, lane_k=prob.w13_op.lane)
    h, h_sf = run_l1(prob, x_rebased=(x8, x_e), **extra)
    m1 = check_l1(prob, h, h_sf, what)
    h8 = poisoned((P, I), torch.float8_e4m3fn, device)
    h_e = torch.full((P,), -1, dtype=torch.int32, device=device)
    rebase_act_rows(h, h_sf, h8, h_e, count, act_format=prob.act_format, group=32, lane_k=prob.w2_op.lane)
    dest = make_destinations(prob, combine_format, skip=skip)
    run_l2(prob, h, h_sf, combine_format, dest, h_rebased=(h8, h_e), **extra)
    m2 = check_l2(prob, dest, combine_format, reference_y(prob), what)
    return {**m1, **m2}


@interp
@pytest.mark.parametrize("wf,af,as_fp8", [("mxfp4", "fp8", True), ("mxfp4", "fp4", True), ("fp8", "fp8", False),
                                          ("fp8", "fp4", False), ("mxfp4", "fp8", False)])
def test_streamed_fp8_mainloop(wf, af, as_fp8):
    """The streamed FP8 mainloop (activations rebased where they land; weights "fp8_rebased", or
    MXFP4 expanded in registers) in the interpreter: h and y against the DESIGN reference within
    the GEMM tolerance, both combines, a partial tile and an empty expert; two K chunks of
    promotion in L1 (H 512 at 2 steps per chunk) and L2 chained (promoted for 4-bit MXFP4); L1
    without the loaded weight (operand only) gives the same bytes."""
    prob = make_problem(512, 128, [3, 0, 20], wf, af, block_m=16, seed=11, fp8_mainloop=True, fp4_as_fp8=as_fp8)
    assert prob.w13_op.kind == ("fp8_rebased" if wf == "fp8" or as_fp8 else "mxfp4")
    cfg1 = dataclasses.replace(gh.l1_gemm_config(16, 512, 128, wf, af, 90, fp8_mainloop=True, act_rebased=True),
                               promote_steps=2)
    assert cfg1.promote_for(512) == 2
    name = f"streamed {wf}{'->fp8' if as_fp8 else ''} x {af}"
    for comb in ("bf16", "fp8"):
        stream_chain(prob, comb, what=f"{name} {comb}")
    # One SM: a few programs run every item in turn (each item's metadata is loaded one and two
    # items ahead, `l1_gemm._prefetch_item`); two pairs without a destination are left out.
    stream_chain(prob, "bf16", what=f"{name} 1 SM", skip=(1, 7), num_sms=1)
    # L1 again with a promotion every 2 of its 4 K steps (two chunks).
    x8 = torch.empty(prob.pool_x.shape[0], 512, dtype=torch.float8_e4m3fn)
    x_e = torch.empty(prob.pool_x.shape[0], dtype=torch.int32)
    rebase_act_rows(prob.pool_x, prob.pool_x_sf, x8, x_e, prob.expert_offsets[-1:], act_format=af, group=32,
                    rows=prob.pair_rows)
    h, h_sf = run_l1(prob, x_rebased=(x8, x_e), config=cfg1)
    check_l1(prob, h, h_sf, f"{name}, L1 in 2 chunks")
    # The operand holds all the kernel reads: without the loaded weight, the same bytes.
    h2, h2_sf = run_l1(prob, x_rebased=(x8, x_e), config=cfg1, w13=(None, None))
    assert torch.equal(h2.view(torch.uint8), h.view(torch.uint8)) and torch.equal(h2_sf, h_sf)


@interp
@pytest.mark.parametrize("af,block_m", [("fp8", 16), ("fp4", 16), ("fp8", 128)])
def test_streamed_lane_k_order(af, block_m):
    """4-bit weights in the "lane" K order (`gemm_operands.LANE_K_ORDER`) with x and h rebased in
    that order (`rebase_act_rows(lane_k=True)`): h and y against the DESIGN reference within the
    GEMM tolerance (a mismatched order of weights and activations is far off it); at 16 rows the
    256-K steps (two chunks per step), at 128 also rows past block_m (`over_rows_chain`). FP4 x
    MXFP4: every product and partial sum is exact, so h and y equal the column-order run's byte for
    byte. Without rebased activations (the in-kernel rebase reads column order) a lane-ordered
    operand is refused."""
    prob = make_problem(512, 128, [3, 0, 20], "mxfp4", af, block_m=block_m, seed=13, fp8_mainloop=True,
                        lane_k=True)
    assert prob.w13_op.lane and prob.w2_op.lane
    m = stream_chain(prob, "bf16", what=f"lane {af} {block_m}")
    if af == "fp4":
        nat = make_problem(512, 128, [3, 0, 20], "mxfp4", af, block_m=block_m, seed=13, fp8_mainloop=True)
        assert not nat.w13_op.lane
        m_nat = stream_chain(nat, "bf16", what=f"column order {af} {block_m}")
        assert m["h_bytes_equal"] == m_nat["h_bytes_equal"] == 1.0
        assert m["y_rel_rmse"] == m_nat["y_rel_rmse"]
    with pytest.raises(ValueError, match="lane K order"):
        run_l1(prob)
    if block_m == 128:
        # rows past block_m (a second MMA on the same words) beside a tail launch, in lane order
        over_rows_chain(256, 128, [70, 0, 80, 90, 20], gh.TilePlan(64, 16, 32, 16), "mxfp4", seed=23, lane_k=True)


def over_rows_chain(hidden: int, inter: int, counts: Sequence[int], plan: gh.TilePlan, wf: str, seed: int,
                    device="cpu", num_sms: Optional[int] = 2, lane_k: bool = False):
    """The streamed FP8 path with a plan's rows past block_m (`TilePlan.over`: OVER_M / OVER_LIMIT
    in the main launches) next to its tail launches: h and y of every pair against the DESIGN
    reference (outputs start poisoned: each pair must be computed, by exactly one launch)."""
    prob = make_problem(hidden, inter, counts, wf, "fp8", block_m=plan.block_m, seed=seed, fp8_mainloop=True,
                        device=device, lane_k=lane_k)
    assert prob.w13_op.kind == ("mxfp4" if wf == "mxfp4" else "fp8_rebased")
    P, E = prob.num_pairs, len(counts)
    i32 = dict(dtype=torch.int32, device=device)
    mt = gh.max_tiles(P, E, 16)
    main = (torch.empty(mt, **i32), torch.empty(mt, **i32), torch.empty(1, **i32))
    tail = (torch.empty(mt, **i32), torch.empty(mt, **i32), torch.empty(1, **i32))
    build_tile_map(prob.expert_offsets, plan.block_m, mt, *main, tail_block_m=plan.tail_block_m,
                   tail_max=plan.tail_max, tail_out=tail, over=plan.over)
    mp = dataclasses.replace(prob, tile_expert=main[0], tile_row_start=main[1], num_tiles=main[2])
    tp = dataclasses.replace(prob, tile_expert=tail[0], tile_row_start=tail[1], num_tiles=tail[2],
                             block_m=plan.tail_block_m)
    launches = [(mp, dict(over_m=plan.over, over_limit=plan.over_limit))] + ([(tp, {})] if plan.has_tail else [])
    extra = {} if num_sms is None else {"num_sms": num_sms}
    count = prob.expert_offsets[-1:]
    x8 = torch.empty(prob.pool_x.shape[0], hidden, dtype=torch.float8_e4m3fn, device=device)
    x_e = torch.empty(prob.pool_x.shape[0], **i32)
    rebase_act_rows(prob.pool_x, prob.pool_x_sf, x8, x_e, count, act_format="fp8", group=32, rows=prob.pair_rows,
                    lane_k=prob.w13_op.lane)
    h, h_sf = h_buffers(prob, device)
    for q, kw in launches:
        run_l1_into(q, h, h_sf, x_rebased=(x8, x_e), **extra, **kw)
    fp8_mma = torch.device(device).type == "cuda" and wf == "fp8"
    m1 = check_l1(prob, h, h_sf, f"over rows {wf}", H_BYTES_MIN_FRACTION_FP8_MMA if fp8_mma else H_BYTES_MIN_FRACTION)
    # The rows past block_m share their tile's weight tiles and promotion: no more of their h bytes
    # differ from the reference than the other rows' (2e-3: ~5 standard deviations for the ~40 such
    # rows of `test_over_rows_dsv3`; a mis-indexed or unpromoted second MMA would be far worse).
    n = prob.num_routed
    over = torch.zeros(n, dtype=torch.bool)
    for e, s0, _ in prob.segments():
        k = gh.over_rows(counts[e], plan)
        if k:
            first = s0 + counts[e] // plan.block_m * plan.block_m
            over[first:first + k] = True
    same_rows = (bytes_of(h[:n]) == bytes_of(reference_h(prob)[1])).float().mean(dim=1).cpu()
    if bool(over.any()):
        f_over, f_rest = float(same_rows[over].mean()), float(same_rows[~over].mean())
        assert f_over >= f_rest - 2e-3, f"over rows {wf}: {f_over:.4f} of their h bytes equal, the rest {f_rest:.4f}"
        m1.update(h_bytes_equal_over=f_over, h_bytes_equal_rest=f_rest)
    h8 = torch.empty(P, inter, dtype=torch.float8_e4m3fn, device=device)
    h_e = torch.empty(P, **i32)
    rebase_act_rows(h, h_sf, h8, h_e, count, act_format="fp8", group=32, lane_k=prob.w2_op.lane)
    dest = make_destinations(prob, "bf16", skip=(3, sum(counts) - 2))
    for q, kw in launches:
        run_l2(q, h, h_sf, "bf16", dest, h_rebased=(h8, h_e), **extra, **kw)
    m2 = check_l2(prob, dest, "bf16", reference_y(prob), f"over rows {wf}")
    return mp, (x8, x_e), tail, {**m1, **m2}


@interp
@pytest.mark.parametrize("wf", ["mxfp4", "fp8"])
def test_streamed_over_rows(wf):
    """Rows past block_m in an expert's last full tile (`TilePlan.over`: a second, narrow MMA on
    the same weight tiles, OVER_M 16 / OVER_LIMIT 32) next to a tail launch, on the streamed FP8
    mainloop (`over_rows_chain`). Counts: 70 / 80 (remainders 6 / 16 wholly in the full tile), 90
    (16 there, 10 in a tail tile), 130 (the second full tile takes 2), 95 (r 31: 16 + a 15-row
    tail), 20 (no full tile: two tail tiles), 64 (none past), 120 (r 56 > 32: one more main tile,
    nothing past)."""
    counts = [70, 0, 80, 90, 130, 95, 20, 64, 120]
    plan = gh.TilePlan(64, 16, 32, 16)
    assert [gh.over_rows(c, plan) for c in counts] == [6, 0, 16, 16, 2, 16, 0, 0, 0]
    mp, x_rebased, tail, _ = over_rows_chain(256, 128, counts, plan, wf, seed=21)
    assert int(tail[2]) == 4
    with pytest.raises(ValueError, match="over_m: rows past block_m need the streamed FP8 mainloop"):
        run_l1(mp, over_m=16, over_limit=32)
    with pytest.raises(ValueError, match="over_m / over_limit"):
        run_l1(mp, x_rebased=x_rebased, over_m=16, over_limit=64)


@interp
def test_streamed_fp8_block_scales_not_powers_of_two():
    """FP8 weights with block scales that are not powers of two ("fp8_block": each 128-K partial
    product times its scale) on the streamed path."""
    prob = make_problem(256, 128, [5, 17], "fp8", "fp8", block_m=16, seed=13)
    odd13 = formats.QuantizedWeight("fp8", prob.w13.data, prob.w13.scale * 1.3, prob.w13.shape)
    odd2 = formats.QuantizedWeight("fp8", prob.w2.data, prob.w2.scale * 0.7, prob.w2.shape)
    prob = dataclasses.replace(prob, w13=odd13, w2=odd2, w13_f32=odd13.dequantize(), w2_f32=odd2.dequantize(),
                               w13_op=go.prepare_weight_operand("fp8", odd13.data, odd13.scale, arch=90, act_format="fp8"),
                               w2_op=go.prepare_weight_operand("fp8", odd2.data, odd2.scale, arch=90, act_format="fp8"))
    assert prob.w13_op.kind == "fp8_block"
    stream_chain(prob, "bf16", what="streamed fp8_block")


def test_streamed_path_rejects_bad_arguments():
    prob = make_problem(256, 128, [4], "fp8", "fp8", block_m=16, seed=2)
    x8 = torch.zeros(prob.pool_x.shape[0], 256, dtype=torch.float8_e4m3fn)
    x_e = torch.zeros(prob.pool_x.shape[0], dtype=torch.int32)
    with pytest.raises(ValueError, match="x_rebased: the streamed FP8 mainloop needs an FP8-mainloop weight operand"):
        run_l1(prob, x_rebased=(x8, x_e))
    op = go.prepare_weight_operand("fp8", prob.w13.data, prob.w13.scale, arch=90, act_format="fp8")
    with pytest.raises(ValueError, match=r"x_rebased\[1\]: expected shape"):
        run_l1(prob, w13_operand=op, x_rebased=(x8, x_e[:-1]))
    with pytest.raises(TypeError, match=r"x_rebased\[0\]: expected dtype"):
        run_l1(prob, w13_operand=op, x_rebased=(x8.view(torch.uint8), x_e))
    # the pair-ordered copy of x_rebased (`order_pair_rows`): [P, H] E4M3, only beside x_rebased
    xp = torch.zeros(prob.num_pairs, 256, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="x_pairs: the pair-ordered rows are x_rebased's"):
        run_l1(prob, w13_operand=op, x_pairs=xp)
    with pytest.raises(ValueError, match=r"x_pairs: expected shape \[%d, 256\]" % prob.num_pairs):
        run_l1(prob, w13_operand=op, x_rebased=(x8, x_e), x_pairs=xp[:-1])
    with pytest.raises(TypeError, match="x_pairs: expected dtype"):
        run_l1(prob, w13_operand=op, x_rebased=(x8, x_e), x_pairs=xp.view(torch.uint8))
    # The loaded weight may be left out only where the operand holds everything.
    with pytest.raises(ValueError, match="w13_data: None needs an FP8-mainloop w13_operand"):
        run_l1(prob, w13=(None, None), w13_operand=None)
    with pytest.raises(ValueError, match="w13_scale: expected None with w13_data None"):
        run_l1(prob, w13=(None, prob.w13.scale), w13_operand=op, x_rebased=(x8, x_e))
    p4 = make_problem(256, 128, [4], "mxfp4", "fp8", block_m=16, seed=2, fp8_mainloop=True)
    with pytest.raises(ValueError, match="w13_operand: the weight's data is needed on sm_100"):
        run_l1(p4, w13=(None, None), arch=100)


@interp
@pytest.mark.parametrize("wf,af", COMBOS)
def test_l1_l2_every_format(wf, af):
    """H 256, I 128, 3 experts (one empty, one with a partial second tile), 3 slack positions."""
    prob = make_problem(256, 128, [5, 0, 19], wf, af, seed=COMBOS.index((wf, af)))
    _chain(prob, "bf16", skip=(1,), what=f"{wf} x {af}")


@interp
@pytest.mark.parametrize("wf,af", [("mxfp4", "fp8"), ("fp8", "fp4"), ("bf16", "bf16"), ("mxfp4", "fp4")])
def test_fp8_combine(wf, af):
    prob = make_problem(512, 128, [2, 17, 0], wf, af, seed=5)
    _chain(prob, "fp8", skip=(0, 9), what=f"{wf} x {af} fp8 combine")


@interp
@pytest.mark.parametrize("af", ["fp8", "fp4"])
@pytest.mark.parametrize("combine", ["bf16", "fp8"])
def test_blackwell_dot_scaled_path(af, combine):
    """arch=100 selects `tl.dot_scaled` (MXFP4 x FP8/FP4, uint8 scales per 32), which the
    interpreter (Triton >= 3.8) evaluates: the operand / scale layouts handed to it are right."""
    prob = make_problem(512, 128, [7, 0, 20], "mxfp4", af, act_group_size=128 if af == "fp8" else 32, seed=11)
    _chain(prob, combine, skip=(3,), arch=100, what=f"dot_scaled mxfp4 x {af}")


@interp
def test_clamp_group128_block32_and_persistent_loop():
    """SwiGLU clamp that bites, x scales per 128, 32-row tiles, 2 programs for all work items."""
    prob = make_problem(512, 256, [40, 1, 0, 9], "fp8", "fp8", act_group_size=128, clamp=0.25, block_m=32, seed=3)
    x = ref.dequantize_act(prob.pool_x[prob.pair_rows.long()], prob.pool_x_sf[prob.pair_rows.long()], "fp8", 128)
    gate_up = x[:40] @ prob.w13_f32[0].t()
    assert float((gate_up[:, :256] > 0.25).float().mean()) > 0.1, "test precondition: the clamp must bite"
    assert float((gate_up[:, 256:].abs() > 0.25).float().mean()) > 0.1
    _chain(prob, "bf16", num_sms=1, what="clamp/g128/bm32")


@interp
def test_no_pairs_at_all_writes_nothing():
    prob = make_problem(256, 128, [0, 0], "mxfp4", "fp4", slack=5)
    h, h_sf = run_l1(prob)
    assert bool((bytes_of(h) == POISON).all()) and bool((bytes_of(h_sf) == POISON).all())
    dest = make_destinations(prob, "bf16")
    run_l2(prob, h, h_sf, "bf16", dest)
    assert bool((bytes_of(dest.out) == POISON).all())


@interp
def test_rows_sharing_a_pool_row_and_fp8_block_scales_not_powers_of_two():
    """Checkpoint FP8 scales that are not powers of two multiply each per-128-K partial product."""
    prob = make_problem(256, 128, [6, 10], "fp8", "bf16", seed=9)
    prob.pair_rows[1:4] = prob.pair_rows[0]
    g = torch.Generator().manual_seed(1)
    for qw in (prob.w13, prob.w2):
        qw.scale.mul_(torch.rand(qw.scale.shape, generator=g) + 0.5)
    prob.w13_f32, prob.w2_f32 = prob.w13.dequantize(), prob.w2.dequantize()
    _chain(prob, "bf16", what="fp8 non-pow2 scales")


def test_interpreter_tests_in_a_child_process():
    """Where this process compiled the kernels for a GPU, run the interpreter tests in a child."""
    if INTERPRETED:
        pytest.skip("the interpreter tests ran in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__,
                           "-k", "l1_l2 or combine or dot_scaled or clamp or no_pairs or block_scales or inferred"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# =================================================================================================
# Compile checks (sm_90a, sm_100a)
# =================================================================================================
_X_TYPE = {"fp8": "*fp8e4nv", "fp4": "*i8", "bf16": "*bf16"}
_W_TYPES = {"mxfp4": ("*i8", "*u8"), "fp8": ("*fp8e4nv", "*fp32"), "bf16": ("*bf16", None)}
_H_STORE_TYPE = {"fp8": "*i8", "fp4": "*i8", "bf16": "*i16"}


def w_kind_of(wf: str, af: str, arch: int) -> str:
    """The W_KIND `gemm_operands.prepare_weight_operand` gives our quantiser's weights."""
    if not uses_fp8_mma(arch, wf, af):
        return "raw"
    return "mxfp4" if wf == "mxfp4" else "fp8_rebased"


def _weight_sig(wf: str, w_kind: str) -> dict:
    """Pointer types of (w_ptr, w_sf_ptr, w_row_ptr, tab_ptr) for a W_KIND."""
    w, sf = _W_TYPES[wf]
    fp8 = w_kind != "raw"
    if w_kind == "fp8_rebased":       # E4M3 bytes, whatever the weight's format (MXFP4 expanded at load)
        w, sf = "*fp8e4nv", None
    return dict(w_ptr=w, w_sf_ptr=sf, w_row_ptr="*fp32" if w_kind in ("mxfp4", "fp8_rebased") else None,
                tab_ptr="*i64" if fp8 else None)


def l1_compile_args(wf: str, af: str, arch: int, block_m: int = 16, H: int = 7168, I: int = 2048, g: int = 32,
                    w_kind: Optional[str] = None, fp4_decoder: str = "shift", act_rebased: bool = False,
                    fp4_table: str = "imad", epi_cvt: bool = False):
    """(signature, constexprs, options) of `_l1_kernel` as `l1_grouped_gemm` launches it (epi_cvt:
    with `l1_gemm.EPILOGUE_HW_CVT`)."""
    w_kind = w_kind or w_kind_of(wf, af, arch)
    cfg = gh.l1_gemm_config(block_m, H, I, wf, af, arch, fp8_mainloop=w_kind != "raw", act_rebased=act_rebased,
                            weight_kind=w_kind)
    sig = dict(x_ptr=_X_TYPE[af], x_sf_ptr="*i32", pair_rows_ptr="*i32", pair_w_ptr="*fp32", offsets_ptr="*i32",
               tile_expert_ptr="*i32", tile_row_ptr="*i32", num_tiles_ptr="*i32", **_weight_sig(wf, w_kind),
               h_ptr=_H_STORE_TYPE[af], h_sf_ptr="*u8", max_tiles="i32", clamp="fp32")
    if af == "bf16":
        sig["x_sf_ptr"] = sig["h_sf_ptr"] = None
    if act_rebased:
        sig["x_ptr"] = "*fp8e4nv"
    ce = dict(HIDDEN=H, INTER=I, WEIGHT_FORMAT="fp8" if w_kind in ("fp8_rebased", "fp8_block") else wf,
              ACT_FORMAT=af, ACT_GROUP=g, HAS_CLAMP=True, ACT_REBASED=act_rebased,
              USE_DOT_SCALED=gh.uses_dot_scaled(arch, wf, af), DOT_IN_F32=False, W_KIND=w_kind,
              SF_WORDS_P2=sf_words_p2(H, g), PROMOTE=cfg.promote_for(H), BLOCK_M=cfg.block_m,
              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, FP4_DECODER=fp4_decoder,
              WARPS=cfg.num_warps, FP4_TABLE=fp4_table, **(dict(EPI_CVT=True) if epi_cvt else {}))
    ce.update({k: None for k, v in sig.items() if v is None})
    sig = {k: v for k, v in sig.items() if v is not None}
    return sig, ce, dict(enable_fp_fusion=False, **cfg.launch_options())


def l2_compile_args(wf: str, af: str, comb: str, arch: int, block_m: int = 16, H: int = 7168, I: int = 2048,
                    w_kind: Optional[str] = None, fp4_decoder: str = "shift", act_rebased: bool = False,
                    fp4_table: str = "imad", epi_cvt: bool = False):
    """(signature, constexprs, options) of `_l2_kernel` as `l2_grouped_gemm` launches it (epi_cvt:
    with `l1_gemm.EPILOGUE_HW_CVT`)."""
    w_kind = w_kind or w_kind_of(wf, af, arch)
    cfg = gh.l2_gemm_config(block_m, H, I, wf, af, comb, arch, fp8_mainloop=w_kind != "raw",
                            act_rebased=act_rebased, weight_kind=w_kind)
    sig = dict(h_ptr=_X_TYPE[af], h_sf_ptr="*i32", offsets_ptr="*i32", tile_expert_ptr="*i32", tile_row_ptr="*i32",
               num_tiles_ptr="*i32", **_weight_sig(wf, w_kind), dst_ptr="*i64",
               dst_sf_ptr="*i64", max_tiles="i32")
    if af == "bf16":
        sig["h_sf_ptr"] = None
    if comb == "bf16":
        sig["dst_sf_ptr"] = None
    if act_rebased:
        sig["h_ptr"] = "*fp8e4nv"
    ce = dict(HIDDEN=H, INTER=I, WEIGHT_FORMAT="fp8" if w_kind in ("fp8_rebased", "fp8_block") else wf,
              ACT_FORMAT=af, COMBINE_FORMAT=comb, ACT_REBASED=act_rebased,
              USE_DOT_SCALED=gh.uses_dot_scaled(arch, wf, af), DOT_IN_F32=False, W_KIND=w_kind,
              SF_WORDS_P2=sf_words_p2(I, 32), PROMOTE=cfg.promote_for(I), BLOCK_M=cfg.block_m,
              BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, FP4_DECODER=fp4_decoder,
              WARPS=cfg.num_warps, FP4_TABLE=fp4_table, **(dict(EPI_CVT=True) if epi_cvt else {}))
    ce.update({k: None for k, v in sig.items() if v is None})
    sig = {k: v for k, v in sig.items() if v is not None}
    return sig, ce, dict(enable_fp_fusion=False, **cfg.launch_options())


#: (kernel, weight, act, combine, arch, block_m[, W_KIND]) of every compile check. Decode tiles
#: (block_m 16) of DeepSeek-V3's shape for every format on Hopper; prefill tiles; FP8 weights with
#: non-power-of-two block scales ("fp8_block"); Blackwell's block-scaled combinations.
COMPILE_CASES = ([("l1", w, a, None, 90, 16) for w, a in COMBOS]
                 + [("l2", w, a, "fp8" if a == "fp8" else "bf16", 90, 16) for w, a in COMBOS]
                 + [("l1", w, "fp8", None, 90, 128) for w in ("mxfp4", "fp8")]
                 + [("l2", w, "fp8", "bf16", 90, 128) for w in ("mxfp4", "fp8")]
                 + [("l1", "fp8", "fp8", None, 90, 16, "fp8_block"), ("l2", "fp8", "fp8", "bf16", 90, 16, "fp8_block")]
                 # The default Hopper mainloop for these formats (bf16 on dequantised operands).
                 + [("l1", w, a, None, 90, 16, "raw") for w in ("mxfp4", "fp8") for a in ("fp8", "fp4")]
                 + [("l2", w, "fp8", "bf16", 90, 16, "raw") for w in ("mxfp4", "fp8")]
                 + [("l1", "mxfp4", "fp8", None, 90, 128, "raw"), ("l2", "mxfp4", "fp8", "bf16", 90, 128, "raw")]
                 # The streamed FP8 mainloop (activations rebased where they land), decode and prefill.
                 + [(k, w, "fp8", c, 90, bm, kind, "stream") for k, c in (("l1", None), ("l2", "bf16"))
                    for bm in (16, 128) for w, kind in (("fp8", "fp8_rebased"), ("mxfp4", "fp8_rebased"),
                                                        ("mxfp4", "mxfp4"))]
                 + [("l2", "mxfp4", "fp8", "fp8", 90, 16, "mxfp4", "stream")]
                 # 4-bit MXFP4 with far groups: the exact f16x2 tables
                 + [(k, "mxfp4", "fp8", c, 90, 16, "mxfp4", "stream", "f16") for k, c in (("l1", None), ("l2", "bf16"))]
                 + [("l1", "fp8", "fp4", None, 90, 16, "fp8_block", "stream"),
                    ("l2", "fp8", "fp8", "fp8", 90, 128, "fp8_block", "stream")]
                 + [("l1", "mxfp4", a, None, 100, 16) for a in ("fp4", "fp8")]
                 + [("l2", "mxfp4", a, c, 100, 16) for a, c in (("fp4", "bf16"), ("fp8", "fp8"))])


def _case_id(case):
    k, w, a, c, arch, bm = case[:6]
    kind = f"-{case[6]}" if len(case) > 6 else ""
    stream = "-stream" if len(case) > 7 else ""
    table = f"-{case[8]}" if len(case) > 8 else ""
    return f"{k}-{w}x{a}{'-' + c if c else ''}-sm{arch}-bm{bm}{kind}{stream}{table}"


@pytest.fixture(scope="module")
def compiled():
    """{case: PTX} — two batches in parallel (one child process each in interpreter mode)."""
    from mega_moe_layer.kernels import _compile

    jobs = []
    for case in COMPILE_CASES:
        kern, w, a, c, arch, bm = case[:6]
        kind = case[6] if len(case) > 6 else None
        stream = len(case) > 7
        table = case[8] if len(case) > 8 else "imad"
        if kern == "l1":
            sig, ce, opts = l1_compile_args(w, a, arch, bm, w_kind=kind, act_rebased=stream, fp4_table=table)
            jobs.append(_compile.CompileJob(_l1_kernel, sig, ce, arch, **opts))
        else:
            sig, ce, opts = l2_compile_args(w, a, c, arch, bm, w_kind=kind, act_rebased=stream, fp4_table=table)
            jobs.append(_compile.CompileJob(_l2_kernel, sig, ce, arch, **opts))
    halves = [jobs[0::2], jobs[1::2]]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            even, odd = pool.map(_compile.compile_ptx_batch, halves)
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    ptx = [None] * len(jobs)
    ptx[0::2], ptx[1::2] = even, odd
    return dict(zip(COMPILE_CASES, ptx))


def test_fp4_decoders_compile_with_half_the_scale_multiplies():
    """The bf16 mainloop with the other E2M1 decoder ("lut": `GroupedGemmConfig(fp4_decoder=)`)
    builds for sm_90a (bf16 wgmma, no spills at the decode tile) with one bf16x2 FMA per weight
    pair instead of two, for L1 and L2."""
    from mega_moe_layer.kernels import _compile

    decoders = ("shift", "lut")
    jobs = []
    for dec in decoders:
        sig, ce, opts = l1_compile_args("mxfp4", "fp8", 90, 16, w_kind="raw", fp4_decoder=dec)
        jobs.append(_compile.CompileJob(_l1_kernel, sig, ce, 90, **opts))
        sig, ce, opts = l2_compile_args("mxfp4", "fp8", "bf16", 90, 16, w_kind="raw", fp4_decoder=dec)
        jobs.append(_compile.CompileJob(_l2_kernel, sig, ce, 90, **opts))
    try:
        ptx = _compile.compile_ptx_batch(jobs)
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    got = {(dec, kern): ptx[2 * i + j] for i, dec in enumerate(decoders) for j, kern in enumerate(("l1", "l2"))}
    for kern in ("l1", "l2"):
        n_shift = got["shift", kern].count("fma.rn.bf16x2")
        for dec in ("lut",):
            p = got[dec, kern]
            assert "wgmma.mma_async" in p and all(".bf16" in m for m in re.findall(r"wgmma\.mma_async[\w.:]+", p))
            n = p.count("fma.rn.bf16x2")
            assert n > 0 and 2 * n == n_shift, (kern, dec, n_shift, n)
            try:
                usage = _compile.ptxas_usage(p, 90)
            except _compile.CompileUnavailable as exc:
                pytest.skip(str(exc))
            assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (kern, dec, usage)


def test_fp4_register_operand_promotes_every_step_on_the_gpu():
    """Why `l1_gemm._check_promote` refuses chained promotion for 4-bit words on the GPU with some
    Triton releases (`chained_fp4_hazards`: 3.6, the GPU machine's): their L1 sm_90a PTX with
    promote_steps 2 (16 rows, 256 K a step) rewrites registers of a running wgmma, 3.9's does not;
    the check refuses exactly that case on those releases."""
    from mega_moe_layer.kernels import _compile
    from mega_moe_layer.kernels.l1_gemm import _check_promote, _l1_kernel, chained_fp4_hazards
    sig, ce, opts = l1_compile_args("mxfp4", "fp8", 90, 16, w_kind="mxfp4", act_rebased=True)
    ce["PROMOTE"] = 2
    try:
        ptx, = _compile.compile_ptx_batch([_compile.CompileJob(_l1_kernel, sig, ce, 90, **opts)])
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    assert (_compile.wgmma_register_hazards(ptx) != []) == chained_fp4_hazards(), triton.__version__
    cfg = gh.l1_gemm_config(16, 7168, 2048, "mxfp4", "fp8", 90, fp8_mainloop=True, act_rebased=True,
                            weight_kind="mxfp4")
    chained = dataclasses.replace(cfg, promote_steps=2)
    if chained_fp4_hazards():
        with pytest.raises(ValueError, match="promote after every K step"):
            _check_promote(chained, "mxfp4", 7168, torch.device("cuda"))
    else:
        _check_promote(chained, "mxfp4", 7168, torch.device("cuda"))
    _check_promote(cfg, "mxfp4", 7168, torch.device("cuda"))                 # the layer's: one step
    _check_promote(chained, "mxfp4", 7168, torch.device("cpu"))              # the interpreter's
    _check_promote(chained, "fp8_rebased", 7168, torch.device("cuda"))       # weights from shared memory


@pytest.mark.parametrize("case", COMPILE_CASES, ids=[_case_id(c) for c in COMPILE_CASES])
def test_compiles(compiled, case):
    from mega_moe_layer.kernels import _compile

    kern, w, a, c, arch, bm = case[:6]
    ptx = compiled[case]
    assert _compile.ptx_target(ptx) == f"sm_{arch}a"
    assert _compile.ptx_entries(ptx) == [f"_{kern}_kernel"]
    if arch == 90:
        assert "wgmma.mma_async" in ptx, "Hopper path must use wgmma"
        assert "tcgen05" not in ptx
        wgmmas = set(re.findall(r"wgmma\.mma_async[\w.:]+", ptx))
        kind = case[6] if len(case) > 6 else w_kind_of(w, a, arch)
        if kind != "raw":
            # The FP8 mainloop: e4m3 x e4m3 wgmma only (no bf16 upcast MMA left).
            assert wgmmas and all(m.endswith(".e4m3.e4m3") for m in wgmmas), wgmmas
        else:
            assert all(".bf16" in m for m in wgmmas), wgmmas
        # no register of an unfinished wgmma touched (its accumulator, its register A operand)
        assert _compile.wgmma_register_hazards(ptx) == [], _compile.wgmma_register_hazards(ptx)[:4]
        if len(case) > 7 and kind not in ("fp8_block", "mxfp4") and kern == "l2":
            # Streamed and chained (L2; L1 promotes after every step by default, and so does L2 on
            # 4-bit MXFP4): the MMA stays in flight across K steps (a wait that leaves one group
            # pending), which only operands streamed from memory allow.
            assert re.search(r"wgmma\.wait_group\.sync\.aligned\s+[1-9]", ptx), "every K step waits for its MMA"
        if bm == 16 or len(case) > 7:
            try:
                usage = _compile.ptxas_usage(ptx, arch)
            except _compile.CompileUnavailable as exc:
                pytest.skip(str(exc))
            assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage
    else:
        mmas = set(re.findall(r"tcgen05\.mma\.[\w.:]+", ptx))
        assert mmas, "no tcgen05.mma on sm_100a"
        kind = "kind::mxf4" if a == "fp4" else "kind::mxf8f6f4"
        assert any(kind in m and "block_scale" in m for m in mmas), f"expected {kind} block_scale, got {mmas}"
        assert not any("kind::f16" in m for m in mmas), f"an upcast MMA remained: {mmas}"


def test_over_rows_compile_for_hopper():
    """The prefill tiles with rows past block_m (OVER_M 16, `TilePlan.over`) build for sm_90a: the
    128-row and the 16-row e4m3 wgmma from the same weight tile, no spills, for L1 and L2 with
    4-bit MXFP4 and FP8 weights."""
    from mega_moe_layer.kernels import _compile

    cases = [(k, w, kind) for k in ("l1", "l2") for w, kind in (("mxfp4", "mxfp4"), ("fp8", "fp8_rebased"))]
    jobs = []
    for k, w, kind in cases:
        if k == "l1":
            sig, ce, opts = l1_compile_args(w, "fp8", 90, 128, w_kind=kind, act_rebased=True)
        else:
            sig, ce, opts = l2_compile_args(w, "fp8", "bf16", 90, 128, w_kind=kind, act_rebased=True)
        ce.update(OVER_M=16, OVER_LIMIT=48)
        jobs.append(_compile.CompileJob(_l1_kernel if k == "l1" else _l2_kernel, sig, ce, 90, **opts))
    try:
        ptx = _compile.compile_ptx_batch(jobs)
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    for case, p in zip(cases, ptx):
        shapes = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n(\d+)k32\.f32\.e4m3\.e4m3", p))
        assert shapes == {"128", "16"}, (case, shapes)
        assert "bf16" not in "".join(re.findall(r"wgmma\.mma_async[\w.:]+", p)), case
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, (case, usage)


def test_gemms_compile_with_programmatic_dependent_launch():
    """PDL=True (the layer's chained launches, `Launcher.enable_pdl`): the L1 / L2 decode kernels
    wait for the previous grid and release the next one before anything else, and still run the
    e4m3 wgmma with no spills; without it neither instruction is there. sm_100a (compile only):
    the same order ahead of the block-scaled tcgen05 MMA."""
    from mega_moe_layer.kernels import _compile

    jobs = []
    for pdl in (False, True):
        sig, ce, opts = l1_compile_args("mxfp4", "fp8", 90, 16, w_kind="mxfp4", act_rebased=True)
        jobs.append(_compile.CompileJob(_l1_kernel, sig, {**ce, "PDL": pdl}, 90, **opts))
        sig, ce, opts = l2_compile_args("mxfp4", "fp8", "bf16", 90, 16, w_kind="mxfp4", act_rebased=True)
        jobs.append(_compile.CompileJob(_l2_kernel, sig, {**ce, "PDL": pdl}, 90, **opts))
    # Blackwell (compile only): the block-scaled path keeps its tcgen05 MMA under PDL too
    sig, ce, opts = l1_compile_args("mxfp4", "fp8", 100, 16)
    jobs.append(_compile.CompileJob(_l1_kernel, sig, {**ce, "PDL": True}, 100, **opts))
    try:
        ptx = _compile.compile_ptx_batch(jobs)
    except _compile.CompileUnavailable as exc:
        pytest.skip(str(exc))
    sm100 = ptx.pop()
    assert sm100.find("griddepcontrol.wait") < sm100.find("griddepcontrol.launch_dependents")
    assert "griddepcontrol.wait" in sm100 and re.search(r"tcgen05\.mma\.[\w.:]*block_scale", sm100)
    for p in ptx[:2]:
        assert "griddepcontrol" not in p
    for p in ptx[2:]:
        wait, launch = p.find("griddepcontrol.wait"), p.find("griddepcontrol.launch_dependents")
        assert 0 <= wait < launch, "wait for the previous grid, then release the next"
        assert wait < p.find("ld.global"), "nothing is read before the wait"
        wgmmas = set(re.findall(r"wgmma\.mma_async[\w.:]+", p))
        assert wgmmas and all(m.endswith(".e4m3.e4m3") for m in wgmmas), wgmmas
        try:
            usage = _compile.ptxas_usage(p, 90)
        except _compile.CompileUnavailable as exc:
            pytest.skip(str(exc))
        assert usage["spill_stores"] == 0 and usage["spill_loads"] == 0, usage


def test_fp4_decoder_config_is_checked():
    cfg = gh.l1_gemm_config(16, 7168, 2048, "mxfp4", "fp8")
    assert cfg.fp4_decoder == "shift"                   # the GPU-verified decoder stays the default
    assert dataclasses.replace(cfg, fp4_decoder="lut").fp4_decoder == "lut"
    with pytest.raises(ValueError, match="fp4_decoder"):
        dataclasses.replace(cfg, fp4_decoder="table")
