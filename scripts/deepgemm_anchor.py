"""DeepGEMM's SM90 fused mega MoE as a measuring anchor for `scripts/bench.py --anchor deepgemm`.

DeepGEMM is a measuring tool, never a dependency: `deep_gemm` is imported only by
`import_deep_gemm()`, which bench.py calls only when `--anchor deepgemm` is given. The kit
(`shared/tools/deepgemm`, README there) builds it on the GPU machine:

    bash .dg/build.sh && export PYTHONPATH=/tmp/site:/tmp/dg/dgpkg:$PYTHONPATH

What runs (DeepGEMM's `deep_gemm/__init__.py`, the tree of its pull request 323), per call, from
bf16 x [T, H], int32 topk_idx [T, K] and float32 topk_weights [T, K]:

    mega_moe_pre_dispatch_sm90(x, topk_idx, topk_weights, buf.x, buf.x_sf, buf.topk_idx,
                               buf.topk_weights, T, 128, 1.0)     # FP8 x, float scales per 128
    fp8_mega_moe(y, l1, l2, buf, stats)                           # FP8 weights, 128x128 blocks
    fp8_fp4_mega_moe(y, l1, l2, buf, stats, recipe=(1, 1, 32))    # or E2M1 weights, UE8M0 per 32

Weights are the same random bf16 experts as ours, quantised with DeepGEMM's own helpers
(`deep_gemm.utils.per_block_cast_to_fp8(w, use_ue8m0=False)`: float32 amax/448 per 128x128 block;
`deep_gemm.utils.per_token_cast_to_fp4(w, use_ue8m0=True, gran_k=32)`: packed E2M1 + power-of-two
float32 scales per 32), then laid out by `transform_weights_for_mega_moe_sm90(_fp4)` (gate/up
interleave; FP4 scales packed to UE8M0 int32). Its numerics differ from ours (per-128 float
activation scales, FP8 L2 input per 64), so outputs are compared by rel-RMSE, never asserted.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import torch

KINDS = ("fp8", "fp8xfp4")     # fp8_mega_moe, fp8_fp4_mega_moe
BUILD_HINT = ("build it on the GPU machine with `bash .dg/build.sh && export "
              "PYTHONPATH=/tmp/site:/tmp/dg/dgpkg:$PYTHONPATH` (kit: shared/tools/deepgemm, "
              "staged into .dg/ by its stage.sh), or run without --anchor")
REQUIRED = ("get_symm_buffer_for_sm90_mega_moe", "mega_moe_pre_dispatch_sm90",
            "transform_weights_for_mega_moe_sm90", "transform_weights_for_mega_moe_sm90_fp4",
            "fp8_mega_moe", "fp8_fp4_mega_moe")


class AnchorUnavailable(RuntimeError):
    """`--anchor deepgemm` was asked for but DeepGEMM's SM90 mega MoE cannot run here."""


def import_deep_gemm():
    """`deep_gemm`, or AnchorUnavailable saying why not (import error, missing API, not SM90)."""
    try:
        import deep_gemm  # noqa: PLC0415 -- lazy on purpose: a measuring tool, not a dependency
    except Exception as e:  # ImportError, or its build failing inside the import
        raise AnchorUnavailable(f"--anchor deepgemm: `import deep_gemm` failed "
                                f"({type(e).__name__}: {e}); {BUILD_HINT}") from e
    missing = [n for n in REQUIRED if not hasattr(deep_gemm, n)]
    if missing:
        raise AnchorUnavailable(f"--anchor deepgemm: this deep_gemm ({getattr(deep_gemm, '__file__', '?')}) "
                                f"lacks {', '.join(missing)}: it is not the SM90 mega-MoE tree; {BUILD_HINT}")
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        raise AnchorUnavailable(f"--anchor deepgemm: DeepGEMM's SM90 mega MoE needs a Hopper GPU "
                                f"(sm_90), this one is sm_{major}{minor}")
    return deep_gemm


def quantize_fp8(dg, w13: torch.Tensor, w2: torch.Tensor):
    """bf16 w13 [E, 2I, H], w2 [E, H, I] -> DeepGEMM FP8 weights, before its transform:
    ((fp8 [E, 2I, H], float32 [E, 2I/128, H/128]), (fp8 [E, H, I], float32 [E, H/128, I/128]))."""
    def one(w):
        E, N, K = w.shape
        q = torch.empty(E, N, K, dtype=torch.float8_e4m3fn, device=w.device)
        sf = torch.empty(E, N // 128, K // 128, dtype=torch.float32, device=w.device)
        for e in range(E):   # one expert at a time: the float32 temporaries of all would not fit
            qe, sfe = dg.utils.per_block_cast_to_fp8(w[e], use_ue8m0=False, gran_k=128)
            q[e].copy_(qe)
            sf[e].copy_(sfe)
        return q, sf
    return one(w13), one(w2)


def quantize_fp4(dg, w13: torch.Tensor, w2: torch.Tensor):
    """bf16 w13 [E, 2I, H], w2 [E, H, I] -> DeepGEMM FP4 weights, before its transform:
    ((int8 [E, 2I, H/2] packed E2M1, float32 [E, 2I, H/32] powers of two), (same for w2))."""
    def one(w):
        E, N, K = w.shape
        q = torch.empty(E, N, K // 2, dtype=torch.int8, device=w.device)
        sf = torch.empty(E, N, K // 32, dtype=torch.float32, device=w.device)
        for e in range(E):
            qe, sfe = dg.utils.per_token_cast_to_fp4(w[e], use_ue8m0=True, gran_k=32)
            q[e].copy_(qe)
            sf[e].copy_(sfe)
        return q, sf
    return one(w13), one(w2)


def rel_rmse(y: torch.Tensor, ref: torch.Tensor) -> float:
    """sqrt(mean((y - ref)^2)) / sqrt(mean(ref^2)) in float64; nan for empty or all-zero ref."""
    if y.numel() == 0:
        return float("nan")
    y, ref = y.double(), ref.double()
    den = ref.pow(2).mean().sqrt().item()
    if not den > 0:
        return float("nan")
    return (y - ref).pow(2).mean().sqrt().item() / den


class DeepGEMMAnchor:
    """One DeepGEMM symmetric buffer (sized for `num_max_tokens_per_rank`) and both weight sets.

    `w13` [E_local, 2I, H] and `w2` [E_local, H, I] are this rank's bf16 experts (the ones ours
    loaded). `group` is the process group ours runs on (one rank works too).
    """

    def __init__(self, dg, group, cfg, w13: torch.Tensor, w2: torch.Tensor,
                 num_max_tokens_per_rank: int, kinds=KINDS):
        self.dg = dg
        self.kinds = tuple(kinds)
        self.num_local_experts = w13.shape[0]
        self.buf = dg.get_symm_buffer_for_sm90_mega_moe(group, cfg.num_experts, num_max_tokens_per_rank,
                                                        cfg.topk, cfg.hidden, cfg.intermediate)
        self.weights: Dict[str, Tuple] = {}
        if "fp8" in self.kinds:
            l1, l2 = quantize_fp8(dg, w13, w2)
            self.weights["fp8"] = dg.transform_weights_for_mega_moe_sm90(l1, l2)
            del l1, l2
        if "fp8xfp4" in self.kinds:
            l1, l2 = quantize_fp4(dg, w13, w2)
            self.weights["fp8xfp4"] = dg.transform_weights_for_mega_moe_sm90_fp4(l1, l2)
            del l1, l2
        torch.cuda.empty_cache()
        # Ours keeps cumulative per-expert counts; DeepGEMM's kernel does the same work when given one.
        self.stats = torch.zeros(self.num_local_experts, dtype=torch.int32, device=w13.device)

    def make_call(self, kind: str, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                  y: torch.Tensor) -> Callable[[], None]:
        """A no-argument call doing pre-dispatch + fused MoE from bf16 x into `y` [T, H] bf16.
        `topk_idx` is converted to int32 here, once, outside the timed call."""
        dg, buf, (l1, l2) = self.dg, self.buf, self.weights[kind]
        T = x.shape[0]
        x = x.contiguous()
        idx32 = topk_idx.to(torch.int32).contiguous()
        w = topk_weights.float().contiguous()
        mega = dg.fp8_mega_moe if kind == "fp8" else dg.fp8_fp4_mega_moe
        kw = dict(recipe=(128, 128, 128)) if kind == "fp8" else dict(recipe=(1, 1, 32))

        def call():
            dg.mega_moe_pre_dispatch_sm90(x, idx32, w, buf.x, buf.x_sf, buf.topk_idx, buf.topk_weights,
                                          T, 128, 1.0)
            mega(y, l1, l2, buf, cumulative_local_expert_recv_stats=self.stats, **kw)
        return call

    def destroy(self):
        if self.buf is not None:
            self.buf.destroy()
            self.buf = None
        self.weights = {}


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    """num / den, None when either is missing, not finite or den <= 0."""
    if num is None or den is None:
        return None
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0:
        return None
    return num / den
