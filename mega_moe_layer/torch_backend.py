"""The "torch" backend of `MegaMoEExperts`: the DESIGN algorithm with `torch.distributed`
collectives (gloo on the CPU, NCCL on GPUs), and the benchmarks' grouped-GEMM baseline.

Quantise, one `all_to_all_single` of packed token rows (a token crosses to a rank once, however
many of that rank's experts it selected), the expert computation, one `all_to_all_single` of the
result rows back, the ascending-k reduce. With `torch_experts="reference"` the expert computation
is `reference.expert_forward` on the exact dequantised weights: bitwise equal to
`reference.moe_reference` on one process. With `"grouped_mm"` (CUDA only) it is torch's
`_grouped_mm` / `_scaled_grouped_mm`, the baseline a user assembles today.

The host reads the split sizes of the all-to-alls (`.tolist()`), so this backend synchronises
with the device every call; under `torch.compile` those reads are graph breaks.
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist

from .config import H_GROUP, MegaMoEConfig
from .formats import QuantizedWeight
from .kernels import reference as ref
from .stats import ExpertLoadStats

__all__ = ["TorchBackend", "check_expert_ids", "TORCH_EXPERTS"]

#: Expert math of the torch backend.
TORCH_EXPERTS = ("reference", "grouped_mm")


def check_expert_ids(topk_idx: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError naming the first row of topk_idx [T, K] with an id outside [-1, E)
    (one device-to-host read of a bool; host-synchronising on a GPU)."""
    if topk_idx.shape[0] == 0:
        return
    bad = (topk_idx < -1) | (topk_idx >= num_experts)
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"topk_idx: row {row} has an expert id outside [-1, {num_experts}): "
                         f"{topk_idx[row].tolist()}")


class TorchBackend:
    """The torch backend of one layer (implements `backend.ExpertsBackend`).

    Args:
        cfg, group, rank, num_ranks, device: as resolved by `MegaMoEExperts`.
        stats: the layer's `ExpertLoadStats` (updated in place every call).
        error_count: int32 [1] counter of dropped out-of-range pairs (validate=False).
        torch_experts: "reference" | "grouped_mm" (see the module docstring).
        validate: see `ExpertsBackend.validate`.
    """

    name = "torch"

    def __init__(self, cfg: MegaMoEConfig, group, rank: int, num_ranks: int, device: torch.device,
                 stats: ExpertLoadStats, error_count: torch.Tensor, torch_experts: str = "reference",
                 validate: bool = True):
        if torch_experts not in TORCH_EXPERTS:
            raise ValueError(f"torch_experts: expected 'reference' or 'grouped_mm', got {torch_experts!r}")
        self.cfg, self.group, self.rank, self.num_ranks = cfg, group, rank, num_ranks
        self.device = torch.device(device)
        self.num_local_experts = cfg.num_local_experts(num_ranks)
        self.stats, self.error_count = stats, error_count
        self.torch_experts = torch_experts
        self.validate = validate
        self.w13: Optional[QuantizedWeight] = None
        self.w2: Optional[QuantizedWeight] = None
        self._w13_f32: Optional[torch.Tensor] = None
        self._w2_f32: Optional[torch.Tensor] = None
        self._gmm = {}

    #: the reference / grouped_mm paths read the loaded weights (`ExpertsBackend`)
    needs_loaded_weights = True

    def prepare_weights(self, qw13: QuantizedWeight, qw2: QuantizedWeight) -> None:
        self.w13, self.w2 = qw13, qw2
        if self.torch_experts == "grouped_mm":
            if self.device.type != "cuda":
                raise ValueError("torch_experts='grouped_mm' needs a CUDA device")
            self._prepare_grouped_mm()
        else:  # the reference computes on exact dequantised weights
            self._w13_f32 = qw13.dequantize()
            self._w2_f32 = qw2.dequantize()

    def check_errors(self) -> None:
        return None

    def _all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: List[int],
                    in_splits: List[int]) -> None:
        if self.group is None or self.num_ranks == 1:
            out.copy_(inp)
        else:
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=self.group)

    def _row_layout(self):
        """Byte layout of one dispatched row: [x | x_sf | topk_idx int32 | topk_weights f32]."""
        cfg = self.cfg
        H, K, g = cfg.hidden, cfg.topk, cfg.act_group_size
        nx = {"fp8": H, "fp4": H // 2, "bf16": 2 * H}[cfg.act_format]
        nsf = 0 if cfg.act_format == "bf16" else 4 * (H // g // 4)
        return nx, nsf, 4 * K, 4 * K

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        T, H, K = x.shape[0], cfg.hidden, cfg.topk
        R, El, dev = self.num_ranks, self.num_local_experts, self.device
        idx = topk_idx.to(torch.int64)
        if self.validate:
            check_expert_ids(topk_idx, cfg.num_experts)
        else:  # drop (and count) out-of-range ids instead of raising
            bad = (idx < -1) | (idx >= cfg.num_experts)
            self.error_count += bad.sum().to(torch.int32)
            idx = torch.where(bad, torch.full_like(idx, -1), idx)

        # Step 1: quantise, then pack each token into one byte row.
        xq, xsf = ref.quantize_act(x, cfg.act_format, cfg.act_group_size)
        parts = [xq.view(torch.uint8)]
        if xsf is not None:
            parts.append(xsf.view(torch.uint8))
        parts += [idx.to(torch.int32).view(torch.uint8), topk_weights.view(torch.uint8)]
        rows = torch.cat(parts, dim=1) if T > 0 else torch.empty(0, sum(self._row_layout()),
                                                                 dtype=torch.uint8, device=dev)
        # Destination ranks of each token: a token goes to a rank once.
        dest = torch.where(idx >= 0, idx // El, torch.full_like(idx, -1))
        goes = (dest.unsqueeze(-1) == torch.arange(R, device=dev)).any(dim=1)   # [T, R]
        rank_of_row, token_of_row = goes.t().nonzero(as_tuple=True)    # grouped by rank, ascending t
        send_counts = torch.bincount(rank_of_row, minlength=R)
        recv_counts = torch.empty_like(send_counts)
        self._all_to_all(recv_counts, send_counts, [1] * R, [1] * R)
        send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
        recv = torch.empty(sum(recv_splits), rows.shape[1], dtype=torch.uint8, device=dev)
        self._all_to_all(recv, rows[token_of_row].contiguous(), recv_splits, send_splits)

        # Unpack and compute every (row, local slot) pair, expert by expert.
        nx, nsf, ni, _ = self._row_layout()
        n = recv.shape[0]
        act_dtype = {"fp8": torch.float8_e4m3fn, "fp4": torch.int8, "bf16": torch.bfloat16}[cfg.act_format]
        r_x = recv[:, :nx].contiguous().view(act_dtype)
        r_sf = recv[:, nx:nx + nsf].contiguous().view(torch.int32) if nsf else None
        r_idx = recv[:, nx + nsf:nx + nsf + ni].contiguous().view(torch.int32).to(torch.int64)
        r_w = recv[:, nx + nsf + ni:].contiguous().view(torch.float32)
        local = r_idx - self.rank * El
        is_local = (r_idx >= 0) & (local >= 0) & (local < El)
        counts = torch.bincount(local[is_local], minlength=El).to(torch.int32)
        self.stats.record(counts)
        if self.torch_experts == "grouped_mm":
            y_pairs = self._experts_grouped_mm(r_x, r_sf, r_w, local, is_local)
        else:
            y_pairs = self._experts_reference(r_x, r_sf, r_w, local, is_local)

        # Send back one row per (received row, local slot), in row-major (row, k) order.
        back = y_pairs[is_local]                                        # [P, H] bf16
        if cfg.combine_format == "fp8":
            q, sf = ref.combine_quantize(back)
            back_bytes = torch.cat([q.view(torch.uint8), sf.view(torch.uint8)], dim=1)
        else:
            back_bytes = back.view(torch.uint8)
        row_width = H + 4 * (-(-H // 512)) if cfg.combine_format == "fp8" else 2 * H
        pairs_back = is_local.sum(dim=1)                                # per received row
        back_splits = [int(s.sum()) for s in torch.split(pairs_back, recv_splits)] if n else [0] * R
        # The source knows how many of its slots each destination holds.
        is_on = (dest.unsqueeze(0) == torch.arange(R, device=dev).view(R, 1, 1))  # [R, T, K]
        slots_on = is_on[rank_of_row, token_of_row]                      # [S, K] for sent rows
        ret_splits = [int(s.sum()) for s in torch.split(slots_on.sum(dim=1), send_splits)] if T else [0] * R
        ret = torch.empty(sum(ret_splits), row_width, dtype=torch.uint8, device=dev)
        self._all_to_all(ret, back_bytes.reshape(-1, row_width).contiguous(), ret_splits, back_splits)

        # Step 7: y[t] = sum over k ascending of y_k, float32, masked slots add 0.
        if cfg.combine_format == "fp8":
            y_ret = ref.combine_dequantize(ret[:, :H].contiguous().view(torch.float8_e4m3fn),
                                           ret[:, H:].contiguous().view(torch.int32))
        else:
            y_ret = ret.view(torch.bfloat16).float()
        y_slots = torch.zeros(T, K, H, dtype=torch.float32, device=dev)
        sent_t = token_of_row.unsqueeze(1).expand(-1, K)[slots_on]
        sent_k = torch.arange(K, device=dev).unsqueeze(0).expand(slots_on.shape[0], -1)[slots_on]
        y_slots[sent_t, sent_k] = y_ret
        return ref.combine_reduce(y_slots, idx)

    def _experts_reference(self, r_x, r_sf, r_w, local, is_local):
        """y_k rows bf16 [n, K, H] of every (received row, local slot), by the reference numerics."""
        cfg = self.cfg
        y_pairs = torch.zeros(r_x.shape[0], cfg.topk, cfg.hidden, dtype=torch.bfloat16, device=self.device)
        for e in range(self.num_local_experts):
            rr, kk = torch.nonzero(is_local & (local == e), as_tuple=True)
            if rr.numel() == 0:
                continue
            y_pairs[rr, kk] = ref.expert_forward(
                r_x[rr], None if r_sf is None else r_sf[rr], r_w[rr, kk], self._w13_f32[e],
                self._w2_f32[e], act_format=cfg.act_format, act_group_size=cfg.act_group_size,
                activation_clamp=cfg.activation_clamp, h_group=H_GROUP)
        return y_pairs

    def _prepare_grouped_mm(self) -> None:
        """Weights for torch's grouped GEMMs: FP8 rowwise (fp8 weights) or BF16 (mxfp4 / bf16:
        Hopper has no MXFP4 grouped GEMM in torch, a user dequantises). Column-major B views."""
        self._gmm = {}
        for name, qw in (("w13", self.w13), ("w2", self.w2)):
            w = qw.dequantize(dtype=torch.bfloat16)                       # [E_l, N, K]
            if self.cfg.weight_format == "fp8":
                s = (w.abs().amax(dim=-1).float().clamp_min(1e-12) / 448.0)  # [E_l, N]
                q = torch.empty_like(w, dtype=torch.float8_e4m3fn)
                for e in range(w.shape[0]):                                  # bounded temporaries
                    q[e] = (w[e].float() / s[e].unsqueeze(-1)).to(torch.float8_e4m3fn)
                del w
                self._gmm[name] = (q.transpose(-2, -1), s.contiguous())
            else:
                self._gmm[name] = (w.transpose(-2, -1), None)

    def _gmm_call(self, a_bf16: torch.Tensor, name: str, offs: torch.Tensor) -> torch.Tensor:
        b, sb = self._gmm[name]
        if sb is None:
            return torch._grouped_mm(a_bf16, b, offs=offs)
        sa = a_bf16.float().abs().amax(dim=-1).clamp_min(1e-12) / 448.0
        aq = (a_bf16.float() / sa.unsqueeze(-1)).to(torch.float8_e4m3fn)
        return torch._scaled_grouped_mm(aq, b, sa, sb, offs=offs, out_dtype=torch.bfloat16)

    def _experts_grouped_mm(self, r_x, r_sf, r_w, local, is_local):
        """The baseline a user assembles today: torch._grouped_mm / _scaled_grouped_mm (CUDA)."""
        cfg = self.cfg
        n = r_x.shape[0]
        y_pairs = torch.zeros(n, cfg.topk, cfg.hidden, dtype=torch.bfloat16, device=self.device)
        rr, kk = torch.nonzero(is_local, as_tuple=True)
        if rr.numel() == 0:
            return y_pairs
        e = local[rr, kk]
        order = torch.argsort(e, stable=True)
        rr, kk, e = rr[order], kk[order], e[order]
        offs = torch.cumsum(torch.bincount(e, minlength=self.num_local_experts), 0).to(torch.int32)
        x = ref.dequantize_act(r_x[rr], None if r_sf is None else r_sf[rr], cfg.act_format,
                               cfg.act_group_size).to(torch.bfloat16)
        gu = self._gmm_call(x, "w13", offs)
        gate, up = gu[:, :cfg.intermediate].float(), gu[:, cfg.intermediate:].float()
        if cfg.activation_clamp is not None:
            gate = gate.clamp(max=cfg.activation_clamp)
            up = up.clamp(-cfg.activation_clamp, cfg.activation_clamp)
        h = (torch.nn.functional.silu(gate) * up * r_w[rr, kk].unsqueeze(-1)).to(torch.bfloat16)
        y_pairs[rr, kk] = self._gmm_call(h, "w2", offs)
        return y_pairs
