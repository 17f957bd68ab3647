"""The modules: `MegaMoEExperts` (routed experts, expert parallel), `TopKRouter`, `MegaMoE`.

Backends of `MegaMoEExperts`:

- ``"torch"``: the DESIGN algorithm with `torch.distributed` collectives (gloo on the CPU, NCCL on
  GPUs): quantise, one `all_to_all_single` of packed token rows (a token crosses to a rank once,
  however many of that rank's experts it selected), the reference expert computation, one
  `all_to_all_single` of the result rows back, the ascending-k reduce. Bitwise equal to
  `reference.moe_reference` on one process.
- ``"nvshmem"``: the GPU path (`nvshmem_backend.py`): Triton kernels over an NVSHMEM symmetric
  workspace shared by the group's layers; NVLink pull dispatch, grouped GEMMs, combine, no host
  synchronisation (CUDA-graph capturable). The default when CUDA (sm_90+) and nvshmem4py are
  available; `MegaMoEExperts.is_supported(cfg, backend, device)` says why not otherwise.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import MegaMoEConfig, H_GROUP
from .formats import QuantizedWeight, convert_weight, quantize_weight
from .kernels import reference as ref
from .stats import ExpertLoadStats

__all__ = ["MegaMoEExperts", "TopKRouter", "MegaMoE", "SharedExpert", "resolve_group"]

BACKENDS = ("torch", "nvshmem")


def resolve_group(group) -> Tuple[Optional[object], int, int]:
    """(group, rank, num_ranks): None means WORLD when torch.distributed is initialised, else 1 rank."""
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD
    if group is None:
        return None, 0, 1
    return group, dist.get_rank(group), dist.get_world_size(group)


class MegaMoEExperts(nn.Module):
    """Routed experts of one MoE layer, sharded over a process group (E_local = E / world size).

    Args:
        cfg: the layer's `MegaMoEConfig`.
        group: torch process group; None = WORLD if initialised, else a single rank.
        device: where weights and statistics live (default: the current CUDA device when CUDA is
            available, else the CPU).
        backend: "torch" | "nvshmem" | None (best available).
        torch_experts: expert math of the torch backend: "reference" (bitwise the reference) or
            "grouped_mm" (CUDA only: torch._grouped_mm / _scaled_grouped_mm, the benchmarks'
            baseline).
        validate: check inputs eagerly (host sync on GPU). With False, out-of-range expert ids are
            dropped and counted in `error_count`, which `check_errors()` raises on.

    forward(x [T, H] bf16, topk_idx [T, K] int32/int64, topk_weights [T, K] float32) -> [T, H] bf16.
    """

    def __init__(self, cfg: MegaMoEConfig, group=None, device=None, backend: Optional[str] = None,
                 validate: bool = True, torch_experts: str = "reference"):
        super().__init__()
        if torch_experts not in ("reference", "grouped_mm"):
            raise ValueError(f"torch_experts: expected 'reference' or 'grouped_mm', got {torch_experts!r}")
        self.torch_experts = torch_experts
        if not isinstance(cfg, MegaMoEConfig):
            raise TypeError(f"cfg: expected a MegaMoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.group, self.rank, self.num_ranks = resolve_group(group)
        self.num_local_experts = cfg.num_local_experts(self.num_ranks)
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if backend is None:
            backend = "nvshmem" if self.is_supported(cfg, "nvshmem", self.device)[0] else "torch"
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        if backend == "nvshmem":
            ok, reason = self.is_supported(cfg, "nvshmem", self.device)
            if not ok:
                raise ValueError(f"backend='nvshmem' is not available: {reason}")
        self.backend = backend
        self.validate = validate
        self.stats = ExpertLoadStats(self.num_local_experts, self.device)
        self.register_buffer("error_count", torch.zeros(1, dtype=torch.int32, device=self.device),
                             persistent=False)
        self._gpu = None
        if backend == "nvshmem":
            from .nvshmem_backend import NvshmemForward
            self._gpu = NvshmemForward(cfg, self.group, self.rank, self.num_ranks, self.device)
        self.w13: Optional[QuantizedWeight] = None
        self.w2: Optional[QuantizedWeight] = None
        self._w13_f32: Optional[torch.Tensor] = None
        self._w2_f32: Optional[torch.Tensor] = None

    # ------------------------------------------------------------------ capabilities
    @staticmethod
    def is_supported(cfg: MegaMoEConfig, backend: str, device=None) -> Tuple[bool, str]:
        """(ok, reason) for running `cfg` on `backend` and `device`."""
        if backend == "torch":
            return True, ""
        if backend == "nvshmem":
            dev = torch.device(device) if device is not None else None
            if not torch.cuda.is_available() or (dev is not None and dev.type != "cuda"):
                return False, "the nvshmem backend needs a CUDA device"
            major, _ = torch.cuda.get_device_capability(dev)
            if major < 9:
                return False, f"the nvshmem backend needs Hopper (sm_90) or newer, got sm_{major}x"
            try:
                import nvshmem.core  # noqa: F401
            except Exception as exc:  # pragma: no cover - depends on the machine
                return False, f"nvshmem4py is not importable: {exc}"
            return True, ""
        return False, f"unknown backend {backend!r}"

    # ------------------------------------------------------------------ statistics
    @property
    def cumulative_local_expert_recv_stats(self) -> torch.Tensor:
        """int32 [E_local]: pairs received per local expert over all calls (never reset)."""
        return self.stats.cumulative

    @property
    def last_local_expert_recv_stats(self) -> torch.Tensor:
        """int32 [E_local]: pairs received per local expert in the last call."""
        return self.stats.last

    def global_expert_counts(self, cumulative: bool = False) -> torch.Tensor:
        """int64 [E] counts of every expert over the group (collective: every rank must call)."""
        return self.stats.gather_global(self.group, self.num_ranks, cumulative=cumulative)

    def check_errors(self) -> None:
        """Raise RuntimeError if a GPU spin-wait timed out (read from pinned host memory, so this
        works after the kernel trapped) or pairs were dropped for out-of-range ids (validate=False).
        """
        if self._gpu is not None:
            self._gpu.timeout.check()
        n = int(self.error_count.item())
        if n:
            raise RuntimeError(f"rank {self.rank}: {n} (token, slot) pairs had an expert id outside "
                               f"[-1, {self.cfg.num_experts}) and were dropped")

    # ------------------------------------------------------------------ weights
    def load_weights(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Load bf16 weights, full ([E, 2I, H], [E, H, I]) or local-only ([E_local, ...]).

        They are quantised to `cfg.weight_format`; only this rank's experts are kept.
        """
        cfg = self.cfg
        I, H, E, El = cfg.intermediate, cfg.hidden, cfg.num_experts, self.num_local_experts
        for name, w, tail in (("w13", w13, (2 * I, H)), ("w2", w2, (H, I))):
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
            if w.dim() != 3 or tuple(w.shape[1:]) != tail or w.shape[0] not in (E, El):
                raise ValueError(f"{name}: expected shape [{E} or {El}, {tail[0]}, {tail[1]}], "
                                 f"got {tuple(w.shape)}")
            if not w.is_floating_point():
                raise TypeError(f"{name}: expected a floating-point (bf16) tensor, got {w.dtype}")
        if w13.shape[0] != w2.shape[0]:
            raise ValueError(f"w13 and w2: expert counts differ ({w13.shape[0]} vs {w2.shape[0]})")
        if w13.shape[0] == E and El != E:
            lo = self.rank * El
            w13, w2 = w13[lo:lo + El], w2[lo:lo + El]
        dev = self.device
        self._install_weights(quantize_weight(w13.to(dev), cfg.weight_format, "w13"),
                              quantize_weight(w2.to(dev), cfg.weight_format, "w2"))

    def load_quantized_weights(self, w13: QuantizedWeight, w2: QuantizedWeight,
                               convert: bool = False) -> None:
        """Load already-quantised weights exactly as they are (no bf16 copy, no requantisation).

        w13: `QuantizedWeight` of logical shape [E or E_local, 2I, H] (gate rows then up rows);
        w2: [E or E_local, H, I]; both in `cfg.weight_format` (see `QuantizedWeight.fp8 / .mxfp4 /
        .bf16` for the checkpoint layouts). Full weights are narrowed to this rank's experts
        before anything is copied; the kept bytes are copied to the layer's device.

        convert: when False (default) a format other than `cfg.weight_format` raises ValueError;
        when True it is dequantised and requantised to `cfg.weight_format` (`formats.convert_weight`:
        lossy, except bf16 -> any format, which equals `load_weights` on the same bf16 values).
        """
        cfg = self.cfg
        I, H, E, El = cfg.intermediate, cfg.hidden, cfg.num_experts, self.num_local_experts
        for name, w, tail in (("w13", w13, (2 * I, H)), ("w2", w2, (H, I))):
            if not isinstance(w, QuantizedWeight):
                raise TypeError(f"{name}: expected a QuantizedWeight, got {type(w).__name__}")
            if w.format != cfg.weight_format and not convert:
                raise ValueError(f"{name}: format {w.format!r} differs from cfg.weight_format="
                                 f"{cfg.weight_format!r}; pass convert=True to requantise (lossy)")
            if len(w.shape) != 3 or tuple(w.shape[1:]) != tail or w.shape[0] not in (E, El):
                raise ValueError(f"{name}: expected logical shape [{E} or {El}, {tail[0]}, {tail[1]}], "
                                 f"got {tuple(w.shape)}")
            w.check(name)
        if w13.shape[0] != w2.shape[0]:
            raise ValueError(f"w13 and w2: expert counts differ ({w13.shape[0]} vs {w2.shape[0]})")
        if w13.shape[0] == E and El != E:
            w13, w2 = w13.narrow_experts(self.rank * El, El), w2.narrow_experts(self.rank * El, El)
        w13, w2 = w13.to(self.device).contiguous(), w2.to(self.device).contiguous()
        if w13.format != cfg.weight_format:
            w13 = convert_weight(w13, cfg.weight_format, "w13")
        if w2.format != cfg.weight_format:
            w2 = convert_weight(w2, cfg.weight_format, "w2")
        self._install_weights(w13, w2)

    def _install_weights(self, qw13: QuantizedWeight, qw2: QuantizedWeight) -> None:
        """Set `w13` / `w2` (this rank's experts, on the layer's device, in `cfg.weight_format`)
        and prepare what the backend computes from: the end of every weight-loading path."""
        self.w13, self.w2 = qw13, qw2
        if self._gpu is None and self.torch_experts == "grouped_mm":
            if self.device.type != "cuda":
                raise ValueError("torch_experts='grouped_mm' needs a CUDA device")
            self._prepare_grouped_mm()
        elif self._gpu is None:  # the reference computes on exact dequantised weights
            self._w13_f32 = self.w13.dequantize()
            self._w2_f32 = self.w2.dequantize()

    # ------------------------------------------------------------------ validation
    def _check_inputs(self, x, topk_idx, topk_weights) -> None:
        cfg = self.cfg
        for name, t in (("x", x), ("topk_idx", topk_idx), ("topk_weights", topk_weights)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise ValueError(f"{name}: expected a tensor on {self.device}, got {t.device}")
            if not t.is_contiguous():
                raise ValueError(f"{name}: expected a contiguous tensor")
        if x.dtype != torch.bfloat16:
            raise TypeError(f"x: expected dtype torch.bfloat16, got {x.dtype}")
        if x.dim() != 2 or x.shape[1] != cfg.hidden:
            raise ValueError(f"x: expected shape [T, {cfg.hidden}], got {tuple(x.shape)}")
        T = x.shape[0]
        if T > cfg.max_tokens_per_rank:
            raise ValueError(f"x: T={T} tokens exceeds max_tokens_per_rank={cfg.max_tokens_per_rank}")
        if topk_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"topk_idx: expected dtype torch.int32 or torch.int64, got {topk_idx.dtype}")
        if tuple(topk_idx.shape) != (T, cfg.topk):
            raise ValueError(f"topk_idx: expected shape [{T}, {cfg.topk}], got {tuple(topk_idx.shape)}")
        if topk_weights.dtype != torch.float32:
            raise TypeError(f"topk_weights: expected dtype torch.float32, got {topk_weights.dtype}")
        if tuple(topk_weights.shape) != (T, cfg.topk):
            raise ValueError(f"topk_weights: expected shape [{T}, {cfg.topk}], "
                             f"got {tuple(topk_weights.shape)}")
        if self.validate and T > 0:
            bad = (topk_idx < -1) | (topk_idx >= cfg.num_experts)
            if bool(bad.any()):
                row = int(bad.any(dim=1).nonzero()[0, 0])
                raise ValueError(f"topk_idx: row {row} has an expert id outside [-1, {cfg.num_experts}): "
                                 f"{topk_idx[row].tolist()}")

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            raise RuntimeError("MegaMoEExperts: call load_weights(w13, w2) before forward")
        self._check_inputs(x, topk_idx, topk_weights)
        if self._gpu is not None:
            return self._gpu.forward(x, topk_idx, topk_weights, self.w13, self.w2, self.stats,
                                     self.error_count)
        return self._forward_torch(x, topk_idx, topk_weights)

    # The torch backend ------------------------------------------------------------------
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

    def _forward_torch(self, x, topk_idx, topk_weights):
        cfg = self.cfg
        T, H, K = x.shape[0], cfg.hidden, cfg.topk
        R, El, dev = self.num_ranks, self.num_local_experts, self.device
        idx = topk_idx.to(torch.int64)
        if not self.validate:  # drop (and count) out-of-range ids instead of raising
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
        row_width = H + H // 128 if cfg.combine_format == "fp8" else 2 * H
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


class TopKRouter(nn.Module):
    """Scores experts and picks the top k.

    scoring "softmax" (Mixtral / Qwen-MoE: softmax over all experts, top-k, optional
    renormalisation) or "sigmoid" (DeepSeek-V3: sigmoid scores; a per-expert correction bias used for
    selection only; group-limited top-k over `n_group` groups keeping `topk_group`; weights are the
    unbiased scores, optionally normalised; `group_score` "top2_sum" (V3) or "max" (DeepSeek-V2's
    group-limited greedy, also with softmax scoring)). Weights are finally multiplied by
    `routed_scaling_factor`.

    logits_dtype: dtype of the router GEMM `x · weight^T` (x and the weight are cast to it):
    float32 (default; DeepSeek-V3) or None = the router weight's dtype (Mixtral / Qwen-MoE compute
    logits in the module's dtype, e.g. bf16, and only then softmax in float32). Selection matches
    the transformers routers exactly only when this matches theirs.

    forward(x [T, H]) -> (topk_idx int64 [T, K], topk_weights float32 [T, K]); with
    return_logits=True also the router logits [T, E] (in `logits_dtype`) as a third element.
    """

    def __init__(self, hidden: int, num_experts: int, topk: int, scoring: str = "softmax",
                 norm_topk_prob: bool = True, n_group: Optional[int] = None,
                 topk_group: Optional[int] = None, routed_scaling_factor: float = 1.0,
                 use_correction_bias: bool = False, device=None, dtype=torch.float32,
                 logits_dtype: Optional[torch.dtype] = torch.float32, group_score: str = "top2_sum"):
        super().__init__()
        if group_score not in ("top2_sum", "max"):
            raise ValueError(f"group_score: expected 'top2_sum' or 'max', got {group_score!r}")
        self.group_score = group_score
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"scoring: expected 'softmax' or 'sigmoid', got {scoring!r}")
        if not 0 < topk <= num_experts:
            raise ValueError(f"topk: expected 1..{num_experts}, got {topk}")
        if n_group is not None:
            if num_experts % n_group != 0:
                raise ValueError(f"n_group: {n_group} does not divide num_experts={num_experts}")
            if topk_group is None or not 0 < topk_group <= n_group:
                raise ValueError(f"topk_group: expected 1..{n_group} with n_group set, got {topk_group}")
            if topk > topk_group * (num_experts // n_group):
                raise ValueError(f"topk: {topk} exceeds the experts of topk_group={topk_group} groups")
        self.hidden, self.num_experts, self.topk = hidden, num_experts, topk
        self.scoring, self.norm_topk_prob = scoring, norm_topk_prob
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.logits_dtype = logits_dtype
        self.weight = nn.Parameter(torch.empty(num_experts, hidden, device=device, dtype=dtype))
        nn.init.normal_(self.weight, std=hidden ** -0.5)
        if use_correction_bias:
            self.register_buffer("e_score_correction_bias",
                                 torch.zeros(num_experts, device=device, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor, return_logits: bool = False):
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x: expected shape [T, {self.hidden}], got {tuple(x.shape)}")
        dt = self.weight.dtype if self.logits_dtype is None else self.logits_dtype
        logits = nn.functional.linear(x.to(dt), self.weight.to(dt))
        if self.scoring == "softmax":
            scores = torch.softmax(logits.float(), dim=-1)
        else:
            scores = torch.sigmoid(logits.float())
        choice = scores
        if self.e_score_correction_bias is not None:
            choice = scores + self.e_score_correction_bias.unsqueeze(0)
        if self.n_group is not None and x.shape[0] > 0:
            T, G = x.shape[0], self.n_group
            per = self.num_experts // G
            if self.group_score == "max":          # DeepSeek-V2: a group's best expert
                group_scores = choice.view(T, G, per).amax(dim=-1)
            else:                                   # DeepSeek-V3: sum of its top two
                group_scores = choice.view(T, G, per).topk(min(2, per), dim=-1)[0].sum(dim=-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1)[1]
            keep = torch.zeros(T, G, dtype=torch.bool, device=x.device).scatter_(1, group_idx, True)
            keep = keep.unsqueeze(-1).expand(T, G, per).reshape(T, self.num_experts)
            choice = choice.masked_fill(~keep, float("-inf"))
        topk_idx = choice.topk(self.topk, dim=-1)[1]
        topk_weights = scores.gather(1, topk_idx)
        if self.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weights = (topk_weights * self.routed_scaling_factor).float()
        if return_logits:
            return topk_idx, topk_weights, logits
        return topk_idx, topk_weights


class SharedExpert(nn.Module):
    """Dense SwiGLU MLP computed on the local rank: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, intermediate: int, device=None, dtype=torch.bfloat16):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False, device=device, dtype=dtype)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MegaMoE(nn.Module):
    """Router + expert-parallel experts (+ optional shared experts): y = moe(x).

    `router_kwargs` go to `TopKRouter`; `shared_intermediate` (None: no shared expert) sizes the
    shared SwiGLU MLP. x [T, H] bf16 -> y [T, H] bf16.
    """

    def __init__(self, cfg: MegaMoEConfig, group=None, device=None, backend: Optional[str] = None,
                 router_kwargs: Optional[dict] = None, shared_intermediate: Optional[int] = None,
                 validate: bool = True):
        super().__init__()
        self.cfg = cfg
        self.experts = MegaMoEExperts(cfg, group=group, device=device, backend=backend, validate=validate)
        dev = self.experts.device
        self.router = TopKRouter(cfg.hidden, cfg.num_experts, cfg.topk, device=dev,
                                 **(router_kwargs or {}))
        self.shared_experts = (SharedExpert(cfg.hidden, shared_intermediate, device=dev)
                               if shared_intermediate else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_idx, topk_weights = self.router(x)
        y = self.experts(x, topk_idx, topk_weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        return y

