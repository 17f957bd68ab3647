"""`MegaMoEConfig`: the one frozen, validated description of an MoE layer.

Every size in the package (workspace slots, kernel grids, weight shapes) is derived from this
object; nothing reads environment variables for configuration.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

WEIGHT_FORMATS = ("mxfp4", "fp8", "bf16")
ACT_FORMATS = ("fp8", "fp4", "bf16")
COMBINE_FORMATS = ("bf16", "fp8")
ACT_GROUP_SIZES = (32, 128)

#: Granularity of the FP8 weight block scales (rows x columns).
FP8_WEIGHT_BLOCK = 128
#: Granularity of MXFP4 weight scales along K (OCP MX).
MXFP4_BLOCK = 32
#: Group size of the FP8 combine along H (one UE8M0 byte per 128 columns).
COMBINE_FP8_GROUP = 128
#: Group size of the requantised L1 output h along I (DESIGN step 5).
H_GROUP = 32


@dataclasses.dataclass(frozen=True)
class MegaMoEConfig:
    """Shape and formats of one MoE layer.

    Attributes:
        hidden: H, model width.
        intermediate: I, expert width (L1 produces 2I = gate rows then up rows).
        num_experts: E, routed experts over all ranks.
        topk: K, experts per token.
        max_tokens_per_rank: capacity of one forward call on one rank (T <= this).
        weight_format: "mxfp4" | "fp8" | "bf16".
        act_format: "fp8" | "fp4" | "bf16" for the dispatched x and the L2 input h.
        combine_format: "bf16" | "fp8" for the rows travelling back.
        act_group_size: 32 or 128, scale granularity of x along H.
        activation_clamp: SwiGLU clamp C or None.
        spin_timeout_s: bound on every GPU spin-wait before the kernel traps.
        hopper_fp8_mainloop: Hopper grouped GEMMs with FP8 / MXFP4 weights and FP8 / FP4 acts:
            True runs the streamed FP8 (e4m3 wgmma) mainloop: x rebased to one exponent per row
            (FP8 x as the pre-dispatch kernel quantises it, FP4 x after the dispatch) and h after
            L1 (`kernels/rebase.py`), weights rebased at load time; False the bf16 mainloop on
            operands dequantised in registers. None (default):
            True for FP8 and MXFP4 weights (H200: FP8 weights' GEMMs 2-5x faster; MXFP4 kept at 4
            bits, expanded from re-laid fragment words in registers, 1.5-2.0x faster than the
            bf16 mainloop; docs/PERF.md has every variant measured).
        hopper_fp4_as_fp8: MXFP4 weights on Hopper: keep them expanded to rebased E4M3 bytes (twice
            the memory of the packed weights: exact for groups within 2**8 of their row's largest
            scale) so the FP8 mainloop streams them like FP8 weights, with nothing to decode:
            slower than 4 bits at decode (H200, dsv3: T = 1-512 1.17-1.35x), 1.14x faster at
            T = 4096 (MMA bound); False (default) keeps 4 bits per weight.
    """

    hidden: int
    intermediate: int
    num_experts: int
    topk: int
    max_tokens_per_rank: int = 4096
    weight_format: str = "mxfp4"
    act_format: str = "fp8"
    combine_format: str = "bf16"
    act_group_size: int = 32
    activation_clamp: Optional[float] = None
    spin_timeout_s: float = 30.0
    hopper_fp8_mainloop: Optional[bool] = None
    hopper_fp4_as_fp8: bool = False

    @property
    def fp8_mainloop(self) -> bool:
        """hopper_fp8_mainloop resolved (None: FP8 and MXFP4 weights)."""
        if self.hopper_fp8_mainloop is not None:
            return self.hopper_fp8_mainloop
        return self.weight_format in ("fp8", "mxfp4")

    def __post_init__(self) -> None:
        def need(cond: bool, field: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"MegaMoEConfig.{field}: {msg} (got {getattr(self, field)!r})")

        for f in ("hidden", "intermediate", "num_experts", "topk", "max_tokens_per_rank"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f, "expected a positive int")
        need(self.weight_format in WEIGHT_FORMATS, "weight_format", f"expected one of {WEIGHT_FORMATS}")
        need(self.act_format in ACT_FORMATS, "act_format", f"expected one of {ACT_FORMATS}")
        need(self.combine_format in COMBINE_FORMATS, "combine_format", f"expected one of {COMBINE_FORMATS}")
        need(self.act_group_size in ACT_GROUP_SIZES, "act_group_size", f"expected one of {ACT_GROUP_SIZES}")
        need(self.topk <= self.num_experts, "topk", f"expected topk <= num_experts={self.num_experts}")
        # Scales of 4 consecutive groups pack into one int32, so H must hold a multiple of 4 groups.
        need(self.hidden % (4 * self.act_group_size) == 0, "hidden",
             f"expected a multiple of 4 * act_group_size = {4 * self.act_group_size}")
        need(self.intermediate % (4 * H_GROUP) == 0, "intermediate",
             f"expected a multiple of {4 * H_GROUP} (h is requantised per {H_GROUP}, 4 scales per int32)")
        if self.weight_format == "fp8":
            need(self.hidden % FP8_WEIGHT_BLOCK == 0, "hidden",
                 f"expected a multiple of {FP8_WEIGHT_BLOCK} for fp8 block-scaled weights")
        if self.combine_format == "fp8":
            need(self.hidden % COMBINE_FP8_GROUP == 0, "hidden",
                 f"expected a multiple of {COMBINE_FP8_GROUP} for the fp8 combine "
                 f"(one UE8M0 byte per {COMBINE_FP8_GROUP} columns)")
        if self.activation_clamp is not None:
            need(isinstance(self.activation_clamp, (int, float)) and self.activation_clamp > 0,
                 "activation_clamp", "expected a positive float or None")
        need(self.hopper_fp8_mainloop is None or isinstance(self.hopper_fp8_mainloop, bool), "hopper_fp8_mainloop",
             "expected None (auto) or a bool")
        need(isinstance(self.hopper_fp4_as_fp8, bool), "hopper_fp4_as_fp8", "expected a bool")
        need(isinstance(self.spin_timeout_s, (int, float)) and self.spin_timeout_s > 0,
             "spin_timeout_s", "expected a positive number of seconds")

    def num_local_experts(self, num_ranks: int) -> int:
        """E / num_ranks; ValueError when E is not divisible by the world size."""
        if num_ranks <= 0 or self.num_experts % num_ranks != 0:
            raise ValueError(
                f"MegaMoEConfig.num_experts: {self.num_experts} is not divisible by the world size "
                f"{num_ranks}")
        return self.num_experts // num_ranks

    def validate_world(self, num_ranks: int) -> None:
        self.num_local_experts(num_ranks)
