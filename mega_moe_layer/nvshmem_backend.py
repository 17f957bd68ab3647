"""The GPU forward of `MegaMoEExperts(backend="nvshmem")`: stages as separate launches.

    pre-dispatch (quantise into the symmetric x slots, pad top-k rows)
 -> barrier "dispatch"
 -> dispatch count + fill (pull routed rows from every peer over NVLink into the pool; build the
    expert-contiguous pair arrays; counts -> statistics)
 -> L1 grouped GEMM (+ SwiGLU, clamp, top-k weight, requantise h)
 -> L2 grouped GEMM (epilogue stores y_k straight into the source rank's `combine` slot)
 -> barrier "combine"
 -> combine reduce (ascending k, float32) -> y

Nothing here synchronises with the host or allocates after construction (shapes only depend on T,
which the host knows), so a forward captures in a CUDA graph. Same import rules as `layer.py`.
"""
from __future__ import annotations

import torch

from .config import MegaMoEConfig
from .comm import workspace as wsmod
from .kernels import combine as combine_k
from .kernels import dispatch as dispatch_k
from .kernels import gemm_api
from .kernels import sync as sync_k
from .kernels.pre_dispatch import mega_moe_pre_dispatch
from .torch_backend import check_expert_ids

__all__ = ["NvshmemForward"]


class NvshmemForward:
    """Per-layer state of the GPU path: the shared workspace handle and a few private arrays."""

    name = "nvshmem"

    def __init__(self, cfg: MegaMoEConfig, group, rank: int, num_ranks: int, device: torch.device,
                 stats, error_count: torch.Tensor, validate: bool = True):
        self.cfg, self.group, self.rank, self.num_ranks, self.device = cfg, group, rank, num_ranks, device
        self.stats, self.error_count, self.validate = stats, error_count, validate
        self.w13 = self.w2 = None
        self.ws = wsmod.get_workspace(cfg, group, device=device)
        lay = self.ws.layout
        self.off = {s.name: s.offset for s in lay}
        El = cfg.num_experts // num_ranks
        self.num_local_experts = El
        # Pair capacity: the workspace's `pair_rows` / `h` rows (R T min(K, E_l) plus tile padding).
        P = self.ws.view("pair_rows").numel()
        self.max_pairs = P
        i32 = dict(dtype=torch.int32, device=device)
        self.counts = torch.zeros(El, **i32)
        self.cursor = torch.zeros(El, **i32)
        self.expert_offsets = torch.zeros(El + 1, **i32)
        self.pair_weights = torch.zeros(P, dtype=torch.float32, device=device)
        self.pair_dst = torch.zeros(P, dtype=torch.int64, device=device)
        self.pair_dst_sf = torch.zeros(P, dtype=torch.int64, device=device)
        self.max_tiles = gemm_api.max_tiles(P, El, gemm_api.SMALLEST_BLOCK_M)
        self.tile_expert = torch.zeros(self.max_tiles, **i32)
        self.tile_row_start = torch.zeros(self.max_tiles, **i32)
        self.num_tiles = torch.zeros(1, **i32)
        self.timeout = sync_k.TimeoutInfo()
        H, g = cfg.hidden, cfg.act_group_size
        self.x_row_bytes = {"fp8": H, "fp4": H // 2, "bf16": 2 * H}[cfg.act_format]
        self.sf_row_bytes = 0 if cfg.act_format == "bf16" else H // g
        self.comb_row_bytes = H * (1 if cfg.combine_format == "fp8" else 2)
        self.comb_sf_row_bytes = H // 128 if cfg.combine_format == "fp8" else 0

    def _barrier(self, phase: str) -> None:
        sync_k.symmetric_barrier(self.ws.peer_bases, self.off["signals"], self.rank, self.num_ranks,
                                 self.timeout, self.cfg.spin_timeout_s, phase)

    def prepare_weights(self, qw13, qw2) -> None:
        self.w13, self.w2 = qw13, qw2

    def check_errors(self) -> None:
        self.timeout.check()

    def forward(self, x, topk_idx, topk_weights) -> torch.Tensor:
        self.timeout.check()
        if self.validate:
            check_expert_ids(topk_idx, self.cfg.num_experts)
        w13, w2, stats, error_count = self.w13, self.w2, self.stats, self.error_count
        cfg, ws = self.cfg, self.ws
        T = x.shape[0]
        # 1. pre-dispatch into the symmetric slots (pads top-k rows [T, T_max) with -1 / 0).
        if cfg.act_format == "bf16":
            if T:
                ws.view("x")[:T].copy_(x)
            ws.view("topk_idx")[:T].copy_(topk_idx)
            ws.view("topk_idx")[T:].fill_(-1)
            ws.view("topk_weights")[:T].copy_(topk_weights)
            ws.view("topk_weights")[T:].zero_()
        else:
            mega_moe_pre_dispatch(x, topk_idx, topk_weights, ws.view("x"), ws.view("x_sf"),
                                  ws.view("topk_idx"), ws.view("topk_weights"), T,
                                  group_size=cfg.act_group_size,
                                  use_fp4_acts=cfg.act_format == "fp4")
        self._barrier("dispatch")

        # 2. dispatch: counts -> offsets -> pull rows and build the pairs.
        kw = dict(rank=self.rank, num_ranks=self.num_ranks, num_local_experts=self.num_local_experts,
                  max_tokens=cfg.max_tokens_per_rank, topk=cfg.topk)
        self.counts.zero_()
        dispatch_k.dispatch_count(ws.peer_bases, self.off["topk_idx"], self.counts, **kw)
        torch.cumsum(self.counts, 0, out=self.expert_offsets[1:])
        self.cursor.zero_()
        pair_rows = ws.view("pair_rows")
        dispatch_k.dispatch_fill(
            ws.peer_bases, self.off, self.expert_offsets, self.cursor, pair_rows, self.pair_weights,
            self.pair_dst, self.pair_dst_sf, my_base=ws.base_ptr, x_row_bytes=self.x_row_bytes,
            sf_row_bytes=self.sf_row_bytes, comb_row_bytes=self.comb_row_bytes,
            comb_sf_row_bytes=self.comb_sf_row_bytes, **kw)
        stats.record(self.counts)

        # 3. the expert GEMMs; L2 stores into the owners' combine slots.
        g = gemm_api
        bm = g.block_m_for(T, cfg.topk, cfg.num_experts, self.num_ranks)
        g.build_tile_map(self.expert_offsets, bm, self.max_tiles, self.tile_expert,
                         self.tile_row_start, self.num_tiles)
        h, h_sf = ws.view("h"), ws.view("h_sf")
        g.l1_grouped_gemm(ws.view("recv_x"), ws.view("recv_x_sf") if self.sf_row_bytes else None,
                          pair_rows, self.pair_weights, self.expert_offsets, self.tile_expert,
                          self.tile_row_start, self.num_tiles, w13.data, w13.scale, h,
                          h_sf if cfg.act_format != "bf16" else None,
                          weight_format=cfg.weight_format, act_format=cfg.act_format,
                          act_group_size=cfg.act_group_size, activation_clamp=cfg.activation_clamp,
                          block_m=bm)
        g.l2_grouped_gemm(h, h_sf if cfg.act_format != "bf16" else None, self.expert_offsets,
                          self.tile_expert, self.tile_row_start, self.num_tiles, w2.data, w2.scale,
                          self.pair_dst, self.pair_dst_sf if cfg.combine_format == "fp8" else None,
                          weight_format=cfg.weight_format,
                          act_format=cfg.act_format, combine_format=cfg.combine_format,
                          hidden=cfg.hidden, block_m=bm)
        self._barrier("combine")

        # 4. combine reduce into a fresh y (the caller owns it).
        y = torch.empty(T, cfg.hidden, dtype=torch.bfloat16, device=self.device)
        combine_k.combine_reduce(ws.view("combine"),
                                 ws.view("combine_sf") if cfg.combine_format == "fp8" else None,
                                 ws.view("topk_idx"), y, error_count, cfg.num_experts)
        return y
