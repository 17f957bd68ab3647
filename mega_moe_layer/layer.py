"""The modules: `MegaMoEExperts` (routed experts, expert parallel), `TopKRouter`, `SharedExpert`,
`MegaMoE`. The computation lives in the backends, behind one interface (`backend.ExpertsBackend`):

- ``"torch"`` (`torch_backend.py`): the DESIGN algorithm with `torch.distributed` collectives (gloo
  on the CPU, NCCL on GPUs) and the reference experts (or torch's grouped GEMMs, the benchmarks'
  baseline). Bitwise equal to `reference.moe_reference` on one process.
- ``"nvshmem"`` (`nvshmem_backend.py`): the GPU path: Triton kernels over an NVSHMEM symmetric
  workspace shared by the group's layers; NVLink pull dispatch, grouped GEMMs, combine, no host
  synchronisation (CUDA-graph capturable), a registered custom op under `torch.compile`. The
  default when CUDA (sm_90+) and nvshmem4py are available; `MegaMoEExperts.is_supported(cfg,
  backend, device)` says why not otherwise.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .backend import ExpertsBackend
from .config import MegaMoEConfig
from .formats import QuantizedWeight, convert_weight, quantize_weight
from .stats import ExpertLoadStats
from .torch_backend import TORCH_EXPERTS, TorchBackend

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
        validate: True: an expert id outside [-1, E) raises ValueError naming the first bad row
            before the call returns (nvshmem: checked by the first kernel, then one 4-byte
            device-to-host read; not CUDA-graph capturable). False: such pairs are dropped and
            counted in `error_count`, which `check_errors()` raises on (no host synchronisation).
            Settable at any time.

    Under `torch.compile` the nvshmem backend is the custom op `mega_moe::experts_forward` (no
    graph break, capturable in a CUDA graph with validate=False); the torch backend compiles with
    graph breaks at its host reads.

    forward(x [T, H] bf16, topk_idx [T, K] int32/int64, topk_weights [T, K] float32) -> [T, H] bf16.
    """

    def __init__(self, cfg: MegaMoEConfig, group=None, device=None, backend: Optional[str] = None,
                 validate: bool = True, torch_experts: str = "reference"):
        super().__init__()
        if torch_experts not in TORCH_EXPERTS:
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
        self.stats = ExpertLoadStats(self.num_local_experts, self.device)
        #: the CUDA device index inputs must be on (None: not a CUDA layer; `_inputs_ok`)
        self._cuda_index = self.device.index if self.device.type == "cuda" else None
        self.register_buffer("error_count", torch.zeros(1, dtype=torch.int32, device=self.device),
                             persistent=False)
        args = (cfg, self.group, self.rank, self.num_ranks, self.device, self.stats, self.error_count)
        if backend == "nvshmem":
            from .nvshmem_backend import NvshmemForward
            self._backend: ExpertsBackend = NvshmemForward(*args, validate=validate)
        else:
            self._backend = TorchBackend(*args, torch_experts=torch_experts, validate=validate)
        self.w13: Optional[QuantizedWeight] = None
        self.w2: Optional[QuantizedWeight] = None

    @property
    def validate(self) -> bool:
        """Check expert ids eagerly (see the class docstring); settable at any time."""
        return self._backend.validate

    @validate.setter
    def validate(self, value: bool) -> None:
        self._backend.validate = bool(value)

    @property
    def _gpu(self):
        """The nvshmem backend object (None for the torch backend)."""
        return self._backend if self.backend == "nvshmem" else None

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
        self._backend.check_errors()
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
        """The one place weights enter the layer (every loader ends here): keep them and let the
        backend prepare its own form of them. Where the backend's GEMMs read only that form (the
        Hopper FP8 mainloop: `backend.needs_loaded_weights` False) the loaded copy kept here
        moves to the host, so the device holds the experts once."""
        self._backend.prepare_weights(qw13, qw2)
        if getattr(self._backend, "needs_loaded_weights", True):
            self.w13, self.w2 = qw13, qw2
        else:
            self.w13, self.w2 = qw13.to("cpu"), qw2.to("cpu")

    # ------------------------------------------------------------------ validation
    def _inputs_ok(self, x, topk_idx, topk_weights) -> bool:
        """The common case of `_check_inputs` in a few attribute reads (host time): True when
        every check there passes; False sends the call to `_check_inputs` for the error."""
        dev = self._cuda_index
        if dev is None:
            return False
        cfg = self.cfg
        try:
            T = x.shape[0]
            return ((topk_idx.dtype is torch.int64 or topk_idx.dtype is torch.int32)
                    and x.dtype is torch.bfloat16 and topk_weights.dtype is torch.float32
                    and x.shape == (T, cfg.hidden) and T <= cfg.max_tokens_per_rank
                    and topk_idx.shape == (T, cfg.topk) and topk_weights.shape == (T, cfg.topk)
                    and x.get_device() == dev and topk_idx.get_device() == dev
                    and topk_weights.get_device() == dev and x.is_contiguous()
                    and topk_idx.is_contiguous() and topk_weights.is_contiguous())
        except (AttributeError, IndexError, TypeError):
            return False

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

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if self.w13 is None:
            raise RuntimeError("MegaMoEExperts: call load_weights(w13, w2) before forward")
        if not self._inputs_ok(x, topk_idx, topk_weights):
            self._check_inputs(x, topk_idx, topk_weights)
        return self._backend.forward(x, topk_idx, topk_weights)


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

