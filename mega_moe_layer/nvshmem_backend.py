"""The GPU forward of `MegaMoEExperts(backend="nvshmem")`: eight kernels per call (six on one rank).

    1 stage      pre-dispatch: quantise x into the symmetric x slot (bf16: copy it), copy and pad
                 the top-k rows; with validate=True also find the first row with a bad expert id
                 (then the one device-to-host read of the call, before any collective step)
    2 barrier    "dispatch" (R > 1 only: one rank's stream order needs no barrier)
    3 count+plan pairs per local expert from every peer's top-k rows; the last program turns them
                 into expert offsets, the GEMM tile map and the statistics (`dispatch.py`)
    4 fill       pull routed rows from every peer over NVLink into the pool; the pair arrays
    5 L1         grouped GEMM (+ SwiGLU, clamp, top-k weight, requantise h)   (`_run_l1`)
    6 L2         grouped GEMM; the epilogue stores y_k into the source rank's `combine` slot (`_run_l2`)
                 (a two-height tile plan, `gemm_heuristics.TilePlan`, launches 5 and 6 twice each:
                 the main tiles, then the tail tiles of the second map)
    7 barrier    "combine" (R > 1 only)
    8 combine    reduce over k, ascending, float32 -> y (counts dropped out-of-range ids)

The streamed FP8 mainloop (Hopper, FP8 / MXFP4 weights, the default there) adds h's rebasing pass
between 5 and 6; FP8 x is staged already rebased by kernel 1 (`STAGE_REBASE`), FP4 x is rebased
by one more pass between 4 and 5 (`_bind_rebase`).

Host time. Every launch is a `kernels._launch.Launcher` bound once (per token count or tile height
where its grid or arguments depend on it; the GEMMs per tile height and map). Only the stage kernel takes this call's tensors (x, the
top-k arrays, and y's address, which it stores with T in `call_info`); kernels 2-8 read this
object's buffers, the workspace and the weights (the combine finds y and T in `call_info`), so
they are the same launches on every call with the same tile plan: eager calls replay them as one
CUDA graph per tile plan (`_middle_graphs`, captured on the second call with that plan; the
first runs them directly and compiles them). An eager call is then two host launches (stage, the
graph). While the caller's stream is being captured (the caller builds its own CUDA graph, e.g.
`torch.compile(mode="reduce-overhead")`), kernels 2-8 are launched directly into that capture
instead. `use_graphs = False` always launches them directly.
Nothing synchronises with the host (validate=False) and nothing is allocated but y (from the
caching allocator: graph-capturable).

`torch.compile`: the forward is the custom op `mega_moe::experts_forward` (declared mutations: the
error counter and the two statistics arrays; a fake implementation giving y [T, H] bf16), reached
while compiling; the op finds this object through an int handle (`_REGISTRY`). Eager calls run
the same implementation directly (the dispatcher's overhead is not worth paying there).
Same import rules as `layer.py`.
"""
from __future__ import annotations

import itertools
import logging
import math
import weakref
from typing import Dict, Optional, Tuple

import torch

from .config import MegaMoEConfig
from .comm import workspace as wsmod
from .kernels import combine as combine_k
from .kernels import dispatch as dispatch_k
from .kernels import gemm_api
from .kernels import sync as sync_k
from .kernels._launch import Launcher
from .kernels.gemm_api import TilePlan
from .kernels.heuristics import pre_dispatch_config
from .kernels.pre_dispatch import _pre_dispatch_kernel

__all__ = ["NvshmemForward", "CompiledForwardMixin"]

#: Live GPU forwards by handle (the custom op's way back to non-tensor state).
_REGISTRY: "weakref.WeakValueDictionary[int, object]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count(1)


@torch.library.custom_op("mega_moe::experts_forward",
                         mutates_args=("error_count", "stats_last", "stats_cumulative"))
def _experts_forward_op(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        error_count: torch.Tensor, stats_last: torch.Tensor,
                        stats_cumulative: torch.Tensor, handle: int) -> torch.Tensor:
    """y bf16 [T, H] of the layer registered under `handle` (see the module docstring).

    NOTE: the op also writes the layer's private workspace (symmetric buffers, pair arrays);
    nothing outside the op reads them, so they are not declared. The kernels write the layer's own
    counter and statistics (bound once); when the compiler passes other tensors for them (a
    functionalised graph hands the op copies and writes them back afterwards), the results are
    copied into those, so the write-back carries this call's update.
    """
    layer = _REGISTRY[handle]
    y = layer._forward_impl(x, topk_idx, topk_weights)
    for arg, own in ((error_count, layer.error_count), (stats_last, layer.stats.last),
                     (stats_cumulative, layer.stats.cumulative)):
        if arg.data_ptr() != own.data_ptr():
            arg.copy_(own)
    return y


@_experts_forward_op.register_fake
def _experts_forward_fake(x, topk_idx, topk_weights, error_count, stats_last, stats_cumulative,
                          handle):
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.bfloat16)



#: Launch kernels 2-8 with programmatic dependent launch on Hopper+ (`Launcher.enable_pdl`): each
#: kernel's launch overlaps the previous one's run (read when the launches are bound; the bench's
#: --no-pdl turns it off to measure the difference). NOTE: one rank only for now: measured and
#: tested on 1 H200 (docs/PERF.md, 2026-12-03); the cross-GPU barriers under it wait for a
#: multi-GPU run (every kernel waits for its predecessor's completion before it arrives, which
#: should keep the ordering stream order gives, but that has not run on 2+ GPUs yet).
USE_PDL = True

#: Stage FP8 x already rebased to one exponent per row (`pre_dispatch` REBASE; `stage_rebase`):
#: no x rebasing pass and no rebased-x scratch (29 MB at T_max 4096, H 7168), one exponent word a
#: row over NVLink instead of H / 128. Measured on an H100 (docs/PERF.md, 2026-12-07, second
#: session, two A/B runs): -1.8 / -2.4 us at T = 1; +1.0 / +1.1% at T = 128 (three profiles:
#: +0.6% on average, repeated runs spread by ~1%); +0.1-1.6% at 512 / 4096. False restores the
#: pass after the dispatch (`bench.py --no-stage-rebase`).
STAGE_REBASE = True

#: Tile plans whose last full tile of an expert computes up to 16 rows of its remainder
#: (`gemm_heuristics.TilePlan.over`) where the GEMMs run the streamed FP8 mainloop: prefill
#: heights only (T = 4096 on 256 experts: `TilePlan(128, 16, 48, over=16)`, ~20 tail tiles
#: instead of ~140, each of which streamed its expert's weights again). Measured on an H100
#: (docs/PERF.md, 2026-12-07, fifth session, one call): T = 4096 6385.5 -> 5739.3 us (-10.1%),
#: T = 1 / 128 / 512 unchanged (decode plans have no rows past). `bench.py --no-over` turns it off.
#: Only with the bf16 combine: L2's FP8-combine prefill tile (128 rows x 8 warps) spills 112 bytes
#: with the 16 rows past it (4-bit MXFP4; 4 bytes with FP8 block scales; ptxas, Triton 3.6,
#: sm_90a), and L1 and L2 share one tile map.
USE_OVER = True

#: Copy the rebased x into pair order after the dispatch (`rebase.order_pair_rows`, over the
#: pairs) so that L1's 128-row tiles on the Gluon kernel load each tile's token rows as one TMA box
#: instead of gathering them row by row (`l1_grouped_gemm(x_pairs=)`). The probe priced the gather
#: at 9-17% of the mainloop (docs/PERF.md, eleventh session); the copy costs a pass over the pairs'
#: rows and a [P, H] E4M3 scratch (P = pairs capacity: 235 MB at T_max 4096, top-8, H 7168 on one
#: GPU; R times that with R ranks). Off: measured -0.8% at T = 4096 on an H100 (thirteenth session),
#: not worth the scratch (`bench.py --pair-x`).
PAIR_ORDER_X = False


def _pdl_supported(arch: int) -> bool:
    if arch < 90:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def _data_scale(qw):
    """(data, scale) of a loaded weight for the GEMM launchers; (None, None) once dropped (the FP8
    mainloop's operands hold all they read)."""
    return (None, None) if qw is None else (qw.data, qw.scale)

class CompiledForwardMixin:
    """`forward` = the custom op while `torch.compile` traces, else `_forward_impl` directly.

    The class sets `stats`, `error_count` and calls `_register()` once; `_forward_impl(x,
    topk_idx, topk_weights) -> y` is the real work.
    """

    def _register(self) -> None:
        self.handle = next(_HANDLES)
        _REGISTRY[self.handle] = self

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return torch.ops.mega_moe.experts_forward(x, topk_idx, topk_weights, self.error_count,
                                                      self.stats.last, self.stats.cumulative,
                                                      self.handle)
        return self._forward_impl(x, topk_idx, topk_weights)


_log = logging.getLogger(__name__)


class NvshmemForward(CompiledForwardMixin):
    """Per-layer state of the GPU path (implements `backend.ExpertsBackend`): the shared
    workspace handle, a few private arrays, and the bound launches."""

    name = "nvshmem"

    def __init__(self, cfg: MegaMoEConfig, group, rank: int, num_ranks: int, device: torch.device,
                 stats, error_count: torch.Tensor, validate: bool = True):
        self.cfg, self.group, self.rank, self.num_ranks, self.device = cfg, group, rank, num_ranks, device
        self.stats, self.error_count, self.validate = stats, error_count, validate
        self.w13 = self.w2 = None
        self.needs_loaded_weights = True
        self.ws = wsmod.get_workspace(cfg, group, device=device)
        lay = self.ws.layout
        self.off = {s.name: s.offset for s in lay}
        El = cfg.num_experts // num_ranks
        self.num_local_experts = El
        # Pair capacity: the workspace's `pair_rows` / `h` rows (R T min(K, E_l) plus tile padding).
        P = self.ws.view("pair_rows").numel()
        self.max_pairs = P
        i32 = dict(dtype=torch.int32, device=device)
        # NOTE: counts, cursor and ticket are zero between calls (the count+plan kernel resets
        # them); tile rows past num_tiles hold -1 / 0 (it clears the ones it stops using).
        self.counts = torch.zeros(El, **i32)
        self.cursor = torch.zeros(El, **i32)
        self.ticket = torch.zeros(1, **i32)
        self.expert_offsets = torch.zeros(El + 1, **i32)
        self.pair_weights = torch.zeros(P, dtype=torch.float32, device=device)
        self.pair_dst = torch.zeros(P, dtype=torch.int64, device=device)
        self.pair_dst_sf = torch.zeros(P, dtype=torch.int64, device=device)
        self.max_tiles = gemm_api.max_tiles(P, El, gemm_api.SMALLEST_BLOCK_M)
        self.tile_expert = torch.full((self.max_tiles,), -1, **i32)
        self.tile_row_start = torch.zeros(self.max_tiles, **i32)
        self.num_tiles = torch.zeros(1, **i32)
        #: the tail map of two-height plans (`gemm_heuristics.TilePlan`), same capacity
        self.tail_maps = (torch.full((self.max_tiles,), -1, **i32), torch.zeros(self.max_tiles, **i32),
                          torch.zeros(1, **i32))
        #: first row with an out-of-range id (validate=True), INT32_MAX when none
        self.bad_row = torch.full((1,), dispatch_k.INT32_MAX, **i32)
        self.timeout = sync_k.TimeoutInfo()
        #: (y address, T) of the current call, written by the stage kernel, read by the combine
        self.call_info = torch.zeros(2, dtype=torch.int64, device=device)
        H, g = cfg.hidden, cfg.act_group_size
        self.x_row_bytes = {"fp8": H, "fp4": H // 2, "bf16": 2 * H}[cfg.act_format]
        self.sf_row_bytes = 0 if cfg.act_format == "bf16" else H // g
        self.comb_row_bytes = H * (1 if cfg.combine_format == "fp8" else 2)
        # one UE8M0 byte per 128 columns, rows padded to whole int32 words (the combine_sf slot)
        self.comb_sf_row_bytes = 4 * (-(-H // 512)) if cfg.combine_format == "fp8" else 0
        self.w13_op = self.w2_op = None
        self.rebase_report = None
        #: the streamed FP8 path (cfg.hopper_fp8_mainloop): rebased x / h buffers and their passes
        self.x_rebased = self.h_rebased = None
        self.x_pairs = self._order_x = None     # x in pair order (`PAIR_ORDER_X`)
        self._rebase_x = self._rebase_h = None
        #: bound GEMM launches per (tile height, which map: False main / True tail)
        self._l1_launch: Dict[Tuple[int, bool], Optional[Launcher]] = {}
        self._l2_launch: Dict[Tuple[int, bool], Optional[Launcher]] = {}
        #: kernels 2-8 as one CUDA graph per tile plan (see the module docstring)
        self.use_graphs = True
        self._middle_graphs: Dict[TilePlan, torch.cuda.CUDAGraph] = {}
        self._middle_seen: set = set()
        # NOTE: read once here: a device query inside the forward is a data-dependent guard
        # under torch.compile (and host time in eager).
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count
        major, minor = torch.cuda.get_device_capability(device)
        #: kernels 2-8 launched with programmatic dependent launch (`USE_PDL`)
        self.pdl = USE_PDL and num_ranks == 1 and _pdl_supported(10 * major + minor)
        from .kernels.gemm_operands import uses_fp8_mma
        #: the streamed FP8 path: the fill lists the pool rows it writes (rebased after it)
        self.streamed = cfg.fp8_mainloop and uses_fp8_mma(10 * major + minor, cfg.weight_format, cfg.act_format)
        #: FP8 activations on the streamed path with `STAGE_REBASE`: the stage kernel writes x
        #: already rebased to one exponent per row (`pre_dispatch` REBASE) and the fill moves it
        #: with its exponent, so no pass rebases x (set with the weights, `_bind_rebase`)
        self.stage_rebase = False
        self.recv_rows = self.recv_count = None
        if self.streamed:
            self.recv_rows = torch.zeros(self.ws.view("recv_x").shape[0], **i32)
            self.recv_count = torch.zeros(1, **i32)
        self._bind_fixed_launches()
        self._per_T: Dict[int, Tuple] = {}
        self._stage: Dict[Tuple, Launcher] = {}
        self._stage_update: Dict[Tuple, object] = {}      # Launcher.setter of each stage launch
        self._count_plan: Dict[TilePlan, Launcher] = {}
        self._register()

    # ------------------------------------------------------------------ bound launches
    def _bind_fixed_launches(self) -> None:
        cfg, ws, R = self.cfg, self.ws, self.num_ranks
        bar = dict(peer_bases=ws.peer_bases, signals_offset=self.off["signals"], rank=self.rank,
                   num_ranks=R, info=self.timeout, timeout_s=cfg.spin_timeout_s)
        # NOTE: one rank has no peer to wait for or to release: stream order alone orders its
        # kernels (the stage's writes before the dispatch reads them, L2's combine-slot stores
        # before the combine), so the two barriers are launched only for R > 1 (two launches and
        # ~2 x 2 us less per call on one GPU).
        self._barrier_dispatch = self._barrier_combine = None
        if R > 1:
            self._barrier_dispatch = self._chain(Launcher(sync_k._barrier_kernel,
                                                          *sync_k.barrier_args(**bar, phase="dispatch")))
            self._barrier_combine = self._chain(Launcher(sync_k._barrier_kernel,
                                                         *sync_k.barrier_args(**bar, phase="combine")))
        self._kw = dict(rank=self.rank, num_ranks=R, num_local_experts=self.num_local_experts,
                        max_tokens=cfg.max_tokens_per_rank, topk=cfg.topk)
        self._fill = self._bind_fill()
        # combine: y's address and T come from `call_info` (written by the call's stage kernel),
        # so one bound launch, or graph node, serves every call; min(T_max, SMs) programs per H
        # block stride over the rows. (y1 only gives H.)
        y1 = torch.empty(1, cfg.hidden, dtype=torch.bfloat16, device=self.device)
        fp8 = cfg.combine_format == "fp8"
        self._combine = self._chain(Launcher(combine_k._combine_kernel, *combine_k.combine_args(
            ws.view("combine"), ws.view("combine_sf") if fp8 else None, ws.view("topk_idx"), y1,
            self.error_count, cfg.num_experts, call_info=self.call_info,
            row_programs=max(1, min(cfg.max_tokens_per_rank, self.num_sms)))))

    def _bind_fill(self) -> Launcher:
        """The fill launch: the x rows and their scale words, or with `stage_rebase` the rebased
        rows and their one exponent word (into the first R T_max words of the pool's scale slot);
        the list of received rows only where a pass rebases x after it."""
        ws = self.ws
        recv = (self.recv_rows, self.recv_count) if self._recv_list else (None, None)
        return self._chain(Launcher(dispatch_k._fill_kernel, *dispatch_k.fill_args(
            ws.peer_bases, self.off, self.expert_offsets, self.cursor, ws.view("pair_rows"),
            self.pair_weights, self.pair_dst, self.pair_dst_sf, my_base=ws.base_ptr,
            x_row_bytes=self.x_row_bytes, sf_row_bytes=4 if self.stage_rebase else self.sf_row_bytes,
            comb_row_bytes=self.comb_row_bytes, comb_sf_row_bytes=self.comb_sf_row_bytes,
            recv_rows=recv[0], recv_count=recv[1], **self._kw)))

    @property
    def _recv_list(self) -> bool:
        """Whether the fill lists the pool rows it writes (for the pass rebasing x after it)."""
        return self.streamed and not self.stage_rebase

    def _chain(self, launch: Optional[Launcher]) -> Optional[Launcher]:
        """A launch of kernels 2-8: with programmatic dependent launch where on (`USE_PDL`)."""
        if launch is not None and self.pdl:
            launch.enable_pdl()
        return launch

    def _count_plan_launcher(self, plan: TilePlan) -> Launcher:
        lc = self._count_plan.get(plan)
        if lc is None:
            tail = dict(tail_block_m=plan.tail_block_m, tail_max=plan.tail_max, tail_maps=self.tail_maps) \
                if plan.has_tail else {}
            tail["over"] = plan.over
            lc = self._chain(Launcher(dispatch_k._count_plan_kernel, *dispatch_k.count_plan_args(
                self.ws.peer_bases, self.off["topk_idx"], self.counts, self.ticket,
                self.expert_offsets, self.cursor, self.tile_expert, self.tile_row_start,
                self.num_tiles, self.stats.last, self.stats.cumulative, block_m=plan.block_m,
                recv_count=self.recv_count if self._recv_list else None, **tail, **self._kw)))
            self._count_plan[plan] = lc
        return lc

    @property
    def _use_over(self) -> bool:
        """Tile plans with rows past block_m (`USE_OVER`): streamed FP8 mainloop, bf16 combine."""
        return USE_OVER and self.h_rebased is not None and self.cfg.combine_format == "bf16"

    def _plan_T(self, T: int) -> Tuple:
        """(stage config, stage grid, tile plan) for a call of T tokens (cached per T)."""
        cfg = self.cfg
        pcfg = pre_dispatch_config(T, cfg.hidden, cfg.act_group_size, num_sms=self.num_sms,
                                   use_fp4=cfg.act_format == "fp4", whole_rows=self.stage_rebase)
        grid = (pcfg.num_topk_programs(cfg.max_tokens_per_rank) + pcfg.num_x_programs(T),)
        tiles = gemm_api.tile_plan_for(T, cfg.topk, cfg.num_experts, self.num_ranks,
                                       over=self._use_over)
        plan = (pcfg, grid, tiles)
        self._per_T[T] = plan
        return plan

    def _stage_launcher(self, pcfg, x_words, topk_idx, w_words, T: int, y: torch.Tensor) -> Launcher:
        key = (pcfg, topk_idx.dtype, self.validate)
        ls = self._stage.get(key)
        if ls is None:
            cfg, ws = self.cfg, self.ws
            fmt = cfg.act_format
            buf_x = ws.view("x")
            out_x = {"fp8": torch.int16, "fp4": torch.int8, "bf16": torch.int32}[fmt]
            out_x = buf_x.view(out_x)
            out_sf = buf_x.view(torch.int8) if fmt == "bf16" else ws.view("x_sf").view(torch.int8)
            Tmax = cfg.max_tokens_per_rank
            args = (x_words, topk_idx, w_words, out_x, out_sf, ws.view("topk_idx"),
                    ws.view("topk_weights").view(torch.int32), None, T, T, Tmax,
                    pcfg.num_topk_programs(Tmax), self.bad_row, cfg.num_experts, self.call_info,
                    y.data_ptr(), ws.view("x_sf").view(-1)[:Tmax] if self.stage_rebase else None)
            kwargs = dict(HIDDEN=cfg.hidden, GROUP=cfg.act_group_size, TOPK=cfg.topk,
                          TOPK_PAD=triton_next_pow2(cfg.topk), USE_FP4=fmt == "fp4", HW_CVT=True,
                          NUM_TOKENS_ON_DEVICE=False, BLOCK_M=pcfg.block_m, BLOCK_W=pcfg.block_w,
                          TOPK_BLOCK_ROWS=pcfg.topk_block_rows, CHECK_IDS=bool(self.validate),
                          COPY_BF16=fmt == "bf16", WRITE_CALL_INFO=True, REBASE=self.stage_rebase,
                          num_warps=pcfg.num_warps,
                          enable_fp_fusion=False)
            if self.stage_rebase and self.w13_op.lane:
                kwargs["LANE_K"] = True         # x in the order of w13's words (`gemm_operands.LANE_K_ORDER`)
            ls = Launcher(_pre_dispatch_kernel, (1,), args, kwargs)
            self._stage_update[key] = ls.setter("x_ptr", "topk_idx_ptr", "topk_w_ptr", "num_tokens",
                                                "max_tokens", "y_addr")
            self._stage[key] = ls
            return ls
        self._stage_update[key](x_words, topk_idx, w_words, T, T, y.data_ptr())
        return ls

    # ------------------------------------------------------------------ backend interface
    def prepare_weights(self, qw13, qw2) -> None:
        """Keep the weights and prepare, once per load, what the GEMMs read (`gemm_operands`:
        the bf16 mainloop's raw operands, or with `cfg.hopper_fp8_mainloop` the rebased
        operands of the FP8 mainloop; `rebase_report` counts the values rebasing changed)."""
        from .kernels.gemm_operands import prepare_weight_operand
        self.w13, self.w2 = qw13, qw2
        major, minor = torch.cuda.get_device_capability(self.device)
        arch, cfg = 10 * major + minor, self.cfg
        fp8, as_fp8 = cfg.fp8_mainloop, cfg.hopper_fp4_as_fp8
        self.w13_op = prepare_weight_operand(qw13.format, qw13.data, qw13.scale, arch=arch,
                                             act_format=cfg.act_format, name="w13", fp8_mainloop=fp8,
                                             fp4_as_fp8=as_fp8)
        self.w2_op = prepare_weight_operand(qw2.format, qw2.data, qw2.scale, arch=arch,
                                            act_format=cfg.act_format, name="w2", fp8_mainloop=fp8,
                                            fp4_as_fp8=as_fp8)
        self._bind_rebase(self.streamed and self.w13_op.is_fp8_mma and self.w2_op.is_fp8_mma)
        # NOTE: the FP8 mainloop reads only the operands (rebased / re-laid copies): keeping the
        # loaded weights on the device too would double the experts' memory (DeepSeek-V3 FP8 on 8
        # GPUs: ~84 GB of weights per GPU). The layer keeps its loaded copy on the host then.
        self.needs_loaded_weights = not (self.w13_op.is_fp8_mma and self.w2_op.is_fp8_mma)
        if not self.needs_loaded_weights:
            self.w13 = self.w2 = None
        self.rebase_report = {"w13": self.w13_op.num_changed, "w2": self.w2_op.num_changed,
                              "w13_kind": self.w13_op.kind, "w2_kind": self.w2_op.kind}
        changed = self.w13_op.num_changed + self.w2_op.num_changed
        # The load-time report (normally 0 changed: only values > 2**8 below their row's largest
        # group scale round, by <= 2**-10 of that scale).
        (_log.warning if changed else _log.info)(
            "mega_moe_layer: weights as the GEMMs read them: w13 %s, w2 %s; rebasing changed %d of %d values",
            self.w13_op.kind, self.w2_op.kind, changed, math.prod(qw13.shape) + math.prod(qw2.shape))
        self._l1_launch.clear()          # bound to the previous weights
        self._l2_launch.clear()
        self.reset_graphs()

    def _bind_rebase(self, on: bool) -> None:
        """The streamed FP8 path: x / h rebased to one exponent per row. x by a pass after the
        dispatch, over the pool rows the fill listed, into a scratch buffer (with `STAGE_REBASE`,
        FP8 x instead by the stage kernel as it is quantised: it lands rebased in the pool); h by
        a pass after L1, over the pairs."""
        cfg, ws, El = self.cfg, self.ws, self.num_local_experts
        # With STAGE_REBASE, FP8 x is staged rebased (the stage kernel's REBASE): the per-T stage
        # configs and launches, the count+plan launches (the received-row list) and the fill
        # change with it, so they are bound again here.
        self.stage_rebase = STAGE_REBASE and bool(on) and cfg.act_format == "fp8"
        self._per_T.clear()
        self._stage.clear()
        self._stage_update.clear()
        self._count_plan.clear()
        self._fill = self._bind_fill()
        if not on:
            self.x_rebased = self.h_rebased = self._rebase_x = self._rebase_h = None
            self.x_pairs = self._order_x = None
            return
        from .kernels.rebase import rebase_act_rows
        npool, P = ws.view("recv_x").shape[0], self.max_pairs
        f8, i32, dev = torch.float8_e4m3fn, torch.int32, self.device
        if self.h_rebased is None:
            # NOTE: per-forward contents, shared by every layer of the same shapes (as the
            # workspace is): one rebased h (and x for FP4) for a whole model, not one per layer.
            self.h_rebased = (wsmod.shared_scratch("rebased_h", (P, cfg.intermediate), f8, dev),
                              wsmod.shared_scratch("rebased_h_e", (P,), i32, dev))
        count = self.expert_offsets[El:]                      # the device's pair count
        if self.stage_rebase:
            # NOTE: the pool holds the rebased rows, and the first R T_max words of its scale slot
            # their exponents (one word a row, written by the fill).
            self.x_rebased = (ws.view("recv_x"), ws.view("recv_x_sf").view(-1)[:npool])
            self._rebase_x = None
        else:
            self.x_rebased = (wsmod.shared_scratch("rebased_x", (npool, cfg.hidden), f8, dev),
                              wsmod.shared_scratch("rebased_x_e", (npool,), i32, dev))
            # x: the pool rows this call received, once each (the fill's list)
            self._rebase_x = self._chain(rebase_act_rows(ws.view("recv_x"), ws.view("recv_x_sf"), *self.x_rebased,
                                                         self.recv_count, act_format=cfg.act_format,
                                                         group=cfg.act_group_size, rows=self.recv_rows,
                                                         num_sms=self.num_sms, bind=True, lane_k=self.w13_op.lane))
        self._rebase_h = self._chain(rebase_act_rows(ws.view("h"), ws.view("h_sf"), *self.h_rebased, count,
                                         act_format=cfg.act_format, group=32, num_sms=self.num_sms, bind=True,
                                         lane_k=self.w2_op.lane))
        self.x_pairs = self._order_x = None
        if PAIR_ORDER_X:
            from .kernels.rebase import order_pair_rows
            # NOTE: per-forward contents shared by every layer of the same shapes, as rebased h
            self.x_pairs = wsmod.shared_scratch("pair_x", (P, cfg.hidden), f8, dev)
            self._order_x = self._chain(order_pair_rows(self.x_rebased[0], ws.view("pair_rows"), count, self.x_pairs,
                                                        num_sms=self.num_sms, bind=True))

    def reset_graphs(self) -> None:
        """Drop the captured kernels 2-8 (they are recaptured when next used)."""
        self._middle_graphs.clear()
        self._middle_seen.clear()

    def check_errors(self) -> None:
        self.timeout.check()

    # ------------------------------------------------------------------ the GEMMs
    def _run_l1(self, block_m: int, tail: bool = False, over: Tuple[int, int] = (0, 0)) -> None:
        # NOTE: one bound launch per (tile height, map, rows past block_m), validated when bound
        # (every tensor it reads is a persistent buffer of this object, the workspace or the
        # weights): no per-call checks.
        key = (block_m, tail, over)
        launch = self._l1_launch.get(key, False)
        if launch is False:
            launch = self._l1_launch[key] = self._chain(self._bind_l1(block_m, tail, over))
        if launch is not None:
            if launch.kwargs.get("PAIR_X"):          # it reads x in pair order: copy it so first
                self._order_x()
            launch()

    def _run_l2(self, block_m: int, tail: bool = False, over: Tuple[int, int] = (0, 0)) -> None:
        key = (block_m, tail, over)
        launch = self._l2_launch.get(key, False)
        if launch is False:
            launch = self._l2_launch[key] = self._chain(self._bind_l2(block_m, tail, over))
        if launch is not None:
            launch()

    def _tile_map(self, tail: bool):
        return self.tail_maps if tail else (self.tile_expert, self.tile_row_start, self.num_tiles)

    def _bind_l1(self, block_m: int, tail: bool, over: Tuple[int, int]):
        cfg, ws, g, w13 = self.cfg, self.ws, gemm_api, self.w13
        h, h_sf = ws.view("h"), ws.view("h_sf")
        return g.l1_grouped_gemm(ws.view("recv_x"), ws.view("recv_x_sf") if self.sf_row_bytes else None,
                          ws.view("pair_rows"), self.pair_weights, self.expert_offsets,
                          *self._tile_map(tail), *_data_scale(w13), h,
                          h_sf if cfg.act_format != "bf16" else None,
                          weight_format=cfg.weight_format, act_format=cfg.act_format,
                          act_group_size=cfg.act_group_size, activation_clamp=cfg.activation_clamp,
                          block_m=block_m, w13_operand=self.w13_op, x_rebased=self.x_rebased,
                          over_m=over[0], over_limit=over[1], bind=True,
                          x_pairs=self.x_pairs if not tail else None)

    def _bind_l2(self, block_m: int, tail: bool, over: Tuple[int, int]):
        cfg, ws, g, w2 = self.cfg, self.ws, gemm_api, self.w2
        h, h_sf = ws.view("h"), ws.view("h_sf")
        return g.l2_grouped_gemm(h, h_sf if cfg.act_format != "bf16" else None, self.expert_offsets,
                          *self._tile_map(tail), *_data_scale(w2),
                          self.pair_dst, self.pair_dst_sf if cfg.combine_format == "fp8" else None,
                          weight_format=cfg.weight_format,
                          act_format=cfg.act_format, combine_format=cfg.combine_format,
                          hidden=cfg.hidden, block_m=block_m, w2_operand=self.w2_op, h_rebased=self.h_rebased,
                          over_m=over[0], over_limit=over[1], bind=True)

    # ------------------------------------------------------------------ kernels 2-8
    def _middle(self, plan: TilePlan) -> None:
        """Launch kernels 2-8 (barrier, count+plan, fill, L1, L2, barrier, combine) for a tile
        plan (a two-height plan launches each GEMM twice: main tiles, then tail tiles); the
        combine finds y and T in `call_info`."""
        if self._barrier_dispatch is not None:
            self._barrier_dispatch()
        # dispatch: count + plan, then pull rows and build the pairs
        lc = self._count_plan.get(plan)
        if lc is None:
            lc = self._count_plan_launcher(plan)
        lc()
        self._fill()
        # the expert GEMMs; L2 stores into the owners' combine slots (the streamed FP8 path
        # rebases x before L1 unless the stage did, and h before L2)
        if self._rebase_x is not None:
            self._rebase_x()
        over = (plan.over, plan.over_limit)
        self._run_l1(plan.block_m, over=over)
        if plan.has_tail:
            self._run_l1(plan.tail_block_m, tail=True)
        if self._rebase_h is not None:
            self._rebase_h()
        self._run_l2(plan.block_m, over=over)
        if plan.has_tail:
            self._run_l2(plan.tail_block_m, tail=True)
        if self._barrier_combine is not None:
            self._barrier_combine()
        # combine reduce into this call's y
        self._combine()

    def _run_middle(self, plan: TilePlan) -> None:
        if torch.cuda.is_current_stream_capturing() or not self.use_graphs:
            self._middle(plan)
            return
        g = self._middle_graphs.get(plan)
        if g is None:
            if plan not in self._middle_seen:       # first use: launch (and compile) directly
                self._middle(plan)
                self._middle_seen.add(plan)
                return
            g = self._capture_middle(plan)
        g.replay()

    def _capture_middle(self, plan: TilePlan) -> "torch.cuda.CUDAGraph":
        # NOTE: capture_begin / capture_end rather than `torch.cuda.graph(...)`, whose entry
        # synchronises the device, collects garbage and empties the allocator cache. Capturing
        # launches nothing; the graph reads and writes only persistent buffers (no allocation).
        g = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            g.capture_begin(capture_error_mode="thread_local")
            try:
                self._middle(plan)
            finally:
                g.capture_end()
        torch.cuda.current_stream().wait_stream(side)
        self._middle_graphs[plan] = g
        return g

    # ------------------------------------------------------------------ forward
    def _forward_impl(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.device.index != torch.cuda.current_device():
            with torch.cuda.device(self.device):
                return self._forward_impl(x, topk_idx, topk_weights)
        self.timeout.check()
        T = x.shape[0]
        plan = self._per_T.get(T)
        if plan is None:
            plan = self._plan_T(T)
        pcfg, grid, tiles = plan
        # NOTE: y is a fresh tensor rather than a view of a persistent buffer: the caller owns y
        # (it may keep it across calls), and a custom op's output must not alias hidden state.
        y = torch.empty((T, self.cfg.hidden), dtype=torch.bfloat16, device=self.device)
        # 1. stage x and the top-k rows (pads rows [T, T_max) with -1 / 0); y's address and T
        #    go to `call_info` for the combine
        stage = self._stage_launcher(pcfg, x.view(torch.int32), topk_idx, topk_weights.view(torch.int32), T, y)
        stage.set_grid(grid)
        stage()
        if self.validate and T:
            bad = int(self.bad_row.item())          # the call's one device-to-host read
            if bad != dispatch_k.INT32_MAX:
                self.bad_row.fill_(dispatch_k.INT32_MAX)
                raise ValueError(f"topk_idx: row {bad} has an expert id outside "
                                 f"[-1, {self.cfg.num_experts}): {topk_idx[bad].tolist()}")
        # 2-8. dispatch, the expert GEMMs, combine (one CUDA graph replay in eager calls)
        self._run_middle(tiles)
        self.stats.num_calls += 1
        return y


def triton_next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
